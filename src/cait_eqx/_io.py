"""Weights files: our own safetensors format (`save` / `load`) and timm / deit checkpoints (`load_timm`).

Our file is a plain timm-compatible `model.safetensors` (timm's key names and shapes, so timm's `Cait` of
the same configuration loads it with `strict=True`), whose metadata also holds the model's `CaiTConfig`
as JSON and a format tag, so that `load` rebuilds the model from the file alone.

PyTorch is only imported to read `.pth` files; safetensors files never need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write_bytes
from ._config import CaiTConfig
from ._model import CaiT
from ._timm import (
    WeightsError,
    adapt_state_dict_channels,
    build_from_state_dict,
    from_timm_state_dict,
    infer_config,
    patch_grid,
    resample_state_dict,
    to_timm_state_dict,
)
from ._variants import VARIANTS

__all__ = ["save", "load", "load_timm", "FORMAT_VERSION"]

logger = logging.getLogger("cait_eqx")

FORMAT_VERSION = 1
"""The version of the file layout `save` writes; `load` reads this version and older ones."""

_FORMAT_KEY = "cait_eqx.format_version"
_CONFIG_KEY = "cait_eqx.config"
_PACKAGE_KEY = "cait_eqx.package_version"

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------- reading files


def _kind(path: Path) -> str:
    """What a file holds, from its first bytes: "safetensors", "torch" (zip or legacy pickle) or "unknown"."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if not head:
        raise WeightsError(f"{path} is empty (0 bytes): an interrupted download or copy? Fetch it again.")
    if len(head) == 9 and head[8:9] == b"{":  # first: a header length can start with byte 0x80 too
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise WeightsError(
            f"Could not read {path} as safetensors ({error}). The file is truncated or corrupt: fetch it "
            f"again."
        ) from error
    return tensors, metadata


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Reading a PyTorch checkpoint (.pth) needs PyTorch, which is not installed. Install it "
            "(`pip install 'cait_eqx[torch]'`), or use the safetensors file of the same weights "
            "(timm publishes `model.safetensors`), which loads without PyTorch."
        ) from error
    return torch


def _check_zip_records(path: Path) -> None:
    """Check every record's CRC-32 in a zip-format `.pth`, which `torch.load` does not: catches bit flips."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as error:
        raise WeightsError(
            f"Could not read {path} as a PyTorch checkpoint ({type(error).__name__}: {error}). The file is "
            f"truncated or corrupt (fetch it again), or not a checkpoint."
        ) from error
    if damaged is not None:
        raise WeightsError(
            f"{path} is corrupt: the CRC-32 checksum of its record {damaged!r} does not match the record's "
            f"bytes (damaged in storage or transfer). Fetch the file again."
        )


def _read_torch(path: Path) -> dict[str, Any]:
    torch = _import_torch()
    with open(path, "rb") as handle:
        if handle.read(4) == b"PK\x03\x04":
            _check_zip_records(path)  # PyTorch's zip format (the legacy pickle format has no checksums)
    try:
        with warnings.catch_warnings():
            # A pickle protocol other than torch's default only earns a warning (the weights-only unpickler
            # still refuses all but tensors); a legacy pickle cut short raises IndexError, caught below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"{path} holds Python objects besides tensors, and cait_eqx only unpickles checkpoints with "
            f"`torch.load(..., weights_only=True)` (safe against code in the file). If you trust the file, "
            f"load it yourself with `weights_only=False` and pass its state dict to "
            f"`cait_eqx.from_timm_state_dict`."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, struct.error) as error:
        raise WeightsError(
            f"Could not read {path} as a PyTorch checkpoint ({type(error).__name__}: {error}). The file is "
            f"truncated or corrupt (fetch it again), or not a checkpoint."
        ) from error
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):  # deit release files: {"model": {"module.…": tensor}}
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise WeightsError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors, possibly under "
            f"'model'), but a {type(obj).__name__}."
        )
    state_dict: dict[str, Any] = {}
    for key, value in obj.items():
        # `module.` prefixes come from saving a model wrapped in DistributedDataParallel.
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in state_dict:
            raise WeightsError(f"{path} holds both {name!r} and 'module.{name}': which is meant is unclear.")
        state_dict[name] = value
    return state_dict


def _read(path: PathLike) -> tuple[dict[str, Any], dict[str, str], str]:
    """(state dict, safetensors metadata, kind) of a weights file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}.")
    kind = _kind(path)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return tensors, metadata, kind
    if kind == "torch":
        return _read_torch(path), {}, kind
    with open(path, "rb") as handle:
        start = handle.read(8)
    raise WeightsError(
        f"{path} is neither a safetensors file nor a PyTorch checkpoint (it starts with bytes "
        f"{start!r}). Pass a timm `model.safetensors`, a timm/deit `.pth`, or a file "
        f"written by `cait_eqx.save`."
    )


def _stored_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """The `CaiTConfig` keywords stored by `save`, or None for a file without them."""
    if _CONFIG_KEY not in metadata:
        return None
    version = metadata.get(_FORMAT_KEY, "?")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise WeightsError(
            f"{path} was written in cait_eqx file format {version!r} (by cait_eqx "
            f"{metadata.get(_PACKAGE_KEY, '?')}); this cait_eqx reads formats up to {FORMAT_VERSION}. "
            f"Upgrade cait_eqx."
        )
    try:
        stored = json.loads(metadata[_CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: the stored model configuration is not valid JSON ({error}).") from error
    known = {field.name for field in dataclasses.fields(CaiTConfig)}
    if not isinstance(stored, dict) or set(stored) - known:
        extra = sorted(set(stored) - known) if isinstance(stored, dict) else stored
        raise WeightsError(f"{path}: the stored model configuration has unknown entries {extra!r}.")
    try:
        if "image_size" in stored:
            stored["image_size"] = tuple(stored["image_size"])
        CaiTConfig(**stored)
    except (TypeError, ValueError) as error:
        raise WeightsError(
            f"{path}: the stored model configuration is invalid ({error}). The file is corrupt or was "
            f"edited: save or fetch it again."
        ) from None
    return stored


# ------------------------------------------------------------------------------------------ our own format


def save(path: PathLike, model: CaiT) -> Path:
    """Write `model` to one safetensors file that `cait_eqx.load` rebuilds it from.

    The tensors carry timm's names and shapes (PyTorch users load the file into timm's `Cait` with
    `strict=True`); the metadata holds the model's configuration (`model.config`) as JSON and the file
    format's version. Arrays keep the model's dtype, so the round trip is bit-exact. The file is written
    atomically: an interrupted save leaves any previous file under `path` untouched and no partial file.

    **Arguments:**

    - `path`: where to write, conventionally ending in `.safetensors`.
    - `model`: a `CaiT`.

    **Returns:** the path written. **Raises:** `cait_eqx.DiskFullError` (nothing half-written) for a full
    disk; `cait_eqx.StaleConfigError` when `model.config` no longer describes its arrays (`eqx.tree_at`).
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`cait_eqx.save` writes a `CaiT`, got {type(model).__name__}.")
    from safetensors.numpy import save as serialise

    cfg = model.config
    state_dict = to_timm_state_dict(model, dtype=None)
    wrong = {key: str(v.dtype) for key, v in state_dict.items() if str(v.dtype) != cfg.dtype}
    if wrong:
        first = next(iter(wrong))
        raise ValueError(
            f"The model's configuration says dtype {cfg.dtype}, but {len(wrong)} arrays have another dtype "
            f"(e.g. {first}: {wrong[first]}), which `load` would not restore. Build the model with "
            f"`dtype=` instead of casting its arrays."
        )
    config = dataclasses.asdict(cfg)
    config["image_size"] = list(cfg.image_size)
    from . import __version__

    metadata = {
        "format": "pt",  # what safetensors consumers expect of a PyTorch-layout state dict
        _FORMAT_KEY: str(FORMAT_VERSION),
        _CONFIG_KEY: json.dumps(config, sort_keys=True),
        _PACKAGE_KEY: __version__,
    }
    contiguous = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
    return atomic_write_bytes(path, _sorted_metadata(serialise(contiguous, metadata=metadata)))


def _sorted_metadata(blob: bytes) -> tuple[bytes, memoryview]:
    """A safetensors file's bytes with its header's metadata put in sorted order, so that equal models give
    equal bytes.

    safetensors keeps the metadata in a hash map whose order changes from one save to the next (Rust seeds
    its hash maps at random). Only the order of the `__metadata__` entries is rewritten: the tensor entries,
    the padding, the header length and hence the 8-byte aligned data offset stay exactly as safetensors
    wrote them, and the JSON is re-encoded the way safetensors (serde_json) encodes it, compact and UTF-8.
    """
    (length,) = struct.unpack("<Q", blob[:8])
    raw = blob[8 : 8 + length]
    header = json.loads(raw)
    if "__metadata__" in header:  # first, as safetensors writes it, then the tensors in data order
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) != len(raw.rstrip(b" ")):
        raise RuntimeError(  # a different JSON encoding would move the data: never write that
            f"safetensors wrote a header of {len(raw.rstrip(b' '))} bytes that re-encodes to {len(text)} "
            f"bytes; cannot reorder its metadata in place. Please report this with your safetensors version."
        )
    # The same padding (spaces) up to the same length; the tensors' bytes are not copied.
    return blob[:8] + text.ljust(length), memoryview(blob)[8 + length :]


def load(path: PathLike, **overrides: Any) -> CaiT:
    """Rebuild a model written by `cait_eqx.save`, from the file alone.

    **Arguments:**

    - `path`: the file.
    - `**overrides`: `CaiT` keywords that change the stored configuration, e.g. `layer_dropout=0.1` to
        fine-tune, or `image_size=384` to resample the positional embedding to a new resolution (bicubic),
        or `compute_dtype=jnp.bfloat16` to compute in bfloat16 with the stored float32 weights (the compute
        dtype is a run-time choice: `save` does not record it).

    **Returns:** the `CaiT`, in inference mode (`eqx.nn.inference_mode(model, False)` to train it).
    """
    path = Path(path)
    state_dict, metadata, kind = _read(path)
    stored = _stored_config(metadata, path)
    if stored is None:
        raise WeightsError(
            f"{path} is a {kind} file without a cait_eqx configuration in its metadata: it was not written "
            f"by `cait_eqx.save`. For timm or deit checkpoints use `cait_eqx.load_timm(path)`."
        )
    return _from_stored(state_dict, stored, overrides)


def _from_stored(state_dict: Mapping[str, Any], stored: dict[str, Any], overrides: dict[str, Any]) -> CaiT:
    kwargs = {**stored, **overrides}
    if "image_size" in overrides:
        # `compute_dtype`, `remat` and `dynamic_img_size` are `CaiT` keywords, not part of the configuration.
        run_time = ("compute_dtype", "remat", "dynamic_img_size")
        structure = {k: v for k, v in kwargs.items() if k not in run_time}
        source = patch_grid(stored["image_size"], stored["patch_size"])
        target = patch_grid(CaiTConfig(**structure).image_size, kwargs["patch_size"])
        if source != target:
            state_dict = resample_state_dict(state_dict, source, target)
    if "channels" in overrides:
        state_dict = adapt_state_dict_channels(state_dict, kwargs["channels"])
    return build_from_state_dict(state_dict, kwargs)


# -------------------------------------------------------------------------------------- timm / deit files


def _structure(config: CaiTConfig) -> CaiTConfig:
    """The config with everything that does not fix the tensors' shapes set to defaults."""
    return dataclasses.replace(
        config,
        dropout=0.0,
        emb_dropout=0.0,
        attn_dropout=0.0,
        layer_dropout=0.0,
        init_values=1.0,
        dtype="float32",
    )


def _matching_variant(config: CaiTConfig) -> str | None:
    """The named variant whose tensors have the shapes of `config`'s, if any."""
    target = _structure(config)
    for name, kwargs in VARIANTS.items():
        if _structure(CaiTConfig(**kwargs)) == target:
            return name
    return None


def load_timm(path: PathLike, *, name: str | None = None, **overrides: Any) -> CaiT:
    """Load a CaiT checkpoint file from timm or the official deit release.

    Reads deit's release `.pth` files (a dict with `"model"` whose keys carry `module.` prefixes), timm's
    `.pth` state dicts and `model.safetensors` files, and files written by `cait_eqx.save` (whose stored
    configuration is then used unless `name` is given). Every tensor
    is matched by name; a missing, unexpected or mis-shaped one is an error. `.pth` files are read with
    `torch.load(..., weights_only=True)` (PyTorch needed); safetensors files without PyTorch.

    When `name` is omitted the architecture is read from the tensor shapes (`infer_config`: width and depth
    from the blocks, heads from the talking-heads mix, patch and image size from `patch_embed` and
    `pos_embed`, classes from `head`), and this is reported as a warning on the `"cait_eqx"` logger
    (Python `logging`), naming the variant it matches.

    **Arguments:**

    - `path`: the checkpoint file.
    - `name`: the variant the file should hold (see `list_models()`); the file is checked against it.
        (Keyword only argument.)
    - `**overrides`: `CaiT` keywords, e.g. `dtype=jnp.bfloat16`, `compute_dtype=jnp.bfloat16` (float32
        weights, bfloat16 computation), `layer_dropout=0.1`, or `image_size=384` to load a 224 checkpoint
        into a 384 model by resampling the positional embedding (bicubic).

    **Returns:** a `CaiT` in inference mode.
    """
    path = Path(path)
    state_dict, metadata, _ = _read(path)
    stored = _stored_config(metadata, path)
    if stored is not None and name is None:
        return _from_stored(state_dict, stored, overrides)
    if name is None:
        inferred = infer_config(state_dict)
        try:
            cfg = CaiTConfig(**{**inferred, "init_values": None})
        except (TypeError, ValueError):
            cfg = None  # `image_size` or `heads` could not be read (no named variant lacks them), or worse:
            # `from_timm_state_dict` below raises the full explanation
        variant = _matching_variant(cfg) if cfg is not None else None
        if variant is not None:
            logger.warning(
                "cait_eqx: no `name` given for %s; read the architecture from its tensors: %s. Pass "
                "`name=%r` to have the file checked against that variant instead.",
                path,
                variant,
                variant,
            )
            name = variant
        else:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(inferred.items()))
            logger.warning(
                "cait_eqx: no `name` given for %s; read the architecture from its tensors (no named variant "
                "has these shapes): %s.", path, shown
            )
    return from_timm_state_dict(state_dict, name=name, **overrides)

