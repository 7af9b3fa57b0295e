"""The DeiT/CaiT optimiser recipe as composable optax pieces.

`make_optimizer` chains: optional gradient clipping → Adam moments → decoupled weight decay on the weight
matrices only (`weight_decay_mask`) → the learning-rate schedule → optional layer-wise learning-rate decay
(`scale_by_layer_decay`, timm's grouping) → optional EMA of the weights. Freezing the backbone (a linear
probe) routes every parameter but the head's to zero updates with `optax.multi_transform` (for a step that
computes every gradient; `fit`'s step differentiates only `trainable_params` instead). Every piece is a
public function, so a user can re-chain them differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree

from .._layers import Linear
from .._model import CaiT
from .._primitives import PatchProjection
from ._config import FREEZE_MODES, TrainConfig
from ._freeze import merge_trainable

__all__ = [
    "EmaState",
    "build_optimizer",
    "decayed_leaf_names",
    "ema_model",
    "ema_weights",
    "layer_decay_scales",
    "make_optimizer",
    "scale_by_layer_decay",
    "warmup_cosine_schedule",
    "weight_decay_mask",
]

# The modules whose `weight` is a linear map: the only parameters that weight decay should shrink.
_DECAYED_MODULES = (Linear, PatchProjection, eqx.nn.Linear, eqx.nn.Conv)


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
            # The matrices of the map: its weight (`None` in a frozen layer, `trainable_params`) and the two
            # of a LoRA update, which decay as other weights do.
            for name in ("weight", "lora_a", "lora_b"):
                if getattr(node, name, None) is not None:
                    flags = eqx.tree_at(lambda m, name=name: getattr(m, name), flags, True)
            return flags
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


# timm's `Cait.group_matcher` puts the stem in layer 0, SA block i in layer i + 1, the class-attention
# blocks alongside the last SA blocks (their layers end at `depth`, the norm's), the rest (the head) last.
_STEM_FIELDS = ("cls_token", "pos_embed", "patch_embed")


def _layer_ordinals(path: tuple[Any, ...], leaf: Any, depth: int, cls_depth: int) -> list[int | float]:
    """The ordinal of the layer of each row of a stacked leaf (one ordinal for any other leaf)."""
    field = path[0].name
    if field in _STEM_FIELDS:
        return [0]
    if field == "blocks":  # the last rows when the first blocks are frozen (`trainable_params`)
        return [depth - leaf.shape[0] + i + 1 for i in range(leaf.shape[0])]
    if field == "blocks_token_only":
        return [path[1].idx + depth - cls_depth + 1]
    if field == "norm":
        return [depth]
    return [math.inf]


def _check_layer_decay(layer_decay: Any) -> None:
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(
            f"`layer_decay` must be in (0, 1] (e.g. 0.75; 1 is no decay), got {layer_decay!r}. For one rate "
            f"everywhere pass `layer_decay=None` (`--layer-decay` not given)."
        )


def layer_decay_scales(model: PyTree, layer_decay: float) -> PyTree:
    """The factor by which layer-wise learning-rate decay multiplies each parameter's learning rate.

    The grouping is timm's (`param_groups_layer_decay` with `Cait.group_matcher`): the patch embedding,
    `pos_embed` and `cls_token` form the first layer, each self-attention block one layer, the final `norm`
    shares the last block's layer, the class-attention blocks take the layers of the last `cls_depth` SA
    blocks (with `cls_depth=2`: the first CA block the second-to-last SA block's, the second the last's), and
    the head is the top layer. With `L` the number of layers, layer `l` (from 0) learns at
    `layer_decay ** (L - 1 - l)` times the rate: the head at the full rate, the stem at the smallest. Without
    a head (`num_classes=0`) the final `norm` is the top layer.

    **Arguments:**

    - `model`: a `CaiT`, or a PyTree of the same structure (`eqx.filter(model, eqx.is_array)`, gradients).
    - `layer_decay`: the decay per layer, in (0, 1] (timm's fine-tuning recipes use 0.65–0.75).

    **Returns:** a PyTree with the structure of `eqx.filter(model, eqx.is_array)` holding float32 NumPy
    arrays: a scalar per leaf, except for the stacked self-attention leaves (`model.blocks`, a leading depth
    axis), which hold one factor per block, shaped `(depth, 1, ..., 1)` to broadcast against the leaf.
    """
    _check_layer_decay(layer_decay)
    if not isinstance(model, CaiT):
        raise TypeError(
            f"Layer-wise learning-rate decay follows the layers of a `CaiT`, got a {type(model).__name__}. "
            f"Pass the model (or `eqx.filter(model, eqx.is_array)`)."
        )
    params = eqx.filter(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    depth, cls_depth = model.config.depth, len(model.blocks_token_only)
    ordinals = [_layer_ordinals(path, leaf, depth, cls_depth) for path, leaf in leaves]
    # Layers are the distinct ordinals in order, numbered from 0, as timm renumbers its groups.
    layer_of = {ordinal: i for i, ordinal in enumerate(sorted({o for row in ordinals for o in row}))}
    top = len(layer_of) - 1
    scales = []
    for (path, leaf), rows in zip(leaves, ordinals, strict=True):
        factors = np.array([float(layer_decay) ** (top - layer_of[o]) for o in rows], dtype=np.float32)
        stacked = path[0].name == "blocks"
        scales.append(
            factors.reshape((len(rows),) + (1,) * (leaf.ndim - 1)) if stacked else factors.reshape(())
        )
    return jax.tree_util.tree_unflatten(treedef, scales)


def scale_by_layer_decay(layer_decay: float) -> optax.GradientTransformation:
    """Multiply each update by its `layer_decay_scales` factor: layer-wise learning-rate decay.

    Put it after the learning rate (and after the weight decay, which the factor then scales too, as timm's
    per-group `lr_scale` does for `torch.optim.AdamW`). The factors are constants of the model's structure,
    computed while tracing: the optimiser state is empty, and a sharded update multiplies each block's rows
    of a split weight by that block's factor.

    **Arguments:**

    - `layer_decay`: the decay per layer, in (0, 1].

    **Returns:** a stateless `optax.GradientTransformation` for updates structured as a `CaiT`'s arrays.
    """
    _check_layer_decay(layer_decay)

    def update_fn(updates, state, params=None):
        del params
        scales = layer_decay_scales(updates, layer_decay)
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, dtype=u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _negative_zeros() -> optax.GradientTransformation:
    """Every update -0.0: adding it leaves every float bitwise as it is (+0.0 would turn -0.0 into +0.0)."""
    return optax.stateless(
        lambda updates, params=None: jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates)
    )


def _freeze_labels(params: PyTree) -> PyTree:
    """`"train"` for the head's leaves and `"frozen"` for every other leaf (`freeze="backbone"`)."""
    if not isinstance(params, CaiT):
        raise TypeError(f"`freeze='backbone'` knows the head of a `CaiT`, got a {type(params).__name__}.")
    if params.head is None:
        raise ValueError(
            "`freeze='backbone'` trains only the classifier head, but this model has none (num_classes=0). "
            "Give it a head first (`cait_eqx.reset_classifier(model, num_classes, key=...)`), or use "
            "`freeze='none'`."
        )
    labels = jax.tree.map(lambda _: "frozen", params)
    return eqx.tree_at(lambda m: m.head, labels, jax.tree.map(lambda _: "train", params.head))


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
    # The average covers what trains (`trainable_params`); frozen parameters are the model's own.
    return merge_trainable(model, found[0].ema)


def make_optimizer(
    learning_rate: float | Callable[[Any], Any],
    *,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    ema_decay: float | None = None,
    layer_decay: float | None = None,
    freeze: str = "none",
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
    - `layer_decay`: layer-wise learning-rate decay in (0, 1] (`scale_by_layer_decay`: every update of a
        layer, weight decay included, times `layer_decay_scales`); `None` for one rate. (Keyword only
        argument.)
    - `freeze`: `"none"`, or `"backbone"` for a linear probe: only the head's parameters change; every other
        update is zero (no Adam moments and no weight decay there; gradient clipping sees the head's gradient
        only, as in PyTorch with the backbone's `requires_grad` off). This masks a step that still computes
        every gradient; `fit` instead freezes in the step (`TrainConfig.freeze`, `trainable_params`), which
        computes no frozen gradient and keeps no state for frozen parameters. (Keyword only argument.)

    **Returns:** an `optax.GradientTransformation`; use it on `eqx.filter(model, eqx.is_array)` of a `CaiT`
    (any model when `layer_decay` and `freeze` are off).
    """
    if freeze not in FREEZE_MODES:
        raise ValueError(
            f"`freeze` must be one of {', '.join(map(repr, FREEZE_MODES))}, got {freeze!r} "
            f"('backbone' trains the head only)."
        )
    if layer_decay is not None:
        _check_layer_decay(layer_decay)
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
    if freeze == "backbone":
        # Frozen leaves get -0.0 after the learning rate (whose sign would flip it), so they stay bitwise.
        parts = [
            optax.multi_transform({"train": optax.chain(*parts), "frozen": _negative_zeros()}, _freeze_labels)
        ]
    if layer_decay is not None:
        parts.append(scale_by_layer_decay(layer_decay))
    if ema_decay is not None:
        parts.append(ema_weights(ema_decay))
    return optax.chain(*parts)


def build_optimizer(
    config: TrainConfig, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser and learning-rate schedule of `config` for `steps_per_epoch` steps per epoch.

    **Arguments:**

    - `config`: the `TrainConfig` (its `epochs`, `lr`, `min_lr`, `warmup_epochs`, `weight_decay`,
        `clip_norm`, `ema_decay` and `layer_decay`).
    - `steps_per_epoch`: optimiser steps per epoch (`len(train_data) // config.batch_size`).

    **Returns:** `(optim, schedule)`: `make_optimizer(schedule, ...)` and the `warmup_cosine_schedule`. The
    optimiser works on `trainable_params(model, config.freeze)`: `config.freeze` is the training step's
    (`make_train_step`), which differentiates the trained parameters only, so the optimiser never sees the
    frozen ones and keeps no state for them.
    """
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    schedule = warmup_cosine_schedule(config.lr, total, warmup, config.min_lr)
    optim = make_optimizer(
        schedule,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
        ema_decay=config.ema_decay,
        layer_decay=config.layer_decay,
    )
    return optim, schedule
