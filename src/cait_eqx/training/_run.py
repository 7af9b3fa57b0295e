"""A training run as a directory: `Run` names its files once and reads them back.

`RUN_DIR/config.json` (the `RunConfig`, the resolved model, library versions), `metrics.jsonl` (one JSON
record per line), `checkpoints/`, and once the run is complete `model.safetensors` (plus
`model_ema.safetensors` with an EMA), `curves.png` and `summary.json`. `train_run` writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.random as jr
from jaxtyping import PRNGKeyArray

from .._config import image_size_pair
from .._io import load
from .._model import CaiT
from ..data import DataSource, load_dataset, train_test_split
from ._checkpoint import load_checkpoint
from ._config import RunConfig
from ._optim import build_optimizer

__all__ = ["Run", "build_model", "load_run_config", "load_run_data"]

_WHICH = ("final", "ema", "checkpoint")


class Run:
    """A run directory, as `cait-eqx train` and `train_run` write it: its files, config, metrics and models.

    ```python
    run = Run("runs/digits-20250101-120000")
    run.config().train.lr, run.metrics()[-1], run.summary()
    model = run.model()                      # or run.model("ema"), run.model("checkpoint")
    train, test = run.data()
    ```

    **Arguments:**

    - `path`: the run directory (it need not exist yet).
    """

    CONFIG_FILE = "config.json"
    METRICS_FILE = "metrics.jsonl"
    SUMMARY_FILE = "summary.json"
    MODEL_FILE = "model.safetensors"
    EMA_MODEL_FILE = "model_ema.safetensors"
    CHECKPOINT_DIR = "checkpoints"
    CURVES_FILE = "curves.png"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        """`config.json`: the run's `RunConfig`, the resolved model, the data sizes, library versions."""
        return self.path / self.CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        """`metrics.jsonl`: one JSON record per logged step (`step`, `epoch`, `split`, `loss`, ...)."""
        return self.path / self.METRICS_FILE

    @property
    def summary_path(self) -> Path:
        """`summary.json`: the outcome of a complete run."""
        return self.path / self.SUMMARY_FILE

    @property
    def model_path(self) -> Path:
        """`model.safetensors`: the final model (`cait_eqx.load`)."""
        return self.path / self.MODEL_FILE

    @property
    def ema_model_path(self) -> Path:
        """`model_ema.safetensors`: the EMA of the weights, when the run kept one."""
        return self.path / self.EMA_MODEL_FILE

    @property
    def checkpoint_dir(self) -> Path:
        """`checkpoints/`: the newest checkpoints (`cait_eqx.training.list_checkpoints`)."""
        return self.path / self.CHECKPOINT_DIR

    @property
    def curves_path(self) -> Path:
        """`curves.png`: the training curves (`cait_eqx.viz.plot_training_curves`)."""
        return self.path / self.CURVES_FILE

    @property
    def exists(self) -> bool:
        """Whether the directory holds a run (its `config.json`)."""
        return self.config_path.is_file()

    def config(self) -> RunConfig:
        """The run's `RunConfig`.

        **Raises:** `FileNotFoundError` without a `config.json`; `ValueError` when it cannot be read.
        """
        path = self.config_path
        if not path.is_file():
            raise FileNotFoundError(
                f"No run configuration at {path}: is {self.path} a directory made by `cait-eqx train`?"
            )
        try:
            return RunConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"Cannot read the run configuration {path}: {error}") from None

    def metrics(self) -> list[dict[str, Any]]:
        """Every record of `metrics.jsonl`, in file order (an empty list before the first one).

        Blank lines are skipped, and so is an incomplete last line (a run killed mid-write); any other line
        that is not a JSON object with `"step"` and `"split"` is an error naming its number.

        **Raises:** `FileNotFoundError` without a `metrics.jsonl`; `ValueError` for a damaged line.
        """
        path = self.metrics_path
        if not path.is_file():
            raise FileNotFoundError(
                f"No metrics file at {path}: `cait-eqx train` writes RUN_DIR/{self.METRICS_FILE}; pass a run "
                f"directory."
            )
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

    def summary(self) -> dict[str, Any] | None:
        """The `summary.json` of a complete run; `None` before the run is complete."""
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text())

    def data(self) -> tuple[DataSource, DataSource]:
        """The run's `(train, test)` datasets, loaded, resized and split as the run did (`load_run_data`)."""
        return load_run_data(self.config())

    def model(self, which: str = "final") -> CaiT:
        """One of the run's models, in inference mode.

        **Arguments:**

        - `which`: `"final"` (`model.safetensors`), `"ema"` (`model_ema.safetensors`) or `"checkpoint"`
            (the model of the newest intact checkpoint; also for a run still going or interrupted).

        **Returns:** the `CaiT`.

        **Raises:** `FileNotFoundError` (with a hint) when that model is not there.
        """
        if which not in _WHICH:
            raise ValueError(f"`which` must be one of {', '.join(map(repr, _WHICH))}, got {which!r}.")
        if which == "checkpoint":
            return self._checkpoint_model()
        path = self.ema_model_path if which == "ema" else self.model_path
        if not path.is_file():
            hint = (
                "the run kept no EMA of the weights" if which == "ema"
                else "the run has not finished; its newest checkpoint is `model(\"checkpoint\")`"
            )
            raise FileNotFoundError(f"model file not found: {path} ({hint})")
        return load(path)

    def _checkpoint_model(self) -> CaiT:
        directory = self.checkpoint_dir
        if not directory.is_dir():
            raise FileNotFoundError(f"no checkpoints in {self.path} (expected {directory})")
        config = self.config()
        train_data, _ = self.data()
        # A checkpoint holds the leaves of (model, optimiser state, key): rebuild both templates as the run
        # built them (the optimiser state's structure depends on the recipe, e.g. an EMA adds leaves).
        template = build_model(config, train_data, key=jr.key(0))
        optim, _ = build_optimizer(config.train, len(train_data) // config.train.batch_size)
        opt_state = optim.init(eqx.filter(template, eqx.is_array))
        model, _, _, _ = load_checkpoint(directory, model=template, opt_state=opt_state)
        return eqx.nn.inference_mode(model)


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read `RUN_DIR/config.json` (`Run(run_dir).config()`)."""
    return Run(run_dir).config()


def load_run_data(config: RunConfig) -> tuple[DataSource, DataSource]:
    """The run's `(train, test)` datasets: loaded, resized and split exactly as the run defines."""
    # Image folders are read lazily: the file list now, the pixels in the data pipeline's workers.
    dataset = load_dataset(config.dataset, image_size=config.image_size, lazy=True)
    return train_test_split(dataset, test_fraction=config.test_fraction, seed=config.split_seed)


def build_model(config: RunConfig, train_data: DataSource, *, key: PRNGKeyArray) -> CaiT:
    """The run's `CaiT`; input size, channels and classes come from the data unless the config sets them.

    **Arguments:**

    - `config`: the `RunConfig` (its `model` keywords).
    - `train_data`: the training split (its image size, channels and classes).
    - `key`: the initialisation key. (Keyword only argument.)

    **Returns:** the `CaiT`.
    """
    kwargs = dict(config.model)
    kwargs.setdefault("image_size", train_data.image_size)
    kwargs.setdefault("channels", train_data.channels)
    kwargs.setdefault("num_classes", train_data.num_classes)
    if image_size_pair(kwargs["image_size"]) != tuple(train_data.image_size):
        raise ValueError(
            f"The model takes {kwargs['image_size']} images but the data are {train_data.image_size}; "
            f"set the data's image size (`RunConfig.image_size`) to match."
        )
    if kwargs["channels"] != train_data.channels:
        raise ValueError(
            f"The model takes {kwargs['channels']} channels but the data have {train_data.channels}."
        )
    return CaiT(**kwargs, key=key)
