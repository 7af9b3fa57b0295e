"""The training loop: an explicit state, and the steps `fit` runs over it.

`Loop` holds what stays fixed while training (the data, the compiled steps, the log, the signals);
`LoopState` what changes (model, optimiser state, key, step, the logging window). The data position is the
step: batch number `step` comes next (`Loop.position`), so no iterator state is kept or saved. `run_steps`
is one `for` over the batches: `_train_step`, then what is due at that step (`_take_metrics`, `_log`,
`_log_test`, `_checkpoint`), then `_should_stop`. `start_state` builds the first state, fresh or from a
checkpoint.
`cait_eqx.training.fit` (`_trainer.py`) sets them up and ends with the final evaluations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.random as jr
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray, PyTree

from ..data import DataSource
from ..parallel import make_sharded_eval_step, mesh_from_spec, shard_state, shard_train_step, to_host
from ._checkpoint import CheckpointError, CheckpointInfo, list_checkpoints, load_checkpoint, save_checkpoint
from ._config import TrainConfig
from ._metrics import MetricsLog, TrainWindow
from ._optim import build_optimizer
from ._run import Run
from ._signals import StopSignals
from ._steps import EvalResult, NonFiniteLossError, evaluate, make_train_step

__all__ = ["Loop", "LoopState", "TrainSteps", "evaluate_model", "run_steps", "start_state"]

logger = logging.getLogger("cait_eqx")


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
    now = config.to_dict()
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


def start_state(
    model: PyTree, config: TrainConfig, steps: TrainSteps, key: PRNGKeyArray, run: Run | None, resume: bool
) -> LoopState:
    """The loop's first state: `model` fresh, or the newest checkpoint of `run` when resuming."""
    opt_state = steps.optim.init(eqx.filter(model, eqx.is_array))
    state = LoopState(model, opt_state, key)
    checkpoints = list_checkpoints(run.checkpoint_dir) if run is not None else []
    found = bool(checkpoints)
    if found and not resume:
        raise ValueError(
            f"{run.path} already holds checkpoints of a run: continue it with `resume=True` or train into a "
            f"new directory."
        )
    if found:
        # Settings first: some (`freeze`) change the optimiser state's structure, which loading would refuse
        # without naming the setting.
        _check_resume(checkpoints[-1], config)
        state.model, state.opt_state, state.key, info = load_checkpoint(
            run.checkpoint_dir, model=model, opt_state=opt_state
        )
        _check_resume(info, config)
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
        },
    )


def _should_stop(loop: Loop, state: LoopState, stop_asked: bool) -> bool:
    """Whether the loop ends after this step: a stop was asked for, or the last step is done."""
    return stop_asked or loop.signals.urgent or state.step >= loop.stop_at


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
