"""`cait-eqx plot RUN_DIR`: a run's metrics → `cait_eqx.viz.plot_training_curves`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._parser import check_output_file

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `plot` on `subparsers` (from `parser.add_subparsers`); returns its parser."""
    plot = subparsers.add_parser(
        "plot",
        help="plot the loss / accuracy / learning-rate curves of a training run (PNG)",
        description="Read the metrics of a `cait-eqx train` run and draw its curves as a PNG.",
    )
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory of `cait-eqx train`")
    plot.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="output PNG (default: the run's own curves file)",
    )
    plot.set_defaults(func=lambda args: run(args, plot))
    return plot


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run `cait-eqx plot` with the parsed `args`; returns the exit status (0, or 1 on an error)."""
    if not args.run_dir.is_dir():
        parser.error(f"run directory not found: {args.run_dir}")
    from cait_eqx import training, viz

    # Before the metrics are read or anything drawn: the PNG must be a file that can be written.
    if args.out is not None:
        check_output_file(parser, "--out", args.out, "curves.png")
    else:  # the run's own curves file: a run directory that cannot be written needs --out elsewhere
        import cait_eqx

        try:
            cait_eqx.check_writable_dir(args.run_dir, training.Run.CURVES_FILE)
        except OSError as error:
            parser.error(f"{error} Or draw the curves elsewhere with --out FILE")
    try:
        out = viz.plot_training_curves(args.run_dir, args.out)
    except (ValueError, OSError) as error:
        print(f"cait-eqx plot: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
