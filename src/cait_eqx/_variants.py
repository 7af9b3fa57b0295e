"""The paper's named CaiT models, with timm's names and hyper-parameters."""

from __future__ import annotations

import difflib
import os
from typing import Any

from jaxtyping import PRNGKeyArray

from ._model import CaiT, _compute_dtype_name, with_compute_dtype

__all__ = ["VARIANTS", "create_model", "list_models", "variant_config"]


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


def create_model(
    name: str,
    pretrained: bool = False,
    *,
    key: PRNGKeyArray | None = None,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    compute_dtype: Any = None,
    **overrides: Any,
) -> CaiT:
    """Build a named paper variant, with fresh weights or with timm's pretrained ImageNet weights.

    **Arguments:**

    - `name`: one of `list_models()`.
    - `pretrained`: load timm's published ImageNet-1k weights (`timm/<name>.fb_dist_in1k` on the Hugging
        Face Hub), downloading them into the Hugging Face cache if needed. Offline (or with
        `HF_HUB_OFFLINE=1`) only the cache is used; without a cached copy this fails at once with
        `PretrainedWeightsUnavailable`: download the file elsewhere and pass it as `weights`.
    - `key`: a `jax.random.key` for the initialisation; needed for fresh weights, and for a pretrained
        model only when `num_classes` asks for a new head. (Keyword only argument.)
    - `weights`: a local checkpoint file to load instead (timm `model.safetensors` or `.pth`, deit release
        `.pth`, or a `cait_eqx.save` file), checked against the variant. (Keyword only argument.)
    - `cache_dir`: the Hugging Face cache directory for `pretrained=True`. (Keyword only argument.)
    - `compute_dtype`: the dtype to compute in, e.g. `jnp.bfloat16` for mixed precision with float32
        weights (see `with_compute_dtype`); `None` computes in the parameter dtype. (Keyword only argument.)
    - `**overrides`: any `CaiT` keyword to change, e.g. `num_classes=10`, `layer_dropout=0.1`,
        `image_size=384`. With pretrained weights, a new `image_size` resamples the positional embedding
        (bicubic) and a new `num_classes` gives a fresh head (`reset_classifier`).

    **Returns:** a `CaiT`: in training mode with fresh weights; in inference mode with loaded weights
    (`eqx.nn.inference_mode(model, False)` to fine-tune it).
    """
    config = variant_config(name)
    _compute_dtype_name(compute_dtype, "float32")  # a bad dtype fails before any download
    if not pretrained and weights is None:
        if key is None:
            raise ValueError(
                f"`create_model({name!r})` builds fresh weights and needs a key: pass "
                f"`key=jax.random.key(...)`, or `pretrained=True` (or `weights=path`) for trained weights."
            )
        config.update(overrides)
        return CaiT(**config, compute_dtype=compute_dtype, key=key)
    if pretrained and weights is not None:
        raise ValueError(
            "Pass either `pretrained=True` (the Hub's weights) or `weights=path` (a local file), not both."
        )
    from ._hub import pretrained_weights_file
    from ._io import load_timm
    from ._weights import reset_classifier

    if weights is None:
        weights = pretrained_weights_file(name, cache_dir=cache_dir)
    num_classes = overrides.pop("num_classes", None)
    model = load_timm(weights, name=name, **overrides)
    if num_classes is not None and num_classes != model.config.num_classes:
        if num_classes != 0 and key is None:
            raise ValueError(
                f"`num_classes={num_classes}` differs from the checkpoint's {model.config.num_classes}, so a "
                f"fresh head is initialised, which needs a key: pass `key=jax.random.key(...)`."
            )
        model = reset_classifier(model, num_classes, key=key)
    return with_compute_dtype(model, compute_dtype)
