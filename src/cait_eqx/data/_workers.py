"""Grain's data worker processes: how many, how each starts, and what the trainer says when one dies.

A worker starts by tying its life to the trainer's (a SIGKILLed trainer leaves no worker behind) and by
leaving Ctrl-C to the trainer (which stops the workers itself). A worker that dies (the kernel's
out-of-memory killer, a crash in an image decoder, an `os._exit` in a user's transform) makes Grain raise a
bare `RuntimeError` ("Worker process was terminated unexpectedly with exit code ..."); `worker_died` turns
it into a `DataWorkerError` that says what happened and what to change. A worker that never answers (a file
that blocks when opened, on a stalled network file system; a decoder that hangs) is stopped by the trainer
after its `data_timeout` (`TrainPipeline.stalled`), and its `DataWorkerError` names the batch and its files.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from typing import Any

from ._datasets import Dataset

__all__ = ["WORKER_STARTUP_S", "DataWorkerError", "default_data_workers"]

# How much longer than `data_timeout` the first batch of a stream may take: its workers start (a spawned
# interpreter, its imports) before they read anything.
WORKER_STARTUP_S = 60.0

# What Grain (0.2.16 and later) raises in the trainer when a worker process has exited with a non-zero code.
_GRAIN_WORKER_DIED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")
# The names Grain (0.2.16) gives its worker processes.
_GRAIN_WORKER = "grain-process-prefetch"


class DataWorkerError(RuntimeError):
    """A data worker process died, or gave no batch in time, while preparing data.

    - `exit_code`: the dead worker's exit status (`-N`: signal N); `None` for a worker that never answered.
    - `batch`: the global batch number that did not come (`None` when not known); `epoch` and `index` its
        position (`batch = epoch * steps_per_epoch + index`).
    - `paths`: where that batch's examples come from (`source.describe`), when known.
    """

    def __init__(
        self,
        message: str,
        exit_code: int | None = None,
        *,
        batch: int | None = None,
        epoch: int | None = None,
        index: int | None = None,
        paths: tuple[str, ...] = (),
    ):
        super().__init__(message)
        self.exit_code = exit_code
        self.batch, self.epoch, self.index, self.paths = batch, epoch, index, tuple(paths)

    def __reduce__(self):  # crosses processes whole, as `BadImageError` does
        return (
            _rebuild,
            (type(self), str(self), self.exit_code, self.batch, self.epoch, self.index, self.paths),
        )


def _rebuild(cls, message, exit_code, batch, epoch, index, paths):
    return cls(message, exit_code, batch=batch, epoch=epoch, index=index, paths=paths)


def default_data_workers(source: Any, transform: Any) -> int:
    """Worker processes for `source`: none for arrays in memory without a per-image transform (reading them
    is one indexing), else one per core left over beside the training step, at most 8."""
    if isinstance(source, Dataset) and transform is None:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def worker_init(worker_index: int, worker_count: int) -> None:
    """In each data worker: die with the trainer (Linux), and leave Ctrl-C to it (it stops the workers)."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "sched_getaffinity"):  # Linux: PR_SET_PDEATHSIG, so a SIGKILLed trainer leaves no worker
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def _cause(exit_code: int, workers: int) -> str:
    """What a worker's exit code says happened, and what to change."""
    if exit_code >= 0:
        return (
            f"it exited with status {exit_code}: code run in the worker ended it (its traceback is above). "
            f"Most often a script that trains without `if __name__ == \"__main__\":` (each worker imports "
            f"the script again, as multiprocessing's spawn does), or a transform that calls `sys.exit`"
        )
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    if -exit_code in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL):
        return (
            f"it crashed ({name}) in native code, e.g. an image decoder on a damaged file: `--check-data` "
            f"(`cait_eqx.data.find_bad_images`) reads every file once and names the bad ones"
        )
    killed = f"it was killed by {name}"
    if -exit_code == signal.SIGKILL:
        killed += (
            ": on Linux most often the kernel's out-of-memory killer (`dmesg` says so), or someone killed it"
        )
    return (
        f"{killed}. If memory ran out, give the workers less to hold: fewer of them (now {workers}; "
        f"`--data-workers` / `TrainConfig.data_workers`; 0 reads in this process), smaller batches or images"
    )


def worker_died(error: BaseException, workers: int, doing: str) -> DataWorkerError | None:
    """The `DataWorkerError` for Grain's error about a dead worker (else `None`: not about a worker).

    **Arguments:**

    - `error`: what the Grain iterator raised.
    - `workers`: the worker processes the pipeline ran.
    - `doing`: what they were doing, e.g. "preparing training batches".
    """
    found = _GRAIN_WORKER_DIED.search(str(error)) if isinstance(error, RuntimeError) else None
    if found is None:
        return None
    code = int(found.group(1))
    return DataWorkerError(
        f"A data worker process died while {doing}: {_cause(code, workers)}. The batches it held are lost, "
        f"so this cannot go on.",
        code,
    )


def children() -> set[int]:
    """The process ids of this process's live multiprocessing children (taken before a stream starts, to
    tell its workers from what was there already)."""
    return {child.pid for child in multiprocessing.active_children()}


def kill_workers(others: set[int]) -> None:
    """SIGKILL the Grain workers of this process that are not in `others` (a worker blocked in a read cannot
    be asked to stop); the stream that waited for them then ends with Grain's error about a dead worker."""
    for child in multiprocessing.active_children():
        if child.name.startswith(_GRAIN_WORKER) and child.pid not in others:
            child.kill()
