"""Dense features: per-patch maps from `forward_intermediates`, and a linear readout on them.

`model.forward_intermediates(image, indices=[...])` returns the patch tokens of chosen self-attention blocks
as maps `(dim, rows, cols)` over the patch grid (timm's NCHW format). This script takes the maps of a few
blocks for the digits, and fits a per-patch logistic regression (scikit-learn) that tells whether each patch
holds ink or background — a target read from the image itself, so the dense path (image → maps → a readout
per location) is checked end to end without labels. A random model is shown next to a trained one
(`--checkpoint` or `--run`), and next to the majority class.

    python examples/train_digits.py --out runs/digits                     # a trained model first
    python examples/dense_readout.py --checkpoint runs/digits/model.safetensors
    python examples/dense_readout.py --quick                              # random model only (CI)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Float, Shaped, jaxtyped

import cait_eqx
from cait_eqx.data import load_digits, to_unit_float, train_test_split
from cait_eqx.training import DEFAULT_MODEL


@eqx.filter_jit
@jaxtyped(typechecker=beartype)
def patch_maps(
    model: cait_eqx.CaiT, images: Shaped[Array, "batch channels height width"], blocks: tuple[int, ...]
) -> Float[Array, "batch blocks dim rows cols"]:
    """The normalised patch maps of `blocks` for a batch of uint8 images (inference mode)."""
    model = eqx.nn.inference_mode(model)

    def one(image):
        maps = model.forward_intermediates(image, indices=list(blocks), norm=True, intermediates_only=True)
        return jnp.stack(maps)

    return jax.vmap(one)(to_unit_float(images))


def ink_per_patch(images: np.ndarray, patch: int, threshold: float = 0.25) -> np.ndarray:
    """`(n, rows, cols)` booleans: whether a patch's mean intensity exceeds `threshold` of white."""
    n, _, h, w = images.shape
    grid = images[:, 0].reshape(n, h // patch, patch, w // patch, patch).astype(np.float32) / 255
    return grid.mean(axis=(2, 4)) > threshold


def readout_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a logistic regression per patch token (standardised features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def tokens(maps: np.ndarray, block: int) -> np.ndarray:
    """`(n · rows · cols, dim)`: one row per patch location, from the maps of one block."""
    chosen = maps[:, block]  # (n, dim, rows, cols)
    return chosen.transpose(0, 2, 3, 1).reshape(-1, chosen.shape[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a model saved by cait_eqx.save")
    parser.add_argument("--quick", action="store_true", help="random model, 300 + 100 images (CI)")
    args = parser.parse_args(argv)

    train, test = train_test_split(load_digits(image_size=16), test_fraction=0.2, seed=0)
    if args.quick:
        train, test = train.subset(np.arange(300)), test.subset(np.arange(100))
    models = {
        "random init": cait_eqx.CaiT(
            image_size=16, channels=1, num_classes=10, **DEFAULT_MODEL, key=jax.random.key(0)
        )
    }
    if args.checkpoint is not None:
        models["trained"] = cait_eqx.load(args.checkpoint)
    patch = models["random init"].config.patch_size
    train_y, test_y = ink_per_patch(train.images, patch).ravel(), ink_per_patch(test.images, patch).ravel()
    majority = max(test_y.mean(), 1 - test_y.mean())
    print(
        f"patches: {train_y.size} train / {test_y.size} test; ink in {100 * test_y.mean():.1f}% of test "
        f"patches (majority class: {100 * majority:.1f}%)"
    )
    for name, model in models.items():
        depth = model.config.depth
        blocks = tuple(sorted({0, depth // 2, depth - 1}))
        train_maps = np.asarray(patch_maps(model, jnp.asarray(train.images), blocks))
        test_maps = np.asarray(patch_maps(model, jnp.asarray(test.images), blocks))
        rows, cols = model.config.grid_size
        assert train_maps.shape[1:] == (len(blocks), model.config.dim, rows, cols)
        for i, block in enumerate(blocks):
            accuracy = readout_accuracy(tokens(train_maps, i), train_y, tokens(test_maps, i), test_y)
            print(
                f"{name}: block {block} maps {train_maps.shape[2:]}; per-patch ink readout test accuracy "
                f"{100 * accuracy:.1f}%"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
