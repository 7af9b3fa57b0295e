"""The fit loop: batches → steps → metrics, evaluation, checkpoints; exact resume; clean stops."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
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

from .._atomic import atomic_write_bytes
from ..data._augment import NORMALIZATIONS
from ..data._datasets import Dataset
from ..data._loader import BatchLoader, prefetch
from ._checkpoint import CheckpointError, CheckpointInfo, list_checkpoints, load_checkpoint, save_checkpoint
from ._optim import ema_model, make_optimizer, warmup_cosine_schedule
from ._steps import EvalResult, StepConfig, evaluate, make_train_step

__all__ = ["FitResult", "NonFiniteLossError", "TrainConfig", "build_optimizer", "fit"]

logger = logging.getLogger("cait_eqx")

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# Settings that change the sequence of parameters; a resumed run must use the same ones to be exact.
_TRAJECTORY_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "clip_norm",
    "label_smoothing",
    "mixup_alpha",
    "cutmix_alpha",
    "mix_prob",
    "switch_prob",
    "crop_padding",
    "flip",
    "ema_decay",
    "normalize",
    "seed",
    "compute_dtype",
)

# The compute dtypes training offers (float16 would need loss scaling, which the step does not do).
TRAIN_COMPUTE_DTYPES = ("float32", "bfloat16")


@typing.no_type_check  # checked by `__post_init__`: ints where floats go, and clear `ValueError`s
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training recipe and the loop's bookkeeping. The defaults are `cait-eqx train`'s digits defaults.

    Recipe: `epochs`, `batch_size`, peak learning rate `lr` reached after `warmup_epochs` of linear warm-up
    and cosine-decayed to `min_lr` (a warm-up as long as the run or longer, e.g. the default 3 epochs in a
    2-epoch run, is cut to the run: the rate then rises to `lr` over the whole run and does not decay); AdamW `weight_decay` (masked off biases, norms, LayerScale, `pos_embed`,
    `cls_token`); `clip_norm` (global-norm gradient clipping, `None` = off); `label_smoothing`; mixup /
    cutmix (`mixup_alpha`, `cutmix_alpha`, `mix_prob`, `switch_prob`; 0 = off); random crop with
    `crop_padding` and left–right `flip`; `ema_decay` (EMA of the weights, `None` = off); input `normalize`
    (`"none"`: pixels in [0, 1], or `"imagenet"`); `seed` (batch order and every random draw);
    `compute_dtype` (`None`: the model's own; `"bfloat16"`: mixed precision, the model computes in bfloat16
    with its float32 weights, gradients and optimiser state, float32 LayerNorm statistics, softmaxes and
    loss; `"float32"`). Stochastic depth and dropout are the model's own (`layer_dropout`, `dropout`).

    Bookkeeping: evaluate every `eval_every` epochs; log training metrics every `log_every` steps;
    checkpoint every `checkpoint_every` steps (0: at the end of each epoch) and always at the end or on an
    interrupt, keeping the newest `keep_checkpoints`; `on_nonfinite` = `"stop"` (raise
    `NonFiniteLossError`) or `"skip"` (drop that update and go on); `eval_batch_size`.
    """

    epochs: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 3.0
    weight_decay: float = 0.05
    clip_norm: float | None = None
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    crop_padding: int = 2
    flip: bool = False
    ema_decay: float | None = None
    normalize: str = "none"
    seed: int = 0
    eval_every: int = 1
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    on_nonfinite: str = "stop"
    eval_batch_size: int = 500
    compute_dtype: str | None = None

    def __post_init__(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"TrainConfig `{name}` must be an int >= {minimum}, got {value!r}.")
            object.__setattr__(self, name, int(value))  # e.g. a NumPy integer

        def number(name, low, high, *, low_open=False, high_open=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            finite = not isinstance(value, bool) and isinstance(value, numbers.Real)
            if finite:
                try:
                    value = float(value)  # the numeric tower: an int (or a NumPy scalar) is a fine float
                except OverflowError:
                    finite = False
            if not finite or not math.isfinite(value):
                kind = " or None" if optional else ""
                got = getattr(self, name)
                raise ValueError(f"TrainConfig `{name}` must be a finite number{kind}, got {got!r}.")
            object.__setattr__(self, name, value)
            below = value <= low if low_open else value < low
            above = value >= high if high_open else value > high
            if below or above:
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"TrainConfig `{name}` must be in {interval}, got {value!r}.")

        for name in (
            "epochs",
            "batch_size",
            "eval_every",
            "log_every",
            "keep_checkpoints",
            "eval_batch_size",
        ):
            positive_int(name)
        positive_int("checkpoint_every", 0)
        positive_int("crop_padding", 0)
        positive_int("seed", 0)
        number("lr", 0.0, math.inf, low_open=True)
        number("min_lr", 0.0, self.lr)
        number("warmup_epochs", 0.0, math.inf)  # longer than the run: cut to the run (see above)
        number("weight_decay", 0.0, math.inf)
        number("clip_norm", 0.0, math.inf, low_open=True, optional=True)
        number("label_smoothing", 0.0, 1.0, high_open=True)
        number("mixup_alpha", 0.0, math.inf)
        number("cutmix_alpha", 0.0, math.inf)
        number("mix_prob", 0.0, 1.0)
        number("switch_prob", 0.0, 1.0)
        number("ema_decay", 0.0, 1.0, high_open=True, optional=True)
        if not isinstance(self.flip, bool):
            raise ValueError(f"TrainConfig `flip` must be a bool, got {self.flip!r}.")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"TrainConfig `normalize` must be one of {NORMALIZATIONS}, got {self.normalize!r}."
            )
        if self.compute_dtype is not None and self.compute_dtype not in TRAIN_COMPUTE_DTYPES:
            raise ValueError(
                f"TrainConfig `compute_dtype` must be one of {TRAIN_COMPUTE_DTYPES} or None (the model's "
                f"own), got {self.compute_dtype!r}. (float16 would need loss scaling, which training lacks.)"
            )
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(
                f"TrainConfig `on_nonfinite` must be 'stop' or 'skip', got {self.on_nonfinite!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def step_config(self, num_classes: int) -> StepConfig:
        """The per-batch part of the recipe, for `make_train_step`."""
        return StepConfig(
            num_classes=num_classes,
            label_smoothing=self.label_smoothing,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            mix_prob=self.mix_prob,
            switch_prob=self.switch_prob,
            crop_padding=self.crop_padding,
            flip=self.flip,
            normalize=self.normalize,
        )


def build_optimizer(
    config: TrainConfig, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser and learning-rate schedule of `config` for `steps_per_epoch` steps per epoch."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    schedule = warmup_cosine_schedule(config.lr, total, warmup, config.min_lr)
    optim = make_optimizer(
        schedule, weight_decay=config.weight_decay, clip_norm=config.clip_norm, ema_decay=config.ema_decay
    )
    return optim, schedule


@functools.lru_cache(maxsize=4)
def _recipe(config: TrainConfig, steps_per_epoch: int, num_classes: int, mesh: Mesh):
    """Optimiser, schedule, pure step, and the train and eval steps compiled for `mesh`, shared by `fit`
    calls with the same recipe and mesh (so that, e.g., a resumed run in the same process does not compile
    again)."""
    from .. import parallel  # imported here: `parallel` builds on this package's steps

    optim, schedule = build_optimizer(config, steps_per_epoch)
    pure_step = make_train_step(optim, config.step_config(num_classes), jit=False)
    train_step = parallel.shard_train_step(pure_step, mesh)
    eval_step = parallel.make_sharded_eval_step(mesh, config.normalize)
    return optim, schedule, pure_step, train_step, eval_step


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient (and `on_nonfinite="stop"`)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclasses.dataclass
class FitResult:
    """What `fit` ends with.

    - `model`, `opt_state`: the final training state (`ema` holds the EMA model when one is tracked).
    - `step`: optimiser steps taken in total; `total_steps`: the planned number.
    - `status`: `"completed"`, `"interrupted"` (SIGINT/SIGTERM; a checkpoint was saved when a run
        directory was given) or `"max_steps"` (stopped by `max_steps`).
    - `test`: the last evaluation on the test set (`None` without one); `ema_test`: the EMA model's, at
        the end.
    - `skipped_steps`: steps whose update was dropped as non-finite (`on_nonfinite="skip"`).
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
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    checkpoint: CheckpointInfo | None = None


class _StopSignals:
    """While active, SIGINT/SIGTERM set a flag (the loop checkpoints and returns); a second one stops now."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc):
        self.restore()
        return False


class _MetricsLog:
    """Appends records to `run_dir/metrics.jsonl` (one JSON object per line) and keeps them in memory."""

    def __init__(self, run_dir: Path | None, resume_step: int | None):
        self.records: list[dict[str, Any]] = []
        self.path = None if run_dir is None else run_dir / METRICS_FILE
        if self.path is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if (
                        resume_step is not None
                        and isinstance(record, dict)
                        and record.get("step", 0) <= resume_step
                    ):
                        kept.append(record)
            # Drop what was logged after the checkpoint we resume from (it will be logged again).
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            self.records = kept
        # Unbuffered: each record is one `write` call, so a process that stops at any instant (even with
        # `os._exit`, as `cait-eqx` does after a second Ctrl-C) leaves whole lines only.
        self._handle = None if self.path is None else open(self.path, "ab", buffering=0)  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._handle is not None:
            self._handle.write((json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _check_resume(info: CheckpointInfo, config: TrainConfig) -> None:
    saved = info.extra.get("train_config", {})
    now = config.to_dict()
    changed = [
        f"{k}: {saved.get(k)!r} → {now[k]!r}" for k in _TRAJECTORY_FIELDS if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise CheckpointError(
            f"Cannot resume exactly from {info.path}: the training settings differ from the checkpoint's "
            f"({'; '.join(changed)}). Resume with the run's own settings (`cait-eqx train --resume RUN_DIR` "
            f"reads them from RUN_DIR/config.json)."
        )


def fit(
    model: PyTree,
    train_data: Dataset,
    test_data: Dataset | None = None,
    config: TrainConfig = TrainConfig(),
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
) -> FitResult:
    """Train `model` on `train_data` with the recipe of `config`, evaluating, checkpointing and resuming.

    Every random draw comes from `key` (folded with the step number) and `config.seed` (the batch order), so
    the same call gives the same model, and a run resumed from a checkpoint continues bit for bit as if it
    had never stopped.

    **Arguments:**

    - `model`: the model to train (e.g. a `CaiT`), switched to training mode; its `layer_dropout` gives
        stochastic depth. Its arrays are copied, so the caller's model stays usable. With
        `config.compute_dtype` set it must be a `CaiT`, which then computes in that dtype
        (`cait_eqx.with_compute_dtype`).
    - `train_data`, `test_data`: `Dataset`s; `test_data` may be `None`.
    - `config`: a `TrainConfig`.
    - `key`: the run's `jax.random.key`. (Keyword only argument, like all that follow.)
    - `run_dir`: where `metrics.jsonl` and `checkpoints/` go; `None` writes nothing.
    - `resume`: continue from the newest intact checkpoint in `run_dir/checkpoints` (from the start if there
        is none). The model, optimiser and settings must be those of the run.
    - `max_steps`: stop (with a checkpoint) once this many steps are done in total.
    - `progress`: show a tqdm progress bar on stderr.
    - `on_step`: called as `on_step(step, metrics)` with each step's host-side metrics.
    - `compile_step`: turns the pure training step into the one to run; default
        `cait_eqx.parallel.shard_train_step(step, mesh)` (one `eqx.filter_jit`, buffers donated).
    - `put`: places each `(images, labels)` batch on the device(s), in the prefetch thread; default
        `cait_eqx.parallel.shard_batch` (split over the mesh's `data × fsdp` devices).
    - `handle_signals`: catch SIGINT/SIGTERM to checkpoint and return `status="interrupted"`.
    - `mesh`: the `jax.sharding.Mesh` to train on (`cait_eqx.parallel.make_mesh`); `None`: one device
        (with several processes: every device, data-parallel). The model and optimiser state are placed
        by `cait_eqx.parallel.shard_state` (replicated, large arrays split along `fsdp`); `config.batch_size`
        is the global batch and must split evenly over `data × fsdp`. With several processes each loads
        only its rows of every batch, and process 0 alone writes `run_dir` (a directory all processes
        read when resuming). Checkpoints hold whole arrays, so a run resumes on a mesh of any shape.

    **Returns:** a `FitResult`.

    **Raises:** `NonFiniteLossError` (naming the step) when a loss or gradient is not finite and
    `config.on_nonfinite == "stop"`; the update of that step is not applied and no checkpoint is written.
    """
    from .. import parallel

    if max_steps is not None and max_steps < 0:
        raise ValueError(f"`max_steps` must be >= 0, got {max_steps}.")
    if mesh is None:
        mesh = parallel.mesh_from_spec(None)
    parallel.check_batch_size(config.batch_size, mesh)  # before anything is compiled
    primary = parallel.is_primary()
    several_processes = jax.process_count() > 1
    run_path = None if run_dir is None else Path(run_dir)
    if resume and run_path is None:
        raise ValueError("`resume=True` needs the `run_dir` that holds the checkpoints.")
    num_classes = train_data.num_classes
    if test_data is not None and test_data.num_classes != num_classes:
        raise ValueError(
            f"Train and test data disagree on the number of classes: {num_classes} vs "
            f"{test_data.num_classes}."
        )
    loader = BatchLoader(train_data, config.batch_size, seed=config.seed)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    optim, schedule, pure_step, sharded_step, eval_step = _recipe(config, steps_per_epoch, num_classes, mesh)
    # Before the optimiser state, which holds the model's structure (its static fields too).
    if config.compute_dtype is not None:
        from .._model import CaiT, with_compute_dtype

        if not isinstance(model, CaiT):
            raise TypeError(
                f"TrainConfig `compute_dtype` switches a `CaiT`'s computation dtype, but the model is a "
                f"{type(model).__name__}: leave `compute_dtype=None` and set the dtype in the model yourself."
            )
        model = with_compute_dtype(model, config.compute_dtype)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    # Training mode (a model from `cait_eqx.load` comes in inference mode), and fresh buffers, so that
    # donating the model to the first step never invalidates the caller's arrays.
    model = eqx.nn.inference_mode(model, value=False)
    model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)

    step, epoch, index = 0, 0, 0
    checkpoint: CheckpointInfo | None = None
    checkpoint_dir = None if run_path is None else run_path / CHECKPOINT_DIR
    if not resume and checkpoint_dir is not None and list_checkpoints(checkpoint_dir):
        raise ValueError(
            f"{run_path} already holds checkpoints of a run: continue it with `resume=True` (CLI: "
            f"--resume) or train into a new directory."
        )
    if resume and checkpoint_dir is not None and list_checkpoints(checkpoint_dir):
        model, opt_state, key, checkpoint = load_checkpoint(checkpoint_dir, model=model, opt_state=opt_state)
        _check_resume(checkpoint, config)
        step, epoch, index = checkpoint.step, checkpoint.epoch, checkpoint.batch_index
    # Replicated, or split along `fsdp`; a checkpoint saved on another mesh lands on this one here.
    model, opt_state = parallel.shard_state((model, opt_state), mesh)
    if run_path is not None and primary:
        run_path.mkdir(parents=True, exist_ok=True)
    log = _MetricsLog(run_path if primary else None, step if resume else None)

    train_step = sharded_step if compile_step is None else compile_step(pure_step)
    if put is None:
        put = functools.partial(parallel.shard_batch, mesh=mesh, local=several_processes)

    def save(epoch_: int, index_: int) -> CheckpointInfo | None:
        if checkpoint_dir is None:
            return None
        # Whole arrays on the host; with several processes a collective that all of them join.
        state = parallel.to_host((model, opt_state)) if several_processes else (model, opt_state)
        if not primary:
            return None
        return save_checkpoint(
            checkpoint_dir,
            model=state[0],
            opt_state=state[1],
            key=key,
            step=step,
            epoch=epoch_,
            batch_index=index_,
            shuffle_seed=config.seed,
            keep=config.keep_checkpoints,
            extra={
                "train_config": config.to_dict(),
                "total_steps": total_steps,
                # The partly filled logging window, so a resumed run logs exactly what an unbroken one would.
                "window": {k: window[k] for k in ("loss", "accuracy", "count")},
            },
        )

    def run_eval(current_model) -> EvalResult | None:
        if test_data is None:
            return None
        return evaluate(
            current_model,
            test_data,
            batch_size=config.eval_batch_size,
            normalize=config.normalize,
            eval_step=eval_step,
        )

    bar = None
    if progress and primary:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps if max_steps is None else min(total_steps, max_steps),
            initial=min(step, total_steps),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )

    window = {"loss": 0.0, "accuracy": 0.0, "count": 0, "timed": 0, "start": time.perf_counter()}
    if checkpoint is not None:
        saved_window = checkpoint.extra.get("window", {})
        for name in ("loss", "accuracy", "count"):
            window[name] = type(window[name])(saved_window.get(name, window[name]))
    last_test: EvalResult | None = None
    skipped = 0
    images_done = 0
    pending: tuple[int, dict[str, Any]] | None = None
    train_seconds = 0.0
    status = "completed"
    postfix: dict[str, str] = {}

    def consume(item: tuple[int, dict[str, Any]]) -> None:
        nonlocal skipped
        done_step, metrics = item
        host = {name: np.asarray(value).item() for name, value in metrics.items()}
        if not host["finite"]:
            if config.on_nonfinite == "stop":
                last = (
                    f" The last checkpoint, {checkpoint.path}, is intact." if checkpoint is not None else ""
                )
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {done_step} (loss {host['loss']}, gradient norm "
                    f"{host['grad_norm']}); that update was not applied.{last} Lower the learning rate "
                    f"(--lr), clip gradients (--clip-norm), or skip such steps (--on-nonfinite skip).",
                    done_step,
                )
            skipped += 1
            message = f"step {done_step}: non-finite loss or gradient, update skipped"
            if bar is not None:
                bar.write(message)
            else:  # no progress bar to write under (--no-progress): the step is still named
                logger.warning("cait_eqx: %s", message)
        else:
            window["loss"] += host["loss"]
            window["accuracy"] += host["accuracy"]
            window["count"] += 1
        window["timed"] += 1
        if on_step is not None:
            on_step(done_step, host)

    def log_train(done_step: int) -> None:
        now = time.perf_counter()
        steps_in_window = window["count"]
        if steps_in_window == 0:
            return
        elapsed = max(now - window["start"], 1e-9)
        timed = window["timed"]
        record = {
            "step": done_step,
            "epoch": done_step / steps_per_epoch,
            "split": "train",
            "loss": window["loss"] / steps_in_window,
            "accuracy": window["accuracy"] / steps_in_window,
            "lr": float(schedule(done_step - 1)),
            "images_per_s": timed * config.batch_size / elapsed,
        }
        log.write(record)
        postfix.update(
            loss=f"{record['loss']:.3f}",
            acc=f"{record['accuracy']:.3f}",
            img_s=f"{record['images_per_s']:.0f}",
        )
        if bar is not None:
            bar.set_postfix(postfix, refresh=False)
        window.update(loss=0.0, accuracy=0.0, count=0, timed=0, start=now)

    def log_test(done_step: int, current_model) -> None:
        nonlocal last_test
        last_test = run_eval(current_model)
        if last_test is not None:
            log.write(
                {
                    "step": done_step,
                    "epoch": done_step / steps_per_epoch,
                    "split": "test",
                    "loss": last_test.loss,
                    "accuracy": last_test.top1,
                }
            )
            postfix["test_acc"] = f"{last_test.top1:.4f}"
            if bar is not None:
                bar.set_postfix(postfix, refresh=False)

    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    batches: Iterator | None = None
    try:
        with _StopSignals(handle_signals) as signals:
            if step < stop_at:
                # With several processes, each loads only its rows of every global batch.
                source = (
                    parallel.process_local_batches(loader, mesh, epoch, index, stop_epoch=config.epochs)
                    if several_processes
                    else loader.batches(epoch, index, stop_epoch=config.epochs)
                )
                batches = prefetch(
                    source,
                    size=2,
                    put=lambda b: (b.epoch, b.index, put((b.images, b.labels))),
                )
                started = time.perf_counter()
                window["start"] = started
                for batch_epoch, batch_index, batch in batches:
                    model, opt_state, metrics = train_step(model, opt_state, batch, jr.fold_in(key, step))
                    step += 1
                    images_done += config.batch_size
                    epoch, index = batch_epoch, batch_index + 1
                    epoch_end = index == steps_per_epoch
                    if epoch_end:
                        epoch, index = epoch + 1, 0
                    if pending is not None:
                        consume(pending)  # the previous step's metrics, fetched while this step runs
                    pending = (step, metrics)
                    if bar is not None:
                        bar.update(1)
                    checkpoint_due = (
                        epoch_end if config.checkpoint_every == 0 else step % config.checkpoint_every == 0
                    )
                    finishing = step >= stop_at or signals.received is not None
                    if step % config.log_every == 0 or epoch_end or checkpoint_due or finishing:
                        consume(pending)
                        pending = None
                    # Logged at fixed steps only (a stop carries the open window in its checkpoint).
                    if step % config.log_every == 0 or epoch_end:
                        log_train(step)
                    if epoch_end and (epoch % config.eval_every == 0 or epoch == config.epochs):
                        log_test(step, model)
                    if checkpoint_due or finishing:
                        checkpoint = save(epoch, index) or checkpoint
                    if signals.received is not None:
                        status = "interrupted"
                        break
                    if step >= stop_at:
                        break
                train_seconds = time.perf_counter() - started
            if status == "completed" and step < total_steps:
                status = "max_steps"
    finally:
        if batches is not None:
            batches.close()
        if bar is not None:
            bar.close()
        log.close()

    if status == "completed" and last_test is None and test_data is not None:
        last_test = run_eval(model)
    ema = ema_test = None
    if config.ema_decay is not None:
        ema = ema_model(model, opt_state)
        if status == "completed" and test_data is not None:
            ema_test = run_eval(ema)
    return FitResult(
        model=model,
        opt_state=opt_state,
        step=step,
        total_steps=total_steps,
        status=status,
        test=last_test,
        ema=ema,
        ema_test=ema_test,
        skipped_steps=skipped,
        train_seconds=train_seconds,
        images_per_s=images_done / train_seconds if train_seconds > 0 else 0.0,
        checkpoint=checkpoint,
    )
