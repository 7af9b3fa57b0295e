"""Train a small CaiT on scikit-learn's digits with the library's recipe; evaluate, save, plot.

The same thing `cait-eqx train` does, written out as a script you can change: the data, the model, the
recipe (`TrainConfig`), `fit` (which checkpoints to the run directory and resumes from it), the test-set
evaluation with its confusion matrix, the saved model and the curves.

    python examples/train_digits.py --out runs/digits          # about a minute on 2 CPU cores
    python examples/train_digits.py --out runs/digits --resume # continue an interrupted run exactly
    python examples/train_digits.py --quick --out /tmp/quick   # six epochs (CI): well above chance
"""

from __future__ import annotations

import argparse
from pathlib import Path

import equinox as eqx
import jax
from beartype import beartype
from jaxtyping import jaxtyped

import cait_eqx
from cait_eqx.data import Dataset, load_digits, train_test_split
from cait_eqx.training import DEFAULT_MODEL, TrainConfig, evaluate, fit
from cait_eqx.viz import plot_training_curves


@jaxtyped(typechecker=beartype)
def build(train: Dataset, *, seed: int) -> cait_eqx.CaiT:
    """`cait-eqx train`'s default small CaiT (`DEFAULT_MODEL`), sized to the data."""
    return cait_eqx.CaiT(
        image_size=train.image_size,
        channels=train.channels,
        num_classes=train.num_classes,
        **DEFAULT_MODEL,
        key=jax.random.key(seed),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/digits_example"), help="run directory")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--quick", action="store_true", help="six epochs (CI)")
    args = parser.parse_args(argv)

    # 1,797 digits upsampled from 8x8 to 16x16 (the `cait-eqx train` default), a fixed stratified split.
    train, test = train_test_split(load_digits(image_size=16), test_fraction=0.2, seed=0)
    if args.quick:
        args.epochs = 6  # the fewest that reliably learn: tests/test_examples.py checks the accuracy
    model = build(train, seed=args.seed)
    print(f"{model.num_params:,} parameters; {len(train)} training and {len(test)} test images")

    # The default recipe: AdamW, warm-up + cosine, label smoothing, random crops
    # (the warm-up shortened for tiny runs).
    config = TrainConfig(epochs=args.epochs, seed=args.seed, warmup_epochs=min(3.0, args.epochs / 2))
    result = fit(
        model,
        train,
        test,
        config,
        key=jax.random.key(args.seed),
        run_dir=args.out,
        resume=args.resume,
        progress=not args.quick,
    )
    if result.status != "completed":
        print(f"stopped ({result.status}) at step {result.step}; rerun with --resume to continue")
        return 1

    final = evaluate(eqx.nn.inference_mode(result.model), test)
    print(
        f"test accuracy {100 * final.top1:.2f}% (top-5 {100 * final.top5:.2f}%), "
        f"{result.images_per_s:.0f} images/s"
    )
    print("confusion matrix (rows: true digit, columns: predicted):")
    print(final.confusion)
    model_path = cait_eqx.save(args.out / "model.safetensors", eqx.nn.inference_mode(result.model))
    curves = plot_training_curves(args.out)
    print(f"wrote {model_path} and {curves}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
