"""`cait_eqx.export`: a `jax.export` artifact that a process without cait_eqx runs, with the model's logits.

What would be wrong: an artifact that needs cait_eqx to load (a pickled class, a custom pytree), logits that
differ from the model's (dropout left on, a different normalisation baked in), a batch dimension fixed at
export time, a half-written file, or a silent export of something that is not a CaiT.
"""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cait_eqx

# Runs in a fresh interpreter in isolated mode (-I: no user site, no PYTHONPATH, not the working directory):
# it reads the artifact with `jax.export` alone, and checks at the end that cait_eqx was never imported.
READER = """
import json, sys
import jax
import numpy as np

exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = np.load(sys.argv[2])
out = {"shape": [str(d) for d in exported.in_avals[0].shape], "platforms": list(exported.platforms)}
for n in (1, 5):
    out[str(n)] = np.asarray(exported.call(images[:n])).tolist()
assert "cait_eqx" not in sys.modules, sorted(m for m in sys.modules if m.startswith("cait_eqx"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def trained_like_model():
    """A small CaiT with dropout configured (export must switch it off) and 7 classes."""
    return cait_eqx.CaiT(
        image_size=16, patch_size=4, num_classes=7, dim=32, depth=2, cls_depth=1, heads=4, mlp_dim=64,
        dropout=0.1, layer_dropout=0.1, key=jax.random.key(3),
    )  # fmt: skip


def test_a_fresh_process_without_cait_eqx_runs_the_artifact(tmp_path, trained_like_model):
    model = trained_like_model
    path = cait_eqx.export(model, tmp_path / "nested" / "cait.jax")
    assert path == tmp_path / "nested" / "cait.jax" and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically
    images = np.random.default_rng(0).uniform(0, 1, (5, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CAIT_EQX"))}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", READER, str(path), str(tmp_path / "images.npy")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["shape"] == ["b", "3", "16", "16"]  # a symbolic batch dimension
    assert out["platforms"] == [jax.default_backend()]
    expected = np.asarray(jax.vmap(eqx.nn.inference_mode(model))(jnp.asarray(images)))
    for n in (1, 5):
        got = np.asarray(out[str(n)], np.float32)
        assert got.shape == (n, 7)
        np.testing.assert_allclose(got, expected[:n], rtol=0, atol=1e-6)


def test_fixed_batch_dtype_and_several_platforms(tmp_path, trained_like_model):
    model = eqx.nn.inference_mode(trained_like_model)
    path = cait_eqx.export(
        model, tmp_path / "b2.jax", batch_size=2, dtype="bfloat16", platforms=("cpu", "cuda")
    )
    exported = jax.export.deserialize(path.read_bytes())
    assert exported.in_avals[0].shape == (2, 3, 16, 16) and exported.in_avals[0].dtype == jnp.bfloat16
    assert exported.platforms == ("cpu", "cuda")
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 3, 16, 16)), jnp.bfloat16)
    expected = jax.vmap(model)(images)  # the model casts a bfloat16 image to its float32 precision
    np.testing.assert_allclose(np.asarray(exported.call(images)), np.asarray(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):  # the batch size is fixed now
        exported.call(jnp.zeros((3, 3, 16, 16), jnp.bfloat16))


def test_a_cpu_artifact_runs_the_batch_in_the_models_chunks(tmp_path, trained_like_model, monkeypatch):
    # A CPU artifact takes `cait_eqx.batched`'s chunks (as `cait-eqx predict` runs a batch there); one that
    # may run on an accelerator takes the whole batch. The tiny model's own chunk (128) would hold any batch
    # here, so a chunk of 2 stands in for a large model's.
    monkeypatch.setattr(cait_eqx._export, "auto_chunk", lambda config: 2)
    model = eqx.nn.inference_mode(trained_like_model)
    loops = {}
    for platforms in (("cpu",), ("cpu", "cuda")):
        path = cait_eqx.export(model, tmp_path / f"{len(platforms)}.jax", platforms=platforms)
        exported = jax.export.deserialize(path.read_bytes())
        loops[platforms] = exported.mlir_module().count("stablehlo.while")
        images = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (5, 3, 16, 16)), jnp.float32)
        for n in (1, 5):
            expected = jax.vmap(model)(images[:n])
            np.testing.assert_allclose(np.asarray(exported.call(images[:n])), np.asarray(expected), atol=1e-6)
    assert loops[("cpu",)] == loops[("cpu", "cuda")] + 1, loops  # the loop over the chunks


def test_a_dynamic_img_size_model_exports_at_a_chosen_fixed_size(tmp_path, trained_like_model):
    model = eqx.nn.inference_mode(cait_eqx.with_dynamic_img_size(trained_like_model))
    path = cait_eqx.export(model, tmp_path / "wide.jax", image_size=(12, 20))
    exported = jax.export.deserialize(path.read_bytes())
    assert [str(d) for d in exported.in_avals[0].shape] == ["b", "3", "12", "20"]
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (3, 3, 12, 20)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(exported.call(images)), np.asarray(jax.vmap(model)(images)), rtol=0, atol=1e-6
    )


def test_a_headless_model_exports_its_features(tmp_path, tiny_config):
    model = cait_eqx.CaiT(**dict(tiny_config, num_classes=0), key=jax.random.key(0))
    exported = jax.export.deserialize(cait_eqx.export(model, tmp_path / "f.jax").read_bytes())
    assert str(exported.out_avals[0].shape) == "(b, 32)"


def test_rewriting_keeps_no_partial_file_and_replaces_the_old_one(tmp_path, trained_like_model):
    path = tmp_path / "cait.jax"
    path.write_bytes(b"old")
    cait_eqx.export(trained_like_model, path, batch_size=1)
    assert path.read_bytes() != b"old"
    assert jax.export.deserialize(path.read_bytes()).in_avals[0].shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, p: cait_eqx.export(eqx.nn.Linear(2, 2, key=jax.random.key(0)), p), TypeError, "Linear"),
        (lambda m, p: cait_eqx.export(m, p.parent), IsADirectoryError, "directory"),
        (lambda m, p: cait_eqx.export(m, p.parent / "file" / "x.jax"), NotADirectoryError, "is a file"),
        (lambda m, p: cait_eqx.export(m, p, dtype="int8"), ValueError, "dtype"),
        (lambda m, p: cait_eqx.export(m, p, dtype="float33"), ValueError, "dtype"),
        (lambda m, p: cait_eqx.export(m, p, platforms=("cpu", "gpu")), ValueError, "'cuda'"),
        (lambda m, p: cait_eqx.export(m, p, platforms=()), ValueError, "platforms"),
        (lambda m, p: cait_eqx.export(m, p, batch_size=0), ValueError, "batch_size"),
        (lambda m, p: cait_eqx.export(m, p, image_size=32), ValueError, "with_dynamic_img_size"),
        (lambda m, p: cait_eqx.export(m, p, fast=True), TypeError, "fast"),
    ],
)
def test_bad_arguments_get_clear_errors(tmp_path, tiny_model, call, error, message):
    (tmp_path / "file").write_text("")
    with pytest.raises(error, match=message):
        call(tiny_model, tmp_path / "out.jax")
    assert not (tmp_path / "out.jax").exists()


def test_a_size_the_patch_does_not_divide_is_refused(tmp_path, tiny_model):
    model = cait_eqx.with_dynamic_img_size(tiny_model)
    with pytest.raises(ValueError, match="multiples of 4"):
        cait_eqx.export(model, tmp_path / "x.jax", image_size=(14, 16))
