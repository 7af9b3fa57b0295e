"""A dataset read in order: evaluation batches, the `--check-data` pass (`find_bad_images`), and running an
iterator ahead in a thread with a bounded wait (`prefetch`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._datasets import Dataset
from ._workers import WORKER_STARTUP_S, DataWorkerError, WorkerPool, default_data_workers

__all__ = ["eval_batches", "find_bad_images", "prefetch"]

# How many of a stalled batch's files an error message lists before it only counts the rest.
_LISTED = 4


def eval_batches(
    dataset: Any,
    batch_size: int,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    timeout: float | int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole dataset (a `Dataset` or a lazy source) in order, in fixed-size batches: `(images, labels,
    valid)`.

    The last batch is padded (repeating the first example) to `batch_size`, so an evaluation step compiles
    once; `valid` marks the real examples. With a `transform` (e.g. `EvalTransform`, timm's resize and
    centre crop) each image is read at its own size (`read_native`) and transformed; without one the
    source's `read` gives its `image_size` (a bilinear resize of the whole image).

    **Arguments:**

    - `dataset`, `batch_size`, `transform`: as above.
    - `timeout`: the longest wait for one batch, in seconds (`None`: for ever). With a timeout the batches
        are read ahead in a thread (`prefetch`), so a read that never returns (a file that blocks when
        opened, a decoder that hangs) cannot hold the caller: after `timeout` seconds a `DataWorkerError`
        names the evaluation batch and its files (`paths`). (Keyword only argument.)
    """
    batches = _eval_batches(dataset, batch_size, transform)
    if timeout is None:
        yield from batches
        return
    n = len(dataset)
    count = -(-n // batch_size)

    def stalled(done: int) -> DataWorkerError:
        first, last = done * batch_size, min((done + 1) * batch_size, n) - 1
        paths = tuple(dataset.describe(i) for i in range(first, last + 1))
        more = len(paths) - _LISTED
        listed = ", ".join(paths[:_LISTED]) + (f" and {more} more" if more > 0 else "")
        return DataWorkerError(
            f"Evaluation batch {done} of {count} (images {first} to {last} of {dataset.name}) was not read "
            f"in {timeout:g} s: one of its files blocks when read (a stalled network file system, a named "
            f"pipe) or its decoding hangs. Its files: {listed}. Check that they read (e.g. `cat FILE > "
            f"/dev/null`); if reading is only slow, raise --data-timeout (`TrainConfig.data_timeout`; 0 "
            f"waits for ever).",
            paths=paths,
        )

    # Read in a daemon thread: a read that never returns there cannot hold the caller (nor its exit).
    found = prefetch(batches, size=2, timeout=timeout, on_timeout=stalled)
    try:
        yield from found
    finally:
        found.close()


def _eval_batches(dataset: Any, batch_size: int, transform: Any) -> Iterator[tuple[np.ndarray, ...]]:
    n = len(dataset)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        take = np.arange(start, start + batch_size)
        valid = take < stop
        take = np.where(valid, take, 0)
        if transform is None:
            images = dataset.read(take)
        else:
            images = np.stack([transform(dataset.read_native(int(i))) for i in take.tolist()])
        yield images, dataset.labels[take].astype(np.int32), valid


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(
    iterator: Iterator[Any],
    size: int = 2,
    put: Callable[[Any], Any] | None = None,
    *,
    timeout: float | int | None = None,
    startup: float | int = 0.0,
    on_timeout: Callable[[int], BaseException] | None = None,
) -> Iterator[Any]:
    """Run `iterator` (and `put` on each item, e.g. `jax.device_put`) in a thread, `size` items ahead.

    An error in the thread is raised in the consumer. Closing the returned generator (or leaving its `for`
    loop) stops the thread, which then closes `iterator` (when it has a `close`, as generators do).

    **Arguments:**

    - `iterator`: the items to produce.
    - `size`: how many items may wait in the queue.
    - `put`: applied to every item in the thread (a device transfer, sharding, ...).
    - `timeout`: the longest the consumer waits for one item, in seconds (`None`: for ever). (Keyword only
        argument.)
    - `startup`: how much longer the first item may take (e.g. `WORKER_STARTUP_S` while worker processes
        start). (Keyword only argument.)
    - `on_timeout`: called with the number of items already given when the wait runs out; it returns the
        error to raise (and may unblock the thread, e.g. `TrainPipeline.stalled` stops the workers).
        Default: a `TimeoutError`. (Keyword only argument.)

    **Returns:** a generator of the (put) items, in order.
    """
    if size < 1:
        raise ValueError(f"`size` must be >= 1, got {size}.")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"`timeout` must be > 0 seconds (or None: wait for ever), got {timeout}.")
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if put is not None:
                    item = put(item)
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as error:  # noqa: BLE001 — handed to the consumer
            offer(_Failure(error))
        finally:
            # A generator (e.g. `TrainPipeline.batches`) releases what it holds (its worker processes) here,
            # in the thread that ran it.
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def consume():
        # The thread starts with the first `next`: a generator that is never iterated leaves nothing behind.
        thread = threading.Thread(target=produce, name="cait-eqx-prefetch", daemon=True)
        thread.start()
        given, waited_out = 0, False
        try:
            while True:
                wait = None if timeout is None else timeout + (startup if given == 0 else 0.0)
                try:
                    item = items.get(timeout=wait)
                except queue.Empty:
                    waited_out = True
                    if on_timeout is not None:
                        raise on_timeout(given) from None
                    raise TimeoutError(f"No item came in {wait:g} s (after {given}).") from None
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                given += 1
                yield item
        finally:
            stop.set()
            # A thread stuck in the iterator is a daemon: not waited for long, it cannot hold the exit.
            thread.join(timeout=1.0 if waited_out else 5.0)

    return consume()


class _CheckChunk:
    """Reads examples `[start, start + size)` of a source whole; the ones that fail, with why."""

    def __init__(self, source, size: int):
        self.source, self.size = source, size

    def __call__(self, chunk: int, empty=np.empty) -> list[tuple[int, str]]:
        del empty  # a short list: through the pipe
        bad = []
        for index in range(chunk * self.size, min((chunk + 1) * self.size, len(self.source))):
            try:
                self.source.read_native(index)
            except ValueError as error:
                bad.append((index, str(error)))
        return bad


def find_bad_images(
    source: Any, *, workers: int | None = None, chunk: int = 256, timeout: float | int | None = None
) -> list[tuple[int, str]]:
    """Read every example of `source` once (in worker processes) and list those that cannot be read.

    What `--check-data` runs before training: a corrupt or unreadable file, an image of another size than
    the folder's (without `image_size`), a colour image in a folder read as greyscale.

    **Arguments:**

    - `source`: a `Dataset` (always readable) or a lazy source (not read again once `checked`).
    - `workers`: worker processes (`None`: `default_data_workers` for a transformed source). (Keyword only
        argument.)
    - `chunk`: examples per work item. (Keyword only argument.)
    - `timeout`: the longest wait for one chunk, in seconds (`None`: for ever); then the workers are stopped
        and a `DataWorkerError` names the chunk's files (one of them blocks when read). (Keyword only
        argument.)

    **Returns:** `(index, reason)` for every example that fails, in index order (`source.describe(index)`
    names its file).
    """
    if isinstance(source, Dataset) or len(source) == 0 or getattr(source, "checked", False):
        return []
    workers = default_data_workers(source, True) if workers is None else workers
    chunks = -(-len(source) // chunk)
    reader = _CheckChunk(source, chunk)
    pool = None
    if workers > 0:
        doing = "reading every image once (the --check-data pass)"
        pool = WorkerPool(reader, 0, chunks, workers, doing, ahead=2)

    def stalled(done: int) -> DataWorkerError:
        if pool is not None:
            pool.kill()
        first, last = done * chunk, min((done + 1) * chunk, len(source)) - 1
        paths = tuple(source.describe(i) for i in range(first, last + 1))
        return DataWorkerError(
            f"Reading images {first} to {last} of {source.name} (the --check-data pass) did not finish in "
            f"{timeout:g} s: one of them blocks when read (a stalled network file system, a named pipe) or "
            f"its decoding hangs. They are {paths[0]} to {paths[-1]}. Check that they read (e.g. `cat FILE "
            f"> /dev/null`); if reading is only slow, raise --data-timeout (`TrainConfig.data_timeout`; 0 "
            f"waits for ever).",
            paths=paths,
        )

    # Without workers, read in the `prefetch` thread itself (a daemon, unlike a pool's thread).
    chunks_read = map(reader, range(chunks)) if pool is None else iter(pool)

    # Read in a thread, so that a read that never returns cannot hold this one beyond `timeout`.
    startup = WORKER_STARTUP_S if workers else 0.0
    found = prefetch(chunks_read, size=2, timeout=timeout, startup=startup, on_timeout=stalled)
    try:
        return [item for bad in found for item in bad]
    finally:
        found.close()
        if pool is not None:
            pool.close()
