"""DeiT's train-time and evaluation transforms (timm's), one `uint8` image at a time, in NumPy and PIL.

They run in the data-loading worker processes, so they are NumPy and PIL alone (no JAX, no torch). Every
draw comes from the `np.random.Generator` the caller passes (the pipeline seeds one per example from its
place in the stream), so a transformed image is a pure function of that generator: the same bytes whatever
the workers.

Images are `uint8` arrays `(channels, height, width)`. Geometric operations (crops, flips, rotations, shears,
translations) take any number of channels; the photometric ones (RandAugment's colour operations) exist in
PIL for greyscale and RGB only, so they take 1 or 3 channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jaxtyping import UInt8

from .._config import image_size_pair
from .._constants import IMAGENET_MEAN
from .._pil import check_crop_pct, check_image, check_interpolation, eval_resize_crop
from ._image_ops import check_probability, check_range, hflip, mean_to_fill, resized_crop, rrc_params, vflip
from ._rand_augment import RandAugment

__all__ = [
    "EvalTransform",
    "TrainTransform",
]

# ---------------------------------------------------------------------------------------- the transforms


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """DeiT's per-image training transform (timm's `transforms_imagenet_train` up to the tensor):
    random-resized crop, flips, then RandAugment.

    Picklable, so the data worker processes can run it; `transform(image, rng)` draws everything from `rng`.
    Normalisation and random erasing come later, on the device (`cait_eqx.data.random_erasing`).

    **Arguments:**

    - `image_size`: the output size, an int or `(height, width)`.
    - `scale`: the crop's area range, a fraction of the image (`rrc_params`).
    - `ratio`: the crop's aspect-ratio range, width / height.
    - `interpolation`: the filter of the crop's resize and of RandAugment's geometric operations.
    - `hflip`: the probability of a left–right mirror.
    - `vflip`: the probability of a top–bottom mirror.
    - `rand_augment`: a RandAugment config string (`RandAugment.from_config`), or `None` for none.
    - `mean`: per-channel means in [0, 1], whose `round(255 * mean)` fills what RandAugment uncovers.
    """

    image_size: int | tuple[int, int]
    scale: Sequence[float | int] = (0.08, 1.0)
    ratio: Sequence[float | int] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float | int = 0.5
    vflip: float | int = 0.0
    rand_augment: str | None = None
    mean: Sequence[float | int] = IMAGENET_MEAN
    _rand_augment: RandAugment | None = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        # Frozen: the checked, normalised values are set once here (a pair of ints, floats, tuples).
        def settle(name, value):
            object.__setattr__(self, name, value)

        settle("image_size", image_size_pair(self.image_size))
        settle("scale", check_range("scale", self.scale, upper=1.0))
        settle("ratio", check_range("ratio", self.ratio))
        check_interpolation(self.interpolation)
        settle("hflip", check_probability("hflip", self.hflip))
        settle("vflip", check_probability("vflip", self.vflip))
        settle("mean", tuple(self.mean) if isinstance(self.mean, (tuple, list)) else self.mean)
        mean_to_fill(self.mean)
        if self.rand_augment is not None:
            augment = RandAugment.from_config(
                self.rand_augment, self.image_size, mean=self.mean, interpolation=self.interpolation
            )
            settle("_rand_augment", augment)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> UInt8[np.ndarray, "channels out_height out_width"]:
        """**Arguments:**

        - `image`: a `uint8` image `(channels, height, width)` at its own size (1 or 3 channels with
            RandAugment, any number without).
        - `rng`: this image's generator, e.g. `np.random.default_rng([seed, index])`.

        **Returns:** a `uint8` image `(channels, *image_size)`.
        """
        image = check_image(image, "TrainTransform")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"`rng` must be a np.random.Generator (e.g. np.random.default_rng([seed, index])), got "
                f"{type(rng).__name__}."
            )
        _, height, width = image.shape
        box = rrc_params(rng, height, width, self.scale, self.ratio)
        image = resized_crop(image, *box, self.image_size, self.interpolation)
        if self.hflip > 0 and rng.random() < self.hflip:
            image = hflip(image)
        if self.vflip > 0 and rng.random() < self.vflip:
            image = vflip(image)
        if self._rand_augment is not None:
            image = self._rand_augment(image, rng)
        return image


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """timm's per-image evaluation transform up to the tensor: resize, then centre crop (`eval_resize_crop`).

    Picklable; `transform(image, rng=None)` takes (and ignores) a generator, so it fits where the training
    transform does.

    **Arguments:**

    - `image_size`: the output size, an int or `(height, width)`.
    - `crop_pct`: the fraction of the resized image kept, in (0, 1] (DeiT: 0.875; CaiT's weights: 1.0).
    - `interpolation`: `"bicubic"`, `"bilinear"` or `"nearest"`.
    """

    image_size: int | tuple[int, int]
    crop_pct: float | int = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "image_size", image_size_pair(self.image_size))
        object.__setattr__(self, "crop_pct", check_crop_pct(self.crop_pct))
        check_interpolation(self.interpolation)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator | None = None
    ) -> UInt8[np.ndarray, "channels out_height out_width"]:
        """The resized, centre-cropped `uint8` image `(channels, *image_size)`."""
        del rng
        return eval_resize_crop(image, self.image_size, self.crop_pct, self.interpolation)
