"""Model surgery for new inputs and new tasks: another image size, another head.

- `resample_pos_embed`: the positional-embedding grid resampled bicubically (timm's rule), also what
    loading a checkpoint at another image size uses.
- `set_input_size`: a model for another resolution, every other weight kept.
- `reset_classifier`: a fresh head for another number of classes (or none).
"""

from __future__ import annotations

import copy
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import Linear
from ._model import CaiT

__all__ = ["reset_classifier", "resample_pos_embed", "set_input_size"]


def _pair(name: str, grid: Any) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
    ):
        raise ValueError(f"`{name}` must be a (rows, columns) pair of positive ints, got {grid!r}.")
    return int(grid[0]), int(grid[1])


def resample_pos_embed(
    pos_embed: Float[Array, "patches dim"] | Float[np.ndarray, "patches dim"],
    source_grid: tuple[int, int],
    target_grid: tuple[int, int],
) -> Float[Array, "new_patches dim"]:
    """Resample a positional embedding from one patch grid to another by bicubic interpolation.

    The embedding is viewed as a `source_grid` image with `dim` channels (row-major over the patches, as
    the patch embedding orders them) and resized to `target_grid` with the Keys cubic kernel (a = -0.5),
    antialiased when shrinking: the same function as timm's `resample_abs_pos_embed` for ViTs. Grids may
    be non-square. Computed in float32; the result has the input's dtype.

    **Arguments:**

    - `pos_embed`: the embedding, `(source_rows * source_cols, dim)`.
    - `source_grid`: its grid, `(rows, cols)`.
    - `target_grid`: the new grid, `(rows, cols)`.

    **Returns:** the resampled embedding, `(target_rows * target_cols, dim)`.
    """
    source = _pair("source_grid", source_grid)
    target = _pair("target_grid", target_grid)
    pos_embed = jnp.asarray(pos_embed)
    patches, dim = pos_embed.shape
    if source[0] * source[1] != patches:
        raise ValueError(
            f"`pos_embed` has {patches} patches but `source_grid` {source} holds {source[0] * source[1]}. "
            f"Pass the grid the embedding was trained on: (image height / patch, image width / patch)."
        )
    if source == target:
        return pos_embed
    image = pos_embed.astype(jnp.float32).reshape(*source, dim)
    resized = jax.image.resize(image, (*target, dim), method="bicubic", antialias=True)
    return resized.reshape(target[0] * target[1], dim).astype(pos_embed.dtype)


def set_input_size(model: CaiT, image_size: int | tuple[int, int]) -> CaiT:
    """A copy of `model` for another image size, its positional embedding resampled bicubically.

    Use it to fine-tune or evaluate at a new resolution (e.g. a 224 checkpoint at 384). Every other weight
    is carried over unchanged; the patch size, each dropout's mode and the run-time choices
    (`compute_dtype`, `remat`) stay.

    **Arguments:**

    - `model`: a `CaiT`.
    - `image_size`: the new input size, an int or a `(height, width)` pair, a multiple of the patch size.

    **Returns:** a `CaiT` whose `config.image_size` is the new size.
    """
    cfg = model.config
    new_cfg = cfg.replace(image_size=image_size)  # validates the size against the patch size
    pos_embed = resample_pos_embed(model.pos_embed, cfg.grid_size, new_cfg.grid_size)
    # The same PyTree with a new configuration: the model's leaves in the structure of a model of the new size
    # (static fields, e.g. the patch embedding's image size, come from the new structure).
    skeleton = eqx.filter_eval_shape(
        CaiT, **new_cfg.kwargs(), compute_dtype=model.compute_dtype, remat=model.remat, key=jr.key(0)
    )
    resized = eqx.tree_at(lambda m: m.pos_embed, model, pos_embed, is_leaf=lambda x: x is None)
    leaves = jax.tree_util.tree_leaves(resized, is_leaf=lambda x: x is None)
    treedef = jax.tree_util.tree_structure(skeleton, is_leaf=lambda x: x is None)
    return jax.tree_util.tree_unflatten(treedef, leaves)


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
