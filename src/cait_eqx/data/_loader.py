"""Seeded, resumable batch iteration with background prefetching."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._datasets import Dataset
from ._pipeline import Sampler

__all__ = ["Batch", "BatchLoader", "eval_batches", "prefetch"]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch and where it sits in the data stream.

    `epoch` and `index` (the batch's number within its epoch) are the data position a checkpoint records.
    `images` and `labels` are NumPy arrays, or device arrays once `put` has run on them.
    """

    epoch: int
    index: int
    images: Any
    labels: Any


class BatchLoader:
    """Shuffled, seeded batches of a `Dataset`, epoch after epoch, restartable at any (epoch, batch) position.

    The order of epoch `e` is a permutation drawn from `numpy.random.default_rng([seed, e])`: it depends only
    on the seed and the epoch number (never on a global RNG or on earlier iteration), so a resumed run sees
    exactly the batches the interrupted run would have seen. Incomplete last batches are dropped
    (`drop_last`), so every batch has the same shape and the training step compiles once; the dropped
    examples differ from epoch to epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True):
        """**Arguments:**

        - `dataset`: the examples.
        - `batch_size`: examples per batch; at most `len(dataset)`.
        - `seed`: the shuffling seed. (Keyword only argument.)
        - `shuffle`: shuffle every epoch (otherwise dataset order). (Keyword only argument.)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if len(dataset) < batch_size:
            raise ValueError(
                f"The dataset {dataset.name!r} has {len(dataset)} examples, fewer than one batch of "
                f"{batch_size}. Use a batch size of at most {len(dataset)} or more data."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch`, in the order they are served."""
        return Sampler(len(self.dataset), self.batch_size, self.seed, self.shuffle).order(epoch)

    def batches(
        self,
        start_epoch: int = 0,
        start_index: int = 0,
        stop_epoch: int | None = None,
        *,
        rows: slice = slice(None),
    ) -> Iterator[Batch]:
        """Batches from position `(start_epoch, start_index)` to the end of epoch `stop_epoch - 1`.

        **Arguments:**

        - `start_epoch`, `start_index`: the position of the first batch (a checkpoint's data position).
        - `stop_epoch`: stop before this epoch; `None` runs forever.
        - `rows`: which rows of each batch to load (all by default; one process's share on a multi-host
            mesh, see `cait_eqx.parallel.process_local_batches`). (Keyword only argument.)

        **Returns:** an iterator of `Batch` with NumPy `images` and `int32` `labels`.
        """
        if not 0 <= start_index <= self.steps_per_epoch:
            raise ValueError(f"`start_index` must be in [0, {self.steps_per_epoch}], got {start_index}.")
        epoch, index = start_epoch, start_index
        while stop_epoch is None or epoch < stop_epoch:
            order = self.order(epoch)
            for b in range(index, self.steps_per_epoch):
                take = order[b * self.batch_size : (b + 1) * self.batch_size][rows]
                yield Batch(epoch, b, self.dataset.read(take), self.dataset.labels[take].astype(np.int32))
            epoch, index = epoch + 1, 0


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
