"""The CaiT model: patch embedding → self-attention stage → class-attention stage → head."""

from __future__ import annotations

import copy
import typing
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, TypeCheckError

from ._blocks import ClassAttentionBlock, LayerScaleBlock
from ._config import CaiTConfig, check_compute_dtype, check_remat
from ._layers import remat_policy
from ._misc import trunc_normal
from ._primitives import DropPath, LayerNorm, Linear, PatchEmbed

__all__ = ["CaiT", "with_compute_dtype", "with_remat"]

# The default of `remat`: see the table in benchmarks/README.md ("Rematerialisation").
DEFAULT_REMAT = "weight_products"

class CaiT(eqx.Module):
    """CaiT, the Class-Attention image Transformer of Touvron et al. (2021).

    Patch embedding and a learned positional embedding feed `depth` self-attention blocks with LayerScale
    and talking heads over the patches; then `cls_depth` class-attention blocks update a class token that
    reads the patches; a LayerNorm and a linear head give the logits. Computes the same function as the
    official code (facebookresearch/deit) and timm's `Cait` on the same weights.

    The call takes **one** channels-first image, as everywhere in Equinox; use `jax.vmap(model)(images)`
    for a batch.

    ??? cite

        ```bibtex
        @inproceedings{touvron2021going,
          title     = {Going deeper with Image Transformers},
          author    = {Touvron, Hugo and Cord, Matthieu and Sablayrolles, Alexandre and
                       Synnaeve, Gabriel and J{\\'e}gou, Herv{\\'e}},
          booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
          pages     = {32--42},
          year      = {2021}
        }
        ```
    """

    patch_embed: PatchEmbed
    pos_embed: Float[Array, "patches dim"]
    cls_token: Float[Array, " dim"]
    pos_drop: eqx.nn.Dropout
    blocks: LayerScaleBlock
    blocks_token_only: tuple[ClassAttentionBlock, ...]
    norm: LayerNorm
    head: Linear | None
    config: CaiTConfig = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True)
    remat: str = eqx.field(static=True)

    # Fields whose array leaves carry a leading depth axis (the SA blocks, stacked and run by `lax.scan`).
    # Sharding reads this (`cait_eqx.parallel.partition_spec`): that axis is never split across devices.
    stacked_fields: ClassVar[tuple[str, ...]] = ("blocks",)

    @typing.no_type_check  # the hyper-parameters are checked by `CaiTConfig`, with errors that name the fix
    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        cls_depth: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        *,
        key: PRNGKeyArray,
        compute_dtype=None,
        remat: str = DEFAULT_REMAT,
        **options: Any,
    ):
        """**Arguments:**

        The first eleven are the seed's positional constructor; every hyper-parameter (these and the
        keyword `options`) is a field of `CaiTConfig`, which documents, defaults and checks it:
        `image_size`, `patch_size`, `num_classes`, `dim`, `depth`, `cls_depth`, `heads`, `mlp_dim`,
        `dropout`, `emb_dropout`, `layer_dropout`; keyword only: `dim_head`, `channels`, `attn_dropout`,
        `init_values`, `talking_heads`, `qkv_bias`, `cls_mlp_dim`, `dtype`.

        - `key`: a `jax.random.key` for the initialisation. (Keyword only argument.)
        - `compute_dtype`: the dtype the self-attention blocks compute in (their activations and products
            with weights: about 98 % of the work). `None` (default) computes in the parameter dtype.
            `jnp.bfloat16` (or `jnp.float16`) with float32 parameters is mixed precision for accelerators:
            the weights stay float32 in the model (so gradients and optimiser state are float32) and are
            cast where they are used; LayerNorm statistics and softmaxes are computed in float32; the patch
            embedding, the class-attention blocks and the head run in the parameter dtype, and the outputs
            come back in it. Not part of `config` (it does not change the weights); switch it on any model
            with `cait_eqx.with_compute_dtype`. (Keyword only argument.)
        - `remat`: what the self-attention stage keeps for the backward pass, one of
            `cait_eqx.REMAT_POLICIES`: `"none"` (keep every intermediate), `"weight_products"` (keep the
            outputs of the products with weights, recompute the rest: the default, the fastest on CPUs),
            `"dots"` (keep every matrix-product output, attention maps included), `"full"` (keep only each
            block's input, recompute the block: the least memory). It changes memory and speed, never the
            numbers. Not part of `config`; switch it on any model with `cait_eqx.with_remat`. (Keyword only
            argument.)
        - `**options`: the keyword-only `CaiTConfig` fields listed above.
        """
        unknown = sorted(set(options) - set(CaiTConfig.field_help()))
        if unknown:
            raise TypeError(
                f"CaiT got unknown keyword argument(s) {unknown}; the hyper-parameters are the fields of "
                f"`CaiTConfig`: {', '.join(CaiTConfig.field_help())}."
            )
        cfg = CaiTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            cls_depth=cls_depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dropout=dropout,
            emb_dropout=emb_dropout,
            layer_dropout=layer_dropout,
            **options,
        )
        dtype = jnp.dtype(cfg.dtype)
        embed_key, pos_key, cls_key, blocks_key, ca_key, head_key = jr.split(key, 6)

        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.channels, cfg.dim, dtype, key=embed_key)
        self.pos_embed = trunc_normal(pos_key, (cfg.num_patches, cfg.dim), 0.02, dtype)
        self.cls_token = trunc_normal(cls_key, (cfg.dim,), 0.02, dtype)
        self.pos_drop = eqx.nn.Dropout(cfg.emb_dropout)

        def make_block(block_key):
            return LayerScaleBlock(
                cfg.dim,
                cfg.heads,
                cfg.dim_head,
                cfg.mlp_dim,
                cfg.init_values,
                qkv_bias=cfg.qkv_bias,
                talking_heads=cfg.talking_heads,
                dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout,
                layer_dropout=cfg.layer_dropout,
                dtype=dtype,
                key=block_key,
            )

        # One stacked block with a leading depth axis, run by `lax.scan`: compile time does not grow with depth.
        self.blocks = eqx.filter_vmap(make_block)(jr.split(blocks_key, cfg.depth))
        self.blocks_token_only = tuple(
            ClassAttentionBlock(
                cfg.dim,
                cfg.heads,
                cfg.dim_head,
                cfg.cls_mlp_dim,
                cfg.init_values,
                qkv_bias=cfg.qkv_bias,
                dtype=dtype,
                key=k,
            )
            for k in jr.split(ca_key, max(cfg.cls_depth, 1))[: cfg.cls_depth]
        )
        self.norm = LayerNorm(cfg.dim, dtype=dtype)
        self.head = Linear(cfg.dim, cfg.num_classes, dtype=dtype, key=head_key) if cfg.num_classes > 0 else None
        self.config = cfg
        self.compute_dtype = check_compute_dtype(compute_dtype, cfg.dtype)
        self.remat = check_remat(remat)

    # ----------------------------------------------------------------------------------------------- checks

    def _check_image(self, x: Array) -> None:
        cfg = self.config
        expected = (cfg.channels, *cfg.image_size)
        if x.ndim == 4 and tuple(x.shape[1:]) == expected:
            raise TypeCheckError(
                f"CaiT got a batch {tuple(x.shape)} for argument `x`, but the call takes one image of shape "
                f"(channels, height, width) = {expected}. Use `jax.vmap(model)(images)` for a batch."
            )
        if tuple(x.shape) != expected:
            raise TypeCheckError(
                f"CaiT expected argument `x` to be one channels-first image of shape (channels, height, width) = "
                f"{expected}, got shape {tuple(x.shape)}. Resize or crop the image to {cfg.image_size} "
                f"(or resample the model with a new `image_size`), and give it {cfg.channels} channels."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeCheckError(
                f"CaiT expected a floating-point image for argument `x`, got dtype {x.dtype}. "
                f"Convert it first, e.g. `x.astype(jnp.float32) / 255`."
            )

    def _stochastic(self, inference: bool | None) -> bool:
        """Whether this call draws random numbers (some dropout active, not in inference)."""
        if inference:
            return False
        for module in jax.tree_util.tree_leaves(
            self, is_leaf=lambda m: isinstance(m, (eqx.nn.Dropout, DropPath))
        ):
            if isinstance(module, (eqx.nn.Dropout, DropPath)):
                mode = module.inference if inference is None else inference
                if module.p > 0 and not mode:
                    return True
        return False

    def _keys(self, key: PRNGKeyArray | None, inference: bool | None) -> tuple[Any, Any]:
        if not self._stochastic(inference):
            return None, None
        if key is None:
            raise RuntimeError(
                "This CaiT has dropout or stochastic depth switched on and is in training mode, so its call "
                "needs a key: `model(x, key=jax.random.key(...))`. For evaluation use "
                "`model = eqx.nn.inference_mode(model)` or pass `inference=True`."
            )
        emb_key, blocks_key = jr.split(key)
        return emb_key, jr.split(blocks_key, self.config.depth)

    # ---------------------------------------------------------------------------------------------- stages

    @property
    def _output_dtype(self):
        """What the public calls return: the parameter dtype (float32 logits for a mixed-precision model)."""
        return jnp.dtype(self.config.dtype)

    @property
    def _precise_dtype(self):
        """The dtype of the patch embedding, the class-attention stage and the head: the wider of the
        parameter and compute dtypes (see `_tokens`)."""
        param, compute = jnp.dtype(jnp.dtype(self.config.dtype)), jnp.dtype(jnp.dtype(self.compute_dtype))
        return compute if compute.itemsize > param.itemsize else param

    def _embed(self, x: Array, key, inference) -> Array:
        self._check_image(x)
        # The layers compute in the dtype of their input (they cast their weights to it), so the dtype of the
        # tokens decides. The patch embedding stays precise: rounding the image to bfloat16 costs accuracy for
        # little of the work (see the training guide, "Mixed precision").
        x = x.astype(self._precise_dtype)
        tokens = self.patch_embed(x) + self.pos_embed.astype(x.dtype)
        tokens = self.pos_drop(tokens, key=key, inference=inference)
        return tokens.astype(jnp.dtype(self.compute_dtype))

    def _self_attention_stage(self, tokens: Array, block_keys, inference) -> Array:
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def step(x, xs):
            block_params, block_key = xs
            block = eqx.combine(block_params, static)
            return block(x, key=block_key, inference=inference), None

        # What the backward pass may keep (see `remat`); no effect on a forward-only call. `prevent_cse=False`
        # is safe inside `scan` and leaves XLA free to fuse.
        policy = remat_policy(self.remat)
        if policy is not None:
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)
        tokens, _ = jax.lax.scan(step, tokens, (params, block_keys))
        return tokens

    def _tokens(self, x: Array, key, inference) -> tuple[Array, Array]:
        """Run up to the class-attention stage: `(patch tokens after the SA stage, initial class token)`.

        The SA stage, nearly all the work, runs in the compute dtype; what follows runs in `_precise_dtype`:
        the class token's attention over all the patches is where bfloat16 loses the most accuracy for little
        of the work (see the training guide, "Mixed precision").
        """
        emb_key, block_keys = self._keys(key, inference)
        tokens = self._embed(x, emb_key, inference)
        precise = self._precise_dtype
        if self.config.cls_depth == 0:
            cls = self.cls_token.astype(tokens.dtype)
            tokens = jnp.concatenate([cls[None], tokens], axis=0)
            tokens = self._self_attention_stage(tokens, block_keys, inference).astype(precise)
            return tokens[1:], tokens[0]
        tokens = self._self_attention_stage(tokens, block_keys, inference)
        return tokens.astype(precise), self.cls_token.astype(precise)

    # ---------------------------------------------------------------------------------------------- public

    def forward_features(
        self,
        x: Float[Array, "channels height width"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, " dim"]:
        """The normalised class-token embedding of one image (the input of the head).

        **Arguments:** as for `__call__`.

        **Returns:** a `(dim,)` array, in the parameter dtype.
        """
        patches, cls = self._tokens(x, key, inference)
        for block in self.blocks_token_only:
            cls = block(patches, cls)
        return self.norm(cls).astype(self._output_dtype)

    def forward_head(self, features: Float[Array, " dim"]) -> Float[Array, " out"]:
        """Apply the classifier to `forward_features`' output (identity when `num_classes == 0`).

        **Returns:** the logits, in the parameter dtype.
        """
        if self.head is None:
            return features.astype(self._output_dtype)
        return self.head(features.astype(self._precise_dtype)).astype(self._output_dtype)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, " out"]:
        """**Arguments:**

        - `x`: one image, channels first, `(channels, height, width)` exactly as configured.
        - `key`: a `jax.random.key`, needed only when some dropout or stochastic depth is active and the
            model is not in inference mode. (Keyword only argument.)
        - `inference`: overrides every dropout's mode for this call; `None` uses the modules' own flags
            (set them all with `eqx.nn.inference_mode`). (Keyword only argument.)

        **Returns:** the logits, `(num_classes,)`; or the features, `(dim,)`, when `num_classes == 0`. In the
        parameter dtype, whatever the compute dtype (float32 logits for a mixed-precision model).
        """
        return self.forward_head(self.forward_features(x, key=key, inference=inference))

    def class_attention(self, x: Float[Array, "channels height width"]) -> Float[Array, "cls_depth heads tokens"]:
        """The class-attention weights of every CA block and head for one image, in inference mode.

        **Returns:** `(cls_depth, heads, 1 + num_patches)`: how much the class token attends to itself (index
        0) and to each patch (indices 1…, row-major over the patch grid). Each row sums to one. In the
        parameter dtype.
        """
        if self.config.cls_depth == 0:
            raise ValueError(
                "This model has no class-attention blocks (`cls_depth=0`), so it has no class-attention maps."
            )
        patches, cls = self._tokens(x, None, True)
        maps = []
        for block in self.blocks_token_only:
            maps.append(block.attention_weights(patches, cls))
            cls = block(patches, cls)
        return jnp.stack(maps).astype(self._output_dtype)

    @property
    def num_params(self) -> int:
        """The number of scalar parameters (every array leaf)."""
        return sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(self, eqx.is_array)))


def with_compute_dtype(model: CaiT, dtype: Any) -> CaiT:
    """A copy of `model` that computes in `dtype`, e.g. bfloat16 with its float32 weights (mixed precision).

    The self-attention blocks, about 98 % of the work, then compute in `dtype`. The weights are shared, not
    cast: they keep their dtype in the PyTree (so a trained or loaded float32 model trains on with float32
    gradients and optimiser state) and are cast where they are used. LayerNorm statistics and softmaxes stay
    float32; the patch embedding, the class-attention blocks and the head run in the parameter dtype, and
    the outputs come back in it. On accelerators bfloat16 is faster and lighter; on CPUs it is usually
    slower. bfloat16 logits agree with float32 ones to within 1e-2 of the largest logit.

    **Arguments:**

    - `model`: a `CaiT`.
    - `dtype`: `jnp.bfloat16`, `jnp.float16` or `jnp.float32` (or their names), or `None` for the parameter
        dtype.

    **Returns:** the `CaiT`, with `compute_dtype` set.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_compute_dtype` takes a `CaiT`, got {type(model).__name__}.")
    return _with_static(model, "compute_dtype", check_compute_dtype(dtype, model.config.dtype))


def _with_static(model: CaiT, field: str, value: str) -> CaiT:
    # Static fields cannot be replaced by `eqx.tree_at`: set it on a shallow copy (the arrays are shared).
    new = copy.copy(model)
    object.__setattr__(new, field, value)
    return new


def with_remat(model: CaiT, policy: str) -> CaiT:
    """A copy of `model` whose self-attention stage keeps `policy`'s intermediates for the backward pass.

    **Arguments:**

    - `model`: a `CaiT`.
    - `policy`: one of `cait_eqx.REMAT_POLICIES` (see `CaiT`'s `remat`): `"none"`, `"weight_products"`,
        `"dots"` or `"full"`.

    **Returns:** the `CaiT`, sharing the weights, with `remat` set. Outputs and gradients are unchanged.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_remat` takes a `CaiT`, got {type(model).__name__}.")
    return _with_static(model, "remat", check_remat(policy))
