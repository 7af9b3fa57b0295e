"""One `uint8` image `(channels, height, width)` through PIL, in NumPy and PIL alone (no JAX, no torch): its
checks, the bridge to PIL pictures, and timm's evaluation resize and centre crop.

The one home of `eval_resize_crop`: `preprocess` (a photo for a pretrained model) and the data workers'
`EvalTransform` both call it, so the two cannot drift apart; `data/`'s other image operations build on the
same checks and bridge. It sits at the bottom of the weights layer, the lowest that needs it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from jaxtyping import UInt8
from PIL import Image

from ._config import image_size_pair
from ._constants import INTERPOLATIONS

__all__ = [
    "RESAMPLING",
    "channel_pictures",
    "check_crop_pct",
    "check_image",
    "check_interpolation",
    "eval_resize_crop",
    "from_pil",
    "join_pictures",
    "to_pil",
]

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# ------------------------------------------------------------------------------------------ image checks


def check_image(image: Any, what: str) -> np.ndarray:
    """`image` itself if it is a `uint8` array `(channels, height, width)`, else a clear error."""
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"`{what}` takes a NumPy uint8 array (channels, height, width), got {type(image).__name__}. "
            f"For a PIL image use `np.asarray(pil).transpose(2, 0, 1)` (RGB) or `np.asarray(pil)[None]` (L)."
        )
    if image.dtype != np.uint8:
        raise TypeError(
            f"`{what}` takes uint8 images (values 0-255), got dtype {image.dtype}. Convert first, e.g. "
            f"`(x * 255).round().astype(np.uint8)` for floats in [0, 1]."
        )
    if image.ndim != 3:
        hint = " For one greyscale (height, width) image use `image[None]`." if image.ndim == 2 else ""
        raise ValueError(
            f"`{what}` takes one image of shape (channels, height, width), got shape {image.shape}.{hint}"
        )
    if min(image.shape) == 0:
        raise ValueError(f"`{what}` got an empty image, shape {image.shape}.")
    if image.shape[-1] in (1, 3) and image.shape[0] not in (1, 3):
        raise ValueError(
            f"`{what}` takes channels first (channels, height, width); shape {image.shape} looks channels "
            f"last. Use `image.transpose(2, 0, 1)`."
        )
    return image


def check_interpolation(interpolation: Any) -> Image.Resampling:
    """PIL's filter for an interpolation name of `INTERPOLATIONS`, else a clear error."""
    if interpolation not in RESAMPLING:
        raise ValueError(f"`interpolation` must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    return RESAMPLING[interpolation]


def check_crop_pct(crop_pct: Any) -> float:
    """`crop_pct` as a float if it lies in (0, 1], else an error that says what it means."""
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real) or not 0.0 < crop_pct <= 1.0:
        raise ValueError(
            f"`crop_pct` must be in (0, 1] (the fraction of the resized image the centre crop keeps: 0.875 "
            f"for DeiT's evaluation, 1.0 for CaiT's weights), got {crop_pct!r}."
        )
    return float(crop_pct)


# ------------------------------------------------------------------------------------------ PIL bridge


def to_pil(image: np.ndarray) -> Image.Image:
    """A 1- or 3-channel image as PIL mode "L" or "RGB"."""
    if image.shape[0] == 1:
        return Image.fromarray(image[0])
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))


def from_pil(picture: Image.Image) -> np.ndarray:
    """A PIL picture ("L" or "RGB") as a `uint8` array `(channels, height, width)`."""
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None].copy() if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def channel_pictures(image: np.ndarray) -> list[Image.Image]:
    """One PIL image (L or RGB) for 1 or 3 channels; one "L" image per channel otherwise."""
    if image.shape[0] in (1, 3):
        return [to_pil(image)]
    return [Image.fromarray(channel) for channel in image]


def join_pictures(pictures: list[Image.Image]) -> np.ndarray:
    """The inverse of `channel_pictures`: one image `(channels, height, width)` from its pictures."""
    if len(pictures) == 1:
        return from_pil(pictures[0])
    return np.stack([np.asarray(p, dtype=np.uint8) for p in pictures])


# ------------------------------------------------------------------------------- evaluation resize, crop


def eval_resize_crop(
    image: np.ndarray,
    size: int | tuple[int, int],
    crop_pct: float | int = 0.875,
    interpolation: str = "bicubic",
) -> UInt8[np.ndarray, "channels out_height out_width"]:
    """timm's evaluation resize and centre crop: the geometric part of `create_transform(is_training=False)`.

    The image is resized so that it just covers `floor(size / crop_pct)` with its aspect ratio kept (for a
    square `size`: the shorter side becomes `floor(size / crop_pct)`, the longer one is scaled and rounded
    down, as torchvision's `Resize(int)`; otherwise the scale factor is the smaller of the two and sides
    are rounded, as timm's `ResizeKeepRatio`), then the centre `size` is cut out (zero padding first if the
    resized image is smaller, as torchvision's `CenterCrop`). `cait_eqx.preprocess` runs it on one RGB
    photo (bicubic) and normalises the result; `cait_eqx.data.EvalTransform` runs it in the data workers.

    **Arguments:**

    - `image`: a `uint8` image `(channels, height, width)`, any number of channels.
    - `size`: the output size, an int or `(height, width)`.
    - `crop_pct`: the fraction of the resized image the centre crop keeps, in (0, 1].
    - `interpolation`: `"bicubic"`, `"bilinear"` or `"nearest"`.

    **Returns:** a `uint8` image `(channels, *size)`.
    """
    image = check_image(image, "eval_resize_crop")
    out_h, out_w = image_size_pair(size, "size")
    crop_pct = check_crop_pct(crop_pct)
    resample = check_interpolation(interpolation)
    _, height, width = image.shape
    target_h, target_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if target_h == target_w:
        short, long = min(height, width), max(height, width)
        new_short, new_long = target_h, int(target_h * long / short)
        new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        factor = min(height / target_h, width / target_w)
        new_h, new_w = round(height / factor), round(width / factor)
    if (new_h, new_w) != (height, width):
        image = join_pictures([p.resize((new_w, new_h), resample) for p in channel_pictures(image)])
    pad_h, pad_w = max(out_h - new_h, 0), max(out_w - new_w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)))
    top = int(round((image.shape[1] - out_h) / 2.0))
    left = int(round((image.shape[2] - out_w) / 2.0))
    return np.ascontiguousarray(image[:, top : top + out_h, left : left + out_w])
