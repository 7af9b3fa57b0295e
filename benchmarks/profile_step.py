"""Where a cait_eqx training step and forward pass spend their time, op by op, from XLA's own trace.

For each configuration the script compiles `bench.py`'s training step (forward, backward, AdamW, donated
buffers) and its batched forward, runs each a few times under `jax.profiler.trace`, and reads back the
trace: XLA:CPU records every op (a "thunk": one fused kernel, one library call, one copy) it runs, with the
name the op has in the compiled program's HLO. The script maps each name to its HLO instruction and sorts
the op into one kind:

- **matrix products**: the op computes a `dot` (XLA's YNNPACK/XNNPACK/oneDNN library fusions, or its own);
  its FLOPs (`2·m·n·k`, from the HLO shapes) give the achieved GFLOP/s, set against the JAX matmul ceiling
  measured in the same run;
- **reductions**: a fused op that reduces (LayerNorm's and softmax's sums and maxima, bias gradients);
- **fused elementwise**: a fused op of arithmetic only (GELU, scalings, residual adds, their derivatives);
- **transposes and copies**: an op that only moves data (copy, transpose, concatenate, slice, pad);
- **scan slicing and stacking**: an op that only reads one block's slice of a stacked array (`dynamic-slice`)
  or writes one into a stack (`dynamic-update-slice`): the `lax.scan` over the SA blocks, forward and backward
  (a fusion that also computes, a GELU derivative reading its slice of the saved `fc1` output say, counts as
  the computation);
- **buffer fills**: an op that fills an array with a constant (the zeros the scan's stacked outputs and
  the gradient accumulators start from);
- **optimiser update**: every op of the step's own code outside the forward and backward passes (by its HLO
  `op_name`: neither `jvp(` nor `transpose(`): AdamW's moments and update, `apply_updates`. Ops that XLA
  inserts itself (copies of a loop's buffers) have no `op_name`; they are sorted by what they do, in the
  phase "inserted".

Times are the ops' own durations summed over XLA's worker threads (loop ops such as `while` are not
counted: their body's ops are), per step, in ms; their sum exceeds the step's wall time when ops run side
by side on both threads. The share column is of that sum. The script prints a table per configuration and,
with `--top N`, the N most expensive single ops.

    python benchmarks/profile_step.py --only small,xxs24 --json benchmarks/results/profile.json
    python benchmarks/profile_step.py --table benchmarks/results/profile.json

It is a script, not a test; `tests/test_benchmarks.py` runs its `--quick` mode.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

KINDS = (
    "matrix products",
    "reductions",
    "fused elementwise",
    "transposes and copies",
    "scan slicing and stacking",
    "buffer fills",
    "optimiser update",
)
CONTROL_OPS = {"while", "conditional", "call", "tuple", "get-tuple-element", "parameter", "constant"}
MOVES = {"copy", "transpose", "bitcast", "reshape", "concatenate", "slice", "pad", "reverse", "broadcast",
         "constant", "parameter", "tuple", "get-tuple-element", "iota", "convert"}

# One HLO instruction: `%name = f32[4,8]{1,0} opcode(...)` (tuple-typed results have no single shape).
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\((.*)$", re.M)
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)^\}", re.M | re.S)


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Every instruction of a compiled HLO module: opcode, shape, its op_name, the computation it calls
    (for fusions), and the opcodes and FLOPs inside that computation."""
    shapes: dict[str, tuple[int, ...]] = {}
    instrs: dict[str, dict[str, Any]] = {}
    bodies: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for comp in _COMP.finditer(text):
        for m in _INSTR.finditer(comp.group(2)):
            name, _, dims, opcode, rest = m.groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            shapes[name] = shape
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            entry = dict(
                opcode=opcode,
                shape=shape,
                rest=rest,
                calls=calls.group(1) if calls else None,
                op_name=op_name.group(1) if op_name else "",
                computation=comp.group(1),
            )
            instrs[name] = entry
            bodies[comp.group(1)].append(entry)
    for entry in instrs.values():
        entry["flops"] = _dot_flops(entry, shapes)
    fused = {e["calls"] for e in instrs.values() if e["opcode"] == "fusion"}
    for entry in instrs.values():
        # What the runtime runs (and the trace names): not the instructions inside a fusion.
        entry["runs"] = entry["computation"] not in fused
        inner = bodies.get(entry["calls"], []) if entry["opcode"] == "fusion" else []
        entry["opcodes"] = {e["opcode"] for e in inner} or {entry["opcode"]}
        entry["total_flops"] = sum(e["flops"] for e in inner) if inner else entry["flops"]
    return instrs


def _dot_flops(entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
    if entry["opcode"] != "dot":
        return 0
    operands = re.findall(r"%([\w.\-]+)", entry["rest"].split(")", 1)[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", entry["rest"])
    if not operands or operands[0] not in shapes or contracting is None:
        return 0
    lhs = shapes[operands[0]]
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
    return 2 * math.prod(entry["shape"]) * k


def kind_of(entry: dict[str, Any]) -> str | None:
    """The kind of one op (None for control flow, whose time is its body's ops')."""
    ops = entry["opcodes"]
    if entry["opcode"] in CONTROL_OPS:
        return None
    if phase_of(entry) == "update":
        return "optimiser update"
    if ops & {"dot", "convolution"}:
        return "matrix products"
    if ops & {"reduce", "reduce-window"}:
        return "reductions"
    if ops - MOVES - {"dynamic-slice", "dynamic-update-slice"}:
        return "fused elementwise"
    if ops & {"dynamic-slice", "dynamic-update-slice"}:
        return "scan slicing and stacking"
    if ops <= {"broadcast", "constant", "bitcast", "parameter"}:
        return "buffer fills"
    return "transposes and copies"


def phase_of(entry: dict[str, Any]) -> str:
    """forward, backward, update (AdamW and the rest of the step outside the two passes), or inserted: an op
    XLA added (a copy of a loop's buffer), which has no `op_name`."""
    if not entry["op_name"]:
        return "inserted"
    if "transpose(" in entry["op_name"]:
        return "backward"
    if "jvp(" in entry["op_name"]:
        return "forward"
    return "update"


def trace_events(trace_dir: str) -> list[dict[str, Any]]:
    paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"jax.profiler wrote no perfetto trace under {trace_dir}")
    with gzip.open(paths[0]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarise(events: list[dict[str, Any]], instrs: dict[str, dict[str, Any]], calls: int,
              inference: bool) -> dict[str, Any]:
    """Per kind: ms per call (summed over threads), share, FLOPs and GFLOP/s; and every op's own figures."""
    per_op: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("ph") != "X" or e["name"] not in instrs:
            continue
        entry = instrs[e["name"]]
        kind = kind_of(entry)
        if kind is None:
            continue
        if inference and kind == "optimiser update":
            kind = kind_of({**entry, "op_name": "jvp(" + entry["op_name"]})
        phase = phase_of(entry)
        if inference and phase != "inserted":
            phase = "forward"
        row = per_op.setdefault(e["name"], dict(
            op=e["name"], kind=kind, phase=phase,
            shape=list(entry["shape"]), count=0, us=0.0, flops=0,
        ))
        row["count"] += 1
        row["us"] += float(e.get("dur", 0.0))
        row["flops"] += entry["total_flops"]
    kinds = {k: dict(ms=0.0, flops=0, ops=0) for k in KINDS}
    for row in per_op.values():
        k = kinds[row["kind"]]
        k["ms"] += row["us"] / 1e3 / calls
        k["flops"] += row["flops"] / calls
        k["ops"] += 1
    total = sum(k["ms"] for k in kinds.values())
    for k in kinds.values():
        k["share"] = k["ms"] / total if total else 0.0
        k["gflops"] = k["flops"] / (k["ms"] / 1e3) / 1e9 if k["flops"] and k["ms"] else None
    ops = sorted(per_op.values(), key=lambda r: -r["us"])
    for row in ops:
        row["ms_per_call"] = row["us"] / 1e3 / calls
        row["gflops"] = row["flops"] / (row["us"] / 1e6) / 1e9 if row["flops"] and row["us"] else None
    return dict(kinds=kinds, total_ms=total, ops=ops)


def profile(fn, args_fn, calls: int, warmup: int) -> tuple[float, list[dict[str, Any]]]:
    """Median wall time of `calls` calls and the trace events of those calls (after `warmup` calls)."""
    import jax

    for _ in range(warmup):
        fn(*args_fn())
    times = []
    with tempfile.TemporaryDirectory(prefix="cait-profile-") as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                a = args_fn()
                t0 = time.perf_counter()
                fn(*a)
                times.append(time.perf_counter() - t0)
        events = trace_events(d)
    return sorted(times)[len(times) // 2], events


def run_config(
    b: bench.Bench, calls: int, warmup: int, infer_batch: int, ceiling: float, train_chunk: int | str | None
) -> list[dict]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import cait_eqx

    rng = np.random.default_rng(0)
    model = cait_eqx.CaiT(**b.eqx_kwargs(), key=jax.random.key(0))
    out = []

    # Training step, state carried from call to call as a training loop carries it.
    optim = bench.make_optax()
    step = eqx.filter_jit(bench.eqx_train_step(optim, chunk=train_chunk), donate="all-except-first")
    x = jnp.asarray(rng.standard_normal((b.train_batch, 3, b.image_size, b.image_size), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, b.num_classes, b.train_batch), dtype=jnp.int32)
    train_model = jax.tree_util.tree_map(lambda a: a.copy() if eqx.is_array(a) else a, model)
    state = [train_model, optim.init(eqx.filter(train_model, eqx.is_array))]
    hlo = step.lower((x, y), *state).compile().compiled.as_text()

    def train_call(*_):
        state[0], state[1], loss = step((x, y), state[0], state[1])
        loss.block_until_ready()

    wall, events = profile(train_call, lambda: (), calls, warmup)
    summary = summarise(events, parse_hlo(hlo), calls, inference=False)
    out.append(dict(config=b.title, workload="train", batch=b.train_batch, wall_s=wall, **summary))

    infer_model = eqx.nn.inference_mode(model)
    infer = bench.eqx_inference_fn()
    xi = jnp.asarray(rng.standard_normal((infer_batch, 3, b.image_size, b.image_size), dtype=np.float32))
    hlo = infer.lower(infer_model, xi).compile().compiled.as_text()
    wall, events = profile(lambda: infer(infer_model, xi).block_until_ready(), lambda: (), calls, warmup)
    summary = summarise(events, parse_hlo(hlo), calls, inference=True)
    out.append(dict(config=b.title, workload="inference", batch=infer_batch, wall_s=wall, **summary))
    for row in out:
        row["ceiling_gflops"] = ceiling
    return out


def markdown(results: dict[str, Any], top: int) -> str:
    meta = results["meta"]
    lines = [
        f"Machine: {meta['cpu']} ({meta['isa']}), {meta['threads']} threads; jax {meta['jax']}; "
        f"XLA_FLAGS={meta['xla_flags']!r}; medians of {meta['calls']} traced calls after {meta['warmup']} "
        f"warm-up calls; the training step's gradient "
        + (f"in parts (--train-chunk {meta['train_chunk']})." if meta.get("train_chunk") is not None
           else "over the whole batch at once."),
        "",
        f"Matmul ceiling (2048² fp32, JAX, same threads): {results['ceiling']['jax']:.1f} GFLOP/s.",
        "",
    ]
    for row in results["profiles"]:
        lines += [
            f"**{row['config']}, {row['workload']}, batch {row['batch']}**: "
            f"{row['wall_s'] * 1e3:.0f} ms wall per call; ops' own time summed over threads "
            f"{row['total_ms']:.0f} ms.",
            "",
            "| kind | ms / call | share | ops | GFLOP/s | % ceiling |",
            "|---|---|---|---|---|---|",
        ]
        for kind in KINDS:
            k = row["kinds"][kind]
            if not k["ops"]:
                continue
            g = k["gflops"] if kind == "matrix products" else None
            pct = "" if g is None else f"{g / row['ceiling_gflops'] * 100:.0f}%"
            lines.append(
                f"| {kind} | {k['ms']:.1f} | {k['share'] * 100:.0f}% | {k['ops']} | "
                f"{'' if g is None else f'{g:.0f}'} | "
                f"{pct} |"
            )
        if top:
            lines += [
                "", f"The {top} most expensive ops:", "",
                "| op | kind | phase | shape | runs / call | ms / call | GFLOP/s |",
                "|---|---|---|---|---|---|---|",
            ]
            for op in row["ops"][:top]:
                g = op["gflops"]
                runs = op["count"] / meta["calls"]
                lines.append(
                    f"| `{op['op']}` | {op['kind']} | {op['phase']} | {'×'.join(map(str, op['shape']))} | "
                    f"{runs:g} | {op['ms_per_call']:.1f} | {'' if g is None else f'{g:.0f}'} |"
                )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="small,xxs24", help="comma list of configurations: xxs24, s24, small")
    p.add_argument("--calls", type=int, default=3, help="traced calls per workload (median wall time)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before tracing")
    p.add_argument("--infer-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="also list the N most expensive ops (0: none)")
    p.add_argument("--quick", action="store_true", help="CI mode: a tiny model, one traced call")
    p.add_argument("--train-chunk", type=bench.train_chunk_arg, default="auto",
                   help="as bench.py's: the training step's gradient in parts of at most N images (auto: "
                        "cait_eqx.auto_train_chunk), or none (the whole batch at once)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--table", metavar="JSON", help="only print the tables of an earlier --json file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            results = json.load(f)
        print(markdown(results, args.top), end="")
        return 0
    if args.calls < 1 or args.warmup < 1:
        raise SystemExit(f"--calls and --warmup must be at least 1, got {args.calls} and {args.warmup}")
    cpus = bench.pin_threads(args.threads)
    import jax

    keys = ["tiny"] if args.quick else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(keys) - set(bench.BENCHES)
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}; choose from xxs24, s24, small")
    if args.quick:
        args.calls, args.warmup, args.infer_batch = 1, 1, 2
    cpu, isa = bench.cpu_kind()
    ceiling = bench.matmul_ceiling(512 if args.quick else 2048, 3 if args.quick else 5)
    results: dict[str, Any] = dict(
        meta=dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            cpu=cpu, isa=isa, machine=platform.machine(), threads=args.threads, cpus=cpus,
            jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
            calls=args.calls, warmup=args.warmup, train_chunk=args.train_chunk, **bench.source_meta(),
        ),
        ceiling=ceiling,
        profiles=[],
    )
    for key in keys:
        print(f"profiling {key} ...", file=sys.stderr, flush=True)
        results["profiles"] += run_config(bench.BENCHES[key], args.calls, args.warmup, args.infer_batch,
                                          ceiling["jax"], args.train_chunk)
    print(markdown(results, args.top), end="")
    if args.json:
        bench.write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
