"""cait_eqx's training step with and without glibc's `glibc.malloc.hugetlb=1`, interleaved process by process.

glibc reads its tunables once, at start-up, so the two settings cannot share a process: each round starts one
fresh worker process per setting (alternating which goes first), and each worker compiles the step, runs two
warm-up steps, then times `--steps` consecutive steps. Besides seconds per step it reports, from `getrusage`,
the minor page faults and the kernel (system) CPU seconds per step: what the setting acts on. With `--idle`,
each worker then sleeps for each of the given pauses in turn and times the one step that follows it: on these
machines (VMs with free page reporting, the likely cause) that step is slower with huge pages. The step is
`train_step_variants.py`'s `current` (`bench.py`'s step: forward, backward, AdamW, donated buffers; random
weights; no timm in the process).

Run `python benchmarks/huge_pages.py --help`; the results are in `benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import train_step_variants  # noqa: E402

SETTINGS = ("off", "on")


def worker(spec: dict) -> dict:
    """Time `spec["steps"]` consecutive train steps of configuration `spec["config"]` in this process."""
    import resource
    import time

    conf = bench.BENCHES[spec["config"]]
    batch = conf.train_batch
    call = train_step_variants.make_call(conf, "current", batch)  # compiled, and run once
    call()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = spec["steps"]
    after_idle = []
    for pause in spec.get("idle", []):
        time.sleep(pause)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        call()
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        after_idle.append(dict(pause_s=pause, step_s=dt, system_s=r1.ru_stime - r0.ru_stime))
    return dict(
        config=conf.key,
        title=conf.title,
        batch=batch,
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        step_s=statistics.median(times),
        faults_per_step=(after.ru_minflt - before.ru_minflt) / n,
        system_s_per_step=(after.ru_stime - before.ru_stime) / n,
        user_s_per_step=(after.ru_utime - before.ru_utime) / n,
        after_idle=after_idle,
    )


def run_worker(config: str, setting: str, steps: int, threads: int, idle: list[float] = ()) -> dict:
    tunables = bench.tunables_with_hugetlb(os.environ.get("GLIBC_TUNABLES", ""), setting == "on")
    return bench.run_worker(__file__, dict(config=config, steps=steps, idle=list(idle)),
                            args=("--threads", str(threads)), env={"GLIBC_TUNABLES": tunables})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="xxs24,small", help="comma list of configurations: xxs24, small, tiny")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each starts one process per setting")
    p.add_argument("--steps", type=int, default=5, help="timed consecutive steps per process (median kept)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--idle", default="", metavar="S,S,...",
                   help="after the timed steps, pause this many seconds (each in turn) and time the step "
                        "after each pause, e.g. 0,1,2,5")
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one round, two steps")
    p.add_argument("--json", metavar="PATH", help="also write every worker's measurements as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bench.pin_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    names = train_step_variants.config_names(args.only, args.quick)
    if args.quick:
        args.rounds, args.steps = 1, 2
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be at least 1")
    try:
        idle = [float(v) for v in args.idle.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(
            f"--idle: expected comma-separated seconds such as 0,1,2,5, got {args.idle!r}"
        ) from None
    if any(not 0 <= v <= 600 for v in idle):
        raise SystemExit(f"--idle: every pause must be between 0 and 600 seconds, got {args.idle!r}")

    machine = bench.machine_meta()
    print(f"Machine: {bench.machine_line(machine)}; transparent huge pages: `{bench._thp_mode()}`; "
          f"{args.threads} threads; medians of {args.rounds} rounds of {args.steps} steps.\n")
    print("| config | batch | glibc.malloc.hugetlb | s / step | images/s | page faults / step | "
          "kernel s / step | × off |")
    print("|---|---|---|---|---|---|---|---|")
    results = dict(
        meta=dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                  date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  rounds=args.rounds, steps=args.steps, threads=args.threads,
                  transparent_huge_pages=bench._thp_mode(), **machine),
        runs=[],
    )
    for name in names:
        runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                print(f"[{name}] round {r + 1}: {setting} ...", file=sys.stderr, flush=True)
                runs[setting].append(run_worker(name, setting, args.steps, args.threads, idle))
                results["runs"].append(dict(runs[setting][-1], setting=setting, round=r))
        med = {s: {k: statistics.median(run[k] for run in runs[s]) for k in
                   ("step_s", "faults_per_step", "system_s_per_step")} for s in SETTINGS}
        for s in SETTINGS:
            m, first = med[s], runs[s][0]
            print(f"| {first['title']} | {first['batch']} | {1 if s == 'on' else 0} | {m['step_s']:#.4g} | "
                  f"{first['batch'] / m['step_s']:.1f} | {m['faults_per_step']:.0f} | "
                  f"{m['system_s_per_step']:.3f} | {med['off']['step_s'] / m['step_s']:.2f}× |")
    if idle:
        print("\nThe step after an idle pause (medians over rounds):\n")
        print("| config | batch | glibc.malloc.hugetlb | pause s | s / step | kernel s / step |")
        print("|---|---|---|---|---|---|")
        for name in names:
            for s in SETTINGS:
                rows = [r for r in results["runs"] if r["config"] == name and r["setting"] == s]
                for i, pause in enumerate(idle):
                    step = statistics.median(r["after_idle"][i]["step_s"] for r in rows)
                    sys_s = statistics.median(r["after_idle"][i]["system_s"] for r in rows)
                    print(f"| {rows[0]['title']} | {rows[0]['batch']} | {1 if s == 'on' else 0} | "
                          f"{pause:g} | {step:#.4g} | {sys_s:.3f} |")
    results["meta"]["idle_s"] = idle
    if args.json:
        bench.write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
