"""The building blocks of CaiT: the MLP and the two attentions (talking heads, class attention).

Every layer here acts on the tokens of *one* image (Equinox's convention); batches go through `jax.vmap`. The
smaller pieces they are made of (Linear, LayerNorm, PatchEmbed, LayerScale, DropPath) are in `_primitives.py`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, PRNGKeyArray

from ._misc import split_optional
from ._primitives import DropPath, LayerNorm, LayerScale, Linear, PatchEmbed

__all__ = [
    "Linear",
    "LayerNorm",
    "PatchEmbed",
    "LayerScale",
    "DropPath",
    "Mlp",
    "TalkingHeadAttention",
    "ClassAttention",
    "SAVED_FOR_BACKWARD",
    "remat_policy",
]

# The intermediate results of a self-attention block that the `"weight_products"` remat policy keeps for the
# backward pass: the outputs of the products with weight matrices, tagged with `checkpoint_name` below. The SA
# stage (`_model.py`) recomputes everything else (LayerNorms, the attention maps and softmax, GELU) from them.
# On XLA's CPU backend that is faster than storing it all: every saved array is stacked over the depth by the
# scan, and writing those stacks costs more than the elementwise recomputation (benchmarks/README.md,
# "Remat").
SAVED_FOR_BACKWARD = ("qkv", "attn_out", "attn_proj", "fc1", "fc2")


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a `remat` name (`cait_eqx.REMAT_POLICIES`); `None` for no remat."""
    if name == "none":
        return None
    if name == "weight_products":
        # The outputs of the products with weight matrices, tagged below (`SAVED_FOR_BACKWARD`).
        return jax.checkpoint_policies.save_only_these_names(*SAVED_FOR_BACKWARD)
    if name == "dots":
        return jax.checkpoint_policies.dots_saveable
    return jax.checkpoint_policies.nothing_saveable  # "full"


class Mlp(eqx.Module):
    """`fc1 -> GELU (exact) -> dropout -> fc2 -> dropout`."""

    fc1: Linear
    fc2: Linear
    drop: eqx.nn.Dropout

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, dtype=None, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.fc1 = Linear(dim, hidden_dim, dtype=dtype, key=k1)
        self.fc2 = Linear(hidden_dim, dim, dtype=dtype, key=k2)
        self.drop = eqx.nn.Dropout(dropout)

    def __call__(
        self,
        x: Float[Array, "*tokens dim"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "*tokens dim"]:
        k1, k2 = split_optional(key, 2)
        x = gelu(checkpoint_name(self.fc1(x), "fc1"))
        x = self.drop(x, key=k1, inference=inference)
        x = checkpoint_name(self.fc2(x), "fc2")
        return self.drop(x, key=k2, inference=inference)


def gelu(x: Array) -> Array:
    """The exact GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2`, in the dtype of `x`.

    The same function as `jax.nn.gelu(x, approximate=False)`, written with `erf` as PyTorch's `nn.GELU` is (so
    it rounds like timm's), where JAX's is written with `erfc(-x / √2)`. XLA's CPU backend evaluates float32
    `erf` as one polynomial ratio, while its `erfc` also takes an exponential and a branch; the backward pass
    recomputes this for every block, and the training step is faster with `erf` (`benchmarks/README.md`,
    variant `erfc GELU` of `benchmarks/train_step_variants.py`). For very negative `x` the `erf` form loses
    relative accuracy that `erfc` keeps, on values below 1e-6 in magnitude, exactly as PyTorch's does.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def _softmax32(logits: Array) -> Array:
    """Softmax over the last axis, computed in float32 and cast back."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _split_qkv(qkv: Array, heads: int, dim_head: int) -> tuple[Array, Array, Array]:
    """Cut the `(tokens, 3 * heads * dim_head)` output of the fused qkv product into `q, k, v`, each
    `(tokens, heads, dim_head)`, in timm's order (`q` first, heads major within each).

    Written as one `split` of the feature axis, whose gradient is one `concatenate`. Indexing a
    `(tokens, 3, heads, dim_head)` view instead gives three zero-padded copies in the backward pass that XLA's
    CPU backend writes out and adds, once for each product that reads the gradient, which made the training
    step slower (`benchmarks/README.md`, variant `indexed qkv` of `benchmarks/train_step_variants.py`).
    """
    n = qkv.shape[0]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    return q.reshape(n, heads, dim_head), k.reshape(n, heads, dim_head), v.reshape(n, heads, dim_head)


# Up to this many heads the talking-heads mixes are written out as sums of scaled maps (see `_mix_heads`): the
# XXS, XS and S variants (4, 6 and 8 heads). With 16 heads (M) the heads² terms would double the compile time
# of a train step, so wider models keep the product over the head axis.
UNROLL_HEAD_MIX = 8


def _mix_heads(mix: Linear, attn: Float[Array, "heads q k"]) -> Float[Array, "heads q k"]:
    """Apply a `Linear(heads, heads)` over the head axis of `(heads, q, k)` maps:
    `out[g] = Σ_h W[g, h] attn[h]`.

    With few heads (see `UNROLL_HEAD_MIX`) this is written out as `heads²` scaled additions of whole maps, cut
    apart with one `split`, rather than as a matrix product over the head axis. XLA fuses those into the loops
    around the softmax, and reverse-mode autodiff turns them into the same kind of fused loops (the transpose
    of a `split` is a `concatenate`). A product over an axis of size `heads` would instead move every map into
    a heads-last layout and back, and its weight gradient would be a `(heads, B·q·k) @ (B·q·k, heads)` product
    that runs at a few GFLOP/s on the CPU: together a quarter of `cait_xxs24_224`'s training step. The result
    equals the product up to float rounding (the sum runs in head order).
    """
    heads = attn.shape[0]
    w = mix.weight.astype(attn.dtype)
    if heads > UNROLL_HEAD_MIX:
        out = jnp.einsum("gh,hqk->gqk", w, attn)
    else:
        maps = jnp.split(attn, heads, axis=0)  # heads × (1, q, k)
        rows = []
        for g in range(heads):
            row = w[g, 0] * maps[0]
            for h in range(1, heads):
                row = row + w[g, h] * maps[h]
            rows.append(row)
        out = jnp.concatenate(rows, axis=0)
    if mix.bias is not None:
        out = out + mix.bias.astype(attn.dtype)[:, None, None]
    return out


# From this many tokens on, the self-attention of an inference forward (dropout off) runs in a heads-major
# layout (`TalkingHeadAttention._heads_major`). On the Zen 4 machine the inference forward of
# `cait_xxs24_224` and `cait_s24_224` (197 tokens) was 1.02-1.19× faster with it, at batch 1 to 32, while
# the small 32×32 model (65 tokens) was 0.92× and every training step 0.93-1.02× (benchmarks/README.md,
# the "heads-major attention" rows of `train_step_variants.py`). Both layouts compute the same numbers.
# Layers with LoRA adapters (a subclass of `Linear`) keep the token-major form: their update is a product
# of its own.
HEADS_MAJOR_MIN_TOKENS = 128


class TalkingHeadAttention(eqx.Module):
    """Multi-head self-attention with talking heads (Shazeer et al. 2020), as in CaiT's SA blocks.

    Heads are mixed by `proj_l` (before the softmax) and `proj_w` (after it). With `talking_heads=False`
    both are absent and this is plain multi-head attention.
    """

    qkv: Linear
    proj_l: Linear | None
    proj_w: Linear | None
    proj: Linear
    attn_drop: eqx.nn.Dropout
    proj_drop: eqx.nn.Dropout
    heads: int = eqx.field(static=True)
    dim_head: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        qkv_bias: bool = True,
        talking_heads: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        qkv_key, l_key, w_key, proj_key = jr.split(key, 4)
        inner = heads * dim_head
        self.qkv = Linear(dim, 3 * inner, use_bias=qkv_bias, dtype=dtype, key=qkv_key)
        if talking_heads:
            self.proj_l = Linear(heads, heads, dtype=dtype, key=l_key)
            self.proj_w = Linear(heads, heads, dtype=dtype, key=w_key)
        else:
            self.proj_l = self.proj_w = None
        self.proj = Linear(inner, dim, dtype=dtype, key=proj_key)
        self.attn_drop = eqx.nn.Dropout(attn_dropout)
        self.proj_drop = eqx.nn.Dropout(dropout)
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5

    def _maps(self, logits: Float[Array, "heads q k"]) -> Float[Array, "heads q k"]:
        """`proj_l`, the softmax (in float32) and `proj_w` on the scaled `q·kᵀ` logits."""
        if self.proj_l is not None:
            logits = _mix_heads(self.proj_l, logits)
        attn = _softmax32(logits)
        if self.proj_w is not None:
            attn = _mix_heads(self.proj_w, attn)
        return attn

    def attention_weights(self, x: Float[Array, "tokens dim"]) -> tuple[Array, Array]:
        """The attention maps `(heads, tokens, tokens)` after `proj_w` (before dropout), and the values
        `(tokens, heads, dim_head)`."""
        q, k, v = _split_qkv(checkpoint_name(self.qkv(x), "qkv"), self.heads, self.dim_head)
        q = q * jnp.asarray(self.scale, x.dtype)
        return self._maps(jnp.einsum("qhd,khd->hqk", q, k)), v

    def _heads_major(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        """The attention without dropout, every intermediate laid out heads first (`HEADS_MAJOR_MIN_TOKENS`).

        The qkv product writes `(3, heads, tokens, dim_head)` directly (its weight viewed as `(3, heads,
        dim_head, dim)`), so the batched `q·kᵀ` and `attn·v` products have their batch axes leading and need
        no transposes, and the output projection contracts `(heads, dim_head)` in one product. The same
        products as `__call__`'s token-major form, summed in the same order: the results are equal.
        """
        heads, dim_head = self.heads, self.dim_head
        weight = self.qkv.weight.astype(x.dtype).reshape(3, heads, dim_head, x.shape[-1])
        qkv = jnp.einsum("nc,thdc->thnd", x, weight)
        if self.qkv.bias is not None:
            qkv = qkv + self.qkv.bias.astype(x.dtype).reshape(3, heads, 1, dim_head)
        qkv = checkpoint_name(qkv, "qkv")  # the names of `__call__`, for a remat policy under `jax.grad`
        attn = self._maps(jnp.einsum("hqd,hkd->hqk", qkv[0] * jnp.asarray(self.scale, x.dtype), qkv[1]))
        out = checkpoint_name(jnp.einsum("hqk,hkd->hqd", attn, qkv[2]), "attn_out")
        proj = self.proj.weight.astype(x.dtype).reshape(-1, heads, dim_head)
        y = jnp.einsum("hqd,chd->qc", out, proj)
        if self.proj.bias is not None:
            y = y + self.proj.bias.astype(x.dtype)[None, :]
        return checkpoint_name(y, "attn_proj")

    def __call__(
        self, x: Float[Array, "tokens dim"], *, key: PRNGKeyArray | None = None, inference: bool | None = None
    ) -> Float[Array, "tokens dim"]:
        attn_key, proj_key = split_optional(key, 2)
        dropout_off = self.attn_drop.inference if inference is None else inference
        plain = type(self.qkv) is Linear and type(self.proj) is Linear
        if dropout_off and plain and x.shape[0] >= HEADS_MAJOR_MIN_TOKENS:
            return self.proj_drop(self._heads_major(x), key=proj_key, inference=inference)
        attn, v = self.attention_weights(x)
        attn = self.attn_drop(attn, key=attn_key, inference=inference)
        out = jnp.einsum("hqk,khd->qhd", attn, v).reshape(x.shape[0], self.heads * self.dim_head)
        out = checkpoint_name(out, "attn_out")
        out = checkpoint_name(self.proj(out), "attn_proj")
        return self.proj_drop(out, key=proj_key, inference=inference)


class ClassAttention(eqx.Module):
    """Class attention (CaiT §3.2): only the class token queries; keys and values come from all tokens.

    Input `u = concat(class_token, patches)`; output is the update for the class token alone.
    """

    q: Linear
    k: Linear
    v: Linear
    proj: Linear
    attn_drop: eqx.nn.Dropout
    proj_drop: eqx.nn.Dropout
    heads: int = eqx.field(static=True)
    dim_head: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        q_key, k_key, v_key, proj_key = jr.split(key, 4)
        inner = heads * dim_head
        self.q = Linear(dim, inner, use_bias=qkv_bias, dtype=dtype, key=q_key)
        self.k = Linear(dim, inner, use_bias=qkv_bias, dtype=dtype, key=k_key)
        self.v = Linear(dim, inner, use_bias=qkv_bias, dtype=dtype, key=v_key)
        self.proj = Linear(inner, dim, dtype=dtype, key=proj_key)
        self.attn_drop = eqx.nn.Dropout(attn_dropout)
        self.proj_drop = eqx.nn.Dropout(dropout)
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5

    def attention_weights(self, u: Float[Array, "tokens dim"]) -> Float[Array, "heads tokens"]:
        """How much the class token attends to each token (class token first), per head; rows sum to 1."""
        n = u.shape[0]
        q = self.q(u[0]).reshape(self.heads, self.dim_head) * jnp.asarray(self.scale, u.dtype)
        k = self.k(u).reshape(n, self.heads, self.dim_head)
        logits = jnp.einsum("hd,khd->hk", q, k)
        return _softmax32(logits)

    def __call__(
        self, u: Float[Array, "tokens dim"], *, key: PRNGKeyArray | None = None, inference: bool | None = None
    ) -> Float[Array, " dim"]:
        attn_key, proj_key = split_optional(key, 2)
        n = u.shape[0]
        attn = self.attention_weights(u)
        attn = self.attn_drop(attn, key=attn_key, inference=inference)
        v = self.v(u).reshape(n, self.heads, self.dim_head)
        out = jnp.einsum("hk,khd->hd", attn, v).reshape(self.heads * self.dim_head)
        return self.proj_drop(self.proj(out), key=proj_key, inference=inference)
