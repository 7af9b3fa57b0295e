"""Whole runs: `train_run(RunConfig(...), run_dir)` is what `cait-eqx train` does; `resume_run` goes on."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.random as jr
from jax.sharding import Mesh

from .._atomic import atomic_write_bytes
from .._io import save
from .._model import CaiT
from ..data import DataSource
from ..parallel import to_host
from ._checkpoint import list_checkpoints
from ._config import RunConfig
from ._fit import FitResult, fit
from ._run import Run, build_model, load_run_data
from ._signals import StopSignals
from ._sources import LoadedSource, initial_model, load_source

__all__ = ["RunSummary", "resume_run", "train_run"]

logger = logging.getLogger("cait_eqx")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The outcome of `train_run`: where things are and the figures that matter.

    - `run_dir`: the run directory; `fit`: the `FitResult`; `seconds`: wall time of the whole call.
    - `model_path`: the final model, when the run completed.
    - `curves_path`: `None` from `train_run`, which draws no pictures (`cait_eqx.viz.plot_training_curves`
        does; `cait-eqx train` calls it and sets this field).
    """

    run_dir: Path
    fit: FitResult
    seconds: float
    model_path: Path | None
    curves_path: Path | None = None

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
    `model_ema.safetensors` with an EMA) and `summary.json`. The training curves are a picture of
    `metrics.jsonl`: `cait_eqx.viz.plot_training_curves(run_dir)` draws them.

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
    """
    started = time.perf_counter()
    run = Run(run_dir)
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
    primary = jax.process_index() == 0
    if primary:
        run.path.mkdir(parents=True, exist_ok=True)
        if not resume or not run.exists:
            _write_json(run.config_path, record)
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
    model_path = None
    if result.status == "completed":
        # Whole arrays on the host (with several processes, a collective every process joins).
        final, ema = (result.model, result.ema)
        if jax.process_count() > 1:
            final, ema = to_host((final, ema))
        if primary:
            model_path = save(run.model_path, final)
            if ema is not None:
                save(run.ema_model_path, ema)
    summary = RunSummary(run.path, result, time.perf_counter() - started, model_path)
    if result.status == "completed" and primary:
        _write_json(run.summary_path, summary.as_dict())
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
