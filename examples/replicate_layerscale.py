"""Does LayerScale let deep CaiT-style models train better? A small-scale replication on the digits.

The paper's central claim (Touvron et al. 2021): with a plain residual `x + f(x)`, deeper image transformers
train worse or become unstable; scaling every residual branch by a learnable per-channel `gamma` initialised
to a small ε (LayerScale) fixes that. The paper also adds talking-heads attention and moves
the class token out of the self-attention stage into a few class-attention blocks.

This script trains CaiT-style models of 4 to 24 SA blocks on scikit-learn's 8×8 digits, several seeds per
condition, with identical data, optimiser (AdamW, warm-up + cosine) and schedule:

- `cait`: the full model: LayerScale (ε by the paper's depth rule), talking heads, 2 class-attention blocks.
- `frozen_layerscale`: the gammas stay at ε and are **not trained** (is it the small scale or the learning?).
- `no_layerscale`: every gamma fixed to 1 and not trained, i.e. the plain residual `x + f(x)` of ViT/DeiT
    (the paper's baseline). Everything else as `cait`.
- `no_talking_heads`: standard multi-head attention in the SA blocks. Everything else as `cait`.
- `class_token`: no class-attention stage (`cls_depth=0`): the class token is prepended at the input and
    goes through every SA block, ViT-style. Everything else as `cait`.

The seeds of one condition train in lockstep as one vectorised program (`eqx.filter_vmap` over a stack of
models), each with its own initialisation and data order. No gradient clipping, so instabilities show.

Reproduce the docs' table and figures (about 13 minutes on 2 CPU cores in all; each line can run alone,
results accumulate in docs/assets/replication/ and every line rewrites the table and figures):

    python examples/replicate_layerscale.py --lr 1e-3 --depth 4 --conditions cait no_layerscale
    python examples/replicate_layerscale.py --lr 1e-3 --depth 12 --conditions cait no_layerscale
    python examples/replicate_layerscale.py --lr 1e-3 --depth 24 --conditions cait no_layerscale
    python examples/replicate_layerscale.py --lr 2e-3 --depth 4 --conditions cait no_layerscale
    python examples/replicate_layerscale.py --lr 2e-3 --depth 12

`--quick` runs every condition for a few steps on a tiny model (the CI check that this script still works).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from beartype import beartype
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, jaxtyped

import cait_eqx
from cait_eqx.data import load_digits, train_test_split

CONDITIONS: dict[str, dict] = {
    "cait": dict(overrides={}, freeze_gammas=False),
    "frozen_layerscale": dict(overrides={}, freeze_gammas=True),
    "no_layerscale": dict(overrides={"init_values": 1.0}, freeze_gammas=True),
    "no_talking_heads": dict(overrides={"talking_heads": False}, freeze_gammas=False),
    "class_token": dict(overrides={"cls_depth": 0}, freeze_gammas=False),
}
LABELS = {
    "cait": "CaiT (LayerScale + talking heads + class attention)",
    "frozen_layerscale": "gammas fixed at ε (LayerScale's init, not trained)",
    "no_layerscale": "no LayerScale (plain residual, gammas fixed at 1)",
    "no_talking_heads": "no talking heads",
    "class_token": "class token at the input (no class attention)",
}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "assets" / "replication"


# ------------------------------------------------------------------------------------------------ model


def build_model(condition: str, depth: int, dim: int, key: PRNGKeyArray) -> cait_eqx.CaiT:
    """One CaiT-style model for the 8×8 digits: 2×2 patches (a 4×4 grid), `dim` wide, `depth` SA blocks."""
    config = dict(
        image_size=8,
        patch_size=2,
        num_classes=10,
        dim=dim,
        depth=depth,
        cls_depth=2,
        heads=4,
        mlp_dim=2 * dim,
        channels=1,
    )
    config.update(CONDITIONS[condition]["overrides"])
    return cait_eqx.CaiT(**config, key=key)


def trainable_filter(model: cait_eqx.CaiT, freeze_gammas: bool) -> PyTree[bool]:
    """True for every array that trains; the LayerScale gammas are frozen for the plain-residual baseline."""
    spec = jax.tree.map(eqx.is_array, model)
    if not freeze_gammas:
        return spec

    def gammas(m):
        out = [m.blocks.gamma_1.gamma, m.blocks.gamma_2.gamma]
        for block in m.blocks_token_only:
            out += [block.gamma_1.gamma, block.gamma_2.gamma]
        return out

    return eqx.tree_at(gammas, spec, replace_fn=lambda _: False)


def weight_decay_mask(params: PyTree) -> PyTree:
    """Decay only linear-map matrices and the patch projection (no biases, norms, gammas, embeddings)."""
    mask = jax.tree.map(lambda _: False, params)

    def matrices(m):
        linears = jax.tree.leaves(m, is_leaf=lambda x: isinstance(x, cait_eqx.Linear))
        return [lin.weight for lin in linears if isinstance(lin, cait_eqx.Linear)] + [
            m.patch_embed.proj.weight
        ]

    return eqx.tree_at(matrices, mask, replace_fn=lambda _: True)


# --------------------------------------------------------------------------------------------- training


@jaxtyped(typechecker=beartype)
def loss_and_accuracy(
    model: cait_eqx.CaiT, images: Float[Array, "batch 1 8 8"], labels: Int[Array, " batch"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    logits = jax.vmap(model)(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, accuracy


def make_train_step(static: PyTree, optim: optax.GradientTransformation):
    """The train step of one model, vectorised over the seed axis and compiled once.

    `diff` holds the trained arrays, `frozen` the arrays that stay fixed (the gammas of the plain-residual
    baseline), `static` everything that is not an array; only `diff` gets gradients and updates.
    """

    def one_seed(frozen, diff, opt_state, images, labels):
        def loss_fn(diff):
            return loss_and_accuracy(eqx.combine(diff, frozen, static), images, labels)

        (loss, accuracy), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(diff)
        updates, opt_state = optim.update(grads, opt_state, diff)
        return eqx.apply_updates(diff, updates), opt_state, loss, accuracy, optax.global_norm(grads)

    # `frozen` (first) is reused every step; the rest is donated.
    return eqx.filter_jit(eqx.filter_vmap(one_seed), donate="all-except-first")


def make_eval(static: PyTree):
    def one_seed(diff, frozen, images, labels):
        return loss_and_accuracy(eqx.combine(diff, frozen, static), images, labels)

    return eqx.filter_jit(eqx.filter_vmap(one_seed, in_axes=(0, 0, None, None)))


@jaxtyped(typechecker=beartype)
def count_spikes(losses: Float[np.ndarray, " steps"], window: int = 20, start: int = 20) -> int:
    """Steps whose training loss exceeds twice the median of the `window` steps before it, by > 0.5 nats."""
    spikes = 0
    for t in range(max(start, window), len(losses)):
        median = float(np.median(losses[t - window : t]))
        if losses[t] > 2.0 * median and losses[t] > median + 0.5:
            spikes += 1
    return spikes


def run_condition(
    condition: str,
    *,
    depth: int,
    dim: int,
    seeds: int,
    epochs: int,
    batch_size: int,
    lr: float,
    train_limit: int | None = None,
) -> dict:
    """Train `seeds` models of one condition in lockstep; returns per-seed curves and summary numbers."""
    train, test = train_test_split(load_digits(), test_fraction=0.2, seed=0)
    if train_limit is not None:
        train = train.subset(np.arange(train_limit))
    x_train = jnp.asarray(train.images, jnp.float32) / 255.0
    y_train = jnp.asarray(train.labels, jnp.int32)
    x_test = jnp.asarray(test.images, jnp.float32) / 255.0
    y_test = jnp.asarray(test.labels, jnp.int32)

    keys = jax.random.split(jax.random.key(depth * 1000 + 17), seeds)
    models = eqx.filter_vmap(lambda k: build_model(condition, depth, dim, k))(keys)
    spec = trainable_filter(
        build_model(condition, depth, dim, keys[0]), CONDITIONS[condition]["freeze_gammas"]
    )
    params, static = eqx.partition(models, eqx.is_array)
    diff, frozen = eqx.partition(params, spec)

    steps_per_epoch = len(train) // batch_size
    total = steps_per_epoch * epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total // 10), total, end_value=lr * 1e-2)
    optim = optax.adamw(schedule, weight_decay=0.05, mask=weight_decay_mask)
    opt_state = eqx.filter_vmap(lambda d: optim.init(eqx.filter(d, eqx.is_array)))(diff)
    train_step = make_train_step(static, optim)
    evaluate = make_eval(static)

    rngs = [np.random.default_rng(1000 * depth + s) for s in range(seeds)]
    losses, grad_norms, test_acc = [], [], []
    start = time.perf_counter()
    for _ in range(epochs):
        orders = np.stack([rng.permutation(len(train))[: steps_per_epoch * batch_size] for rng in rngs])
        orders = orders.reshape(seeds, steps_per_epoch, batch_size)
        for i in range(steps_per_epoch):
            idx = jnp.asarray(orders[:, i])
            diff, opt_state, loss, _, gnorm = train_step(frozen, diff, opt_state, x_train[idx], y_train[idx])
            losses.append(np.asarray(loss))
            grad_norms.append(np.asarray(gnorm))
        _, acc = evaluate(diff, frozen, x_test, y_test)
        test_acc.append(np.asarray(acc))
    seconds = time.perf_counter() - start
    losses = np.stack(losses, axis=1).astype(np.float64)  # (seeds, steps)
    grad_norms = np.stack(grad_norms, axis=1).astype(np.float64)
    test_acc = np.stack(test_acc, axis=1).astype(np.float64)  # (seeds, epochs)
    runs = []
    for s in range(seeds):
        finite = bool(np.all(np.isfinite(losses[s])))
        tail = losses[s, -steps_per_epoch:]
        runs.append(
            dict(
                seed=s,
                final_test_accuracy=float(test_acc[s, -1]),
                best_test_accuracy=float(np.nanmax(test_acc[s])),
                final_train_loss=float(np.mean(tail)),
                nonfinite=not finite,
                spikes=count_spikes(np.nan_to_num(losses[s], nan=1e3)),
                max_grad_norm=float(np.nanmax(grad_norms[s])),
                median_grad_norm=float(np.nanmedian(grad_norms[s])),
                train_loss=[float(v) for v in losses[s]],
                grad_norm=[float(v) for v in grad_norms[s]],
                test_accuracy=[float(v) for v in test_acc[s]],
            )
        )
    return dict(
        condition=condition,
        depth=depth,
        dim=dim,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        steps_per_epoch=steps_per_epoch,
        seconds=seconds,
        runs=runs,
    )


# ---------------------------------------------------------------------------------------------- report


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("depth*_lr*_*.json"))]


def stuck(run: dict) -> bool:
    """A run that did not learn: below 20 % final test accuracy (chance is 10 %), or a non-finite loss."""
    return run["nonfinite"] or run["final_test_accuracy"] < 0.2


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| depth | peak lr | condition | seeds | final test acc. (mean ± sd) | worst seed | stuck "
        "| loss spikes "
        "| max grad norm | final train loss | time |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(CONDITIONS)}
    for r in sorted(results, key=lambda r: (r["lr"], r["depth"], order.get(r["condition"], 99))):
        runs = r["runs"]
        acc = np.array([run["final_test_accuracy"] for run in runs]) * 100
        lines.append(
            f"| {r['depth']} | {r['lr']:g} | {LABELS.get(r['condition'], r['condition'])} | {len(runs)} "
            f"| {acc.mean():.1f} ± {acc.std(ddof=1) if len(acc) > 1 else 0.0:.1f} % | {acc.min():.1f} % "
            f"| {sum(stuck(run) for run in runs)} ({sum(run['nonfinite'] for run in runs)} non-finite) "
            f"| {sum(run['spikes'] for run in runs)} "
            f"| {max(run['max_grad_norm'] for run in runs):.2f} "
            f"| {np.mean([run['final_train_loss'] for run in runs]):.3f} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> Path:
    from matplotlib.figure import Figure

    settings = sorted({(r["depth"], r["lr"]) for r in results}, key=lambda s: (s[1], s[0]))
    fig = Figure(figsize=(12, 3.4 * len(settings)), layout="constrained")
    axes = fig.subplots(len(settings), 3, squeeze=False)
    colours = dict(zip(CONDITIONS, ("C0", "C4", "C3", "C2", "C1"), strict=True))
    for row, (depth, lr) in enumerate(settings):
        ax_loss, ax_grad, ax_acc = axes[row]
        for r in (r for r in results if (r["depth"], r["lr"]) == (depth, lr)):
            colour = colours.get(r["condition"], "C7")
            for i, run in enumerate(r["runs"]):
                label = LABELS.get(r["condition"], r["condition"]) if i == 0 else None
                steps = np.arange(1, len(run["train_loss"]) + 1)
                ax_loss.plot(steps, run["train_loss"], color=colour, lw=0.6, alpha=0.7, label=label)
                ax_grad.plot(steps, run["grad_norm"], color=colour, lw=0.6, alpha=0.7)
                epochs = np.arange(1, len(run["test_accuracy"]) + 1)
                ax_acc.plot(epochs, 100 * np.asarray(run["test_accuracy"]), color=colour, lw=1.0, alpha=0.8)
        setting = f"depth {depth}, lr {lr:g}"
        ax_loss.set(title=f"{setting}: training loss", xlabel="step", yscale="log")
        ax_grad.set(title=f"{setting}: gradient norm", xlabel="step", yscale="log")
        ax_acc.set(title=f"{setting}: test accuracy (%)", xlabel="epoch", ylim=(0, 100))
        ax_loss.legend(fontsize=7)
    path = out / "layerscale.png"
    tmp = out / ".layerscale.png.tmp"
    fig.savefig(tmp, format="png", dpi=72)
    os.replace(tmp, path)
    return path


def plot_depth(results: list[dict], out: Path) -> Path:
    """Final test accuracy against depth, per condition and learning rate (mean and every seed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4), layout="constrained")
    ax = fig.subplots()
    colours = dict(zip(CONDITIONS, ("C0", "C4", "C3", "C2", "C1"), strict=True))
    groups = sorted(
        {(r["condition"], r["lr"]) for r in results}, key=lambda g: (list(CONDITIONS).index(g[0]), g[1])
    )
    for condition, lr in groups:
        rows = sorted(
            (r for r in results if (r["condition"], r["lr"]) == (condition, lr)), key=lambda r: r["depth"]
        )
        depths = [r["depth"] for r in rows]
        accs = [[100 * run["final_test_accuracy"] for run in r["runs"]] for r in rows]
        style = "-" if lr == min(r["lr"] for r in results) else "--"
        ax.plot(
            depths,
            [np.mean(a) for a in accs],
            style,
            marker="o",
            color=colours.get(condition, "C7"),
            label=f"{LABELS.get(condition, condition)}, lr {lr:g}",
        )
        for d, a in zip(depths, accs, strict=True):
            ax.scatter([d] * len(a), a, s=8, color=colours.get(condition, "C7"), alpha=0.5)
    ax.set(
        xlabel="SA blocks (depth)",
        ylabel="final test accuracy (%)",
        ylim=(0, 100),
        title=f"digits, {results[0]['epochs']} epochs, {len(results[0]['runs'])} seeds per point",
    )
    ax.set_xticks(sorted({r["depth"] for r in results}))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = out / "depth.png"
    tmp = out / ".depth.png.tmp"
    fig.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, path)
    return path


def report(out: Path) -> None:
    results = load_results(out)
    if not results:
        raise SystemExit(f"no results in {out}: run some conditions first")
    table = markdown_table(results)
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out / 'table.md'}, {plot(results, out)} and {plot_depth(results, out)}")


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    parser.add_argument("--depth", type=int, default=12, help="number of SA blocks (default 12)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warm-up + cosine)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--report", action="store_true", help="only rebuild the table and figure from results"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model per condition (CI)")
    args = parser.parse_args(argv)

    if args.quick:
        if args.out is None:
            parser.error("--quick needs --out (it must not overwrite the documented results)")
        args.depth, args.dim, args.seeds, args.epochs, args.batch_size = 2, 16, 2, 1, 32
    out = args.out or DEFAULT_OUT
    if not args.report:
        for condition in args.conditions:
            result = run_condition(
                condition,
                depth=args.depth,
                dim=args.dim,
                seeds=args.seeds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                train_limit=128 if args.quick else None,
            )
            accs = ", ".join(f"{100 * run['final_test_accuracy']:.1f}" for run in result["runs"])
            print(
                f"depth {args.depth}, lr {args.lr:g}, {condition}: test accuracy per seed {accs} % "
                f"({result['seconds']:.0f} s)"
            )
            _write_json(out / f"depth{args.depth}_lr{args.lr:g}_{condition}.json", result)
    report(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
