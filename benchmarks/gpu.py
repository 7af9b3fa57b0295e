"""cait_eqx against timm on one GPU: inference and training images/s, first-call (compile) time, peak memory.

One command, about 8 minutes on one NVIDIA H100/H200 (`--budget-s`, default 420, bounds the measuring):

    python benchmarks/gpu.py --json benchmarks/results/gpu.json
    python benchmarks/gpu.py --table benchmarks/results/gpu.json     # re-print the table of a JSON

For `cait_xxs24_224`, `cait_s24_224` and `cait_m36_384`, in float32 and bfloat16, it measures cait_eqx
(`compute_dtype`: float32 weights, bfloat16 compute), timm eager and timm under `torch.compile` (both with
`torch.autocast` bfloat16 for the bfloat16 rows), with random weights: nothing is downloaded. Each cait_eqx
row is also given as a ratio of the timm rows of the same run.

Isolation: each (library, model) runs in its own child process (`--worker`), one after another, and this
process imports neither JAX nor torch. So each library has the whole GPU to itself and JAX keeps its default
preallocation of 75 % of the memory (its usual speed), which would otherwise starve torch; an out-of-memory
error or a crash also costs one group of rows, not the run.

`--smoke` runs the same code paths on the CPU with a tiny configuration of each model (one warm-up call, one
timed call; `torch.compile` only with `--smoke-compile`): the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("cait_xxs24_224", "cait_s24_224", "cait_m36_384")
BATCHES = {"cait_xxs24_224": 64, "cait_s24_224": 32, "cait_m36_384": 8}  # inference and training
DTYPES = ("float32", "bfloat16")
WORKLOADS = ("inference", "train")
CONTENDERS = ("cait_eqx", "timm", "timm_compile")
LABELS = {"cait_eqx": "cait_eqx", "timm": "timm eager", "timm_compile": "timm torch.compile"}
# --smoke: every model shrunk to the same tiny CaiT (image 32, patch 16, dim 64, depth 1, 2 heads).
SMOKE_EQX = dict(image_size=32, dim=64, depth=1, heads=2, mlp_dim=256)
SMOKE_TIMM = dict(img_size=32, embed_dim=64, depth=1, num_heads=2)
SMOKE_BATCH = 2
MARK = "GPUBENCH "  # prefix of a worker's result lines on stdout (libraries may print there too)
MEMORY = {
    "cait_eqx": "XLA's size of the compiled call (memory_analysis(): arguments + outputs + temporaries - "
    "donated aliases)",
    "timm": "torch.cuda.max_memory_allocated() over the row (reset before it; the row builds its model)",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(record: dict) -> None:
    print(MARK + json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------ timing


def time_calls(call, wait, warmup: int, calls: int | None, target_s: float) -> dict[str, Any]:
    """Time `call()`: one first call, `warmup` more, then back-to-back timed calls (`calls`, or as many as
    fill `target_s`, 5 to 200), waiting for the device (`wait(result)`) only after the last of each phase."""
    t0 = time.perf_counter()
    wait(call())
    first = time.perf_counter() - t0
    single = first
    for _ in range(warmup):
        t0 = time.perf_counter()
        wait(call())
        single = time.perf_counter() - t0
    n = calls if calls is not None else min(200, max(5, math.ceil(target_s / max(single, 1e-9))))
    out = None
    t0 = time.perf_counter()
    for _ in range(n):
        out = call()
    wait(out)
    per_call = (time.perf_counter() - t0) / n
    return dict(first_call_s=first, timed_calls=n, step_s=per_call)


# ------------------------------------------------------------------------------------------------ workers


def _import_cait_eqx():
    try:
        import cait_eqx
    except ImportError:  # not installed on the GPU machine: the repository's own source
        sys.path.insert(0, str(ROOT / "src"))
        import cait_eqx
    return cait_eqx


def _rows_of(spec: dict) -> list[dict]:
    batch = spec["batch"]
    return [
        dict(model=spec["model"], dtype=d, workload=w, contender=spec["lib"], batch=batch)
        for d in spec["dtypes"]
        for w in WORKLOADS
    ]


def _out_of_time(spec: dict) -> bool:
    return time.time() > spec["deadline"] - spec["margin_s"]


def jax_worker(spec: dict) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    cait_eqx = _import_cait_eqx()
    from cait_eqx.training import make_optimizer

    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if spec["tf32"] else "float32")
    device = jax.devices()[0]
    _emit(
        dict(
            meta=dict(
                jax_device_kind=device.device_kind,
                jax_platform=device.platform,
                jax=jax.__version__,
                equinox=eqx.__version__,
                optax=optax.__version__,
                cait_eqx=cait_eqx.__version__,
                cait_eqx_path=os.path.dirname(cait_eqx.__file__),
                jax_matmul_precision=jax.config.jax_default_matmul_precision,
            )
        )
    )
    rows = _rows_of(spec)
    if not spec["smoke"] and device.platform != "gpu":
        for row in rows:
            _emit(dict(row=dict(row, status=f"error: JAX sees no GPU (platform {device.platform})")))
        return
    overrides = SMOKE_EQX if spec["smoke"] else {}
    key = jax.random.key(0)
    base = cait_eqx.create_model(spec["model"], key=key, **overrides)
    size = base.config.image_size
    size = size if isinstance(size, int) else size[0]
    xkey, ykey = jax.random.split(jax.random.key(1))
    x = jax.random.normal(xkey, (spec["batch"], 3, size, size), jnp.float32)
    y = jax.random.randint(ykey, (spec["batch"],), 0, base.config.num_classes)
    optim = make_optimizer(1e-4, weight_decay=0.05)  # the package's AdamW (weight decay masked as in DeiT)

    def step(batch, model, opt_state):
        images, labels = batch

        def loss_fn(m):
            logits = jax.vmap(m)(images).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def wait(out):
        jax.block_until_ready(eqx.filter(out, eqx.is_array))

    for row in rows:
        if _out_of_time(spec):
            _emit(dict(row=dict(row, status="skipped: budget spent")))
            continue
        _log(f"  cait_eqx {row['model']} {row['dtype']} {row['workload']} batch {row['batch']} ...")
        try:
            model = base if row["dtype"] == "float32" else cait_eqx.with_compute_dtype(base, jnp.bfloat16)
            t0 = time.perf_counter()
            if row["workload"] == "inference":
                model = eqx.nn.inference_mode(model)
                compiled = eqx.filter_jit(lambda m, xs: jax.vmap(m)(xs)).lower(model, x).compile()
                compile_s = time.perf_counter() - t0

                def call(compiled=compiled, model=model):
                    return compiled(model, x)
            else:
                # A private copy: the step donates (consumes) its model and optimiser state.
                model = jax.tree.map(lambda a: a.copy() if eqx.is_array(a) else a, model)
                state = [model, optim.init(eqx.filter(model, eqx.is_array))]
                jitted = eqx.filter_jit(step, donate="all-except-first")
                compiled = jitted.lower((x, y), *state).compile()
                compile_s = time.perf_counter() - t0

                def call(compiled=compiled, state=state):
                    state[0], state[1], loss = compiled((x, y), state[0], state[1])
                    return state, loss

            timing = time_calls(call, wait, spec["warmup"], spec["calls"], spec["target_s"])
            mem = compiled.compiled.memory_analysis()
            peak = None
            if mem is not None:
                peak = (
                    mem.argument_size_in_bytes
                    + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes
                    - mem.alias_size_in_bytes
                )
            stats = device.memory_stats() or {}
            row.update(
                timing,
                status="ok",
                compile_s=compile_s,
                peak_bytes=peak,
                first_call_s=compile_s + timing["first_call_s"],
                jax_process_peak_bytes_in_use=stats.get("peak_bytes_in_use"),
            )
        except Exception as e:  # an out-of-memory row must not end the group
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        _emit(dict(row=row))
        jax.clear_caches()


def torch_worker(spec: dict) -> None:
    rows = _rows_of(spec)
    try:
        import timm
        import torch
    except ImportError as e:
        for row in rows:
            _emit(dict(row=dict(row, status=f"timm not installed ({e.name} missing)")))
        return
    import copy

    cuda = torch.cuda.is_available() and not spec["smoke"]
    _emit(
        dict(
            meta=dict(
                torch=torch.__version__,
                timm=timm.__version__,
                torch_cuda=torch.version.cuda,
                torch_device=torch.cuda.get_device_name() if cuda else "cpu",
            )
        )
    )
    if not spec["smoke"] and not cuda:
        for row in rows:
            _emit(dict(row=dict(row, status="error: torch sees no CUDA device")))
        return
    device = "cuda" if cuda else "cpu"
    torch.set_float32_matmul_precision("high" if spec["tf32"] else "highest")
    torch.backends.cudnn.allow_tf32 = spec["tf32"]
    torch.manual_seed(0)
    base = timm.create_model(spec["model"], pretrained=False, **(SMOKE_TIMM if spec["smoke"] else {}))
    size = base.patch_embed.img_size[0]
    x = torch.randn(spec["batch"], 3, size, size, device=device)
    y = torch.randint(0, base.num_classes, (spec["batch"],), device=device)
    compiled = spec["lib"] == "timm_compile"

    def wait(out):
        if cuda:
            torch.cuda.synchronize()

    for row in rows:
        if _out_of_time(spec):
            _emit(dict(row=dict(row, status="skipped: budget spent")))
            continue
        _log(f"  {LABELS[spec['lib']]} {row['model']} {row['dtype']} {row['workload']} batch {row['batch']}")
        model = optim = module = call = None
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if compiled:
                torch._dynamo.reset()  # each row compiles afresh: its first call is its compile time
            model = copy.deepcopy(base).to(device)
            module = torch.compile(model, dynamic=False) if compiled else model
            amp = (
                torch.autocast(device, dtype=torch.bfloat16)
                if row["dtype"] == "bfloat16"
                else contextlib.nullcontext()
            )
            if row["workload"] == "inference":
                model.eval()

                def call(module=module, amp=amp):
                    with torch.inference_mode(), amp:
                        return module(x)
            else:
                model.train()
                optim = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

                def call(module=module, amp=amp, optim=optim):
                    optim.zero_grad(set_to_none=True)
                    with amp:
                        loss = torch.nn.functional.cross_entropy(module(x), y)
                    loss.backward()
                    optim.step()
                    return loss

            row.update(
                time_calls(call, wait, spec["warmup"], spec["calls"], spec["target_s"]),
                status="ok",
                peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
            )
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        del model, optim, module, call
        _emit(dict(row=row))


# ------------------------------------------------------------------------------------------------ the run


def plan(args) -> list[dict]:
    """The groups of rows, one child process each: the cheap contenders first (all models), then
    `torch.compile` (slow to compile): a spent budget costs the compiled rows of the largest model first."""
    libs = ["cait_eqx", "timm"]
    compile_too = args.smoke_compile if args.smoke else not args.no_compile
    groups = []
    for lib in [*libs, *(["timm_compile"] if compile_too else [])]:
        for model in args.models:
            batch = args.batch or (SMOKE_BATCH if args.smoke else BATCHES[model])
            groups.append(
                dict(
                    lib=lib,
                    model=model,
                    batch=batch,
                    dtypes=list(DTYPES),
                    smoke=args.smoke,
                    tf32=args.tf32,
                    warmup=args.warmup,
                    calls=args.calls,
                    target_s=args.target_s,
                )
            )
    groups.sort(key=lambda g: (g["lib"] == "timm_compile", args.models.index(g["model"])))
    return groups


def run_group(spec: dict, grace_s: float) -> tuple[list[dict], dict, str | None]:
    """Run one worker; give its rows, its meta and, if it died, why. It is killed (with its own children,
    e.g. torch.compile's) `grace_s` after the deadline; the rows it finished are kept."""
    env = dict(os.environ)
    if spec["smoke"]:
        env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    failure = None
    try:
        out, _ = proc.communicate(timeout=max(1.0, spec["deadline"] + grace_s - time.time()))
        if proc.returncode != 0:
            failure = f"error: worker exited with status {proc.returncode} (its stderr is above)"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        failure = "skipped: killed at the deadline"
    rows, meta = [], {}
    for line in (out or "").splitlines():
        if line.startswith(MARK):
            record = json.loads(line[len(MARK) :])
            rows += [record["row"]] if "row" in record else []
            meta.update(record.get("meta", {}))
    return rows, meta, failure


def ratio_rows(rows: list[dict]) -> list[dict]:
    """For every cait_eqx row measured: its images/s over timm eager's and timm compiled's, same model,
    dtype, workload and batch (None where that row was not measured)."""
    ips = {
        (r["model"], r["dtype"], r["workload"], r["batch"], r["contender"]): r["images_per_s"]
        for r in rows
        if r.get("status") == "ok"
    }
    out = []
    for (model, dtype, workload, batch, contender), value in ips.items():
        if contender != "cait_eqx":
            continue
        ratio = {}
        for other in ("timm", "timm_compile"):
            theirs = ips.get((model, dtype, workload, batch, other))
            ratio[other] = value / theirs if theirs else None
        out.append(
            dict(
                model=model,
                dtype=dtype,
                workload=workload,
                batch=batch,
                vs_timm=ratio["timm"],
                vs_timm_compile=ratio["timm_compile"],
            )
        )
    return out


def measure(args) -> dict:
    start = time.time()
    deadline = start + args.budget_s
    margin = 0.1 * args.budget_s  # no new group or row starts in the last tenth of the budget
    results: dict[str, Any] = dict(
        meta=dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            xla_python_client_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "(default: true)"),
            xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "(default: .75)"),
            smoke=args.smoke,
            models=args.models,
            contenders=sorted({g["lib"] for g in plan(args)}, key=CONTENDERS.index),
            budget_s=args.budget_s,
            warmup_calls=args.warmup,
            calls=args.calls,
            target_s=args.target_s,
            float32_matmuls="tf32" if args.tf32 else "full float32",
            images_per_s="batch / mean seconds per call over the timed calls (back to back, device "
            "synchronised after the last); first_call_s: cait_eqx = trace + lower + XLA compile + the "
            "first run; timm = its first call (with torch.compile: compiling)",
            peak_bytes=MEMORY,
            bfloat16="cait_eqx: with_compute_dtype(bfloat16), float32 weights; timm: "
            "torch.autocast(bfloat16), float32 weights",
            optimiser="AdamW lr 1e-4, weight decay 0.05: cait_eqx.training.make_optimizer (no decay on "
            "biases, "
            "norms, gammas, tokens), torch.optim.AdamW (decay on all); cross-entropy on random labels",
        ),
        rows=[],
    )
    for spec in plan(args):
        spec.update(deadline=deadline, margin_s=margin)
        expected = _rows_of(spec)
        if time.time() > deadline - margin:
            rows, meta, failure = [], {}, "skipped: budget spent"
        else:
            _log(
                f"{LABELS[spec['lib']]} {spec['model']} (batch {spec['batch']}), "
                f"{deadline - time.time():.0f} s of the budget left"
            )
            rows, meta, failure = run_group(spec, grace_s=30.0)
        results["meta"].update(meta)
        done = {(r["dtype"], r["workload"]) for r in rows}
        rows += [dict(r, status=failure) for r in expected if (r["dtype"], r["workload"]) not in done]
        for r in rows:
            if r.get("status") == "ok":
                r["images_per_s"] = r["batch"] / r["step_s"]
        results["rows"] += rows
        if args.json:  # after every group, so a run stopped from outside keeps what it measured
            _write(args.json, results)
    results["ratios"] = ratio_rows(results["rows"])
    results["not_measured"] = [
        f"{r['model']} {r['dtype']} {r['workload']} {LABELS[r['contender']]}: {r['status']}"
        for r in results["rows"]
        if r["status"] != "ok"
    ]
    results["meta"]["wall_s"] = time.time() - start
    return results


def _write(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(results: dict) -> str:
    meta = results["meta"]
    ratios = {(r["model"], r["dtype"], r["workload"], r["batch"]): r for r in results.get("ratios", [])}
    lines = [
        f"{meta.get('jax_device_kind', '?')} (JAX) / {meta.get('torch_device', '?')} (torch); "
        f"{meta['date']}; "
        f"{'SMOKE (CPU, tiny models) ' if meta['smoke'] else ''}float32 matmuls: {meta['float32_matmuls']}; "
        f"XLA_FLAGS={meta['xla_flags']!r}; {_fmt(meta.get('wall_s'), '.0f')} s.",
        "",
        "img/s: batch / mean time per call over the timed calls after the warm-up calls. × timm: cait_eqx's "
        "img/s over timm's in this run. first call s: cait_eqx = trace + XLA compile + first run, "
        "timm = first call (torch.compile: compiling). "
        f"peak MiB: cait_eqx = {MEMORY['cait_eqx']}; timm = {MEMORY['timm']}.",
        "",
        "| model | dtype | workload | batch | contender | img/s | × timm eager | × timm compiled "
        "| first call s | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ratio = (
            ratios.get((r["model"], r["dtype"], r["workload"], r["batch"]))
            if r["contender"] == "cait_eqx"
            else None
        )
        peak = r.get("peak_bytes")
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['workload']} | {r['batch']} | {LABELS[r['contender']]} "
            f"| {_fmt(r.get('images_per_s'), '.1f')} | {_fmt(ratio and ratio['vs_timm'], '.2f')} "
            f"| {_fmt(ratio and ratio['vs_timm_compile'], '.2f')} | {_fmt(r.get('first_call_s'), '.1f')} "
            f"| {_fmt(peak and peak / 2**20, '.0f')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rewritten after every group)")
    p.add_argument("--table", metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated; default: %(default)s")
    p.add_argument("--batch", type=int, help="one batch size for every row (default: 64/32/8 by model)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting rows in the last tenth of this many seconds; a group still running "
        "30 s after it is killed (default: %(default)s)",
    )
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed calls after the first (default: %(default)s)"
    )
    p.add_argument(
        "--calls", type=int, help="timed calls per row (default: as many as fill --target-s, 5-200)"
    )
    p.add_argument("--target-s", type=float, default=1.0, help="timed seconds per row (default: %(default)s)")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="float32 rows use TF32 matmuls in both libraries (default: full float32 in both)",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, tiny models, 1 warm-up + 1 timed call, no torch.compile: the code paths only",
    )
    p.add_argument("--smoke-compile", action="store_true", help="with --smoke: the torch.compile rows too")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.smoke:
        args.warmup, args.calls = 0, 1  # the first call is the warm-up
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (jax_worker if spec["lib"] == "cait_eqx" else torch_worker)(spec)
        return 0
    if args.table:
        print(table(json.loads(Path(args.table).read_text())), end="")
        return 0
    results = measure(args)
    if args.json:
        _write(args.json, results)
    print(table(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
