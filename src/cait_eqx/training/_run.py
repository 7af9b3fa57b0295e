"""A training run as a directory: config, metrics, checkpoints, final model, curves, summary.

`train_run(RunConfig(...), run_dir)` is what `cait-eqx train` does; `resume_run(run_dir)` is `--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.random as jr
from jax.sharding import Mesh

from .._atomic import atomic_write_bytes
from .._model import CaiT
from ..data._datasets import Dataset, load_dataset, train_test_split
from ._loop import FitResult, TrainConfig, fit

__all__ = [
    "DEFAULT_MODEL",
    "RunConfig",
    "RunSummary",
    "build_model",
    "load_run_config",
    "load_run_data",
    "resume_run",
    "train_run",
]

RUN_FORMAT = "cait_eqx.run/1"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
EMA_MODEL_FILE = "model_ema.safetensors"

# The default small CaiT for `cait-eqx train` on digits (chosen by experiment: experiments/defaults.md).
DEFAULT_MODEL: dict[str, Any] = dict(
    patch_size=4,
    dim=64,
    depth=4,
    cls_depth=2,
    heads=4,
    mlp_dim=128,
    layer_dropout=0.05,
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run, as written to `RUN_DIR/config.json`.

    - `model`: `CaiT` keywords (without `image_size`, `channels`, `num_classes`, which come from the data
        unless given), e.g. `DEFAULT_MODEL` or `cait_eqx.variant_config(name)`.
    - `dataset`: `"digits"`, `"mnist"`, `"folder:PATH"` or `"npz:PATH"`; `image_size`: resize to this
        (`None`: native); `test_fraction` and `split_seed`: the fixed held-out split.
    - `train`: the `TrainConfig` (its `seed` also seeds the model's initialisation).
    - `model_name`: the variant name when the model came from one (for the record).
    """

    model: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MODEL))
    dataset: str = "digits"
    image_size: int | None = 16
    test_fraction: float = 0.2
    split_seed: int = 0
    train: TrainConfig = TrainConfig()
    model_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "model_name": self.model_name,
            "model": dict(self.model),
            "data": {
                "dataset": self.dataset,
                "image_size": self.image_size,
                "test_fraction": self.test_fraction,
                "split_seed": self.split_seed,
            },
            "train": self.train.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        if values.get("format") != RUN_FORMAT:
            raise ValueError(
                f"Not a cait_eqx run configuration (format {values.get('format')!r}, expected "
                f"{RUN_FORMAT!r})."
            )
        data = values["data"]
        model = dict(values["model"])
        if isinstance(model.get("image_size"), list):
            model["image_size"] = tuple(model["image_size"])
        return cls(
            model=model,
            dataset=data["dataset"],
            image_size=data["image_size"],
            test_fraction=data["test_fraction"],
            split_seed=data["split_seed"],
            train=TrainConfig.from_dict(values["train"]),
            model_name=values.get("model_name"),
        )


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The outcome of `train_run`: where things are and the figures that matter."""

    run_dir: Path
    fit: FitResult
    seconds: float
    model_path: Path | None
    curves_path: Path | None

    def as_dict(self) -> dict[str, Any]:
        result = self.fit
        out = {
            "status": result.status,
            "step": result.step,
            "total_steps": result.total_steps,
            "seconds": self.seconds,
            "train_seconds": result.train_seconds,
            "images_per_s": result.images_per_s,
            "skipped_steps": result.skipped_steps,
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


def load_run_data(config: RunConfig) -> tuple[Dataset, Dataset]:
    """The run's `(train, test)` datasets: loaded, resized and split exactly as the run defines."""
    dataset = load_dataset(config.dataset, image_size=config.image_size)
    return train_test_split(dataset, test_fraction=config.test_fraction, seed=config.split_seed)


def build_model(config: RunConfig, train_data: Dataset, *, key) -> CaiT:
    """The run's `CaiT`; input size, channels and classes come from the data unless the config sets them."""
    kwargs = dict(config.model)
    kwargs.setdefault("image_size", train_data.image_size)
    kwargs.setdefault("channels", train_data.channels)
    kwargs.setdefault("num_classes", train_data.num_classes)
    if tuple(_pair(kwargs["image_size"])) != train_data.image_size:
        raise ValueError(
            f"The model takes {kwargs['image_size']} images but the data are {train_data.image_size}; "
            f"set the data's image size to match (CLI: --image-size)."
        )
    if kwargs["channels"] != train_data.channels:
        raise ValueError(
            f"The model takes {kwargs['channels']} channels but the data have {train_data.channels}."
        )
    return CaiT(**kwargs, key=key)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read `RUN_DIR/config.json`."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No run configuration at {path}: is {run_dir} a directory made by `cait-eqx train`?"
        )
    try:
        values = json.loads(path.read_text())
        return RunConfig.from_dict(values)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"Cannot read the run configuration {path}: {error}") from None


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


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    data: tuple[Dataset, Dataset] | None = None,
    mesh: Mesh | None = None,
) -> RunSummary:
    """Train as `config` says and fill `run_dir` with the run's record.

    Writes `config.json` (resolved model configuration, data, recipe, library versions), `metrics.jsonl`,
    `checkpoints/`, and at the end the final model (`model.safetensors`, plus `model_ema.safetensors` with
    an EMA), `curves.png` and `summary.json`.

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

    **Returns:** a `RunSummary`.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    train_data, test_data = load_run_data(config) if data is None else data
    root = jr.key(config.train.seed)
    model_key, run_key = jr.fold_in(root, 0), jr.fold_in(root, 1)
    model = build_model(config, train_data, key=model_key)
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
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume or not (run_dir / CONFIG_FILE).is_file():
            _write_json(run_dir / CONFIG_FILE, record)
    result = fit(
        model,
        train_data,
        test_data,
        config.train,
        key=run_key,
        run_dir=run_dir,
        resume=resume,
        max_steps=max_steps,
        progress=progress,
        mesh=mesh,
    )
    model_path = curves_path = None
    if result.status == "completed":
        from .._io import save
        from ..parallel import to_host

        # Whole arrays on the host (with several processes, a collective every process joins).
        final, ema = (result.model, result.ema)
        if jax.process_count() > 1:
            final, ema = to_host((final, ema))
        if primary:
            model_path = save(run_dir / MODEL_FILE, final)
            if ema is not None:
                save(run_dir / EMA_MODEL_FILE, ema)
    metrics_file = run_dir / "metrics.jsonl"
    # Nothing to draw before the first logged step (e.g. `--max-steps` below `--log-every`).
    if primary and metrics_file.is_file() and metrics_file.read_text().strip():
        from ..viz import plot_training_curves

        curves_path = plot_training_curves(run_dir)
    summary = RunSummary(run_dir, result, time.perf_counter() - started, model_path, curves_path)
    if result.status == "completed" and primary:
        _write_json(run_dir / SUMMARY_FILE, summary.as_dict())
    return summary


def resume_run(
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    max_steps: int | None = None,
    mesh: Mesh | None = None,
) -> RunSummary:
    """Continue the run in `run_dir` from its newest checkpoint, with its own `config.json`, on `mesh` (any
    shape: the checkpoint holds whole arrays)."""
    config = load_run_config(run_dir)
    return train_run(config, run_dir, resume=True, progress=progress, max_steps=max_steps, mesh=mesh)
