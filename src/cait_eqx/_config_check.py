"""What a CaiT's arrays say about its configuration, and the check that `model.config` still says it.

`CaiT.config` is a static field: `eqx.tree_at` replaces arrays and submodules but never the config, so a
model whose head (or positional embedding, or blocks) was swapped that way keeps describing the old
shapes. Whatever writes the model out (`cait_eqx.save`, `to_timm_state_dict`, `export`) checks first
(`check_config`) and names each stale field; `cait_eqx.with_config_from_arrays` is the fix.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ._primitives import LoRAError, LoRALinear

__all__ = ["StaleConfigError", "arrays_config", "check_config", "check_no_adapters", "stale_fields"]


class StaleConfigError(ValueError):
    """`model.config` no longer describes the model's arrays (a part replaced with `eqx.tree_at`).

    `fields` maps each stale field to `(what the config says, what the arrays say)`.
    """

    def __init__(self, message: str, fields: dict[str, tuple[Any, Any]]):
        super().__init__(message)
        self.fields = fields


def _shape(array: Any) -> tuple[int, ...]:
    return tuple(np.shape(array))


def arrays_config(model: Any) -> dict[str, tuple[Any, str]]:
    """The hyper-parameters the arrays of a `CaiT` fix, each with the array it was read from.

    **Returns:** `{field: (value, evidence)}` for `dim`, `channels`, `patch_size`, `num_patches` (the
    positional embedding's rows; the config's image size must give that many patches), `depth`,
    `cls_depth`, `heads` and `dim_head` (read from the talking-heads mix, when there is one), `talking_heads`,
    `qkv_bias`, `mlp_dim`, `cls_mlp_dim` and `num_classes`.
    """
    weight = _shape(model.patch_embed.proj.weight)
    found: dict[str, tuple[Any, str]] = {
        "dim": (weight[0], f"patch_embed.proj.weight is {weight}"),
        "channels": (weight[1], f"patch_embed.proj.weight is {weight}"),
        "patch_size": (weight[2], f"patch_embed.proj.weight is {weight}"),
    }
    pos = _shape(model.pos_embed)
    found["num_patches"] = (pos[0], f"pos_embed is {pos}")
    attn = model.blocks.attn
    qkv = _shape(attn.qkv.weight)  # (depth, 3 * inner, dim): stacked over the SA blocks
    found["depth"] = (qkv[0], f"blocks.attn.qkv.weight is {qkv} (stacked over the blocks)")
    found["talking_heads"] = (attn.proj_l is not None, "blocks.attn.proj_l is " + (
        "absent" if attn.proj_l is None else "present"))
    if attn.proj_l is not None:
        mix = _shape(attn.proj_l.weight)
        found["heads"] = (mix[-1], f"blocks.attn.proj_l.weight is {mix}")
        found["dim_head"] = (qkv[1] // 3 // mix[-1], f"blocks.attn.qkv.weight is {qkv}, over {mix[-1]} heads")
    found["qkv_bias"] = (attn.qkv.bias is not None, "blocks.attn.qkv.bias is " + (
        "absent" if attn.qkv.bias is None else "present"))
    fc1 = _shape(model.blocks.mlp.fc1.weight)
    found["mlp_dim"] = (fc1[1], f"blocks.mlp.fc1.weight is {fc1}")
    cls_depth = len(model.blocks_token_only)
    found["cls_depth"] = (cls_depth, f"blocks_token_only holds {cls_depth} blocks")
    if model.blocks_token_only:
        cls_fc1 = _shape(model.blocks_token_only[0].mlp.fc1.weight)
        found["cls_mlp_dim"] = (cls_fc1[0], f"blocks_token_only.0.mlp.fc1.weight is {cls_fc1}")
    if model.head is None:
        found["num_classes"] = (0, "there is no head")
    else:
        head = _shape(model.head.weight)
        found["num_classes"] = (head[0], f"head.weight is {head}")
    return found


def stale_fields(model: Any) -> dict[str, tuple[Any, Any, str]]:
    """The fields where `model.config` and the arrays disagree: `{field: (config's, arrays', evidence)}`.

    For the image size, the config's is `image_size` and the arrays' the image size their patch count gives
    (`None` when the count is not a square grid: the arrays do not tell the height and width).
    """
    cfg = model.config
    out: dict[str, tuple[Any, Any, str]] = {}
    for field, (value, evidence) in arrays_config(model).items():
        if field == "num_patches":
            if value != cfg.num_patches:
                side = math.isqrt(value)
                size = (side * cfg.patch_size,) * 2 if side * side == value else None
                why = f"{evidence}: {value} patches, not {cfg.num_patches}"
                out["image_size"] = (cfg.image_size, size, why)
            continue
        if getattr(cfg, field) != value:
            out[field] = (getattr(cfg, field), value, evidence)
    return out


def check_config(model: Any, action: str) -> None:
    """Raise `StaleConfigError` if `model.config` does not describe `model`'s arrays.

    **Arguments:**

    - `model`: a `CaiT`.
    - `action`: what was about to happen, for the message (e.g. "save it").
    """
    stale = stale_fields(model)
    if not stale:
        return
    listed = "; ".join(f"{field}: the config says {said!r}, the arrays say {got!r} ({evidence})"
                       for field, (said, got, evidence) in stale.items())
    fixes = []
    if "num_classes" in stale:
        fixes.append("replace a head with `cait_eqx.reset_classifier(model, num_classes, key=...)`, which "
                     "keeps the config right")
    if "image_size" in stale:
        fixes.append("change the resolution with `cait_eqx.set_input_size(model, image_size)`")
    fixes.append("or bring the config up to date from the arrays: "
                 "`model = cait_eqx.with_config_from_arrays(model)`")
    raise StaleConfigError(
        f"Cannot {action}: `model.config` no longer describes the model's arrays ({listed}). `config` is a "
        f"static field, which `eqx.tree_at` leaves as it was. To fix: " + "; ".join(fixes) + ".",
        {field: (said, got) for field, (said, got, _) in stale.items()},
    )


def check_no_adapters(model: Any, action: str) -> None:
    """Raise `LoRAError` if `model` carries LoRA adapters, which timm's layout has no place for."""
    if any(isinstance(node, LoRALinear) for node in jax.tree.leaves(
            model, is_leaf=lambda node: isinstance(node, LoRALinear))):
        raise LoRAError(
            f"Cannot {action}: the model carries LoRA adapters, which timm's `Cait` has no place for. Fold "
            f"them in first (`model = cait_eqx.merge_lora(model)`: the same function), or save the adapters "
            f"alone (`cait_eqx.save_lora(path, model)`)."
        )
