"""Real photos in, class names out: timm's evaluation transform for CaiT (its resize and crop is `_pil`'s
`eval_resize_crop`, shared with the data workers), and the ImageNet-1k class names."""

from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from PIL import Image

from ._config import image_size_pair
from ._constants import IMAGENET_MEAN, IMAGENET_STD
from ._pil import eval_resize_crop

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "preprocess",
    "imagenet_class_names",
    "Prediction",
    "top_k",
    "format_top_k",
]


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(
            f"`preprocess` takes a PIL image or a uint8 array (height, width, 3) with values 0-255, got an "
            f"array of dtype {array.dtype}. Convert it, e.g. `(x * 255).round().astype(np.uint8)` for floats "
            f"in [0, 1]."
        )
    if array.ndim == 2:
        return Image.fromarray(array).convert("RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise ValueError(
        f"`preprocess` takes an image array of shape (height, width, 3) (channels last, RGB), or (height, "
        f"width) for greyscale; got shape {array.shape}. Channels first? Use `x.transpose(1, 2, 0)`."
    )


def preprocess(
    image: Image.Image | np.ndarray,
    image_size: int | tuple[int, int] = 224,
    *,
    crop_pct: float = 1.0,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Float[Array, "3 out_height out_width"]:
    """Turn a photo into a CaiT input exactly as timm's evaluation transform for CaiT does.

    Bicubic resize of the shorter side to `image_size / crop_pct` (CaiT's weights use `crop_pct=1.0`: the
    shorter side becomes the input size), centre crop to `image_size`, scale to [0, 1], normalise with the
    ImageNet mean and standard deviation, channels first.

    **Arguments:**

    - `image`: a PIL image (any mode; converted to RGB) or a `uint8` array `(height, width, 3)`, RGB,
        channels last (an alpha channel is dropped; `(height, width)` is greyscale).
    - `image_size`: the model's input size, an int or `(height, width)`: pass `model.config.image_size`.
    - `crop_pct`: the fraction of the resized image kept by the centre crop, in (0, 1]. (Keyword only
        argument.)
    - `mean`, `std`: per-channel normalisation, RGB. (Keyword only arguments.)

    **Returns:** a float32 array `(3, height, width)`; `jax.vmap(model)(jnp.stack([...]))` for several.
    """
    size = image_size_pair(image_size)  # checked here, so an error names this function's argument
    pixels = np.asarray(_as_pil(image), dtype=np.uint8).transpose(2, 0, 1)
    scaled = eval_resize_crop(pixels, size, crop_pct, "bicubic").astype(np.float32) / np.float32(255)
    centre = np.asarray(mean, np.float32).reshape(3, 1, 1)
    spread = np.asarray(std, np.float32).reshape(3, 1, 1)
    return jnp.asarray((scaled - centre) / spread)


# ------------------------------------------------------------------------------------------ class names


@functools.cache
def _imagenet_table() -> tuple[tuple[str, str], ...]:
    text = resources.files("cait_eqx").joinpath("_assets/imagenet1k_classes.tsv").read_text(encoding="utf-8")
    rows = [tuple(line.split("\t")) for line in text.splitlines() if line and not line.startswith("#")]
    if len(rows) != 1000 or any(len(row) != 2 for row in rows):
        raise RuntimeError("cait_eqx is damaged: _assets/imagenet1k_classes.tsv does not hold 1000 rows.")
    return tuple(rows)  # type: ignore[return-value]


def imagenet_class_names(*, full: bool = False) -> list[str]:
    """The names of the 1000 ImageNet-1k classes, in the order of a pretrained CaiT's logits.

    **Arguments:**

    - `full`: every WordNet synonym (`"tench, Tinca tinca"`) instead of the first (`"tench"`). (Keyword
        only argument.)

    **Returns:** a list of 1000 strings.
    """
    return [lemmas if full else lemmas.split(", ")[0] for _, lemmas in _imagenet_table()]


class Prediction(NamedTuple):
    """One of the top classes: its index, its name and the model's probability for it."""

    index: int
    name: str
    probability: float

    def __str__(self) -> str:
        return f"{self.probability:7.2%}  {self.name} ({self.index})"


def top_k(
    logits: Float[Array, " classes"] | Float[np.ndarray, " classes"],
    k: int = 5,
    *,
    class_names: list[str] | None = None,
) -> list[Prediction]:
    """The `k` most probable classes of one image's logits, most probable first.

    **Arguments:**

    - `logits`: one image's logits, `(classes,)` (for a batch: `[top_k(row) for row in logits]`).
    - `k`: how many classes.
    - `class_names`: a name per class; the ImageNet-1k names when omitted and there are 1000 classes, else
        `"class <index>"`. (Keyword only argument.)

    **Returns:** `k` `Prediction(index, name, probability)`, probabilities from a softmax over all classes.
    """
    scores = np.asarray(logits, dtype=np.float64)
    classes = scores.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
        raise ValueError(f"`k` must be an int between 1 and the number of classes ({classes}), got {k!r}.")
    if class_names is None:
        class_names = imagenet_class_names() if classes == 1000 else [f"class {i}" for i in range(classes)]
    if len(class_names) != classes:
        raise ValueError(f"`class_names` has {len(class_names)} names for {classes} logits.")
    probabilities = np.exp(scores - scores.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-scores, kind="stable")[:k]
    return [Prediction(int(i), class_names[i], float(probabilities[i])) for i in order]


def format_top_k(
    logits: Float[Array, " classes"] | Float[np.ndarray, " classes"],
    k: int = 5,
    *,
    class_names: list[str] | None = None,
) -> str:
    """`top_k` as printable lines, one class per line: probability, name and index."""
    return "\n".join(str(p) for p in top_k(logits, k, class_names=class_names))
