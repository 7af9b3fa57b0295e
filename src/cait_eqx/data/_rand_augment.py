"""RandAugment as timm's (`rand-m9-mstd0.5-inc1`, DeiT's): its operation lists, the level → argument function
of each operation, and the sampling, in NumPy and PIL for the data workers. Every draw comes from the
`np.random.Generator` passed in.

It is one room, though over 400 lines: the 23 operations, their level → argument functions and the
sampler form one table, tested entry by entry against timm's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from jaxtyping import UInt8
from PIL import Image, ImageEnhance, ImageOps

from .._config import image_size_pair
from .._constants import IMAGENET_MEAN
from .._pil import RESAMPLING, channel_pictures, check_image, check_interpolation, join_pictures
from ._image_ops import channel_fills, check_colour_channels, check_probability, mean_to_fill

__all__ = [
    "RAND_AUGMENT_OPS",
    "AugmentOp",
    "RandAugment",
]

# ------------------------------------------------------------------------------------------- RandAugment

_LEVEL_DENOM = 10.0  # timm's magnitude scale: M10 is each operation's full strength


def _affine(picture: Image.Image, matrix: tuple, fill, resample) -> Image.Image:
    return picture.transform(picture.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _rotate(picture, fill, resample, degrees):
    return picture.rotate(degrees, resample=resample, fillcolor=fill)


def _shear_x(picture, fill, resample, factor):
    return _affine(picture, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(picture, fill, resample, factor):
    return _affine(picture, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x(picture, fill, resample, pixels):
    return _affine(picture, (1, 0, pixels, 0, 1, 0), fill, resample)


def _translate_y(picture, fill, resample, pixels):
    return _affine(picture, (1, 0, 0, 0, 1, pixels), fill, resample)


def _posterize(picture, bits):
    if bits >= 8:
        return picture
    if bits <= 0:
        # Keep no bit: black. Old PIL gave that for 0 bits; recent Pillow refuses 0, which would make timm's
        # own op raise whenever PosterizeIncreasing draws magnitude 10 (or Posterize one below 2.5).
        return Image.new(picture.mode, picture.size, 0)
    return ImageOps.posterize(picture, bits)


def _solarize_add(picture, add, threshold=128):
    table = [min(255, i + add) if i < threshold else i for i in range(256)]
    return picture.point(table * len(picture.getbands()))


def _enhance(kind):
    return lambda picture, factor: kind(picture).enhance(factor)


def _negate(value: float, negate: bool) -> float:
    return -value if negate else value


# Level (magnitude, 0-10) → the operation's argument, with timm's scales. `negate` flips the sign of the
# signed operations (drawn with probability one half).
def _rotate_level(op, level, negate):
    return _negate((level / _LEVEL_DENOM) * 30.0, negate)  # [-30, 30] degrees


def _shear_level(op, level, negate):
    return _negate((level / _LEVEL_DENOM) * 0.3, negate)


def _translate_rel_level(op, level, negate):
    return _negate((level / _LEVEL_DENOM) * op.translate_pct, negate)  # a fraction of the side


def _translate_abs_level(op, level, negate):
    return _negate((level / _LEVEL_DENOM) * float(op.translate_const), negate)


def _enhance_level(op, level, negate):
    return (level / _LEVEL_DENOM) * 1.8 + 0.1  # [0.1, 1.9]


def _enhance_increasing_level(op, level, negate):
    return max(0.1, 1.0 + _negate((level / _LEVEL_DENOM) * 0.9, negate))  # away from 1 (no change)


def _posterize_level(op, level, negate):
    return int((level / _LEVEL_DENOM) * 4)  # bits kept, [0, 4]


def _posterize_increasing_level(op, level, negate):
    return 4 - _posterize_level(op, level, negate)


def _solarize_level(op, level, negate):
    return min(256, int((level / _LEVEL_DENOM) * 256))  # threshold, [0, 256]


def _solarize_increasing_level(op, level, negate):
    return 256 - _solarize_level(op, level, negate)


def _solarize_add_level(op, level, negate):
    return min(128, int((level / _LEVEL_DENOM) * 110))


@dataclasses.dataclass(frozen=True)
class _OpKind:
    apply: Callable[..., Image.Image]
    level: Callable[..., Any] | None  # None: the operation has no argument
    signed: bool = False
    geometric: bool = False  # takes the fill colour and filter; any number of channels


_ENHANCE = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
}
_KINDS: dict[str, _OpKind] = {
    "AutoContrast": _OpKind(ImageOps.autocontrast, None),
    "Equalize": _OpKind(ImageOps.equalize, None),
    "Invert": _OpKind(ImageOps.invert, None),
    "Rotate": _OpKind(_rotate, _rotate_level, signed=True, geometric=True),
    "Posterize": _OpKind(_posterize, _posterize_level),
    "PosterizeIncreasing": _OpKind(_posterize, _posterize_increasing_level),
    "Solarize": _OpKind(ImageOps.solarize, _solarize_level),
    "SolarizeIncreasing": _OpKind(ImageOps.solarize, _solarize_increasing_level),
    "SolarizeAdd": _OpKind(_solarize_add, _solarize_add_level),
    **{name: _OpKind(_enhance(kind), _enhance_level) for name, kind in _ENHANCE.items()},
    **{
        f"{name}Increasing": _OpKind(_enhance(kind), _enhance_increasing_level, signed=True)
        for name, kind in _ENHANCE.items()
    },
    "ShearX": _OpKind(_shear_x, _shear_level, signed=True, geometric=True),
    "ShearY": _OpKind(_shear_y, _shear_level, signed=True, geometric=True),
    "TranslateX": _OpKind(_translate_x, _translate_abs_level, signed=True, geometric=True),
    "TranslateY": _OpKind(_translate_y, _translate_abs_level, signed=True, geometric=True),
    "TranslateXRel": _OpKind(_translate_x, _translate_rel_level, signed=True, geometric=True),
    "TranslateYRel": _OpKind(_translate_y, _translate_rel_level, signed=True, geometric=True),
}

RAND_AUGMENT_OPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "default": (
        "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    ),
    "increasing": (
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    ),
})
"""timm's two RandAugment operation lists: `"default"` (`inc0`) and `"increasing"` (`inc1`, DeiT's), where
posterize, solarize and the enhancements grow stronger with the magnitude."""

_IMAGENET_FILL = mean_to_fill(IMAGENET_MEAN)  # (124, 116, 104)


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """One RandAugment operation with timm's magnitude schedule (timm's `AugmentOp`).

    Called on an image, it is applied with probability `probability`; its magnitude is drawn from a normal
    distribution around `magnitude` with deviation `magnitude_std` (uniform in `[0, magnitude]` when the
    deviation is infinite; fixed when 0) and clipped to `[0, magnitude_max]`; the signed operations (rotate,
    shear, translate, the increasing enhancements) then flip their argument's sign with probability one
    half. Levels map to arguments as timm's: rotate up to 30 degrees, shear up to 0.3, translate up to
    `translate_pct` of the side (`...Rel`) or `translate_const` pixels, enhancement factors `0.1 + 1.8 m/10`
    (increasing: `1 ± 0.9 m/10`), posterize to `4 m/10` bits (increasing: `4 - 4 m/10`; 0 bits is black),
    solarize above `256 m/10` (increasing: `256 - 256 m/10`), solarize-add `110 m/10` below 128.

    **Arguments:**

    - `name`: one of timm's operation names, e.g. `"Rotate"`, `"SolarizeIncreasing"`: those listed in
        `cait_eqx.data.RAND_AUGMENT_OPS`, plus `"TranslateX"` and `"TranslateY"` (in pixels).
    - `magnitude`: the level, 0 to 10 (timm's `M`).
    - `probability`: the chance the operation is applied at all.
    - `magnitude_std`: the magnitude's standard deviation (timm's `mstd`); `math.inf`: uniform.
    - `magnitude_max`: the magnitude's upper clip (timm's `mmax`, 10 by default).
    - `fill`: the colour of the pixels a geometric operation uncovers, 0-255 per channel (1 or 3 values,
        or one per channel): `round(255 * mean)`, ImageNet's mean by default, as timm's factory sets it.
    - `interpolation`: the geometric operations' filter, `"bicubic"`, `"bilinear"` or `"nearest"`.
    - `translate_pct`: the largest relative translation, a fraction of the side.
    - `translate_const`: the largest absolute translation, in pixels (timm's factory: 45% of the image).
    """

    name: str
    magnitude: float | int = 10
    probability: float | int = 0.5
    magnitude_std: float | int = 0
    magnitude_max: float | int = 10
    fill: tuple[int, ...] = _IMAGENET_FILL
    interpolation: str = "bicubic"
    translate_pct: float | int = 0.45
    translate_const: int = 100

    def __post_init__(self):
        if self.name not in _KINDS:
            raise ValueError(f"Unknown augmentation {self.name!r}; known: {', '.join(_KINDS)}.")
        for field in ("magnitude", "magnitude_std", "magnitude_max", "translate_pct", "translate_const"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                raise ValueError(f"AugmentOp `{field}` must be a number >= 0, got {value!r}.")
        check_probability("probability", self.probability)
        check_interpolation(self.interpolation)
        if (
            not isinstance(self.fill, tuple)
            or not self.fill
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in self.fill)
        ):
            raise ValueError(f"AugmentOp `fill` must be a tuple of ints in 0-255, got {self.fill!r}.")

    @property
    def geometric(self) -> bool:
        """Whether the operation moves pixels (then any number of channels), rather than recolours them."""
        return _KINDS[self.name].geometric

    def draw(self, rng: np.random.Generator) -> tuple[float, bool] | None:
        """The random part of one call: `None` if the operation is skipped, else `(magnitude, negate)`."""
        if self.probability < 1.0 and rng.random() > self.probability:
            return None
        magnitude = float(self.magnitude)
        if self.magnitude_std == math.inf:
            magnitude = float(rng.uniform(0.0, magnitude))
        elif self.magnitude_std > 0:
            magnitude = float(rng.normal(magnitude, self.magnitude_std))
        magnitude = max(0.0, min(magnitude, float(self.magnitude_max)))
        negate = bool(rng.random() > 0.5) if _KINDS[self.name].signed else False
        return magnitude, negate

    def argument(self, magnitude: float | int, negate: bool = False) -> Any:
        """The operation's argument at level `magnitude` (degrees, factor, bits...); `None` if it has none."""
        kind = _KINDS[self.name]
        return None if kind.level is None else kind.level(self, magnitude, negate)

    def _apply_pictures(
        self, pictures: list[Image.Image], channels: int, magnitude: float | int, negate: bool
    ) -> list[Image.Image]:
        kind = _KINDS[self.name]
        argument = self.argument(magnitude, negate)
        if kind.geometric:
            resample = RESAMPLING[self.interpolation]
            fills = channel_fills(self.fill, channels)
            if self.name.endswith("Rel"):  # a fraction of the width (X) or height (Y)
                side = pictures[0].size[0 if self.name == "TranslateXRel" else 1]
                argument = argument * side
            return [kind.apply(p, fill, resample, argument) for p, fill in zip(pictures, fills, strict=True)]
        check_colour_channels(channels, self.name)
        return [kind.apply(pictures[0]) if argument is None else kind.apply(pictures[0], argument)]

    def apply(
        self, image: np.ndarray, magnitude: float | int, negate: bool = False
    ) -> UInt8[np.ndarray, "channels height width"]:
        """The operation at a fixed level and sign, no randomness.

        **Arguments:**

        - `image`: a `uint8` image `(channels, height, width)`: 1 or 3 channels, any number for the
            geometric operations.
        - `magnitude`: the level, used as given (no clipping).
        - `negate`: flip the sign of a signed operation's argument.

        **Returns:** the transformed image, same shape.
        """
        image = check_image(image, self.name)
        pictures = self._apply_pictures(channel_pictures(image), image.shape[0], magnitude, negate)
        return join_pictures(pictures)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> UInt8[np.ndarray, "channels height width"]:
        """Apply with probability `probability`, at a drawn magnitude and sign (`draw`)."""
        image = check_image(image, self.name)
        drawn = self.draw(rng)
        return image if drawn is None else self.apply(image, *drawn)


def _parse_number(section: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"RandAugment config section {section!r} needs {'an int' if kind is int else 'a number'} after "
            f"its name, got {text!r}."
        ) from None


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """RandAugment as timm's `RandAugment`: `num_layers` operations drawn uniformly (with replacement) from
    `ops` and applied in turn, each with its own probability, magnitude and sign (`AugmentOp`).

    Build it from timm's config string with `RandAugment.from_config`.

    **Arguments:**

    - `ops`: the operations to choose from.
    - `num_layers`: how many are drawn per image (timm's `n`, 2 by default).
    """

    ops: tuple[AugmentOp, ...]
    num_layers: int = 2

    def __post_init__(self):
        ops = self.ops
        if not isinstance(ops, tuple) or not ops or not all(isinstance(op, AugmentOp) for op in ops):
            raise ValueError(f"RandAugment `ops` must be a non-empty tuple of AugmentOp, got {self.ops!r}.")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"RandAugment `num_layers` must be an int >= 0, got {self.num_layers!r}.")

    @classmethod
    def from_config(
        cls,
        config_str: str,
        image_size: int | tuple[int, int],
        *,
        mean: Sequence[float | int] = IMAGENET_MEAN,
        interpolation: str = "bicubic",
    ) -> RandAugment:
        """timm's `rand_augment_transform(config_str, hparams)` with the hyper-parameters timm's transform
        factory passes for training (DeiT's recipe: `"rand-m9-mstd0.5-inc1"`).

        The string is `rand` then dash-separated sections in any order: `m<int>` magnitude (10), `n<int>`
        operations per image (2), `mstd<float>` magnitude deviation (0; above 100: uniform), `mmax<int>`
        magnitude clip (10; 0 keeps 10), `inc<0|1>` the increasing operation list (0), `p<float>` each
        operation's probability (0.5).

        **Arguments:**

        - `config_str`: the config string, e.g. `"rand-m9-mstd0.5-inc1"`.
        - `image_size`: the size of the images it sees (after the crop): the absolute translations reach
            45% of its shorter side (timm's `translate_const`).
        - `mean`: per-channel means in [0, 1]; the fill colour is `round(255 * mean)`. (Keyword only
            argument.)
        - `interpolation`: the geometric operations' filter, as the random-resized crop's. (Keyword only
            argument.)

        **Returns:** a `RandAugment`.

        **Raises:** `ValueError` naming the section for a malformed string or an unknown section.
        """
        if not isinstance(config_str, str):
            raise ValueError(f"A RandAugment config must be a string like 'rand-m9-mstd0.5-inc1', got "
                             f"{config_str!r}.")
        sections = config_str.split("-")
        if sections[0] != "rand":
            raise ValueError(f"A RandAugment config starts with 'rand' (e.g. 'rand-m9-mstd0.5-inc1'), got "
                             f"{config_str!r}.")
        size = image_size_pair(image_size)
        magnitude, num_layers, increasing, probability = 10, 2, False, 0.5
        magnitude_std, magnitude_max = 0.0, 10
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", section)
            key, value = match.groups() if match else (section, "")
            if key == "m":
                magnitude = _parse_number(section, value, int)
            elif key == "n":
                num_layers = _parse_number(section, value, int)
            elif key == "mstd":
                magnitude_std = _parse_number(section, value, float)
                magnitude_std = math.inf if magnitude_std > 100 else magnitude_std
            elif key == "mmax":
                magnitude_max = _parse_number(section, value, int) or 10
            elif key == "inc":
                increasing = bool(_parse_number(section, value, int))
            elif key == "p":
                probability = _parse_number(section, value, float)
            else:
                raise ValueError(
                    f"Unknown RandAugment config section {section!r} in {config_str!r}; known: "
                    f"m<magnitude>, n<layers>, mstd<std>, mmax<max>, inc<0|1>, p<probability> (e.g. "
                    f"'rand-m9-mstd0.5-inc1')."
                )
        names = RAND_AUGMENT_OPS["increasing" if increasing else "default"]
        fill = mean_to_fill(tuple(mean))
        ops = tuple(
            AugmentOp(
                name, magnitude, probability, magnitude_std=magnitude_std, magnitude_max=magnitude_max,
                fill=fill, interpolation=interpolation, translate_const=int(min(size) * 0.45),
            )
            for name in names
        )
        return cls(ops, num_layers)

    def draw(self, rng: np.random.Generator) -> list[tuple[AugmentOp, float, bool]]:
        """The random part of one call: the operations applied, in order, with their magnitudes and signs."""
        chosen = rng.integers(0, len(self.ops), size=self.num_layers)
        plan = []
        for index in chosen.tolist():
            op = self.ops[index]
            drawn = op.draw(rng)
            if drawn is not None:
                plan.append((op, *drawn))
        return plan

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> UInt8[np.ndarray, "channels height width"]:
        """**Arguments:**

        - `image`: a `uint8` image `(channels, height, width)`, 1 or 3 channels (any number if every
            operation is geometric).
        - `rng`: the generator every draw comes from.

        **Returns:** the augmented image, same shape.
        """
        image = check_image(image, "RandAugment")
        channels = image.shape[0]
        if channels not in (1, 3):
            colour = [op.name for op in self.ops if not op.geometric]
            if colour:
                raise ValueError(
                    f"RandAugment's colour operations ({', '.join(colour)}) take 1 or 3 channels (PIL's "
                    f"greyscale and RGB), got {channels}. Switch RandAugment off for {channels}-channel "
                    f"images."
                )
        plan = self.draw(rng)
        if not plan:
            return image
        pictures = channel_pictures(image)
        for op, magnitude, negate in plan:
            pictures = op._apply_pictures(pictures, channels, magnitude, negate)
        return join_pictures(pictures)


