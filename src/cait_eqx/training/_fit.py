"""`fit`: a model trained on data with a recipe, from the batches it reads to the loop it runs.

It is one room, though over 400 lines: `fit` is one sequence from a `TrainConfig` and the data to a trained
model, and every part here serves it alone. What it asks of the data: the per-image transform its recipe
names (`train_transform`) and the `check_data` pass (`check_images`). The compiled steps it may share
between calls (`TrainSteps`). The loop over an explicit state: `Loop` holds what stays fixed (the data, the
compiled steps, the log, the signals), `LoopState` what changes (model, optimiser state, key, step, the
logging window); the step is also the data position (batch number `step` comes next, `Loop.position`), so no
iterator state is kept or saved. `run_steps` is one `for` over the batches: `_train_step`, then what is due
at that step (`_take_metrics`, `_log`, `_log_test`, `_checkpoint`), then `_should_stop`; `start_state`
builds the first state, fresh or from a checkpoint. `fit` sets them up, runs the loop under cooperative
signals (`StopSignals`) and ends with the final evaluations (`FitResult`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree

from .._atomic import DiskFullError, check_writable_dir
from .._lora import has_lora, lora
from .._model import CaiT
from .._primitives import LoRAError
from .._surgery import with_compute_dtype, with_remat
from .._variants import EVAL_CROP_PCT, EVAL_INTERPOLATION
from ..data import (
    WORKER_STARTUP_S,
    BadImageError,
    DataSource,
    DataWorkerError,
    TrainPipeline,
    find_bad_images,
    prefetch,
)
from ..parallel import (
    check_batch_size,
    is_primary,
    local_batch_rows,
    make_sharded_eval_step,
    mesh_from_spec,
    replicate,
    shard_batch,
    shard_state,
    shard_train_step,
    to_host,
)
from ._checkpoint import CheckpointError, CheckpointInfo, list_checkpoints, load_checkpoint, save_checkpoint
from ._config import TrainConfig
from ._freeze import check_freeze, trainable_params
from ._metrics import MetricsLog, TrainWindow
from ._optim import build_optimizer, ema_model
from ._signals import StopSignals
from ._steps import EvalResult, NonFiniteLossError, evaluate, make_train_step, step_parts

__all__ = [
    "CHECKPOINT_DIR",
    "FitResult",
    "Loop",
    "LoopState",
    "TrainSteps",
    "check_images",
    "check_teacher",
    "disk_full_note",
    "eval_transform",
    "evaluate_model",
    "fit",
    "run_steps",
    "start_state",
    "train_transform",
    "with_adapters",
]

logger = logging.getLogger("cait_eqx")

# Where `fit` keeps the checkpoints of a run directory (`Run.checkpoint_dir`).
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class FitResult:
    """What `fit` ends with.

    - `model`, `opt_state`: the final training state (`ema` holds the EMA model when one is tracked).
    - `step`: optimiser steps taken in total; `total_steps`: the planned number.
    - `status`: `"completed"`, `"interrupted"` (a stop was asked for, by SIGINT/SIGTERM or
        `StopSignals.request`; a checkpoint of the last step was saved when a run directory was given, unless
        a second signal asked to stop at once) or `"max_steps"` (stopped by `max_steps`).
    - `test`: the last evaluation on the test set (`None` without one); `ema_test`: the EMA model's, at
        the end.
    - `skipped_steps`: steps whose update was dropped as non-finite (`on_nonfinite="skip"`).
    - `skipped_images`: unreadable training images replaced by others (`bad_images="skip"`), in the whole
        run (resumed parts included).
    - `train_seconds`, `images_per_s`: wall time of this call's training steps and their throughput.
    - `checkpoint`: the last checkpoint written or resumed from.
    """

    model: PyTree
    opt_state: PyTree
    step: int
    total_steps: int
    status: str
    test: EvalResult | None = None
    ema: PyTree | None = None
    ema_test: EvalResult | None = None
    skipped_steps: int = 0
    skipped_images: int = 0
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    checkpoint: CheckpointInfo | None = None


@dataclasses.dataclass(frozen=True)
class TrainSteps:
    """The steps of one recipe on one mesh, built once: pass the same object to several `fit` calls (a run
    and its resumption in one process, say) and they share one compilation.

    Build it with `TrainSteps.build`. Each step compiles on its first call; `fit` checks that the object was
    built for its own config, data size and mesh.

    - `config`, `steps_per_epoch`, `num_classes`, `mesh`: what it was built for.
    - `optim`, `schedule`: `build_optimizer(config, steps_per_epoch)`.
    - `pure_step`: `make_train_step(optim, config.step_config(num_classes), jit=False)`.
    - `train_step`: the step `fit` runs, by default `shard_train_step(pure_step, mesh)`.
    - `eval_step`: `make_sharded_eval_step(mesh, config.normalize)`.
    """

    config: TrainConfig
    steps_per_epoch: int
    num_classes: int
    mesh: Mesh
    optim: optax.GradientTransformation
    schedule: optax.Schedule
    pure_step: Callable[..., tuple[Any, Any, dict[str, Any]]]
    train_step: Callable[..., tuple[Any, Any, dict[str, Any]]]
    eval_step: Callable[..., dict[str, np.ndarray]]

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        steps_per_epoch: int,
        num_classes: int,
        mesh: Mesh | None = None,
        *,
        compile_step: Callable[[Callable], Callable] | None = None,
    ) -> TrainSteps:
        """Build the optimiser, schedule and steps of `config` (nothing is compiled yet).

        **Arguments:**

        - `config`: the `TrainConfig`.
        - `steps_per_epoch`: `len(train_data) // config.batch_size`.
        - `num_classes`: the size of the classifier's output.
        - `mesh`: the mesh to run on (`cait_eqx.parallel.make_mesh`); `None`: `fit`'s default (one device;
            with several processes, every device).
        - `compile_step`: turns the pure training step into the one to run; default
            `shard_train_step(step, mesh)`. (Keyword only argument.)

        **Returns:** a `TrainSteps`.
        """
        mesh = mesh_from_spec(None) if mesh is None else mesh
        optim, schedule = build_optimizer(config, steps_per_epoch)
        pure_step = make_train_step(optim, config.step_config(num_classes), jit=False)
        train_step = shard_train_step(pure_step, mesh) if compile_step is None else compile_step(pure_step)
        eval_step = make_sharded_eval_step(mesh, config.normalize)
        return cls(
            config, steps_per_epoch, num_classes, mesh, optim, schedule, pure_step, train_step, eval_step
        )

    def check_fits(self, config: TrainConfig, steps_per_epoch: int, num_classes: int, mesh: Mesh) -> None:
        """Raise `ValueError` unless these steps were built for this config, data size and mesh."""
        built = (self.config, self.steps_per_epoch, self.num_classes, self.mesh)
        asked = (config, steps_per_epoch, num_classes, mesh)
        names = ("config", "steps per epoch", "number of classes", "mesh")
        differ = [name for name, a, b in zip(names, built, asked, strict=True) if a != b]
        if differ:
            raise ValueError(
                f"These `TrainSteps` were built for another {', '.join(differ)} than this `fit` call's; "
                f"build them with `TrainSteps.build` for this config, data and mesh, or leave `steps` out."
            )


# ------------------------------------------------------------------------------- what fit asks of the data


# How many unreadable files an error message lists before it only counts the rest.
_LISTED = 20


def train_transform(config: TrainConfig, image_size: tuple[int, int]) -> Any:
    """The per-image transform the data workers run for `config`, or `None` when it names none.

    `resized_crop`: DeiT's random-resized crop to `image_size` (`TrainTransform`), then RandAugment when
    `auto_augment` names it. RandAugment alone: each image resized to `image_size` (bilinear, as the sources
    read) and then augmented. Flips are the training step's (`flip`, on the device), not the workers'.
    """
    if not config.resized_crop and config.auto_augment is None:
        return None
    from ..data import RandAugment, TrainTransform

    if config.resized_crop:
        return TrainTransform(
            image_size=tuple(image_size),
            scale=(config.crop_scale, 1.0),
            ratio=(1.0 / config.crop_ratio, config.crop_ratio),
            interpolation=config.interpolation,
            hflip=0.0,
            rand_augment=config.auto_augment,
        )
    size = tuple(image_size)
    augment = RandAugment.from_config(config.auto_augment, size, interpolation=config.interpolation)
    return _ResizedRandAugment(size, augment)


def eval_transform(config: TrainConfig, data: Any) -> Any:
    """How `fit` (and `cait-eqx evaluate`) turn `data`'s images into the model's input when evaluating.

    Images read from files (a lazy source: `scan_image_folder`, `open_arrays`) are evaluated as timm's
    `validate.py` evaluates a pretrained CaiT: `EvalTransform` (shorter side resized to `image_size /
    crop_pct`, bicubic, then the centre crop) with `config.eval_crop_pct` (default: the variants'
    `EVAL_CROP_PCT`, 1.0). Images already in memory (a `Dataset`: digits, `.npz`) were resized when loaded:
    `None`, they are evaluated as they are.
    """
    from ..data import EvalTransform, LazySource

    if data is None or not isinstance(data, LazySource):
        return None
    crop_pct = EVAL_CROP_PCT if config.eval_crop_pct is None else config.eval_crop_pct
    return EvalTransform(tuple(data.image_size), crop_pct, EVAL_INTERPOLATION)


class _ResizedRandAugment:
    """RandAugment on images first resized to one size (picklable, for the data workers)."""

    def __init__(self, image_size: tuple[int, int], augment: Any):
        self.image_size, self.augment = image_size, augment

    def __call__(self, image, rng):
        from ..data._decode import resize_images

        if image.shape[1:] != self.image_size:
            image = resize_images(image[None], self.image_size)[0]
        return self.augment(image, rng)


def check_images(train_data: Any, test_data: Any, config: TrainConfig) -> tuple[Any, Any]:
    """The `check_data` pass: read every image of both splits once (in `config.data_workers` workers).

    With `config.bad_images == "error"` raise `cait_eqx.data.BadImageError` listing every file that fails
    (`paths` holds them all); with `"skip"` leave them out (logged, with the count). `fit` runs it when
    `config.check_data` is set; a source that passed is marked (`checked`) and not read again.

    **Returns:** `(train_data, test_data)`, without the unreadable images.
    """
    parts = []
    for data in (train_data, test_data):
        if data is None:
            parts.append((data, []))
            continue
        bad = find_bad_images(data, workers=config.data_workers, timeout=config.data_timeout or None)
        parts.append((data, bad))
    found = [(data, index, reason) for data, bad in parts for index, reason in bad]
    if not found:
        logger.info("check_data: every image reads")
        _mark_checked(train_data, test_data)
        return train_data, test_data
    if config.bad_images == "error":
        paths = [data.describe(index) for data, index, _ in found]
        listed = "\n".join(f"  {reason}" for _, _, reason in found[:_LISTED])
        more = f"\n  ... and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
        raise BadImageError(
            f"{len(found)} image(s) cannot be read:\n{listed}{more}\nFix or remove them, or leave them out "
            f"with bad_images='skip' (CLI: --bad-images skip).",
            paths,
        )
    out = []
    for data, bad in parts:
        if data is None or not bad:
            out.append(data)
            continue
        keep = np.setdiff1d(np.arange(len(data)), [index for index, _ in bad])
        logger.warning(
            "check_data: left out %d unreadable image(s) of %s, e.g. %s", len(bad), data.name,
            data.describe(bad[0][0]),
        )
        out.append(data.subset(keep, data.name))
    _mark_checked(*out)
    return out[0], out[1]


def _mark_checked(*sources: Any) -> None:
    for source in sources:
        if source is not None and hasattr(source, "checked"):
            source.checked = True


# ------------------------------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class LoopState:
    """What changes as the loop runs (`start_state` builds it); `step` is also the next batch's number."""

    model: PyTree
    opt_state: PyTree
    key: PRNGKeyArray
    step: int = 0
    checkpoint: CheckpointInfo | None = None
    window: TrainWindow = dataclasses.field(default_factory=TrainWindow)
    last_test: EvalResult | None = None
    skipped: int = 0
    images_done: int = 0
    # The last step's metrics, still on the device: read while the next step runs.
    pending: tuple[int, dict[str, Any]] | None = None
    train_seconds: float = 0.0
    # The unreadable images the data pipeline replaced (`bad_images="skip"`).
    skipped_images: int = 0


@dataclasses.dataclass
class Loop:
    """What stays fixed while the loop runs (`bar` and `postfix`: the optional tqdm progress bar; `teacher`:
    the distillation teacher, placed on the mesh, passed to every step)."""

    config: TrainConfig
    steps: TrainSteps
    train_step: Callable[..., Any]
    test_data: DataSource | None
    total_steps: int
    stop_at: int
    checkpoint_dir: Path | None
    primary: bool
    several_processes: bool
    log: MetricsLog
    signals: StopSignals
    on_step: Callable[[int, dict[str, float]], None] | None
    bar: Any = None
    postfix: dict[str, str] = dataclasses.field(default_factory=dict)
    teacher: PyTree = None

    def position(self, step: int) -> tuple[int, int]:
        """`(epoch, index within it)` of batch number `step`: the data position after `step` steps."""
        return divmod(step, self.steps.steps_per_epoch)

    def show(self, **values: str) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)


def _check_resume(info: CheckpointInfo, config: TrainConfig) -> None:
    saved = info.extra.get("train_config", {})
    # As the checkpoint's JSON holds them (a tuple, e.g. `lora_targets`, reads back as a list).
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()}
    changed = [
        f"{k}: {saved.get(k)!r} → {now[k]!r}"
        for k in TrainConfig.trajectory_fields()
        if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise CheckpointError(
            f"Cannot resume exactly from {info.path}: the training settings differ from the checkpoint's "
            f"({'; '.join(changed)}). Resume with the run's own settings (`resume_run(run_dir)` reads them "
            f"from the run's config.json)."
        )


# How the optimiser state of a checkpoint is laid out, recorded in its `extra`: since this mark, over the
# trained parameters alone (`trainable_params`); before it, with `freeze="backbone"`, over every parameter.
_STATE_LAYOUT = "trainable_params/1"


def _check_state_layout(info: CheckpointInfo, config: TrainConfig) -> None:
    if config.freeze != "none" and info.extra.get("optimiser_state") != _STATE_LAYOUT:
        raise CheckpointError(
            f"Cannot resume {info.path} with freeze={config.freeze!r}: it was written by an older cait_eqx, "
            f"whose optimiser state for a frozen model held every parameter; this version keeps state for "
            f"the trained parameters only. Finish that run with the cait_eqx version that started it, or "
            f"start a new run (e.g. `--init` from the checkpoint's run directory)."
        )


def start_state(
    model: PyTree,
    config: TrainConfig,
    steps: TrainSteps,
    key: PRNGKeyArray,
    checkpoint_dir: Path | None,
    resume: bool,
) -> LoopState:
    """The loop's first state: `model` fresh, or the newest checkpoint in `checkpoint_dir` when resuming."""
    opt_state = steps.optim.init(trainable_params(model, config.freeze))
    state = LoopState(model, opt_state, key)
    checkpoints = list_checkpoints(checkpoint_dir) if checkpoint_dir is not None else []
    found = bool(checkpoints)
    if found and not resume:
        raise ValueError(
            f"{checkpoint_dir.parent} already holds checkpoints of a run: continue it with `resume=True` or "
            f"train into a new directory."
        )
    if found:
        # Settings first: some (`freeze`) change the optimiser state's structure, which loading would refuse
        # without naming the setting.
        _check_resume(checkpoints[-1], config)
        _check_state_layout(checkpoints[-1], config)
        state.model, state.opt_state, state.key, info = load_checkpoint(
            checkpoint_dir, model=model, opt_state=opt_state
        )
        _check_resume(info, config)
        # Batch number `step` is where the stream restarts; the position the checkpoint recorded must be
        # that batch's, or the data changed under the run (a folder that gained or lost files, another
        # `--bad-images skip` outcome) and resuming would silently train on other batches.
        expected = divmod(info.step, steps.steps_per_epoch)
        if (info.epoch, info.batch_index) != expected:
            raise CheckpointError(
                f"Cannot resume exactly from {info.path}: it was saved at epoch {info.epoch}, batch "
                f"{info.batch_index}, but step {info.step} is epoch {expected[0]}, batch {expected[1]} with "
                f"{steps.steps_per_epoch} batches per epoch: the training data changed size since the run "
                f"started. Resume with the run's own data, or start a new run."
            )
        state.step, state.checkpoint = info.step, info
        state.window = TrainWindow.restored(info.extra.get("window", {}))
        state.skipped_images = int(info.extra.get("skipped_images", 0))
    # Replicated, or split along `fsdp`; a checkpoint saved on another mesh lands on this one here.
    state.model, state.opt_state = shard_state((state.model, state.opt_state), steps.mesh)
    return state


def _train_step(loop: Loop, state: LoopState, batch: Any) -> None:
    """One optimiser step (on batch number `state.step`, which moves on), and the last step's metrics read."""
    teacher = () if loop.teacher is None else (loop.teacher,)  # a step without distillation takes none
    state.model, state.opt_state, metrics = loop.train_step(
        state.model, state.opt_state, batch, jr.fold_in(state.key, state.step), *teacher
    )
    state.step += 1
    state.images_done += loop.config.batch_size
    _take_metrics(loop, state)  # the previous step's, fetched while this one runs
    state.pending = (state.step, metrics)
    if loop.bar is not None:
        loop.bar.update(1)


def _take_metrics(loop: Loop, state: LoopState) -> None:
    """Bring the pending step's metrics to the host: into the window, or a non-finite step stops/skips."""
    if state.pending is None:
        return
    done_step, metrics = state.pending
    state.pending = None
    host = {name: np.asarray(value).item() for name, value in metrics.items()}
    if not host["finite"]:
        if loop.config.on_nonfinite == "stop":
            last = f" The last checkpoint, {state.checkpoint.path}, is intact." if state.checkpoint else ""
            raise NonFiniteLossError(
                f"Non-finite loss or gradient at step {done_step} (loss {host['loss']}, gradient norm "
                f"{host['grad_norm']}); that update was not applied.{last} Lower the learning rate (`lr`), "
                f"clip gradients (`clip_norm`), or skip such steps (`on_nonfinite=\"skip\"`).",
                done_step,
            )
        state.skipped += 1
        message = f"step {done_step}: non-finite loss or gradient, update skipped"
        if loop.bar is not None:
            loop.bar.write(message)
        else:  # no progress bar to write under: the step is still named
            logger.warning("cait_eqx: %s", message)
    else:
        state.window.add(host["loss"], host["accuracy"])
    state.window.timed += 1
    if loop.on_step is not None:
        loop.on_step(done_step, host)


def _log(loop: Loop, state: LoopState) -> None:
    """Write the window's `"train"` record (mean loss and accuracy, learning rate, throughput)."""
    window, now = state.window, time.perf_counter()
    if window.count == 0:
        return
    record = {
        "step": state.step,
        "epoch": state.step / loop.steps.steps_per_epoch,
        "split": "train",
        "loss": window.loss / window.count,
        "accuracy": window.accuracy / window.count,
        "lr": float(loop.steps.schedule(state.step - 1)),
        "images_per_s": window.timed * loop.config.batch_size / max(now - window.start, 1e-9),
    }
    loop.log.write(record)
    loop.show(
        loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}", img_s=f"{record['images_per_s']:.0f}"
    )
    window.reset(now)


def evaluate_model(loop: Loop, model: PyTree) -> EvalResult | None:
    """`model` on the test data (`None` without test data)."""
    if loop.test_data is None:
        return None
    return evaluate(
        model,
        loop.test_data,
        batch_size=loop.config.eval_batch_size,
        normalize=loop.config.normalize,
        eval_step=loop.steps.eval_step,
        transform=eval_transform(loop.config, loop.test_data),
        timeout=loop.config.data_timeout or None,  # a read that hangs stops the run, as in training
    )


def _log_test(loop: Loop, state: LoopState) -> None:
    """Evaluate the current model and write the `"test"` record."""
    state.last_test = evaluate_model(loop, state.model)
    if state.last_test is not None:
        loop.log.write(
            {
                "step": state.step,
                "epoch": state.step / loop.steps.steps_per_epoch,
                "split": "test",
                "loss": state.last_test.loss,
                "accuracy": state.last_test.top1,
            }
        )
        loop.show(test_acc=f"{state.last_test.top1:.4f}")


def _checkpoint(loop: Loop, state: LoopState) -> None:
    """Save the state and the data position (with several processes, a collective all of them join)."""
    if loop.checkpoint_dir is None:
        return
    # Whole arrays on the host.
    model, opt_state = (
        to_host((state.model, state.opt_state)) if loop.several_processes else (state.model, state.opt_state)
    )
    if not loop.primary:
        return
    config = loop.config
    epoch, index = loop.position(state.step)
    state.checkpoint = save_checkpoint(
        loop.checkpoint_dir,
        model=model,
        opt_state=opt_state,
        key=state.key,
        step=state.step,
        epoch=epoch,
        batch_index=index,
        shuffle_seed=config.seed,
        keep=config.keep_checkpoints,
        extra={
            "train_config": config.to_dict(),
            "total_steps": loop.total_steps,
            # The partly filled logging window, so a resumed run logs exactly what an unbroken one would.
            "window": state.window.saved(),
            # What the data pipeline skipped so far (where it goes on is the step).
            "skipped_images": state.skipped_images,
            "optimiser_state": _STATE_LAYOUT,
        },
    )


def _checkpoint_before_data_error(loop: Loop, state: LoopState) -> None:
    """The data stopped coming (a worker died or hangs, a file went bad): keep the steps done, as a stop
    does. One process only: with several, the others wait in the step's collectives, not in this one."""
    if loop.several_processes or (state.checkpoint is not None and state.checkpoint.step == state.step):
        return
    _take_metrics(loop, state)
    _checkpoint(loop, state)


def _should_stop(loop: Loop, state: LoopState, stop_asked: bool) -> bool:
    """Whether the loop ends after this step: a stop was asked for, or the last step is done."""
    return stop_asked or loop.signals.urgent or state.step >= loop.stop_at


def disk_full_note(checkpoint: CheckpointInfo | None, run_dir: Path | None) -> str:
    """What a `DiskFullError` during a run adds: which checkpoint is intact and how to go on from it."""
    if checkpoint is None:
        return "No checkpoint had been written yet: free some space and start the run again."
    how = f"`cait-eqx train --resume {run_dir}` (from Python: `fit(..., resume=True)`)"
    return (
        f"The last checkpoint, {checkpoint.path.with_suffix('').name} (step {checkpoint.step}), is intact: "
        f"free some space, then continue with {how}."
    )


def run_steps(loop: Loop, state: LoopState, batches: Any) -> None:
    """The loop: each step, then what is due at it (read metrics, log, evaluate, checkpoint), then stop?"""
    config, signals = loop.config, loop.signals
    for batch, skipped in batches:
        _train_step(loop, state, batch)
        if skipped:
            state.skipped_images += skipped
            message = (
                f"step {state.step}: {skipped} unreadable image(s) replaced "
                f"({state.skipped_images} so far)"
            )
            if loop.bar is not None:
                loop.bar.write(message)
            else:
                logger.warning("cait_eqx: %s", message)
        stop_asked = signals.requested  # read once, so that what is due and whether to stop agree
        finishing = stop_asked or state.step >= loop.stop_at
        epoch, index = loop.position(state.step)
        epoch_end = index == 0
        log_due = state.step % config.log_every == 0 or epoch_end
        eval_due = epoch_end and (epoch % config.eval_every == 0 or epoch == config.epochs)
        checkpoint_due = (
            epoch_end if config.checkpoint_every == 0 else state.step % config.checkpoint_every == 0
        ) or finishing
        if log_due or checkpoint_due:
            _take_metrics(loop, state)
        # Logged at fixed steps only (a stop carries the open window in its checkpoint).
        if log_due:
            _log(loop, state)
        # A second signal skips the evaluation and the checkpoint still to come.
        if eval_due and not signals.urgent:
            _log_test(loop, state)
        if checkpoint_due and not signals.urgent:
            _checkpoint(loop, state)
        if _should_stop(loop, state, stop_asked):
            return


# ----------------------------------------------------------------------------------------------------- fit


def _prepare_model(model: PyTree, config: TrainConfig) -> PyTree:
    """The model as the recipe trains it: its computation dtype and remat policy, in training mode."""
    for name, switch in (("compute_dtype", with_compute_dtype), ("remat", with_remat)):
        value = getattr(config, name)
        if value is None:
            continue
        if not isinstance(model, CaiT):
            raise TypeError(
                f"TrainConfig `{name}` switches a `CaiT`'s `{name}`, but the model is a "
                f"{type(model).__name__}: leave `{name}=None` and set it in the model yourself."
            )
        model = switch(model, value)
    # Training mode (a model from `cait_eqx.load` comes in inference mode), and fresh buffers, so that
    # donating the model to the first step never invalidates the caller's arrays.
    model = eqx.nn.inference_mode(model, value=False)
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)


# The fold of `fit`'s key that draws the LoRA `A` matrices (the steps fold in their step numbers, far below).
LORA_KEY_FOLD = 2**32 - 1


def with_adapters(model: PyTree, config: TrainConfig, key: PRNGKeyArray) -> PyTree:
    """The model `config` trains: `model` itself, or with `config.lora_rank` > 0 `model` with LoRA adapters
    (`cait_eqx.lora` with `lora_alpha`, `lora_targets`; the `A` matrices drawn from
    `jr.fold_in(key, LORA_KEY_FOLD)`, so a resumed run rebuilds the same structure). Raises `LoRAError` for
    targets or a rank that do not fit the model, before anything is trained."""
    if config.lora_rank == 0:
        return model
    if has_lora(model):
        raise LoRAError(
            f"TrainConfig `lora_rank={config.lora_rank}` asks `fit` to put LoRA adapters on the model, but "
            f"it carries adapters already: pass the plain model, or `lora_rank=0` to train the ones it has."
        )
    return lora(model, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
                key=jr.fold_in(key, LORA_KEY_FOLD))


def check_teacher(teacher: PyTree, data: DataSource) -> None:
    """Check that a distillation `teacher` takes `data`'s images as they are and answers with its classes.

    The teacher sees the images the student sees (same size, channels and normalisation) and its logits
    are compared class by class with the student's, so nothing is adapted: a mismatch is an error.

    **Arguments:**

    - `teacher`: an image → logits callable (a `CaiT`, an Equinox module, a pure function).
    - `data`: the training data.

    **Raises:** `ValueError` that names what differs and how to fix it.
    """
    shape = (data.channels, *data.image_size)
    size = "x".join(map(str, data.image_size))
    hint = ""
    if isinstance(teacher, CaiT):
        cfg = teacher.config
        hint = (
            f" The teacher is a CaiT for {cfg.image_size[0]}x{cfg.image_size[1]} images of {cfg.channels} "
            f"channel(s): resize the data to its size (--image-size), or fit the teacher to the data first "
            f"(`cait_eqx.set_input_size`, `cait_eqx.adapt_input_channels`) and train it there."
        )
    try:
        out = eqx.filter_eval_shape(
            jax.vmap(eqx.nn.inference_mode(teacher)), jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        )
    except Exception as error:  # noqa: BLE001 - whatever the callable raises, the message says which data
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"The teacher cannot take the data's {size} images of {data.channels} channel(s) ({first}).{hint}"
        ) from None
    got = getattr(out, "shape", None)
    if got != (2, data.num_classes):
        per_image = got is not None and len(got) == 2
        what = f"{got[-1]} classes" if per_image else f"outputs of shape {got} for 2 images"
        raise ValueError(
            f"The teacher has {what} but the data have {data.num_classes} classes: distillation compares "
            f"their outputs class by class. Use a teacher trained on these classes (e.g. a run on the same "
            f"data)."
        )


def _metrics_log(config: TrainConfig, run_dir: Any, resume_step: int | None) -> MetricsLog:
    """`metrics.jsonl` and the trackers `config.log` names (only where a run directory is written)."""
    from ._tracking import open_trackers

    trackers = open_trackers(config.log, run_dir, config.to_dict(), resume_step)
    return MetricsLog(run_dir, resume_step, trackers)


def _finish(loop: Loop, state: LoopState) -> FitResult:
    """The final evaluations (of a completed run) and the `FitResult`."""
    stopped = loop.signals.requested
    status = "interrupted" if stopped else "completed" if state.step >= loop.total_steps else "max_steps"
    if status == "completed" and state.last_test is None and loop.test_data is not None:
        state.last_test = evaluate_model(loop, state.model)
    ema = ema_test = None
    if loop.config.ema_decay is not None:
        ema = ema_model(state.model, state.opt_state)
        if status == "completed" and loop.test_data is not None and not loop.signals.requested:
            ema_test = evaluate_model(loop, ema)
    if loop.signals.requested:  # also when asked during a final evaluation: the caller wants to stop
        status = "interrupted"
    return FitResult(
        model=state.model,
        opt_state=state.opt_state,
        step=state.step,
        total_steps=loop.total_steps,
        status=status,
        test=state.last_test,
        ema=ema,
        ema_test=ema_test,
        skipped_steps=state.skipped,
        skipped_images=state.skipped_images,
        train_seconds=state.train_seconds,
        images_per_s=state.images_done / state.train_seconds if state.train_seconds > 0 else 0.0,
        checkpoint=state.checkpoint,
    )


def fit(
    model: PyTree,
    train_data: DataSource,
    test_data: DataSource | None = None,
    config: TrainConfig = TrainConfig(),  # noqa: B008 — frozen, never mutated
    *,
    key: PRNGKeyArray,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    compile_step: Callable[[Callable], Callable] | None = None,
    put: Callable[[Any], Any] | None = None,
    handle_signals: bool = True,
    mesh: Mesh | None = None,
    steps: TrainSteps | None = None,
    stop: StopSignals | None = None,
    teacher: PyTree | None = None,
) -> FitResult:
    """Train `model` on `train_data` with the recipe of `config`, evaluating, checkpointing and resuming.

    Every random draw comes from `key` (folded with the step number) and `config.seed` (the batch order), so
    the same call gives the same model, and a run resumed from a checkpoint continues bit for bit as if it
    had never stopped.

    **Arguments:**

    - `model`: the model to train (e.g. a `CaiT`), switched to training mode; its `layer_dropout` gives
        stochastic depth. Its arrays are copied, so the caller's model stays usable. With
        `config.compute_dtype` or `config.remat` set it must be a `CaiT`, which then computes in that dtype
        (`cait_eqx.with_compute_dtype`) with that rematerialisation (`cait_eqx.with_remat`). With
        `config.lora_rank` > 0 it gets LoRA adapters first (`with_adapters`), and `FitResult.model` is the
        adapted model (`cait_eqx.merge_lora` folds them in); a model that carries adapters already (from
        `cait_eqx.lora`) trains them and its head with `lora_rank=0`.
    - `train_data`, `test_data`: `Dataset`s; `test_data` may be `None`.
    - `config`: a `TrainConfig`.
    - `key`: the run's `jax.random.key`. (Keyword only argument, like all that follow.)
    - `run_dir`: where `metrics.jsonl` and `checkpoints/` go (as `Run(run_dir)` reads them); `None` writes
        nothing.
    - `resume`: continue from the newest intact checkpoint in `run_dir/checkpoints` (from the start if there
        is none). The model, optimiser and settings must be those of the run.
    - `max_steps`: stop (with a checkpoint) once this many steps are done in total.
    - `progress`: show a tqdm progress bar on stderr.
    - `on_step`: called as `on_step(step, metrics)` with each step's host-side metrics.
    - `compile_step`: turns the pure training step into the one to run; default
        `cait_eqx.parallel.shard_train_step(step, mesh)` (compiled once, buffers donated).
    - `put`: places each `(images, labels)` batch on the device(s), in the prefetch thread; default
        `cait_eqx.parallel.shard_batch` (split over the mesh's `data × fsdp` devices).
    - `handle_signals`: while the loop runs, SIGINT/SIGTERM only ask it to stop (`StopSignals`): the first
        lets it finish the step, do what is due then and checkpoint, and `fit` returns
        `status="interrupted"`; a second stops without the evaluation and checkpoint still to come and
        hands the signals back to the previous handlers. `False` leaves the signals alone.
    - `mesh`: the `jax.sharding.Mesh` to train on (`cait_eqx.parallel.make_mesh`); `None`: one device
        (with several processes: every device, data-parallel). The model and optimiser state are placed
        by `cait_eqx.parallel.shard_state` (replicated, large arrays split along `fsdp`); `config.batch_size`
        is the global batch and must split evenly over `data × fsdp`. With several processes each loads
        only its rows of every batch, and process 0 alone writes `run_dir` (a directory all processes
        read when resuming). Checkpoints hold whole arrays, so a run resumes on a mesh of any shape.
    - `steps`: a `TrainSteps` built for this `config`, data and mesh, to share its compiled steps between
        `fit` calls (a run and its resumption in one process); `None` builds them for this call.
    - `stop`: a `StopSignals` the caller has entered (e.g. around the whole program, so that a signal after
        `fit` returns is a flag too); `fit` reads it instead of installing handlers of its own.
    - `teacher`: the teacher of `config.distillation` (`"hard"` or `"soft"`; needed then, refused
        otherwise): any image → logits callable `jax.vmap` can map and `jax.jit` can take as an argument,
        i.e. a `CaiT` or another Equinox module, or a pure function. It must take the data's images and
        give their classes as they are (`check_teacher`). It stays fixed: it runs in inference mode inside
        the compiled step (an argument of it, replicated on the mesh, never donated), without gradients,
        and is not checkpointed; a resumed run needs the same teacher again to continue exactly.

    **Returns:** a `FitResult`.

    **Raises:** `NonFiniteLossError` (naming the step) when a loss or gradient is not finite and
    `config.on_nonfinite == "stop"`; the update of that step is not applied and no checkpoint is written.
    `cait_eqx.data.DataWorkerError` when a data worker dies, or when no batch (of training or of the
    evaluation of `test_data`) comes in `config.data_timeout` seconds (naming the batch and its files),
    and `cait_eqx.data.BadImageError` for a file that cannot be read (`bad_images="error"`): with one
    process and a `run_dir`, the steps done are checkpointed first, as on a stop.
    `cait_eqx.NotWritableError`, before any work, when no file can be created in `run_dir`;
    `cait_eqx.DiskFullError` when a checkpoint or a metrics line does not fit on the disk (its message names
    the file, the bytes needed and free, and the last intact checkpoint to resume from).
    """
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"`max_steps` must be >= 0, got {max_steps}.")
    mesh = mesh_from_spec(None) if mesh is None else mesh
    check_batch_size(config.batch_size, mesh)  # before anything is compiled
    if config.grad_accum_steps > 1:
        check_batch_size(
            config.batch_size // config.grad_accum_steps, mesh,
            what=f"micro-batch (batch_size / grad_accum_steps {config.grad_accum_steps})",
        )
    parts = step_parts(model, config.batch_size, config.step_chunk, config.grad_accum_steps)
    if parts > config.grad_accum_steps:
        check_batch_size(
            config.batch_size // parts, mesh,
            what=f"part of a step (batch_size / {parts}, from step_chunk {config.step_chunk})",
        )
    model = with_adapters(model, config, key)  # before anything is read or compiled: bad targets fail here
    check_freeze(model, config.freeze)
    if resume and run_dir is None:
        raise ValueError("`resume=True` needs the `run_dir` that holds the checkpoints.")
    if run_dir is not None and is_primary():
        check_writable_dir(run_dir, "the run directory")  # before anything is read or compiled
    num_classes = train_data.num_classes
    if test_data is not None and test_data.num_classes != num_classes:
        raise ValueError(
            f"Train and test data disagree on the number of classes: {num_classes} vs "
            f"{test_data.num_classes}."
        )
    if (teacher is None) != (config.distillation == "none"):
        raise ValueError(
            f"TrainConfig `distillation` is {config.distillation!r} but "
            f"{'no teacher' if teacher is None else 'a teacher'} was given: distillation 'hard' or 'soft' "
            f"needs `fit(..., teacher=...)`, and a teacher needs one of them."
        )
    if teacher is not None:
        check_teacher(teacher, train_data)  # before anything is compiled
        teacher = replicate(eqx.nn.inference_mode(teacher), mesh)
    primary, several_processes = is_primary(), jax.process_count() > 1
    if config.check_data:
        train_data, test_data = check_images(train_data, test_data, config)
    # With several processes, each reads only its rows of every global batch.
    pipeline = TrainPipeline(
        train_data,
        config.batch_size,
        seed=config.seed,
        rows=local_batch_rows(mesh, config.batch_size) if several_processes else slice(None),
        transform=train_transform(config, train_data.image_size),
        workers=config.data_workers,
        repeats=config.aug_repeats,
        bad_images=config.bad_images,
    )
    if steps is None:
        steps = TrainSteps.build(
            config, pipeline.steps_per_epoch, num_classes, mesh, compile_step=compile_step
        )
        train_step = steps.train_step
    else:
        steps.check_fits(config, pipeline.steps_per_epoch, num_classes, mesh)
        train_step = steps.train_step if compile_step is None else compile_step(steps.pure_step)
    run_dir = None if run_dir is None else Path(run_dir)
    checkpoint_dir = None if run_dir is None else run_dir / CHECKPOINT_DIR
    # The model's structure (its static fields too) before the optimiser state, which holds it.
    state = start_state(_prepare_model(model, config), config, steps, key, checkpoint_dir, resume)
    if run_dir is not None and primary:
        run_dir.mkdir(parents=True, exist_ok=True)
    total_steps = config.epochs * pipeline.steps_per_epoch
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    signals = StopSignals(enabled=handle_signals) if stop is None else stop
    loop = Loop(
        config=config,
        steps=steps,
        train_step=train_step,
        test_data=test_data,
        total_steps=total_steps,
        stop_at=stop_at,
        checkpoint_dir=checkpoint_dir,
        primary=primary,
        several_processes=several_processes,
        log=_metrics_log(
            config, run_dir if primary else None, state.step if resume else None
        ),
        signals=signals,
        on_step=on_step,
        teacher=teacher,
    )
    if progress and primary:
        from tqdm.auto import tqdm

        loop.bar = tqdm(total=stop_at, initial=min(state.step, total_steps), unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5)
    if put is None:
        put = functools.partial(shard_batch, mesh=mesh, local=several_processes)
    batches = None
    # Entered here unless the caller entered it; the final evaluations run under it too.
    with contextlib.nullcontext() if stop is not None else signals:
        try:
            if state.step < stop_at:
                # Batch number `state.step` comes next: the stream starts there, fresh or resumed.
                source = pipeline.batches(*loop.position(state.step), stop_epoch=config.epochs)
                first = state.step  # the global batch number the stream starts at
                batches = prefetch(
                    source,
                    size=2,
                    put=lambda b: (put((b.images, b.labels)), b.skipped),
                    timeout=config.data_timeout or None,
                    startup=WORKER_STARTUP_S if pipeline.workers else 0.0,
                    on_timeout=lambda given: pipeline.stalled(first + given, config.data_timeout),
                )
                started = time.perf_counter()
                state.window.start = started
                try:
                    run_steps(loop, state, batches)
                except DiskFullError as error:  # a checkpoint or metrics line did not fit: say what is safe
                    raise error.with_note(disk_full_note(state.checkpoint, run_dir)) from None
                except (DataWorkerError, BadImageError):
                    _checkpoint_before_data_error(loop, state)
                    raise
                state.train_seconds = time.perf_counter() - started
        finally:
            if batches is not None:
                batches.close()
            if loop.bar is not None:
                loop.bar.close()
            loop.log.close()
        return _finish(loop, state)
