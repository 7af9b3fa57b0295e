"""Small helpers shared by the modules: key splitting, initialisation, argument checks."""

from __future__ import annotations

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray


def split_optional(key: PRNGKeyArray | None, num: int) -> tuple[PRNGKeyArray | None, ...]:
    """Split `key` into `num` keys, or give `num` Nones when there is no key (deterministic path)."""
    if key is None:
        return (None,) * num
    return tuple(jr.split(key, num))


def trunc_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float, dtype) -> Array:
    """Normal(0, std²) truncated at ±2 std, the initialisation CaiT uses for weights and embeddings."""
    return (jr.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)


def check_rate(name: str, value: object) -> None:
    """Raise a `ValueError` unless `0 <= value < 1` (a dropout / drop-path probability)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r} of type {type(value).__name__}.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1) (a probability of dropping), got {value}. "
            f"Use 0.0 to switch it off."
        )


def expand_to(vector: Array, ndim: int) -> Array:
    """Give a per-feature vector leading unit axes so it broadcasts explicitly against an `ndim` array.

    Keeps the package usable under `jax_numpy_rank_promotion="raise"`.
    """
    return vector.reshape((1,) * (ndim - vector.ndim) + vector.shape)
