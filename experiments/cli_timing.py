"""Time the documented `cait-eqx train` commands end to end, as a user runs them.

Each run is a fresh `cait-eqx` process (Python start-up, imports, data loading, compilation, training,
evaluation, writing the run directory), timed by the wall clock; its held-out accuracy is read back from
RUN_DIR/summary.json. One JSON line per run goes to experiments/cli_results.jsonl.

    python experiments/cli_timing.py main --seeds 0 1 2      # `cait-eqx train` (the README's main job)
    python experiments/cli_timing.py mnist --seeds 0         # the documented MNIST-5k command
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = {
    "main": [],
    "mnist": ["--dataset", "mnist", "--patch-size", "7"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job", choices=sorted(COMMANDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--results", type=Path, default=HERE / "cli_results.jsonl")
    args = parser.parse_args()
    script = shutil.which("cait-eqx")
    if script is None:
        raise SystemExit("the `cait-eqx` command is not installed: pip install -e .")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            # Seed 0 is the default, so the main job's seed-0 run is exactly `cait-eqx train` (plus --out).
            extra = [] if seed == 0 else ["--seed", str(seed)]
            command = [
                "cait-eqx",
                "train",
                *COMMANDS[args.job],
                *extra,
                "--no-progress",
                "--out",
                str(run_dir),
            ]
            started = time.perf_counter()
            done = subprocess.run(
                [script, *command[1:]], capture_output=True, text=True, env=dict(os.environ)
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
        record = {
            "job": args.job,
            "command": " ".join(command[:-2]),
            "seed": seed,
            "test_accuracy": summary["test_accuracy"],
            "test_examples": summary["test_examples"],
            "wall_seconds": round(seconds, 1),
            "images_per_s": round(summary["images_per_s"]),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        }
        print(json.dumps(record), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
