"""The CaiT model: patch embedding → self-attention stage → class-attention stage → head."""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, TypeCheckError

from ._blocks import ClassAttentionBlock, LayerScaleBlock
from ._layers import SAVED_FOR_BACKWARD, DropPath, LayerNorm, Linear, PatchEmbed, default_init_values
from ._misc import check_positive_int, check_rate, trunc_normal

__all__ = ["CaiT", "CaiTConfig", "with_compute_dtype"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
# The dtypes a model may compute in (activations and the products with weights); see `with_compute_dtype`.
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CaiTConfig:
    """Every hyper-parameter that fixes a CaiT's structure, resolved (no `None` left but `dtype`).

    Two models with equal configs have parameter PyTrees of identical structure and shapes. The config is
    what `cait_eqx.save` writes next to the weights and what `CaiT(**config.kwargs())` rebuilds.
    """

    image_size: tuple[int, int]
    patch_size: int
    num_classes: int
    dim: int
    depth: int
    cls_depth: int
    heads: int
    mlp_dim: int
    dim_head: int
    channels: int = 3
    dropout: float = 0.0
    emb_dropout: float = 0.0
    attn_dropout: float = 0.0
    layer_dropout: float = 0.0
    init_values: float = 1e-5
    talking_heads: bool = True
    qkv_bias: bool = True
    cls_mlp_dim: int = 0
    dtype: str = "float32"

    def kwargs(self) -> dict[str, Any]:
        """The constructor keywords that rebuild a model of this configuration (all but `key`)."""
        out = dataclasses.asdict(self)
        out["image_size"] = tuple(self.image_size)
        return out

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)} (a floating dtype), got {dtype!r}.")
    return name


def _compute_dtype_name(compute_dtype: Any, param_dtype: str) -> str:
    """The name of the dtype a model computes in: `compute_dtype`, or the parameter dtype when it is None."""
    if compute_dtype is None:
        return param_dtype
    try:
        name = jnp.dtype(compute_dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in _COMPUTE_DTYPES:
        raise ValueError(
            f"`compute_dtype` must be one of {', '.join(_COMPUTE_DTYPES)} (e.g. `jnp.bfloat16` or "
            f"\"bfloat16\"), or None to compute in the parameter dtype; got {compute_dtype!r}."
        )
    return name


def _image_size_pair(image_size) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise ValueError(f"`image_size` must be an int or a (height, width) pair, got {image_size!r}.")
    if isinstance(image_size, int):
        pair = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        pair = tuple(image_size)
    else:
        raise ValueError(f"`image_size` must be an int or a (height, width) pair, got {image_size!r}.")
    for side in pair:
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ValueError(f"`image_size` sides must be positive ints, got {image_size!r}.")
    return pair  # type: ignore[return-value]


# Hyper-parameters are validated by hand (a ValueError naming the argument and the fix), so the runtime
# type checker is told to leave these two signatures alone: `dropout=0` (an int) is fine, `dim=32.0` is a
# ValueError, not a beartype violation.
@typing.no_type_check
def resolve_config(
    *,
    image_size,
    patch_size: int,
    num_classes: int,
    dim: int,
    depth: int,
    cls_depth: int,
    heads: int,
    mlp_dim: int,
    dim_head: int | None = None,
    channels: int = 3,
    dropout: float = 0.0,
    emb_dropout: float = 0.0,
    attn_dropout: float = 0.0,
    layer_dropout: float = 0.0,
    init_values: float | None = None,
    talking_heads: bool = True,
    qkv_bias: bool = True,
    cls_mlp_dim: int | None = None,
    dtype=None,
) -> CaiTConfig:
    """Check every hyper-parameter and fill in the defaults; raises `ValueError` naming the fix."""
    size = _image_size_pair(image_size)
    check_positive_int("patch_size", patch_size)
    for side, name in zip(size, ("height", "width")):
        if side % patch_size:
            raise ValueError(
                f"`image_size` {size} is not divisible by `patch_size` {patch_size} ({name} {side} % "
                f"{patch_size} = {side % patch_size}). Choose an image size that is a multiple of the patch size "
                f"(e.g. {side - side % patch_size or patch_size}) or another patch size."
            )
    check_positive_int("num_classes", num_classes, minimum=0)
    check_positive_int("dim", dim)
    check_positive_int("depth", depth)
    check_positive_int("cls_depth", cls_depth, minimum=0)
    check_positive_int("heads", heads)
    check_positive_int("mlp_dim", mlp_dim)
    check_positive_int("channels", channels)
    if dim_head is None:
        if dim % heads:
            raise ValueError(
                f"`dim` ({dim}) must be divisible by `heads` ({heads}) when `dim_head` is not given. "
                f"Pick `heads` among the divisors of {dim}, or pass `dim_head` explicitly."
            )
        dim_head = dim // heads
    else:
        check_positive_int("dim_head", dim_head)
    if cls_mlp_dim is None:
        cls_mlp_dim = mlp_dim
    check_positive_int("cls_mlp_dim", cls_mlp_dim)
    for name, rate in (
        ("dropout", dropout),
        ("emb_dropout", emb_dropout),
        ("attn_dropout", attn_dropout),
        ("layer_dropout", layer_dropout),
    ):
        check_rate(name, rate)
    if init_values is None:
        init_values = default_init_values(depth)
    if (
        isinstance(init_values, bool)
        or not isinstance(init_values, (int, float))
        or not 0 < init_values < float("inf")
    ):
        raise ValueError(
            f"`init_values` (the LayerScale initialisation) must be a positive, finite float, got {init_values!r}. "
            f"Leave it as None for the paper's rule (0.1 / 1e-5 / 1e-6 by depth)."
        )
    for name, flag in (("talking_heads", talking_heads), ("qkv_bias", qkv_bias)):
        if not isinstance(flag, bool):
            raise ValueError(f"`{name}` must be a bool, got {flag!r}.")
    return CaiTConfig(
        image_size=size,
        patch_size=patch_size,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        cls_depth=cls_depth,
        heads=heads,
        mlp_dim=mlp_dim,
        dim_head=dim_head,
        channels=channels,
        dropout=float(dropout),
        emb_dropout=float(emb_dropout),
        attn_dropout=float(attn_dropout),
        layer_dropout=float(layer_dropout),
        init_values=float(init_values),
        talking_heads=talking_heads,
        qkv_bias=qkv_bias,
        cls_mlp_dim=cls_mlp_dim,
        dtype=_dtype_name(dtype),
    )


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

    @typing.no_type_check
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
        dim_head: int | None = None,
        channels: int = 3,
        attn_dropout: float = 0.0,
        init_values: float | None = None,
        talking_heads: bool = True,
        qkv_bias: bool = True,
        cls_mlp_dim: int | None = None,
        dtype=None,
        compute_dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `image_size`: input height and width, an int for square images or a `(height, width)` pair.
        - `patch_size`: side of the square patches; must divide both image sides.
        - `num_classes`: size of the classifier output; `0` for no head (the call returns features).
        - `dim`: token embedding width.
        - `depth`: number of self-attention (SA) blocks over the patches.
        - `cls_depth`: number of class-attention (CA) blocks (2 in every paper model). With `0` the class
            token is instead prepended to the patches at the input of the SA stage, as in ViT/DeiT.
        - `heads`: number of attention heads.
        - `mlp_dim`: hidden width of the SA blocks' MLPs (the paper uses `4 * dim`).
        - `dropout`: dropout after the attention projection and inside the MLPs of the SA blocks.
        - `emb_dropout`: dropout on the patch tokens after adding the positional embedding.
        - `layer_dropout`: stochastic-depth rate, the same in every SA block, per sample (none in CA blocks).
        - `dim_head`: width of each head; defaults to `dim // heads`.
        - `channels`: input channels.
        - `attn_dropout`: dropout on the attention weights of the SA blocks.
        - `init_values`: LayerScale initialisation; defaults to the paper's rule, 0.1 up to depth 18,
            1e-5 up to 24 and 1e-6 deeper.
        - `talking_heads`: mix attention heads before and after the softmax in the SA blocks.
        - `qkv_bias`: add biases to the query/key/value projections.
        - `cls_mlp_dim`: hidden width of the CA blocks' MLPs; defaults to `mlp_dim`.
        - `dtype`: parameter dtype, float32 by default.
        - `compute_dtype`: the dtype the self-attention blocks compute in (their activations and products
            with weights: about 98 % of the work). `None` (default) computes in the parameter dtype.
            `jnp.bfloat16` (or `jnp.float16`) with float32 parameters is mixed precision for accelerators:
            the weights stay float32 in the model (so gradients and optimiser state are float32) and are
            cast where they are used; LayerNorm statistics and softmaxes are computed in float32; the patch
            embedding, the class-attention blocks and the head run in the parameter dtype, and the outputs
            come back in it. Not part of `config` (it does not change the weights); switch it on any model
            with `cait_eqx.with_compute_dtype`.
        - `key`: a `jax.random.key` for the initialisation. (Keyword only argument.)
        """
        cfg = resolve_config(
            image_size=image_size,
            patch_size=patch_size,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            cls_depth=cls_depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dim_head=dim_head,
            channels=channels,
            dropout=dropout,
            emb_dropout=emb_dropout,
            attn_dropout=attn_dropout,
            layer_dropout=layer_dropout,
            init_values=init_values,
            talking_heads=talking_heads,
            qkv_bias=qkv_bias,
            cls_mlp_dim=cls_mlp_dim,
            dtype=dtype,
        )
        dtype = _DTYPES[cfg.dtype]
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
        self.compute_dtype = _compute_dtype_name(compute_dtype, cfg.dtype)

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
        return _DTYPES[self.config.dtype]

    @property
    def _precise_dtype(self):
        """The dtype of the patch embedding, the class-attention stage and the head: the wider of the
        parameter and compute dtypes (see `_tokens`)."""
        param, compute = jnp.dtype(_DTYPES[self.config.dtype]), jnp.dtype(_DTYPES[self.compute_dtype])
        return compute if compute.itemsize > param.itemsize else param

    def _embed(self, x: Array, key, inference) -> Array:
        self._check_image(x)
        # The layers compute in the dtype of their input (they cast their weights to it), so the dtype of the
        # tokens decides. The patch embedding stays precise: the image's rounding to bfloat16 alone moved a
        # trained model's logits by 1 % (tests/test_mixed_precision.py), for 1 % of the work.
        x = x.astype(self._precise_dtype)
        tokens = self.patch_embed(x) + self.pos_embed.astype(x.dtype)
        tokens = self.pos_drop(tokens, key=key, inference=inference)
        return tokens.astype(_DTYPES[self.compute_dtype])

    def _self_attention_stage(self, tokens: Array, block_keys, inference) -> Array:
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def step(x, xs):
            block_params, block_key = xs
            block = eqx.combine(block_params, static)
            return block(x, key=block_key, inference=inference), None

        # Under differentiation keep only the blocks' weight-product outputs and recompute the rest in the
        # backward pass (see `SAVED_FOR_BACKWARD`); no effect on a forward-only call. `prevent_cse=False` is
        # safe inside `scan` and leaves XLA free to fuse.
        policy = jax.checkpoint_policies.save_only_these_names(*SAVED_FOR_BACKWARD)
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
        tokens, _ = jax.lax.scan(step, tokens, (params, block_keys))
        return tokens

    def _tokens(self, x: Array, key, inference) -> tuple[Array, Array]:
        """Run up to the class-attention stage: `(patch tokens after the SA stage, initial class token)`.

        The SA stage, nearly all the work (98 % of the products of `cait_xxs24_224`), runs in the compute
        dtype; what follows runs in `_precise_dtype`: the class token's attention over all the patches is
        where bfloat16 lost the most accuracy (tests/test_mixed_precision.py), for 1 % of the work.
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
    slower. bfloat16 logits agree with float32 ones to within 1e-2 of the largest logit (the tests check
    fresh, trained and `cait_xxs24_224`-sized models).

    **Arguments:**

    - `model`: a `CaiT`.
    - `dtype`: `jnp.bfloat16`, `jnp.float16` or `jnp.float32` (or their names), or `None` for the parameter
        dtype.

    **Returns:** the `CaiT`, with `compute_dtype` set.
    """
    if not isinstance(model, CaiT):
        raise TypeError(f"`with_compute_dtype` takes a `CaiT`, got {type(model).__name__}.")
    name = _compute_dtype_name(dtype, model.config.dtype)
    # `compute_dtype` is a static field, which `eqx.tree_at` cannot replace: set it on a shallow copy.
    new = copy.copy(model)
    object.__setattr__(new, "compute_dtype", name)
    return new
