"""Image operations for the data workers, one `uint8` image `(channels, height, width)` at a time, in NumPy
and PIL (no JAX, no torch): torchvision's random-resized crop and flips, and the checks and fills that
`_rand_augment` and `_transforms` share. The image check, the PIL bridge and timm's evaluation
resize-and-crop (`eval_resize_crop`) live one layer down, in `cait_eqx._pil`, which `preprocess` shares.

Geometric operations take any number of channels (PIL works on each channel as a greyscale picture);
colour operations exist in PIL for greyscale and RGB only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import UInt8
from PIL import Image

from .._config import image_size_pair
from .._pil import channel_pictures, check_image, check_interpolation, join_pictures

__all__ = [
    "hflip",
    "resized_crop",
    "rrc_params",
    "vflip",
]

# ------------------------------------------------------------------------------------------ value checks


def check_range(name: str, value: Any, *, upper: float | None = None) -> tuple[float, float]:
    """A `(low, high)` pair of reals with `0 < low <= high` (and `high <= upper` when given)."""
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    )
    if ok:
        low, high = float(value[0]), float(value[1])
        ok = 0.0 < low <= high and (upper is None or high <= upper)
    if not ok:
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"`{name}` must be a pair (low, high) with 0 < low <= high{bound}, got {value!r}.")
    return low, high


def check_probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1] (0 switches it off), got {value!r}.")
    return float(value)


def mean_to_fill(mean: Any) -> tuple[int, ...]:
    """Per-channel means in [0, 1] → the fill colour timm gives RandAugment: `round(255 * mean)`."""
    if (
        not isinstance(mean, (tuple, list))
        or len(mean) not in (1, 3)
        or not all(isinstance(m, numbers.Real) and not isinstance(m, bool) and 0 <= m <= 1 for m in mean)
    ):
        raise ValueError(f"`mean` must be 1 or 3 per-channel means in [0, 1], got {mean!r}.")
    return tuple(min(255, round(255 * float(m))) for m in mean)


# ------------------------------------------------------------------------------------------ PIL bridge


def check_colour_channels(channels: int, what: str) -> None:
    if channels not in (1, 3):
        raise ValueError(
            f"`{what}` is a colour operation that PIL defines for greyscale and RGB only: it takes 1 or 3 "
            f"channels, got {channels}. Leave it out for {channels}-channel images (geometric operations "
            f"take any number of channels)."
        )


def channel_fills(fill: tuple[int, ...], channels: int) -> list[int | tuple[int, ...]]:
    """The fill colour of each picture `channel_pictures` makes of a `channels`-channel image: `fill` holds
    one
    value (every channel), one per channel, or an RGB colour for a greyscale image (its grey, ITU-R 601-2
    luma, as PIL converts the whole image)."""
    if len(fill) == 1:
        return [fill * 3] if channels == 3 else [fill[0]] * channels
    if channels == 1 and len(fill) == 3:
        return [Image.new("RGB", (1, 1), fill).convert("L").getpixel((0, 0))]
    if len(fill) != channels:
        raise ValueError(
            f"The fill colour {fill} has {len(fill)} values for a {channels}-channel image: give one value "
            f"(every channel) or {channels}."
        )
    return [fill] if channels == 3 else list(fill)


# --------------------------------------------------------------------------------- crops, flips, resizes


def rrc_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float | int] = (0.08, 1.0),
    ratio: Sequence[float | int] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """The box of a random-resized crop, drawn as torchvision's `RandomResizedCrop.get_params` draws it.

    Up to ten attempts: an area fraction uniform in `scale`, an aspect ratio (width / height) log-uniform
    in `ratio`; the first box that fits in the image is placed uniformly at random. If none fits, the box is
    the centred crop of the whole image with its aspect ratio clamped into `ratio`.

    **Arguments:**

    - `rng`: the generator every draw comes from.
    - `height`, `width`: the image's size.
    - `scale`: the range of the crop's area as a fraction of the image's, `0 < low <= high <= 1`.
    - `ratio`: the range of the crop's aspect ratio (width / height), `0 < low <= high`.

    **Returns:** `(top, left, crop_height, crop_width)`, a box inside the image.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"`rng` must be a np.random.Generator, got {type(rng).__name__}.")
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 1:
            raise ValueError(f"`{name}` must be a positive int, got {side!r}.")
    scale = check_range("scale", scale, upper=1.0)
    ratio = check_range("ratio", ratio)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    image_ratio = width / height
    if image_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
    image: np.ndarray,
    top: int,
    left: int,
    height: int,
    width: int,
    size: int | tuple[int, int],
    interpolation: str = "bicubic",
) -> UInt8[np.ndarray, "channels out_height out_width"]:
    """Cut out a box and resize it with PIL, as torchvision's `F.resized_crop` does to a PIL image.

    **Arguments:**

    - `image`: a `uint8` image `(channels, height, width)`, any number of channels.
    - `top`, `left`, `height`, `width`: the box, inside the image (e.g. from `rrc_params`).
    - `size`: the output size, an int (square) or `(height, width)`.
    - `interpolation`: `"bicubic"`, `"bilinear"` or `"nearest"` (PIL's filters, antialiased).

    **Returns:** a `uint8` image `(channels, *size)`.
    """
    image = check_image(image, "resized_crop")
    out_h, out_w = image_size_pair(size, "size")
    resample = check_interpolation(interpolation)
    _, image_h, image_w = image.shape
    box = (top, left, height, width)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in box) or not (
        0 <= top and 0 <= left and height >= 1 and width >= 1 and top + height <= image_h
        and left + width <= image_w
    ):
        raise ValueError(
            f"The box (top, left, height, width) = {box} is not inside the {image_h}x{image_w} image: it "
            f"must hold at least one pixel and end within the image."
        )
    crop = image[:, top : top + height, left : left + width]
    if (height, width) == (out_h, out_w):
        return np.ascontiguousarray(crop)
    pictures = channel_pictures(np.ascontiguousarray(crop))
    return join_pictures([p.resize((out_w, out_h), resample) for p in pictures])


def hflip(image: np.ndarray) -> UInt8[np.ndarray, "channels height width"]:
    """Mirror left–right (PIL's `FLIP_LEFT_RIGHT`)."""
    return np.ascontiguousarray(check_image(image, "hflip")[:, :, ::-1])


def vflip(image: np.ndarray) -> UInt8[np.ndarray, "channels height width"]:
    """Mirror top–bottom (PIL's `FLIP_TOP_BOTTOM`)."""
    return np.ascontiguousarray(check_image(image, "vflip")[:, ::-1, :])
