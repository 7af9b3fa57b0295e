"""The training step under settings that must be chosen before a process starts, one fresh process each.

XLA reads `XLA_FLAGS` once, when JAX first starts its CPU backend, so XLA flags can only be compared
between processes; the same holds here for the scan's unrolling and the remat policy, to keep every setting
on an equal footing (own process, own compilation, own allocator history). A setting is written
`name=SPEC` where SPEC is a `;`-separated list of

- `flags:...`: XLA flags for the process (appended to the `XLA_FLAGS` the script was started with);
- `unroll:K`: the SA blocks' `lax.scan` unrolled by K (`cait_eqx._blocks.SCAN_UNROLL`; `unroll:full` for all);
- `remat:POLICY`: the model's remat policy (`cait_eqx.REMAT_POLICIES`);
- `devices:N`: N XLA host devices (`--xla_force_host_platform_device_count=N`) sharing the same CPUs, the
  batch split over them by `cait_eqx.parallel` (`make_mesh(data=N)`, `shard_state`, `shard_batch`) as
  `cait-eqx train --mesh data=N` does: N data-parallel copies of the step that run side by side;
- `chunk:N`: the step's gradient taken in parts of at most N images (`cait_eqx.chunked_value_and_grad`;
  `chunk:auto` for the model's `auto_train_chunk`); without it the whole batch at once
  (`eqx.filter_value_and_grad`), as a plain Equinox step does;
- `timm`: timm's `Cait` (eager PyTorch), the same configuration, as the reference row.

Every round starts one process per setting, in an order reversed every round; each process compiles the step,
runs `--warmup` untimed steps, then times `--steps` consecutive steps and reports their median. The table
gives the median over rounds, each setting's ratio to the first one and to `timm` when that is a setting,
the compile time, the peak RSS and the loss after the timed steps (the same weights and batch in every
process, so a setting that changes the numbers shows there).

    python benchmarks/step_settings.py --only small --rounds 3 --setting default= --setting timm=timm \\
        --setting 'no YNN reductions=flags:--xla_cpu_experimental_ynn_fusion_type=-reduce' \\
        --json benchmarks/results/step_settings.json

The default settings (no `--setting`) are the levers of `benchmarks/README.md` ("Settings before start-up").
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

DEFAULT_SETTINGS = (
    ("default", ""),
    ("timm", "timm"),
    ("xnn greedy", "flags:--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("unroll 2", "unroll:2"),
    ("unroll full", "unroll:full"),
    ("remat none", "remat:none"),
    ("remat dots", "remat:dots"),
    ("two devices", "devices:2"),
)


def parse_spec(spec: str) -> dict[str, Any]:
    out: dict[str, Any] = dict(flags="", unroll=None, remat=None, timm=False, devices=1, chunk=None)
    for part in [p.strip() for p in spec.split(";") if p.strip()]:
        key, _, value = part.partition(":")
        if key == "flags":
            out["flags"] = (out["flags"] + " " + value).strip()
        elif key == "unroll":
            out["unroll"] = value if value == "full" else int(value)
        elif key == "remat":
            out["remat"] = value
        elif key == "timm":
            out["timm"] = True
        elif key == "chunk":
            out["chunk"] = value if value == "auto" else int(value)
        elif key == "devices":
            out["devices"] = int(value)
            if out["devices"] < 1:
                raise SystemExit(f"setting part {part!r}: devices:N needs N >= 1")
            count = f"--xla_force_host_platform_device_count={out['devices']}"
            out["flags"] = (out["flags"] + " " + count).strip()
        else:
            raise SystemExit(
                f"unknown setting part {part!r}: use flags:..., unroll:K, remat:POLICY, devices:N, chunk:N "
                "or timm"
            )
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: build, compile, warm up, time consecutive steps."""
    bench.pin_threads(spec["threads"])
    b = bench.BENCHES[spec["config"]]
    batch = spec["batch"]
    setting = spec["setting"]
    import numpy as np

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, 3, b.image_size, b.image_size), dtype=np.float32)
    y_np = rng.integers(0, b.num_classes, batch)
    devices = 1
    if setting["timm"]:
        import torch

        torch.set_num_threads(spec["threads"])
        model = bench.build_timm(b)
        call = bench.TorchRunner(model, compiled=False).train(torch.from_numpy(x_np), torch.from_numpy(y_np))
        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        step = lambda: call()  # noqa: E731
        final = lambda: float(call().detach())  # noqa: E731
    else:
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        import cait_eqx
        from cait_eqx import _blocks

        if setting["unroll"] is not None:
            _blocks.SCAN_UNROLL = True if setting["unroll"] == "full" else setting["unroll"]
        kwargs = b.eqx_kwargs()
        if setting["remat"] is not None:
            kwargs["remat"] = setting["remat"]
        model = cait_eqx.CaiT(**kwargs, key=jax.random.key(0))
        optim = bench.make_optax()
        train_step = bench.eqx_train_step(optim, chunk=setting["chunk"])
        jitted = eqx.filter_jit(train_step, donate="all-except-first")
        x, y = jnp.asarray(x_np), jnp.asarray(y_np, dtype=jnp.int32)
        state = [model, optim.init(eqx.filter(model, eqx.is_array))]
        if setting["devices"] > 1:
            from cait_eqx import parallel

            if batch % setting["devices"]:
                raise SystemExit(f"devices:{setting['devices']} does not divide the batch of {batch}")
            mesh = parallel.make_mesh(data=setting["devices"])
            state = list(parallel.shard_state(tuple(state), mesh))
            x, y = parallel.shard_batch((x, y), mesh)
        devices = len(x.sharding.device_set)
        t0 = time.perf_counter()
        compiled = jitted.lower((x, y), *state).compile()
        compile_s = time.perf_counter() - t0
        del compiled

        def step():
            state[0], state[1], loss = jitted((x, y), state[0], state[1])
            loss.block_until_ready()
            return loss

        def final():
            return float(step())

        step()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times), times=times, compile_s=compile_s, loss=final(),
                devices=devices, peak_rss_mb=bench._proc_status_mb("VmHWM"))


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    flags = spec["setting"]["flags"]
    env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()} if flags else {}
    return bench.run_worker(__file__, spec, env=env, timeout=3600)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Machine: {meta['cpu']} ({meta['isa']}), {meta['threads']} threads; jax {meta['jax']}; base "
        f"XLA_FLAGS={meta['xla_flags']!r}; one fresh process per setting and round, {meta['rounds']} rounds, "
        f"median of {meta['steps']} consecutive steps after {meta['warmup']} untimed ones.",
        "",
        "| config | batch | setting | spec | s / step | × first | × timm | compile s | peak RSS MB | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        first = row["x_first"]
        timm = row.get("x_timm")
        lines.append(
            f"| {row['config']} | {row['batch']} | {row['name']} | `{row['spec']}` | {row['step_s']:.3f} | "
            f"{first:.2f}× | {'' if timm is None else f'{timm:.2f}×'} | {row['compile_s']:.1f} | "
            f"{row['peak_rss_mb']:.0f} | {row['loss']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="small", help="comma list of configurations: xxs24, s24, small")
    p.add_argument("--batch", type=int, help="batch size (default: bench.py's training batch of the config)")
    p.add_argument("--setting", action="append", metavar="NAME=SPEC", help="a setting (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="CI mode: a tiny model, one round, two settings")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bench.answered_without_measuring(args, markdown, worker):
        return 0
    if args.quick:
        args.only, args.rounds, args.steps, args.warmup, args.batch = "tiny", 1, 1, 1, 4
        settings = [("default", ""), ("unroll 2", "unroll:2"), ("two devices", "devices:2")]
    elif args.setting:
        settings = [tuple(s.split("=", 1)) if "=" in s else (s, s) for s in args.setting]
    else:
        settings = list(DEFAULT_SETTINGS)
    parsed = [(name, spec, parse_spec(spec)) for name, spec in settings]
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(keys) - set(bench.BENCHES)
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}")
    import jax

    cpu, isa = bench.cpu_kind()
    results: dict[str, Any] = dict(
        meta=dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            cpu=cpu, isa=isa, machine=platform.machine(), threads=args.threads, jax=jax.__version__,
            xla_flags=os.environ.get("XLA_FLAGS", ""), rounds=args.rounds, steps=args.steps,
            warmup=args.warmup, **bench.source_meta(),
        ),
        rows=[],
    )
    for key in keys:
        b = bench.BENCHES[key]
        batch = args.batch or b.train_batch
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in parsed}
        for r in range(args.rounds):
            order = parsed if r % 2 == 0 else parsed[::-1]
            for name, _spec, setting in order:
                out = run_worker(dict(name=name, config=key, batch=batch, setting=setting,
                                      threads=args.threads, steps=args.steps, warmup=args.warmup))
                runs[name].append(out)
                print(f"  {key} round {r + 1} {name}: {out['step_s']:.3f} s/step", file=sys.stderr,
                      flush=True)
        rows = []
        for name, spec, _ in parsed:
            rs = runs[name]
            rows.append(dict(
                config=b.title, key=key, batch=batch, name=name, spec=spec,
                step_s=statistics.median(x["step_s"] for x in rs),
                compile_s=statistics.median(x["compile_s"] for x in rs),
                peak_rss_mb=max(x["peak_rss_mb"] for x in rs),
                loss=rs[-1]["loss"], devices=rs[-1]["devices"], runs=rs,
            ))
        timm = next((r for r in rows if r["name"] == "timm"), None)
        for row in rows:
            row["x_first"] = rows[0]["step_s"] / row["step_s"]
            row["x_timm"] = timm["step_s"] / row["step_s"] if timm else None
        results["rows"] += rows
    print(markdown(results), end="")
    if args.json:
        bench.write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
