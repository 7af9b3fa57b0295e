"""Fine-tune official CaiT ImageNet weights on a small dataset: the digits, or your own image folder.

The pretrained model is loaded at a new input size (its positional embedding resampled bicubically) with a
fresh classifier for the new classes, switched back to training mode, and trained with the library's recipe
on ImageNet-normalised RGB inputs, as the weights expect.

    python examples/finetune.py --pretrained cait_xxs24_224             # timm's weights, Hugging Face Hub
    python examples/finetune.py --weights model.safetensors --model cait_xxs24_224   # a local official file
    python examples/finetune.py --pretrained cait_xxs24_224 --data folder:photos --image-size 64
    python examples/finetune.py --quick --out /tmp/ft                   # CI: a small stand-in checkpoint

`--quick` cannot download, so it writes a small randomly initialised CaiT in timm's file format (the
official files' key names and layout) and fine-tunes that for a few steps: it checks the code path, not
the accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from beartype import beartype
from jaxtyping import jaxtyped

import cait_eqx
from cait_eqx.data import Dataset, load_dataset, train_test_split
from cait_eqx.training import TrainConfig, fit


@jaxtyped(typechecker=beartype)
def as_rgb(dataset: Dataset) -> Dataset:
    """The official weights take RGB: repeat a greyscale dataset's channel three times."""
    if dataset.channels == 3:
        return dataset
    return Dataset(np.repeat(dataset.images, 3, axis=1), dataset.labels, dataset.class_names, dataset.name)


def write_stand_in_checkpoint(path: Path) -> Path:
    """A small CaiT with random weights, saved under timm's key names like an official `model.safetensors`."""
    from safetensors.numpy import save_file

    model = cait_eqx.CaiT(
        image_size=224,
        patch_size=16,
        num_classes=1000,
        dim=48,
        depth=2,
        cls_depth=2,
        heads=4,
        mlp_dim=96,
        key=jax.random.key(42),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(cait_eqx.to_timm_state_dict(model), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--pretrained", metavar="NAME", help="a variant whose timm weights to fetch from the Hub"
    )
    source.add_argument("--weights", type=Path, metavar="FILE", help="a local timm / deit checkpoint file")
    parser.add_argument("--model", metavar="NAME", help="the variant of --weights (default: inferred)")
    parser.add_argument("--data", default="digits", help="'digits', 'mnist', 'folder:PATH' or 'npz:PATH'")
    parser.add_argument("--image-size", type=int, default=64, help="fine-tuning resolution (default 64)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_example"))
    parser.add_argument("--quick", action="store_true", help="stand-in checkpoint, a few steps (CI)")
    args = parser.parse_args(argv)
    if not (args.quick or args.pretrained or args.weights):
        parser.error("give --pretrained NAME or --weights FILE (or --quick)")

    size = 32 if args.quick else args.image_size
    train, test = train_test_split(
        as_rgb(load_dataset(args.data, image_size=size)), test_fraction=0.2, seed=0
    )
    if args.quick:
        train, test = train.subset(np.arange(64)), test.subset(np.arange(64))
        args.weights, args.epochs = write_stand_in_checkpoint(args.out / "stand_in.safetensors"), 1

    head_key, run_key = jax.random.split(jax.random.key(0))
    if args.pretrained:
        # Fetch (or reuse from the cache), resample to `size`, new head for our classes: one call.
        model = cait_eqx.create_model(
            args.pretrained, pretrained=True, image_size=size, num_classes=train.num_classes, key=head_key
        )
    else:
        model = cait_eqx.load_timm(args.weights, name=args.model, image_size=size)
        model = cait_eqx.reset_classifier(model, train.num_classes, key=head_key)
    model = eqx.nn.inference_mode(model, False)  # loaded models come in inference mode
    print(f"fine-tuning {model.num_params:,} parameters at {model.config.image_size} on {len(train)} images")

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=32,
        lr=args.lr,
        min_lr=1e-6,
        warmup_epochs=min(1.0, args.epochs),
        weight_decay=0.05,
        label_smoothing=0.1,
        crop_padding=size // 16,
        normalize="imagenet",
    )
    result = fit(model, train, test, config, key=run_key, run_dir=args.out, progress=not args.quick)
    print(f"test accuracy after {result.step} steps: {100 * result.test.top1:.2f}%")
    saved = cait_eqx.save(args.out / "finetuned.safetensors", eqx.nn.inference_mode(result.model))
    print(f"wrote {saved}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
