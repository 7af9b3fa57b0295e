"""Image files to pixels, the bottom of the data package: which files are images, reading one (with an error
that names it), converting it to greyscale or RGB, and the bilinear resize every reader applies.

The in-memory readers (`_files.py`) and the lazy sources (`_lazy_datasets.py`) both open files and convert
their modes through here (each resizes in its own module: `_files` with PIL, the lazy sources with
`resize_images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["GREY_MODES", "IMAGE_SUFFIXES", "BadImageError", "read_image", "resize_images", "to_mode"]

# File suffixes the image-folder readers treat as images (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# PIL modes that hold a greyscale picture (with or without transparency): a folder of them reads as 1 channel.
GREY_MODES: tuple[str, ...] = ("1", "L", "LA", "I", "I;16", "F")


class BadImageError(ValueError):
    """A file of a dataset cannot be read as one of its images; `paths` names every such file found."""

    def __init__(self, message: str, paths: Sequence[str]):
        super().__init__(message)
        self.paths = tuple(paths)

    def __reduce__(self):  # raised in a data worker, re-raised in the trainer: pickled with its paths
        return (type(self), (str(self), self.paths))


def read_image(path: Path):
    """The PIL image in `path`, fully read; a `ValueError` naming the file if it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Opened here, not by PIL: PIL leaves a file it opened itself unclosed when it cannot seek in it
        # (a named pipe) and copies it into memory instead.
        with open(path, "rb") as file, Image.open(file) as img:
            img.load()
            return img.copy()
    except UnidentifiedImageError:
        raise ValueError(
            f"Cannot read image {path}: not an image format PIL knows. Fix or remove the file."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read image {path}: {error}. Fix or remove the file.") from None


def to_mode(img, mode: str):
    """Convert a PIL image to `"L"` or `"RGB"`, flattening transparency onto black first."""
    from PIL import Image

    if img.mode in ("I", "I;16", "F"):
        # High-bit-depth greyscale: scale its actual range to 0..255 rather than clipping.
        pixels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode == "I;16" or pixels.max() > 255 else 255.0
        img = Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8))
    if "A" in img.getbands() or img.mode == "P":
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize every channel of every image with PIL's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    height, width = size
    n, channels = images.shape[:2]
    out = np.empty((n, channels, height, width), images.dtype)
    for i in range(n):
        for c in range(channels):
            plane = images[i, c]
            if images.dtype == np.uint8:
                img = Image.fromarray(np.ascontiguousarray(plane))
                out[i, c] = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))
            else:
                img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
                out[i, c] = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))
    return out
