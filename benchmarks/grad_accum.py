"""Gradient accumulation: one batch of B images per optimiser step, as one batch or as K micro-batches.

Variants, each one optimiser step of the DeiT recipe (`cait_eqx.training.make_optimizer`) on B images:

- `batch`: `make_train_step` on the whole batch (`grad_accum_steps=1`);
- `scan`: `TrainConfig.grad_accum_steps = K`: one compiled step, the K micro-batches in a `lax.scan`;
- `multisteps`: `optax.MultiSteps(optimiser, every_k_schedule=K)`: K calls of a step on B/K images each, the
    optimiser accumulating the gradient in its state and updating on every K-th call;
- `micro`: one step on B/K images alone (the memory one micro-batch needs, for reference).

Each round starts one fresh worker process per variant (the order alternating between rounds), so each
variant's memory is measured alone. A worker builds the model (random weights), compiles its step with
`eqx.filter_jit(...).lower(...).compile()`, reads XLA's scratch memory of the compiled step
(`memory_analysis().temp_size_in_bytes`), runs `--warmup` optimiser steps, resets the kernel's peak-RSS mark
(VmHWM) and times `--steps` optimiser steps (median), with the peak resident set over them.

Run it under the machine's CPU lock, e.g.
`flock /tmp/cait_cpu.lock python benchmarks/grad_accum.py --json benchmarks/results/grad_accum.json`;
the results are in `docs/guides/finetune.md` ("Gradient accumulation").
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

VARIANTS = ("batch", "scan", "multisteps", "micro")


def worker(spec: dict) -> dict:
    """Compile and time one variant's optimiser step, in this process."""
    import time

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax

    import cait_eqx
    from cait_eqx import training

    conf = bench.BENCHES[spec["config"]]
    variant, batch, accum = spec["variant"], spec["batch"], spec["accum"]
    model = cait_eqx.CaiT(**conf.eqx_kwargs(), key=jr.key(0))
    optim = training.make_optimizer(1e-4)
    calls, rows, step_accum = 1, batch, 1
    if variant == "scan":
        step_accum = accum
    elif variant == "multisteps":
        optim = optax.MultiSteps(optim, every_k_schedule=accum).gradient_transformation()
        calls, rows = accum, batch // accum
    elif variant == "micro":
        rows = batch // accum
    # Each variant runs its (micro-)batches whole: no automatic parts (`step_chunk`) on top of them.
    config = training.StepConfig(
        num_classes=conf.num_classes, grad_accum_steps=step_accum, step_chunk=rows // step_accum
    )
    pure = training.make_train_step(optim, config, jit=False)
    images = jr.randint(jr.key(1), (rows, 3, conf.image_size, conf.image_size), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(rows, dtype=jnp.int32) % conf.num_classes

    def step(batch_and_key, model, opt_state):
        batch, key = batch_and_key
        return pure(model, opt_state, batch, key)

    state = [model, optim.init(training.trainable_params(model))]
    t0 = time.perf_counter()
    compiled = eqx.filter_jit(step, donate="all-except-first").lower(
        ((images, labels), jr.key(0)), *state
    ).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.compiled.memory_analysis()
    counter = [0]

    def optimiser_step():
        for _ in range(calls):
            counter[0] += 1
            state[0], state[1], metrics = compiled(((images, labels), jr.key(counter[0])), *state)
        jax.block_until_ready(metrics["loss"])

    for _ in range(spec["warmup"]):
        optimiser_step()
    resettable = bench._reset_peak_rss()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        optimiser_step()
        times.append(time.perf_counter() - t)
    rss_after = bench._proc_status_mb("VmRSS")
    return dict(
        config=conf.key,
        title=conf.title,
        variant=variant,
        batch=batch,
        accum=accum,
        micro_batch=rows if variant != "scan" else batch // accum,
        calls_per_step=calls,
        compile_s=compile_s,
        temp_mb=memory.temp_size_in_bytes / 2**20 if memory is not None else None,
        step_times_s=times,
        step_s=statistics.median(times),
        steady_peak_mb=max(bench._proc_status_mb("VmHWM"), rss_after) if resettable else None,
    )


def run_worker(spec: dict, threads: int) -> dict:
    return bench.run_worker(__file__, spec, args=("--threads", str(threads)), timeout=900)


_LABELS = {
    "batch": "one batch of {batch}",
    "scan": "{accum} × {micro} in one step (`grad_accum_steps={accum}`, `lax.scan`)",
    "multisteps": "{accum} × {micro} as `optax.MultiSteps` ({accum} calls)",
    "micro": "one micro-batch of {micro} alone (reference)",
}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"{meta['cpu']} ({meta['isa']}), {meta['threads']} threads; {meta['title']}; medians over "
        f"{meta['rounds']} rounds (one fresh process per variant and round) of {meta['steps']} timed "
        f"optimiser steps after {meta['warmup']} warm-up steps.",
        "",
        "| variant | images / optimiser step | s / optimiser step | XLA scratch MB | peak RSS MB (steps) |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rows = [r for r in results["runs"] if r["variant"] == variant]
        if not rows:
            continue
        first = rows[0]
        images = first["micro_batch"] if variant == "micro" else first["batch"]
        peaks = [r["steady_peak_mb"] for r in rows]
        label = _LABELS[variant].format(
            batch=first["batch"], accum=first["accum"], micro=first["micro_batch"]
        )
        lines.append(
            f"| {label} | {images} | {statistics.median(r['step_s'] for r in rows):.3f} | "
            f"{bench._fmt(statistics.median(r['temp_mb'] for r in rows), 1)} | "
            f"{bench._fmt(None if None in peaks else statistics.median(peaks), 0)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small",
                   help="a bench.py configuration (default small: d192, depth 12, 32×32 in 4×4 patches)")
    p.add_argument("--batch", type=int, default=16, help="images per optimiser step (default 16)")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per optimiser step (default 4)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each starts one process per variant")
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps per process (median kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps after compiling")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one round, one step")
    p.add_argument("--json", metavar="PATH", help="also write every worker's measurements as JSON")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bench.answered_without_measuring(args, markdown, worker):
        return 0
    if args.quick:
        args.config, args.rounds, args.steps, args.warmup = "tiny", 1, 1, 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise SystemExit(
            f"--variants: unknown or no variant {sorted(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    if args.config not in bench.BENCHES:
        raise SystemExit(f"--config: unknown {args.config!r}; choose from {', '.join(bench.BENCHES)}")
    if args.accum < 1 or args.batch % args.accum:
        raise SystemExit(f"--accum {args.accum} must be >= 1 and divide --batch {args.batch}")
    runs = []
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            spec = dict(config=args.config, variant=variant, batch=args.batch, accum=args.accum,
                        steps=args.steps, warmup=args.warmup)
            result = run_worker(spec, args.threads)
            print(f"round {round_index}: {variant}: {result['step_s']:.3f} s/step, "
                  f"{result['temp_mb']:.1f} MB scratch", file=sys.stderr)
            runs.append(result)
    cpu, isa = bench.cpu_kind()
    results = dict(
        meta=dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            cpu=cpu, isa=isa, machine=platform.machine(), threads=args.threads, rounds=args.rounds,
            steps=args.steps, warmup=args.warmup, title=bench.BENCHES[args.config].title,
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        ),
        runs=runs,
    )
    if args.json:
        bench.write_json_atomic(args.json, results)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
