"""Does distillation help a small student? A 1.07M-parameter CaiT teaches a 36k-parameter one on the digits.

1. `--train-teacher`: train the teacher, a larger CaiT (patch 4, dim 128, 6 + 2 blocks, 4 heads), on the
   digits' training part (1,437 images, 16×16, one channel) with `cait-eqx train`'s recipe for 100 epochs,
   test it on the held-out fifth (360 images, never trained on), and save it to `--teacher FILE`
   (default `runs/distillation-teacher.safetensors`, 4.3 MB, not committed: `--train-teacher` makes it
   again in about 3 min). One JSON line records its accuracy and cost.
2. For each seed, train the student (patch 4, dim 32, 2 + 2 blocks, 2 heads) on two sets of labelled
   digits, three ways, each for about 1,000 steps of 50 images with the same recipe (`cait-eqx train`'s,
   with a warm-up of 5 % of the steps):
   - `none`: the labels only;
   - `hard`: DeiT's hard distillation, `CE(student, labels) / 2 + CE(student, teacher's class) / 2`
     (`distillation="hard"`, alpha 0.5);
   - `soft`: DeiT's soft distillation at temperature 3 (DeiT's soft setting), alpha 0.5.
   The sets: `all` (the 1,437 training digits, the teacher's own training data) and `k10` (10 images per
   class, drawn by the seed: the student has 100 labels, the teacher was trained on all 1,437). The three
   conditions of a seed share the draw, the initialisation and the batch order, so they are paired.
3. Every model is tested on the same held-out 360 digits.

Each run appends one JSON line to `experiments/distillation.jsonl`; `--table` prints the Markdown table of
docs/guides/finetune.md ("Measured: does distillation help a small student?"). The parts can run one at a
time (each under the shared CPU lock on a shared machine):

    python experiments/distillation.py --train-teacher     # once: ~3 min on 2 CPU cores
    python experiments/distillation.py --seeds 0           # 2 sets x 3 conditions; then --seeds 1, --seeds 2
    python experiments/distillation.py --table

`--smoke` checks the plumbing in a scratch directory (what tests/test_experiments.py runs): an untrained
teacher is saved, loaded, and teaches a soft-distilled student for two steps; no figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax.random as jr
import numpy as np

import cait_eqx
from cait_eqx.data import Dataset, load_digits, train_test_split
from cait_eqx.training import TrainConfig, evaluate, fit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "distillation.jsonl"
TEACHER_FILE = Path("runs/distillation-teacher.safetensors")
CONDITIONS = ("none", "hard", "soft")
LABEL_SETS = ("all", "k10")
IMAGE_SIZE = 16

TEACHER = dict(patch_size=4, dim=128, depth=6, cls_depth=2, heads=4, mlp_dim=256, layer_dropout=0.1)
STUDENT = dict(patch_size=4, dim=32, depth=2, cls_depth=2, heads=2, mlp_dim=64)
TEACHER_EPOCHS = 100  # cait-eqx train's recipe otherwise (TrainConfig's defaults: batch 64, lr 2e-3, ...)
STEPS = 1000  # optimiser steps per student run, whatever the set
BATCH = 50
DISTILLATION = {
    "none": dict(),
    "hard": dict(distillation="hard", distillation_alpha=0.5),
    "soft": dict(distillation="soft", distillation_alpha=0.5, distillation_tau=3.0),
}


def digits() -> tuple[Dataset, Dataset]:
    """The digits at 16×16 and their fixed held-out fifth (the split of `cait-eqx train` and transfer.py)."""
    return train_test_split(load_digits(image_size=IMAGE_SIZE), test_fraction=0.2, seed=0)


def label_set(train: Dataset, name: str, seed: int) -> Dataset:
    """`all` the training digits, or `k10`: 10 of each class, drawn by `seed`."""
    if name == "all":
        return train
    k = int(name[1:])
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(train.labels == c), k, replace=False) for c in range(train.num_classes)
    ]
    return train.subset(np.sort(np.concatenate(picks)))


def new_model(shape: dict, data: Dataset, key) -> cait_eqx.CaiT:
    return cait_eqx.CaiT(
        image_size=data.image_size, channels=data.channels, num_classes=data.num_classes, **shape, key=key
    )


def train_teacher(path: Path, epochs: int, results: Path, shape: dict = TEACHER, max_steps=None) -> None:
    train, test = digits()
    model = new_model(shape, train, jr.key(0))
    config = TrainConfig(epochs=epochs, seed=0, log_every=100, eval_every=epochs, checkpoint_every=0)
    started = time.perf_counter()
    result = fit(model, train, test, config, key=jr.key(1), progress=False, max_steps=max_steps)
    seconds = time.perf_counter() - started
    trained = eqx.nn.inference_mode(result.model)
    accuracy = evaluate(trained, test).top1  # fit's last evaluation again; --smoke stops before that one
    path.parent.mkdir(parents=True, exist_ok=True)
    cait_eqx.save(path, trained)
    record = dict(
        role="teacher", model=shape, params=model.num_params, epochs=epochs, steps=result.step,
        test_accuracy=accuracy, seconds=seconds, file=str(path), file_bytes=path.stat().st_size,
    )
    _append(results, record)
    print(f"teacher: {model.num_params:,} parameters, {100 * accuracy:.2f}% on the held-out digits "
          f"after {result.step} steps in {seconds:.0f} s -> {path}", flush=True)


def student_run(
    condition: str, train: Dataset, test: Dataset, teacher, seed: int, steps: int
) -> dict:
    per_epoch = len(train) // BATCH
    epochs = max(1, math.ceil(steps / per_epoch))
    config = TrainConfig(
        epochs=epochs, batch_size=BATCH, seed=seed, warmup_epochs=0.05 * epochs, log_every=100,
        eval_every=epochs, checkpoint_every=0, **DISTILLATION[condition],
    )
    key = jr.key(seed)
    model = new_model(STUDENT, train, jr.fold_in(key, 0))
    started = time.perf_counter()
    result = fit(
        model, train, test, config, key=jr.fold_in(key, 1), progress=False,
        teacher=None if condition == "none" else teacher,
    )
    return dict(
        role="student", condition=condition, seed=seed, params=model.num_params, train_images=len(train),
        steps=result.step, test_accuracy=result.test.top1, seconds=time.perf_counter() - started,
    )


def students(seeds: list[int], sets: list[str], conditions: list[str], teacher_path: Path, steps: int,
             results: Path) -> None:
    if not teacher_path.is_file():
        raise SystemExit(f"No teacher at {teacher_path}: train it first with --train-teacher.")
    teacher = cait_eqx.load(teacher_path)
    train_all, test = digits()
    for name in sets:
        for seed in seeds:
            train = label_set(train_all, name, seed)
            agreement = evaluate(teacher, train).top1  # how often the teacher's class is the label
            for condition in conditions:
                record = dict(label_set=name, **student_run(condition, train, test, teacher, seed, steps))
                record.update(teacher=str(teacher_path), teacher_agreement=agreement)
                _append(results, record)
                print(f"{name} seed={seed} {condition}: {100 * record['test_accuracy']:.1f}% "
                      f"({record['seconds']:.0f} s)", flush=True)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _cell(values: list[float], seconds: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread} % ({statistics.mean(seconds):.0f} s)"


def table(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for teacher in (r for r in records if r["role"] == "teacher"):
        print(f"teacher: {teacher['params']:,} parameters, {100 * teacher['test_accuracy']:.1f} % on the "
              f"held-out digits, {teacher['steps']} steps, {teacher['seconds']:.0f} s")
    runs = [r for r in records if r["role"] == "student"]
    if runs:
        low, high = (f"{100 * f(r['teacher_agreement'] for r in runs):.1f}" for f in (min, max))
        print(f"the teacher's class is the label on {low if low == high else f'{low}-{high}'} % of the "
              f"students' training images; student: {runs[0]['params']:,} parameters")
    print("\n| labelled digits | no distillation | hard | soft (τ = 3) | hard − none | soft − none |")
    print("|---|---|---|---|---|---|")
    for name in LABEL_SETS:
        chosen = [r for r in runs if r["label_set"] == name]
        if not chosen:
            continue
        by = {c: {r["seed"]: r for r in chosen if r["condition"] == c} for c in CONDITIONS}
        cells = [
            _cell([100 * r["test_accuracy"] for r in by[c].values()], [r["seconds"] for r in by[c].values()])
            if by[c] else "—"
            for c in CONDITIONS
        ]
        for c in ("hard", "soft"):  # paired by seed: the same draw, initialisation and batches
            seeds = sorted(set(by[c]) & set(by["none"]))
            gains = [100 * (by[c][s]["test_accuracy"] - by["none"][s]["test_accuracy"]) for s in seeds]
            spread = f" ± {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
            cells.append(f"{statistics.mean(gains):+.1f}{spread}" if gains else "—")
        images = chosen[0]["train_images"]
        label = f"all {images:,}" if name == "all" else f"{name[1:]} per class ({images})"
        print(f"| {label} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-teacher", action="store_true", help="train and save the teacher, then stop")
    parser.add_argument("--teacher", type=Path, default=TEACHER_FILE, help="the teacher's file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[])
    parser.add_argument("--sets", nargs="+", default=list(LABEL_SETS), choices=LABEL_SETS)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of --results and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="every piece for a few steps, into a scratch directory (a test, no figures)")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as scratch:
            results, teacher = Path(scratch) / "results.jsonl", Path(scratch) / "teacher.safetensors"
            # An untrained teacher of the student's shape teaches for two steps: the plumbing, no figures.
            train_teacher(teacher, 1, results, shape=STUDENT, max_steps=0)
            students([0], ["k10"], ["soft"], teacher, 2, results)
            table(results)
        return 0
    if args.table:
        table(args.results)
        return 0
    if args.train_teacher:
        train_teacher(args.teacher, TEACHER_EPOCHS, args.results)
    if args.seeds:
        students(args.seeds, args.sets, args.conditions, args.teacher, STEPS, args.results)
    if not (args.train_teacher or args.seeds):
        parser.error("nothing to do: give --train-teacher, --seeds, --table or --smoke")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
