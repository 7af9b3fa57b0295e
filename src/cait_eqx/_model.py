"""The CaiT model: patch embedding → self-attention stage → class-attention stage → head."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, TypeCheckError

from ._blocks import ClassAttentionBlock, LayerScaleBlock, run_stacked
from ._config import CaiTConfig, check_compute_dtype, check_remat
from ._inputs import check_image, resample_pos_embed, take_indices
from ._misc import trunc_normal
from ._primitives import DropPath, LayerNorm, Linear, PatchEmbed

__all__ = ["CaiT"]

# The default of `remat`: see the table in benchmarks/README.md ("Rematerialisation").
DEFAULT_REMAT = "weight_products"


class CaiT(eqx.Module):
    """CaiT, the Class-Attention image Transformer of Touvron et al. (2021).

    Patch embedding and a learned positional embedding feed `depth` self-attention blocks with LayerScale
    and talking heads over the patches; then `cls_depth` class-attention blocks update a class token that
    reads the patches; a LayerNorm and a linear head give the logits. Computes the same function as the
    official code (facebookresearch/deit) and timm's `Cait` on the same weights.

    The call takes **one** channels-first image, as everywhere in Equinox; use `jax.vmap(model)(images)`
    for a batch, or `cait_eqx.batched(model)(images)`, the same in cache-sized chunks (faster on a CPU).

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
    blocks: LayerScaleBlock  # inside a step freezing the first blocks, two: `training.trainable_model`
    blocks_token_only: tuple[ClassAttentionBlock, ...]
    norm: LayerNorm
    head: Linear | None
    config: CaiTConfig = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True)
    remat: str = eqx.field(static=True)
    dynamic_img_size: bool = eqx.field(static=True)

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
        dynamic_img_size: bool = False,
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
        - `dynamic_img_size`: if `True`, a call takes any height and width that are multiples of the patch
            size (non-square too) and resamples the positional grid to it (bicubic, as `set_input_size`: the
            same numbers); each new shape compiles once. `False` (default): only `image_size`. Not part of
            `config`; switch it on any model with `cait_eqx.with_dynamic_img_size`. (Keyword only argument.)
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

        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.channels, cfg.dim, dtype,
                                      key=embed_key)
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

        # One stacked block (a leading depth axis) run by `lax.scan`: compile time does not grow with depth.
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
        self.head = (Linear(cfg.dim, cfg.num_classes, dtype=dtype, key=head_key)
                     if cfg.num_classes > 0 else None)
        self.config = cfg
        self.compute_dtype = check_compute_dtype(compute_dtype, cfg.dtype)
        self.remat = check_remat(remat)
        if not isinstance(dynamic_img_size, bool):
            raise TypeError(f"`dynamic_img_size` must be True or False, got {dynamic_img_size!r}.")
        self.dynamic_img_size = dynamic_img_size

    # ----------------------------------------------------------------------------------------------- checks

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
        grid = check_image(self.config, x, dynamic=self.dynamic_img_size)
        pos_embed = resample_pos_embed(self.pos_embed, self.config.grid_size, grid)  # as is on its own grid
        # The layers compute in the dtype of their input (they cast their weights to it), so the dtype of the
        # tokens decides. The patch embedding stays precise: rounding the image to bfloat16 costs accuracy for
        # little of the work (see the training guide, "Mixed precision").
        x = x.astype(self._precise_dtype)
        tokens = self.patch_embed(x) + pos_embed.astype(x.dtype)
        tokens = self.pos_drop(tokens, key=key, inference=inference)
        return tokens.astype(jnp.dtype(self.compute_dtype))

    def _tokens(self, x: Array, key, inference, take=(), stop=None) -> tuple[Array, Array, Array | None]:
        """Run up to the class-attention stage: `(patch tokens after the SA stage, initial class token,
        the taken SA outputs' patch tokens or None)`.

        The SA stage, nearly all the work, runs in the compute dtype; what follows runs in `_precise_dtype`:
        the class token's attention over all the patches is where bfloat16 loses the most accuracy for little
        of the work (see the training guide, "Mixed precision").
        """
        emb_key, block_keys = self._keys(key, inference)
        tokens = self._embed(x, emb_key, inference)
        precise = self._precise_dtype
        prefix = self.config.cls_depth == 0  # no CA stage: the class token goes through the SA blocks
        if prefix:
            tokens = jnp.concatenate([self.cls_token.astype(tokens.dtype)[None], tokens], axis=0)
        tokens, taken = run_stacked(
            self.blocks, tokens, block_keys, inference=inference, remat=self.remat, take=take, stop=stop
        )
        tokens = tokens.astype(precise)
        if prefix:
            return tokens[1:], tokens[0], (None if taken is None else taken[:, 1:])
        return tokens, self.cls_token.astype(precise), taken

    def _class_stage(self, patches: Array, cls: Array) -> Array:
        """The class-attention blocks, then the final norm over every token: `(1 + patches, dim)`."""
        for block in self.blocks_token_only:
            cls = block(patches, cls)
        return self.norm(jnp.concatenate([cls[None], patches], axis=0)).astype(self._output_dtype)

    # ---------------------------------------------------------------------------------------------- public

    def forward_features(
        self,
        x: Float[Array, "channels height width"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, "tokens dim"]:
        """The normalised tokens of one image, class token first, as timm's `forward_features`.

        **Arguments:** as for `__call__`.

        **Returns:** `(1 + patches, dim)`, in the parameter dtype: row 0 is the class token after the
        class-attention stage (the input of the head), rows 1… the patch tokens after the self-attention
        stage, row-major over the patch grid; all through the final LayerNorm.
        """
        patches, cls, _ = self._tokens(x, key, inference)
        return self._class_stage(patches, cls)

    def forward_head(
        self, features: Float[Array, "*tokens dim"], *, pre_logits: bool = False
    ) -> Float[Array, " out"]:
        """The classifier on `forward_features`' output: it reads the class token (row 0).

        **Arguments:**

        - `features`: `forward_features(x)`, `(1 + patches, dim)`.
        - `pre_logits`: return the class embedding the head reads, `(dim,)`, instead of the logits.
            (Keyword only argument.)

        **Returns:** the logits `(num_classes,)` (the class embedding when `pre_logits` or when
        `num_classes == 0`), in the parameter dtype.
        """
        if features.ndim != 2:
            raise TypeCheckError(
                f"`forward_head` takes the tokens of one image, `(1 + patches, dim)` as `forward_features` "
                f"returns them (class token first), got shape {tuple(features.shape)}. For a batch use "
                f"`jax.vmap(model.forward_head)`; for the class embedding alone, `pre_logits=True`."
            )
        cls = features[0]
        if pre_logits or self.head is None:
            return cls.astype(self._output_dtype)
        return self.head(cls.astype(self._precise_dtype)).astype(self._output_dtype)

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Float[Array, " out"]:
        """**Arguments:**

        - `x`: one image, channels first, `(channels, height, width)`: `image_size`, or with
            `dynamic_img_size` any multiple of the patch size.
        - `key`: a `jax.random.key`, needed only when some dropout or stochastic depth is active and the
            model is not in inference mode. (Keyword only argument.)
        - `inference`: overrides every dropout's mode for this call; `None` uses the modules' own flags
            (set them all with `eqx.nn.inference_mode`). (Keyword only argument.)

        **Returns:** the logits, `(num_classes,)`; or the features, `(dim,)`, when `num_classes == 0`. In the
        parameter dtype, whatever the compute dtype (float32 logits for a mixed-precision model).
        """
        return self.forward_head(self.forward_features(x, key=key, inference=inference))

    def forward_intermediates(
        self,
        x: Float[Array, "channels height width"],
        *,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        stop_early: bool = False,
        intermediates_only: bool = False,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> Any:
        """The patch tokens of chosen self-attention blocks, as timm's `forward_intermediates` (same numbers).

        Only the chosen blocks' outputs are kept (one buffer carried through the scan over the blocks).

        **Arguments:**

        - `x`, `key`, `inference`: as for `__call__`.
        - `indices`: `None` for every SA block, an int `n` for the last `n`, or a sequence of block indices
            (negative from the end). Returned in block order.
        - `norm`: pass each map through the final LayerNorm.
        - `output_fmt`: `"NCHW"` for maps `(dim, rows, cols)` over the patch grid, `"NLC"` for tokens
            `(patches, dim)`.
        - `stop_early`: run the SA blocks only up to the last chosen one. As in timm, the final features
            (unless `intermediates_only`) are then computed from that block's output.
        - `intermediates_only`: return only the maps.

        **Returns:** a list of maps, or `(forward_features output, list of maps)`; in the parameter dtype.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"`output_fmt` must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        take = take_indices(self.config.depth, indices)
        patches, cls, taken = self._tokens(x, key, inference, take, take[-1] + 1 if stop_early else None)
        taken = (self.norm(taken) if norm else taken).astype(self._output_dtype)
        if output_fmt == "NCHW":
            rows, cols = x.shape[1] // self.config.patch_size, x.shape[2] // self.config.patch_size
            taken = taken.reshape(len(take), rows, cols, -1).transpose(0, 3, 1, 2)
        maps = list(taken)
        return maps if intermediates_only else (self._class_stage(patches, cls), maps)

    def class_attention(
        self, x: Float[Array, "channels height width"]
    ) -> Float[Array, "cls_depth heads tokens"]:
        """The class-attention weights of every CA block and head for one image, in inference mode.

        **Returns:** `(cls_depth, heads, 1 + num_patches)`: how much the class token attends to itself (index
        0) and to each patch (indices 1…, row-major over the patch grid). Each row sums to one. In the
        parameter dtype.
        """
        if self.config.cls_depth == 0:
            raise ValueError(
                "This model has no class-attention blocks (`cls_depth=0`), so it has no class-attention maps."
            )
        patches, cls, _ = self._tokens(x, None, True)
        maps = []
        for block in self.blocks_token_only:
            maps.append(block.attention_weights(patches, cls))
            cls = block(patches, cls)
        return jnp.stack(maps).astype(self._output_dtype)

    @property
    def num_params(self) -> int:
        """The number of scalar parameters (every array leaf)."""
        return sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(self, eqx.is_array)))
