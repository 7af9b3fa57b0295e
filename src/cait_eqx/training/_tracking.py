"""Experiment trackers: where `fit`'s records go besides `metrics.jsonl` (TensorBoard, Weights & Biases).

A tracker has two methods, `write(record)` and `close()`; `MetricsLog` hands every record to each tracker the
run asked for (`TrainConfig.log`). A record is a flat dict with `step`, `split` (`"train"` or `"test"`) and
numbers; a tracker names its scalars `split/name` (e.g. `train/loss`, `test/accuracy`). The packages are
optional (`pip install "cait_eqx[tracking]"`) and imported only when a tracker is opened.
"""

from __future__ import annotations

import os
import secrets
import sys
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["TRACKERS", "TensorBoardTracker", "Tracker", "WandbTracker", "open_trackers", "scalars"]

from ._config import TRACKERS

_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}


@runtime_checkable
class Tracker(Protocol):
    """Receives the training records (`write`) and is closed when `fit` ends (`close`)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record, named `split/name` (`step` and `split` themselves left out)."""
    split = record.get("split", "train")
    return {
        f"{split}/{name}": float(value)
        for name, value in record.items()
        if name not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _import(tracker: str):
    package = _PACKAGES[tracker]
    try:
        if package == "tensorboardX":
            with warnings.catch_warnings():
                # tensorboardX's generated protobuf modules warn about protobuf's runtime version on import.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"google\.protobuf\..*")
                import tensorboardX

            return tensorboardX
        import wandb

        return wandb
    except ImportError as error:
        raise ImportError(
            f"Logging to {tracker} (TrainConfig log / --log) needs the package `{package}`, which is not "
            f"installed. Install the tracking extra: pip install \"cait_eqx[tracking]\" (or pip install "
            f"{package})."
        ) from error


class TensorBoardTracker:
    """Scalars to TensorBoard event files in `run_dir/tensorboard`, through `tensorboardX` (no TensorFlow).

    A resumed run writes to the same folder from its resume step on: `purge_step` tells TensorBoard to drop
    what an earlier process logged after that step, as `metrics.jsonl` drops it.
    """

    def __init__(self, run_dir: Path, resume_step: int | None):
        tensorboardX = _import("tensorboard")
        purge = None if resume_step is None else resume_step + 1
        self.writer = tensorboardX.SummaryWriter(logdir=str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["step"]))
        # Now, not in tensorboardX's thread: a full disk then fails here, where `MetricsLog` drops the tracker
        # and the run goes on (one record per `log_every` steps: the flush costs nothing that shows).
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """Scalars to a Weights & Biases run in `run_dir/wandb`.

    Offline (files only, for `wandb sync` later) unless wandb has credentials (`WANDB_API_KEY`, `wandb
    login`) or the user chose a mode (`WANDB_MODE`); never prompts. Console capture and system statistics
    are off, and the `sys.excepthook`/`sys.exit` that `wandb.init` replaces are put back. (Importing wandb
    still wraps `sys.stdout.write`, and it keeps a `wandb-core` service process until the interpreter
    exits: that is wandb's, asked for by `--log wandb`.) A resumed run continues the same W&B run id (kept
    in `run_dir/wandb/run_id`).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None):
        wandb = _import("wandb")
        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        # wandb decides (the user's WANDB_MODE or `wandb offline`, else online) where the user chose or has
        # credentials; otherwise offline, so that it never asks for a key.
        mode = None if os.environ.get("WANDB_MODE") or _wandb_credentials() else "offline"
        self._hooks = sys.excepthook, sys.exit
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cait_eqx"),
            name=run_dir.name,
            id=run_id,
            dir=str(run_dir),
            config=config,
            mode=mode,
            # (offline, `resume` only draws a warning: an offline run with the same id is a new segment)
            resume="allow" if resume_step is not None and mode != "offline" else None,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self._restore_hooks()

        self._step: int | None = None
        self._row: dict[str, float] = {}

    def write(self, record: dict[str, Any]) -> None:
        # W&B keeps one row per step and ignores a step logged after a later one: the records of one step
        # (train and test) go in together, once the next step begins or the run closes.
        step = int(record["step"])
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._row.update(scalars(record))

    def flush(self) -> None:
        """Send the pending step's row."""
        if self._step is not None:
            self.run.log(self._row, step=self._step, commit=True)
        self._step, self._row = None, {}

    def _restore_hooks(self) -> None:
        # `wandb.init` replaces `sys.excepthook` and `sys.exit` with its own and never puts them back.
        for name, before in zip(("excepthook", "exit"), self._hooks, strict=True):
            now = getattr(sys, name)
            if now is not before and type(getattr(now, "__self__", None)).__module__.startswith("wandb"):
                setattr(sys, name, before)

    def close(self) -> None:
        try:
            self.flush()
            self.run.finish()
        finally:
            self._restore_hooks()


def _wandb_credentials() -> bool:
    """Whether wandb would find credentials: an API key or identity token in the environment, or
    `wandb login`'s netrc entry for its host (read only)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def open_trackers(
    names: tuple[str, ...], run_dir: Path | None, config: dict[str, Any], resume_step: int | None
) -> list[Tracker]:
    """The trackers of `names` besides `jsonl` (which `MetricsLog` writes itself), for `run_dir` (none
    without a run directory: nothing is written then). Raises `ImportError` naming the extra to install."""
    if run_dir is None:
        return []
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_dir, resume_step))
            elif name == "wandb":
                opened.append(WandbTracker(run_dir, config, resume_step))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
