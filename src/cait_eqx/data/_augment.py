"""Image preprocessing and augmentation in JAX, one image at a time, every draw from a key the caller passes.

Augmentation runs on the device inside the training step (`jax.vmap` over the batch with one key per
image), so the randomness is a pure function of the step's key: runs are reproducible and resume exactly,
whatever the data-loading threads do.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Shaped

from .._constants import ERASE_MODES, IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS

__all__ = [
    "NORMALIZATIONS",
    "Augment",
    "erase_box",
    "normalize_images",
    "random_crop",
    "random_erasing",
    "random_flip",
    "to_unit_float",
]



def to_unit_float(
    images: Shaped[Array, "*batch channels height width"],
) -> Float[Array, "*batch channels height width"]:
    """Pixels as float32 in `[0, 1]`: `uint8` images are divided by 255, floating ones are cast."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / jnp.float32(255.0)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"Images must be uint8 (0..255) or floating (0..1), got dtype {images.dtype}.")
    return images.astype(jnp.float32)


def normalize_images(
    images: Float[Array, "*batch channels height width"], normalize: str = "none"
) -> Float[Array, "*batch channels height width"]:
    """Apply the input normalisation to `[0, 1]` images: `"none"` (identity) or `"imagenet"` (mean/std)."""
    if normalize == "none":
        return images
    if normalize == "imagenet":
        if images.shape[-3] != 3:
            raise ValueError(f"ImageNet normalisation needs 3 channels, got {images.shape[-3]}; use 'none'.")
        mean = jnp.asarray(IMAGENET_MEAN, images.dtype).reshape(3, 1, 1)
        std = jnp.asarray(IMAGENET_STD, images.dtype).reshape(3, 1, 1)
        lead = (1,) * (images.ndim - 3)
        return (images - mean.reshape(lead + mean.shape)) / std.reshape(lead + std.shape)
    raise ValueError(f"`normalize` must be one of {NORMALIZATIONS}, got {normalize!r}.")


def random_crop(
    image: Float[Array, "channels height width"], *, key: PRNGKeyArray, padding: int
) -> Float[Array, "channels height width"]:
    """Pad by `padding` zero pixels on every side, then cut out a random window of the original size.

    Every offset in `[0, 2 * padding]` along each axis is equally likely (a shift of up to `padding` pixels).
    """
    if padding == 0:
        return image
    channels, height, width = image.shape
    padded = jnp.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    top, left = jr.randint(key, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (jnp.zeros((), top.dtype), top, left), (channels, height, width))


def random_flip(
    image: Float[Array, "channels height width"], *, key: PRNGKeyArray
) -> Float[Array, "channels height width"]:
    """Mirror left–right with probability one half."""
    return jnp.where(jr.bernoulli(key), image[:, :, ::-1], image)


def erase_box(
    image: Float[Array, "channels height width"],
    top: Int[ArrayLike, ""],
    left: Int[ArrayLike, ""],
    height: Int[ArrayLike, ""],
    width: Int[ArrayLike, ""],
    values: Float[Array, " channels #height #width"],
) -> Float[Array, "channels height width"]:
    """Overwrite the box `[top, top + height) x [left, left + width)` of every channel with `values`.

    The box may be traced (its size too: it is a mask, not a slice) and may be empty. `values` is read at the
    box's own pixels: a full `(channels, height, width)` array (per-pixel values) or `(channels, 1, 1)`
    (one value per channel).
    """
    _, rows, cols = image.shape
    row = jnp.arange(rows).reshape(rows, 1)
    col = jnp.arange(cols).reshape(1, cols)
    inside = (row >= top) & (row < top + height) & (col >= left) & (col < left + width)
    return jnp.where(inside.reshape(1, rows, cols), values.astype(image.dtype), image)


def random_erasing(
    image: Float[Array, "channels height width"],
    *,
    key: PRNGKeyArray,
    probability: float = 0.25,
    mode: str = "pixel",
    count: int = 1,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> Float[Array, "channels height width"]:
    """Random erasing as timm's `RandomErasing` (DeiT's, after normalisation), for one image.

    With probability `probability` the image gets between 1 and `count` boxes (uniformly many), erased in
    turn. Each box has an area fraction uniform in `[min_area, max_area] / n` (for `n` boxes) and an aspect
    ratio (height / width) log-uniform in `[min_aspect, max_aspect]`; of ten such draws the first whose box
    is smaller than the image on both sides is placed uniformly at random (if none is, that box is
    skipped). Shapes are fixed (the draws are vectorised, the box is a mask), so it jits and vmaps:
    `jax.vmap(lambda x, k: random_erasing(x, key=k))(images, keys)` for a batch.

    **Arguments:**

    - `image`: one normalised `(channels, height, width)` image.
    - `key`: a `jax.random.key` for this image. (Keyword only argument, like all that follow.)
    - `probability`: the chance the image is erased at all.
    - `mode`: what fills a box: `"pixel"` (a standard normal value per pixel and channel), `"rand"` (one
        per channel) or `"const"` (zeros).
    - `count`: the largest number of boxes per image (timm's `max_count`).
    - `min_area`, `max_area`: the range of a box's area, a fraction of the image's.
    - `min_aspect`, `max_aspect`: the range of a box's height / width; `max_aspect=None` is `1 / min_aspect`.

    **Returns:** the image with its boxes erased, same shape and dtype.
    """
    if isinstance(probability, bool) or not (isinstance(probability, (int, float)) and 0 <= probability <= 1):
        raise ValueError(f"`probability` must be in [0, 1] (0 switches erasing off), got {probability!r}.")
    if mode not in ERASE_MODES:
        raise ValueError(f"`mode` must be one of {ERASE_MODES}, got {mode!r}.")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` (the most boxes per image) must be an int >= 1, got {count!r}.")
    if not 0 < min_area <= max_area <= 1:
        raise ValueError(f"Need 0 < min_area <= max_area <= 1, got min_area={min_area}, max_area={max_area}.")
    max_aspect = 1 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
    if not (0 < min_aspect and max_aspect is not None and min_aspect <= max_aspect):
        raise ValueError(
            f"Need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}."
        )
    if probability == 0:
        return image
    channels, height, width = image.shape
    draw_key, fill_key = jr.split(key)
    # Every uniform draw at once (one call compiles in half the time of one per draw): per box, ten
    # attempts' areas and aspects, then its top and left; last row: whether to erase, and how many boxes.
    u = jr.uniform(draw_key, (count + 1, 22))
    erase = u[count, 0] < probability
    boxes = 1 + jnp.minimum(jnp.floor(u[count, 1] * count), count - 1).astype(jnp.int32)
    area = (min_area + (max_area - min_area) * u[:count, :10]) * (height * width) / boxes.astype(jnp.float32)
    log_min, log_max = math.log(min_aspect), math.log(max_aspect)
    aspect = jnp.exp(log_min + (log_max - log_min) * u[:count, 10:20])
    box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (box_h < height) & (box_w < width)
    first = jnp.argmax(fits, axis=1, keepdims=True)  # each box's first attempt that fits (0 if none does)
    box_h = jnp.take_along_axis(box_h, first, axis=1)[:, 0]
    box_w = jnp.take_along_axis(box_w, first, axis=1)[:, 0]

    def place(v, room):  # uniform in [0, room]
        return jnp.minimum(jnp.floor(v * (room + 1)), room).astype(jnp.int32)

    top, left = place(u[:count, 20], height - box_h), place(u[:count, 21], width - box_w)
    if mode == "pixel":
        values = jr.normal(fill_key, (count, channels, height, width), image.dtype)
    elif mode == "rand":
        values = jr.normal(fill_key, (count, channels, 1, 1), image.dtype)
    else:
        values = jnp.zeros((count, channels, 1, 1), image.dtype)
    active = erase & fits.any(axis=1) & (jnp.arange(count) < boxes)
    for i in range(count):  # in turn: a later box overwrites an earlier one where they overlap
        erased = erase_box(image, top[i], left[i], box_h[i], box_w[i], values[i])
        image = jnp.where(active[i], erased, image)
    return image


class Augment(eqx.Module):
    """The training-time augmentation of one image: random crop with zero padding, then an optional flip.

    Flips suit natural photographs; leave them off for digits and text, whose mirror images are other
    symbols. With `crop_padding=0` and `flip=False` this is the identity and draws nothing.
    """

    crop_padding: int = eqx.field(static=True, default=0)
    flip: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if (
            isinstance(self.crop_padding, bool)
            or not isinstance(self.crop_padding, int)
            or self.crop_padding < 0
        ):
            raise ValueError(f"`crop_padding` must be an int >= 0, got {self.crop_padding!r}.")
        if not isinstance(self.flip, bool):
            raise ValueError(f"`flip` must be a bool, got {self.flip!r}.")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip

    def __call__(
        self, image: Float[Array, "channels height width"], *, key: PRNGKeyArray
    ) -> Float[Array, "channels height width"]:
        """**Arguments:**

        - `image`: one `(channels, height, width)` image.
        - `key`: a `jax.random.key` for this image. (Keyword only argument.)

        **Returns:** the augmented image, same shape.
        """
        crop_key, flip_key = jr.split(key)
        image = random_crop(image, key=crop_key, padding=self.crop_padding)
        if self.flip:
            image = random_flip(image, key=flip_key)
        return image
