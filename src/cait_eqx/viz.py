"""Pictures of what a CaiT looks at and of how its training went.

- Class-attention maps: the weights with which the class token of each class-attention block and head reads
    the patches, as heat maps on the patch grid, upsampled to the image and overlaid on it.
- Training curves: loss, accuracy, learning rate and throughput from the metrics a run recorded
    (`cait_eqx.training.Run.metrics`).

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no display, no global `pyplot`
state) and written to PNG atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._atomic import atomic_write_bytes
from ._config import CaiTConfig
from ._constants import IMAGENET_MEAN, IMAGENET_STD
from ._model import CaiT
from .training import Run

__all__ = [
    "class_attention_maps",
    "attention_heatmaps",
    "load_image",
    "plot_class_attention",
    "read_metrics",
    "plot_training_curves",
]


# ------------------------------------------------------------------------------------------ attention maps


@eqx.filter_jit
def _class_attention(model: CaiT, image: Array) -> Array:
    return model.class_attention(image)


def class_attention_maps(
    model: CaiT, image: Float[Array, "channels height width"]
) -> Float[Array, "blocks heads rows cols"]:
    """The class-attention weights of every class-attention block and head, laid out on the patch grid.

    The class token's weight on itself (index 0 of `model.class_attention`) is dropped; the remaining weights
    are the patches' in row-major order, reshaped to `model.config.grid_size` (non-square grids included). So
    for every block and head, the map sums to one minus the class token's weight on itself.

    **Arguments:**

    - `model`: a `CaiT` with at least one class-attention block (`cls_depth >= 1`).
    - `image`: one channels-first image of the model's input shape, already normalised as the model expects.

    **Returns:** a `(cls_depth, heads, rows, cols)` array, `(rows, cols) = model.config.grid_size`.
    """
    if model.config.cls_depth == 0:
        raise ValueError(
            "This model has no class-attention blocks (`cls_depth=0`): its class token is a plain ViT-style "
            "token, so there are no class-attention maps to draw."
        )
    weights = _class_attention(model, image)
    rows, cols = model.config.grid_size
    blocks, heads, _ = weights.shape
    return weights[:, :, 1:].reshape(blocks, heads, rows, cols)


def _upsample(maps: Array, size: tuple[int, int], method: str) -> Array:
    rows, cols = maps.shape[-2:]
    height, width = size
    if method == "nearest":
        if height % rows or width % cols:
            raise ValueError(
                f"Nearest upsampling repeats each patch's weight over its pixels, so the image size {size} "
                f"must be a multiple of the grid {(rows, cols)}; use upsample='bilinear' for other sizes."
            )
        return jnp.repeat(jnp.repeat(maps, height // rows, axis=-2), width // cols, axis=-1)
    if method == "bilinear":
        return jax.image.resize(maps, (*maps.shape[:-2], height, width), method="bilinear")
    raise ValueError(f"`upsample` must be 'nearest' or 'bilinear', got {method!r}.")


def attention_heatmaps(
    model: CaiT,
    image: Float[Array, "channels height width"],
    *,
    upsample: Literal["nearest", "bilinear"] = "nearest",
) -> Float[Array, "blocks heads_plus_mean height width"]:
    """Class-attention heat maps at the image's resolution: every head of every CA block, then their mean.

    **Arguments:**

    - `model`: a `CaiT` with at least one class-attention block.
    - `image`: one channels-first image of the model's input shape.
    - `upsample`: `"nearest"` (default) gives every pixel of a patch that patch's exact attention weight;
        `"bilinear"` gives a smooth picture. (Keyword only argument.)

    **Returns:** a `(cls_depth, heads + 1, height, width)` array; index `heads` along the second axis is the
    mean over heads.
    """
    maps = class_attention_maps(model, image)
    maps = jnp.concatenate([maps, jnp.mean(maps, axis=1, keepdims=True)], axis=1)
    return _upsample(maps, model.config.image_size, upsample)


def load_image(
    path: str | os.PathLike,
    config: CaiTConfig,
    *,
    normalize: Literal["imagenet", "none"] = "none",
) -> tuple[Float[Array, "channels height width"], Float[np.ndarray, "height width *rgb"]]:
    """Read an image file as a model input, and the same picture for display.

    - `normalize="none"` (models trained with `cait-eqx train`): converted to the model's channels (1:
        greyscale, 3: RGB), resized (bilinear) to `config.image_size` and scaled to `[0, 1]`, as the
        image-folder reader of `cait_eqx.data` prepares training images.
    - `normalize="imagenet"` (the official weights): `cait_eqx.preprocess`, timm's evaluation transform for
        CaiT (bicubic resize of the shorter side, centre crop, ImageNet mean and standard deviation).

    **Arguments:**

    - `path`: the image file.
    - `config`: the model's `CaiTConfig` (`model.config`).
    - `normalize`: `"none"` or `"imagenet"`. (Keyword only argument.)

    **Returns:** `(image, display)`: the `(channels, height, width)` float32 model input, and the picture the
    model sees as a NumPy array in `[0, 1]`, `(height, width)` for greyscale or `(height, width, 3)`.
    """
    from PIL import Image

    from ._preprocess import preprocess

    modes = {1: "L", 3: "RGB"}
    if config.channels not in modes:
        raise ValueError(
            f"Can only read images for models with 1 or 3 input channels, this model has {config.channels}; "
            f"build the input array yourself and call `plot_class_attention` with it."
        )
    if normalize not in ("imagenet", "none"):
        raise ValueError(f"`normalize` must be 'imagenet' or 'none', got {normalize!r}.")
    if normalize == "imagenet" and config.channels != 3:
        raise ValueError("ImageNet normalisation needs a 3-channel model; use normalize='none'.")
    height, width = config.image_size
    with Image.open(path) as img:
        img.load()
        if normalize == "imagenet":
            image = preprocess(img, config.image_size)
            mean = np.asarray(IMAGENET_MEAN, np.float32)
            std = np.asarray(IMAGENET_STD, np.float32)
            display = np.asarray(image).transpose(1, 2, 0) * std + mean
            return image, np.clip(display, 0.0, 1.0)
        img = img.convert(modes[config.channels])
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    chw = pixels[None, :, :] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return jnp.asarray(chw), pixels


def _display_from_input(image: np.ndarray) -> np.ndarray:
    """A model input rescaled to [0, 1] per channel, channels last (or 2-D for one channel)."""
    low = image.min(axis=(1, 2), keepdims=True)
    high = image.max(axis=(1, 2), keepdims=True)
    scaled = (image - low) / np.maximum(high - low, 1e-12)
    if scaled.shape[0] == 1:
        return scaled[0]
    if scaled.shape[0] == 3:
        return scaled.transpose(1, 2, 0)
    return scaled.mean(axis=0)


def _save_figure(fig, out: str | os.PathLike, dpi: int) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(out, buffer.getvalue())


def plot_class_attention(
    model: CaiT,
    image: Float[Array, "channels height width"],
    out: str | os.PathLike,
    *,
    display: Float[np.ndarray, "height width *rgb"] | None = None,
    upsample: Literal["nearest", "bilinear"] = "nearest",
    alpha: float = 0.6,
    cmap: str = "inferno",
    panel_inches: float = 2.0,
    dpi: int = 100,
) -> Path:
    """Draw the class-attention maps of one image and write them as a PNG.

    One row per class-attention block; the columns are the input image, each head's map overlaid on the
    image, and the mean over heads. Each panel's colour scale runs from 0 to that map's maximum.

    **Arguments:**

    - `model`: a `CaiT` with at least one class-attention block.
    - `image`: the model input, `(channels, height, width)`.
    - `out`: the PNG file to write (atomically; parent folders are created).
    - `display`: the picture to draw under the maps, `(height, width)` or `(height, width, 3)` in `[0, 1]`
        (e.g. the second output of `load_image`); by default the input rescaled to `[0, 1]`. (Keyword only.)
    - `upsample`: see `attention_heatmaps`. (Keyword only argument.)
    - `alpha`, `cmap`: opacity and matplotlib colour map of the heat maps. (Keyword only arguments.)
    - `panel_inches`, `dpi`: size of each panel in inches and resolution of the PNG. (Keyword only arguments.)

    **Returns:** the path of the PNG.
    """
    from matplotlib.figure import Figure

    heat = np.asarray(jax.device_get(attention_heatmaps(model, image, upsample=upsample)), dtype=np.float32)
    if display is None:
        display = _display_from_input(np.asarray(jax.device_get(image), dtype=np.float32))
    if tuple(display.shape[:2]) != tuple(model.config.image_size):
        raise ValueError(
            f"`display` must have the model's image size {model.config.image_size}, "
            f"got {tuple(display.shape[:2])}."
        )
    blocks, maps = heat.shape[:2]
    height, width = model.config.image_size
    aspect = width / height
    fig = Figure(
        figsize=((maps + 1) * panel_inches * aspect, blocks * panel_inches * 1.15), layout="constrained"
    )
    axes = fig.subplots(blocks, maps + 1, squeeze=False)
    grey = {"cmap": "gray"} if display.ndim == 2 else {}
    for b in range(blocks):
        for col in range(maps + 1):
            ax = axes[b, col]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(display, interpolation="nearest", vmin=0.0, vmax=1.0, **grey)
            if col == 0:
                ax.set_title(f"CA block {b + 1}: input", fontsize=8)
                continue
            panel = heat[b, col - 1]
            ax.imshow(
                panel,
                cmap=cmap,
                alpha=alpha,
                interpolation="nearest",
                vmin=0.0,
                vmax=max(float(panel.max()), 1e-12),
            )
            label = "mean of heads" if col == maps else f"head {col}"
            ax.set_title(f"block {b + 1}, {label}", fontsize=8)
    return _save_figure(fig, out, dpi)


# ------------------------------------------------------------------------------------------ training curves


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The metrics a training run recorded, to draw: `cait_eqx.training.Run(path).metrics()`, never empty.

    **Arguments:**

    - `path`: the run directory, or its metrics file (`Run.METRICS_FILE`).

    **Returns:** the records in file order, each a dict with at least `"step"` and `"split"` (an incomplete
    last line, left by a run killed mid-write, is skipped).

    **Raises:** `FileNotFoundError` when the run has no metrics file; `ValueError` when it holds no record
    yet, or a line that is not one (naming its number).
    """
    path = Path(path)
    run = Run(path.parent if path.name == Run.METRICS_FILE and not path.is_dir() else path)
    records = run.metrics()
    if not records:
        raise ValueError(f"{run.metrics_path} holds no metrics yet.")
    return records


def _series(records: Sequence[dict], split: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    points = [
        (r["step"], r[field])
        for r in records
        if r["split"] == split
        and isinstance(r.get(field), (int, float))
        and not isinstance(r.get(field), bool)
    ]
    if not points:
        return np.zeros((0,)), np.zeros((0,))
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def plot_training_curves(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, dpi: int = 100
) -> Path:
    """Draw a run's loss, accuracy, learning-rate and throughput curves and write them as a PNG.

    Reads the run's metrics (`read_metrics`), records `{"step", "epoch", "split": "train" | "test", "loss",
    "accuracy", "lr", "images_per_s"}` (the last two for training records only). `cait-eqx train` draws them
    at the end of a run; `cait-eqx plot RUN_DIR` on demand.

    **Arguments:**

    - `run_dir`: the run directory.
    - `out`: the PNG to write; defaults to the run's own (`cait_eqx.training.Run.curves_path`).
    - `dpi`: resolution of the PNG. (Keyword only argument.)

    **Returns:** the path of the PNG.
    """
    run = Run(run_dir)
    records = read_metrics(run_dir)
    out = run.curves_path if out is None else Path(out)
    return _save_figure(_curves_figure(records, Path(run_dir).name), out, dpi)


def _curves_figure(records: Sequence[dict], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    (ax_loss, ax_acc), (ax_lr, ax_speed) = fig.subplots(2, 2)
    styles = {"train": {"lw": 1.0, "alpha": 0.8}, "test": {"lw": 1.5, "marker": "o", "ms": 3}}
    for ax, field, name in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for split in ("train", "test"):
            steps, values = _series(records, split, field)
            if steps.size:
                ax.plot(steps, values, label=split, **styles[split])
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend()
    steps, losses = _series(records, "train", "loss")
    if steps.size and np.all(losses > 0) and losses.max() / losses.min() > 10:
        ax_loss.set_yscale("log")
    for ax, field, name in (
        (ax_lr, "lr", "learning rate"),
        (ax_speed, "images_per_s", "throughput (images/s)"),
    ):
        steps, values = _series(records, "train", field)
        if steps.size:
            ax.plot(steps, values, lw=1.0)
        else:
            ax.text(0.5, 0.5, f"no '{field}' recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
    tests = [r for r in records if r["split"] == "test" and isinstance(r.get("accuracy"), (int, float))]
    if tests:
        final = tests[-1]
        fig.suptitle(f"{title}: final test accuracy {100 * final['accuracy']:.2f}% at step {final['step']}")
    else:
        fig.suptitle(title)
    return fig
