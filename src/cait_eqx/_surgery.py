"""Model surgery: copies of a model for new inputs, new tasks and other run-time choices.

- `set_input_size`: a model for another resolution (its positional grid resampled by `resample_pos_embed`),
    every other weight kept; `with_dynamic_img_size`: a model that takes any size at call time.
- `adapt_input_channels`: the patch embedding for another number of input channels (timm's rule).
- `reset_classifier`: a fresh head for another number of classes (or none).
- `with_dropout`: other dropout and stochastic-depth rates (e.g. for fine-tuning loaded weights).
- `with_compute_dtype`, `with_remat`: the same weights, computing in another dtype or keeping other
    intermediates for the backward pass.
- `with_config_from_arrays`: the config brought up to date after a part was replaced with `eqx.tree_at`.
"""

from __future__ import annotations

import copy
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray

from ._config import check_compute_dtype, check_remat
from ._config_check import stale_fields
from ._inputs import adapt_input_conv, resample_pos_embed
from ._layers import DropPath, Linear
from ._model import CaiT

__all__ = [
    "adapt_input_channels",
    "reset_classifier",
    "resample_pos_embed",
    "set_input_size",
    "with_compute_dtype",
    "with_config_from_arrays",
    "with_dropout",
    "with_dynamic_img_size",
    "with_remat",
]

# The configuration fields that change no weight, only how a training call draws random numbers.
DROPOUT_FIELDS = ("dropout", "emb_dropout", "attn_dropout", "layer_dropout")


def _skeleton(model: CaiT, new_cfg: Any) -> CaiT:
    """The structure (shapes only) of a model of configuration `new_cfg` with `model`'s run-time options."""
    return eqx.filter_eval_shape(
        CaiT,
        **new_cfg.kwargs(),
        compute_dtype=model.compute_dtype,
        remat=model.remat,
        dynamic_img_size=model.dynamic_img_size,
        key=jr.key(0),
    )


def _rebuilt(model: CaiT, new_cfg: Any, replace: Any, value: Any) -> CaiT:
    """`model`'s leaves (one of them replaced) in the structure of a model of configuration `new_cfg`:
    static fields (e.g. the patch embedding's image size or channels) come from the new structure."""
    skeleton = _skeleton(model, new_cfg)
    changed = eqx.tree_at(replace, model, value, is_leaf=lambda x: x is None)
    leaves = jax.tree_util.tree_leaves(changed, is_leaf=lambda x: x is None)
    treedef = jax.tree_util.tree_structure(skeleton, is_leaf=lambda x: x is None)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def set_input_size(model: CaiT, image_size: int | tuple[int, int]) -> CaiT:
    """A copy of `model` for another image size, its positional embedding resampled bicubically.

    Use it to fine-tune or evaluate at a new resolution (e.g. a 224 checkpoint at 384). Every other weight
    is carried over unchanged; the patch size, each dropout's mode and the run-time choices
    (`compute_dtype`, `remat`, `dynamic_img_size`) stay.

    **Arguments:**

    - `model`: a `CaiT`.
    - `image_size`: the new input size, an int or a `(height, width)` pair, a multiple of the patch size.

    **Returns:** a `CaiT` whose `config.image_size` is the new size.
    """
    cfg = model.config
    new_cfg = cfg.replace(image_size=image_size)  # validates the size against the patch size
    pos_embed = resample_pos_embed(model.pos_embed, cfg.grid_size, new_cfg.grid_size)
    return _rebuilt(model, new_cfg, lambda m: m.pos_embed, pos_embed)


def adapt_input_channels(model: CaiT, channels: int) -> CaiT:
    """A copy of `model` for images with `channels` channels, its RGB patch kernels adapted (timm's rule).

    One channel: the three kernels summed (a grey image gives the embedding its RGB copy gave). More
    channels: the kernels repeated cyclically (R, G, B, R, ...) and scaled by `3 / channels`, which keeps
    the embedding's scale (for a multiple of 3 channels, an image whose channels are all equal keeps its
    embedding). The same numbers as timm's `adapt_input_conv`, which `timm.create_model(...,
    in_chans=channels)` applies to pretrained weights. Every other weight is kept.

    **Arguments:**

    - `model`: a `CaiT` (with 3 input channels, unless `channels` is already its own).
    - `channels`: the new number of input channels.

    **Returns:** a `CaiT` whose `config.channels` is `channels` (the model itself when unchanged).

    **Raises:** `ValueError` for a model without 3 input channels (only RGB kernels adapt).
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`adapt_input_channels` takes a `CaiT`, got {type(model).__name__}.")
    cfg = model.config
    weight = model.patch_embed.proj.weight
    adapted = adapt_input_conv(np.asarray(weight), channels)  # checks `channels`
    if channels == cfg.channels:
        return model
    return _rebuilt(
        model, cfg.replace(channels=channels), lambda m: m.patch_embed.proj.weight, jnp.asarray(adapted)
    )


def with_dropout(model: CaiT, **rates: Any) -> CaiT:
    """A copy of `model` with other dropout or stochastic-depth rates; every weight is kept.

    For fine-tuning loaded weights with the paper's regularisation (e.g. `layer_dropout=0.1`); each
    dropout's mode (training or inference) is kept.

    **Arguments:**

    - `model`: a `CaiT`.
    - `**rates`: any of `dropout`, `emb_dropout`, `attn_dropout`, `layer_dropout` (see `CaiTConfig`).

    **Returns:** a `CaiT` whose `config` has the new rates.
    """
    unknown = sorted(set(rates) - set(DROPOUT_FIELDS))
    if unknown:
        raise TypeError(
            f"`with_dropout` changes only the rates {', '.join(DROPOUT_FIELDS)}; got {', '.join(unknown)}."
        )
    if not rates:
        return model
    new_cfg = model.config.replace(**rates)  # checks each rate
    # The rates are leaves of the dropout modules (not static fields): take every non-array leaf from a model
    # built with the new rates, every array from `model`, then each dropout's mode from `model`.
    skeleton = _skeleton(model, new_cfg)
    old_leaves = jax.tree_util.tree_leaves(model, is_leaf=lambda x: x is None)
    new_leaves, treedef = jax.tree_util.tree_flatten(skeleton, is_leaf=lambda x: x is None)
    leaves = [a if eqx.is_array(a) else b for a, b in zip(old_leaves, new_leaves, strict=True)]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    modes = [m.inference for m in jax.tree_util.tree_leaves(model, is_leaf=_is_dropout) if _is_dropout(m)]
    dropouts = [m for m in jax.tree_util.tree_leaves(rebuilt, is_leaf=_is_dropout) if _is_dropout(m)]
    return eqx.tree_at(
        lambda m: [d for d in jax.tree_util.tree_leaves(m, is_leaf=_is_dropout) if _is_dropout(d)],
        rebuilt,
        [eqx.tree_at(lambda d: d.inference, d, mode) for d, mode in zip(dropouts, modes, strict=True)],
    )


def _is_dropout(node: Any) -> bool:
    return isinstance(node, (eqx.nn.Dropout, DropPath))


def reset_classifier(model: CaiT, num_classes: int, *, key: PRNGKeyArray | None = None) -> CaiT:
    """A copy of `model` with a freshly initialised classifier of `num_classes` outputs.

    The head is initialised as at construction (truncated normal, std 0.02; zero bias); every other weight,
    and each dropout's mode, is kept. `num_classes=0` removes the head (the model then returns features).

    **Arguments:**

    - `model`: a `CaiT`.
    - `num_classes`: the new number of classes, or `0` for no head.
    - `key`: a `jax.random.key` for the new head; needed unless `num_classes == 0`. (Keyword only argument.)

    **Returns:** a `CaiT` whose `config.num_classes` is `num_classes`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"`num_classes` must be an int >= 0 (0 removes the head), got {num_classes!r}.")
    cfg = model.config
    if num_classes == 0:
        head = None
    else:
        if key is None:
            raise ValueError(
                "`reset_classifier` needs a key to initialise the new head: "
                "`reset_classifier(model, num_classes, key=jax.random.key(...))`."
            )
        head = Linear(cfg.dim, num_classes, dtype=jnp.dtype(cfg.dtype), key=key)
    # `head` may be None on either side, and `config` is static: set both on a shallow copy.
    new = copy.copy(model)
    object.__setattr__(new, "head", head)
    object.__setattr__(new, "config", cfg.replace(num_classes=num_classes))
    return new


def with_compute_dtype(model: CaiT, dtype: Any) -> CaiT:
    """A copy of `model` that computes in `dtype`, e.g. bfloat16 with its float32 weights (mixed precision).

    The self-attention blocks, about 98 % of the work, then compute in `dtype`. The weights are shared, not
    cast: they keep their dtype in the PyTree (so a trained or loaded float32 model trains on with float32
    gradients and optimiser state) and are cast where they are used. LayerNorm statistics and softmaxes stay
    float32; the patch embedding, the class-attention blocks and the head run in the parameter dtype, and
    the outputs come back in it. On accelerators bfloat16 is faster and lighter; on CPUs it is usually
    slower. bfloat16 logits agree with float32 ones to within 1e-2 of the largest logit.

    **Arguments:**

    - `model`: a `CaiT`.
    - `dtype`: `jnp.bfloat16`, `jnp.float16` or `jnp.float32` (or their names), or `None` for the parameter
        dtype.

    **Returns:** the `CaiT`, with `compute_dtype` set.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_compute_dtype` takes a `CaiT`, got {type(model).__name__}.")
    return _with_static(model, "compute_dtype", check_compute_dtype(dtype, model.config.dtype))


def _with_static(model: CaiT, field: str, value: Any) -> CaiT:
    # Static fields cannot be replaced by `eqx.tree_at`: set it on a shallow copy (the arrays are shared).
    new = copy.copy(model)
    object.__setattr__(new, field, value)
    return new


def with_remat(model: CaiT, policy: str) -> CaiT:
    """A copy of `model` whose self-attention stage keeps `policy`'s intermediates for the backward pass.

    **Arguments:**

    - `model`: a `CaiT`.
    - `policy`: one of `cait_eqx.REMAT_POLICIES` (see `CaiT`'s `remat`): `"none"`, `"weight_products"`,
        `"dots"` or `"full"`.

    **Returns:** the `CaiT`, sharing the weights, with `remat` set. Outputs and gradients are unchanged.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_remat` takes a `CaiT`, got {type(model).__name__}.")
    return _with_static(model, "remat", check_remat(policy))


def with_dynamic_img_size(model: CaiT, dynamic: bool = True) -> CaiT:
    """A copy of `model` whose call takes any image size the patch size divides (or only `image_size`).

    With `dynamic=True` the positional grid is resampled bicubically to each input's patch grid inside the
    forward pass (the same numbers as `set_input_size` to that size); each new shape compiles once. The
    weights are shared and unchanged; `config.image_size` stays the size they were trained at.

    **Arguments:**

    - `model`: a `CaiT`.
    - `dynamic`: `True` for any size, `False` for `image_size` only.

    **Returns:** the `CaiT`, with `dynamic_img_size` set.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_dynamic_img_size` takes a `CaiT`, got {type(model).__name__}.")
    if not isinstance(dynamic, bool):
        raise TypeError(f"`dynamic` must be True or False, got {dynamic!r}.")
    return _with_static(model, "dynamic_img_size", dynamic)


def with_config_from_arrays(model: CaiT) -> CaiT:
    """A copy of `model` whose `config` says what its arrays are, after a part was swapped by `eqx.tree_at`.

    `config` is a static field, which `eqx.tree_at` never changes: after
    `eqx.tree_at(lambda m: m.head, model, new_head)` the config still has the old `num_classes`, and
    `cait_eqx.save` refuses the model (`StaleConfigError`). This reads every field the arrays fix (classes,
    width, depths, heads, MLP widths, patch size, channels, the image size from the positional embedding's
    square grid) and rebuilds the static fields from them; the arrays are shared, unchanged.
    (`cait_eqx.reset_classifier` replaces a head and keeps the config right in one step.)

    **Arguments:**

    - `model`: a `CaiT`.

    **Returns:** the `CaiT` with an up-to-date `config` (the model itself when nothing was stale).

    **Raises:** `ValueError` when the arrays do not fix a field (a positional embedding whose patch count is
    not a square grid: use `cait_eqx.set_input_size`), or fit no CaiT configuration.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_config_from_arrays` takes a `CaiT`, got {type(model).__name__}.")
    stale = stale_fields(model)
    if not stale:
        return model
    if "image_size" in stale and stale["image_size"][1] is None:
        raise ValueError(
            f"Cannot tell the image size from the arrays: {stale['image_size'][2]}, not a square grid. Set "
            f"the resolution with `cait_eqx.set_input_size(model, (height, width))` on the original model."
        )
    new_cfg = model.config.replace(**{field: got for field, (_, got, _) in stale.items()})
    return _rebuilt(model, new_cfg, lambda m: m.pos_embed, model.pos_embed)
