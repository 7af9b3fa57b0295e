"""Batches through shared memory: how a data worker hands its arrays to the trainer without a pipe.

A worker assembles a batch's large arrays straight into `multiprocessing.shared_memory` blocks
(`Blocks.empty`) and sends through its pipe only the rest of the result, with each block's name, shape and
dtype; the trainer maps each block, copies it out once and unlinks it (`receive`). Through a pipe the same
batch would be pickled, written in pipe-sized pieces while the worker waits for the trainer to read them,
and unpickled.

Who removes a block: always the trainer. Its names are known in advance (`block_name`: the pool's own
prefix, the result's number, the array's place in it), so that when a stream ends early (a dead worker, a
timeout, a consumer that stops, the interpreter's exit) the trainer removes every block a worker may have
made and not yet handed over (`sweep`), even one whose worker was killed before it could say its name.
Nothing is left in `/dev/shm`, and multiprocessing's resource tracker has nothing left to warn about.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from multiprocessing import shared_memory
from typing import Any

import numpy as np

__all__ = ["BLOCK_PREFIX", "MAX_BLOCKS", "Blocks", "block_name", "new_prefix", "receive", "sweep"]

# Every block of this package's data workers starts with this (followed by the pool's random token).
BLOCK_PREFIX = "cait-eqx-"
# Arrays smaller than this go through the pipe with the rest: a block costs a few system calls each way.
MIN_SHARED_BYTES = 1 << 14
# Blocks one result may use (more arrays go through the pipe): bounds the names `sweep` has to try.
MAX_BLOCKS = 4


def _room_for(nbytes: int) -> bool:
    """Whether the shared memory file system has room for a block of `nbytes` (twice over). A full one
    (a container's 64 MB `/dev/shm`) would not refuse the block but kill the worker writing into it (SIGBUS):
    the array then goes through the pipe instead."""
    try:
        stats = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # no such file system here (macOS, Windows): nothing to check
        return True
    return stats.f_bavail * stats.f_frsize >= 2 * nbytes


def new_prefix() -> str:
    """A pool's own prefix for its block names (short: macOS allows 31 characters in all)."""
    return f"{BLOCK_PREFIX}{secrets.token_hex(4)}-"


def block_name(prefix: str, number: int, place: int) -> str:
    """The block of array `place` of result `number`."""
    return f"{prefix}{number:x}.{place}"


class _InBlock:
    """Stands, in the pickled result, for the array in block number `place` of its message."""

    def __init__(self, place: int):
        self.place = place


class Blocks:
    """A worker's side: the blocks of the result being computed (`begin`, `empty`, `pack`, `release`)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.number = 0
        self._blocks: list[tuple[shared_memory.SharedMemory, np.ndarray]] = []
        self._held: list[shared_memory.SharedMemory] = []  # mappings still in use when released

    def begin(self, number: int) -> None:
        self.number = number
        self._blocks = []

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array, in a block of its own when it is large enough (else in this process)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_SHARED_BYTES or len(self._blocks) >= MAX_BLOCKS or dtype.hasobject:
            return np.empty(shape, dtype)
        if not _room_for(nbytes):
            return np.empty(shape, dtype)
        name = block_name(self.prefix, self.number, len(self._blocks))
        block = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        array = np.ndarray(shape, dtype, buffer=block.buf)
        self._blocks.append((block, array))
        return array

    def _share(self, value: Any, specs: list[tuple[str, tuple[int, ...], str]]) -> Any:
        if not isinstance(value, np.ndarray):
            return value
        for block, array in self._blocks:
            if value is array:
                spec = (block.name, array.shape, array.dtype.str)
                if spec not in specs:  # the same array twice in a result: one block, read once
                    specs.append(spec)
                return _InBlock(specs.index(spec))
        if value.nbytes < MIN_SHARED_BYTES or value.dtype.hasobject or len(self._blocks) >= MAX_BLOCKS:
            return value
        # A large array made elsewhere (e.g. read whole from a memory-mapped file): one copy into a block.
        target = self.empty(value.shape, value.dtype)
        if not (self._blocks and target is self._blocks[-1][1]):  # no block after all: the pipe
            return value
        target[...] = value
        return self._share(target, specs)

    def pack(self, result: Any) -> tuple[Any, list[tuple[str, tuple[int, ...], str]]]:
        """`result` with its large arrays (itself, or the values of a dict, list or tuple) replaced by
        stand-ins, and the blocks that hold them: (name, shape, dtype) each."""
        specs: list[tuple[str, tuple[int, ...], str]] = []
        if isinstance(result, dict):
            packed: Any = {key: self._share(value, specs) for key, value in result.items()}
        elif isinstance(result, (list, tuple)):
            packed = type(result)(self._share(value, specs) for value in result)
        else:
            packed = self._share(result, specs)
        return packed, specs

    def release(self) -> None:
        """Unmap this result's blocks here (the trainer removes them once it has read them)."""
        self._held.extend(block for block, _ in self._blocks)
        self._blocks = []
        held, self._held = self._held, []
        for block in held:
            try:
                block.close()
            except BufferError:  # a view of it is still alive (kept by the task): unmapped later
                self._held.append(block)


def _take(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The array in block `name`, copied into this process; the block is removed."""
    block = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray(shape, np.dtype(dtype), buffer=block.buf)
        array = view.copy()
        del view
        block.close()
    finally:
        block.unlink()
    return array


def receive(packed: Any, specs: list[tuple[str, tuple[int, ...], str]]) -> Any:
    """A worker's result again, from what `Blocks.pack` gave: every block read once and removed."""
    arrays = []
    try:
        for name, shape, dtype in specs:
            arrays.append(_take(name, tuple(shape), dtype))
    finally:
        sweep(name for name, _, _ in specs[len(arrays) + 1 :])  # the blocks a failed read left behind

    def restore(value: Any) -> Any:
        return arrays[value.place] if isinstance(value, _InBlock) else value

    if isinstance(packed, dict):
        return {key: restore(value) for key, value in packed.items()}
    if isinstance(packed, (list, tuple)):
        return type(packed)(restore(value) for value in packed)
    return restore(packed)


def _unlink_unsized(name: str) -> int:
    """Remove the block `name` that has no size yet (its worker was killed between `shm_open` and
    `ftruncate`): `SharedMemory` cannot map it, and its maker had not told a resource tracker about it.
    1 if it was removed."""
    try:
        import _posixshmem  # the module `shared_memory` itself calls on POSIX systems
    except ImportError:  # Windows: a named block without a mapping does not outlive its handles
        return 0
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return 0
    return 1


def sweep(names: Iterable[str]) -> int:
    """Remove those of the blocks `names` that exist (a stream that ended early); how many there were."""
    removed = 0
    for name in names:
        try:
            block = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            continue
        except ValueError:  # "cannot mmap an empty file": its worker was killed between making and sizing it
            removed += _unlink_unsized(name)
            continue
        block.close()
        try:
            block.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
