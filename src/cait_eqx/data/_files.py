"""Your own data: image folders, in-memory arrays and `.npz` files, and `load_dataset` for the CLI's specs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Integer, Shaped

from .._config import image_size_pair
from ._datasets import Dataset, load_digits, load_mnist, resized_to
from ._decode import GREY_MODES, IMAGE_SUFFIXES, read_image, to_mode
from ._lazy_datasets import open_arrays, scan_image_folder

__all__ = ["load_arrays", "load_dataset", "load_image_folder", "load_images", "load_npz"]


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> Dataset:
    """Read a folder of images laid out one sub-folder per class: `root/<class_name>/<image>.png|jpg|...`.

    Classes are the sub-folder names in sorted order (label `i` is the `i`-th name). Files are taken by suffix
    (`IMAGE_SUFFIXES`, any case) in sorted order; other files and hidden entries are ignored. Images are
    converted to greyscale (`channels=1`) or RGB (`channels=3`; an alpha channel is dropped).

    **Arguments:**

    - `root`: the folder holding one sub-folder per class.
    - `image_size`: resize every image to this size (bilinear); with `None` all images must already share
        one size. (Keyword only argument.)
    - `channels`: 1 or 3; `None` picks 1 if every image is greyscale, else 3. (Keyword only argument.)

    **Returns:** a `Dataset` of `uint8` images `(n, channels, height, width)`.

    **Raises:** `FileNotFoundError` if `root` is not a folder; `ValueError`, naming the file or folder, for a
    class folder without images, a file that cannot be read as an image, or (without `image_size`) images
    of different sizes.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root} (expected root/<class_name>/<image files>).")
    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be 1, 3 or None (infer), got {channels!r}.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"No class folders in {root}: put each class's images in a sub-folder named after the class, "
            f"e.g. {root}/cat/001.png."
        )
    size = None if image_size is None else image_size_pair(image_size)
    pictures: list[tuple[Path, int, Image.Image]] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(
                f"Class folder {class_dir} holds no image files (looked for {', '.join(IMAGE_SUFFIXES)}). "
                f"Remove the folder or add its images."
            )
        pictures.extend((path, label, read_image(path)) for path in files)
    if channels is None:
        channels = 1 if all(img.mode in GREY_MODES for _, _, img in pictures) else 3
    mode = "L" if channels == 1 else "RGB"
    if size is None:
        first_path, _, first = pictures[0]
        for path, _, img in pictures:
            if img.size != first.size:
                raise ValueError(
                    f"Images differ in size: {first_path} is {first.size[0]}×{first.size[1]} but {path} is "
                    f"{img.size[0]}×{img.size[1]} (width×height). Pass `image_size` (CLI: --image-size) to "
                    f"resize them all."
                )
        size = (first.size[1], first.size[0])
    height, width = size
    images = np.empty((len(pictures), channels, height, width), np.uint8)
    for i, (_, _, img) in enumerate(pictures):
        images[i] = _pixels(img, mode, size)
    labels = np.asarray([label for _, label, _ in pictures], np.int32)
    return Dataset(images, labels, tuple(p.name for p in class_dirs), root.name or "folder")


def load_images(
    paths: Sequence[str | os.PathLike], *, image_size: int | tuple[int, int], channels: int
) -> Shaped[np.ndarray, "n channels height width"]:
    """Read image files as `load_image_folder` reads a dataset's: what a model trained on a folder expects.

    Each image is converted to greyscale (`channels=1`) or RGB (`channels=3`; transparency flattened onto
    black, 16-bit greyscale scaled to 8 bits), then resized bilinearly to `image_size`.

    **Arguments:**

    - `paths`: the image files, in the order wanted.
    - `image_size`: the output size, an int or `(height, width)`. (Keyword only argument.)
    - `channels`: 1 or 3. (Keyword only argument.)

    **Returns:** `uint8` images `(n, channels, height, width)` (pixels 0..255; `to_unit_float` scales them).

    **Raises:** `ValueError` naming the file for one that cannot be read as an image, and for `channels`
    other than 1 or 3 (image files hold greyscale or RGB pixels).
    """
    if channels not in (1, 3):
        raise ValueError(
            f"Image files give greyscale (1 channel) or RGB (3 channels) pixels; cannot make {channels!r}-"
            f"channel images of them. Load such data with `load_arrays` or `load_npz` instead."
        )
    size = image_size_pair(image_size)
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(paths), channels, *size), np.uint8)
    for i, path in enumerate(paths):
        images[i] = _pixels(read_image(Path(path)), mode, size)
    return images


def _pixels(img, mode: str, size: tuple[int, int]) -> np.ndarray:
    """A PIL image as `uint8` `(channels, height, width)` in `mode` ("L" or "RGB"), bilinearly resized."""
    from PIL import Image

    img = to_mode(img, mode)
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_arrays(
    images: Shaped[np.ndarray, "n ..."],
    labels: Integer[np.ndarray, " n"],
    *,
    class_names: Sequence[str] | None = None,
    layout: str = "auto",
    name: str = "arrays",
) -> Dataset:
    """Wrap NumPy arrays as a `Dataset`.

    **Arguments:**

    - `images`: `(n, height, width)` greyscale, or `(n, channels, height, width)` / `(n, height, width,
        channels)` with 1, 3 or 4 channels; `uint8` in `[0, 255]` or floating in `[0, 1]`.
    - `labels`: `(n,)` integers in `[0, num_classes)`.
    - `class_names`: names of the classes; default `"0", "1", ...` up to the largest label.
        (Keyword only argument.)
    - `layout`: `"nchw"`, `"nhwc"`, or `"auto"` (decided by which axis has 1, 3 or 4 entries; ambiguous
        shapes are an error asking for `layout`). (Keyword only argument.)
    - `name`: a name for messages. (Keyword only argument.)

    **Returns:** a `Dataset` with channels-first images (a 4th, alpha, channel is dropped).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if layout not in ("auto", "nchw", "nhwc"):
        raise ValueError(f"`layout` must be 'auto', 'nchw' or 'nhwc', got {layout!r}.")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        first, last = images.shape[1] in (1, 3, 4), images.shape[3] in (1, 3, 4)
        if layout == "auto":
            if first and last:
                raise ValueError(
                    f"Cannot tell the channel axis of images with shape {images.shape}: pass "
                    f"layout='nchw' or layout='nhwc'."
                )
            if not (first or last):
                raise ValueError(
                    f"Images of shape {images.shape} have no channel axis of size 1, 3 or 4 (expected "
                    f"(n, C, H, W) or (n, H, W, C))."
                )
            layout = "nchw" if first else "nhwc"
        if layout == "nhwc":
            images = images.transpose(0, 3, 1, 2)
        if images.shape[1] == 4:
            images = images[:, :3]
    else:
        raise ValueError(
            f"`images` must have shape (n, H, W), (n, C, H, W) or (n, H, W, C), got {images.ndim} axes "
            f"{images.shape}."
        )
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(
                f"`images` must be uint8 (0..255) or floating (0..1), got dtype {images.dtype}; convert "
                f"integer images with `images.astype(np.uint8)` or `images / 255.0`."
            )
        images = images.astype(np.float32)
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(
                f"Floating `images` must lie in [0, 1], got values from {images.min():g} to "
                f"{images.max():g}; "
                f"divide 0..255 pixels by 255 (or pass them as uint8)."
            )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}."
        )
    if class_names is None:
        count = int(labels.max()) + 1 if labels.size else 1
        class_names = tuple(str(i) for i in range(count))
    return Dataset(
        np.ascontiguousarray(images), labels.astype(np.int32), tuple(str(c) for c in class_names), name
    )


def load_npz(path: str | os.PathLike, *, layout: str = "auto") -> Dataset:
    """Read a `.npz` file holding `images` (or `x`) and `labels` (or `y`), optionally `class_names`.

    The arrays follow `load_arrays`' rules. Pickled objects are refused (`allow_pickle=False`).

    **Arguments:**

    - `path`: the `.npz` file.
    - `layout`: as in `load_arrays`. (Keyword only argument.)

    **Returns:** a `Dataset`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NumPy archive not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read {path} as a NumPy .npz archive: {error}") from None
    with archive:
        keys = set(archive.files)
        image_key = next((k for k in ("images", "x", "X") if k in keys), None)
        label_key = next((k for k in ("labels", "y", "Y") if k in keys), None)
        if image_key is None or label_key is None:
            raise ValueError(
                f"{path} must hold arrays named 'images' (or 'x') and 'labels' (or 'y'); it holds "
                f"{sorted(keys) or 'nothing'}."
            )
        names = [str(c) for c in archive["class_names"]] if "class_names" in keys else None
        return load_arrays(
            archive[image_key], archive[label_key], class_names=names, layout=layout, name=path.stem
        )


def load_dataset(spec: str, *, image_size: int | tuple[int, int] | None = None, lazy: bool = False):
    """Load a dataset by a short spec: `digits`, `mnist`, `folder:PATH`, `npz:PATH` or `npy:PATH`.

    **Arguments:**

    - `spec`: which dataset; a bare path to a folder of class folders or to a `.npz` file also works.
        `npy:PATH` is a folder holding `images.npy` and `labels.npy` (`open_arrays`), always memory-mapped.
    - `image_size`: resize to this size (bilinear); `None` keeps the native size. (Keyword only argument.)
    - `lazy`: read an image folder lazily (`scan_image_folder`: the file list now, the pixels when a batch
        needs them) rather than decoding it whole into memory. (Keyword only argument.)

    **Returns:** the whole dataset (split it with `train_test_split`): a `Dataset` in memory, or a lazy
    source for `npy:` and, with `lazy`, for folders.
    """
    kind, _, where = spec.partition(":")
    if kind == "digits" and not where:
        return load_digits(image_size=image_size)
    if kind == "mnist" and not where:
        return load_mnist(image_size=image_size)
    path = Path(where) if kind in ("folder", "npz", "npy") and where else Path(spec)
    if kind == "npy" and where:
        return open_arrays(path, image_size=image_size)
    if (kind == "folder" and where) or (kind != "npz" and path.is_dir()):
        if lazy:
            return scan_image_folder(path, image_size=image_size)
        return load_image_folder(path, image_size=image_size)
    if (kind == "npz" and where) or (path.suffix == ".npz" and path.is_file()):
        return resized_to(load_npz(path), image_size)
    raise ValueError(
        f"Unknown dataset {spec!r}: use 'digits', 'mnist', 'folder:PATH' (one sub-folder per class), "
        f"'npz:PATH' (arrays 'images' and 'labels') or 'npy:PATH' (a folder of images.npy and labels.npy, "
        f"memory-mapped)."
    )
