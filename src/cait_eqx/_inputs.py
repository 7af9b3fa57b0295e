"""What a CaiT accepts, and how its inputs meet its weights.

- `check_image`: the image a call takes (one, channels first, floating point; the configured size, or any
    size the patch size divides when the model has `dynamic_img_size`), with errors that say how to fix it.
- `resample_pos_embed`: the positional-embedding grid resampled bicubically (timm's rule): what
    `set_input_size`, loading a checkpoint at another size and a `dynamic_img_size` call all use.
- `adapt_input_conv`: patch-embedding kernels for another number of input channels (timm's rule).
- `take_indices`: which self-attention blocks `forward_intermediates` returns (timm's index rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, TypeCheckError

from ._config import CaiTConfig

__all__ = ["adapt_input_conv", "check_image", "resample_pos_embed", "take_indices"]


def check_image(cfg: CaiTConfig, x: Array, *, dynamic: bool) -> tuple[int, int]:
    """Raise a `TypeCheckError` that names the fix unless `x` is one image the model takes.

    **Returns:** the patch grid `(rows, cols)` of `x`.
    """
    expected = (cfg.channels, *cfg.image_size)
    if x.ndim == 4 and (tuple(x.shape[1:]) == expected or (dynamic and x.shape[1] == cfg.channels)):
        raise TypeCheckError(
            f"CaiT got a batch {tuple(x.shape)} for argument `x`, but the call takes one image of shape "
            f"(channels, height, width), e.g. {expected}. Use `jax.vmap(model)(images)` for a batch."
        )
    if not dynamic and tuple(x.shape) != expected:
        raise TypeCheckError(
            f"CaiT expected argument `x` to be one channels-first image of shape (channels, height, width) = "
            f"{expected}, got shape {tuple(x.shape)}. Resize or crop the image to {cfg.image_size} "
            f"(or resample the model with a new `image_size`, or build it with `dynamic_img_size=True` to "
            f"take any size the patch size divides), and give it {cfg.channels} channels."
        )
    if dynamic:
        if x.ndim != 3 or x.shape[0] != cfg.channels:
            raise TypeCheckError(
                f"CaiT expected argument `x` to be one channels-first image of shape "
                f"(channels={cfg.channels}, "
                f"height, width), got shape {tuple(x.shape)}."
            )
        p = cfg.patch_size
        height, width = x.shape[1:]
        if height % p or width % p or height < p or width < p:
            raise TypeCheckError(
                f"CaiT with `dynamic_img_size` takes any height and width that are positive multiples of the "
                f"patch size {p}, got an image of {height}×{width}. Resize, crop or pad it to e.g. "
                f"{max(p, height // p * p)}×{max(p, width // p * p)}."
            )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeCheckError(
            f"CaiT expected a floating-point image for argument `x`, got dtype {x.dtype}. "
            f"Convert it first, e.g. `x.astype(jnp.float32) / 255`."
        )
    return x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size


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
    be non-square. Computed in float32; the result has the input's dtype. Traceable: a `dynamic_img_size`
    model calls it inside its compiled forward pass.

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


def adapt_input_conv(weight: Any, channels: int) -> np.ndarray:
    """Patch-embedding kernels `(dim, in, p, p)` adapted to `channels` inputs, by timm's `adapt_input_conv`.

    One channel: the kernels summed over the input channels (a grey image seen as R = G = B gives the same
    embedding). More channels (from RGB): the three kernels repeated cyclically and scaled by 3 / channels,
    which keeps the embedding's scale. Computed in float32; the result has the input's
    dtype. Raises a `ValueError` for other conversions (only RGB kernels, or a count already equal, adapt).
    """
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"`channels` must be a positive int, got {channels!r}.")
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"expected patch-embedding kernels (dim, channels, p, p), got shape {weight.shape}.")
    source = weight.shape[1]
    if source == channels:
        return weight
    w = weight.astype(np.float32)
    if source != 3:
        raise ValueError(
            f"cannot adapt {source}-channel kernels to {channels} channels: timm's rule (and so this one) "
            f"adapts RGB kernels only. Train a model with {channels} channels from fresh weights instead."
        )
    if channels == 1:
        adapted = w.sum(axis=1, keepdims=True)
    else:
        repeats = -(-channels // 3)
        adapted = np.tile(w, (1, repeats, 1, 1))[:, :channels] * np.float32(3 / channels)
    return adapted.astype(weight.dtype)


def take_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[int, ...]:
    """The self-attention blocks to return, as sorted non-negative indices (timm's `feature_take_indices`).

    `None`: every block; an int `n`: the last `n` blocks; a sequence: those blocks (negative counts from
    the end, as in Python). Raises a `ValueError` naming the valid range otherwise.
    """
    if indices is None:
        return tuple(range(depth))
    if isinstance(indices, bool):
        raise ValueError(f"`indices` must be None, an int or a sequence of ints, got {indices!r}.")
    if isinstance(indices, (int, np.integer)):
        if not 0 < int(indices) <= depth:
            raise ValueError(
                f"`indices={int(indices)}` asks for the last {int(indices)} blocks, but the model has "
                f"{depth} self-attention blocks: use 1 to {depth}, or a list of block indices."
            )
        return tuple(range(depth - int(indices), depth))
    chosen = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"`indices` must hold ints, got {i!r} in {list(indices)!r}.")
        if not -depth <= int(i) < depth:
            raise ValueError(
                f"block index {int(i)} is out of range for a model with {depth} self-attention blocks: "
                f"use 0 to {depth - 1} (or -{depth} to -1 from the end)."
            )
        chosen.append(int(i) % depth)
    if not chosen:
        raise ValueError("`indices` is empty: name at least one block (or pass None for every block).")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"`indices` names a block twice: {list(indices)!r}.")
    return tuple(sorted(chosen))
