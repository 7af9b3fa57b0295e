"""`fit`: sets up the training loop (`_loop.py`), runs it under cooperative signals, evaluates at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree

from .._model import CaiT
from .._surgery import with_compute_dtype, with_remat
from ..data import DataSource, TrainPipeline, prefetch
from ..parallel import check_batch_size, is_primary, local_batch_rows, mesh_from_spec, replicate, shard_batch
from ._checkpoint import CheckpointInfo
from ._config import TrainConfig
from ._data import check_images, train_transform
from ._loop import Loop, LoopState, TrainSteps, evaluate_model, run_steps, start_state
from ._metrics import MetricsLog
from ._optim import ema_model
from ._run import Run
from ._signals import StopSignals
from ._steps import EvalResult

__all__ = ["FitResult", "check_teacher", "fit"]


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
        (`cait_eqx.with_compute_dtype`) with that rematerialisation (`cait_eqx.with_remat`).
    - `train_data`, `test_data`: `Dataset`s; `test_data` may be `None`.
    - `config`: a `TrainConfig`.
    - `key`: the run's `jax.random.key`. (Keyword only argument, like all that follow.)
    - `run_dir`: where `metrics.jsonl` and `checkpoints/` go (`Run(run_dir)`); `None` writes nothing.
    - `resume`: continue from the newest intact checkpoint in `run_dir/checkpoints` (from the start if there
        is none). The model, optimiser and settings must be those of the run.
    - `max_steps`: stop (with a checkpoint) once this many steps are done in total.
    - `progress`: show a tqdm progress bar on stderr.
    - `on_step`: called as `on_step(step, metrics)` with each step's host-side metrics.
    - `compile_step`: turns the pure training step into the one to run; default
        `cait_eqx.parallel.shard_train_step(step, mesh)` (one `eqx.filter_jit`, buffers donated).
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
    """
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"`max_steps` must be >= 0, got {max_steps}.")
    mesh = mesh_from_spec(None) if mesh is None else mesh
    check_batch_size(config.batch_size, mesh)  # before anything is compiled
    if resume and run_dir is None:
        raise ValueError("`resume=True` needs the `run_dir` that holds the checkpoints.")
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
    run = None if run_dir is None else Run(run_dir)
    # The model's structure (its static fields too) before the optimiser state, which holds it.
    state = start_state(_prepare_model(model, config), config, steps, key, run, resume)
    if run is not None and primary:
        run.path.mkdir(parents=True, exist_ok=True)
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
        checkpoint_dir=None if run is None else run.checkpoint_dir,
        primary=primary,
        several_processes=several_processes,
        log=_metrics_log(
            config, run.path if run is not None and primary else None, state.step if resume else None
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
                start = divmod(state.step, pipeline.steps_per_epoch)
                source = pipeline.batches(*start, stop_epoch=config.epochs)
                batches = prefetch(source, size=2, put=lambda b: (put((b.images, b.labels)), b.skipped))
                started = time.perf_counter()
                state.window.start = started
                run_steps(loop, state, batches)
                state.train_seconds = time.perf_counter() - started
        finally:
            if batches is not None:
                batches.close()
            if loop.bar is not None:
                loop.bar.close()
            loop.log.close()
        return _finish(loop, state)
