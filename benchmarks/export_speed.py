"""The exported inference artifact (`cait_eqx.export`) on the CPU: the batch in the model's chunks, as export
writes it for a CPU, against the whole batch at once (one `jax.vmap`, what export wrote before).

Both artifacts are written by `cait_eqx.export` with a batch of any size (the default), read back with
`jax.export.deserialize` and run with `Exported.call`, as a user without cait_eqx runs them; the whole-batch
one is written with the model's chunk switched off (`cait_eqx._export.auto_chunk` returning None;
`--chunk N` has the other one take N images a chunk instead of the model's own). The two
are timed in interleaved rounds in one process (`bench.interleaved`), and their logits compared.

    python benchmarks/export_speed.py --only xxs24,s24,small --rounds 5 \\
        --json benchmarks/results/export_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

# The batch each configuration is timed at by default: bench.py's largest inference batch.
DEFAULT_BATCH = {"xxs24": 32, "s24": 32, "small": 256, "tiny": 8}


def measure(key: str, batch: int, args) -> dict:
    import equinox as eqx
    import jax
    import numpy as np

    import cait_eqx
    from cait_eqx import _export

    b = bench.BENCHES[key]
    model = eqx.nn.inference_mode(cait_eqx.CaiT(**b.eqx_kwargs(), key=jax.random.key(0)))
    images = np.random.default_rng(0).uniform(0, 1, (batch, 3, b.image_size, b.image_size)).astype(np.float32)
    chunk = args.chunk or cait_eqx.auto_chunk(model.config)
    artifacts = {}
    original = _export.auto_chunk
    with tempfile.TemporaryDirectory() as folder:
        try:
            for name, size in (("chunks", chunk), ("whole batch", None)):
                _export.auto_chunk = lambda config, size=size: size
                file = os.path.join(folder, f"{len(artifacts)}.jax")
                artifacts[name] = cait_eqx.export(model, file, platforms="cpu")
        finally:
            _export.auto_chunk = original
        exported = {name: jax.export.deserialize(path.read_bytes()) for name, path in artifacts.items()}
    x = jax.numpy.asarray(images)
    logits = {name: np.asarray(e.call(x)) for name, e in exported.items()}
    diff = float(np.abs(logits["chunks"] - logits["whole batch"]).max() / np.abs(logits["whole batch"]).max())
    fns = {name: (lambda e=e: e.call(x).block_until_ready()) for name, e in exported.items()}
    timed = bench.interleaved(fns, rounds=args.rounds, target_s=args.target_s, round_warmup=1)
    return dict(
        config=b.title, key=key, batch=batch, chunk=chunk, max_rel_logit_diff=diff,
        chunks_s=timed["chunks"]["median_s"], whole_s=timed["whole batch"]["median_s"], timings=timed,
    )  # fmt: skip


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Machine: {bench.machine_line(meta)}, {meta['threads']} threads; jax {meta['jax']}; medians of "
        f"{meta['rounds']} interleaved rounds of `Exported.call` on a batch of any size, after one untimed "
        "call.",
        "",
        "| config | batch | chunks | chunks s / call | whole batch s / call | chunks images/s | speed-up "
        "| max rel. logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        count = -(-r["batch"] // r["chunk"])
        chunks = f"{count} × ≤{r['chunk']}" if count > 1 else "one (the whole batch)"
        lines.append(
            f"| {r['config']} | {r['batch']} | {chunks} | {r['chunks_s']:.3f} | {r['whole_s']:.3f} | "
            f"{r['batch'] / r['chunks_s']:.2f} | {r['whole_s'] / r['chunks_s']:.2f}× | "
            f"{r['max_rel_logit_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="xxs24,s24,small", help="configurations: xxs24,s24,small")
    p.add_argument("--batch", type=int, help="batch size (default: bench.py's largest inference batch)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--target-s", type=float, default=1.5, help="seconds of calls in one round")
    p.add_argument("--chunk", type=int, help="images per chunk (default: the model's `cait_eqx.auto_chunk`)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="CI mode: a tiny model, one short round")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    keys = ["tiny"] if args.quick else [k.strip() for k in args.only.split(",") if k.strip()]
    if args.quick:  # 8 images in chunks of 3: the chunked artifact really cuts the batch
        args.rounds, args.target_s, args.chunk = 1, 0.05, 3
    unknown = [k for k in keys if k not in bench.BENCHES]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {sorted(bench.BENCHES)}")
    bench.pin_threads(args.threads)
    import jax

    meta = dict(
        command="python benchmarks/export_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=platform.machine(), threads=args.threads, jax=jax.__version__, rounds=args.rounds,
        **bench.machine_meta(), **bench.source_meta(),
    )  # fmt: skip
    rows = []
    for key in keys:
        rows.append(measure(key, args.batch or DEFAULT_BATCH[key], args))
        row = rows[-1]
        print(f"  {key}: chunks {row['chunks_s']:.3f} s, whole batch {row['whole_s']:.3f} s", flush=True)
    results = dict(meta=meta, rows=rows)
    print(markdown(results))
    if args.json:
        bench.write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
