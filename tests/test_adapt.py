"""Adapting released weights to other images: input channels (timm's `adapt_input_conv`), dropout rates.

What would be wrong if these fail: one channel taken from R alone instead of the sum, channels repeated in
another order or not rescaled by 3/C, a non-RGB kernel silently "adapted", the adapted model not computing
what timm computes for the same adapted weights, or `with_dropout` touching a weight or a dropout's mode.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from _timm_utils import relative_error, small_timm_cait, timm_logits
from timm.models import adapt_input_conv
from timm.models.cait import Cait

import cait_eqx

pytestmark = pytest.mark.torch

TIMM = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=2,
    num_heads=3,
    depth_token_only=1,
    num_classes=5,
    init_values=0.5,
)


@pytest.fixture(scope="module")
def rgb():
    reference = small_timm_cait(seed=21, **TIMM)
    return reference, cait_eqx.from_timm_state_dict(reference.state_dict())


def _timm_adapted(reference: Cait, channels: int) -> Cait:
    """timm's own route: the RGB kernel through `adapt_input_conv`, loaded strictly into a `channels` Cait."""
    state = dict(reference.state_dict())
    state["patch_embed.proj.weight"] = adapt_input_conv(channels, state["patch_embed.proj.weight"])
    adapted = Cait(**dict(TIMM, in_chans=channels)).eval()
    adapted.load_state_dict(state, strict=True)
    return adapted


@pytest.mark.parametrize("channels", [1, 2, 4, 6])
def test_adapt_input_channels_is_timms_rule(rgb, channels):
    reference, model = rgb
    adapted = cait_eqx.adapt_input_channels(model, channels)
    assert adapted.config.channels == channels and adapted.patch_embed.channels == channels
    theirs = _timm_adapted(reference, channels)
    ours_kernel = np.asarray(adapted.patch_embed.proj.weight)
    np.testing.assert_allclose(
        ours_kernel, theirs.patch_embed.proj.weight.detach().numpy(), rtol=0, atol=1e-7
    )
    images = np.random.default_rng(channels).normal(size=(2, channels, 32, 32)).astype(np.float32)
    ours = np.asarray(jax.vmap(adapted)(jnp.asarray(images)))
    assert relative_error(ours, timm_logits(theirs, images)) <= 1e-5
    # Every other weight is the source's.
    same = eqx.tree_at(lambda m: m.patch_embed.proj.weight, adapted, model.patch_embed.proj.weight)
    for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(same, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_grey_image_gives_the_embedding_of_its_rgb_copy(rgb):
    _, model = rgb
    grey = jax.random.normal(jax.random.key(0), (1, 32, 32))
    one = cait_eqx.adapt_input_channels(model, 1)
    np.testing.assert_allclose(
        np.asarray(one(grey)), np.asarray(model(jnp.repeat(grey, 3, axis=0))), rtol=1e-5, atol=1e-5
    )


def test_loading_with_channels_adapts_and_says_so(rgb, tmp_path, caplog):
    reference, model = rgb
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    with caplog.at_level("INFO", logger="cait_eqx"):
        loaded = cait_eqx.load_timm(path, channels=1)
    assert "adapted the input channels from 3 to 1" in caplog.text
    expected = cait_eqx.adapt_input_channels(model, 1)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32))
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(expected(x)))
    # Our own files too: saved at 3 channels, loaded at 4.
    ours = cait_eqx.save(tmp_path / "ours.safetensors", model)
    four = cait_eqx.load(ours, channels=4)
    np.testing.assert_array_equal(
        np.asarray(four.patch_embed.proj.weight),
        np.asarray(cait_eqx.adapt_input_channels(model, 4).patch_embed.proj.weight),
    )


def test_only_rgb_kernels_adapt(rgb):
    _, model = rgb
    four = cait_eqx.adapt_input_channels(model, 4)
    with pytest.raises(
        ValueError, match=r"cannot adapt 4-channel kernels to 1 channels: .* RGB kernels only"
    ):
        cait_eqx.adapt_input_channels(four, 1)
    with pytest.raises(ValueError, match=r"`channels` must be a positive int, got 0"):
        cait_eqx.adapt_input_channels(model, 0)
    assert cait_eqx.adapt_input_channels(model, 3) is model


def test_with_dropout_changes_rates_only(rgb, getkey):
    _, model = rgb  # loaded: inference mode
    noisy = cait_eqx.with_dropout(model, layer_dropout=0.2, dropout=0.1)
    assert (noisy.config.layer_dropout, noisy.config.dropout) == (0.2, 0.1)
    assert noisy.blocks.drop_path.p == 0.2 and noisy.blocks.mlp.drop.p == 0.1  # the modules, not just config
    for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(noisy, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jax.random.normal(getkey(), (3, 32, 32))
    np.testing.assert_array_equal(np.asarray(noisy(x)), np.asarray(model(x)))  # still in inference mode
    training = eqx.nn.inference_mode(noisy, False)
    assert relative_error(np.asarray(training(x, key=getkey())), np.asarray(model(x))) > 1e-4
    with pytest.raises(TypeError, match=r"changes only the rates .* got dim"):
        cait_eqx.with_dropout(model, dim=8)
    with pytest.raises(ValueError, match=r"layer_dropout"):
        cait_eqx.with_dropout(model, layer_dropout=1.5)


def test_loaded_weights_share_no_memory_with_the_source_tensors():
    """An in-place update of the torch model (an optimiser step) must not reach a model built from its state
    dict: loading copies."""
    reference = small_timm_cait(seed=22, **TIMM)
    model = cait_eqx.from_timm_state_dict(reference.state_dict())
    before = np.asarray(model.cls_token).copy()
    with torch.no_grad():
        reference.cls_token.add_(1.0)
        reference.patch_embed.proj.weight.mul_(0.0)
    np.testing.assert_array_equal(np.asarray(model.cls_token), before)
    assert float(np.abs(np.asarray(model.patch_embed.proj.weight)).max()) > 0
