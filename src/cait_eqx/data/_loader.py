"""Evaluation batches in dataset order, and running an iterator ahead in a thread (`prefetch`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["eval_batches", "prefetch"]


def eval_batches(dataset: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole dataset (a `Dataset` or a lazy source) in order, in fixed-size batches: `(images, labels,
    valid)`.

    The last batch is padded (repeating the first example) to `batch_size`, so an evaluation step compiles
    once; `valid` marks the real examples.
    """
    n = len(dataset)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        take = np.arange(start, start + batch_size)
        valid = take < stop
        take = np.where(valid, take, 0)
        yield dataset.read(take), dataset.labels[take].astype(np.int32), valid


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(
    iterator: Iterator[Any], size: int = 2, put: Callable[[Any], Any] | None = None
) -> Iterator[Any]:
    """Run `iterator` (and `put` on each item, e.g. `jax.device_put`) in a thread, `size` items ahead.

    An error in the thread is raised in the consumer. Closing the returned generator (or leaving its `for`
    loop) stops the thread, which then closes `iterator` (when it has a `close`, as generators do).

    **Arguments:**

    - `iterator`: the items to produce.
    - `size`: how many items may wait in the queue.
    - `put`: applied to every item in the thread (a device transfer, sharding, ...).

    **Returns:** a generator of the (put) items, in order.
    """
    if size < 1:
        raise ValueError(f"`size` must be >= 1, got {size}.")
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
        try:
            while True:
                item = items.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join(timeout=5.0)

    return consume()
