"""Image preprocessing and augmentation in JAX, one image at a time, every draw from a key the caller passes.

Augmentation runs on the device inside the training step (`jax.vmap` over the batch with one key per
image), so the randomness is a pure function of the step's key: runs are reproducible and resume exactly,
whatever the data-loading threads do.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from .._constants import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS

__all__ = ["NORMALIZATIONS", "Augment", "normalize_images", "random_crop", "random_flip", "to_unit_float"]



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
