"""The training and evaluation steps: pure functions of (model, opt_state, batch, key), one jit per shape."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Shaped

from .._atomic import atomic_write_bytes
from .._batch import auto_train_chunk_of, batched, micro_batch_count, value_and_grad_in_parts
from ..data import DataSource, eval_batches, normalize_images, to_unit_float
from ._config import StepConfig
from ._freeze import merge_trainable, trainable_model, trainable_params
from ._jit import owned_filter_jit
from ._losses import cross_entropy, mix_batch, smooth_labels, training_loss

__all__ = [
    "EvalResult",
    "NonFiniteLossError",
    "evaluate",
    "jit_train_step",
    "make_eval_step",
    "make_train_step",
]


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient (and `on_nonfinite="stop"`).

    **Arguments:**

    - `message`: what happened and what to do.
    - `step`: the step whose loss or gradient was not finite (its update was not applied).
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _select(flag: Array, new: PyTree, old: PyTree) -> PyTree:
    """`new` where `flag` is true, else `old`, leaf by leaf (array leaves only)."""
    new_arrays, static = eqx.partition(new, eqx.is_array)
    old_arrays = eqx.filter(old, eqx.is_array)
    chosen = jax.tree.map(lambda n, o: jnp.where(flag, n, o), new_arrays, old_arrays)
    return eqx.combine(chosen, static)


def make_train_step(
    optim: optax.GradientTransformation, config: StepConfig, *, jit: bool = True
) -> Callable[..., tuple[Any, Any, dict[str, Array]]]:
    """Build the training step `step(model, opt_state, batch, key, teacher=None) -> (model, state, metrics)`.

    Inside: pixels to `[0, 1]`, per-image augmentation and per-example model keys (all split from `key`),
    normalisation, label smoothing and mixup/cutmix, then `eqx.filter_value_and_grad` of the mean
    cross-entropy over `jax.vmap(model)` with respect to `params = trainable_params(model, config.freeze)`
    (every array unless some are frozen: no frozen gradient is computed, and the backward pass never
    enters frozen first blocks), `optim.update(grads, opt_state, params)` and `eqx.apply_updates`; the
    optimiser state must be `optim.init(params)`. With `config.grad_accum_steps` K > 1 the gradient is taken
    over K micro-batches of `batch / K` images in turn, in one `lax.scan` inside the step (micro-batch `k`:
    images `k, k + K, ...`), and averaged: the whole batch's mean gradient, with one micro-batch's
    activations in memory. On the CPU the step also takes its gradient in parts for speed: micro-batches of at
    most `config.step_chunk` images (`None`: `cait_eqx.auto_train_chunk(model.config)` on a CPU backend of
    one device, else whole), their count a multiple of K (`cait_eqx.chunked_value_and_grad`'s rule).
    Everything before the model (augmentation, mixing, the per-example keys) is the
    whole batch's, so the step computes the same function as with K = 1, up to float32 rounding. With
    `config.distillation` `"hard"` or `"soft"` the step takes a `teacher` (any image → logits callable
    that `jax.vmap` can map: a `CaiT`, an Equinox module, a pure function), runs it in inference mode on
    the same augmented, mixed and normalised images, without gradients, and
    the loss is `distillation_loss` (DeiT's). If the loss or the gradient norm is not finite the update is
    **not** applied: the model and optimiser state come back unchanged and `metrics["finite"]` is false
    (the caller decides to stop or skip).

    The step is a pure function of its arguments, so it runs unchanged on sharded inputs under a
    `jax.sharding` mesh.

    **Arguments:**

    - `optim`: the optimiser, e.g. `make_optimizer(...)`.
    - `config`: a `StepConfig`.
    - `jit`: compile it (`jit_train_step`: `eqx.filter_jit`'s rules, its programs freed with the step) with
        the model, optimiser state and batch buffers donated (use only the returned ones; the teacher's are
        kept). `False` gives the plain function, to wrap yourself.
        (Keyword only argument.)

    **Returns:** the step. `metrics` holds scalars `loss`, `accuracy` (against the unmixed labels),
    `grad_norm` and `finite`.
    """
    augment = config.augment
    accum = config.grad_accum_steps
    if config.reprob > 0:
        from ..data import random_erasing

    def train_step(
        model: PyTree,
        opt_state: PyTree,
        batch: tuple[Shaped[Array, "batch channels height width"], Int[Array, " batch"]],
        key: PRNGKeyArray,
        teacher: PyTree = None,
    ) -> tuple[PyTree, PyTree, dict[str, Array]]:
        images, labels = batch
        size = images.shape[0]
        if size % accum:
            raise ValueError(
                f"A batch of {size} images does not split into `grad_accum_steps={accum}` equal "
                f"micro-batches: give a batch whose size is a multiple of {accum}."
            )
        aug_key, mix_key, model_key = jr.split(key, 3)
        x = to_unit_float(images)
        if not augment.is_identity:
            x = jax.vmap(lambda image, k: augment(image, key=k))(x, jr.split(aug_key, size))
        x = normalize_images(x, config.normalize)
        if config.reprob > 0:  # timm's random erasing, after normalisation; its own key leaves the rest alone
            erase_keys = jr.split(jr.fold_in(aug_key, 1), size)
            x = jax.vmap(
                lambda image, k: random_erasing(
                    image, key=k, probability=config.reprob, mode=config.remode, count=config.recount
                )
            )(x, erase_keys)
        targets = smooth_labels(labels, config.num_classes, config.label_smoothing)
        x, targets = mix_batch(
            x,
            targets,
            key=mix_key,
            mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha,
            prob=config.mix_prob,
            switch_prob=config.switch_prob,
        )
        example_keys = jr.split(model_key, size)
        params = trainable_params(model, config.freeze)

        def loss_fn(params, x, targets, example_keys):
            # The teacher per micro-batch too: its activations are one micro-batch's.
            teacher_logits = _teacher_logits(teacher, x, config.distillation)
            student = trainable_model(model, params)
            logits = jax.vmap(lambda image, k: student(image, key=k))(x, example_keys)
            return training_loss(logits, targets, config, teacher_logits), logits

        grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        count = step_parts(model, size, config.step_chunk, accum)
        (loss, logits), grads = value_and_grad_in_parts(
            grad_fn, params, (x, targets, example_keys), count, has_aux=True
        )
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
        updates, new_opt_state = optim.update(grads, opt_state, params)
        new_model = merge_trainable(model, eqx.apply_updates(params, updates))
        grad_norm = optax.tree.norm(grads)
        # An update can overflow even when the gradient is finite (a huge learning rate): refuse it too.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        new_model, new_opt_state = _select(finite, (new_model, new_opt_state), (model, opt_state))
        accuracy = correct.astype(jnp.float32) / jnp.float32(size)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "finite": finite}
        return new_model, new_opt_state, metrics

    return jit_train_step(train_step) if jit else train_step


def step_parts(model: PyTree, batch_size: int, step_chunk: int | None, grad_accum_steps: int) -> int:
    """How many parts the training step runs a batch of `batch_size` as: `grad_accum_steps` micro-batches,
    each cut into parts of at most `step_chunk` images (`None`: `cait_eqx.auto_train_chunk(model.config)`
    on a CPU backend of one device, else whole). The one rule the step, `fit`'s mesh check and a run's
    `config.json` (`runtime.step_parts`) share."""
    chunk = auto_train_chunk_of(model) if step_chunk is None else step_chunk
    return micro_batch_count(batch_size, chunk, multiple_of=grad_accum_steps)


def jit_train_step(step: Callable[..., tuple[Any, Any, Any]]) -> Callable[..., tuple[Any, Any, Any]]:
    """`step(model, opt_state, batch, key, teacher=None)` compiled once, donating the buffers of every
    argument but the teacher (use only the returned model and state; a teacher stays usable). Compiled by
    `owned_filter_jit` (`eqx.filter_jit`'s rules), so its programs are freed with the returned function.

    **Arguments:**

    - `step`: a training step, e.g. `make_train_step(optim, config, jit=False)`, or one that places its
        arguments on a mesh first (`cait_eqx.parallel.shard_train_step`).

    **Returns:** `jitted(model, opt_state, batch, key, teacher=None)`, which calls `step` without a teacher
    when none is given.
    """

    def teacher_first(teacher, model, opt_state, batch, key):
        if teacher is None:
            return step(model, opt_state, batch, key)
        return step(model, opt_state, batch, key, teacher)

    # The teacher first, so that "all-except-first" donates everything else.
    compiled = owned_filter_jit(teacher_first, donate="all-except-first")

    def jitted(model, opt_state, batch, key, teacher=None):
        return compiled(teacher, model, opt_state, batch, key)

    return jitted


def _teacher_logits(teacher: PyTree, x: Array, distillation: str) -> Array | None:
    """The frozen teacher's logits on the batch the student sees (`None` without distillation)."""
    if distillation == "none":
        return None
    if teacher is None:
        raise ValueError(
            f"`distillation={distillation!r}` needs a teacher: call the step with `teacher=...` (`fit` takes "
            f"one as `fit(..., teacher=model)`)."
        )
    frozen = eqx.nn.inference_mode(teacher)
    return jax.lax.stop_gradient(batched(frozen)(x))


def _eval_step(
    model: PyTree,
    batch: tuple[Shaped[Array, "batch channels height width"], Int[Array, " batch"]],
    *,
    normalize: str = "none",
) -> dict[str, Array]:
    images, labels = batch
    model = eqx.nn.inference_mode(model)
    x = normalize_images(to_unit_float(images), normalize)
    logits = batched(model)(x)
    num_classes = logits.shape[-1]
    loss = cross_entropy(logits, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
    return {"logits": logits.astype(jnp.float32), "loss": loss}


# One jitted function for every evaluation step: JAX's own cache compiles it once per model structure, batch
# shape and normalisation, however many times `make_eval_step` or `evaluate` is called.
_jitted_eval_step = eqx.filter_jit(_eval_step)


def make_eval_step(normalize: str = "none", *, jit: bool = True) -> Callable[..., dict[str, Array]]:
    """Build the evaluation step `step(model, (images, labels)) -> {"logits", "loss"}`, in inference mode.

    Every dropout and stochastic depth is off (`eqx.nn.inference_mode`); no key is needed. `loss` is the
    per-example cross-entropy against the hard labels.

    **Arguments:**

    - `normalize`: the input normalisation the model was trained with.
    - `jit`: wrap in `eqx.filter_jit` (nothing donated). All jitted evaluation steps share one compilation
        per model structure, batch shape and `normalize`. (Keyword only argument.)

    **Returns:** the step.
    """
    return functools.partial(_jitted_eval_step if jit else _eval_step, normalize=normalize)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Evaluation of a classifier on a dataset.

    `confusion[i, j]` counts examples of true class `i` predicted as class `j`.
    """

    loss: float
    top1: float
    top5: float
    confusion: np.ndarray
    num_examples: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "num_examples": self.num_examples,
            "confusion": self.confusion.tolist(),
        }

    def write_json(self, path: str | os.PathLike, **context: Any) -> Path:
        """Write `context` (e.g. what was evaluated on what) and `as_dict()` to `path` as JSON, atomically.

        **Returns:** the path written.
        """
        values = {**context, **self.as_dict()}
        return atomic_write_bytes(path, (json.dumps(values, indent=2) + "\n").encode())


def evaluate(
    model: PyTree,
    dataset: DataSource,
    *,
    batch_size: int = 500,
    normalize: str = "none",
    eval_step: Callable[..., dict[str, Array]] | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    timeout: float | int | None = None,
) -> EvalResult:
    """Top-1 and top-5 accuracy, mean loss and the confusion matrix of `model` on every example of `dataset`.

    **Arguments:**

    - `model`: a classifier (run in inference mode).
    - `dataset`: the examples; its `num_classes` must match the model's outputs.
    - `batch_size`: examples per step (the last batch is padded, so one compilation). (Keyword only argument.)
    - `normalize`: the input normalisation the model was trained with. (Keyword only argument.)
    - `eval_step`: a prebuilt `make_eval_step(...)` to reuse its compilation. (Keyword only argument.)
    - `transform`: how each image read at its own size becomes the model's input, e.g. timm's resize and
        centre crop (`eval_transform(config, dataset)`); `None`: the dataset's `read` (its `image_size`).
        (Keyword only argument.)
    - `timeout`: the longest wait for one batch of images, in seconds (`None`: for ever); then
        `cait_eqx.data.DataWorkerError` names the batch and its files (`fit` passes `config.data_timeout`).
        (Keyword only argument.)

    **Returns:** an `EvalResult`. Top-5 is top-`min(5, num_classes)`.
    """
    step = make_eval_step(normalize) if eval_step is None else eval_step
    batch_size = max(1, min(batch_size, len(dataset)))
    k = min(5, dataset.num_classes)
    confusion = np.zeros((dataset.num_classes, dataset.num_classes), np.int64)
    loss_sum, top1, topk = 0.0, 0, 0
    batches = eval_batches(dataset, batch_size, transform, timeout=timeout)
    try:
        for images, labels, valid in batches:
            out = step(model, (jnp.asarray(images), jnp.asarray(labels)))
            logits = np.asarray(out["logits"])[valid]
            if logits.shape[-1] != dataset.num_classes:
                raise ValueError(
                    f"The model has {logits.shape[-1]} outputs but the dataset {dataset.name!r} has "
                    f"{dataset.num_classes} classes."
                )
            truth = labels[valid]
            loss_sum += float(np.asarray(out["loss"])[valid].sum())
            predicted = logits.argmax(axis=-1)
            top1 += int((predicted == truth).sum())
            ranked = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
            topk += int((ranked == truth[:, None]).any(axis=-1).sum())
            np.add.at(confusion, (truth, predicted), 1)
    finally:
        batches.close()  # a thread reading ahead stops
    n = len(dataset)
    return EvalResult(loss_sum / n, top1 / n, topk / n, confusion, n)
