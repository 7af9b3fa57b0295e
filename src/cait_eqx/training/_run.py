"""A training run as a directory: `train_run` fills it, `Run` names its files and reads them back.

`RUN_DIR/config.json` (the `RunConfig`, the resolved model, library versions), `metrics.jsonl` (one JSON
record per line), `checkpoints/`, and once the run is complete `model.safetensors` (plus
`model_ema.safetensors` with an EMA; a LoRA run's merged, and `adapters.safetensors`), `curves.png` and
`summary.json`. `train_run(RunConfig(...), run_dir)` is
what `cait-eqx train` does (the data, the starting model, `fit`, the final files); `resume_run(run_dir)` goes
on from the newest checkpoint with the run's own `config.json`.

It is one room, though over 400 lines: the directory's writer (`train_run`) and its reader (`Run`) share one
layout and one record format, defined here once. The two files `fit` writes while it trains are named by the
rooms that write them (`_metrics.METRICS_FILE`, `_fit.CHECKPOINT_DIR`), so that `fit` does not import the room
that calls it; `Run` names them after them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from .._atomic import DiskFullError, atomic_write_bytes, check_writable_dir
from .._config import image_size_pair
from .._io import load, save
from .._lora import has_lora, lora, merge_lora, save_lora
from .._model import CaiT
from .._xla_flags import cpu_isa, xla_flags_in_force
from ..data import DataSource, load_dataset, train_test_split
from ..parallel import to_host
from ._checkpoint import list_checkpoints, load_checkpoint
from ._config import RunConfig
from ._fit import CHECKPOINT_DIR, FitResult, disk_full_note, fit
from ._freeze import trainable_params
from ._metrics import METRICS_FILE, read_metrics
from ._optim import build_optimizer
from ._signals import StopSignals
from ._steps import step_parts
from ._weight_sources import LoadedSource, initial_model, load_source

__all__ = ["Run", "RunSummary", "build_model", "load_run_config", "load_run_data", "resume_run", "train_run"]

logger = logging.getLogger("cait_eqx")

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
    METRICS_FILE = METRICS_FILE
    SUMMARY_FILE = "summary.json"
    MODEL_FILE = "model.safetensors"
    ADAPTERS_FILE = "adapters.safetensors"
    EMA_MODEL_FILE = "model_ema.safetensors"
    CHECKPOINT_DIR = CHECKPOINT_DIR
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
    def adapters_path(self) -> Path:
        """`adapters.safetensors`: a LoRA run's adapters and head alone (`cait_eqx.load_lora`)."""
        return self.path / self.ADAPTERS_FILE

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
        return read_metrics(path)

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
        train = config.train
        if train.lora_rank:  # the adapters `fit` put on (their values come from the checkpoint)
            template = lora(template, rank=train.lora_rank, alpha=train.lora_alpha,
                            targets=train.lora_targets, key=jr.key(0))
        optim, _ = build_optimizer(train, len(train_data) // train.batch_size)
        opt_state = optim.init(trainable_params(template, train.freeze))
        model, _, _, _ = load_checkpoint(directory, model=template, opt_state=opt_state)
        return eqx.nn.inference_mode(merge_lora(model) if has_lora(model) else model)


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


# -------------------------------------------------------------------------------------------- making a run


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The outcome of `train_run`: where things are and the figures that matter.

    - `run_dir`: the run directory; `fit`: the `FitResult`; `seconds`: wall time of the whole call.
    - `model_path`: the final model, when the run completed.
    - `curves_path`: `None` from `train_run`, which draws no pictures (`cait_eqx.viz.plot_training_curves`
        does; `cait-eqx train` calls it and sets this field).
    - `adapters_path`: a completed LoRA run's adapters file (`Run.adapters_path`).
    """

    run_dir: Path
    fit: FitResult
    seconds: float
    model_path: Path | None
    curves_path: Path | None = None
    adapters_path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The figures written to `summary.json`."""
        result = self.fit
        out = {
            "status": result.status,
            "step": result.step,
            "total_steps": result.total_steps,
            "seconds": self.seconds,
            "train_seconds": result.train_seconds,
            "images_per_s": result.images_per_s,
            "skipped_steps": result.skipped_steps,
            "skipped_images": result.skipped_images,
            # The process that finished the run (a resumed run may have started under other flags).
            "runtime": _runtime(),
        }
        if result.test is not None:
            out.update(
                test_accuracy=result.test.top1,
                test_top5=result.test.top5,
                test_loss=result.test.loss,
                test_examples=result.test.num_examples,
            )
        if result.ema_test is not None:
            out.update(ema_test_accuracy=result.ema_test.top1, ema_test_top5=result.ema_test.top5)
        return out


def _runtime() -> dict[str, Any]:
    """What the speed of this process depends on besides the versions: the CPU's vector extension and the
    XLA flags in force (`cait_eqx.xla_flags_in_force`)."""
    return {"isa": cpu_isa(), "xla_flags": xla_flags_in_force()}


def _versions() -> dict[str, str]:
    import equinox
    import optax

    from .. import __version__

    return {
        "cait_eqx": __version__,
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
    }


def _write_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(values, indent=2) + "\n").encode())


def _starting_model(
    config: RunConfig,
    run: Run,
    train_data: DataSource,
    *,
    key: jax.Array,
    resume: bool,
    source: LoadedSource | None,
) -> CaiT:
    """The run's model before training: fresh, or from `config.init` (logged one line per change)."""
    if config.init is None:
        return build_model(config, train_data, key=key)
    if resume and run.exists:
        # The architecture recorded when the run started; with a checkpoint, its weights come from there
        # and the source is not read again.
        config = dataclasses.replace(config, model=run.config().model)
        if list_checkpoints(run.checkpoint_dir):
            return build_model(config, train_data, key=key)
    model, loaded, notes = initial_model(config, train_data, key=key, source=source)
    logger.info("init: %s", loaded.description)
    for note in notes:
        logger.info("init: %s", note)
    return model


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    data: tuple[DataSource, DataSource] | None = None,
    mesh: Mesh | None = None,
    stop: StopSignals | None = None,
    init_source: LoadedSource | None = None,
    teacher_source: LoadedSource | None = None,
) -> RunSummary:
    """Train as `config` says and fill `run_dir` with the run's record (see `Run` for reading it back).

    Writes `config.json` (resolved model configuration, data, recipe, library versions), `metrics.jsonl`,
    `checkpoints/`, and once the run is complete the final model (`model.safetensors`, plus
    `model_ema.safetensors` with an EMA; with LoRA, `config.train.lora_rank`, both merged, and the adapters
    and head alone in `adapters.safetensors`, `cait_eqx.save_lora`) and `summary.json`. The training curves
    are a picture of `metrics.jsonl`: `cait_eqx.viz.plot_training_curves(run_dir)` draws them.

    **Arguments:**

    - `config`: the `RunConfig`.
    - `run_dir`: the run directory (created).
    - `resume`: continue from the newest checkpoint in `run_dir` (the config must be the run's own).
        (Keyword only argument.)
    - `progress`: show the progress bar. (Keyword only argument.)
    - `max_steps`: stop after this many steps in total (with a checkpoint). (Keyword only argument.)
    - `data`: `(train, test)` to use instead of loading `config.dataset` (already split). (Keyword only
        argument.)
    - `mesh`: the device mesh to train on (see `fit`); `None`: one device. With several processes, process
        0 alone writes the run directory. (Keyword only argument.)
    - `stop`: a `StopSignals` the caller has entered, passed to `fit` (see there); `None`: `fit` handles
        SIGINT/SIGTERM itself while it trains. (Keyword only argument.)
    - `init_source`: `config.init` already read (`load_source`, e.g. by a caller that reported it), so
        that it is not read twice; `None` reads it when needed. (Keyword only argument.)
    - `teacher_source`: `config.teacher` already read, likewise. (Keyword only argument.)

    With `config.init`, the model starts from that SOURCE fitted to the data (`initial_model`; each change
    logged in one line at level INFO on the `"cait_eqx"` logger), and `config.json` records the resolved
    architecture: a resumed run rebuilds it from there and reads the source again only when the run stopped
    before its first checkpoint. With `config.teacher`, that SOURCE is the distillation teacher, as it is
    (`fit`'s `teacher`); a resumed run reads it again.

    **Returns:** a `RunSummary`.

    **Raises:** `cait_eqx.NotWritableError` before any work when `run_dir` cannot be written;
    `cait_eqx.DiskFullError` when a file does not fit on the disk (the message names the last intact
    checkpoint and the command that continues from it).
    """
    started = time.perf_counter()
    run = Run(run_dir)
    if jax.process_index() == 0:
        check_writable_dir(run.path, "the run directory")
    train_data, test_data = load_run_data(config) if data is None else data
    root = jr.key(config.train.seed)
    model_key, run_key = jr.fold_in(root, 0), jr.fold_in(root, 1)
    model = _starting_model(config, run, train_data, key=model_key, resume=resume, source=init_source)
    teacher = None
    if config.teacher is not None:
        loaded = load_source(config.teacher) if teacher_source is None else teacher_source
        logger.info("teacher: %s", loaded.description)
        teacher = loaded.model
    record = config.to_dict()
    record["model"] = dict(model.config.kwargs())
    record["model"]["image_size"] = list(model.config.image_size)
    record["data"].update(
        num_train=len(train_data), num_test=len(test_data), class_names=list(train_data.class_names)
    )
    record["num_params"] = model.num_params
    record["versions"] = _versions()
    record["runtime"] = _runtime()
    # How many parts each step's batch runs as (`step_chunk`, or the automatic one of this model and backend).
    recipe = config.train
    parts = step_parts(model, recipe.batch_size, recipe.step_chunk, recipe.grad_accum_steps)
    record["runtime"]["step_parts"] = parts
    primary = jax.process_index() == 0
    if primary:
        run.path.mkdir(parents=True, exist_ok=True)
        if not resume or not run.exists:
            try:
                _write_json(run.config_path, record)
            except DiskFullError as error:
                raise error.with_note(disk_full_note(None, run.path)) from None
    result = fit(
        model,
        train_data,
        test_data,
        config.train,
        key=run_key,
        run_dir=run.path,
        resume=resume,
        max_steps=max_steps,
        progress=progress,
        mesh=mesh,
        stop=stop,
        teacher=teacher,
    )
    model_path = adapters_path = None
    try:
        if result.status == "completed":
            # Whole arrays on the host (with several processes, a collective every process joins).
            final, ema = (result.model, result.ema)
            if jax.process_count() > 1:
                final, ema = to_host((final, ema))
            if primary:
                # A LoRA run's models are saved merged (plain `CaiT`s), its adapters and head alone beside.
                model_path = save(run.model_path, merge_lora(final) if has_lora(final) else final)
                if has_lora(final):
                    adapters_path = save_lora(run.adapters_path, final, base=config.init or config.model_name)
                if ema is not None:
                    save(run.ema_model_path, merge_lora(ema) if has_lora(ema) else ema)
        summary = RunSummary(run.path, result, time.perf_counter() - started, model_path,
                             adapters_path=adapters_path)
        if result.status == "completed" and primary:
            _write_json(run.summary_path, summary.as_dict())
    except DiskFullError as error:  # the training is done and checkpointed: resuming writes the files
        raise error.with_note(disk_full_note(result.checkpoint, run.path)) from None
    return summary


def resume_run(
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    max_steps: int | None = None,
    mesh: Mesh | None = None,
    stop: StopSignals | None = None,
) -> RunSummary:
    """Continue the run in `run_dir` from its newest checkpoint, with its own `config.json`, on `mesh` (any
    shape: the checkpoint holds whole arrays).

    **Arguments:**

    - `run_dir`: the run directory.
    - `progress`, `max_steps`, `mesh`, `stop`: as in `train_run`. (Keyword only arguments.)

    **Returns:** a `RunSummary`.
    """
    config = Run(run_dir).config()
    return train_run(
        config, run_dir, resume=True, progress=progress, max_steps=max_steps, mesh=mesh, stop=stop
    )
