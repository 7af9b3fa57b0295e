"""Training batches: a random-access source, read and transformed in worker processes.

The stream's element `b` is global batch number `b` (epoch `b // steps_per_epoch`) as this process loads
it: the examples come from the `Sampler`'s order of that epoch (DeiT's repeated augmentation included), this
process's rows of it only, each read (and, with a `transform`, augmented from a generator seeded by its
position) by `_BatchReader`. Everything an element holds is a pure function of `b`, so any number of
workers (`WorkerPool`: light processes that never import JAX) gives the same bytes, and a run resumes
exactly from its batch number (a checkpoint holds no iterator state: the position says it all).

A worker that never answers (a read that blocks for ever) cannot be interrupted from outside its process:
the trainer waits for a batch at most `data_timeout` seconds, then `TrainPipeline.stalled` kills this
pipeline's workers (which ends the stream) and names the batch that did not come and its files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "BAD_IMAGE_POLICIES",
    "PipelineBatch",
    "Sampler",
    "TrainPipeline",
]

from .._constants import BAD_IMAGE_POLICIES
from ._decode import BadImageError
from ._workers import DataWorkerError, WorkerPool, default_data_workers

# How many other examples a skipped one may try before the batch gives up (a folder of mostly bad files).
_MAX_REPLACEMENTS = 64
# How many of a stalled batch's files its error message lists before it only counts the rest.
_LISTED = 4


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The order in which a training run sees its examples, epoch after epoch.

    Epoch `e` is a permutation drawn from `numpy.random.default_rng([seed, e])` (a pure function of the seed
    and the epoch number). With `repeats = r > 1` this is DeiT's repeated augmentation (its `RASampler`):
    each example of the permutation is served `r` times in a row (the copies land in the same global batch,
    on different devices, and are augmented independently) and the epoch keeps its length, so it covers
    about `1/r` of the examples. Each epoch has `steps_per_epoch` whole batches; the rest is dropped.
    """

    num_examples: int
    batch_size: int
    seed: int
    shuffle: bool = True
    repeats: int = 1

    def __post_init__(self):
        for name in ("num_examples", "batch_size", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Sampler `{name}` must be a positive int, got {value!r}.")
        if self.num_examples < self.batch_size:
            raise ValueError(
                f"The dataset has {self.num_examples} examples, fewer than one batch of {self.batch_size}. "
                f"Use a batch size of at most {self.num_examples} or more data."
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch` in the order they are served (`num_examples` of them)."""
        n = self.num_examples
        if not self.shuffle:
            return np.repeat(np.arange(n), self.repeats)[:n]
        permutation = np.random.default_rng([self.seed, epoch]).permutation(n)
        return permutation if self.repeats == 1 else np.repeat(permutation, self.repeats)[:n]


class _BatchReader:
    """Builds batch number `b` for one process: runs in the data workers (pickled there)."""

    def __init__(self, source, sampler: Sampler, rows: slice, transform, bad_images: str):
        self.source, self.sampler, self.transform, self.bad_images = source, sampler, transform, bad_images
        start, stop, _ = rows.indices(sampler.batch_size)
        self.rows = (start, stop)
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch's order, per worker

    def __getstate__(self):
        return {**self.__dict__, "_order": None}

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.order(epoch))
        return self._order[1]

    def __call__(self, b: int, empty=np.empty) -> dict[str, np.ndarray]:
        """Batch `b`; its images built in `empty(shape, dtype)` (a worker's: in shared memory)."""
        sampler, source = self.sampler, self.source
        epoch, index = divmod(int(b), sampler.steps_per_epoch)
        order = self.order(epoch)
        start = index * sampler.batch_size
        positions = np.arange(start + self.rows[0], start + self.rows[1])
        skipped = 0
        if self.transform is None and self.bad_images == "error":
            images = self._read_many(order[positions])
        else:
            examples = []
            for position in positions.tolist():
                pixels, misses = self._read_one(order, position)
                skipped += misses
                if self.transform is not None:
                    # Seeded by the example's place in the stream: the same bytes whatever the workers.
                    rng = np.random.default_rng([sampler.seed, 1, epoch, position])
                    pixels = self.transform(pixels, rng)
                examples.append(pixels)
            first = examples[0] if examples else np.empty(0)
            images = np.stack(examples, out=empty((len(examples), *first.shape), first.dtype))
        labels = source.labels[order[positions]].astype(np.int32)
        return {"images": images, "labels": labels, "batch": np.int64(b), "skipped": np.int64(skipped)}

    def _fail(self, index: int, error: Exception) -> BadImageError:
        where = self.source.describe(index)
        return BadImageError(
            f"Cannot read {where}: {error} Find every such file before training with `--check-data` "
            f"(`check_images`), or skip them with `--bad-images skip` (`bad_images='skip'`).",
            [where],
        )

    def _read_many(self, indices: np.ndarray) -> np.ndarray:
        try:
            return self.source.read(indices)
        except ValueError:  # find which one, and name it
            for index in indices.tolist():
                try:
                    self.source.read(np.asarray([index]))
                except ValueError as error:
                    raise self._fail(index, error) from None
            raise

    def _read_one(self, order: np.ndarray, position: int) -> tuple[np.ndarray, int]:
        """Example `order[position]` (native size with a transform, else the source's size); in skip mode a
        file that cannot be read is replaced by the next readable one of the epoch's order."""
        read = (
            self.source.read_native
            if self.transform is not None
            else (lambda i: self.source.read(np.asarray([i]))[0])
        )
        for attempt in range(_MAX_REPLACEMENTS + 1):
            index = int(order[(position + attempt) % len(order)])
            try:
                return read(index), attempt
            except ValueError as error:
                if self.bad_images == "error":
                    raise self._fail(index, error) from None
        raise self._fail(int(order[position]), ValueError(f"nor the {_MAX_REPLACEMENTS} examples after it."))


@dataclasses.dataclass
class PipelineBatch:
    """One batch from `TrainPipeline.batches`: its position, its arrays, and `skipped`, the unreadable
    examples replaced in it (`bad_images="skip"`)."""

    epoch: int
    index: int
    images: np.ndarray
    labels: np.ndarray
    skipped: int


class TrainPipeline:
    """Shuffled, seeded, resumable training batches of a source, read in worker processes.

    **Arguments:**

    - `source`: a `Dataset`, or a lazy source (`scan_image_folder`, `open_arrays`, `subset`s of them).
    - `batch_size`: the global batch (all processes together).
    - `seed`: the order's and the transforms' seed. (Keyword only argument, like all that follow.)
    - `rows`: which rows of every global batch this process loads (all of them with one process; see
        `cait_eqx.parallel.local_batch_rows`).
    - `transform`: a per-image transform run in the workers, `transform(pixels, rng) -> pixels` on
        `uint8` `(channels, height, width)` images at their native size (e.g. `TrainTransform`), giving
        every image the same size; `None`: images at the source's `image_size`.
    - `workers`: worker processes (`WorkerPool`; 0: read in this process, in a thread); `None`:
        `default_data_workers`.
    - `shuffle`, `repeats`: as in `Sampler`.
    - `bad_images`: `"error"` (a file that cannot be read stops the run, naming it) or `"skip"` (it is
        replaced by the next readable example of the epoch and counted in `PipelineBatch.skipped`).
    - `buffer`: batches each worker prepares ahead of the ones taken.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        seed: int,
        rows: slice = slice(None),
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        workers: int | None = None,
        shuffle: bool = True,
        repeats: int = 1,
        bad_images: str = "error",
        buffer: int = 2,
    ):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"`bad_images` must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}.")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"`workers` must be an int >= 0 (or None: automatic), got {workers!r}.")
        self.sampler = Sampler(len(source), batch_size, int(seed), shuffle, repeats)
        self.source, self.transform, self.bad_images, self.buffer = source, transform, bad_images, buffer
        self.rows = rows
        self.workers = default_data_workers(source, transform) if workers is None else workers
        # The worker processes of the stream running now (none without workers, or before it starts).
        self._pool: WorkerPool | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def _iterator(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        reader = _BatchReader(self.source, self.sampler, self.rows, self.transform, self.bad_images)
        if self.workers == 0:
            # Read in the calling thread (a daemon `prefetch` thread in `fit`): a read that never returns
            # then cannot keep the process from exiting.
            return map(reader, range(start, stop))
        self._pool = WorkerPool(
            reader, start, stop, self.workers, "preparing training batches", ahead=self.buffer
        )
        return iter(self._pool)

    def batches(
        self,
        start_epoch: int = 0,
        start_index: int = 0,
        stop_epoch: int | None = None,
    ) -> Iterator[PipelineBatch]:
        """Batches from position `(start_epoch, start_index)` to the end of epoch `stop_epoch - 1`: the same
        bytes whatever the position the stream starts at (a resumed run passes its checkpoint's).

        **Arguments:**

        - `start_epoch`, `start_index`: the position of the first batch.
        - `stop_epoch`: stop before this epoch; `None`: run on (for 2**40 batches).

        **Returns:** a generator of `PipelineBatch`; closing it stops the workers.
        """
        spe = self.steps_per_epoch
        if not 0 <= start_index <= spe:
            raise ValueError(f"`start_index` must be in [0, {spe}], got {start_index}.")
        position = start_epoch * spe + start_index
        stop = 2**40 if stop_epoch is None else stop_epoch * spe
        if position >= stop:
            return
        iterator = self._iterator(position, stop)
        try:
            for element in iterator:
                epoch, index = divmod(int(element["batch"]), spe)
                yield PipelineBatch(
                    epoch, index, element["images"], element["labels"], int(element["skipped"])
                )
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def batch_examples(self, b: int) -> np.ndarray:
        """The example indices this process reads for global batch number `b` (before any skipped one is
        replaced)."""
        epoch, index = divmod(int(b), self.steps_per_epoch)
        start, stop, _ = self.rows.indices(self.sampler.batch_size)
        first = index * self.sampler.batch_size
        return self.sampler.order(epoch)[first + start : first + stop]

    def stalled(self, b: int, seconds: float | int) -> DataWorkerError:
        """Batch number `b` has not come in `seconds`: stop this pipeline's worker processes (SIGKILL, as a
        worker blocked in a read cannot finish it), which ends the stream and frees what it holds, and return
        the error to raise.

        **Arguments:**

        - `b`: the global batch number that did not come.
        - `seconds`: how long it was waited for.

        **Returns:** a `DataWorkerError` naming the batch (`batch`, `epoch`, `index`) and its files (`paths`).
        """
        if self._pool is not None:
            self._pool.kill()
        epoch, index = divmod(int(b), self.steps_per_epoch)
        paths = tuple(self.source.describe(int(i)) for i in self.batch_examples(b))
        more = len(paths) - _LISTED
        listed = ", ".join(paths[:_LISTED]) + (f" and {more} more" if more > 0 else "")
        reader = f"its {self.workers} data worker(s)" if self.workers else "the thread that reads them"
        return DataWorkerError(
            f"Training batch {b} (epoch {epoch}, batch {index} of {self.steps_per_epoch}) did not come from "
            f"{reader} in {seconds:g} s: one of its files blocks when read (a stalled network file system, "
            f"a named pipe) or its decoding hangs. Its files: {listed}. Check that they read (e.g. `cat FILE "
            f"> /dev/null`); if the batches are only slow, raise --data-timeout (`TrainConfig.data_timeout`; "
            f"0 waits for ever).",
            batch=int(b),
            epoch=epoch,
            index=index,
            paths=paths,
        )
