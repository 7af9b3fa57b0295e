"""`CaiTConfig`: every hyper-parameter of a CaiT once, with its default, its check and its help.

The constructor's validation (`CaiT(...)` builds a `CaiTConfig`), the metadata `cait_eqx.save` writes, and
the `cait-eqx train` model flags all derive from the fields below. Pure Python (NumPy for dtype names):
importing it costs nothing, so the command line can build its flags from it instantly.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any

from ._spec import Check, OneOf, Real, Whole, boolean, hyper, specs, validate

__all__ = [
    "COMPUTE_DTYPES",
    "DTYPES",
    "REMAT_POLICIES",
    "CaiTConfig",
    "check_compute_dtype",
    "default_init_values",
    "dtype_name",
    "image_size_pair",
]

# The parameter dtypes a model may have, by name.
DTYPES = ("float32", "bfloat16", "float16", "float64")
# The dtypes a model may compute in (activations and the products with weights); see `with_compute_dtype`.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# What the self-attention stage keeps for the backward pass (see `CaiT`'s `remat` and benchmarks/README.md).
REMAT_POLICIES = ("none", "weight_products", "dots", "full")


def default_init_values(depth: int) -> float:
    """The paper's LayerScale initialisation ε, chosen once for the whole network by its SA depth.

    ε = 0.1 up to depth 18, 1e-5 up to depth 24, 1e-6 beyond (Touvron et al. 2021, §3.1).
    """
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


def image_size_pair(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    """An int (square) or a `(height, width)` pair of positive ints → `(height, width)`."""
    if isinstance(image_size, bool):
        raise ValueError(f"`{name}` must be an int or a (height, width) pair, got {image_size!r}.")
    if isinstance(image_size, numbers.Integral):  # an int or a NumPy integer
        pair: tuple = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        pair = tuple(image_size)
    else:
        raise ValueError(f"`{name}` must be an int or a (height, width) pair, got {image_size!r}.")
    for side in pair:
        if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 1:
            raise ValueError(f"`{name}` sides must be positive ints, got {image_size!r}.")
    return int(pair[0]), int(pair[1])


def dtype_name(dtype: Any, allowed: tuple[str, ...] = DTYPES, what: str = "dtype") -> str:
    """The name of a floating dtype given as a name, a NumPy/JAX dtype or scalar type; `None` → float32."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, str):
        name: str | None = dtype
    else:
        import numpy as np

        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            name = None
    if name not in allowed:
        raise ValueError(f"`{what}` must be one of {sorted(allowed)} (a floating dtype), got {dtype!r}.")
    return name


def check_compute_dtype(compute_dtype: Any, param_dtype: str) -> str:
    """The name of the dtype a model computes in: `compute_dtype`, or the parameter dtype when it is None."""
    if compute_dtype is None:
        return param_dtype
    try:
        return dtype_name(compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    except ValueError:
        raise ValueError(
            f"`compute_dtype` must be one of {', '.join(COMPUTE_DTYPES)} (e.g. `jnp.bfloat16` or "
            f"\"bfloat16\"), or None to compute in the parameter dtype; got {compute_dtype!r}."
        ) from None


class _ImageSize(Check):
    """`image_size`: an int or a (height, width) pair; on the command line `S` or `HxW`."""

    kind = str

    def check(self, value: Any) -> tuple[int, int]:
        try:
            return image_size_pair(value)
        except ValueError as error:
            # `validate` puts the name in front: keep the message after it.
            raise ValueError(str(error).split("` ", 1)[1].rstrip(".")) from None

    def parse(self, text: str) -> tuple[int, int]:
        parts = text.lower().split("x")
        try:
            sides = [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"expected S or HxW (e.g. 16 or 16x24), got {text!r}") from None
        if len(sides) not in (1, 2):
            raise ValueError(f"expected S or HxW (e.g. 16 or 16x24), got {text!r}")
        return self.check(sides[0] if len(sides) == 1 else tuple(sides))


class _Dtype(Check):
    kind = str

    def check(self, value: Any) -> str:
        try:
            return dtype_name(value)
        except ValueError as error:
            raise ValueError(str(error).split("` ", 1)[1].rstrip(".")) from None


class _InitValues(Check):
    kind = float
    optional = True

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(
                f"(the LayerScale initialisation) must be a positive, finite float, got {value!r}. Leave it "
                f"as None for the paper's rule (0.1 / 1e-5 / 1e-6 by depth)"
            )
        return float(value)


_RATE = Real(0.0, 1.0, high_open=True)


# Hyper-parameters are validated by `validate` (a ValueError naming the argument and the fix), so the runtime
# type checker is told to leave the dataclass alone: `dropout=0` (an int) is fine, `dim=32.0` is a
# ValueError, not a beartype violation.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class CaiTConfig:
    """Every hyper-parameter that fixes a CaiT's structure, resolved on construction (no `None` is left).

    Two models with equal configs have parameter PyTrees of identical structure and shapes. The config is
    what `cait_eqx.save` writes next to the weights and what `CaiT(**config.kwargs())` rebuilds. Built with
    `None` for `dim_head`, `init_values`, `cls_mlp_dim` or `dtype`, it fills in their defaults; bad values
    raise `ValueError` naming the argument and the fix.
    """

    image_size: tuple[int, int] = hyper(
        help="input height and width: an int for square images or a (height, width) pair",
        check=_ImageSize(),
        metavar="S",
    )
    patch_size: int = hyper(help="side of the square patches; must divide both image sides", check=Whole(),
                            metavar="P")
    num_classes: int = hyper(
        help="size of the classifier output; 0 for no head (the call returns features)",
        check=Whole(0),
        cli=False,  # `cait-eqx train` takes it from the data
    )
    dim: int = hyper(help="token embedding width", check=Whole(), metavar="D")
    depth: int = hyper(
        help="number of self-attention (SA) blocks over the patches", check=Whole(), metavar="N"
    )
    cls_depth: int = hyper(
        help="number of class-attention (CA) blocks (2 in every paper model); with 0 the class token is "
        "prepended to the patches at the input of the SA stage instead, as in ViT/DeiT",
        check=Whole(0),
        metavar="N",
    )
    heads: int = hyper(help="number of attention heads", check=Whole(), metavar="H")
    mlp_dim: int = hyper(help="hidden width of the SA blocks' MLPs (the paper uses 4 * dim)", check=Whole(),
                         metavar="M")
    dim_head: int | None = hyper(
        None, help="width of each head; default dim // heads", check=Whole(optional=True), metavar="W"
    )
    channels: int = hyper(3, help="input channels", check=Whole(), cli=False)  # from the data
    dropout: float = hyper(
        0.0, help="dropout after the attention projection and inside the MLPs of the SA blocks", check=_RATE,
        metavar="P",
    )
    emb_dropout: float = hyper(
        0.0, help="dropout on the patch tokens after adding the positional embedding", check=_RATE,
        metavar="P",
    )
    attn_dropout: float = hyper(0.0, help="dropout on the attention weights of the SA blocks", check=_RATE,
                                metavar="P")
    layer_dropout: float = hyper(
        0.0, help="stochastic-depth rate, the same in every SA block, per sample (none in CA blocks)",
        check=_RATE, metavar="P",
    )
    init_values: float | None = hyper(
        None,
        help="LayerScale initialisation; default the paper's rule: 0.1 up to depth 18, 1e-5 up to 24, 1e-6 "
        "deeper",
        check=_InitValues(),
        metavar="E",
    )
    talking_heads: bool = hyper(
        True, help="mix attention heads before and after the softmax in the SA blocks", check=boolean
    )
    qkv_bias: bool = hyper(True, help="add biases to the query/key/value projections", check=boolean)
    cls_mlp_dim: int | None = hyper(
        None, help="hidden width of the CA blocks' MLPs; default mlp_dim", check=Whole(optional=True),
        metavar="M",
    )
    dtype: str | None = hyper(
        None, help="parameter dtype: float32 (default), bfloat16, float16 or float64", check=_Dtype(),
        metavar="DTYPE",
    )

    def __post_init__(self):
        validate(self)
        size, patch = self.image_size, self.patch_size
        for side, name in zip(size, ("height", "width"), strict=True):
            if side % patch:
                raise ValueError(
                    f"`image_size` {size} is not divisible by `patch_size` {patch} ({name} {side} % {patch} "
                    f"= {side % patch}). Choose an image size that is a multiple of the patch size (e.g. "
                    f"{side - side % patch or patch}) or another patch size."
                )
        if self.dim_head is None:
            if self.dim % self.heads:
                raise ValueError(
                    f"`dim` ({self.dim}) must be divisible by `heads` ({self.heads}) when `dim_head` is not "
                    f"given. Pick `heads` among the divisors of {self.dim}, or pass `dim_head` explicitly."
                )
            object.__setattr__(self, "dim_head", self.dim // self.heads)
        if self.cls_mlp_dim is None:
            object.__setattr__(self, "cls_mlp_dim", self.mlp_dim)
        if self.init_values is None:
            object.__setattr__(self, "init_values", default_init_values(self.depth))

    def kwargs(self) -> dict[str, Any]:
        """The constructor keywords that rebuild a model of this configuration (all but `key`)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> CaiTConfig:
        """A copy with `changes` applied and checked again."""
        return dataclasses.replace(self, **changes)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid, `(rows, columns)`."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        """The number of patch tokens, `rows * columns`."""
        rows, cols = self.grid_size
        return rows * cols

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's one-line help, by name (what the docs and `cait-eqx train --help` show)."""
        return {name: spec.help for name, spec in specs(cls).items()}


_REMAT = OneOf(REMAT_POLICIES)


def check_remat(policy: Any) -> str:
    """Check a rematerialisation policy name (see `REMAT_POLICIES`)."""
    try:
        return _REMAT(policy)
    except ValueError as error:
        raise ValueError(f"`remat` {error}.") from None
