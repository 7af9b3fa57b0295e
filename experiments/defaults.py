"""Search for `cait-eqx train`'s default configuration on digits (or check one on MNIST-5k).

Each run trains one configuration with `cait_eqx.training.train_run` (exactly what the CLI does, without
the progress bar) and appends one JSON line to the results file: the settings, held-out accuracy, and the
wall time from the start of the run (data loading, model building, compilation, training, evaluation).

    python experiments/defaults.py --set image_size=16 patch_size=4 dim=64 epochs=60 --seeds 0 1
    python experiments/defaults.py --dataset mnist --set image_size=28 patch_size=4 epochs=20 --seeds 0

`--set` takes `name=value` pairs: any `TrainConfig` field, any `CaiT` keyword of the model, or `image_size`.
Unset values are `cait-eqx train`'s defaults. Results: experiments/results.jsonl (see defaults.md).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from cait_eqx.training import DEFAULT_MODEL, RunConfig, TrainConfig, train_run

HERE = Path(__file__).resolve().parent
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
RECIPE_FIELDS = TRAIN_FIELDS - {
    "eval_every",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "on_nonfinite",
    "eval_batch_size",
}


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def summarise(path: Path) -> None:
    """Print the results as a Markdown table, one row per configuration (seeds pooled)."""
    groups: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        train = {k: v for k, v in record["train"].items() if k != "seed"}
        key = json.dumps([record["dataset"], record["image_size"], record["model"], train], sort_keys=True)
        groups.setdefault(key, []).append(record)
    print("| dataset | image | model | recipe | seeds | test accuracy % (each) | mean | time per run |")
    print("|---|---|---|---|---|---|---|---|")
    base_train = TrainConfig().to_dict()
    for key, records in groups.items():
        dataset, image_size, model, train = json.loads(key)
        shown_model = {k: v for k, v in model.items() if DEFAULT_MODEL.get(k) != v}
        shown_train = {k: v for k, v in train.items() if base_train.get(k) != v}
        accs = [r["test_accuracy"] for r in records]
        seconds = [r["seconds"] for r in records]
        print(
            f"| {dataset} | {image_size} | {_fmt(shown_model) or 'default'} | "
            f"{_fmt(shown_train) or 'default'} | "
            f"{','.join(str(r['seed']) for r in records)} | {', '.join(f'{100 * a:.2f}' for a in accs)} | "
            f"{100 * sum(accs) / len(accs):.2f} | {min(seconds):.0f}–{max(seconds):.0f} s |"
        )


def _fmt(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--summary", action="store_true", help="print the results file as a table and exit")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tag", default="")
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    args = parser.parse_args()
    if args.summary:
        summarise(args.results)
        return

    settings = dict(pair.split("=", 1) for pair in args.set)
    settings = {k: parse_value(v) for k, v in settings.items()}
    base = RunConfig()
    image_size = settings.pop("image_size", base.image_size)
    train_values = {k: settings.pop(k) for k in list(settings) if k in TRAIN_FIELDS}
    model = dict(DEFAULT_MODEL) | settings
    for seed in args.seeds:
        train = dataclasses.replace(base.train, **train_values, seed=seed)
        config = dataclasses.replace(
            base, model=model, dataset=args.dataset, image_size=image_size, train=train
        )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            summary = train_run(config, run_dir, progress=False)
        seconds = time.perf_counter() - started
        result = summary.fit
        record = {
            "tag": args.tag,
            "dataset": args.dataset,
            "image_size": image_size,
            "model": model,
            "train": {k: v for k, v in train.to_dict().items() if k in RECIPE_FIELDS},
            "seed": seed,
            "test_accuracy": result.test.top1,
            "ema_test_accuracy": None if result.ema_test is None else result.ema_test.top1,
            "seconds": round(seconds, 1),
            "train_seconds": round(result.train_seconds, 1),
            "images_per_s": round(result.images_per_s),
            "steps": result.step,
        }
        print(json.dumps(record), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
