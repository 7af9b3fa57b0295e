"""Image operations for the data workers, one `uint8` image `(channels, height, width)` at a time, in NumPy
and PIL (no JAX, no torch): torchvision's random-resized crop and flips, timm's evaluation resize-and-crop,
and the checks and the PIL bridge that `_rand_augment` and `_transforms` share.

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
from .._constants import INTERPOLATIONS

__all__ = [
    "eval_resize_crop",
    "hflip",
    "resized_crop",
    "rrc_params",
    "vflip",
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
    if interpolation not in RESAMPLING:
        raise ValueError(f"`interpolation` must be one of {INTERPOLATIONS}, got {interpolation!r}.")
    return RESAMPLING[interpolation]


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


def to_pil(image: np.ndarray) -> Image.Image:
    """A 1- or 3-channel image as PIL mode "L" or "RGB"."""
    if image.shape[0] == 1:
        return Image.fromarray(image[0])
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))


def from_pil(picture: Image.Image) -> np.ndarray:
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None].copy() if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def channel_pictures(image: np.ndarray) -> list[Image.Image]:
    """One PIL image (L or RGB) for 1 or 3 channels; one "L" image per channel otherwise."""
    if image.shape[0] in (1, 3):
        return [to_pil(image)]
    return [Image.fromarray(channel) for channel in image]


def join_pictures(pictures: list[Image.Image]) -> np.ndarray:
    if len(pictures) == 1:
        return from_pil(pictures[0])
    return np.stack([np.asarray(p, dtype=np.uint8) for p in pictures])


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


def check_crop_pct(crop_pct: Any) -> float:
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real) or not 0.0 < crop_pct <= 1.0:
        raise ValueError(
            f"`crop_pct` must be in (0, 1] (the fraction of the resized image the centre crop keeps: 0.875 "
            f"for DeiT's evaluation, 1.0 for CaiT's weights), got {crop_pct!r}."
        )
    return float(crop_pct)


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
    resized image is smaller, as torchvision's `CenterCrop`). `cait_eqx.preprocess` does the same to one
    RGB photo and also normalises it.

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


