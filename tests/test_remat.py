"""Rematerialisation is a named option that changes memory and speed, never the numbers."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cait_eqx

POLICIES = cait_eqx.REMAT_POLICIES


@pytest.fixture(scope="module")
def model_and_batch():
    model = cait_eqx.CaiT(16, 4, 10, 32, 3, 2, 4, 64, dropout=0.1, layer_dropout=0.1, key=jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (4, 3, 16, 16))
    labels = jnp.arange(4) % 10
    return model, images, labels


def _loss(model, images, labels, key):
    keys = jax.random.split(key, images.shape[0])
    logits = jax.vmap(lambda x, k: model(x, key=k))(images, keys)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def test_the_policies_are_the_documented_four():
    assert POLICIES == ("none", "weight_products", "dots", "full")


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_the_same_loss_and_gradients(model_and_batch, policy):
    model, images, labels = model_and_batch
    grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss))
    key = jax.random.key(2)  # dropout and stochastic depth on: recomputation must redraw the same masks
    reference_loss, reference = grad(cait_eqx.with_remat(model, "none"), images, labels, key)
    loss, grads = grad(cait_eqx.with_remat(model, policy), images, labels, key)
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-7)


def test_the_policies_trace_to_different_programs(model_and_batch):
    """Each name must reach `jax.checkpoint` with its own policy (or none), else a benchmark row would time
    the same program twice."""
    model, images, labels = model_and_batch
    programs = {}
    for policy in POLICIES:
        candidate = cait_eqx.with_remat(model, policy)
        jaxpr, _, _ = eqx.filter_make_jaxpr(eqx.filter_grad(_loss))(
            candidate, images, labels, jax.random.key(0)
        )
        programs[policy] = str(jaxpr)
    assert "remat" not in programs["none"] and "checkpoint" not in programs["none"]
    for policy in POLICIES[1:]:
        assert "remat" in programs[policy] or "checkpoint" in programs[policy], policy
    assert len(set(programs.values())) == len(POLICIES)


def test_remat_is_a_constructor_option_not_part_of_the_config(getkey):
    model = cait_eqx.CaiT(16, 4, 10, 32, 1, 1, 4, 64, remat="full", key=getkey())
    assert model.remat == "full" and "remat" not in model.config.kwargs()
    assert cait_eqx.CaiT(16, 4, 10, 32, 1, 1, 4, 64, key=getkey()).remat == "weight_products"
    other = cait_eqx.with_remat(model, "dots")
    assert other.remat == "dots" and other.pos_embed is model.pos_embed  # weights shared, not copied


def test_bad_policies_are_named_errors(getkey):
    with pytest.raises(ValueError, match=r"`remat` must be one of 'none', 'weight_products', 'dots', 'full'"):
        cait_eqx.CaiT(16, 4, 10, 32, 1, 1, 4, 64, remat="some", key=getkey())
    model = cait_eqx.CaiT(16, 4, 10, 32, 1, 1, 4, 64, key=getkey())
    with pytest.raises(ValueError, match="`remat` must be one of"):
        cait_eqx.with_remat(model, "all")
    # the type checker (or, without it, our own check) refuses it
    with pytest.raises(TypeError, match="CaiT"):
        cait_eqx.with_remat(model.blocks, "full")
