"""The data worker processes: how many, how each starts, and what the trainer says when one dies.

`WorkerPool` computes `task(i)` for `i` in a range of numbers in worker processes (spawned) and gives the
results in order: worker `k` of `n` computes `start + k`, `start + k + n`, ..., a few ahead of what the
trainer took, and hands each over through shared memory (its large arrays: `_shared`) and its own pipe (the
rest). A worker is kept light: it starts from a few lines that switch
the package's jaxtyping hook off in its own process, so reading, decoding and augmenting images imports
NumPy and PIL but never JAX (about 45 MB resident, against about 180 MB for a process that imports JAX;
`benchmarks/worker_memory.py`). Because every result is a pure function of its number, any number of
workers gives the same results, and a stream resumes from any number.

A worker starts by tying its life to the trainer's (a SIGKILLed trainer leaves no worker behind) and by
leaving Ctrl-C to the trainer (which stops the workers itself). A worker that dies (the kernel's
out-of-memory killer, a crash in an image decoder, an `os._exit` in a user's transform) is seen at once
(its process sentinel) and becomes a `DataWorkerError` that says what happened and what to change. A worker
that never answers (a file that blocks when opened, on a stalled network file system; a decoder that hangs)
is stopped by the trainer after its `data_timeout` (`TrainPipeline.stalled`, `WorkerPool.kill`), and its
`DataWorkerError` names the batch and its files.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .._constants import DATA_WORKER_NAME
from ._datasets import Dataset
from ._shared import MAX_BLOCKS, Blocks, block_name, new_prefix, receive, sweep

__all__ = ["WORKER_STARTUP_S", "DataWorkerError", "WorkerPool", "default_data_workers"]

# How much longer than `data_timeout` the first batch of a stream may take: its workers start (a spawned
# interpreter, its imports) before they read anything.
WORKER_STARTUP_S = 60.0

# What a worker process runs first (the target of a spawned `multiprocessing.Process` is `exec`, so nothing
# of this package is imported by unpickling it). The worker's name (`DATA_WORKER_NAME`-k) keeps the package's
# jaxtyping hook off in it, even when the parent's main script, which spawn runs again first, imports
# `cait_eqx`: the hook's first checked function would import JAX. Then the worker loop starts.
_BOOT = """
from cait_eqx.data._workers import serve
serve(*arguments)
"""

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


def worker_init() -> None:
    """In each data worker: die with the trainer (Linux), and leave Ctrl-C to it (it stops the workers)."""
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


def worker_died(exit_code: int, workers: int, doing: str) -> DataWorkerError:
    """The `DataWorkerError` for a worker process that ended with `exit_code` while it had work to do.

    **Arguments:**

    - `exit_code`: its exit status (`-N`: killed by signal N).
    - `workers`: the worker processes the pipeline ran.
    - `doing`: what they were doing, e.g. "preparing training batches".
    """
    return DataWorkerError(
        f"A data worker process died while {doing}: {_cause(exit_code, workers)}. The batches it held are "
        f"lost, so this cannot go on.",
        exit_code,
    )


def serve(payload: bytes, first: int, stop: int, step: int, ahead: int, conn: Any, prefix: str) -> None:
    """A worker process's loop: `task(i, empty)` for `i` in `range(first, stop, step)`, each sent through
    `conn` as `("ok", result, blocks)` (its large arrays in shared memory blocks named from `prefix`:
    `_shared.Blocks`), at most `ahead` results ahead of what the trainer took (it answers each with an empty
    message); an error is sent as `("error", error, traceback)` and ends the loop."""
    worker_init()
    task = pickle.loads(payload)
    blocks = Blocks(prefix)
    for sent, i in enumerate(range(first, stop, step)):
        try:
            if sent >= ahead:
                conn.recv_bytes()  # wait until the trainer took one
        except (EOFError, OSError):  # the trainer stopped reading: nothing more to do
            return
        blocks.begin(i)
        try:
            message = ("ok", *blocks.pack(task(i, blocks.empty)))
        except Exception as error:  # noqa: BLE001 — handed to the trainer, which raises it
            message = ("error", error, traceback.format_exc())
        try:
            conn.send(message)
        except (BrokenPipeError, EOFError):  # the trainer stopped reading: nothing more to do
            return
        except Exception:  # noqa: BLE001 — what cannot be pickled: send what went wrong, as text
            said = message[2] if message[0] == "error" else traceback.format_exc()
            conn.send(("error", RuntimeError(said.strip().splitlines()[-1]), said))
            return
        finally:
            blocks.release()  # the trainer removes them (or, if the stream ends first, `_shutdown` does)
        if message[0] == "error":
            return


class _Stream:
    """A pool's processes, pipes and shared memory blocks: what `_shutdown` releases (the pool's finalizer,
    which must not hold the pool itself)."""

    def __init__(self, start: int, stop: int, workers: int, ahead: int):
        self.start, self.stop, self.workers, self.ahead = start, stop, workers, ahead
        self.prefix = new_prefix()
        self.processes: list[Any] = []
        self.pipes: list[Any] = []
        self.received = [0] * workers  # results taken from each worker
        self.lock = threading.Lock()  # a result read while another thread shuts the stream down
        self.closed = False

    def unclaimed(self) -> Iterator[str]:
        """The names of every block a worker may have made and not yet handed over: worker `k`, having
        handed over `received[k]` results, computes at most `ahead` more before it waits."""
        for k, taken in enumerate(self.received):
            for j in range(taken, taken + self.ahead + 1):
                number = self.start + k + j * self.workers
                if number < self.stop:
                    yield from (block_name(self.prefix, number, place) for place in range(MAX_BLOCKS))


def _kill(processes: list[Any]) -> None:
    for process in processes:
        if process.exitcode is None:
            try:
                process.kill()
            except (OSError, ValueError):  # already gone, or closed
                pass


def _shutdown(stream: _Stream) -> None:
    """Stop the workers, release their pipes, and remove the blocks nobody took (once; also at exit)."""
    with stream.lock:
        stream.closed = True
        _kill(stream.processes)
        for process in stream.processes:
            process.join(timeout=5.0)
        for pipe in stream.pipes:
            pipe.close()
        # After the joins: no worker makes a block any more.
        sweep(stream.unclaimed())


class WorkerPool:
    """`task(i, empty)` for `i` in `range(start, stop)`, computed in `workers` spawned processes, given in
    order.

    **Arguments:**

    - `task`: a picklable callable (cloudpickle: a lambda or a local function too), `task(i, empty) ->
        result`; `empty(shape, dtype)` gives an uninitialised array to build the result's large arrays in:
        such an array (a value of a dict result, or the result itself) travels to this process through
        shared memory, not the pipe, and is copied once here.
    - `start`, `stop`: the numbers to compute.
    - `workers`: how many processes (>= 1); worker `k` computes `start + k`, `start + k + workers`, ...
    - `doing`: what they do, for the error when one dies (e.g. "preparing training batches").
    - `ahead`: how many results each worker prepares ahead of the ones taken. (Keyword only argument.)

    Iterating gives the results in order; an error raised by `task` is raised here (with the worker's
    traceback as a note), and a worker that dies raises `DataWorkerError` with its exit status. `kill` (also
    from another thread) stops every worker at once; `close` stops them, releases the pipes and removes the
    shared memory blocks not taken (also done when the pool is garbage-collected, or at exit).
    """

    def __init__(
        self, task: Callable[..., Any], start: int, stop: int, workers: int, doing: str, *, ahead: int = 1
    ):
        import cloudpickle

        if workers < 1:
            raise ValueError(f"`workers` must be >= 1, got {workers}.")
        if ahead < 1:
            raise ValueError(f"`ahead` must be >= 1, got {ahead}.")
        context = multiprocessing.get_context("spawn")
        payload = cloudpickle.dumps(task)
        self.start, self.stop, self.workers, self.doing = start, stop, workers, doing
        self._stream = stream = _Stream(start, stop, workers, ahead)
        self._finalizer = weakref.finalize(self, _shutdown, stream)
        try:
            for k in range(workers):
                mine, theirs = context.Pipe()
                arguments = (payload, start + k, stop, workers, ahead, theirs, stream.prefix)
                process = context.Process(
                    target=exec,
                    args=(_BOOT, {"arguments": arguments}),
                    name=f"{DATA_WORKER_NAME}-{k}",
                    daemon=True,  # stopped by multiprocessing when the trainer exits
                )
                process.start()
                theirs.close()  # the worker holds its end: its exit ends the pipe
                stream.processes.append(process)
                stream.pipes.append(mine)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.start, self.stop):
            yield self._receive((i - self.start) % self.workers)

    def _receive(self, k: int) -> Any:
        stream = self._stream
        pipe, process = stream.pipes[k], stream.processes[k]
        try:
            multiprocessing.connection.wait([pipe, process.sentinel])
            message = pipe.recv()  # what was sent before an exit is still read
        except (EOFError, OSError):  # the worker ended without sending it (or the pool was closed)
            process.join(timeout=5.0)
            code = process.exitcode
            raise worker_died(-signal.SIGKILL if code is None else code, self.workers, self.doing) from None
        if message[0] == "ok":
            with stream.lock:
                if stream.closed:  # shut down from another thread: its blocks are gone
                    raise DataWorkerError(f"The data workers were stopped while {self.doing}.")
                result = receive(message[1], message[2])
                stream.received[k] += 1
            try:
                pipe.send_bytes(b"")  # taken: the worker may prepare one more
            except OSError:  # it has sent its last one and gone
                pass
            return result
        _, error, where = message
        error.add_note(f"In data worker {k}:\n{where}")
        raise error

    def kill(self) -> None:
        """SIGKILL every worker (a worker blocked in a read cannot be asked to stop)."""
        _kill(self._stream.processes)

    def close(self) -> None:
        """Stop the workers, release their pipes and processes, and remove the blocks not taken."""
        self._finalizer()
