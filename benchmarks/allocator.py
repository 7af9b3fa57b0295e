"""cait_eqx's training step under four allocator settings, side by side, one fresh process per setting.

The settings (`--settings`):

- `default`: glibc's malloc as a plain process has it;
- `reuse`: `cait_eqx.training.configure_allocator("reuse")` called in the process before JAX starts
  (`mallopt`: one arena, no `mmap` for large blocks, no heap trimming), what `cait-eqx train` can do
  in-process;
- `hugetlb`: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment the process starts with, what the old
  `cait-eqx train` got by re-executing itself (glibc reads its tunables only at start-up);
- `both`: the two together;
- `reuse-late` (not in the default list): `configure_allocator("reuse")` called only after the first step has
  run, to show why the call must come before JAX computes anything.

Each round starts one worker process per setting, alternating the order round by round. A worker compiles
the step (`train_step_variants.py`'s `current`: `bench.py`'s step, forward, backward, AdamW, donated
buffers; random weights), runs `--warmup` steps, then times `--steps` consecutive steps, each on its own. It
reports seconds per step (median), minor page faults and kernel CPU seconds per step (`getrusage`), the
peak resident set during the timed steps (`VmHWM`, reset after the warm-up) and up to the end of the
warm-up, the resident set after the last step and again after `cait_eqx.training.release_free_memory()`
(`malloc_trim(0)`), what `mallinfo2` says the heap holds, and the drift of the step time over the run: the
median of the last third of the steps over the median of the first third (a heap that fragments would grow
slower). With `--idle`, it then sleeps for each of the given pauses in turn and times the one step that
follows (a training loop pauses to evaluate or to save; see `huge_pages.py` for why that step can cost more).

With `--lock PATH` each worker runs holding an exclusive `flock` on PATH (the machine's shared CPU lock), so a
long run leaves the machine to others between workers but never shares it during one.

Run `python benchmarks/allocator.py --help`; the results are in `benchmarks/README.md` ("Allocator").
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import train_step_variants  # noqa: E402

# setting → (configure_allocator mode, glibc.malloc.hugetlb at process start, configure after the first step)
SETTINGS = {
    "default": ("default", False, False),
    "reuse": ("reuse", False, False),
    "hugetlb": ("default", True, False),
    "both": ("reuse", True, False),
    "reuse-late": ("reuse", False, True),
}
DEFAULT_SETTINGS = ("default", "reuse", "hugetlb", "both")


class _MallInfo2(ctypes.Structure):
    # glibc ≥ 2.33's `struct mallinfo2` (<malloc.h>): every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def mallinfo2() -> dict | None:
    """glibc's view of the heap in MB (`heap_mb`: obtained with `sbrk` or arena heaps; `free_mb`: free in
    them; `mmapped_mb`: blocks mapped on their own), or None where `mallinfo2` is missing."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return dict(heap_mb=info.arena / 2**20, free_mb=info.fordblks / 2**20, mmapped_mb=info.hblkhd / 2**20)


def worker(spec: dict) -> dict:
    """Time `spec["steps"]` train steps of configuration `spec["config"]` under `spec["setting"]`, here."""
    import resource
    import time

    from cait_eqx.training import configure_allocator, release_free_memory

    mode, _, late = SETTINGS[spec["setting"]]
    applied = None if late else configure_allocator(mode)
    conf = bench.BENCHES[spec["config"]]
    batch = conf.train_batch
    t0 = time.perf_counter()
    call = train_step_variants.make_call(conf, "current", batch)  # traced, compiled and run once
    first_s = time.perf_counter() - t0
    if late:
        applied = configure_allocator(mode)
    for _ in range(spec["warmup"]):
        call()
    peak_incl_compile = bench._proc_status_mb("VmHWM")
    resettable = bench._reset_peak_rss()
    rss_before = bench._proc_status_mb("VmRSS")
    times, rss = [], []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
        rss.append(bench._proc_status_mb("VmRSS"))  # a heap that fragments grows step by step
    after = resource.getrusage(resource.RUSAGE_SELF)
    rss_after = bench._proc_status_mb("VmRSS")
    steady_peak = max(bench._proc_status_mb("VmHWM"), rss_after) if resettable else None
    heap = mallinfo2()
    after_idle = []
    for pause in spec.get("idle", []):
        time.sleep(pause)
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        call()
        dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        after_idle.append(
            dict(
                pause_s=pause,
                step_s=dt,
                system_s=r1.ru_stime - r0.ru_stime,
                faults=r1.ru_minflt - r0.ru_minflt,
            )
        )
    t = time.perf_counter()
    released = release_free_memory()
    trim_s = time.perf_counter() - t
    n, third = len(times), max(1, len(times) // 3)
    return dict(
        config=conf.key,
        title=conf.title,
        batch=batch,
        setting=spec["setting"],
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        allocator=dict(mode=applied.mode, applied=dict(applied.applied), note=applied.note),
        first_call_s=first_s,
        step_times_s=times,
        rss_per_step_mb=rss,
        step_s=statistics.median(times),
        first_third_s=statistics.median(times[:third]),
        last_third_s=statistics.median(times[n - third :]),
        faults_per_step=(after.ru_minflt - before.ru_minflt) / n,
        system_s_per_step=(after.ru_stime - before.ru_stime) / n,
        user_s_per_step=(after.ru_utime - before.ru_utime) / n,
        peak_incl_compile_mb=peak_incl_compile,
        rss_before_steps_mb=rss_before,
        steady_peak_mb=steady_peak,
        rss_after_steps_mb=rss_after,
        heap_after_steps=heap,
        after_idle=after_idle,
        trim_released=released,
        trim_s=trim_s,
        rss_after_trim_mb=bench._proc_status_mb("VmRSS"),
        heap_after_trim=mallinfo2(),
    )


def source_meta() -> dict:
    """Where the measured `cait_eqx` is (found without importing it) and a digest of its Python files."""
    import hashlib
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("cait_eqx").submodule_search_locations[0])
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return dict(cait_eqx_path=str(root), cait_eqx_source_sha256=digest.hexdigest()[:16])


@contextlib.contextmanager
def holding(lock: str | None):
    """Hold an exclusive `flock` on the file `lock` (created if missing) while inside; nothing if None."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_worker(config: str, setting: str, args) -> dict:
    """A fresh worker process, started with the setting's tunable in its environment (nothing re-executed)."""
    _, hugetlb, _ = SETTINGS[setting]
    env = dict(
        os.environ, GLIBC_TUNABLES=bench.tunables_with_hugetlb(os.environ.get("GLIBC_TUNABLES", ""), hugetlb)
    )
    spec = dict(config=config, setting=setting, steps=args.steps, warmup=args.warmup, idle=args.idle)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--threads",
        str(args.threads),
        "--worker",
        json.dumps(spec),
    ]
    if args.jax_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=args.jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with holding(args.lock):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Medians over a setting's workers (one per round) of the figures the table shows."""
    keys = (
        "step_s",
        "faults_per_step",
        "system_s_per_step",
        "peak_incl_compile_mb",
        "steady_peak_mb",
        "rss_after_steps_mb",
        "rss_after_trim_mb",
        "first_third_s",
        "last_third_s",
    )
    out = {k: statistics.median(r[k] for r in runs) for k in keys if all(r[k] is not None for r in runs)}
    out["drift"] = statistics.median(r["last_third_s"] / r["first_third_s"] for r in runs)
    return out


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"{meta['threads']} threads, transparent huge pages `{meta['transparent_huge_pages']}`, "
        f"{meta['libc']}; "
        f"medians over {meta['rounds']} rounds (one fresh process per setting and round) of {meta['steps']} "
        f"timed steps after {meta['warmup']} warm-up steps.",
        "",
        "| config | batch | setting | s / step | × default | page faults / step | kernel s / step "
        "| peak RSS MB (steps) | peak RSS MB (compile + warm-up) | RSS after steps MB | after malloc_trim MB "
        "| last / first third |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in dict.fromkeys(r["config"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["config"] == config]
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        med = {s: summary([r for r in rows if r["setting"] == s]) for s in settings}
        base = med["default"]["step_s"] if "default" in med else None
        for s in settings:
            m, first = med[s], rows[0]
            ratio = f"{base / m['step_s']:.2f}×" if base else "–"
            lines.append(
                f"| {first['title']} | {first['batch']} | {s} | {m['step_s']:.3f} | {ratio} | "
                f"{m['faults_per_step']:.0f} | {m['system_s_per_step']:.3f} | "
                f"{bench._fmt(m.get('steady_peak_mb'), 0)} | {m['peak_incl_compile_mb']:.0f} | "
                f"{m['rss_after_steps_mb']:.0f} | {m['rss_after_trim_mb']:.0f} | "
                f"{m['drift']:.3f} |"
            )
    idle = meta.get("idle_s") or []
    if idle:
        lines += [
            "",
            "The step after an idle pause (medians over rounds):",
            "",
            "| config | batch | setting | pause s | s / step | kernel s / step | page faults |",
            "|---|---|---|---|---|---|---|",
        ]
        for config in dict.fromkeys(r["config"] for r in results["runs"]):
            rows = [r for r in results["runs"] if r["config"] == config]
            for s in dict.fromkeys(r["setting"] for r in rows):
                mine = [r for r in rows if r["setting"] == s]
                for i, pause in enumerate(idle):
                    step, kernel, faults = (
                        statistics.median(r["after_idle"][i][k] for r in mine)
                        for k in ("step_s", "system_s", "faults")
                    )
                    lines.append(
                        f"| {mine[0]['title']} | {mine[0]['batch']} | {s} | {pause:g} | {step:.3f} | "
                        f"{kernel:.3f} | {faults:.0f} |"
                    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="xxs24,small", help="comma list of configurations: xxs24, small, tiny")
    p.add_argument(
        "--settings",
        default=",".join(DEFAULT_SETTINGS),
        help=f"comma list of settings, from {', '.join(SETTINGS)}",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; each starts one process per setting")
    p.add_argument("--steps", type=int, default=30, help="timed consecutive steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first call, per process")
    p.add_argument(
        "--idle",
        default="",
        metavar="S,S,...",
        help="after the timed steps, pause this many seconds (each in turn) and time the step after "
        "each pause, as huge_pages.py does, e.g. 0,2,5",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads (affinity), as in bench.py")
    p.add_argument("--lock", metavar="PATH", help="hold an exclusive flock on PATH while each worker runs")
    p.add_argument(
        "--jax-cache",
        metavar="DIR",
        help="JAX compilation cache shared by the workers (--quick: a "
        "temporary one, so that only the first worker compiles)",
    )
    p.add_argument("--quick", action="store_true", help="CI mode: the tiny model, one round, three steps")
    p.add_argument("--json", metavar="PATH", help="also write every worker's measurements as JSON")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.idle = [float(v) for v in args.idle.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(
            f"--idle: expected comma-separated seconds such as 0,2,5, got {args.idle!r}"
        ) from None
    if any(not 0 <= v <= 600 for v in args.idle):
        raise SystemExit(f"--idle: every pause must be between 0 and 600 seconds, got {args.idle}")
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)), end="")
        return 0
    bench.pin_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    names = train_step_variants.config_names(args.only, args.quick)
    settings = list(dict.fromkeys(s.strip() for s in args.settings.split(",") if s.strip()))
    unknown = set(settings) - set(SETTINGS)
    if unknown or not settings:
        raise SystemExit(
            f"--settings: unknown or no setting(s) {sorted(unknown)}; choose from {', '.join(SETTINGS)}"
        )
    with tempfile.TemporaryDirectory(prefix="allocator-jax-cache-") as tmp:
        if args.quick:
            args.rounds, args.steps, args.warmup = 1, 3, 1
            args.jax_cache = args.jax_cache or tmp
        if args.rounds < 1 or args.steps < 3 or args.warmup < 0:
            raise SystemExit(
                "--rounds must be at least 1, --steps at least 3 (thirds are compared), --warmup 0 or more"
            )
        lib, version = platform.libc_ver()
        results = dict(
            meta=dict(
                command=" ".join([os.path.basename(sys.executable), *sys.argv]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                rounds=args.rounds,
                steps=args.steps,
                warmup=args.warmup,
                threads=args.threads,
                transparent_huge_pages=bench._thp_mode(),
                libc=f"{lib} {version}".strip() or "unknown libc",
                settings=settings,
                idle_s=args.idle,
                **source_meta(),
            ),
            runs=[],
        )
        for name in names:
            for r in range(args.rounds):
                for setting in settings if r % 2 == 0 else settings[::-1]:
                    print(f"[{name}] round {r + 1}: {setting} ...", file=sys.stderr, flush=True)
                    results["runs"].append(dict(run_worker(name, setting, args), round=r))
                    if args.json:  # a long run keeps what it has measured so far
                        bench.write_json_atomic(args.json, results)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
