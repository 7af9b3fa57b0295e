"""`cait_eqx.chunked_value_and_grad`: a batch's loss and gradient taken over micro-batches in turn.

What would be wrong, and what catches it:
- a loss or gradient that is not the whole batch's (a sum of the parts instead of their mean, a part
  dropped, keys or labels paired with the wrong image): `test_parts_give_the_whole_batchs_loss_and_gradient`
  compares with `eqx.filter_value_and_grad` on the same batch, with dropout keys and a shuffled batch, and
  `test_without_aux_the_parts_give_the_same_loss_and_gradient` without aux;
- results in other dtypes than one pass gives, or sums in low precision:
  `test_parts_give_back_the_dtypes_of_one_pass_and_sum_in_float32`;
- per-example aux (logits) returned in another order than the batch's: the same test;
- "chunked" that still runs the whole batch at once, or a chunk that ignores the model: the traced program
  must hold one `scan` over the parts (`test_auto_cuts_a_cait_batch_on_one_cpu_device_only`), and
  `auto_train_chunk` gives the documented values for the measured models;
- parts that do not divide the batch, or absurdly small ones: `test_how_many_parts` states the rule;
- bad arguments: a clear `ValueError` (`test_bad_arguments_are_refused`).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import cait_eqx
from cait_eqx._batch import micro_batch_count


def _loss(model, images, labels, keys):
    logits = jax.vmap(lambda x, k: model(x, key=k))(images, keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits


def _top_scans(fn, *args):
    """The lengths of the `scan`s at the top of `fn`'s traced program (`fn` closes over the model)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def _assert_close_trees(got, want):
    leaves, wanted = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(leaves) == len(wanted) > 0
    largest = max(float(np.abs(w).max()) for w in wanted)
    for a, b in zip(leaves, wanted, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(float(np.abs(b).max()), 1e-3 * largest))


def test_parts_give_the_whole_batchs_loss_and_gradient(tiny_config, getkey):
    # One SA and one CA block keep the compilations short; dropout and stochastic depth make keys matter.
    config = dict(tiny_config, depth=1, cls_depth=1, dropout=0.1, layer_dropout=0.2)
    model = cait_eqx.CaiT(**config, key=getkey())
    images = jr.normal(getkey(), (6, 3, 16, 16))
    labels = jnp.arange(6) % 10
    keys = jr.split(getkey(), 6)
    (want_loss, want_logits), want_grads = eqx.filter_jit(eqx.filter_value_and_grad(_loss, has_aux=True))(
        model, images, labels, keys
    )
    run = cait_eqx.chunked_value_and_grad(_loss, chunk=2, has_aux=True)
    assert _top_scans(lambda *b: run(model, *b)[0][0], images, labels, keys) == [3]
    (loss, logits), grads = eqx.filter_jit(run)(model, images, labels, keys)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    _assert_close_trees(eqx.filter(grads, eqx.is_array), eqx.filter(want_grads, eqx.is_array))
    # Each row is its own example's (image, label and key travel together): a shuffled batch shuffles them.
    order = jnp.array([5, 0, 4, 1, 3, 2])
    (loss2, logits2), _ = eqx.filter_jit(run)(model, images[order], labels[order], keys[order])
    np.testing.assert_allclose(logits2, want_logits[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss2, want_loss, rtol=2e-6)


def test_without_aux_the_parts_give_the_same_loss_and_gradient():
    def loss(w, x, y):
        return jnp.mean((jnp.tanh(x @ w) - y) ** 2)

    w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    x = jnp.linspace(-2.0, 2.0, 36 * 4).reshape(36, 4)
    y = jnp.cos(jnp.arange(36.0 * 3)).reshape(36, 3)
    want_loss, want_grad = eqx.filter_value_and_grad(loss)(w, x, y)
    run = cait_eqx.chunked_value_and_grad(loss, chunk=8)  # 36 rows: 6 parts of 6
    assert _top_scans(lambda *a: run(*a)[0], w, x, y) == [6]
    got_loss, got_grad = jax.jit(run)(w, x, y)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_auto_cuts_a_cait_batch_on_one_cpu_device_only(tiny_config, getkey, monkeypatch):
    # A 32×32 model with patch 4: 65 tokens an image, 16 images a part (1,040 tokens ≥ 768).
    model = cait_eqx.CaiT(**dict(tiny_config, image_size=32, depth=1, cls_depth=1), key=getkey())
    assert cait_eqx.auto_train_chunk(model.config) == 16
    images, labels = jnp.zeros((64, 3, 32, 32)), jnp.zeros(64, jnp.int32)
    keys = jr.split(getkey(), 64)
    run = cait_eqx.chunked_value_and_grad(lambda *a: _loss(*a)[0])
    # tests/conftest.py gives this process 8 CPU devices: "auto" leaves the batch whole (a mesh's step).
    assert 4 not in _top_scans(lambda *b: run(model, *b)[0], images, labels, keys)
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # as on a CPU-only host, wherever this runs
    assert _top_scans(lambda *b: run(model, *b)[0], images, labels, keys) == [4]
    # An accelerator's kernels want the whole batch: no automatic parts there.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert 4 not in _top_scans(lambda *b: run(model, *b)[0], images, labels, keys)
    # Something that is not a CaiT has no chunk of its own.
    other = cait_eqx.chunked_value_and_grad(lambda w, x: jnp.mean((x @ w) ** 2))
    assert _top_scans(lambda *a: other(*a)[0], jnp.ones(3), jnp.ones((64, 3))) == []


@pytest.mark.parametrize(
    ("variant", "chunk"),
    [("cait_xxs24_224", 4), ("cait_s24_224", 4), ("cait_m36_384", 2), ("cait_m48_448", 1)],
)
def test_auto_train_chunk_of_the_measured_models(variant, chunk):
    assert cait_eqx.auto_train_chunk(cait_eqx.CaiTConfig(**cait_eqx.variant_config(variant))) == chunk


def test_auto_train_chunk_of_the_small_benchmark_model_and_of_other_sizes(tiny_config):
    small = cait_eqx.CaiTConfig(
        **dict(tiny_config, image_size=32, patch_size=4, dim=192, heads=4, mlp_dim=768, depth=12)
    )
    assert cait_eqx.auto_train_chunk(small) == 16
    # Tokens decide, not widths: 4×4 patches of 16×16 images (17 tokens) take 64 images (1,088 tokens).
    assert cait_eqx.auto_train_chunk(dataclasses.replace(small, image_size=(16, 16))) == 64
    assert cait_eqx.auto_train_chunk(small, min_tokens=65) == 1
    with pytest.raises(ValueError, match="`min_tokens` must be a positive number of tokens, got 0"):
        cait_eqx.auto_train_chunk(small, min_tokens=0)


@pytest.mark.parametrize(
    ("size", "chunk", "multiple_of", "parts"),
    [
        (128, 32, 1, 4),  # 4 parts of 32
        (16, 4, 1, 4),
        (100, 32, 1, 4),  # 4 of 25: the fewest equal parts of at most 32
        (97, 32, 1, 1),  # only parts of 1 divide 97: the batch runs whole
        (8, 32, 1, 1),  # no larger than a chunk
        (16, None, 4, 4),  # no chunk: the K accumulation micro-batches alone
        (16, 3, 2, 8),  # micro-batches of 8, each in parts of 2: a multiple of K
        (16, 5, 4, 4),  # micro-batches of 4 already fit
    ],
)
def test_how_many_parts(size, chunk, multiple_of, parts):
    assert micro_batch_count(size, chunk, multiple_of=multiple_of) == parts


def test_parts_of_a_batch_that_k_does_not_divide_are_refused():
    with pytest.raises(ValueError, match="A batch of 10 does not split into 4 equal micro-batches"):
        micro_batch_count(10, 2, multiple_of=4)


def test_parts_give_back_the_dtypes_of_one_pass_and_sum_in_float32():
    # bfloat16 weights and loss: the parts' sums are float32, the results the dtypes the whole batch gives.
    def loss(w, x):
        return jnp.mean((x @ w) ** 2)

    w = jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)
    x = jnp.linspace(-2, 2, 64 * 8, dtype=jnp.float32).reshape(64, 8).astype(jnp.bfloat16)
    want_loss, want_grad = eqx.filter_value_and_grad(loss)(w, x)
    loss_parts, grad_parts = jax.jit(cait_eqx.chunked_value_and_grad(loss, chunk=4))(w, x)
    assert (loss_parts.dtype, grad_parts.dtype) == (want_loss.dtype, want_grad.dtype) == (jnp.bfloat16,) * 2
    # The values: the whole batch's, to bfloat16 rounding.
    np.testing.assert_allclose(np.float32(loss_parts), np.float32(want_loss), rtol=1e-2)
    np.testing.assert_allclose(np.float32(grad_parts), np.float32(want_grad), rtol=1e-2, atol=1e-2)


def test_bad_arguments_are_refused(tiny_model):
    for chunk in (0, -2, 2.5, "big", True):
        with pytest.raises(ValueError, match=r"`chunk` must be a whole number of examples ≥ 1.*got"):
            cait_eqx.chunked_value_and_grad(_loss, chunk=chunk)
    run = cait_eqx.chunked_value_and_grad(lambda m, x, y: jnp.mean(x) + jnp.mean(y), chunk=2)
    with pytest.raises(ValueError, match=r"same batch size; the leading sizes given are \[3, 4\]"):
        run(jnp.ones(2), jnp.zeros((4, 3)), jnp.zeros(3))
    totals = cait_eqx.chunked_value_and_grad(
        lambda w, x: (jnp.mean(x * w), jnp.sum(x)), chunk=2, has_aux=True
    )
    with pytest.raises(ValueError, match=r"one row per example; one came back with shape \(\)"):
        totals(jnp.ones(()), jnp.ones((4,)))
