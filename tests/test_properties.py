"""Property-based tests (hypothesis) over model configurations and inputs.

What would be wrong if these fail: a valid configuration (non-square image, `dim_head` that does not divide
`dim`, no class-attention blocks, heavy dropout, no head, ...) that does not build, or whose forward or
backward pass gives a wrong shape or a non-finite number; an invalid configuration that slips through, or
fails with an `AssertionError`, an XLA error or a message that does not name the argument; an input of the
wrong rank, channels, size or dtype (or a batch given to the per-example call) that is silently reshaped
instead of refused with a `TypeCheckError` about parameter `x`.

Every valid configuration compiles once (forward + backward together), so those examples are few and tiny;
invalid configurations and inputs fail before anything compiles, so they get many examples.
"""

from __future__ import annotations

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from jaxtyping import TypeCheckError

import cait_eqx
from cait_eqx._inputs import check_image

# Reproducible in CI (no example database, the same examples every run); nothing here has a time limit.
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

RATE = st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9])


@st.composite
def valid_configs(draw):
    """A small valid CaiT configuration: every option drawn, images at most 16×16, dim at most 32."""
    patch = draw(st.sampled_from([2, 4]))
    rows, cols = draw(st.integers(1, 16 // patch)), draw(st.integers(1, 16 // patch))
    heads = draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):
        dim_head = None
        dim = heads * draw(st.integers(1, 32 // heads))
    else:
        dim_head = draw(st.integers(1, 8))
        dim = draw(st.integers(1, 32))  # need not be a multiple of `heads`
    image_size = rows * patch if rows == cols and draw(st.booleans()) else (rows * patch, cols * patch)
    return dict(
        image_size=image_size,
        patch_size=patch,
        num_classes=draw(st.integers(0, 5)),
        dim=dim,
        depth=draw(st.integers(1, 3)),
        cls_depth=draw(st.integers(0, 3)),
        heads=heads,
        mlp_dim=draw(st.integers(1, 32)),
        dropout=draw(RATE),
        emb_dropout=draw(RATE),
        layer_dropout=draw(RATE),
        dim_head=dim_head,
        channels=draw(st.integers(1, 4)),
        attn_dropout=draw(RATE),
        init_values=draw(st.one_of(st.none(), st.floats(1e-6, 1.0))),
        talking_heads=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        cls_mlp_dim=draw(st.one_of(st.none(), st.integers(1, 32))),
    )


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


@pytest.mark.slow
@settings(max_examples=8, **SETTINGS)
@given(kwargs=valid_configs(), seed=st.integers(0, 2**16))
def test_any_valid_config_builds_runs_forward_and_backward(kwargs, seed):
    init_key, data_key, drop_key, probe_key = jr.split(jr.key(seed), 4)
    model = cait_eqx.CaiT(**kwargs, key=init_key)
    cfg = model.config
    height, width = cfg.image_size
    size = kwargs["image_size"]
    assert cfg.image_size == ((size, size) if isinstance(size, int) else size)
    assert cfg.num_patches == (height // cfg.patch_size) * (width // cfg.patch_size)
    assert cfg.dim_head == (kwargs["dim_head"] or kwargs["dim"] // kwargs["heads"])
    assert cfg.cls_mlp_dim == (kwargs["cls_mlp_dim"] or kwargs["mlp_dim"])
    assert len(model.blocks_token_only) == kwargs["cls_depth"]
    assert model.blocks.attn.qkv.weight.shape == (kwargs["depth"], 3 * cfg.heads * cfg.dim_head, cfg.dim)
    out_size = cfg.num_classes or cfg.dim

    images = jr.normal(data_key, (2, cfg.channels, height, width))
    probe = jr.normal(probe_key, (out_size,))  # a random read-out: a sum could cancel (LayerNorm outputs do)

    @eqx.filter_jit  # one compilation for everything below
    def run(model, images, key):
        def loss(model):
            keys = jr.split(key, images.shape[0])
            outputs = jax.vmap(lambda x, k: model(x, key=k))(images, keys)  # training mode: dropout on
            return jnp.sum(outputs @ probe), outputs

        def eval_loss(images):
            return jnp.sum(jax.vmap(lambda x: model(x, inference=True))(images) @ probe)

        (value, train_out), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        eval_out = jax.vmap(lambda x: model(x, inference=True))(images)
        single = model(images[0], inference=True)
        maps = model.class_attention(images[0]) if model.config.cls_depth else None
        return value, train_out, eval_out, grads, jax.grad(eval_loss)(images), single, maps

    value, train_out, eval_out, grads, input_grads, single, maps = run(model, images, drop_key)
    assert train_out.shape == eval_out.shape == (2, out_size)
    assert train_out.dtype == eval_out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(train_out))) and bool(jnp.all(jnp.isfinite(eval_out)))
    assert math.isfinite(float(value))
    # Gradients: one per parameter, of its shape, finite; and the image really reaches the output.
    params = eqx.filter(model, eqx.is_array)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
    assert _finite(grads) and bool(jnp.all(jnp.isfinite(input_grads)))
    if cfg.dim >= 4:  # (a LayerNorm over 1 or 2 features is constant, or nearly: it ends every CaiT)
        assert float(jnp.max(jnp.abs(input_grads))) > 0, "the output does not depend on the image"
    # Inference needs no key; the per-example call agrees with the batched one.
    np.testing.assert_allclose(np.asarray(single), np.asarray(eval_out[0]), rtol=1e-5, atol=1e-6)
    if cfg.cls_depth:
        assert maps.shape == (cfg.cls_depth, cfg.heads, 1 + cfg.num_patches)
        np.testing.assert_allclose(np.asarray(maps.sum(-1)), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------- invalid configs


NOT_AN_INT = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(),
                       st.just([4]), st.just(np.float32(4.0)))
NOT_A_RATE = st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(math.nan), st.booleans(),
                       st.text(max_size=3), st.none(), st.just(math.inf))
NOT_A_BOOL = st.one_of(st.integers(0, 1), st.text(max_size=3), st.none(), st.floats(0, 1))


def _int_below(minimum):
    return st.one_of(st.integers(max_value=minimum - 1), NOT_AN_INT)


# Per argument: values that no configuration accepts.
INVALID = {
    "patch_size": _int_below(1),
    "dim": _int_below(1),
    "depth": _int_below(1),
    "heads": _int_below(1),
    "mlp_dim": _int_below(1),
    "channels": _int_below(1),
    "num_classes": _int_below(0),
    "cls_depth": _int_below(0),
    "dim_head": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3)),
    "cls_mlp_dim": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3)),
    "dropout": NOT_A_RATE,
    "emb_dropout": NOT_A_RATE,
    "attn_dropout": NOT_A_RATE,
    "layer_dropout": NOT_A_RATE,
    "init_values": st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.booleans(), st.text(max_size=3)),
    "talking_heads": NOT_A_BOOL,
    "qkv_bias": NOT_A_BOOL,
    "image_size": st.one_of(
        st.integers(max_value=0),
        st.tuples(st.integers(1, 64)),
        st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64)),
        st.tuples(st.integers(max_value=0), st.integers(1, 64)),
        st.tuples(st.just(16), st.floats()),
        st.floats(),
        st.booleans(),
        st.text(max_size=3),
        st.none(),
    ),
    "dtype": st.sampled_from([jnp.int32, jnp.uint8, jnp.complex64, jnp.bool_, object, "int8"]),
}


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), name=st.sampled_from(sorted(INVALID)))
def test_any_invalid_argument_is_a_value_error_naming_it(tiny_config, data, name):
    value = data.draw(INVALID[name], label=name)
    with pytest.raises(ValueError) as info:
        cait_eqx.CaiT(**{**tiny_config, name: value}, key=jr.key(0))
    assert f"`{name}`" in str(info.value), str(info.value)


@st.composite
def indivisible(draw):
    """Sizes that are each valid but do not fit together."""
    if draw(st.booleans()):
        patch = draw(st.integers(2, 8))
        side = draw(st.integers(1, 64).filter(lambda s: s % patch))
        other = patch * draw(st.integers(1, 4))
        size = draw(st.sampled_from([side, (side, other), (other, side)]))
        return dict(image_size=size, patch_size=patch), ("image_size", "patch_size")
    heads = draw(st.integers(2, 8))
    dim = draw(st.integers(1, 64).filter(lambda d: d % heads))
    return dict(dim=dim, heads=heads), ("dim", "heads")


@settings(max_examples=60, **SETTINGS)
@given(case=indivisible())
def test_sizes_that_do_not_fit_together_name_both_arguments(tiny_config, case):
    change, names = case
    with pytest.raises(ValueError) as info:
        cait_eqx.CaiT(**{**tiny_config, **change}, key=jr.key(0))
    for name in names:
        assert f"`{name}`" in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("init_values", math.inf),  # every LayerScale inf, every output NaN
        ("dtype", "float8"),  # not a dtype jnp knows: must not leak jnp.dtype's TypeError
        ("dtype", "floau32"),  # what one flipped bit in a saved file's stored config gives
    ],
)
def test_config_values_that_used_to_slip_through(tiny_config, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cait_eqx.CaiT(**{**tiny_config, name: value}, key=jr.key(0))


# ------------------------------------------------------------------------------------------------- inputs

# Not `tiny_config`: non-square and two channels, so a transposed or channels-last input cannot pass by luck.
MODEL_KWARGS = dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                    mlp_dim=16, channels=2)
EXPECTED = (2, 8, 12)


@pytest.fixture(scope="module")
def model():
    return cait_eqx.CaiT(**MODEL_KWARGS, key=jr.key(0))


@st.composite
def inputs(draw):
    """An input shape and dtype near the expected one: each axis kept, changed, dropped or added."""
    shape = list(EXPECTED)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["resize", "drop", "add", "transpose"]))
        if action == "resize" and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(1, 13))
        elif action == "drop" and shape:
            shape.pop(draw(st.integers(0, len(shape) - 1)))
        elif action == "add" and len(shape) < 5:
            shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 4)))
        elif action == "transpose":
            shape = shape[1:] + shape[:1]  # channels last
    dtype = draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_]))
    return tuple(shape), dtype


X_NAMED = re.compile(r"""(parameter|argument) ['"`]x['"`]""")


@settings(max_examples=80, **SETTINGS)
@given(case=inputs(), how=st.sampled_from(["call", "jit", "vmap", "features", "attention"]))
def test_wrong_inputs_are_type_check_errors_naming_x(model, case, how):
    shape, dtype = case
    valid = shape == EXPECTED and jnp.issubdtype(dtype, jnp.floating)
    assume(not valid)  # the valid inputs are the test below
    x = jnp.zeros(shape, dtype)
    call = {
        "call": lambda: model(x),
        "jit": lambda: eqx.filter_jit(model)(x),
        "vmap": lambda: jax.vmap(model)(x[None]),  # a batch of one wrong image
        "features": lambda: model.forward_features(x),
        "attention": lambda: model.class_attention(x),
    }[how]
    with pytest.raises(TypeCheckError) as info:
        call()
    assert X_NAMED.search(str(info.value)), str(info.value)


def test_a_batch_of_the_right_images_is_refused_with_the_way_to_vmap(model):
    # Our own check (independent of jaxtyping) says what to do; jaxtyping's hook (on in the tests) refuses the
    # call first, in its own words (our check says "argument `x`").
    for batch in (1, 2, 5):
        x = jnp.zeros((batch, *EXPECTED))
        with pytest.raises(TypeCheckError, match=r"typechecking parameter 'x'"):
            model(x)
        with pytest.raises(TypeCheckError, match=r"jax.vmap\(model\)\(images\)"):
            check_image(model.config, x, dynamic=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_every_floating_input_dtype_is_accepted(model, dtype):
    x = jr.uniform(jr.key(1), EXPECTED).astype(dtype)
    out = eqx.filter_jit(model)(x)
    reference = eqx.filter_jit(model)(x.astype(jnp.float32))
    assert out.shape == (3,) and out.dtype == jnp.float32  # the model's dtype, not the input's
    # Cast first, then the same maths: equal to float32 rounding (two compiled programs; a computation in the
    # input's half precision would be off by ~1e-3).
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-6, atol=1e-6)
