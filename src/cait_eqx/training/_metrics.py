"""What the training loop records: the window of steps between two log lines, and `metrics.jsonl` (written
by `MetricsLog`, read back by `read_metrics`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._atomic import DiskFullError, atomic_write_bytes

__all__ = ["METRICS_FILE", "MetricsLog", "TrainWindow", "read_metrics"]

logger = logging.getLogger("cait_eqx")

# The file of a run directory that holds its records (`Run.metrics_path`).
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class TrainWindow:
    """The training steps since the last `"train"` record: their summed loss and accuracy, and timing.

    `count` counts the steps whose metrics entered the sums (finite ones); `timed` every step, for the
    throughput. A checkpoint saves `saved()` so that a resumed run logs exactly what an unbroken one would.
    """

    loss: float = 0.0
    accuracy: float = 0.0
    count: int = 0
    timed: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, accuracy: float) -> None:
        self.loss += loss
        self.accuracy += accuracy
        self.count += 1

    def saved(self) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy, "count": self.count}

    @classmethod
    def restored(cls, saved: dict[str, Any]) -> TrainWindow:
        window = cls()
        window.loss = float(saved.get("loss", window.loss))
        window.accuracy = float(saved.get("accuracy", window.accuracy))
        window.count = int(saved.get("count", window.count))
        return window

    def reset(self, now: float) -> None:
        self.loss, self.accuracy, self.count, self.timed, self.start = 0.0, 0.0, 0, 0, now


class MetricsLog:
    """Appends records to `run_dir/metrics.jsonl` (one JSON object per line) and keeps them in memory.

    **Arguments:**

    - `run_dir`: the run directory; `None` keeps the records in memory only.
    - `resume_step`: the step a run resumes from: the records after it are dropped (they will be logged
        again). `None`: a new run, an empty file.
    - `trackers`: more destinations for every record (TensorBoard, W&B: `cait_eqx.training._tracking`),
        closed with this log. A tracker that fails (a full disk under its folder, a broken connection) is
        dropped with one warning on the `"cait_eqx"` logger, and the run goes on: `metrics.jsonl` keeps
        every record.

    **Raises** (from `write`): `cait_eqx.DiskFullError` when a line does not fit on the disk; the file is cut
    back to its last whole line.
    """

    def __init__(self, run_dir: Path | None, resume_step: int | None, trackers: Sequence[Any] = ()):
        self.records: list[dict[str, Any]] = []
        self.trackers = list(trackers)
        self.path = None if run_dir is None else Path(run_dir) / METRICS_FILE
        if self.path is not None and self.path.is_file():
            if resume_step is not None:
                kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            else:
                kept = []
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            self.records = kept
        # Unbuffered: each record is one `write` call, so a process that stops at any instant leaves whole
        # lines only (and at worst a cut last line, which `read_metrics` skips).
        self._handle = None if self.path is None else open(self.path, "ab", buffering=0)  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._handle is not None:
            line = (json.dumps(record) + "\n").encode()
            end = self._handle.tell()
            try:
                rest = memoryview(line)
                while rest:  # unbuffered: a write cut short by a full disk returns a count; the next fails
                    rest = rest[self._handle.write(rest) :]
            except OSError as error:
                os.ftruncate(self._handle.fileno(), end)  # no cut line in the middle of the file
                self._handle.seek(end)
                full = DiskFullError.from_error(error, self.path, end + len(line))
                if full is None:
                    raise
                raise full from None
        for tracker in list(self.trackers):
            self._call(tracker, "write", record)

    def _call(self, tracker: Any, method: str, *args: Any) -> None:
        """`tracker.method(*args)`; a tracker that fails is dropped with a warning, and the run goes on."""
        try:
            getattr(tracker, method)(*args)
        except Exception as error:  # noqa: BLE001 - third-party writers: any failure of theirs, same answer
            if tracker in self.trackers:
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):  # let go of its files; it failed once already
                    tracker.close()
            logger.warning(
                "cait_eqx: %s failed (%s: %s) and gets no more records; metrics.jsonl keeps them all.",
                type(tracker).__name__, type(error).__name__, error,
            )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        trackers, self.trackers = list(self.trackers), []
        for tracker in trackers:
            self._call(tracker, "close")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of the metrics file `path`, in file order (`Run.metrics` reads a run's).

    Blank lines are skipped, and so is an incomplete last line (a run killed mid-write); any other line that
    is not a JSON object with `"step"` and `"split"` is an error naming its number.

    **Raises:** `ValueError` for a damaged line.
    """
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("}"):
                break  # the run stopped while writing its last line
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict) or "step" not in record or "split" not in record:
            raise ValueError(
                f"{path}, line {number}: expected an object with 'step' and 'split', got {line[:80]!r}."
            )
        records.append(record)
    return records
