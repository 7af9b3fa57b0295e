"""`cait_eqx.batched`: the batch through the model a few images at a time.

What would be wrong, and what catches it:
- a chunked batch giving other numbers than `jax.vmap` (rows mixed up between chunks, the filled rows of an
  uneven last chunk leaking into the results, keys paired with the wrong image): every test compares with
  `jax.vmap(model)` on the same inputs, with a batch that does not divide and with dropout keys;
- "chunked" that still runs the whole batch at once: the traced program must hold one `scan` over the chunks,
  each `chunk` images wide; under `jax.export` with a batch of any size, one loop more than `jax.vmap`'s
  program, and the numbers of `jax.vmap` for batches that fill a chunk, do not, or are one image;
- a chunk size that ignores the model (`auto_chunk`'s documented values for the measured models);
- chunks that move images between devices: on a 4-device mesh the result equals one device's;
- bad arguments: a clear `ValueError` before anything is traced.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import cait_eqx


def _scan_lengths(fn, *args):
    """The lengths of the `scan`s at the top of `fn`'s traced program: the model's own scan over its SA blocks
    (length: the depth) when the batch runs at once, the scan over the chunks (which holds the model's) when
    it runs in chunks."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def test_an_uneven_batch_in_chunks_equals_vmap(tiny_model, getkey):
    model = eqx.nn.inference_mode(tiny_model)
    images = jr.normal(getkey(), (7, 3, 16, 16))
    expected = jax.jit(jax.vmap(model))(images)
    run = cait_eqx.batched(model, chunk=3)
    # 7 images, at most 3 a chunk: 3 chunks of 3, the last one filled with a copy of image 6.
    assert _scan_lengths(run, images) == [3]
    compiled = jax.jit(run)
    got = compiled(images)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # Each row is its own image's: a permuted batch permutes the rows.
    order = jnp.array([6, 0, 5, 1, 4, 2, 3])
    np.testing.assert_allclose(compiled(images[order]), expected[order], rtol=1e-6, atol=1e-6)


def test_a_batch_of_any_size_exports_in_chunks(tiny_model, getkey):
    # Under `jax.export` with a symbolic batch the size is unknown until the program runs: the batch is cut
    # into the fewest equal chunks of at most 3 images, whatever it turns out to be (one of one for one).
    model = eqx.nn.inference_mode(tiny_model)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 3, 16, 16"), jnp.float32)
    chunked = jax.export.export(jax.jit(cait_eqx.batched(model, chunk=3)))(spec)
    whole = jax.export.export(jax.jit(jax.vmap(model)))(spec)
    loops = [e.mlir_module().count("stablehlo.while") for e in (chunked, whole)]
    assert loops[0] == loops[1] + 1, loops  # the loop over the chunks, around the model's own
    images = jr.normal(getkey(), (7, 3, 16, 16))
    expected = jax.jit(jax.vmap(model))(images)
    for n in (1, 2, 3, 4, 7):
        got = chunked.call(images[:n])
        assert got.shape == (n, tiny_model.config.num_classes)
        np.testing.assert_allclose(got, expected[:n], rtol=1e-6, atol=1e-6)


def test_keys_and_keyword_arguments_are_mapped_like_vmap(tiny_config, getkey):
    model = cait_eqx.CaiT(**dict(tiny_config, dropout=0.5, layer_dropout=0.2), key=getkey())
    images = jr.normal(getkey(), (5, 3, 16, 16))
    keys = jr.split(getkey(), 5)
    expected = jax.jit(jax.vmap(lambda x, k: model(x, key=k)))(images, keys)
    compiled = jax.jit(cait_eqx.batched(model, chunk=2))
    np.testing.assert_allclose(compiled(images, key=keys), expected, rtol=1e-6, atol=1e-6)
    # Dropout is on: another set of keys gives other outputs, so the keys did reach the model.
    other = compiled(images, key=jr.split(getkey(), 5))
    assert not np.allclose(other, expected)


def test_bound_methods_and_pytrees_of_outputs(tiny_model, getkey):
    model = eqx.nn.inference_mode(tiny_model)
    images = jr.normal(getkey(), (6, 3, 16, 16))
    features = jax.jit(cait_eqx.batched(model.forward_features, chunk=4))(images)
    expected = jax.jit(jax.vmap(model.forward_features))(images)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    both = jax.jit(cait_eqx.batched(lambda x: {"features": model.forward_features(x), "x2": 2 * x}, chunk=4))
    out = both(images)
    np.testing.assert_allclose(out["features"], features, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["x2"], 2 * images)


def test_auto_takes_the_models_chunk_and_small_batches_run_at_once(tiny_config, getkey):
    # A wide 32×32 model whose auto chunk is 2 (tokens 65, MLP 8192 → 2.1 MB an image under the 8 MiB budget).
    config = dict(tiny_config, image_size=32, mlp_dim=8192, depth=1, cls_depth=1)
    model = eqx.nn.inference_mode(cait_eqx.CaiT(**config, key=getkey()))
    assert cait_eqx.auto_chunk(model.config) == 2
    images = jnp.zeros((5, 3, 32, 32))
    assert _scan_lengths(cait_eqx.batched(model), images) == [3]
    assert _scan_lengths(cait_eqx.batched(model.forward_features), images) == [3]
    # No larger than a chunk: one vmap (the model's own scan over its 1 SA block only).
    assert _scan_lengths(cait_eqx.batched(model), images[:2]) == [1]
    assert _scan_lengths(cait_eqx.batched(model, chunk=None), images) == [1]
    # A function that is not a CaiT has no chunk of its own: "auto" runs it as one vmap.
    assert _scan_lengths(cait_eqx.batched(lambda x: model(x)), images) == [1]


@pytest.mark.parametrize(
    ("variant", "chunk"), [("cait_s24_224", 4), ("cait_xxs24_224", 8), ("cait_m36_384", 1)]
)
def test_auto_chunk_of_the_measured_models(variant, chunk):
    assert cait_eqx.auto_chunk(cait_eqx.CaiTConfig(**cait_eqx.variant_config(variant))) == chunk


def test_auto_chunk_of_the_small_benchmark_model_and_of_half_precision(tiny_config):
    small = cait_eqx.CaiTConfig(
        **dict(tiny_config, image_size=32, patch_size=4, dim=192, heads=4, mlp_dim=768, depth=12)
    )
    assert cait_eqx.auto_chunk(small) == 32
    # bfloat16 intermediates take half the bytes: twice the images in the same budget.
    assert cait_eqx.auto_chunk(dataclasses.replace(small, dtype="bfloat16")) == 64


@pytest.mark.slow  # a 4-device program: the slow tier keeps the default run under its time
def test_a_chunked_batch_split_over_devices_equals_one_device(tiny_model, getkey):
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.fail(f"tests/conftest.py gives 8 CPU devices; this process has {len(jax.devices())}")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    model = eqx.nn.inference_mode(tiny_model)
    images = jr.normal(getkey(), (16, 3, 16, 16))
    expected = jax.jit(jax.vmap(model))(images)
    run = eqx.filter_jit(lambda m, x: cait_eqx.batched(m, chunk=4)(x))
    got = run(model, jax.device_put(images, sharding))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, -2, 2.5, "big", True])
def test_a_chunk_that_is_not_a_whole_number_is_refused(tiny_model, chunk):
    with pytest.raises(ValueError, match=r"`chunk` must be a whole number of images ≥ 1.*got"):
        cait_eqx.batched(tiny_model, chunk=chunk)


def test_arguments_of_different_batch_sizes_are_refused(tiny_model):
    run = cait_eqx.batched(lambda x, k: tiny_model(x, key=k), chunk=2)
    with pytest.raises(ValueError, match=r"same batch size; the leading sizes given are \[3, 4\]"):
        run(jnp.zeros((4, 3, 16, 16)), jr.split(jr.key(0), 3))
    with pytest.raises(ValueError, match="at least one array argument"):
        cait_eqx.batched(tiny_model, chunk=2)()


def test_the_trainers_evaluation_takes_the_chunks(tiny_config, getkey):
    # The evaluation step runs `batched(model)`: a model whose auto chunk is 2 evaluates 5 images in 3 chunks.
    from cait_eqx import training

    config = dict(tiny_config, image_size=32, mlp_dim=8192, depth=1, cls_depth=1)
    model = cait_eqx.CaiT(**config, key=getkey())
    images = jr.uniform(getkey(), (5, 3, 32, 32))
    labels = jnp.arange(5) % 10
    unjitted = training.make_eval_step(jit=False)
    assert _scan_lengths(lambda x: unjitted(model, (x, labels))["logits"], images) == [3]
    logits = training.make_eval_step()(model, (images, labels))["logits"]
    expected = jax.jit(jax.vmap(eqx.nn.inference_mode(model)))(images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
