"""The paper's named CaiT models, with timm's names and hyper-parameters: data only.

Building a model from a name (with fresh or pretrained weights) is `cait_eqx.create_model`, in the weights
layer (`_pretrained.py`), which can load checkpoints.
"""

from __future__ import annotations

import difflib
from typing import Any

__all__ = ["EVAL_CROP_PCT", "EVAL_INTERPOLATION", "VARIANTS", "list_models", "variant_config"]

# How timm evaluates every CaiT variant (its pretrained configs, `cait.py`'s `_cfg`): resize the shorter side
# to the input size / crop_pct with this filter, then centre-crop the input size.
EVAL_CROP_PCT = 1.0
EVAL_INTERPOLATION = "bicubic"


def _variant(image_size: int, dim: int, depth: int, heads: int, init_values: float) -> dict[str, Any]:
    # Every paper model: 16×16 patches, MLP ratio 4, two class-attention blocks, talking heads, qkv bias.
    return dict(
        image_size=image_size,
        patch_size=16,
        num_classes=1000,
        dim=dim,
        depth=depth,
        cls_depth=2,
        heads=heads,
        mlp_dim=4 * dim,
        init_values=init_values,
    )


# name: (image size, dim, SA depth, heads, LayerScale init) — the values of timm's `cait.py` factories.
VARIANTS: dict[str, dict[str, Any]] = {
    "cait_xxs24_224": _variant(224, 192, 24, 4, 1e-5),
    "cait_xxs24_384": _variant(384, 192, 24, 4, 1e-5),
    "cait_xxs36_224": _variant(224, 192, 36, 4, 1e-5),
    "cait_xxs36_384": _variant(384, 192, 36, 4, 1e-5),
    "cait_xs24_384": _variant(384, 288, 24, 6, 1e-5),
    "cait_s24_224": _variant(224, 384, 24, 8, 1e-5),
    "cait_s24_384": _variant(384, 384, 24, 8, 1e-5),
    "cait_s36_384": _variant(384, 384, 36, 8, 1e-6),
    "cait_m36_384": _variant(384, 768, 36, 16, 1e-6),
    "cait_m48_448": _variant(448, 768, 48, 16, 1e-6),
}


def list_models() -> list[str]:
    """The names of the paper's CaiT variants, as timm spells them (e.g. `"cait_xxs24_224"`)."""
    return list(VARIANTS)


def variant_config(name: str) -> dict[str, Any]:
    """The constructor keywords of the named variant (a fresh dict you may edit)."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown CaiT variant {name!r}.{hint} Known variants: {', '.join(VARIANTS)}.")
    return dict(VARIANTS[name])
