"""Where does the class token look? Class-attention maps of a CaiT trained on the digits.

Trains the default small CaiT on the digits (or loads one saved with `cait_eqx.save`), then draws, for a
few test digits, the class-attention weights of each class-attention block and head, and their mean,
overlaid on the image. `model.class_attention(image)` gives the raw weights; `cait_eqx.viz` lays them on
the patch grid and draws them.

    python examples/attention_maps.py --out docs/assets/attention      # trains ~1 minute, writes PNGs
    python examples/attention_maps.py --checkpoint runs/digits/model.safetensors --out attention
    python examples/attention_maps.py --quick --out /tmp/attn          # a few steps (CI)

The command-line equivalent for one image file is `cait-eqx attention IMAGE --checkpoint FILE`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Float, jaxtyped

import cait_eqx
from cait_eqx.data import load_digits, train_test_split
from cait_eqx.training import DEFAULT_MODEL, TrainConfig, fit
from cait_eqx.viz import class_attention_maps, plot_class_attention


@jaxtyped(typechecker=beartype)
def summarise(model: cait_eqx.CaiT, image: Float[Array, "1 16 16"]) -> str:
    """Where the mean map of the last block peaks, and how much weight the class token keeps on itself."""
    maps = class_attention_maps(model, image)  # (blocks, heads, rows, cols)
    last = jnp.mean(maps[-1], axis=0)
    row, col = np.unravel_index(int(jnp.argmax(last)), last.shape)
    on_itself = 1.0 - jnp.sum(maps, axis=(-2, -1))  # the class token's weight on itself, per block and head
    return (
        f"last block's mean map peaks at patch ({row}, {col}); class token keeps "
        f"{100 * float(jnp.mean(on_itself[-1])):.1f}% on itself"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a model saved by cait_eqx.save (16×16 digits)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs when no checkpoint is given")
    parser.add_argument("--images", type=int, default=3, help="how many test digits to draw")
    parser.add_argument("--out", type=Path, default=Path("attention"), help="folder for the PNGs")
    parser.add_argument("--quick", action="store_true", help="train a few steps, draw one digit (CI)")
    args = parser.parse_args(argv)

    train, test = train_test_split(load_digits(image_size=16), test_fraction=0.2, seed=0)
    if args.checkpoint is not None:
        model = cait_eqx.load(args.checkpoint)
    else:
        model = cait_eqx.CaiT(
            image_size=16, channels=1, num_classes=10, **DEFAULT_MODEL, key=jax.random.key(0)
        )
        epochs = 1 if args.quick else args.epochs
        config = TrainConfig(epochs=epochs, warmup_epochs=min(3.0, epochs / 2))
        result = fit(
            model,
            train.subset(np.arange(128)) if args.quick else train,
            test,
            config,
            key=jax.random.key(1),
            progress=not args.quick,
            max_steps=3 if args.quick else None,
        )
        model = eqx.nn.inference_mode(result.model)
        print(f"trained: test accuracy {100 * result.test.top1:.1f}%" if result.test else "trained")

    for i in range(1 if args.quick else args.images):
        image = jnp.asarray(test.images[i], jnp.float32) / 255.0  # the [0, 1] input the training used
        predicted = int(jnp.argmax(model(image)))
        out = plot_class_attention(model, image, args.out / f"digit_{i}.png")
        print(f"{out}: a {test.labels[i]}, predicted {predicted}; {summarise(model, image)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
