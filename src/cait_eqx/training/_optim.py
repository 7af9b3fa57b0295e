"""The DeiT/CaiT optimiser recipe as composable optax pieces.

`make_optimizer` chains: optional gradient clipping → Adam moments → decoupled weight decay on the weight
matrices only (`weight_decay_mask`) → the learning-rate schedule → optional EMA of the weights. Every piece
is a public function, so a user can re-chain them differently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from .._layers import Linear
from ._config import TrainConfig

__all__ = [
    "EmaState",
    "build_optimizer",
    "decayed_leaf_names",
    "ema_model",
    "ema_weights",
    "make_optimizer",
    "warmup_cosine_schedule",
    "weight_decay_mask",
]

# The modules whose `weight` is a linear map: the only parameters that weight decay should shrink.
_DECAYED_MODULES = (Linear, eqx.nn.Linear, eqx.nn.Conv)


def weight_decay_mask(model: PyTree) -> PyTree:
    """Which parameters take weight decay: `True` for the `weight` of every linear map, `False` elsewhere.

    Derived from the module types in the PyTree, not from a list of names: the weights of `Linear`s and
    convolutions decay (including the patch embedding and the talking-heads mixes); their biases, every
    `LayerNorm`, every `LayerScale` gamma, `pos_embed` and `cls_token` do not — DeiT/CaiT's exclusions. The
    stacked self-attention blocks (a leading depth axis) are judged by type, so their matrices decay even
    though they are 3-D.

    **Arguments:**

    - `model`: a model, or its parameters `eqx.filter(model, eqx.is_array)` (what optax passes to a callable
        mask).

    **Returns:** a PyTree with the structure of `eqx.filter(model, eqx.is_array)`, `True`/`False` per array.
    """
    params = eqx.filter(model, eqx.is_array)

    def mark(node):
        if isinstance(node, _DECAYED_MODULES):
            flags = jax.tree.map(lambda _: False, node)
            return eqx.tree_at(lambda m: m.weight, flags, True)
        return False

    return jax.tree.map(mark, params, is_leaf=lambda node: isinstance(node, _DECAYED_MODULES))


def decayed_leaf_names(model: PyTree) -> list[str]:
    """The paths (like `blocks.attn.qkv.weight`) of the parameters that `weight_decay_mask` decays."""
    mask = weight_decay_mask(model)
    names = []
    for path, flag in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if flag:
            names.append(jax.tree_util.keystr(path, simple=True, separator="."))
    return names


def warmup_cosine_schedule(
    peak_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`.

    **Returns:** an optax schedule, `step -> learning rate`.
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"`warmup_steps` must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if warmup_steps == total_steps:
        return optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=min_lr,
    )


class EmaState(NamedTuple):
    """The exponential moving average of the parameters (structured as `eqx.filter(model, eqx.is_array)`)."""

    ema: PyTree


def ema_weights(decay: float) -> optax.GradientTransformation:
    """Track an exponential moving average of the parameters *after* each update; the updates pass unchanged.

    Put it last in a chain (after the learning rate). The average lives in the optimiser state, so it is
    checkpointed, sharded and donated with it; read it with `ema_model(model, opt_state)`.

    **Arguments:**

    - `decay`: weight of the old average, in [0, 1) (e.g. 0.999).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA `decay` must be in [0, 1), got {decay}.")

    def init_fn(params):
        # Fresh buffers (not the parameters' own), so donating model and state together never aliases.
        return EmaState(jax.tree.map(jnp.copy, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("`ema_weights` needs the parameters: call `optim.update(grads, state, params)`.")
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(
            lambda avg, new: (decay * avg + (1.0 - decay) * new).astype(avg.dtype), state.ema, new_params
        )
        return updates, EmaState(ema)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_model(model: PyTree, opt_state: PyTree) -> PyTree:
    """The model with its parameters replaced by their moving average from `opt_state` (see `ema_weights`).

    **Raises:** `ValueError` if the optimiser tracks no EMA.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, EmaState))
        if isinstance(s, EmaState)
    ]
    if not found:
        raise ValueError("This optimiser state holds no EMA: build the optimiser with `ema_decay=...`.")
    return eqx.combine(found[0].ema, model)


def make_optimizer(
    learning_rate: float | Callable[[Any], Any],
    *,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    ema_decay: float | None = None,
) -> optax.GradientTransformation:
    """AdamW as in DeiT/CaiT, with weight decay masked by `weight_decay_mask`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule (e.g. `warmup_cosine_schedule(...)`).
    - `weight_decay`: decoupled weight-decay coefficient (DeiT: 0.05). (Keyword only argument.)
    - `b1`, `b2`, `eps`: Adam's constants. (Keyword only arguments.)
    - `clip_norm`: clip the gradients' global norm to this value first; `None` for no clipping.
        (Keyword only argument.)
    - `ema_decay`: also keep an EMA of the weights (see `ema_model`); `None` for none. (Keyword only
        argument.)

    **Returns:** an `optax.GradientTransformation`; use it on `eqx.filter(model, eqx.is_array)`.
    """
    parts = []
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError(f"`clip_norm` must be positive (or None for no clipping), got {clip_norm}.")
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
    if weight_decay > 0:
        parts.append(optax.masked(optax.add_decayed_weights(weight_decay), weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if ema_decay is not None:
        parts.append(ema_weights(ema_decay))
    return optax.chain(*parts)


def build_optimizer(
    config: TrainConfig, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser and learning-rate schedule of `config` for `steps_per_epoch` steps per epoch.

    **Arguments:**

    - `config`: the `TrainConfig` (its `epochs`, `lr`, `min_lr`, `warmup_epochs`, `weight_decay`,
        `clip_norm` and `ema_decay`).
    - `steps_per_epoch`: optimiser steps per epoch (`len(train_data) // config.batch_size`).

    **Returns:** `(optim, schedule)`: `make_optimizer(schedule, ...)` and the `warmup_cosine_schedule`.
    """
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    schedule = warmup_cosine_schedule(config.lr, total, warmup, config.min_lr)
    optim = make_optimizer(
        schedule, weight_decay=config.weight_decay, clip_norm=config.clip_norm, ema_decay=config.ema_decay
    )
    return optim, schedule
