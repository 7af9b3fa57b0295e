"""What `cait-eqx train` prints when a run ends (and the exit status it ends with)."""

from __future__ import annotations

import sys
from pathlib import Path

from cait_eqx import training

__all__ = ["report"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def report(summary: training.RunSummary, run_dir: Path, *, primary: bool, seconds: float) -> int:
    """Print how the run ended; return the exit status."""
    run = training.Run(run_dir)
    result = summary.fit
    if not primary:
        return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        saved = result.checkpoint
        where = (
            f"checkpoint saved in {run.checkpoint_dir}" if saved is not None and saved.step == result.step
            else f"its newest checkpoint (step {saved.step}) is in {run.checkpoint_dir}" if saved is not None
            else "no checkpoint yet"
        )
        print(
            f"interrupted at step {result.step}/{result.total_steps}; {where}. Continue with: "
            f"cait-eqx train --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    if result.status == "max_steps":
        print(
            f"stopped after step {result.step}/{result.total_steps} (--max-steps); continue with: "
            f"cait-eqx train --resume {run_dir}",
            file=sys.stderr,
        )
        return 0
    lines = [f"run directory: {run_dir}"]
    if result.test is not None:
        lines.append(
            f"test accuracy: {100 * result.test.top1:.2f}% (top-5 {100 * result.test.top5:.2f}%, loss "
            f"{result.test.loss:.4f}) on {result.test.num_examples} held-out images"
        )
    if result.ema_test is not None:
        lines.append(f"EMA model test accuracy: {100 * result.ema_test.top1:.2f}%")
    lines.append(
        f"time: {_duration(seconds)} ({result.step} steps, {result.images_per_s:.0f} images/s while training)"
    )
    written = [run.CONFIG_FILE, run.METRICS_FILE, run.CHECKPOINT_DIR + "/"]
    written += [path.name for path in (summary.model_path, summary.adapters_path, summary.curves_path)
                if path is not None]
    written.append(run.SUMMARY_FILE)
    lines.append("wrote: " + ", ".join(written))
    print("\n".join(lines))
    return 0
