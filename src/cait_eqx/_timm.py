"""Conversion between timm / deit CaiT state dicts and `cait_eqx.CaiT`, strictly by name.

Every timm key is matched to one of our leaves by its name; shapes must match exactly after the few
explicit reshapes in `_slots` (timm keeps leading singleton axes we do not). The self-attention blocks are
stacked on a leading depth axis here, so `blocks.{i}.X` in timm is row `i` of our `blocks.X`.

A checkpoint loaded at another image size has its positional embedding resampled (`_surgery`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._config import CaiTConfig
from ._config_check import check_config, check_no_adapters
from ._inputs import adapt_input_conv, resample_pos_embed
from ._model import CaiT
from ._variants import variant_config

__all__ = [
    "WeightsError", "from_timm_state_dict", "to_timm_state_dict", "infer_config", "timm_keys",
    "build_from_state_dict", "patch_grid", "resample_state_dict",
]

logger = logging.getLogger("cait_eqx")


class WeightsError(ValueError):
    """A state dict does not fit the model: lists the missing, unexpected and mis-shaped keys."""


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One leaf of our model and the timm key(s) it holds (one per SA block for stacked leaves)."""

    path: str  # attribute path in our model, e.g. "blocks.attn.qkv.weight"
    keys: tuple[str, ...]  # timm keys; several when the leaf is stacked over SA blocks
    timm_shape: tuple[int, ...]  # the shape of each timm tensor
    our_shape: tuple[int, ...]  # the shape of each (unstacked) slice of our leaf
    stacked: bool


def _linear(prefix: str, ours: str, n_in: int, n_out: int, bias: bool = True) -> list[tuple[str, str, tuple]]:
    out = [(f"{prefix}.weight", f"{ours}.weight", (n_out, n_in))]
    if bias:
        out.append((f"{prefix}.bias", f"{ours}.bias", (n_out,)))
    return out


def _norm(prefix: str, dim: int) -> list[tuple[str, str, tuple]]:
    return [(f"{prefix}.weight", f"{prefix}.weight", (dim,)), (f"{prefix}.bias", f"{prefix}.bias", (dim,))]


def _block_entries(cfg: CaiTConfig, class_attention: bool) -> list[tuple[str, str, tuple]]:
    """(timm suffix, our suffix, shape) for every parameter of one block."""
    d, h, inner = cfg.dim, cfg.heads, cfg.heads * cfg.dim_head
    entries = _norm("norm1", d)
    if class_attention:
        for name in ("q", "k", "v"):
            entries += _linear(f"attn.{name}", f"attn.{name}", d, inner, cfg.qkv_bias)
        hidden = cfg.cls_mlp_dim
    else:
        entries += _linear("attn.qkv", "attn.qkv", d, 3 * inner, cfg.qkv_bias)
        if cfg.talking_heads:
            entries += _linear("attn.proj_l", "attn.proj_l", h, h)
            entries += _linear("attn.proj_w", "attn.proj_w", h, h)
        hidden = cfg.mlp_dim
    entries += _linear("attn.proj", "attn.proj", inner, d)
    entries += [("gamma_1", "gamma_1.gamma", (d,)), ("gamma_2", "gamma_2.gamma", (d,))]
    entries += _norm("norm2", d)
    entries += _linear("mlp.fc1", "mlp.fc1", d, hidden)
    entries += _linear("mlp.fc2", "mlp.fc2", hidden, d)
    return entries


def _slots(cfg: CaiTConfig) -> list[_Slot]:
    d, p, n = cfg.dim, cfg.patch_size, cfg.num_patches
    slots = [
        _Slot("cls_token", ("cls_token",), (1, 1, d), (d,), False),
        _Slot("pos_embed", ("pos_embed",), (1, n, d), (n, d), False),
        _Slot("patch_embed.proj.weight", ("patch_embed.proj.weight",), (d, cfg.channels, p, p),
              (d, cfg.channels, p, p), False),
        _Slot("patch_embed.proj.bias", ("patch_embed.proj.bias",), (d,), (d,), False),
    ]
    for timm_suffix, our_suffix, shape in _block_entries(cfg, class_attention=False):
        keys = tuple(f"blocks.{i}.{timm_suffix}" for i in range(cfg.depth))
        slots.append(_Slot(f"blocks.{our_suffix}", keys, shape, shape, True))
    for j in range(cfg.cls_depth):
        for timm_suffix, our_suffix, shape in _block_entries(cfg, class_attention=True):
            slots.append(
                _Slot(f"blocks_token_only.{j}.{our_suffix}", (f"blocks_token_only.{j}.{timm_suffix}",), shape,
                      shape, False)
            )
    slots += [_Slot(f"norm.{s}", (f"norm.{s}",), (d,), (d,), False) for s in ("weight", "bias")]
    if cfg.num_classes > 0:
        head_shape = (cfg.num_classes, d)
        slots.append(_Slot("head.weight", ("head.weight",), head_shape, head_shape, False))
        slots.append(_Slot("head.bias", ("head.bias",), (cfg.num_classes,), (cfg.num_classes,), False))
    return slots


def timm_keys(config: CaiTConfig) -> list[str]:
    """Every key (in timm's order) of the state dict of a timm `Cait` with this configuration."""
    return [key for slot in _slots(config) for key in slot.keys]


def _get_item(slot_path: str) -> Callable[[Any], Any]:
    def where(model):
        node = model
        for part in slot_path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    return where


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """A tensor-like (torch, NumPy, JAX) as a NumPy array of its own, without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    try:
        # A copy: the model must not share memory with the caller's tensors (an in-place torch update, e.g.
        # an optimiser step on the source model, would otherwise change the JAX weights behind their back).
        array = np.array(value, copy=True)
    except Exception as error:  # noqa: BLE001 - we re-raise with the key named
        raise WeightsError(f"State-dict entry {key!r} is not an array: {type(value).__name__}.") from error
    if not jnp.issubdtype(array.dtype, jnp.floating):  # jnp: knows bfloat16 too
        raise WeightsError(f"State-dict entry {key!r} has dtype {array.dtype}; CaiT weights are floats.")
    return array


_BLOCK_RE = re.compile(r"^(blocks|blocks_token_only)\.(\d+)\.")


def infer_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Read a CaiT's hyper-parameters off a timm state dict's tensor shapes.

    `heads` is read from the talking-heads mix `proj_l`; a model without talking heads needs `heads` given.
    A non-square positional embedding needs `image_size` given. Keys missing from the result must be passed
    by the caller.
    """
    shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(np.shape(v)) for k, v in state_dict.items()}
    # `gamma_1` (LayerScale) is CaiT's own name: a ViT/DeiT state dict has the others too.
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
                "blocks.0.attn.qkv.weight", "blocks.0.gamma_1")
    absent = [k for k in required if k not in shape]
    if absent:
        raise WeightsError(
            "This does not look like a CaiT state dict (timm/deit key names): missing "
            + ", ".join(absent)
            + ". Keys found start with: "
            + ", ".join(sorted(shape)[:8])
        )
    out: dict[str, Any] = {}
    dim, channels, p, _ = shape["patch_embed.proj.weight"]
    out.update(dim=dim, channels=channels, patch_size=p)
    n = shape["pos_embed"][-2]
    side = math.isqrt(n)
    if side * side == n:
        out["image_size"] = side * p
    depths = {"blocks": set(), "blocks_token_only": set()}
    for key in shape:
        match = _BLOCK_RE.match(key)
        if match:
            depths[match.group(1)].add(int(match.group(2)))
    out["depth"] = len(depths["blocks"])
    out["cls_depth"] = len(depths["blocks_token_only"])
    out["talking_heads"] = "blocks.0.attn.proj_l.weight" in shape
    if out["talking_heads"]:
        out["heads"] = shape["blocks.0.attn.proj_l.weight"][0]
        out["dim_head"] = shape["blocks.0.attn.qkv.weight"][0] // 3 // out["heads"]
    out["qkv_bias"] = "blocks.0.attn.qkv.bias" in shape
    out["mlp_dim"] = shape["blocks.0.mlp.fc1.weight"][0]
    if "blocks_token_only.0.mlp.fc1.weight" in shape:
        out["cls_mlp_dim"] = shape["blocks_token_only.0.mlp.fc1.weight"][0]
    out["num_classes"] = shape["head.weight"][0] if "head.weight" in shape else 0
    return out


def _resolve(state_dict: Mapping[str, Any], name: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    if name is not None:
        config = variant_config(name)
    else:
        config = infer_config(state_dict)
        # A state dict carries no LayerScale init rule; the paper's rule is recorded for re-initialisation.
        config.setdefault("init_values", None)
    config.update(overrides)
    missing = [k for k in ("image_size", "heads") if k not in config]
    if missing:
        why = {
            "image_size": "the positional embedding is not a square grid",
            "heads": "the model has no talking-heads mix to read the head count from",
        }
        raise WeightsError(
            "Cannot infer " + " and ".join(f"`{k}` ({why[k]})" for k in missing)
            + " from the state dict; pass " + ", ".join(f"{k}=..." for k in missing) + " or a variant `name`."
        )
    return config


def patch_grid(image_size: Any, patch_size: int) -> tuple[int, int]:
    """The `(rows, columns)` patch grid of an image size (an int or a pair)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return size[0] // patch_size, size[1] // patch_size


def _checkpoint_grid(
    num_patches: int, name: str | None, target_grid: tuple[int, int], patch_size: int
) -> tuple[int, int] | None:
    """The patch grid a checkpoint's `pos_embed` was trained on, or None where it does not fit `name`."""
    if name is not None:
        grid = patch_grid(variant_config(name)["image_size"], patch_size)
        return grid if grid[0] * grid[1] == num_patches else None  # another variant: the mapping reports it
    if target_grid[0] * target_grid[1] == num_patches:
        return target_grid  # same number of patches: the caller's grid is taken as the checkpoint's
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise WeightsError(
        f"The checkpoint's positional embedding has {num_patches} patches, which is not a square grid, so "
        f"its shape cannot be told to resample it to the requested {target_grid} grid. Load it at its size "
        f"first (`image_size=(h, w)` with (h/p)·(w/p) = {num_patches}), then call "
        f"`cait_eqx.set_input_size(model, image_size)`."
    )


def from_timm_state_dict(state_dict: Mapping[str, Any], *, name: str | None = None, **config: Any) -> CaiT:
    """Build a `CaiT` from a timm (or deit) CaiT state dict held in memory, strictly by name.

    **Arguments:**

    - `state_dict`: a mapping from timm's parameter names (`"blocks.0.attn.qkv.weight"`, ...) to tensors
        (PyTorch, NumPy or JAX).
    - `name`: the variant the weights belong to (see `list_models()`); when omitted the architecture is
        read from the tensor shapes (`infer_config`). (Keyword only argument.)
    - `**config`: `CaiT` keywords that override the variant's or the inferred values (e.g. `dtype`).
        An `image_size` whose patch grid differs from the checkpoint's resamples the positional embedding
        bicubically (`resample_pos_embed`); the checkpoint's grid is the variant's when `name` is given,
        else the given grid when the patch counts agree, else the square grid of its patch count. A
        `channels` other than the checkpoint's adapts RGB patch kernels (`adapt_input_conv`, timm's rule).

    **Returns:** a `CaiT` in inference mode holding exactly these weights.

    **Raises:** `WeightsError` (a `ValueError`) listing every missing, unexpected and mis-shaped key; nothing
    is skipped, truncated or matched by position.
    """
    if not isinstance(state_dict, Mapping):
        raise WeightsError(
            f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}."
        )
    kwargs = _resolve(state_dict, name, config)
    if "image_size" in config and "pos_embed" in state_dict:
        pos_shape = tuple(np.shape(state_dict["pos_embed"]))
        patch_size = kwargs["patch_size"]
        target = patch_grid(kwargs["image_size"], patch_size)
        if len(pos_shape) >= 2:
            source = _checkpoint_grid(pos_shape[-2], name, target, patch_size)
            if source is not None and source != target:
                state_dict = resample_state_dict(state_dict, source, target)
    if "channels" in config:
        state_dict = adapt_state_dict_channels(state_dict, kwargs["channels"])
    return build_from_state_dict(state_dict, kwargs)


def resample_state_dict(state_dict: Mapping[str, Any], source: tuple[int, int], target: tuple[int, int]):
    """`state_dict` with its `pos_embed` resampled from the `source` to the `target` patch grid (logged)."""
    pos = _to_numpy(state_dict["pos_embed"], "pos_embed")
    resampled = np.asarray(resample_pos_embed(jnp.asarray(pos.reshape(pos.shape[-2:])), source, target))
    logger.info("cait_eqx: resampled the positional embedding from a %s to a %s patch grid (bicubic).",
                source, target)
    return {**state_dict, "pos_embed": resampled.reshape(*pos.shape[:-2], -1, pos.shape[-1])}


def adapt_state_dict_channels(state_dict: Mapping[str, Any], channels: int):
    """`state_dict` with its patch-embedding kernels adapted to `channels` inputs (logged if they change)."""
    key = "patch_embed.proj.weight"
    shape = np.shape(state_dict[key]) if key in state_dict else ()
    if len(shape) != 4 or shape[1] == channels:
        return state_dict  # nothing to adapt (a missing or mis-shaped kernel is reported by the mapping)
    weight = _to_numpy(state_dict[key], key)
    try:
        adapted = adapt_input_conv(weight, channels)
    except ValueError as error:
        raise WeightsError(f"The checkpoint's patch embedding {error}") from None
    rule = "summed the RGB kernels" if channels == 1 else f"repeated the RGB kernels, scaled by 3/{channels}"
    logger.info("cait_eqx: adapted the input channels from %d to %d (%s, timm's rule).", weight.shape[1],
                channels, rule)
    return {**state_dict, key: adapted}


def build_from_state_dict(state_dict: Mapping[str, Any], kwargs: dict[str, Any]) -> CaiT:
    """Fill a model of configuration `kwargs` from `state_dict`, strictly by name (inference mode)."""
    skeleton = eqx.filter_eval_shape(CaiT, **kwargs, key=jr.key(0))
    cfg: CaiTConfig = skeleton.config
    dtype = jnp.dtype(cfg.dtype)

    missing: list[str] = []
    misshaped: list[str] = []
    used: set[str] = set()
    values: list[np.ndarray] = []
    wheres: list[Callable] = []
    for slot in _slots(cfg):
        parts = []
        for key in slot.keys:
            if key not in state_dict:
                missing.append(key)
                continue
            used.add(key)
            array = _to_numpy(state_dict[key], key)
            if tuple(array.shape) != slot.timm_shape:
                misshaped.append(f"{key}: expected {slot.timm_shape}, got {tuple(array.shape)}")
                continue
            parts.append(array.reshape(slot.our_shape))
        if len(parts) == len(slot.keys):
            values.append(np.stack(parts) if slot.stacked else parts[0])
            wheres.append(_get_item(slot.path))
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or misshaped:
        lines = [f"The state dict does not match a CaiT with {_describe(cfg)}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items if len(items) <= 12 else items[:12] + [f"... and {len(items) - 12} more"]
                lines.append(f"  {len(items)} {title} key(s): " + "; ".join(shown))
        lines.append(
            "Check that the weights belong to this variant (pass the right `name`, or omit it to infer the "
            "architecture), and that the keys are timm's (`load_timm` removes deit's `module.` prefixes)."
        )
        if any(item.startswith("head.") for item in misshaped + missing + unexpected):
            lines.append(
                "For another number of classes, load the checkpoint with its own head, then call "
                "`cait_eqx.reset_classifier(model, num_classes, key=...)`."
            )
        raise WeightsError("\n".join(lines))

    model = eqx.tree_at(
        lambda m: [where(m) for where in wheres],
        skeleton,
        [jnp.asarray(v, dtype=dtype) for v in values],
    )
    leftover = [leaf for leaf in jax.tree_util.tree_leaves(model) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if leftover:  # a bug in the mapping, never the user's fault
        raise RuntimeError(f"cait_eqx internal error: the mapping left {len(leftover)} parameters unfilled.")
    return eqx.nn.inference_mode(model)


def to_timm_state_dict(model: CaiT, *, dtype: str | None = "float32") -> dict[str, np.ndarray]:
    """The model's weights under timm's names and shapes, as NumPy arrays.

    `timm.create_model(name)` (or `timm.models.cait.Cait(**same_config)`) loads it with `strict=True`
    after `{k: torch.from_numpy(v) for k, v in ...}`.

    **Arguments:**

    - `model`: a `CaiT`.
    - `dtype`: the dtype of every array, float32 by default (what `torch.from_numpy` takes); `None` keeps
        the model's own dtype (bfloat16 arrays are `ml_dtypes.bfloat16`). (Keyword only argument.)

    **Returns:** a dict from timm's key names to arrays of timm's shapes. **Raises:** `StaleConfigError` when
    `model.config` no longer describes the arrays (a part replaced with `eqx.tree_at`), naming the fix.
    """
    check_no_adapters(model, "write the model out under timm's names")
    check_config(model, "write the model out")
    out: dict[str, np.ndarray] = {}
    for slot in _slots(model.config):
        leaf = np.asarray(jax.device_get(_get_item(slot.path)(model)))
        if dtype is not None:
            leaf = leaf.astype(dtype)
        if slot.stacked:
            for i, key in enumerate(slot.keys):
                out[key] = leaf[i].reshape(slot.timm_shape)
        else:
            out[slot.keys[0]] = leaf.reshape(slot.timm_shape)
    return out


# ------------------------------------------------------------------------------ new resolutions, new heads


def _describe(cfg: CaiTConfig) -> str:
    return (
        f"image_size={cfg.image_size}, patch_size={cfg.patch_size}, dim={cfg.dim}, depth={cfg.depth}, "
        f"cls_depth={cfg.cls_depth}, heads={cfg.heads}, mlp_dim={cfg.mlp_dim}, num_classes={cfg.num_classes}"
    )

