"""Label-smoothed soft-target cross-entropy, DeiT's distillation losses, mixup / cutmix on whole batches
with explicit keys, and `training_loss`: the loss the training step minimises, composed from them.

A new loss term is a function here and one line in `training_loss`; its settings are `TrainConfig` fields
of group `"step"` (which `StepConfig` takes from there), and its public name is listed in
`cait_eqx.training` (with its `docs/api/training.md` entry)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._config import StepConfig

__all__ = [
    "cross_entropy",
    "cutmix",
    "distillation_loss",
    "mix_batch",
    "mixup",
    "smooth_labels",
    "training_loss",
]


def smooth_labels(
    labels: Int[Array, " batch"], num_classes: int, smoothing: float = 0.0
) -> Float[Array, "batch {num_classes}"]:
    """One-hot targets with label smoothing: `1 - smoothing + smoothing / K` on the true class.

    Every other class gets `smoothing / K`.

    **Returns:** `(batch, num_classes)` float32 targets, each row summing to one.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing}.")
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * jnp.float32(1.0 - smoothing) + jnp.float32(smoothing / num_classes)


def cross_entropy(
    logits: Float[Array, "batch classes"], targets: Float[Array, "batch classes"]
) -> Float[Array, " batch"]:
    """Cross-entropy of soft `targets` (rows summing to one) under `logits`, per example, in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)


def distillation_loss(
    logits: Float[Array, "batch classes"],
    targets: Float[Array, "batch classes"],
    teacher_logits: Float[Array, "batch classes"],
    *,
    kind: str,
    alpha: float = 0.5,
    tau: float = 1.0,
) -> Float[Array, ""]:
    """DeiT's distillation loss (Touvron et al. 2021, `DistillationLoss`) for a model with one head: the
    class token's logits serve both terms.

    `(1 - alpha) * mean(cross_entropy(logits, targets)) + alpha * term`, where `term` is

    - `"hard"`: the cross-entropy of `logits` against the teacher's predicted classes (argmax, no
        smoothing), averaged over the batch. With the default `alpha = 0.5`:
        `CE(student, y) / 2 + CE(student, argmax teacher) / 2`.
    - `"soft"`: `tau² · KL(softmax(teacher / tau) ‖ softmax(logits / tau))`, summed over the batch and the
        classes and divided by their product `batch · classes`, as DeiT does (its `reduction="sum"` over
        `numel`, not `batchmean`).

    `targets` are the student's usual ones (label smoothing, mixup/cutmix), as DeiT's base criterion sees
    them; the teacher's logits are taken as constants (no gradient flows into them). In float32.

    **Arguments:**

    - `logits`: the student's logits.
    - `targets`: the soft targets, rows summing to one.
    - `teacher_logits`: the teacher's logits on the same (augmented, mixed) images.
    - `kind`: `"hard"` or `"soft"`. (Keyword only argument.)
    - `alpha`: the weight of the distillation term. (Keyword only argument.)
    - `tau`: the temperature of `"soft"`. (Keyword only argument.)

    **Returns:** the scalar loss.
    """
    if kind not in ("hard", "soft"):
        raise ValueError(f"`kind` must be 'hard' or 'soft', got {kind!r}.")
    logits = logits.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    base = jnp.mean(cross_entropy(logits, targets))
    if kind == "hard":
        predicted = jax.nn.one_hot(jnp.argmax(teacher, axis=-1), logits.shape[-1], dtype=jnp.float32)
        term = jnp.mean(cross_entropy(logits, predicted))
    else:
        log_student = jax.nn.log_softmax(logits / tau, axis=-1)
        log_teacher = jax.nn.log_softmax(teacher / tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student))
        term = kl * jnp.float32(tau * tau) / jnp.float32(logits.size)
    return jnp.float32(1.0 - alpha) * base + jnp.float32(alpha) * term


def training_loss(
    logits: Float[Array, "batch classes"],
    targets: Float[Array, "batch classes"],
    config: StepConfig,
    teacher_logits: Float[Array, "batch classes"] | None = None,
) -> Float[Array, ""]:
    """The loss the training step minimises, as `config` composes it.

    The mean `cross_entropy` of `logits` against the step's `targets` (smoothed, mixed); with
    `config.distillation` `"hard"` or `"soft"`, DeiT's `distillation_loss` against `teacher_logits` (which
    it then needs), weighted by `config.distillation_alpha`, at temperature `config.distillation_tau`.

    **Returns:** the scalar loss, in float32.
    """
    if config.distillation == "none":
        return jnp.mean(cross_entropy(logits, targets))
    return distillation_loss(
        logits,
        targets,
        teacher_logits,
        kind=config.distillation,
        alpha=config.distillation_alpha,
        tau=config.distillation_tau,
    )


def _partner(x: Array) -> Array:
    # Each example is mixed with the one at the mirrored position in the batch (as DeiT/timm do).
    return x[::-1]


def mixup(
    images: Float[Array, "batch channels height width"],
    targets: Float[Array, "batch classes"],
    *,
    key: PRNGKeyArray,
    alpha: float,
) -> tuple[Float[Array, "batch channels height width"], Float[Array, "batch classes"]]:
    """Mixup (Zhang et al. 2018): `lam * x + (1 - lam) * x_partner`, and the same for the targets.

    `lam ~ Beta(alpha, alpha)`.

    One `lam` per batch; example `i` is mixed with example `batch - 1 - i`.

    **Returns:** `(images, targets)`, the targets' rows still summing to one.
    """
    lam = jr.beta(key, alpha, alpha, dtype=jnp.float32)
    mixed = lam * images + (1.0 - lam) * _partner(images)
    return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * _partner(targets)


def cutmix(
    images: Float[Array, "batch channels height width"],
    targets: Float[Array, "batch classes"],
    *,
    key: PRNGKeyArray,
    alpha: float,
) -> tuple[Float[Array, "batch channels height width"], Float[Array, "batch classes"]]:
    """CutMix (Yun et al. 2019): paste a box from the partner image; mix the targets by the pasted area.

    `lam ~ Beta(alpha, alpha)`; the box has sides `sqrt(1 - lam)` of the image's, a uniformly drawn centre,
    and is clipped to the image. The targets use the box's *actual* area fraction `a` (after clipping):
    `(1 - a) * own + a * partner`. One box per batch; example `i`'s partner is example `batch - 1 - i`.

    **Returns:** `(images, targets)`, the targets' rows still summing to one.
    """
    lam_key, y_key, x_key = jr.split(key, 3)
    height, width = images.shape[-2:]
    lam = jr.beta(lam_key, alpha, alpha, dtype=jnp.float32)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(ratio * height).astype(jnp.int32)
    cut_w = jnp.floor(ratio * width).astype(jnp.int32)
    cy = jr.randint(y_key, (), 0, height)
    cx = jr.randint(x_key, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h - cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w - cut_w // 2, 0, width)
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
    mixed = jnp.where(inside[None, None], _partner(images), images)
    area = ((bottom - top) * (right - left)).astype(jnp.float32) / jnp.float32(height * width)
    return mixed, (1.0 - area) * targets + area * _partner(targets)


def mix_batch(
    images: Float[Array, "batch channels height width"],
    targets: Float[Array, "batch classes"],
    *,
    key: PRNGKeyArray,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[Float[Array, "batch channels height width"], Float[Array, "batch classes"]]:
    """DeiT's batch mixing: with probability `prob` apply cutmix (probability `switch_prob`) or mixup.

    With only one of `mixup_alpha` / `cutmix_alpha` positive, that one is used; with both zero this is the
    identity and draws nothing.

    **Returns:** `(images, targets)`.
    """
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or prob == 0:
        return images, targets
    apply_key, switch_key, mix_key, cut_key = jr.split(key, 4)
    candidates = []
    if use_mixup:
        candidates.append(mixup(images, targets, key=mix_key, alpha=mixup_alpha))
    if use_cutmix:
        candidates.append(cutmix(images, targets, key=cut_key, alpha=cutmix_alpha))
    if len(candidates) == 2:
        pick_cut = jr.bernoulli(switch_key, switch_prob)
        chosen = jax.tree.map(lambda m, c: jnp.where(pick_cut, c, m), candidates[0], candidates[1])
    else:
        chosen = candidates[0]
    if prob >= 1.0:
        return chosen
    apply = jr.bernoulli(apply_key, prob)
    return jax.tree.map(lambda new, old: jnp.where(apply, new, old), chosen, (images, targets))
