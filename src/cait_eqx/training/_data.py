"""What `fit` asks of the data: the per-image transform its recipe names, and the `check_data` pass."""

from __future__ import annotations

import logging
from typing import Any

from ..data import BadImageError, find_bad_images
from ._config import TrainConfig

__all__ = ["check_images", "train_transform"]

logger = logging.getLogger("cait_eqx")

# How many unreadable files an error message lists before it only counts the rest.
_LISTED = 20


def train_transform(config: TrainConfig, image_size: tuple[int, int]) -> Any:
    """The per-image transform the data workers run for `config`, or `None` when it names none.

    `resized_crop`: DeiT's random-resized crop to `image_size` (`TrainTransform`), then RandAugment when
    `auto_augment` names it. RandAugment alone: each image resized to `image_size` (bilinear, as the sources
    read) and then augmented. Flips are the training step's (`flip`, on the device), not the workers'.
    """
    if not config.resized_crop and config.auto_augment is None:
        return None
    from ..data import RandAugment, TrainTransform

    if config.resized_crop:
        return TrainTransform(
            image_size=tuple(image_size),
            scale=(config.crop_scale, 1.0),
            ratio=(1.0 / config.crop_ratio, config.crop_ratio),
            interpolation=config.interpolation,
            hflip=0.0,
            rand_augment=config.auto_augment,
        )
    size = tuple(image_size)
    augment = RandAugment.from_config(config.auto_augment, size, interpolation=config.interpolation)
    return _ResizedRandAugment(size, augment)


class _ResizedRandAugment:
    """RandAugment on images first resized to one size (picklable, for the data workers)."""

    def __init__(self, image_size: tuple[int, int], augment: Any):
        self.image_size, self.augment = image_size, augment

    def __call__(self, image, rng):
        from ..data._decode import resize_images

        if image.shape[1:] != self.image_size:
            image = resize_images(image[None], self.image_size)[0]
        return self.augment(image, rng)


def check_images(train_data: Any, test_data: Any, config: TrainConfig) -> tuple[Any, Any]:
    """The `check_data` pass: read every image of both splits once (in `config.data_workers` workers).

    With `config.bad_images == "error"` raise `cait_eqx.data.BadImageError` listing every file that fails
    (`paths` holds them all); with `"skip"` leave them out (logged, with the count). `fit` runs it when
    `config.check_data` is set; a source that passed is marked (`checked`) and not read again.

    **Returns:** `(train_data, test_data)`, without the unreadable images.
    """
    parts = []
    for data in (train_data, test_data):
        if data is None:
            parts.append((data, []))
            continue
        bad = find_bad_images(data, workers=config.data_workers)
        parts.append((data, bad))
    found = [(data, index, reason) for data, bad in parts for index, reason in bad]
    if not found:
        logger.info("check_data: every image reads")
        _mark_checked(train_data, test_data)
        return train_data, test_data
    if config.bad_images == "error":
        paths = [data.describe(index) for data, index, _ in found]
        listed = "\n".join(f"  {reason}" for _, _, reason in found[:_LISTED])
        more = f"\n  ... and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
        raise BadImageError(
            f"{len(found)} image(s) cannot be read:\n{listed}{more}\nFix or remove them, or leave them out "
            f"with bad_images='skip' (CLI: --bad-images skip).",
            paths,
        )
    out = []
    for data, bad in parts:
        if data is None or not bad:
            out.append(data)
            continue
        import numpy as np

        keep = np.setdiff1d(np.arange(len(data)), [index for index, _ in bad])
        logger.warning(
            "check_data: left out %d unreadable image(s) of %s, e.g. %s", len(bad), data.name,
            data.describe(bad[0][0]),
        )
        out.append(data.subset(keep, data.name))
    _mark_checked(*out)
    return out[0], out[1]


def _mark_checked(*sources: Any) -> None:
    for source in sources:
        if source is not None and hasattr(source, "checked"):
            source.checked = True
