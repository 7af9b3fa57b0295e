"""Parity with timm's CaiT (the official maths) on the same random weights, in float32.

What would be wrong if these fail: a mis-ordered head mix, softmax over the wrong axis, a positional
embedding on the class token, a missing LayerScale, an approximate GELU, a wrong LayerNorm eps, patches
flattened in another order, class attention reading the wrong tokens, or a weight mapped to the wrong name.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
from _timm_utils import randomise_, relative_error, small_timm_cait, timm_logits

import cait_eqx

TOL = 1e-5

# (timm Cait kwargs, our extra config) — our config is otherwise inferred from the tensors.
CONFIGS = {
    "non_square": (
        dict(img_size=(32, 48), patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=3.0,
             depth_token_only=2, mlp_ratio_token_only=2.0, num_classes=7, init_values=0.5),
        dict(image_size=(32, 48)),
    ),
    "init_values_given": (
        dict(img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=6, depth_token_only=2,
             num_classes=5, init_values=0.3),
        dict(),
    ),
    "no_qkv_bias_one_channel_three_ca": (
        dict(img_size=32, patch_size=4, in_chans=1, embed_dim=48, depth=2, num_heads=3, qkv_bias=False,
             depth_token_only=3, num_classes=10, init_values=0.1),
        dict(),
    ),
}


def _images(shape, n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_small_configs_match_timm(name):
    timm_kwargs, extra = CONFIGS[name]
    reference = small_timm_cait(seed=1, **timm_kwargs)
    model = cait_eqx.from_timm_state_dict(reference.state_dict(), **extra)
    chans = timm_kwargs.get("in_chans", 3)
    size = timm_kwargs["img_size"]
    size = (size, size) if isinstance(size, int) else size
    images = _images((chans, *size))
    ours = np.asarray(eqx.filter_jit(jax.vmap(model))(jnp.asarray(images)))
    ref = timm_logits(reference, images)
    assert ours.shape == ref.shape
    assert relative_error(ours, ref) <= TOL
    # Features too: every normalised token, class token first, as timm's forward_features().
    import torch

    with torch.no_grad():
        ref_features = reference.forward_features(torch.from_numpy(images)).numpy()
    features = np.asarray(jax.vmap(model.forward_features)(jnp.asarray(images)))
    assert features.shape == ref_features.shape
    assert relative_error(features, ref_features) <= TOL


def test_cait_xxs24_224_matches_timm():
    reference = randomise_(timm.create_model("cait_xxs24_224", pretrained=False), seed=2)
    model = cait_eqx.from_timm_state_dict(reference.state_dict(), name="cait_xxs24_224")
    assert model.config == cait_eqx.create_model("cait_xxs24_224", key=jax.random.key(0)).config
    images = _images((3, 224, 224), n=2, seed=3)
    ours = np.asarray(eqx.filter_jit(jax.vmap(model))(jnp.asarray(images)))
    ref = timm_logits(reference, images)
    assert relative_error(ours, ref) <= TOL
    # The weights make the whole network matter: a different image gives clearly different logits.
    assert relative_error(ours[0], ours[1]) > 1e-2


def _perturb(model, select, noise):
    """Apply `noise(leaf)` to every array under the sub-module `select(model)`, leaving the rest untouched."""
    params, static = eqx.partition(model, eqx.is_array)
    noisy = jax.tree_util.tree_map(noise, select(params))
    return eqx.combine(eqx.tree_at(select, params, noisy), static)


@pytest.mark.parametrize("name", ["non_square", "init_values_given"])
def test_every_block_and_head_mix_matters(name, getkey):
    """Changing any single SA block, any CA block, `proj_l` or `proj_w` changes the logits.

    Guards the parity test itself: a block that is skipped, or hidden behind a tiny LayerScale, would pass a
    logits comparison only if it did not matter — here each one does.
    """
    timm_kwargs, extra = CONFIGS[name]
    model = cait_eqx.from_timm_state_dict(small_timm_cait(seed=4, **timm_kwargs).state_dict(), **extra)
    size = model.config.image_size
    images = jnp.asarray(_images((model.config.channels, *size), n=2, seed=5))
    forward = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    base = np.asarray(forward(model, images))

    def changes(perturbed) -> float:
        return relative_error(np.asarray(forward(perturbed, images)), base)

    for i in range(model.config.depth):
        # Only row i of every stacked SA-block array.
        key = getkey()
        perturbed = _perturb(
            model,
            lambda m: m.blocks,
            lambda a, i=i, key=key: a.at[i].add(jax.random.normal(key, a.shape[1:])),
        )
        assert changes(perturbed) > 1e-3, f"SA block {i} does not affect the logits"
    for j in range(model.config.cls_depth):
        key = getkey()
        perturbed = _perturb(
            model,
            lambda m, j=j: m.blocks_token_only[j],
            lambda a, key=key: a + jax.random.normal(key, a.shape),
        )
        assert changes(perturbed) > 1e-3, f"CA block {j} does not affect the logits"
    for mix in ("proj_l", "proj_w"):
        key = getkey()
        perturbed = _perturb(
            model,
            lambda m, mix=mix: getattr(m.blocks.attn, mix),
            lambda a, key=key: a + jax.random.normal(key, a.shape),
        )
        assert changes(perturbed) > 1e-3, f"talking-heads {mix} does not affect the logits"


def test_gelu_is_torchs_exact_gelu():
    """`_layers.gelu` (the MLP's activation) is the exact, erf-based GELU of `torch.nn.GELU()`, not the tanh
    approximation; it keeps a low-precision dtype, and its derivative is jax.nn.gelu's (exact) one.

    What would be wrong: the tanh approximation differs by up to ~5e-4 near |x| = 2, far above this tolerance;
    a float32 constant would silently promote bfloat16 activations."""
    import torch

    from cait_eqx._layers import gelu

    x = np.linspace(-10, 10, 40001, dtype=np.float32)
    ours = np.asarray(gelu(jnp.asarray(x)))
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    tanh = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))
    # A few float32 ulps of the output, absolute, everywhere (values reach 10).
    assert np.abs(ours - ref).max() <= 2e-6
    assert np.abs(tanh - ref).max() > 1e-4  # the check can tell the approximation apart
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
    # And it is what the MLP runs: erf, not erfc (which XLA's CPU backend evaluates more slowly).
    mlp = cait_eqx.CaiT(image_size=8, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                        mlp_dim=32, key=jax.random.key(0)).blocks_token_only[0].mlp
    program = str(jax.make_jaxpr(mlp)(jnp.ones((5, 16))))
    assert " erf " in program and "erfc" not in program
    grads = jax.vmap(jax.grad(gelu))(jnp.asarray(x))
    expected = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grads), np.asarray(expected), atol=2e-6)
