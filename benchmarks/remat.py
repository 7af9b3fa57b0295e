"""cait_eqx's training step under each rematerialisation policy, one fresh process per policy.

`cait_eqx.REMAT_POLICIES` name what the self-attention stage keeps for the backward pass (`CaiT(...,
remat=...)`, `cait_eqx.with_remat`): `none` keeps every intermediate result, `weight_products` the outputs
of the products with weight matrices, `dots` every matrix product's output (the attention maps' products
included), `full` nothing but each block's input (the whole block is recomputed). Less kept is less memory
and more recomputation.

Each round starts one worker process per policy (alternating the order round by round), so each policy's
memory is measured alone. A worker builds the model (random weights) with the policy, traces and compiles
`bench.py`'s step (forward, backward, AdamW, donated buffers) with `jax.jit(...).lower(...).compile()`, reads
XLA's own account of the compiled program's scratch memory (`memory_analysis().temp_size_in_bytes`: the
activations kept for the backward pass and every other temporary of one step), runs `--warmup` steps, then
times `--steps` consecutive steps and reports the median, with the peak resident set during those steps
(`VmHWM`, reset after the warm-up) and up to the end of the warm-up (compilation included). Every worker runs
with the glibc tunables of the environment it is started in (`GLIBC_TUNABLES`, recorded).

Run `python benchmarks/remat.py --help`; the results are in `benchmarks/README.md` ("Rematerialisation").
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import train_step_variants  # noqa: E402

POLICIES = ("none", "weight_products", "dots", "full")  # cait_eqx.REMAT_POLICIES; checked in the worker


def worker(spec: dict) -> dict:
    """Compile and time `spec["config"]`'s train step under remat policy `spec["policy"]`, in this process."""
    import resource
    import time

    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    import cait_eqx

    if tuple(cait_eqx.REMAT_POLICIES) != POLICIES:
        raise SystemExit(
            f"cait_eqx.REMAT_POLICIES is {cait_eqx.REMAT_POLICIES}; this script knows {POLICIES}"
        )
    conf = bench.BENCHES[spec["config"]]
    batch = conf.train_batch
    model = cait_eqx.with_remat(cait_eqx.CaiT(**conf.eqx_kwargs(), key=jr.key(0)), spec["policy"])
    optim = bench.make_optax()
    x = jr.normal(jr.key(1), (batch, 3, conf.image_size, conf.image_size))
    y = jnp.arange(batch, dtype=jnp.int32) % conf.num_classes
    state = [model, optim.init(eqx.filter(model, eqx.is_array))]
    t0 = time.perf_counter()
    lowered = eqx.filter_jit(bench.eqx_train_step(optim), donate="all-except-first").lower((x, y), *state)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    memory = compiled.compiled.memory_analysis()

    def call():
        state[0], state[1], loss = compiled((x, y), state[0], state[1])
        loss.block_until_ready()

    call()
    for _ in range(spec["warmup"]):
        call()
    peak_incl_compile = bench._proc_status_mb("VmHWM")
    resettable = bench._reset_peak_rss()
    rss_before = bench._proc_status_mb("VmRSS")
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    rss_after = bench._proc_status_mb("VmRSS")
    return dict(
        config=conf.key,
        title=conf.title,
        batch=batch,
        policy=spec["policy"],
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        trace_s=t1 - t0,
        compile_s=t2 - t1,
        temp_mb=getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else None,
        step_times_s=times,
        step_s=statistics.median(times),
        faults_per_step=(after.ru_minflt - before.ru_minflt) / len(times),
        system_s_per_step=(after.ru_stime - before.ru_stime) / len(times),
        peak_incl_compile_mb=peak_incl_compile,
        rss_before_steps_mb=rss_before,
        steady_peak_mb=max(bench._proc_status_mb("VmHWM"), rss_after) if resettable else None,
    )


def run_worker(config: str, policy: str, args) -> dict:
    spec = dict(config=config, policy=policy, steps=args.steps, warmup=args.warmup)
    cache = ({"JAX_COMPILATION_CACHE_DIR": args.jax_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
             if args.jax_cache else {})
    return bench.run_worker(__file__, spec, args=("--threads", str(args.threads)), env=cache, lock=args.lock)


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Machine: {bench.machine_line(meta)}, {meta['threads']} threads"
        # Results measured before the allocator setting was removed name the mode they ran under.
        + (f", `configure_allocator({meta['allocator']!r})`" if "allocator" in meta else "")
        + (f", GLIBC_TUNABLES={meta['glibc_tunables']}" if meta.get("glibc_tunables") else "")
        + "; medians over "
        f"{meta['rounds']} "
        f"rounds (one fresh process per policy and round) of {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up steps.",
        "",
        "| config | batch | remat | s / step | × none | XLA scratch MB | peak RSS MB (steps) | "
        "peak RSS MB (compile + warm-up) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in dict.fromkeys(r["config"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["config"] == config]
        policies = [p for p in POLICIES if any(r["policy"] == p for r in rows)]

        def med(policy, key, rows=rows):
            values = [r[key] for r in rows if r["policy"] == policy]
            return None if any(v is None for v in values) else statistics.median(values)

        base = med("none", "step_s") if "none" in policies else None
        for p in policies:
            step = med(p, "step_s")
            ratio = f"{base / step:.2f}×" if base else "–"
            lines.append(
                f"| {rows[0]['title']} | {rows[0]['batch']} | {p} | {step:.3f} | {ratio} | "
                f"{bench._fmt(med(p, 'temp_mb'), 0)} | {bench._fmt(med(p, 'steady_peak_mb'), 0)} | "
                f"{med(p, 'peak_incl_compile_mb'):.0f} | {med(p, 'trace_s') + med(p, 'compile_s'):.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="xxs24,small", help="comma list of configurations: xxs24, small, tiny")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma list from {', '.join(POLICIES)}")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each starts one process per policy")
    p.add_argument("--steps", type=int, default=8, help="timed consecutive steps per process (median kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call, per process")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--lock", metavar="PATH", help="hold an exclusive flock on PATH while each worker runs")
    p.add_argument(
        "--jax-cache",
        metavar="DIR",
        help="JAX compilation cache shared by the workers (--quick: a "
        "temporary one, so that only the first worker compiles what they have in common)",
    )
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one round, two steps")
    p.add_argument("--json", metavar="PATH", help="also write every worker's measurements as JSON")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bench.answered_without_measuring(args, markdown, worker):
        return 0
    names = train_step_variants.config_names(args.only, args.quick)
    policies = list(dict.fromkeys(v.strip() for v in args.policies.split(",") if v.strip()))
    unknown = set(policies) - set(POLICIES)
    if unknown or not policies:
        raise SystemExit(
            f"--policies: unknown or no policy {sorted(unknown)}; choose from {', '.join(POLICIES)}"
        )
    with tempfile.TemporaryDirectory(prefix="remat-jax-cache-") as tmp:
        if args.quick:
            args.rounds, args.steps, args.warmup = 1, 2, 0
            args.jax_cache = args.jax_cache or tmp
        if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
            raise SystemExit("--rounds and --steps must be at least 1, --warmup 0 or more")
        results = dict(
            meta=dict(
                command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                rounds=args.rounds,
                steps=args.steps,
                warmup=args.warmup,
                threads=args.threads,
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                policies=policies,
                **bench.machine_meta(),
                **bench.source_meta(),
            ),
            runs=[],
        )
        for name in names:
            for r in range(args.rounds):
                for policy in policies if r % 2 == 0 else policies[::-1]:
                    print(f"[{name}] round {r + 1}: {policy} ...", file=sys.stderr, flush=True)
                    results["runs"].append(dict(run_worker(name, policy, args), round=r))
                    if args.json:  # a long run keeps what it has measured so far
                        bench.write_json_atomic(args.json, results)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
