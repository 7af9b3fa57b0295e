"""Fine-tuning a big CaiT on small hardware: memory and time of each method, one fresh process per method.

Methods (`--methods`, a comma list), each `cait_eqx.training.make_train_step` with the DeiT recipe
(`make_optimizer`) on `--batch` random images of the model's size and random weights:

- `full`: every parameter differentiated and optimised, the model's default rematerialisation;
- `remat:POLICY`: the same with `cait_eqx.with_remat(model, POLICY)` (e.g. `remat:full`);
- `accum:K`: the batch as K micro-batches in one step (`TrainConfig.grad_accum_steps=K`);
- `probe`: only the head trains (`freeze="backbone"`);
- `blocks:N` (`HALF`: half the depth): the stem and the first N self-attention blocks frozen;
- `lora:R`: LoRA adapters of rank R on the default targets (`cait_eqx.lora`), the base weights frozen.

Each method runs in its own process (`bench.run_worker`) so that its peak resident memory is its own: the
peak over compilation and the first step, and the steady peak over the timed steps (the kernel's mark reset
after the warm-up step, where the kernel allows it). Also recorded: the trainable parameters, the optimiser
state's bytes, XLA's scratch memory for the step (`temp_size_in_bytes`), compile time and the median
seconds per step of `--steps` timed steps after one untimed step.

Run it with the machine's CPU lock (each worker takes it for itself), e.g. `python
benchmarks/finetune_methods.py --lock /tmp/cait_cpu.lock --json benchmarks/results/finetune_methods.json`;
the table is in `docs/guides/finetune.md`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

DEFAULT_METHODS = "full,remat:full,accum:4,probe,HALF,lora:8"


def _setting(method: str) -> tuple[str, str]:
    """`method` as (kind, argument): ("full", ""), ("remat", policy), ("accum", K), ..."""
    kind, _, value = method.partition(":")
    if kind in ("blocks", "HALF"):
        return "blocks", method
    if kind not in ("full", "remat", "accum", "probe", "lora") or (kind in ("full", "probe")) == bool(value):
        raise SystemExit(
            f"unknown method {method!r}: expected full, remat:POLICY, accum:K, probe, blocks:N, HALF or "
            "lora:R"
        )
    return kind, value


def worker(spec: dict) -> dict:
    """Build, compile and time one method's training step, in this process."""
    import time

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import cait_eqx
    from cait_eqx import training

    if spec["model"] == "tiny":
        model = cait_eqx.CaiT(**bench.BENCHES["tiny"].eqx_kwargs(), key=jr.key(0))
    else:
        size = {"image_size": spec["image_size"]} if spec.get("image_size") else {}
        model = cait_eqx.create_model(spec["model"], key=jr.key(0), **size)
    method = spec["method"]
    if method == "HALF":
        method = f"blocks:{model.config.depth // 2}"
    kind, value = _setting(method)
    freeze, accum = "none", 1
    if kind == "remat":
        model = cait_eqx.with_remat(model, value)
    elif kind == "accum":
        accum = int(value)
    elif kind == "probe":
        freeze = "backbone"
    elif kind == "blocks":
        freeze = value
    elif kind == "lora":
        model = cait_eqx.lora(model, rank=int(value), key=jr.key(2))
    optim = training.make_optimizer(1e-4)
    # Each (micro-)batch whole, as the results in docs/guides/finetune.md were measured (no automatic parts).
    config = training.StepConfig(
        num_classes=model.config.num_classes, freeze=freeze, grad_accum_steps=accum,
        step_chunk=spec["batch"] // accum,
    )
    pure = training.make_train_step(optim, config, jit=False)
    params = training.trainable_params(model, freeze)
    opt_state = optim.init(params)
    batch, size = spec["batch"], model.config.image_size
    images = jr.randint(jr.key(1), (batch, 3, *size), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(batch, dtype=jnp.int32) % model.config.num_classes
    arrays = [x for x in jax.tree.leaves(params) if eqx.is_array(x)]

    def step(batch_and_key, model, opt_state):
        data, key = batch_and_key
        return pure(model, opt_state, data, key)

    t0 = time.perf_counter()
    compiled = eqx.filter_jit(step, donate="all-except-first").lower(
        ((images, labels), jr.key(0)), model, opt_state
    ).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.compiled.memory_analysis()
    state, counter = [model, opt_state], [0]

    def call():
        counter[0] += 1
        state[0], state[1], metrics = compiled(((images, labels), jr.key(counter[0])), *state)
        return float(metrics["loss"])

    first_loss = call()
    peak_first = bench._proc_status_mb("VmHWM")
    resettable = bench._reset_peak_rss()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return dict(
        method=method,
        freeze=freeze,
        grad_accum_steps=accum,
        trainable_params=sum(x.size for x in arrays),
        total_params=sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))),
        opt_state_mb=sum(x.nbytes for x in jax.tree.leaves(state[1]) if eqx.is_array(x)) / 2**20,
        temp_mb=memory.temp_size_in_bytes / 2**20 if memory is not None else None,
        compile_s=compile_s,
        first_loss=first_loss,
        step_times_s=times,
        step_s=statistics.median(times),
        peak_first_step_mb=peak_first,
        steady_peak_mb=bench._proc_status_mb("VmHWM") if resettable else None,
    )


def markdown(results: dict) -> str:
    meta = results["meta"]
    rows = results["methods"]
    base = next((r for r in rows if r["method"] == "full"), None)
    lines = [
        f"{bench.machine_line(meta)}; {meta['model']}"
        + (f" at {meta['image_size']}×{meta['image_size']}" if meta.get("image_size") else "")
        + f", batch {meta['batch']}, random weights; median of "
        f"{meta['steps']} timed steps after one untimed step, one fresh process per method.",
        "",
        "| method | s / step | × full | trainable parameters | optimiser state MB | XLA scratch MB | "
        "peak RSS, compile + first step MB | peak RSS, steps MB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, digits=0):
        return "–" if v is None else f"{v:,.{digits}f}"

    for r in rows:
        ratio = f"{r['step_s'] / base['step_s']:.2f}×" if base else "–"
        lines.append(
            f"| {r['method']} | {r['step_s']:.2f} | {ratio} | {r['trainable_params']:,} | "
            f"{fmt(r['opt_state_mb'], 1)} | {fmt(r['temp_mb'])} | {fmt(r['peak_first_step_mb'])} | "
            f"{fmt(r['steady_peak_mb'])} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cait_s24_224", help="a cait_eqx variant name, or `tiny` (CI)")
    p.add_argument("--image-size", type=int, help="build the variant at this image size (default: its own)")
    p.add_argument("--batch", type=int, help="images per optimiser step (default 16; 4 with --quick)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default {DEFAULT_METHODS})")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--lock", metavar="FILE", help="hold this flock file while each worker runs")
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one timed step")
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bench.answered_without_measuring(args, markdown, worker):
        return 0
    if args.quick:
        args.model, args.steps = "tiny", 1
    if args.batch is None:
        args.batch = 4 if args.quick else 16
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        _setting(m)
    rows = []
    for method in methods:
        print(f"{method} ...", file=sys.stderr, flush=True)
        spec = dict(model=args.model, image_size=args.image_size, method=method, batch=args.batch,
                    steps=args.steps)
        rows.append(bench.run_worker(__file__, spec, args=("--threads", str(args.threads)), lock=args.lock))
    meta = bench.machine_meta()
    meta.update(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        threads=args.threads, model=args.model, image_size=args.image_size, batch=args.batch,
        steps=args.steps,
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
    )
    results = dict(meta=meta, methods=rows)
    if args.json:
        bench.write_json_atomic(args.json, results)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
