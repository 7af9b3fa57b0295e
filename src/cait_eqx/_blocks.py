"""CaiT's two kinds of block: self-attention with LayerScale, and class attention; and the scan that runs the
stacked self-attention blocks (`run_stacked`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._layers import ClassAttention, DropPath, LayerNorm, LayerScale, Mlp, TalkingHeadAttention, remat_policy
from ._misc import split_optional

__all__ = ["LayerScaleBlock", "ClassAttentionBlock", "run_stacked"]


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
        self,
        x: Float[Array, "patches dim"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "patches dim"]:
        attn_key, dp1_key, mlp_key, dp2_key = split_optional(key, 4)
        branch = self.gamma_1(self.attn(self.norm1(x), key=attn_key, inference=inference))
        x = x + self.drop_path(branch, key=dp1_key, inference=inference)
        branch = self.gamma_2(self.mlp(self.norm2(x), key=mlp_key, inference=inference))
        return x + self.drop_path(branch, key=dp2_key, inference=inference)


class ClassAttentionBlock(eqx.Module):
    """A block of the class-attention stage: updates the class token only, the patches are read-only.

    `u = concat(cls, x)`; `cls = cls + gamma_1 * class_attn(norm1(u))`;
    `cls = cls + gamma_2 * mlp(norm2(cls))`. No dropout and no stochastic depth here, as in the official code.
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

    def __call__(
        self, patches: Float[Array, "patches dim"], cls: Float[Array, " dim"]
    ) -> Float[Array, " dim"]:
        u = _prepend(cls, patches)
        cls = cls + self.gamma_1(self.attn(self.norm1(u), inference=True))
        return cls + self.gamma_2(self.mlp(self.norm2(cls), inference=True))


def _prepend(cls: Array, patches: Array) -> Array:
    return jnp.concatenate([cls[None, :].astype(patches.dtype), patches], axis=0)


# How many SA blocks one iteration of the scan runs (`lax.scan`'s `unroll`; True: all of them). A setting
# for measurements (benchmarks/step_settings.py); 1 keeps the compiled program one block long.
SCAN_UNROLL: int | bool = 1


def run_stacked(
    blocks: LayerScaleBlock | tuple[LayerScaleBlock, ...],
    tokens: Array,
    block_keys: Array | None,
    *,
    inference: bool | None,
    remat: str,
    take: tuple[int, ...] = (),
    stop: int | None = None,
) -> tuple[Array, Array | None]:
    """Run stacked SA blocks (array leaves with a leading depth axis) by `lax.scan`: `(output, taken)`.

    - `blocks`: one stack, or a tuple of stacks (segments) that run in turn, one scan each, the same
        function as their concatenation. Training with the first blocks frozen runs them as their own
        segment: the backward pass then never enters it (a scan differentiates all its iterations or none).
    - `remat`: what the backward pass keeps of each block (`remat_policy`); no effect on a forward call.
    - `take`: sorted block indices whose outputs to return, stacked in `taken` `(len(take), tokens, dim)`
        (None when empty). They are written into one buffer carried by the scan, so only those maps are
        kept and the scan is not unrolled.
    - `stop`: run only blocks `0 .. stop - 1` (with the keys they have in a full run).
    """
    if isinstance(blocks, tuple):
        return _run_segments(
            blocks, tokens, block_keys, inference=inference, remat=remat, take=take, stop=stop
        )
    params, static = eqx.partition(blocks, eqx.is_array)
    depth = jax.tree_util.tree_leaves(params)[0].shape[0] if stop is None else stop
    if stop is not None:
        params = jax.tree_util.tree_map(lambda leaf: leaf[:stop], params)
        block_keys = None if block_keys is None else block_keys[:stop]

    def run_block(block_params, x, block_key):
        return eqx.combine(block_params, static)(x, key=block_key, inference=inference)

    # `prevent_cse=False` is safe inside `scan` and leaves XLA free to fuse. The buffer of taken outputs stays
    # outside the checkpointed function, so the backward pass never stores a copy of it per block.
    policy = remat_policy(remat)
    if policy is not None:
        run_block = jax.checkpoint(run_block, policy=policy, prevent_cse=False)
    # Block i writes its output to row slots[i] of the buffer; the spare last row takes the others.
    slots = np.full(depth, len(take), np.int32)
    slots[list(take)] = np.arange(len(take), dtype=np.int32)
    taken = jnp.zeros((len(take) + 1, *tokens.shape), tokens.dtype) if take else None

    def step(carry, xs):
        x, taken = carry
        block_params, block_key, slot = xs
        x = run_block(block_params, x, block_key)
        return (x, None if taken is None else taken.at[slot].set(x)), None

    (tokens, taken), _ = jax.lax.scan(
        step, (tokens, taken), (params, block_keys, jnp.asarray(slots)), unroll=SCAN_UNROLL
    )
    return tokens, (None if taken is None else taken[:-1])


def _run_segments(segments, tokens, block_keys, *, inference, remat, take, stop):
    """`run_stacked` over consecutive stacks, block indices (`take`, `stop`, the keys) counted over all."""
    offset, parts = 0, []
    for segment in segments:
        rows = jax.tree_util.tree_leaves(eqx.filter(segment, eqx.is_array))[0].shape[0]
        if stop is not None and offset >= stop:
            break
        tokens, taken = run_stacked(
            segment,
            tokens,
            None if block_keys is None else block_keys[offset : offset + rows],
            inference=inference,
            remat=remat,
            take=tuple(index - offset for index in take if offset <= index < offset + rows),
            stop=None if stop is None or stop >= offset + rows else stop - offset,
        )
        if taken is not None:
            parts.append(taken)
        offset += rows
    return tokens, (jnp.concatenate(parts) if take else None)
