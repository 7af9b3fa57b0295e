"""`cait-eqx evaluate RUN_DIR`: a run's model (`cait_eqx.training.Run`) → `cait_eqx.training.evaluate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cait_eqx import data, training

from ._parser import check_output_file, dataset_spec, existing_dir, int_at_least

__all__ = ["add_parser", "confusion_table", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `evaluate` on `subparsers` (from `parser.add_subparsers`); returns its parser."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 accuracy and confusion matrix of a trained run's model",
        description=(
            "Evaluate the final model of a `cait-eqx train` run (or its newest checkpoint with --checkpoint, "
            "or its EMA model with --ema) on the run's held-out split, or on another dataset."
        ),
    )
    evaluate.add_argument("run_dir", type=existing_dir, metavar="RUN_DIR", help="a run directory")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", action="store_true", help="use the newest checkpoint, not the final model"
    )
    source.add_argument("--ema", action="store_true", help="use the EMA model (the run needs --ema-decay)")
    evaluate.add_argument(
        "--dataset",
        type=dataset_spec,
        metavar="SPEC",
        help="evaluate on this dataset instead (all of it unless --split)",
    )
    evaluate.add_argument(
        "--split",
        choices=("test", "train", "all"),
        help="which part: the run's held-out split (default), its training part, or all",
    )
    evaluate.add_argument("--batch-size", type=int_at_least(1), default=500, metavar="B")
    evaluate.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    evaluate.set_defaults(func=lambda args: run(args, evaluate))
    return evaluate


def _dataset(args: argparse.Namespace, run_dir: training.Run, config: training.RunConfig, model: Any):
    """The images to evaluate on and their description: the run's split, or `--dataset` (split or whole)."""
    if args.dataset is None:
        split = args.split or "test"
        if split == "all":  # the whole dataset, unsplit (a folder read lazily, as the run read it)
            dataset = data.load_dataset(config.dataset, image_size=config.image_size, lazy=True)
        else:
            train_data, test_data = run_dir.data()
            dataset = test_data if split == "test" else train_data
        return dataset, f"{config.dataset} ({split})"
    dataset = data.load_dataset(args.dataset, image_size=model.config.image_size)
    name = args.dataset
    if args.split not in (None, "all"):
        parts = data.train_test_split(dataset, test_fraction=config.test_fraction, seed=config.split_seed)
        dataset = parts[1] if args.split == "test" else parts[0]
        name += f" ({args.split})"
    return dataset, name


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run `cait-eqx evaluate` with the parsed `args`; returns the exit status (0, or 1 on an error)."""
    if args.json is not None:  # before the model is loaded or anything compiled
        check_output_file(parser, "--json", args.json, "results.json")
    run_dir = training.Run(args.run_dir)
    try:
        config = run_dir.config()
    except (OSError, ValueError) as error:
        parser.error(str(error))
    which = "checkpoint" if args.checkpoint else ("ema" if args.ema else "final")
    try:
        model = run_dir.model(which)
    except FileNotFoundError as error:
        parser.error(f"{error}{'; evaluate it with --checkpoint' if which == 'final' else ''}")
    except ValueError as error:
        print(f"cait-eqx evaluate: error: {error}", file=sys.stderr)
        return 1
    try:
        dataset, name = _dataset(args, run_dir, config, model)
    except ImportError as error:
        print(f"cait-eqx evaluate: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if dataset.channels != model.config.channels:
        parser.error(
            f"the model takes {model.config.channels}-channel images, the dataset has {dataset.channels}"
        )
    try:
        result = training.evaluate(
            model, dataset, batch_size=args.batch_size, normalize=config.train.normalize,
            transform=training.eval_transform(config.train, dataset),  # as the run evaluated
            timeout=config.train.data_timeout or None,  # a file that blocks when read: one line, not a hang
        )
    except (ValueError, data.DataWorkerError) as error:
        print(f"cait-eqx evaluate: error: {error}", file=sys.stderr)
        return 1
    source = {
        "checkpoint": "newest checkpoint",
        "ema": run_dir.ema_model_path.name,
        "final": run_dir.model_path.name,
    }[which]
    print(f"{args.run_dir} [{source}] on {name}: {result.num_examples} images")
    print(f"top-1 accuracy: {100 * result.top1:.2f}%")
    print(f"top-{min(5, dataset.num_classes)} accuracy: {100 * result.top5:.2f}%")
    print(f"mean loss: {result.loss:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(confusion_table(result.confusion, dataset.class_names))
    if args.json is not None:
        result.write_json(
            args.json,
            run_dir=str(args.run_dir),
            source=source,
            dataset=name,
            class_names=list(dataset.class_names),
        )
        print(f"wrote {args.json}")
    return 0


def confusion_table(confusion: Any, class_names: Any) -> str:
    """A confusion matrix as text: one row per true class, one column per predicted class (names cut to 8)."""
    names = [str(n)[:8] for n in class_names]
    width = max(5, max(len(n) for n in names), len(str(int(confusion.max(initial=0)))))
    rows = [" " * (width + 1) + " ".join(n.rjust(width) for n in names)]
    for name, row in zip(names, confusion, strict=False):
        rows.append(name.rjust(width) + " " + " ".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(rows)
