"""Features like timm's: `forward_features` (all tokens), `forward_head(pre_logits=...)`,
`forward_intermediates`, and inputs of any size under `dynamic_img_size`.

What would be wrong if these fail: the final norm applied to the class token only (timm norms every token),
the class token not first, maps reshaped column-major or with channels last, a block index off by one (timm's
`indices=n` means the last n blocks), `norm=True` not using the final LayerNorm, `stop_early` changing maps,
the positional grid interpolated differently at call time than by `set_input_size`, or a call silently
accepting a size the patch size does not divide.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch
from _timm_utils import relative_error, small_timm_cait
from jaxtyping import TypeCheckError

import cait_eqx

pytestmark = pytest.mark.torch

TOL = 1e-5
TIMM = dict(
    img_size=(32, 48),
    patch_size=8,
    embed_dim=64,
    depth=4,
    num_heads=4,
    mlp_ratio=3.0,
    depth_token_only=2,
    num_classes=7,
    init_values=0.5,
)


@pytest.fixture(scope="module")
def pair():
    reference = small_timm_cait(seed=11, **TIMM)
    model = cait_eqx.from_timm_state_dict(reference.state_dict(), image_size=(32, 48))
    images = np.random.default_rng(12).normal(size=(2, 3, 32, 48)).astype(np.float32)
    return reference, model, images


def test_forward_features_are_timms_tokens_and_the_head_reads_the_class_token(pair):
    reference, model, images = pair
    with torch.no_grad():
        tokens = reference.forward_features(torch.from_numpy(images))
        pre_logits = reference.forward_head(tokens, pre_logits=True).numpy()
        logits = reference.forward_head(tokens).numpy()
    ours = np.asarray(eqx.filter_jit(jax.vmap(lambda x: model.forward_features(x)))(jnp.asarray(images)))
    assert ours.shape == (2, 1 + 4 * 6, 64) == tuple(tokens.shape)
    assert relative_error(ours, tokens.numpy()) <= TOL
    # The patch rows went through the final norm as timm's do (unit variance per token, before the affine).
    head = jax.vmap(lambda t: model.forward_head(t, pre_logits=True))(jnp.asarray(ours))
    assert relative_error(np.asarray(head), pre_logits) <= TOL
    assert (
        relative_error(np.asarray(jax.vmap(lambda t: model.forward_head(t))(jnp.asarray(ours))), logits)
        <= TOL
    )
    assert relative_error(np.asarray(jax.vmap(model)(jnp.asarray(images))), logits) <= TOL


def test_forward_head_refuses_the_old_class_token_only_features(pair):
    _, model, images = pair
    with pytest.raises(TypeCheckError, match=r"`forward_head` takes the tokens of one image"):
        model.forward_head(jnp.zeros((64,)))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(indices=2),
        dict(indices=[0, -1], norm=True),
        dict(indices=[1, 2], output_fmt="NLC"),
        dict(indices=[0, 2], stop_early=True),
        dict(indices=1, norm=True, intermediates_only=True),
        dict(indices=[1], stop_early=True, intermediates_only=True, output_fmt="NLC"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_forward_intermediates_match_timm(pair, options):
    reference, model, images = pair
    with torch.no_grad():
        ref = reference.forward_intermediates(torch.from_numpy(images), **options)
    ours = eqx.filter_jit(jax.vmap(lambda x: model.forward_intermediates(x, **options)))(jnp.asarray(images))
    if options.get("intermediates_only"):
        ref_maps, ours_maps = ref, ours
    else:
        (ref_final, ref_maps), (ours_final, ours_maps) = ref, ours
        assert relative_error(np.asarray(ours_final), ref_final.numpy()) <= TOL
    assert len(ours_maps) == len(ref_maps) >= 1
    for mine, theirs in zip(ours_maps, ref_maps, strict=True):
        assert mine.shape == tuple(theirs.shape)  # NCHW: (batch, dim, 4, 6); NLC: (batch, 24, dim)
        assert relative_error(np.asarray(mine), theirs.numpy()) <= TOL


def test_intermediates_are_the_blocks_outputs_in_block_order(pair):
    """Each map is the output of the named block: block 3's map through the final norm is the last SA output,
    and the maps differ from block to block (no block written twice or left at zero)."""
    _, model, images = pair
    x = jnp.asarray(images[0])
    maps = model.forward_intermediates(x, indices=None, output_fmt="NLC", intermediates_only=True)
    assert len(maps) == model.config.depth
    last = model.forward_features(x)[1:]  # after the final norm: compare with the normed last map
    normed = model.forward_intermediates(
        x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True
    )
    np.testing.assert_allclose(np.asarray(normed[0]), np.asarray(last), rtol=1e-5, atol=1e-5)
    for a, b in zip(maps, maps[1:], strict=False):
        assert relative_error(np.asarray(a), np.asarray(b)) > 1e-3


def test_only_the_chosen_maps_are_kept_and_the_scan_stays(pair):
    """One `scan` over the blocks (not unrolled), carrying a buffer of len(indices) + 1 maps, not depth."""
    _, model, images = pair
    jaxpr = jax.make_jaxpr(lambda x: model.forward_intermediates(x, indices=[1], intermediates_only=True))(
        jnp.asarray(images[0])
    )
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    carried = [v.aval.shape for v in scans[0].outvars]
    assert (2, 24, 64) in carried and not any(s[:1] == (model.config.depth,) and len(s) == 3 for s in carried)


def test_intermediates_have_gradients_and_keep_dropout_keys(pair, getkey):
    """Fine-tuning through a dense readout: gradients reach the blocks; with dropout on, the maps of a keyed
    call equal those of the full forward pass with the same key (`stop_early` keeps each block's key)."""
    _, model, images = pair
    x = jnp.asarray(images[0])
    grads = eqx.filter_grad(
        lambda m: sum(
            jnp.sum(t**2) for t in m.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        )
    )(model)
    assert float(jnp.abs(grads.blocks.attn.qkv.weight[0]).max()) > 0  # block 0 gets a gradient
    assert float(jnp.abs(grads.blocks.attn.qkv.weight[3]).max()) == 0  # block 3 is after every map
    noisy = eqx.nn.inference_mode(
        cait_eqx.from_timm_state_dict(
            small_timm_cait(seed=11, **TIMM).state_dict(), image_size=(32, 48), layer_dropout=0.3, dropout=0.1
        ),
        False,
    )
    key = getkey()
    full = noisy.forward_intermediates(x, indices=[1], key=key, intermediates_only=True)
    early = noisy.forward_intermediates(x, indices=[1], key=key, intermediates_only=True, stop_early=True)
    # The same draws (a different program: the scan stops early), so the same maps to float32 rounding; a
    # draw that changed with stop_early would move them by the dropout's O(1) scale.
    np.testing.assert_allclose(np.asarray(full[0]), np.asarray(early[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (5, r"asks for the last 5 blocks, but the model has 4"),
        ([4], r"block index 4 is out of range .* use 0 to 3"),
        ([], r"`indices` is empty"),
        ([1, -3], r"names a block twice"),
    ],
)
def test_bad_indices_are_refused_with_the_range(pair, indices, message):
    _, model, images = pair
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(jnp.asarray(images[0]), indices=indices)
    with pytest.raises(ValueError, match=r"'NCHW' or 'NLC'"):
        model.forward_intermediates(jnp.asarray(images[0]), output_fmt="NHWC")
    with pytest.raises(TypeCheckError, match=r"indices"):  # the annotation (int | Sequence[int] | None)
        model.forward_intermediates(jnp.asarray(images[0]), indices=[1.0])


# ------------------------------------------------------------------------------------------ dynamic_img_size


@pytest.mark.parametrize("size", [(32, 48), (48, 48), (16, 40), (64, 24)])
def test_dynamic_size_equals_set_input_size(pair, size):
    _, model, _ = pair
    dynamic = cait_eqx.with_dynamic_img_size(model)
    x = jr.normal(jr.key(sum(size)), (3, *size))
    resized = cait_eqx.set_input_size(model, size)
    forward = eqx.filter_jit(lambda m, x: m(x))
    np.testing.assert_allclose(
        np.asarray(forward(dynamic, x)), np.asarray(forward(resized, x)), rtol=1e-6, atol=1e-6
    )
    maps = dynamic.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert maps[0].shape == (64, size[0] // 8, size[1] // 8)


def test_dynamic_size_compiles_once_per_shape(pair):
    _, model, _ = pair
    dynamic = cait_eqx.with_dynamic_img_size(model)
    counted = eqx.debug.assert_max_traces(lambda m, x: m(x), max_traces=2)
    forward = eqx.filter_jit(counted)
    for size in [(16, 16), (24, 40), (16, 16), (24, 40), (16, 16)]:
        forward(dynamic, jnp.ones((3, *size)))
    assert eqx.debug.get_num_traces(counted) == 2


def test_dynamic_size_refuses_what_the_patch_size_does_not_divide(pair):
    _, model, _ = pair
    dynamic = cait_eqx.with_dynamic_img_size(model)
    with pytest.raises(TypeCheckError, match=r"multiples of the patch size 8, got an image of 30×48"):
        dynamic(jnp.ones((3, 30, 48)))
    with pytest.raises(TypeCheckError, match=r"channels=3"):
        dynamic(jnp.ones((1, 32, 48)))
    with pytest.raises(TypeCheckError, match=r"parameter 'x'|got a batch .* Use `jax.vmap"):
        dynamic(jnp.ones((2, 3, 32, 48)))
    # Off by default: another size names the option that allows it.
    with pytest.raises(TypeCheckError, match=r"dynamic_img_size=True"):
        model(jnp.ones((3, 48, 48)))
    with pytest.raises(TypeError, match=r"`dynamic_img_size` must be True or False"):
        cait_eqx.CaiT(32, 8, 10, 32, 2, 1, 4, 64, key=jr.key(0), dynamic_img_size="yes")


def test_dynamic_size_survives_surgery_and_the_constructor(pair, getkey):
    _, model, _ = pair
    built = cait_eqx.CaiT(32, 8, 10, 32, 2, 1, 4, 64, key=getkey(), dynamic_img_size=True)
    assert built(jnp.ones((3, 16, 40))).shape == (10,)
    assert cait_eqx.set_input_size(built, 48).dynamic_img_size
    assert cait_eqx.reset_classifier(built, 3, key=getkey()).dynamic_img_size
    assert not cait_eqx.with_dynamic_img_size(built, False).dynamic_img_size
