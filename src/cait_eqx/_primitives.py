"""The small layers CaiT is made of: Linear (and LoRALinear, a Linear with a low-rank update), LayerNorm,
PatchEmbed (and its PatchProjection), LayerScale and DropPath.

Every layer here acts on the tokens of *one* image (Equinox's convention); batches go through `jax.vmap`.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._misc import check_rate, expand_to, trunc_normal

__all__ = [
    "DropPath", "LayerNorm", "LayerScale", "Linear", "LoRAError", "LoRALinear", "PatchEmbed",
    "PatchProjection", "linear_of",
]


class Linear(eqx.Module):
    """An affine map `x @ weight.T + bias` over the last axis of a token array.

    The weight is stored `(out_features, in_features)` like `torch.nn.Linear`, so timm weights map by name
    and need no transpose. Initialised as in CaiT: truncated normal (std 0.02) weight, zero bias.
    """

    weight: Float[Array, "out_features in_features"]
    bias: Float[Array, " out_features"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        use_bias: bool = True,
        std: float = 0.02,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`, `out_features`: sizes of the input and output feature axes.
        - `use_bias`: whether to add a bias (initialised to zero).
        - `std`: standard deviation of the truncated-normal weight initialisation.
        - `dtype`: parameter dtype (default float32).
        - `key`: a `jax.random.key` for the weight. (Keyword only argument.)
        """
        dtype = jnp.float32 if dtype is None else dtype
        self.weight = trunc_normal(key, (out_features, in_features), std, dtype)
        self.bias = jnp.zeros((out_features,), dtype) if use_bias else None
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, x: Float[Array, "*tokens in_features"]) -> Float[Array, "*tokens out_features"]:
        y = jnp.matmul(x, self.weight.astype(x.dtype).T)
        if self.bias is not None:
            y = y + expand_to(self.bias.astype(x.dtype), y.ndim)
        return y


class LoRAError(ValueError):
    """LoRA adapters asked for what cannot be: a target that names no layer, a rank that does not fit,
    adapters with a frozen backbone, a merge of a model without adapters, adapters for another
    architecture."""


class LoRALinear(Linear):
    """A `Linear` with a low-rank update (LoRA, Hu et al. 2021): `x @ (weight + (alpha / rank) B A).T + bias`.

    `weight` and `bias` are the base layer's, under the same names (so a model's key paths, its weight
    conversion and its sharding rule see the base layer where it was); `lora_a` `(rank, in_features)` and
    `lora_b` `(out_features, rank)` are the adapter. `B` starts at zero, so at first the layer computes
    exactly what the base layer computes. Training differentiates `lora_a` and `lora_b` only
    (`cait_eqx.training.trainable_params`). `merged()` folds the update into a plain `Linear`.

    ??? cite

        ```bibtex
        @inproceedings{hu2022lora,
          title     = {LoRA: Low-Rank Adaptation of Large Language Models},
          author    = {Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li,
                       Yuanzhi and Wang, Shean and Wang, Lu and Chen, Weizhu},
          booktitle = {International Conference on Learning Representations},
          year      = {2022}
        }
        ```
    """

    lora_a: Float[Array, "rank in_features"]
    lora_b: Float[Array, "out_features rank"]
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(self, base: Linear, rank: int, alpha: float, *, key: PRNGKeyArray):
        """**Arguments:**

        - `base`: the `Linear` to adapt (kept as it is).
        - `rank`: the rank of the update, `1 <= rank <= min(in_features, out_features)`.
        - `alpha`: the update is scaled by `alpha / rank`.
        - `key`: a `jax.random.key` for `A` (uniform in ±1/sqrt(in_features), as PEFT's Kaiming-uniform
            default; `B` is zero). (Keyword only argument.)
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(
            base.in_features, base.out_features
        ):
            raise LoRAError(
                f"A LoRA rank must be an int in 1..{min(base.in_features, base.out_features)} for a "
                f"{base.in_features} -> {base.out_features} Linear (at most its narrower width), got "
                f"{rank!r}."
            )
        self.weight = base.weight
        self.bias = base.bias
        self.in_features = base.in_features
        self.out_features = base.out_features
        limit = 1 / math.sqrt(base.in_features)
        dtype = base.weight.dtype
        self.lora_a = jr.uniform(key, (rank, base.in_features), jnp.float32, -limit, limit).astype(dtype)
        self.lora_b = jnp.zeros((base.out_features, rank), dtype)
        self.rank = rank
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        """`alpha / rank`, the factor of the low-rank update."""
        return self.alpha / self.rank

    def __call__(self, x: Float[Array, "*tokens in_features"]) -> Float[Array, "*tokens out_features"]:
        # The base product as `Linear` computes it, plus the update through the rank-r bottleneck: with B = 0
        # the sum adds exact zeros, so the adapted layer starts as the base layer, bit for bit.
        low = jnp.matmul(jnp.matmul(x, self.lora_a.astype(x.dtype).T), self.lora_b.astype(x.dtype).T)
        return super().__call__(x) + low * jnp.asarray(self.scale, x.dtype)

    def merged(self) -> Linear:
        """The plain `Linear` of the same map: `weight + (alpha / rank) B A` (computed in float32, stored in
        the weight's dtype). Works on a layer stacked along leading axes too (the self-attention blocks)."""
        f32 = jnp.float32
        delta = jnp.einsum("...or,...ri->...oi", self.lora_b.astype(f32), self.lora_a.astype(f32))
        weight = (self.weight.astype(f32) + delta * f32(self.scale)).astype(self.weight.dtype)
        return linear_of(weight, self.bias, self.in_features, self.out_features)


def linear_of(weight: Array, bias: Array | None, in_features: int, out_features: int) -> Linear:
    """A `Linear` holding these arrays (stacked along leading axes or not), without drawing an initialisation:
    the structure comes from `eqx.filter_eval_shape`, the arrays are put in its places."""
    abstract_key = jax.eval_shape(jr.key, 0)  # a key's shape and dtype: nothing is drawn
    skeleton = eqx.filter_eval_shape(
        Linear, in_features, out_features, use_bias=bias is not None, dtype=weight.dtype, key=abstract_key
    )
    if bias is None:
        return eqx.tree_at(lambda m: m.weight, skeleton, weight)
    return eqx.tree_at(lambda m: (m.weight, m.bias), skeleton, (weight, bias))


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis with learnable scale and shift (eps 1e-6, as in CaiT).

    Statistics are computed in float32 whatever the activation dtype, then cast back.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None):
        dtype = jnp.float32 if dtype is None else dtype
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "*tokens dim"]) -> Float[Array, "*tokens dim"]:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = (
            y * expand_to(self.weight.astype(jnp.float32), y.ndim)
            + expand_to(self.bias.astype(jnp.float32), y.ndim)
        )
        return y.astype(x.dtype)


class PatchProjection(eqx.Module):
    """The patch embedding's map: one flattened `(channels, patch, patch)` patch → one `dim` token, affine.

    It is what timm's `patch_embed.proj` computes (a convolution whose kernel and stride are both the patch
    size never overlaps two patches, so it is this map applied to each patch), held as the map it is. The
    weight keeps the convolution kernel's layout `(dim, channels, patch, patch)`, so timm's weights convert
    by name without a reshape; the bias is `(dim,)`. Initialised as PyTorch (and Equinox) initialise that
    convolution: uniform in ±1/sqrt(channels·patch²).
    """

    weight: Float[Array, "dim channels patch_height patch_width"]
    bias: Float[Array, " dim"]

    def __init__(self, channels: int, patch_size: int, dim: int, dtype=None, *, key: PRNGKeyArray):
        """**Arguments:**

        - `channels`, `patch_size`: the patches' channels and side.
        - `dim`: the token width.
        - `dtype`: parameter dtype (default float32).
        - `key`: a `jax.random.key`. (Keyword only argument.)
        """
        dtype = jnp.float32 if dtype is None else dtype
        wkey, bkey = jr.split(key)  # the draws of `eqx.nn.Conv2d`, which this layer used to be stored as
        limit = 1 / math.sqrt(channels * patch_size * patch_size)
        self.weight = jr.uniform(wkey, (dim, channels, patch_size, patch_size), dtype, -limit, limit)
        self.bias = jr.uniform(bkey, (dim,), dtype, -limit, limit)

    def __call__(self, patches: Float[Array, "patches features"]) -> Float[Array, "patches dim"]:
        """Embed flattened patches, each laid out `(channels, row, column)` like the weight's last axes."""
        weight = self.weight.reshape(self.weight.shape[0], -1).astype(patches.dtype)
        return patches @ weight.T + self.bias.reshape(1, -1).astype(patches.dtype)


class PatchEmbed(eqx.Module):
    """Cuts an image into non-overlapping `patch_size` patches and embeds each with one affine map (`proj`).

    The same function as timm's convolution with kernel = stride = patch size, computed as one matrix
    product over the flattened patches.
    """

    proj: PatchProjection
    image_size: tuple[int, int] = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(
        self,
        image_size: tuple[int, int],
        patch_size: int,
        channels: int,
        dim: int,
        dtype=None,
        *,
        key: PRNGKeyArray,
    ):
        self.proj = PatchProjection(channels, patch_size, dim, dtype, key=key)
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid `(rows, columns)`."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, "patches dim"]:
        channels, height, width = x.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        # (C, rows, p, cols, p) -> (rows, cols, C, p, p): each patch flattened in the weight's order.
        patches = x.reshape(channels, rows, p, cols, p).transpose(1, 3, 0, 2, 4).reshape(rows * cols, -1)
        return self.proj(patches)


class LayerScale(eqx.Module):
    """Per-channel learnable scaling of a residual branch: `gamma * x` (CaiT §3).

    `gamma` starts at a small `init_values` so every block begins close to the identity.
    """

    gamma: Float[Array, " dim"]

    def __init__(self, dim: int, init_values: float, dtype=None):
        dtype = jnp.float32 if dtype is None else dtype
        self.gamma = jnp.full((dim,), init_values, dtype)

    def __call__(self, x: Float[Array, "*tokens dim"]) -> Float[Array, "*tokens dim"]:
        return x * expand_to(self.gamma.astype(x.dtype), x.ndim)


class DropPath(eqx.Module):
    """Stochastic depth for one sample: drops the whole residual branch with probability `p`.

    In training the branch is zeroed with probability `p` and otherwise scaled by `1 / (1 - p)`; one
    Bernoulli draw per call. With `p == 0` or in inference mode it is the identity. Because the model acts on
    one example, `jax.vmap` over a batch gives the usual per-sample DropPath.
    """

    p: float
    inference: bool

    def __init__(self, p: float = 0.0, inference: bool = False):
        check_rate("p", p)
        self.p = p
        self.inference = inference

    def __call__(
        self, x: Float[Array, "*shape"], *, key: PRNGKeyArray | None = None, inference: bool | None = None
    ) -> Float[Array, "*shape"]:
        if inference is None:
            inference = self.inference
        if self.p == 0 or inference:
            return x
        if key is None:
            raise RuntimeError(
                "DropPath needs a `key` in training mode: pass `key=...`, or switch to inference with "
                "`eqx.nn.inference_mode(model)` (or `inference=True`)."
            )
        keep = 1.0 - self.p
        survive = jr.bernoulli(key, keep)
        return jnp.where(survive, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
