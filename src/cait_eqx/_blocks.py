"""CaiT's two kinds of block: self-attention with LayerScale, and class attention."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import ClassAttention, DropPath, LayerNorm, LayerScale, Mlp, TalkingHeadAttention
from ._misc import split_optional

__all__ = ["LayerScaleBlock", "ClassAttentionBlock"]


class LayerScaleBlock(eqx.Module):
    """A self-attention block of the SA stage, over the patch tokens only.

    `x = x + drop_path(gamma_1 * attn(norm1(x)))`, then `x = x + drop_path(gamma_2 * mlp(norm2(x)))`.
    """

    norm1: LayerNorm
    attn: TalkingHeadAttention
    gamma_1: LayerScale
    norm2: LayerNorm
    mlp: Mlp
    gamma_2: LayerScale
    drop_path: DropPath

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        init_values: float,
        qkv_bias: bool = True,
        talking_heads: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        attn_key, mlp_key = jr.split(key)
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn = TalkingHeadAttention(
            dim,
            heads,
            dim_head,
            qkv_bias=qkv_bias,
            talking_heads=talking_heads,
            attn_dropout=attn_dropout,
            dropout=dropout,
            dtype=dtype,
            key=attn_key,
        )
        self.gamma_1 = LayerScale(dim, init_values, dtype=dtype)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.mlp = Mlp(dim, mlp_dim, dropout=dropout, dtype=dtype, key=mlp_key)
        self.gamma_2 = LayerScale(dim, init_values, dtype=dtype)
        self.drop_path = DropPath(layer_dropout)

    def __call__(
        self, x: Float[Array, "patches dim"], *, key: PRNGKeyArray | None = None, inference: bool | None = None
    ) -> Float[Array, "patches dim"]:
        attn_key, dp1_key, mlp_key, dp2_key = split_optional(key, 4)
        branch = self.gamma_1(self.attn(self.norm1(x), key=attn_key, inference=inference))
        x = x + self.drop_path(branch, key=dp1_key, inference=inference)
        branch = self.gamma_2(self.mlp(self.norm2(x), key=mlp_key, inference=inference))
        return x + self.drop_path(branch, key=dp2_key, inference=inference)


class ClassAttentionBlock(eqx.Module):
    """A block of the class-attention stage: updates the class token only, the patches are read-only.

    `u = concat(cls, x)`; `cls = cls + gamma_1 * class_attn(norm1(u))`; `cls = cls + gamma_2 * mlp(norm2(cls))`.
    No dropout and no stochastic depth here, as in the official code.
    """

    norm1: LayerNorm
    attn: ClassAttention
    gamma_1: LayerScale
    norm2: LayerNorm
    mlp: Mlp
    gamma_2: LayerScale

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        init_values: float,
        qkv_bias: bool = True,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        attn_key, mlp_key = jr.split(key)
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn = ClassAttention(dim, heads, dim_head, qkv_bias=qkv_bias, dtype=dtype, key=attn_key)
        self.gamma_1 = LayerScale(dim, init_values, dtype=dtype)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.mlp = Mlp(dim, mlp_dim, dtype=dtype, key=mlp_key)
        self.gamma_2 = LayerScale(dim, init_values, dtype=dtype)

    def attention_weights(
        self, patches: Float[Array, "patches dim"], cls: Float[Array, " dim"]
    ) -> Float[Array, "heads tokens"]:
        """The class-attention weights of this block, `(heads, 1 + patches)`, class token first."""
        u = _prepend(cls, patches)
        return self.attn.attention_weights(self.norm1(u))

    def __call__(self, patches: Float[Array, "patches dim"], cls: Float[Array, " dim"]) -> Float[Array, " dim"]:
        u = _prepend(cls, patches)
        cls = cls + self.gamma_1(self.attn(self.norm1(u), inference=True))
        return cls + self.gamma_2(self.mlp(self.norm2(cls), inference=True))


def _prepend(cls: Array, patches: Array) -> Array:
    return jnp.concatenate([cls[None, :].astype(patches.dtype), patches], axis=0)
