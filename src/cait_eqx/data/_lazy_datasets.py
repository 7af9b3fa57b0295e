"""Datasets read lazily, one example at a time: image folders (the file list only) and memory-mapped arrays.

An in-memory `Dataset` and these sources answer the same questions (`len`, `labels`, `class_names`,
`channels`, `image_size`, `read(indices)`, `read_native(index)`, `subset(indices)`), so the training
pipeline, the evaluation and the held-out split take either. What a lazy source holds in memory is its
file list or its array's header: pixels are decoded where a batch is built, in the data workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Integer, Shaped

from .._config import image_size_pair
from ._decode import GREY_MODES, IMAGE_SUFFIXES, read_image, resize_images, to_mode

__all__ = [
    "ArraySource",
    "ImageFolderSource",
    "LazySource",
    "SubsetSource",
    "open_arrays",
    "scan_image_folder",
]


class LazySource:
    """What every lazy source shares: labels and class names in memory, pixels read on demand.

    `scan_image_folder`, `open_arrays` and `subset` make them; `DataSource` is a `Dataset` or one of them.
    Subclasses set `labels`, `class_names`, `name`, `channels`, `image_size` and implement `read_native`.
    """

    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    channels: int
    image_size: tuple[int, int]
    # Set by the `check_data` pass once every example has been read: `find_bad_images` skips it then.
    checked: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self, index: int) -> str:
        """Where example `index` comes from, for messages."""
        return f"example {index} of {self.name}"

    def read_native(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def read(self, indices: Integer[np.ndarray, " m"]) -> Shaped[np.ndarray, "m channels height width"]:
        """The examples at `indices`, at the source's `image_size` (bilinear resize where they differ)."""
        out = None
        for row, index in enumerate(np.asarray(indices).tolist()):
            pixels = self.read_native(index)
            if pixels.shape[1:] != self.image_size:
                pixels = resize_images(pixels[None], self.image_size)[0]
            if out is None:
                out = np.empty((len(indices), *pixels.shape), pixels.dtype)
            out[row] = pixels
        if out is None:
            return np.empty((0, self.channels, *self.image_size), np.uint8)
        return out

    def subset(self, indices: Integer[np.ndarray, " m"], name: str | None = None) -> SubsetSource:
        """The examples at `indices`, in that order (nothing is read)."""
        return SubsetSource(self, np.asarray(indices, np.int64), name or self.name)


class SubsetSource(LazySource):
    """Some examples of a lazy source, in a given order (what `train_test_split` makes of one)."""

    def __init__(self, parent: LazySource, indices: np.ndarray, name: str):
        if isinstance(parent, SubsetSource):  # one level of indirection, whatever the nesting
            indices, parent = parent.indices[indices], parent.parent
        self.parent, self.indices, self.name = parent, indices, name
        self.labels = parent.labels[indices]
        self.class_names, self.channels = parent.class_names, parent.channels
        self.image_size = parent.image_size

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))

    def read_native(self, index: int) -> np.ndarray:
        return self.parent.read_native(int(self.indices[index]))

    def read(self, indices):
        return self.parent.read(self.indices[np.asarray(indices)])


class ImageFolderSource(LazySource):
    """A folder of images, one sub-folder per class, read file by file when an example is asked for.

    Built by `scan_image_folder`, which lists the files without decoding them. `read_native(i)` decodes
    file `i` in the source's mode (greyscale for 1 channel, RGB for 3: transparency flattened onto black,
    16-bit greyscale scaled to 8 bits) at its own size; `read` resizes to `image_size` (bilinear), as
    `load_image_folder` does.
    """

    def __init__(
        self,
        root: Path,
        files: np.ndarray,
        labels: np.ndarray,
        class_names: tuple[str, ...],
        channels: int,
        image_size: tuple[int, int],
        fixed_size: bool,
    ):
        self.root, self.files, self.labels = root, files, labels
        self.class_names, self.channels, self.image_size = class_names, channels, image_size
        self.fixed_size = fixed_size  # every image must have `image_size` (none was asked for)
        self.name = root.name or "folder"

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode()

    def describe(self, index: int) -> str:
        return str(self.path(index))

    def read_native(self, index: int) -> np.ndarray:
        path = self.path(index)
        img = read_image(path)
        if self.channels == 1 and img.mode not in GREY_MODES:
            raise ValueError(
                f"{path} is a colour image ({img.mode}) but the folder was read as greyscale (its first "
                f"image is): the folder mixes modes. Pass channels=3 (CLI: --channels 3) to read every "
                f"image as RGB, or channels=1 to convert them all to greyscale."
            )
        if self.fixed_size and (img.size[1], img.size[0]) != self.image_size:
            raise ValueError(
                f"{path} is {img.size[0]}×{img.size[1]} but the folder's images are "
                f"{self.image_size[1]}×{self.image_size[0]} (width×height, from its first image). Pass "
                f"image_size (CLI: --image-size) to resize them all."
            )
        pixels = np.asarray(to_mode(img, "L" if self.channels == 1 else "RGB"), dtype=np.uint8)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def scan_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> ImageFolderSource:
    """List a folder laid out as `load_image_folder` expects (`root/<class_name>/<image>`), decoding nothing.

    The classes, the files and their order are `load_image_folder`'s; the images stay on disk and are read
    when an example is asked for (by the training pipeline's workers). Only the first image is opened here.

    **Arguments:**

    - `root`: the folder holding one sub-folder per class.
    - `image_size`: the size `read` gives (bilinear resize); `None`: the first image's size, which every
        image must then have. (Keyword only argument.)
    - `channels`: 1 or 3; `None`: 1 if the first image is greyscale, else 3 (a colour image in a folder
        read as greyscale is then an error). (Keyword only argument.)

    **Returns:** an `ImageFolderSource`.

    **Raises:** `FileNotFoundError` if `root` is not a folder; `ValueError` naming the folder for a class
    folder without images, and naming the file if the first image cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root} (expected root/<class_name>/<image files>).")
    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be 1, 3 or None (infer), got {channels!r}.")
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"No class folders in {root}: put each class's images in a sub-folder named after the class, "
            f"e.g. {root}/cat/001.png."
        )
    names: list[bytes] = []
    counts: list[int] = []
    for class_name in class_dirs:
        files = sorted(
            e.name
            for e in os.scandir(root / class_name)
            if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(
                f"Class folder {root / class_name} holds no image files (looked for "
                f"{', '.join(IMAGE_SUFFIXES)}). Remove the folder or add its images."
            )
        names.extend(f"{class_name}/{f}".encode() for f in files)
        counts.append(len(files))
    files_array = np.array(names)  # fixed-width bytes: a few bytes per file, not a Python object each
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int32), counts)
    first = read_image(root / names[0].decode())
    if channels is None:
        channels = 1 if first.mode in GREY_MODES else 3
    size = (first.size[1], first.size[0]) if image_size is None else image_size_pair(image_size)
    return ImageFolderSource(
        root, files_array, labels, tuple(class_dirs), channels, size, fixed_size=image_size is None
    )


class ArraySource(LazySource):
    """Images in a `.npy` file, memory-mapped: only the rows a batch needs are read from disk.

    Built by `open_arrays`. Pickled (into data workers) by path, never by its pixels.
    """

    def __init__(
        self,
        path: Path,
        labels: np.ndarray,
        class_names: tuple[str, ...],
        name: str,
        image_size: tuple[int, int] | None = None,
    ):
        self.path, self.labels, self.class_names, self.name = path, labels, class_names, name
        self.images = np.load(path, mmap_mode="r")
        self.channels = int(self.images.shape[1])
        self.native_size = (int(self.images.shape[2]), int(self.images.shape[3]))
        self.image_size = self.native_size if image_size is None else image_size

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["images"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.images = np.load(self.path, mmap_mode="r")

    def describe(self, index: int) -> str:
        return f"row {index} of {self.path}"

    def read_native(self, index: int) -> np.ndarray:
        return np.array(self.images[index])

    def read(self, indices):
        if self.image_size != self.native_size:
            return super().read(indices)
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")  # rows in file order: sequential reads
        out = np.empty((len(indices), *self.images.shape[1:]), self.images.dtype)
        out[order] = self.images[indices[order]]
        return out


def open_arrays(
    images: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> ArraySource:
    """Open images stored as a `.npy` file without reading them: a memory map, rows read as batches need them.

    **Arguments:**

    - `images`: a `.npy` file of `(n, channels, height, width)` `uint8` images (channels first, any number
        of channels), or a folder holding `images.npy` and `labels.npy` (and optionally `class_names.txt`,
        one name per line).
    - `image_size`: the size `read` gives (bilinear resize of the rows read); `None`: the stored size.
        (Keyword only argument.)
    - `labels`: a `.npy` file of `n` integer labels (read into memory); `None` with a folder.
    - `class_names`: the classes' names; default `class_names.txt` beside the images, else `"0", "1", ...`.
        (Keyword only argument.)

    **Returns:** an `ArraySource`.

    **Raises:** `FileNotFoundError` for a missing file; `ValueError` (what was found, how to convert it) for
    images that are not `uint8` of 4 axes with channels first, or labels that do not match them.
    """
    where = Path(images)
    if where.is_dir():
        folder, where = where, where / "images.npy"
        if labels is None:
            labels = folder / "labels.npy"
    if labels is None:
        raise ValueError(
            f"`labels` is needed with an images file ({where}); or pass the folder holding both."
        )
    for path in (where, Path(labels)):
        if not path.is_file():
            raise FileNotFoundError(f"NumPy array file not found: {path}")
    try:
        array = np.load(where, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot memory-map {where} as a NumPy .npy array: {error}") from None
    convert = (
        f"Convert it once, e.g. `np.save({where.name!r}, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))` "
        f"for (n, height, width, channels) images, or `(x * 255).round().astype(np.uint8)` for floats in "
        f"[0, 1]."
    )
    if array.dtype != np.uint8:
        raise ValueError(f"{where} holds {array.dtype} images; memory-mapped images must be uint8. {convert}")
    if array.ndim != 4:
        raise ValueError(
            f"{where} holds an array of shape {array.shape}; memory-mapped images must be (n, channels, "
            f"height, width). {convert}"
        )
    if array.shape[1] > 4 and array.shape[3] <= 4:
        raise ValueError(
            f"{where} has shape {array.shape}, which looks channels-last (n, height, width, channels); "
            f"memory-mapped images must be channels first. {convert}"
        )
    if not array.flags.c_contiguous:
        raise ValueError(f"{where} is stored in Fortran order; save it C-contiguous. {convert}")
    label_array = np.load(labels, allow_pickle=False)
    if label_array.shape != (array.shape[0],) or not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(
            f"{labels} must hold {array.shape[0]} integer labels (one per image of {where}), got shape "
            f"{label_array.shape} and dtype {label_array.dtype}."
        )
    label_array = label_array.astype(np.int32)
    names_file = where.parent / "class_names.txt"
    if class_names is None and names_file.is_file():
        class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if class_names is None:
        class_names = [str(i) for i in range(int(label_array.max(initial=0)) + 1)]
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(class_names)):
        raise ValueError(
            f"{labels} holds labels from {label_array.min()} to {label_array.max()} but there are "
            f"{len(class_names)} class names: labels must lie in [0, {len(class_names)})."
        )
    del array
    name = where.parent.name if where.name == "images.npy" else where.stem
    size = None if image_size is None else image_size_pair(image_size)
    return ArraySource(where, label_array, tuple(str(c) for c in class_names), name, size)
