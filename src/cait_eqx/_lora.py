"""LoRA adapters on a `CaiT`: `lora` puts them in, `merge_lora` folds them back, `save_lora` / `load_lora`
keep them apart from the base weights.

An adapted model is a `CaiT` whose chosen `Linear`s are `LoRALinear`s (the base `weight` and `bias` under
their own names, plus `lora_a`, `lora_b`). In the stacked self-attention blocks the adapters are stacked
along the depth like every other leaf there, and run by the same scan; each class-attention block and the
head carry their own. What trains is `lora_trainable(model)`: the adapters, and the classifier head unless
the head is itself adapted (a head for a new task is new, and a low-rank update of a random matrix learns
little). `cait_eqx.training` differentiates exactly that part (`trainable_params`), so the frozen base
weights cost no weight gradients and no optimiser state.

Target names (`LORA_TARGETS`) are timm's layer names: `qkv` (the self-attention blocks' fused query, key and
value map: CaiT has no separate q, k, v there), `q`, `k`, `v` (the class-attention blocks'), `proj` (the
attention output map of both kinds of block), `fc1`, `fc2` (the MLPs of both), `head`. The talking-heads
mixes `proj_l`, `proj_w` are `heads x heads` matrices (16 to 256 numbers): too small to need a low-rank
update, they are not targets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from ._atomic import atomic_write_bytes
from ._constants import DEFAULT_LORA_TARGETS, LORA_TARGETS
from ._model import CaiT
from ._primitives import LoRAError, LoRALinear, linear_of

__all__ = [
    "LoRAError",
    "check_lora_targets",
    "has_lora",
    "load_lora",
    "lora",
    "lora_settings",
    "lora_trainable",
    "merge_lora",
    "save_lora",
]

_FORMAT_KEY = "cait_eqx.lora_format"
_INFO_KEY = "cait_eqx.lora"
_FORMAT = "1"
# The hyper-parameters that fix the shapes adapters are made for (a file for another model is refused).
_SHAPE_FIELDS = ("dim", "depth", "cls_depth", "heads", "dim_head", "mlp_dim", "cls_mlp_dim", "qkv_bias")


def _is_lora(node: Any) -> bool:
    return isinstance(node, LoRALinear)


def has_lora(model: PyTree) -> bool:
    """Whether `model` carries LoRA adapters (some `LoRALinear`)."""
    return any(_is_lora(node) for node in jax.tree.leaves(model, is_leaf=_is_lora))


def check_lora_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """`targets` (a sequence, or one comma-separated string) as a tuple of `LORA_TARGETS` names, in that
    order, without repeats; raise `LoRAError` naming the valid ones otherwise."""
    names = targets.split(",") if isinstance(targets, str) else targets
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise LoRAError(f"LoRA targets must be names of layers ({', '.join(LORA_TARGETS)}), got {targets!r}.")
    names = [n.strip() for n in names if n.strip()]
    mixes = [n for n in names if n in ("proj_l", "proj_w")]
    if mixes:
        raise LoRAError(
            f"LoRA target(s) {', '.join(mixes)}: the talking-heads mixes are heads x heads matrices, too "
            f"small for a low-rank update, and are not targets. Valid targets: {', '.join(LORA_TARGETS)}."
        )
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        what = f"name(s) no layer: {', '.join(map(repr, unknown))}" if unknown else "name no layer (empty)"
        raise LoRAError(
            f"LoRA targets {what}. Valid targets: {', '.join(LORA_TARGETS)} (qkv: the self-attention "
            f"blocks' fused query-key-value map; q, k, v: the class-attention blocks'; proj, fc1, fc2: both "
            f"kinds of block; head: the classifier)."
        )
    return tuple(n for n in LORA_TARGETS if n in names)


def _sites(model: CaiT) -> dict[str, list[tuple[str, Callable[[CaiT], Any]]]]:
    """Each target's layers in `model`: `(dotted path, where)` pairs (paths under `blocks.` are stacked)."""
    sites: dict[str, list[tuple[str, Callable[[CaiT], Any]]]] = {name: [] for name in LORA_TARGETS}
    for part, names in (("attn", ("qkv", "proj")), ("mlp", ("fc1", "fc2"))):
        for name in names:
            sites[name].append(
                (f"blocks.{part}.{name}", lambda m, p=part, n=name: getattr(getattr(m.blocks, p), n))
            )
    for i in range(len(model.blocks_token_only)):
        for part, names in (("attn", ("q", "k", "v", "proj")), ("mlp", ("fc1", "fc2"))):
            for name in names:
                sites[name].append((
                    f"blocks_token_only.{i}.{part}.{name}",
                    lambda m, i=i, p=part, n=name: getattr(getattr(m.blocks_token_only[i], p), n),
                ))
    if model.head is not None:
        sites["head"].append(("head", lambda m: m.head))
    return sites


def lora(
    model: CaiT,
    *,
    rank: int,
    alpha: float | int | None = None,
    targets: str | Sequence[str] = DEFAULT_LORA_TARGETS,
    key: PRNGKeyArray,
) -> CaiT:
    """`model` with LoRA adapters on the chosen layers, computing exactly what `model` computes until trained.

    Each chosen `Linear` becomes a `LoRALinear`: its base `weight` and `bias` kept, plus `A` `(rank, in)`
    (uniform in ±1/sqrt(in)) and `B` `(out, rank)` (zero), so the layer computes
    `x @ (weight + (alpha / rank) B A).T + bias`. In the stacked self-attention blocks each block gets its own
    adapter, stacked along the depth. Train it with `cait_eqx.training.fit` (or any step on
    `training.trainable_params(model)`): only the adapters and the head learn.

    **Arguments:**

    - `model`: a `CaiT` without adapters.
    - `rank`: the rank `r` of every update, 1 to the narrowest chosen layer's width. (Keyword only, as all.)
    - `alpha`: the update's scale is `alpha / rank`; `None`: `rank` (a scale of 1).
    - `targets`: which layers, by name (`cait_eqx.LORA_TARGETS`; a sequence or a comma-separated string);
        default every Linear of the attentions and MLPs (`DEFAULT_LORA_TARGETS`).
    - `key`: a `jax.random.key` for the `A` matrices.

    **Returns:** the adapted `CaiT`. **Raises:** `LoRAError` (a `ValueError`) before anything is built for a
    target that names no layer of this model, a rank that does not fit, a bad `alpha`, or a model that
    already carries adapters.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`lora` adapts a `CaiT`, got a {type(model).__name__}.")
    if has_lora(model):
        raise LoRAError(
            "This model already carries LoRA adapters. Fold them in first "
            "(`model = cait_eqx.merge_lora(model)`) to put new ones on top, or train the ones it has."
        )
    names = check_lora_targets(targets)
    sites = _sites(model)
    empty = [name for name in names if not sites[name]]
    if empty:
        why = {"q": "cls_depth=0", "k": "cls_depth=0", "v": "cls_depth=0", "head": "num_classes=0"}
        present = [name for name in LORA_TARGETS if sites[name]]
        listed = ", ".join(f"{n} ({why.get(n, 'absent')})" for n in empty)
        raise LoRAError(
            f"LoRA target(s) {listed} name no layer of this "
            f"model. Its layers: {', '.join(present)}."
        )
    chosen = [site for name in names for site in sites[name]]
    widths = {path: (where(model).in_features, where(model).out_features) for path, where in chosen}
    limit = min(min(w) for w in widths.values())
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        narrow = min(widths, key=lambda p: min(widths[p]))
        raise LoRAError(
            f"LoRA `rank` must be an int in 1..{limit}, got {rank!r}: an update of rank r needs r <= the "
            f"narrower width of each adapted layer, and {narrow} maps {widths[narrow][0]} -> "
            f"{widths[narrow][1]}. Use a rank in 1..{limit}, or leave that layer out of `targets`."
        )
    alpha = float(rank) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise LoRAError(
            f"LoRA `alpha` must be a number > 0 (the update's scale is alpha / rank), got {alpha!r}."
        )
    depth = model.config.depth
    for (path, where), site_key in zip(chosen, jr.split(key, len(chosen)), strict=True):
        base = where(model)
        if path.startswith("blocks."):  # stacked: one adapter per block, stacked along the depth
            adapted = eqx.filter_vmap(lambda layer, k: LoRALinear(layer, rank, float(alpha), key=k))(
                base, jr.split(site_key, depth)
            )
        else:
            adapted = LoRALinear(base, rank, float(alpha), key=site_key)
        model = eqx.tree_at(where, model, adapted)
    return model


def lora_settings(model: CaiT) -> dict[str, Any]:
    """`{"rank", "alpha", "targets"}` of an adapted model (`targets` in `LORA_TARGETS` order)."""
    if not has_lora(model):
        raise LoRAError("This model carries no LoRA adapters (make them with `cait_eqx.lora`).")
    sites = _sites(model)
    layers = [where(model) for found in sites.values() for _, where in found if _is_lora(where(model))]
    targets = tuple(name for name in LORA_TARGETS if any(_is_lora(where(model)) for _, where in sites[name]))
    return {"rank": layers[0].rank, "alpha": layers[0].alpha, "targets": targets}


def lora_trainable(model: CaiT) -> PyTree:
    """What trains in an adapted model: `True` at every adapter matrix (`lora_a`, `lora_b`) and at the head's
    arrays (unless the head is adapted itself), `False` elsewhere (the frozen base)."""

    def mark(node: Any) -> Any:
        if _is_lora(node):
            flags = jax.tree.map(lambda _: False, node)
            return eqx.tree_at(lambda m: (m.lora_a, m.lora_b), flags, (True, True))
        return False

    spec = jax.tree.map(mark, model, is_leaf=_is_lora)
    if model.head is not None and not _is_lora(model.head):
        spec = eqx.tree_at(lambda m: m.head, spec, jax.tree.map(eqx.is_array, model.head))
    return spec


def merge_lora(model: CaiT) -> CaiT:
    """Fold every adapter into its base weight: a plain `CaiT` computing the same function (float32 rounding).

    The result has no `LoRALinear` left, so `cait_eqx.save`, `to_timm_state_dict` and `export` take it as any
    `CaiT`.

    **Raises:** `LoRAError` when `model` carries no adapters (there is nothing to merge).
    """
    if not isinstance(model, CaiT) or not has_lora(model):
        raise LoRAError(
            "`merge_lora` folds LoRA adapters into their base weights, but this model carries none: it is "
            "already a plain model (save or export it as it is). Adapters come from `cait_eqx.lora` or "
            "`cait_eqx.load_lora`."
        )
    return jax.tree.map(lambda node: node.merged() if _is_lora(node) else node, model, is_leaf=_is_lora)


def _config_record(model: CaiT) -> dict[str, Any]:
    config = dataclasses.asdict(model.config)
    config["image_size"] = list(model.config.image_size)
    return config


def save_lora(path: str | os.PathLike, model: CaiT, *, base: str | None = None) -> Path:
    """Write what an adapted model trained, apart from its base weights: the adapters (and the head, when it
    trained in full), to one small safetensors file that `load_lora` applies to the base model again.

    Tensors are named by their key paths (`blocks.attn.qkv.lora_a`, stacked `(depth, rank, in)`;
    `head.weight`); the metadata holds the rank, alpha, targets, the base model's configuration and `base`.
    Written atomically.

    **Arguments:**

    - `path`: where to write (conventionally `adapters.safetensors`).
    - `model`: a `CaiT` with adapters.
    - `base`: what the base weights are, for the record (e.g. `"cait_xxs24_224"` or a file's path).
        (Keyword only argument.)

    **Returns:** the path written.
    """
    settings = lora_settings(model)
    from safetensors.numpy import save as serialise

    params = eqx.filter(model, lora_trainable(model))
    tensors = {
        jax.tree_util.keystr(key_path, simple=True, separator="."): np.ascontiguousarray(jax.device_get(leaf))
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    info = {**settings, "targets": list(settings["targets"]), "base": base, "config": _config_record(model)}
    from . import __version__

    metadata = {_FORMAT_KEY: _FORMAT, _INFO_KEY: json.dumps(info, sort_keys=True), "cait_eqx.package_version":
                __version__}
    return atomic_write_bytes(path, serialise(tensors, metadata=metadata))


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise LoRAError(f"Cannot read LoRA adapters from {path}: {error}") from None
    if metadata.get(_FORMAT_KEY) != _FORMAT or _INFO_KEY not in metadata:
        raise LoRAError(
            f"{path} is not a LoRA adapters file written by `cait_eqx.save_lora` (no {_FORMAT_KEY!r} "
            f"metadata). A whole model loads with `cait_eqx.load`."
        )
    return tensors, json.loads(metadata[_INFO_KEY])


def load_lora(model: CaiT, path: str | os.PathLike, *, merge: bool = False) -> CaiT:
    """Apply the adapters `save_lora` wrote to `model`, the base model they were trained on.

    **Arguments:**

    - `model`: the base `CaiT` (without adapters), e.g. `cait_eqx.create_model(name, pretrained=True)`.
    - `path`: the adapters file.
    - `merge`: fold the adapters into the weights (`merge_lora`) and return a plain `CaiT`. (Keyword only
        argument.)

    **Returns:** the adapted `CaiT` (its head replaced by the file's when the file holds one), or with
    `merge=True` the merged one. **Raises:** `LoRAError` when the file is not an adapters file, was made for
    another architecture, or `model` carries adapters already.
    """
    path = Path(path)
    tensors, info = _read(path)
    if not isinstance(model, CaiT):
        raise TypeError(f"`load_lora` applies adapters to a `CaiT`, got a {type(model).__name__}.")
    if has_lora(model):
        raise LoRAError(
            f"Cannot load {path} onto a model that already carries adapters: give the base model."
        )
    stored = info["config"]
    differ = [f"{name}: {stored.get(name)!r} in the file, {getattr(model.config, name)!r} here"
              for name in _SHAPE_FIELDS if stored.get(name) != getattr(model.config, name)]
    if differ:
        raise LoRAError(
            f"{path} holds adapters for another architecture than this model's ({'; '.join(differ)}); they "
            f"were trained on base {info.get('base')!r}. Load that base model and apply them to it."
        )
    head = tensors.get("head.weight")
    if head is not None and (model.head is None or model.head.weight.shape != head.shape):
        # The run trained a new head (another number of classes): it comes from the file, whole.
        bias = tensors.get("head.bias")
        dtype = jnp.dtype(model.config.dtype)
        new = copy.copy(model)
        object.__setattr__(new, "head", linear_of(
            jnp.asarray(head, dtype), None if bias is None else jnp.asarray(bias, dtype), head.shape[1],
            head.shape[0]))
        object.__setattr__(new, "config", model.config.replace(num_classes=head.shape[0]))
        model = new
    abstract_key = jax.eval_shape(jr.key, 0)  # the A matrices come from the file: nothing is drawn
    structure = eqx.filter_eval_shape(
        lambda m, k: lora(m, rank=info["rank"], alpha=info["alpha"], targets=info["targets"], key=k),
        model, abstract_key,
    )
    base = {jax.tree_util.keystr(p, simple=True, separator="."): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]}
    used = set()

    def fill(key_path: Any, leaf: Any) -> Any:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name = jax.tree_util.keystr(key_path, simple=True, separator=".")
        if name not in tensors:
            return base[name]
        if tuple(tensors[name].shape) != tuple(leaf.shape):
            raise LoRAError(f"{path}: {name} is {tuple(tensors[name].shape)}, this model needs {leaf.shape}.")
        used.add(name)
        return jnp.asarray(tensors[name], leaf.dtype)

    adapted = jax.tree_util.tree_map_with_path(fill, structure)
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoRAError(f"{path} holds tensors this model has no place for: {', '.join(unused)}.")
    return merge_lora(adapted) if merge else adapted
