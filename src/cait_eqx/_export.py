"""Export a CaiT for inference without this package: a serialized `jax.export` artifact.

The file holds the model's forward pass, weights included, lowered to StableHLO by `jax.export`: a batch
of images `(batch, channels, height, width)` in, logits `(batch, num_classes)` out, in inference mode (no
dropout), with a symbolic batch dimension unless a fixed batch size is asked for. A fresh process runs it
with JAX alone (and `flatbuffers`, which JAX's deserialiser needs):

```python
import jax, numpy as np

exported = jax.export.deserialize(open("cait.jax", "rb").read())
logits = exported.call(np.zeros(exported.in_avals[0].shape, np.float32))  # any batch size
```

The artifact takes the model's raw input: the caller resizes and normalises the images as the model was
trained (`cait_eqx.preprocess` for the ImageNet weights; pixels in [0, 1] for a `cait-eqx train` run).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from ._atomic import atomic_write_bytes
from ._batch import auto_chunk, batched
from ._config import image_size_pair
from ._config_check import check_config
from ._model import CaiT

__all__ = ["EXPORT_PLATFORMS", "export"]

# The platforms `jax.export` lowers for (several at once give one artifact that runs on each).
EXPORT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")
_INPUT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_options(
    model: object, path: Path, dtype: object, batch_size: object, platforms: object
) -> tuple[str, tuple[str, ...]]:
    """Raise a clear error for each bad argument; returns `(dtype name, platforms)`."""
    if not isinstance(model, CaiT):
        raise TypeError(
            f"`export` takes a `cait_eqx.CaiT`, got {type(model).__name__}. Load one first, e.g. "
            f"`cait_eqx.load(path)` or `cait_eqx.training.load_source(source).model`."
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"The export path {path} is a directory; give a file name in it, e.g. {path / 'cait.jax'}."
        )
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise NotADirectoryError(f"Cannot write {path}: a part of its folder path is a file, not a folder.")
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _INPUT_DTYPES:
        raise ValueError(f"`dtype` (of the input images) must be one of {_INPUT_DTYPES}, got {dtype!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be None (any batch size: a symbolic batch dimension) or a positive int, got "
            f"{batch_size!r}."
        )
    if platforms is None:
        platforms = (jax.default_backend(),)
    elif isinstance(platforms, str):
        platforms = (platforms,)
    platforms = tuple(platforms)  # type: ignore[arg-type]
    unknown = [p for p in platforms if p not in EXPORT_PLATFORMS]
    if not platforms or unknown:
        raise ValueError(
            f"`platforms` must name one or more of {EXPORT_PLATFORMS} (JAX's names: 'cuda' for NVIDIA "
            f"GPUs), got {platforms!r}."
        )
    if len(set(platforms)) != len(platforms):
        raise ValueError(f"`platforms` names a platform twice: {platforms!r}.")
    return name, platforms


def _spatial_size(model: CaiT, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The height and width the artifact takes: the model's own, or (`dynamic_img_size`) any it accepts."""
    cfg = model.config
    if image_size is None:
        return cfg.image_size
    size = image_size_pair(image_size)
    if size == cfg.image_size:
        return size
    if not model.dynamic_img_size:
        raise ValueError(
            f"This model takes {cfg.image_size[0]}x{cfg.image_size[1]} images, so it exports at that size; "
            f"got `image_size={image_size!r}`. To export at another size resample it first "
            f"(`cait_eqx.set_input_size(model, {size})`) or switch on "
            f"`cait_eqx.with_dynamic_img_size(model)`."
        )
    p = cfg.patch_size
    if size[0] % p or size[1] % p:
        raise ValueError(
            f"The patch size {p} does not divide the export size {size[0]}x{size[1]}; use multiples of {p}."
        )
    return size


@typing.no_type_check  # every argument is checked below, with errors that name the fix
def export(
    model: CaiT,
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    batch_size: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    platforms: str | Sequence[str] | None = None,
) -> Path:
    """Write `model`'s inference forward pass as a serialized `jax.export.Exported`, for use without cait_eqx.

    The artifact maps a batch of images `(batch, channels, height, width)` to logits `(batch, num_classes)`
    (the class embeddings `(batch, dim)` for a model without a head), in inference mode, with the weights
    inside. It takes the model's raw input: no resizing or normalisation is baked in (see the module's
    documentation). Run it with JAX only:
    `jax.export.deserialize(open(path, "rb").read()).call(images)`.

    The spatial size is fixed (the model's `image_size`, or `image_size` here for a `dynamic_img_size`
    model): the positional grid's bicubic resampling needs concrete sizes. One artifact per size.

    An artifact for the CPU alone runs a batch in the model's cache-sized chunks (`cait_eqx.batched` with
    `cait_eqx.auto_chunk(model.config)` images, as `cait-eqx predict` runs it; a batch of any size is cut
    into the fewest equal chunks when it runs); one that may run on an accelerator runs the whole batch at
    once. The logits are the same to float32 rounding.

    **Arguments:**

    - `model`: the `CaiT` (its dropout is switched off for the export).
    - `path`: the file to write (atomically; folders are created). `.jax` is a good suffix.
    - `dtype`: the dtype of the input images, `"float32"` (default), `"bfloat16"`, `"float16"` or
        `"float64"`; the model casts them to its own precision. (Keyword only argument.)
    - `batch_size`: `None` (default) for a symbolic batch dimension `b` (any batch size, one artifact), or
        an int to fix it. (Keyword only argument.)
    - `image_size`: the input height and width, an int or `(height, width)`; `None`: the model's. Another
        size needs a `dynamic_img_size` model. (Keyword only argument.)
    - `platforms`: where the artifact may run, names from `EXPORT_PLATFORMS` (`"cpu"`, `"cuda"`, `"rocm"`,
        `"tpu"`); several give one multi-platform artifact. `None`: the current backend. (Keyword only
        argument.)

    **Returns:** `path` as a `Path`.

    **Raises:** `TypeError` for a model that is not a `CaiT`; `IsADirectoryError` / `NotADirectoryError`
    for a path that cannot be a file; `ValueError` for an unknown dtype or platform, a bad batch size, or
    an image size the model does not take; `cait_eqx.StaleConfigError` when `model.config` no longer
    describes its arrays; `cait_eqx.DiskFullError` when the file does not fit on the disk.
    """
    path = Path(path).expanduser()
    dtype_name, platforms = _check_options(model, path, dtype, batch_size, platforms)
    check_config(model, "export the model")  # its input shape comes from the config
    height, width = _spatial_size(model, image_size)
    model = eqx.nn.inference_mode(model)
    params, static = eqx.partition(model, eqx.is_array)

    # On a CPU the batch runs in cache-sized chunks, as `cait-eqx predict` runs it (`cait_eqx.batched`,
    # `auto_chunk`); an artifact that may also run on an accelerator takes the whole batch at once.
    chunk = auto_chunk(model.config) if set(platforms) == {"cpu"} else None

    def forward(images):
        return batched(eqx.combine(params, static), chunk=chunk)(images)

    channels = model.config.channels
    if batch_size is None:
        shape = jax.export.symbolic_shape(f"b, {channels}, {height}, {width}")
    else:
        shape = (batch_size, channels, height, width)
    spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype_name))
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
    try:
        data = exported.serialize()
    except ImportError as error:  # jax's serialiser imports `flatbuffers` on first use
        raise ImportError(f"{error}: `pip install flatbuffers` (a dependency of cait_eqx).") from None
    return atomic_write_bytes(path, bytes(data))
