"""Interleaved A/B timings of cait_eqx's training step against variants of it, on one machine, in one process.

The figures in `benchmarks/README.md` ("Where the time goes") come from this script:

- `current`: the package as it is (the talking-heads mixes written out as scaled sums of maps);
- `head-mix product`: the mixes as a product over the head axis (`_layers.UNROLL_HEAD_MIX = 0` while tracing);
- `no talking heads`: the same model without the mixes (`talking_heads=False`): a bound on what they cost;
- `two half-batches`: the loss summed over two independent halves of the batch, which XLA can run side by
  side;
- `erfc GELU`: the MLP's GELU as `jax.nn.gelu(x, approximate=False)` writes it, with `erfc`, instead of
  `_layers.gelu`'s `erf` (`_layers.gelu` swapped while tracing);
- `indexed qkv`: `q, k, v` taken by indexing a `(tokens, 3, heads, dim_head)` view of the qkv product instead
  of `_layers._split_qkv`'s `split` (swapped while tracing);
- `heads-major attention`: the self-attention in its heads-major form (`TalkingHeadAttention._heads_major`:
  `q, k, v` made `(heads, tokens, dim_head)` by the qkv product itself, the attention's batched products with
  their batch axes leading, the output projection contracting `(heads, dim_head)`) in every forward, the
  training step's included (`__call__` swapped while tracing); the package takes it only in inference
  forwards of at least `_layers.HEADS_MAJOR_MIN_TOKENS` tokens;
- `token-major attention`: the token-major form everywhere (`HEADS_MAJOR_MIN_TOKENS` raised while tracing), as
  the package computed every forward before the heads-major form; the same as `current` for training steps;
- `whole batch`: the forward as `jax.vmap(model)` over the whole batch, where `current` is the package's
  batched inference, `cait_eqx.batched(model)` (chunks of `cait_eqx.auto_chunk(config)` images); the same as
  `current` for training steps;
- `chunked train`: the training step's forward as `cait_eqx.batched(model)` instead of `jax.vmap(model)`, so
  the forward and the backward run a chunk of images at a time; the same as `current` for forwards.

`--workload forward` times the batched inference forward (`--batch`, default the config's training batch)
instead of the training step, for the same variants.

Each round of each variant starts with one untimed call (as in `bench.py`, see `--round-warmup` there).

The step is `bench.py`'s (forward, backward, AdamW, donated buffers), the configurations are its `xxs24` and
`small`. Run `python benchmarks/train_step_variants.py --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

VARIANTS = ("current", "head-mix product", "no talking heads", "two half-batches", "erfc GELU", "indexed qkv",
            "heads-major attention", "token-major attention", "whole batch", "chunked train")


def _step_fn(variant: str, optim):
    """The train step of `variant`: `bench.eqx_train_step`, or its two-half-batch form."""
    import equinox as eqx
    import jax
    import optax

    if variant == "chunked train":
        import cait_eqx

        return bench.eqx_train_step(optim, forward=lambda m, x: cait_eqx.batched(m)(x))
    if variant != "two half-batches":
        return bench.eqx_train_step(optim)

    def step(batch, model, opt_state):
        x, y = batch
        half = x.shape[0] // 2

        def loss_fn(m):
            losses = [
                optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(x[s]), y[s]).mean()
                for s in (slice(0, half), slice(half, None))
            ]
            return (losses[0] + losses[1]) / 2

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def make_call(spec: bench.Bench, variant: str, batch: int, workload: str = "train"):
    """A zero-argument callable running one train step (or batched forward) of `variant` (compiled here,
    under its settings)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import cait_eqx

    kwargs = spec.eqx_kwargs() | ({"talking_heads": False} if variant == "no talking heads" else {})
    model = cait_eqx.CaiT(**kwargs, key=jr.key(0))
    if workload == "forward":
        model = eqx.nn.inference_mode(model)
        if variant == "whole batch":
            forward = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
        else:
            forward = bench.eqx_inference_fn()  # the package's: cait_eqx.batched
        images = jr.normal(jr.key(1), (batch, 3, spec.image_size, spec.image_size))

        def infer():
            forward(model, images).block_until_ready()

        with traced_as(variant):
            infer()
        return infer
    optim = bench.make_optax()
    step = eqx.filter_jit(_step_fn(variant, optim), donate="all-except-first")
    x = jr.normal(jr.key(1), (batch, 3, spec.image_size, spec.image_size))
    y = jnp.arange(batch, dtype=jnp.int32) % spec.num_classes
    state = [model, optim.init(eqx.filter(model, eqx.is_array))]

    def call():
        state[0], state[1], loss = step((x, y), state[0], state[1])
        loss.block_until_ready()

    with traced_as(variant):
        call()  # traces and compiles now, under this variant's setting; later calls reuse that program
    return call


@contextlib.contextmanager
def traced_as(variant: str):
    """While inside, `cait_eqx._layers` traces as `variant` does (the module settings it swaps are restored on
    exit). Only tracing reads them: a program compiled inside keeps the variant's form when called later."""
    from cait_eqx import _layers

    attention = _layers.TalkingHeadAttention
    saved = _layers.UNROLL_HEAD_MIX, _layers.gelu, _layers._split_qkv
    saved_methods = attention.__call__, _layers.HEADS_MAJOR_MIN_TOKENS
    if variant == "head-mix product":
        _layers.UNROLL_HEAD_MIX = 0
    if variant == "erfc GELU":
        _layers.gelu = _erfc_gelu
    if variant == "indexed qkv":
        _layers._split_qkv = _indexed_qkv
    if variant == "heads-major attention":
        attention.__call__ = _heads_major_call
    if variant == "token-major attention":
        _layers.HEADS_MAJOR_MIN_TOKENS = sys.maxsize
    try:
        yield
    finally:
        _layers.UNROLL_HEAD_MIX, _layers.gelu, _layers._split_qkv = saved
        attention.__call__, _layers.HEADS_MAJOR_MIN_TOKENS = saved_methods


def _heads_major_call(self, x, *, key=None, inference=None):
    """`TalkingHeadAttention.__call__` taking its heads-major form in every forward without attention dropout,
    training steps included (the package takes it for inference forwards of enough tokens only)."""
    from cait_eqx._misc import split_optional

    if self.attn_drop.p > 0 and not (self.attn_drop.inference if inference is None else inference):
        raise NotImplementedError("the heads-major variant has no attention dropout")
    _, proj_key = split_optional(key, 2)
    return self.proj_drop(self._heads_major(x), key=proj_key, inference=inference)


def _indexed_qkv(qkv, heads, dim_head):
    qkv = qkv.reshape(qkv.shape[0], 3, heads, dim_head)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _erfc_gelu(x):
    import jax

    return jax.nn.gelu(x, approximate=False)


def config_names(only: str, quick: bool) -> list[str]:
    """The configurations an `--only` list names (the tiny one alone with `--quick`), checked."""
    names = ["tiny"] if quick else [n.strip() for n in only.split(",") if n.strip()]
    unknown = set(names) - {"xxs24", "s24", "small", "tiny"}
    if unknown:
        raise SystemExit(
            f"--only: unknown configuration(s) {sorted(unknown)}; choose from xxs24, s24, small, tiny"
        )
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="xxs24,small",
                   help="comma list of configurations: xxs24, s24, small, tiny")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--target-s", type=float, default=2.0, help="seconds per variant per round (≥ 1 call)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of variants to time; `current` is always timed (the reference)")
    p.add_argument("--workload", choices=("train", "forward"), default="train",
                   help="time the training step (default) or the batched inference forward")
    p.add_argument("--batch", type=int, help="images per call (default: the config's training batch)")
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one round")
    args = p.parse_args(argv)
    variants = list(dict.fromkeys(["current"] + [v.strip() for v in args.variants.split(",") if v.strip()]))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(
            f"--variants: unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    bench.pin_threads(args.threads)
    names = config_names(args.only, args.quick)
    if args.quick:
        args.rounds, args.target_s = 1, 0.05

    print(f"Machine: {bench.machine_line(bench.machine_meta())}, {args.threads} threads; {args.workload}; "
          f"medians of {args.rounds} interleaved rounds.\n")
    print("| config | batch | variant | s / step | images/s | × current |")
    print("|---|---|---|---|---|---|")
    for name in names:
        spec = bench.BENCHES[name]
        batch = args.batch or spec.train_batch
        calls = {variant: make_call(spec, variant, batch, args.workload) for variant in variants}
        timings = bench.interleaved(calls, args.rounds, args.target_s, round_warmup=1)
        base = timings["current"]["median_s"]
        for variant in variants:
            t = timings[variant]["median_s"]
            print(f"| {spec.title} | {batch} | {variant} | {t:.4g} | {batch / t:.4g} | {base / t:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
