"""What trains: `TrainConfig.freeze` as the part of a model that is differentiated and optimised.

`trainable_params(model, freeze)` is that part: the model's arrays with `None` where they are frozen, and for
`"blocks:N"` the stacked self-attention leaves cut to their last `depth - N` rows. The training step takes
gradients with respect to it alone and the optimiser is initialised on it, so a frozen parameter costs no
backward pass and no optimiser state. `trainable_model(model, params)` is the model the step runs (the
frozen first blocks as a stack of their own, `run_stacked`'s segments, so that the backward pass never
enters them); `merge_trainable(model, params)` puts updated parameters back into the whole model.

A model with LoRA adapters (`cait_eqx.lora`) says what trains by its structure: the adapters and the head
(`cait_eqx.lora_trainable`), by the same mechanism, so its base weights cost no weight gradient and no
optimiser state either; `freeze` must then be `"none"`.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._lora import has_lora, lora_trainable
from .._model import CaiT
from .._primitives import LoRAError
from ._config import FREEZE_MODES, frozen_blocks

__all__ = ["check_freeze", "merge_trainable", "trainable_model", "trainable_params"]

# The stem (timm's layer 0), frozen with the first blocks by `"blocks:N"`.
_STEM_FIELDS = ("patch_embed", "pos_embed", "cls_token")


def check_freeze(model: PyTree, freeze: str) -> None:
    """Raise `ValueError` (or `TypeError`) unless `freeze` can be applied to `model`.

    **Arguments:**

    - `model`: the model to train.
    - `freeze`: `"none"`, `"backbone"` (needs a `CaiT` with a head) or `"blocks:N"` (a `CaiT` with
        `0 < N <= depth`).
    """
    if freeze == "none":
        return
    if has_lora(model):
        raise LoRAError(
            f"`freeze={freeze!r}` and LoRA adapters conflict: a model with adapters already trains only its "
            f"adapters and head, every base weight frozen. Use freeze='none' with the adapters, or freeze "
            f"the plain model (`cait_eqx.merge_lora(model)`) without them."
        )
    count = frozen_blocks(freeze)
    if freeze not in FREEZE_MODES and count is None:
        raise ValueError(
            f"`freeze` must be none, backbone or blocks:N (the stem and the first N self-attention blocks), "
            f"got {freeze!r}."
        )
    if not isinstance(model, CaiT):
        raise TypeError(f"`freeze={freeze!r}` knows the layers of a `CaiT`, got a {type(model).__name__}.")
    if freeze == "backbone" and model.head is None:
        raise ValueError(
            "`freeze='backbone'` trains only the classifier head, but this model has none (num_classes=0). "
            "Give it a head first (`cait_eqx.reset_classifier(model, num_classes, key=...)`), or use "
            "`freeze='none'`."
        )
    depth = model.config.depth
    if count is not None and not 0 < count <= depth:
        raise ValueError(
            f"`freeze={freeze!r}` freezes {count} self-attention blocks, but this model has {depth}: N must "
            f"be in 1..{depth} (blocks:{depth} freezes the whole self-attention stage and trains the "
            f"class-attention blocks and the head). Use a smaller N, or freeze='backbone' for the head alone."
        )


def _spec(model: CaiT, freeze: str) -> PyTree:
    """`True` at every array that trains (whole or in part), `False` elsewhere."""
    spec = jax.tree.map(eqx.is_array, model)
    if freeze == "backbone":
        nothing = jax.tree.map(lambda _: False, model)
        return eqx.tree_at(lambda m: m.head, nothing, jax.tree.map(eqx.is_array, model.head))
    fixed = list(_STEM_FIELDS)
    if frozen_blocks(freeze) == model.config.depth:
        fixed.append("blocks")
    for name in fixed:
        spec = eqx.tree_at(lambda m, name=name: getattr(m, name), spec, jax.tree.map(lambda _: False,
                                                                                   getattr(model, name)))
    return spec


def trainable_params(model: PyTree, freeze: str = "none") -> PyTree:
    """The parameters of `model` that train under `freeze`: what the step differentiates and the optimiser
    holds state for.

    **Arguments:**

    - `model`: the model.
    - `freeze`: `TrainConfig.freeze`: `"none"` (every array), `"backbone"` (the head's), or `"blocks:N"`
        (every array but the patch embedding, `pos_embed`, `cls_token` and the first `N` rows of the stacked
        self-attention leaves).

    A model with LoRA adapters trains its adapters and head (`cait_eqx.lora_trainable`), with
    `freeze="none"` (any other is refused).

    **Returns:** a PyTree shaped as `eqx.filter(model, eqx.is_array)`, `None` at the frozen leaves; with
    `"blocks:N"` (N below the depth) the stacked leaves hold their last `depth - N` rows.
    """
    if freeze == "none":
        return eqx.filter(model, lora_trainable(model) if has_lora(model) else eqx.is_array)
    check_freeze(model, freeze)
    params = eqx.filter(model, _spec(model, freeze))
    count = frozen_blocks(freeze)
    if count is not None and count < model.config.depth:
        params = eqx.tree_at(
            lambda p: p.blocks, params, jax.tree.map(lambda leaf: leaf[count:], params.blocks)
        )
    return params


def _frozen_rows(model: PyTree, params: PyTree) -> int:
    """How many leading rows of `model.blocks` `params` lacks (0 when it has them all, or none)."""
    if not isinstance(model, CaiT) or not isinstance(params, CaiT):
        return 0
    leaves = jax.tree.leaves(params.blocks)
    return 0 if not leaves else model.config.depth - leaves[0].shape[0]


def merge_trainable(model: PyTree, params: PyTree) -> PyTree:
    """`model` with the parameters of `params` (a `trainable_params` PyTree, e.g. updated) in their places.

    A leaf that `params` holds replaces the model's; a stacked leaf that it holds in part replaces the
    model's last rows; a `None` keeps the model's leaf.

    **Returns:** the whole model.
    """

    def merge(new: Any, old: Any) -> Any:
        if new is None:
            return old
        if new.shape == old.shape:
            return new
        return jnp.concatenate([old[: old.shape[0] - new.shape[0]], new.astype(old.dtype)])

    arrays, static = eqx.partition(model, eqx.is_array)
    merged = jax.tree.map(merge, params, arrays, is_leaf=lambda leaf: leaf is None)
    return eqx.combine(merged, static)


def trainable_model(model: PyTree, params: PyTree) -> PyTree:
    """The model a training step runs: `merge_trainable(model, params)`, except that with the first blocks
    frozen (`params.blocks` short of rows) its `blocks` are two stacks, the frozen rows of `model` and the
    rows of `params`, run one after the other (`run_stacked`'s segments). The same function; the backward
    pass never enters the frozen stack, which depends on nothing differentiated.
    """
    rows = _frozen_rows(model, params)
    if rows == 0:
        return merge_trainable(model, params)
    whole = merge_trainable(model, eqx.tree_at(lambda p: p.blocks, params, replace_fn=lambda _: None))
    arrays, static = eqx.partition(model.blocks, eqx.is_array)
    frozen = eqx.combine(jax.tree.map(lambda leaf: leaf[:rows], arrays), static)
    trained = eqx.combine(params.blocks, static)
    return eqx.tree_at(lambda m: m.blocks, whole, (frozen, trained))
