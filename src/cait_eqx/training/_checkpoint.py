"""Training checkpoints: model + optimiser state + RNG key + step + data position, written atomically.

A checkpoint is two files in one directory: `step-00000123.eqx` (the leaves of `(model, opt_state, key)`
by `eqx.tree_serialise_leaves`) and `step-00000123.json` (step, data position, the key's implementation,
the SHA-256 of the `.eqx`). The `.eqx` is written first and the `.json` last, each atomically (temporary file
in the same directory, fsync, rename): a checkpoint exists only once its `.json` does, and a `.json` whose
`.eqx` is missing or has another hash is ignored. Old checkpoints are deleted only after a newer one has been
written and read back, so the only good checkpoint is never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from .._atomic import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWarning",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "cait_eqx.checkpoint/1"
_NAME = re.compile(r"^step-(\d{8,})\.json$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or not matching the model being trained."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older, intact one."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's `.json` says.

    `epoch` and `batch_index` are the data position of the *next* batch to train on; `shuffle_seed` is the
    seed that orders the epochs (`cait_eqx.data.Sampler`).
    """

    step: int
    epoch: int
    batch_index: int
    shuffle_seed: int
    path: Path
    sha256: str
    extra: dict[str, Any]

    @property
    def data_path(self) -> Path:
        return self.path.with_suffix(".eqx")


def _stem(step: int) -> str:
    return f"step-{step:08d}"


def _key_to_array(key: PRNGKeyArray) -> tuple[np.ndarray, str | None]:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jr.key_data(key)), str(jr.key_impl(key))
    return np.asarray(key), None


def _array_to_key(data: Any, impl: str | None) -> PRNGKeyArray:
    data = jnp.asarray(data)
    return data if impl is None else jr.wrap_key_data(data, impl=impl)


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _read_info(sidecar: Path) -> CheckpointInfo:
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        return CheckpointInfo(
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            batch_index=int(meta["batch_index"]),
            shuffle_seed=int(meta["shuffle_seed"]),
            path=sidecar,
            sha256=str(meta["sha256"]),
            extra=dict(meta.get("extra", {})) | {"key_impl": meta.get("key_impl")},
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Unreadable checkpoint description {sidecar}: {error}") from None


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointInfo]:
    """The checkpoints in `directory` whose description is readable and whose data file exists, oldest first.

    The data files' hashes are checked when loading (`load_checkpoint`), not here.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for sidecar in directory.iterdir():
        if not _NAME.match(sidecar.name):
            continue
        try:
            info = _read_info(sidecar)
        except CheckpointError:
            continue
        if info.data_path.is_file():
            found.append(info)
    return sorted(found, key=lambda info: info.step)


def _verified_bytes(info: CheckpointInfo) -> bytes:
    try:
        blob = info.data_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"Cannot read checkpoint {info.data_path}: {error}") from None
    if _sha256(blob) != info.sha256:
        raise CheckpointError(
            f"Checkpoint {info.data_path} is damaged: its SHA-256 does not match {info.path.name} "
            f"(truncated or modified file)."
        )
    return blob


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: PyTree,
    opt_state: PyTree,
    key: PRNGKeyArray,
    step: int,
    epoch: int,
    batch_index: int,
    shuffle_seed: int,
    keep: int = 3,
    extra: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write a checkpoint atomically, then delete all but the newest `keep` checkpoints of `directory`.

    **Arguments:**

    - `directory`: where checkpoints live (created if needed).
    - `model`, `opt_state`: the training state; their array leaves are saved bit for bit.
    - `key`: the run's PRNG key (typed or raw `uint32`).
    - `step`: optimiser steps taken so far.
    - `epoch`, `batch_index`: the data position of the next batch.
    - `shuffle_seed`: the batch order's seed.
    - `keep`: how many checkpoints to keep, >= 1.
    - `extra`: JSON-serialisable notes stored in the description.

    All arguments are keyword only. **Returns:** the new checkpoint's `CheckpointInfo`.

    **Raises:** `cait_eqx.DiskFullError` when a file does not fit on the disk; the older checkpoints are
    untouched and nothing of the new one is left behind.
    """
    if keep < 1:
        raise ValueError(f"`keep` must be >= 1 (the newest checkpoint is always kept), got {keep}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_data, key_impl = _key_to_array(key)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (model, opt_state, key_data))
    blob = buffer.getvalue()
    digest = _sha256(blob)
    stem = _stem(step)
    atomic_write_bytes(directory / f"{stem}.eqx", blob)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "epoch": int(epoch),
        "batch_index": int(batch_index),
        "shuffle_seed": int(shuffle_seed),
        "key_impl": key_impl,
        "sha256": digest,
        "bytes": len(blob),
        "time": time.time(),
        "extra": extra or {},
    }
    try:
        atomic_write_bytes(directory / f"{stem}.json", (json.dumps(meta, indent=1) + "\n").encode())
    except OSError:
        # Without its description the data file is no checkpoint: give its space back (a full disk).
        if not (directory / f"{stem}.json").exists():
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{stem}.eqx").unlink()
        raise
    info = _read_info(directory / f"{stem}.json")
    _verified_bytes(info)  # read back before anything older may go
    _prune(directory, keep, newest=info)
    return info


def _prune(directory: Path, keep: int, newest: CheckpointInfo) -> None:
    infos = [info for info in list_checkpoints(directory) if info.step != newest.step]
    older = [info for info in infos if info.step < newest.step]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for info in doomed:
        # Description first: a crash in between leaves an orphan data file, never a dangling description.
        with contextlib.suppress(FileNotFoundError):
            info.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            info.data_path.unlink()
    # Data files of checkpoints that never got their description (a crash between the two writes).
    for data in directory.glob("step-*.eqx"):
        match = re.match(r"^step-(\d{8,})\.eqx$", data.name)
        if match and int(match.group(1)) < newest.step and not data.with_suffix(".json").exists():
            with contextlib.suppress(FileNotFoundError):
                data.unlink()


def load_checkpoint(
    source: str | os.PathLike, *, model: PyTree, opt_state: PyTree
) -> tuple[PyTree, PyTree, PRNGKeyArray, CheckpointInfo]:
    """Restore `(model, opt_state, key, info)` from a checkpoint, bit for bit.

    **Arguments:**

    - `source`: a checkpoint directory (its newest intact checkpoint is used; damaged newer ones are skipped
        with a `CheckpointWarning`), or one checkpoint's `.json` / `.eqx` file.
    - `model`, `opt_state`: templates of the same structure, shapes and dtypes (e.g. a freshly built model
        and `optim.init(...)`, or `eqx.filter_eval_shape` of them). (Keyword only arguments.)

    **Returns:** the restored model, optimiser state and key, and the checkpoint's `CheckpointInfo`.

    **Raises:** `CheckpointError` if there is no intact checkpoint, or it does not fit the templates.
    """
    source = Path(source)
    if source.is_dir():
        candidates = list_checkpoints(source)
        if not candidates:
            raise CheckpointError(f"No checkpoint in {source}.")
        candidates = candidates[::-1]
    elif source.suffix in (".json", ".eqx") and source.with_suffix(".json").is_file():
        candidates = [_read_info(source.with_suffix(".json"))]
    else:
        raise CheckpointError(
            f"Checkpoint not found: {source} (give a checkpoint directory or its .json file)."
        )
    problems = []
    for info in candidates:
        try:
            blob = _verified_bytes(info)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            warnings.warn(
                f"Skipped damaged checkpoint(s); resuming from step {info.step}. " + " ".join(problems),
                CheckpointWarning,
                stacklevel=2,
            )
        try:
            restored = _deserialise(blob, (model, opt_state), info.extra.get("key_impl"))
        except (RuntimeError, ValueError, OSError) as error:
            raise CheckpointError(
                f"Checkpoint {info.data_path} does not fit this model and optimiser: {error} "
                f"Resume with the configuration the run was started with."
            ) from None
        new_model, new_state, key = restored
        return new_model, new_state, key, info
    raise CheckpointError(f"No intact checkpoint in {source}: " + " ".join(problems))


# Checkpoints written before cait_eqx stored the patch embedding as the linear map it is (`PatchProjection`)
# hold its bias in the shape of a convolution's bias, `(dim, 1, 1)`: the same numbers, read as `(dim,)`.
_LEGACY_CONV_BIAS = "patch_embed.proj.bias"


def _read_conv_bias(stream: Any, like: Any) -> Any:
    array = jnp.load(stream)
    if array.shape[-2:] == (1, 1) and array.shape[:-2] == like.shape:
        return array.reshape(like.shape)
    return array  # Equinox names any other shape as a mismatch


def _filter_specs(like: PyTree) -> PyTree:
    """How each leaf of `like` is read: as stored, but the old layout of the patch-embedding bias."""

    def spec(path: Any, leaf: Any) -> Any:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        return _read_conv_bias if name.endswith(_LEGACY_CONV_BIAS) else eqx.default_deserialise_filter_spec

    return jax.tree_util.tree_map_with_path(spec, like)


def _deserialise(blob: bytes, like: tuple[PyTree, PyTree], key_impl: str | None):
    stream = io.BytesIO(blob)
    # Equinox refuses an array whose shape is not the template's (naming it).
    model, opt_state = eqx.tree_deserialise_leaves(stream, like, filter_spec=_filter_specs(like))
    # The key's data is the last array in the file; its shape depends on the PRNG implementation.
    key_data = np.load(stream)
    if stream.read(1):
        raise ValueError("the file holds more arrays than this model and optimiser state have.")
    return model, opt_state, _array_to_key(key_data, key_impl)
