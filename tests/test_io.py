"""Our own weights file (`save` / `load`) and timm's pretrained weights through the Hugging Face Hub cache.

What would be wrong if these fail: a round trip that changes a single bit, a dtype or a config field; a
file timm cannot read; a save that, interrupted, leaves a half-written file (or none) under the target name;
a file of a newer format read as if it were ours; a written file (model, checkpoint, run directory) that
gets other permissions than any new file of the user; `pretrained=True` that hangs or retries for long
without a network, or whose error does not say how to pass a local file; a cached download whose hash is not
checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import cait_eqx
from cait_eqx._atomic import atomic_write_bytes
from cait_eqx._io import FORMAT_VERSION


def _random_model(key, **kwargs):
    """A small model whose every array is off its initial value (so a swapped leaf shows)."""
    config = dict(image_size=(32, 48), patch_size=8, num_classes=5, dim=48, depth=2, cls_depth=2, heads=4,
                  mlp_dim=96, dropout=0.1, layer_dropout=0.2, init_values=0.5, cls_mlp_dim=64)
    model = cait_eqx.CaiT(**{**config, **kwargs}, key=key)
    rng = np.random.default_rng(0)  # the key already makes each model's init differ

    def move(x):  # in NumPy: no XLA compilation per leaf shape
        moved = np.asarray(x).astype(np.float32) + 0.3 * rng.normal(size=x.shape).astype(np.float32)
        return jnp.asarray(moved.astype(x.dtype))

    return jax.tree_util.tree_map(lambda x: move(x) if eqx.is_array(x) else x, model)


def _assert_bit_exact(a, b):
    leaves_a = jax.tree_util.tree_leaves(eqx.filter(a, eqx.is_array))
    leaves_b = jax.tree_util.tree_leaves(eqx.filter(b, eqx.is_array))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


# -------------------------------------------------------------------------------------- 2. save / load


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, getkey, dtype):
    model = _random_model(getkey(), dtype=dtype)
    path = cait_eqx.save(tmp_path / "model.safetensors", model)
    loaded = cait_eqx.load(path)
    assert loaded.config == model.config  # dropout rates, init_values, dtype: all of it
    _assert_bit_exact(loaded, model)
    assert all(m.inference for m in jax.tree_util.tree_leaves(
        loaded, is_leaf=lambda x: isinstance(x, eqx.nn.Dropout)) if isinstance(m, eqx.nn.Dropout))
    # The file tells what it is.
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    assert metadata["cait_eqx.format_version"] == str(FORMAT_VERSION) and metadata["format"] == "pt"
    assert json.loads(metadata["cait_eqx.config"])["layer_dropout"] == 0.2
    # load_timm reads our files too, from the stored config (no architecture inference).
    _assert_bit_exact(cait_eqx.load_timm(path), model)


def test_a_header_length_ending_in_byte_0x80_is_still_safetensors(tmp_path, getkey):
    """safetensors files start with their header's length, little-endian: one in 256 starts with byte 0x80,
    the first byte of a pickle. Such a file is ours, not a torch pickle. (The header is padded with spaces up
    to that length, which safetensors allows: tensor offsets count from the header's end.)"""
    model = _random_model(getkey())
    blob = cait_eqx.save(tmp_path / "model.safetensors", model).read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    padded = length + (0x80 - length) % 256
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", padded) + blob[8 : 8 + length].ljust(padded) + blob[8 + length :])
    assert path.read_bytes()[:1] == b"\x80"
    _assert_bit_exact(cait_eqx.load(path), model)


@pytest.mark.torch
def test_our_file_is_a_timm_checkpoint(tmp_path, getkey):
    import safetensors.torch
    import torch
    from _timm_utils import relative_error
    from timm.models.cait import Cait

    model = eqx.nn.inference_mode(_random_model(getkey()))
    path = cait_eqx.save(tmp_path / "model.safetensors", model)
    # torch's safetensors reader gets exactly our tensors' bytes.
    torch_tensors = safetensors.torch.load_file(path)
    for key, value in cait_eqx.to_timm_state_dict(model).items():
        assert np.asarray(value).tobytes() == torch_tensors[key].numpy().tobytes(), key
    cfg = model.config
    reference = Cait(img_size=cfg.image_size, patch_size=8, num_classes=5, embed_dim=48, depth=2, num_heads=4,
                     mlp_ratio=2.0, mlp_ratio_token_only=64 / 48).eval()
    reference.load_state_dict(safetensors.torch.load_file(path), strict=True)
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 48)).astype(np.float32)
    ours = np.asarray(jax.vmap(model)(jnp.asarray(images)))
    with torch.no_grad():
        ref = reference(torch.from_numpy(images)).numpy()
    assert relative_error(ours, ref) <= 1e-5


def test_load_at_a_new_resolution_resamples_from_the_stored_grid(tmp_path, getkey):
    model = _random_model(getkey())
    path = cait_eqx.save(tmp_path / "model.safetensors", model)
    bigger = cait_eqx.load(path, image_size=(48, 32), layer_dropout=0.0)  # 4x6 grid -> 6x4
    assert bigger.config.image_size == (48, 32) and bigger.config.layer_dropout == 0.0
    expected = cait_eqx.resample_pos_embed(model.pos_embed, (4, 6), (6, 4))
    np.testing.assert_array_equal(np.asarray(bigger.pos_embed), np.asarray(expected))


def test_an_interrupted_save_leaves_the_previous_file(tmp_path, getkey, monkeypatch):
    target = tmp_path / "model.safetensors"
    first = _random_model(getkey())
    cait_eqx.save(target, first)
    before = target.read_bytes()
    real_replace = os.replace

    def killed_after_writing(source, destination):
        if Path(source).parent == tmp_path:  # the bytes are on disk, under a temporary name ...
            assert Path(source).stat().st_size > len(before) // 2
            raise KeyboardInterrupt  # ... when the process is interrupted
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        cait_eqx.save(target, _random_model(getkey()))
    with pytest.raises(KeyboardInterrupt):
        cait_eqx.save(tmp_path / "new.safetensors", first)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no partial file, no temporary left behind


_SAVE_IN_A_NEW_PROCESS = """
import sys, jax.random as jr, cait_eqx
model = cait_eqx.CaiT((8, 12), 4, 3, 16, 2, 2, 2, 16, init_values=0.5, key=jr.key(0))
for name in sys.argv[1:]:
    cait_eqx.save(name, model)
"""


@pytest.mark.slow
def test_the_same_model_saved_in_two_processes_gives_the_same_bytes(tmp_path):
    """safetensors orders its metadata by a hash seeded at random in each save: `save` must undo that.

    Two fresh processes each save one model three times; all six files are equal byte for byte, and the
    header is a valid safetensors header: metadata keys sorted, tensor entries in data order and contiguous,
    data starting at an 8-byte boundary.
    """
    paths = [tmp_path / f"{process}-{copy}.safetensors" for process in "ab" for copy in range(3)]
    env = dict(os.environ, CAIT_EQX_TYPECHECK="0", JAX_PLATFORMS="cpu")
    for group in (paths[:3], paths[3:]):
        done = subprocess.run([sys.executable, "-c", _SAVE_IN_A_NEW_PROCESS, *map(str, group)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
    blobs = [path.read_bytes() for path in paths]
    assert all(blob == blobs[0] for blob in blobs), [hashlib.sha256(b).hexdigest()[:12] for b in blobs]
    (length,) = struct.unpack("<Q", blobs[0][:8])
    assert (8 + length) % 8 == 0
    header = json.loads(blobs[0][8 : 8 + length])
    assert list(header)[0] == "__metadata__"
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    offsets = [entry["data_offsets"] for name, entry in header.items() if name != "__metadata__"]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1][1] == len(blobs[0]) - 8 - length
    with safetensors.safe_open(str(paths[0]), framework="numpy") as handle:
        assert json.loads(handle.metadata()["cait_eqx.config"])["init_values"] == 0.5


def test_files_that_are_not_ours_are_refused_with_the_reason(tmp_path, getkey):
    model = _random_model(getkey())
    tensors = cait_eqx.to_timm_state_dict(model)
    safetensors.numpy.save_file(tensors, tmp_path / "timm.safetensors")
    with pytest.raises(cait_eqx.WeightsError, match=r"not written by `cait_eqx.save`(.|\n)*load_timm"):
        cait_eqx.load(tmp_path / "timm.safetensors")
    config = json.dumps({**model.config.kwargs(), "image_size": [32, 48]})
    safetensors.numpy.save_file(tensors, tmp_path / "future.safetensors",
                                metadata={"cait_eqx.format_version": "99", "cait_eqx.config": config})
    with pytest.raises(cait_eqx.WeightsError, match=r"format '99'(.|\n)*Upgrade cait_eqx"):
        cait_eqx.load(tmp_path / "future.safetensors")
    odd = json.dumps({**json.loads(config), "rotary": True})
    safetensors.numpy.save_file(tensors, tmp_path / "odd.safetensors",
                                metadata={"cait_eqx.format_version": "1", "cait_eqx.config": odd})
    with pytest.raises(cait_eqx.WeightsError, match=r"unknown entries \['rotary'\]"):
        cait_eqx.load(tmp_path / "odd.safetensors")
    ours = cait_eqx.save(tmp_path / "ours.safetensors", model).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(ours[: len(ours) - 100])
    with pytest.raises(cait_eqx.WeightsError, match=r"truncated or corrupt"):
        cait_eqx.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match=r"dtype float32, but .* another dtype"):
        cait_eqx.save(tmp_path / "cast.safetensors", jax.tree_util.tree_map(
            lambda x: x.astype(jnp.bfloat16) if eqx.is_array(x) else x, model))


# ------------------------------------------------------------------------------ 3. permissions of our files


@contextlib.contextmanager
def _umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_files_we_write_get_the_permissions_of_any_new_file(tmp_path, tiny_model, umask):
    """`save`, checkpoints and a run directory: `0o666` less the umask, as `open(path, "w")` gives a new file.

    What would be wrong: the temporary file's private `0o600` (what `tempfile.mkstemp` creates) kept after
    the rename, so a model saved under umask 022 cannot be read by the user's group or a web server.
    """
    from cait_eqx.data import load_digits, train_test_split
    from cait_eqx.training import RunConfig, TrainConfig, save_checkpoint, train_run

    train, test = train_test_split(load_digits(image_size=8), test_fraction=0.2, seed=0)
    config = RunConfig(
        model=dict(patch_size=4, dim=16, depth=1, cls_depth=1, heads=2, mlp_dim=16),
        image_size=8,
        train=TrainConfig(epochs=1, batch_size=16, eval_batch_size=64),
    )
    with _umask(umask):
        plain = tmp_path / "plain.txt"
        plain.write_text("the mode any new file of the user gets\n")
        saved = cait_eqx.save(tmp_path / "model.safetensors", tiny_model)
        save_checkpoint(tmp_path / "checkpoints", model=tiny_model, opt_state=(), key=jax.random.key(0),
                        step=1, epoch=0, batch_index=1, shuffle_seed=0)
        train_run(config, tmp_path / "run", progress=False, max_steps=1, data=(train.subset(np.arange(32)),
                                                                            test.subset(np.arange(64))))
    expected = 0o666 & ~umask
    assert _mode(plain) == expected
    written = [saved, *(tmp_path / "checkpoints").iterdir(), *(tmp_path / "run").rglob("*")]
    files = [path for path in written if path.is_file()]
    assert {"config.json", "metrics.jsonl"} <= {path.name for path in files}
    assert any(path.parent.name == "checkpoints" and path.suffix == ".eqx" for path in files)
    for path in files:
        assert _mode(path) == expected, f"{path}: {oct(_mode(path))}, expected {oct(expected)}"
    for path in written:
        if path.is_dir():
            assert _mode(path) == 0o777 & ~umask, f"{path}: {oct(_mode(path))}"
    assert not [path for path in written if path.name.endswith(".tmp")]


def test_a_rewritten_file_keeps_its_mode(tmp_path, tiny_model):
    """Saving over a file keeps the permissions its owner gave it, as writing it in place would."""
    path = cait_eqx.save(tmp_path / "model.safetensors", tiny_model)
    for mode in (0o600, 0o640, 0o444):
        os.chmod(path, mode)
        cait_eqx.save(path, tiny_model)
        assert _mode(path) == mode
    with _umask(0o022):
        notes = tmp_path / "notes.json"
        atomic_write_bytes(notes, b"{}")
        os.chmod(notes, 0o600)
        atomic_write_bytes(notes, b"{}\n")
        assert _mode(notes) == 0o600 and notes.read_bytes() == b"{}\n"


# ------------------------------------------------------------------------------------------------- 4. hub


def _no_network_message(error: BaseException) -> str:
    message = str(error)
    assert "weights='path/to/model.safetensors'" in message and "load_timm" in message
    assert "timm/cait_xxs24_224.fb_dist_in1k" in message
    return message


def test_offline_pretrained_without_a_cache_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(cait_eqx.PretrainedWeightsUnavailable) as info:
        cait_eqx.create_model("cait_xxs24_224", pretrained=True, cache_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    assert "HF_HUB_OFFLINE" in _no_network_message(info.value)


def test_unreachable_hub_without_a_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:  # a local port nobody listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(cait_eqx.PretrainedWeightsUnavailable) as info:
            cait_eqx.create_model("cait_xxs24_224", pretrained=True, cache_dir=tmp_path)
        assert time.monotonic() - start < 5.0
    assert "not reachable" in _no_network_message(info.value)


def _cache_like_the_hub(cache_dir, name, tensors):
    """Lay a file out as huggingface_hub's cache does: blobs named by SHA-256, snapshots linking to them."""
    repo = cache_dir / f"models--timm--{name}.fb_dist_in1k"
    (repo / "blobs").mkdir(parents=True)
    staging = cache_dir / "staging.safetensors"
    safetensors.numpy.save_file(tensors, staging)
    sha = hashlib.sha256(staging.read_bytes()).hexdigest()
    staging.rename(repo / "blobs" / sha)
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    os.symlink(f"../../blobs/{sha}", repo / "snapshots" / commit / "model.safetensors")
    return repo / "blobs" / sha


def test_pretrained_loads_a_cached_copy_offline_and_checks_its_hash(tmp_path, monkeypatch, getkey):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = cait_eqx.create_model("cait_xxs24_224", key=getkey())
    blob = _cache_like_the_hub(tmp_path, "cait_xxs24_224", cait_eqx.to_timm_state_dict(source))
    model = cait_eqx.create_model("cait_xxs24_224", pretrained=True, cache_dir=tmp_path)
    _assert_bit_exact(model, eqx.nn.inference_mode(source))
    # One flipped bit in the cached file: refused, with the way out.
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(cait_eqx.WeightsError, match=r"corrupt: their SHA-256 is [0-9a-f]{64}(.|\n)*Delete"):
        cait_eqx.create_model("cait_xxs24_224", pretrained=True, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------- a config gone stale


def _swapped(model, donor, where):
    """`model` with the part `where` taken from `donor` by `eqx.tree_at`, which leaves `config` as it was."""
    return eqx.tree_at(where, model, where(donor), is_leaf=lambda x: x is None)


_BASE = dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=2, cls_depth=2, heads=4, mlp_dim=64)
# Each part replaced with `eqx.tree_at` from a model of other hyper-parameters, and the fields that go stale.
_STALE_CASES = {
    "head": (dict(num_classes=5), lambda m: m.head, {"num_classes": (10, 5)}),
    "no head": (dict(num_classes=0), lambda m: m.head, {"num_classes": (10, 0)}),
    "blocks": (dict(depth=3, mlp_dim=48), lambda m: m.blocks, {"depth": (2, 3), "mlp_dim": (64, 48)}),
    "heads": (dict(heads=2), lambda m: m.blocks, {"heads": (4, 2), "dim_head": (8, 16)}),
    "class attention": (dict(cls_depth=1, cls_mlp_dim=16), lambda m: m.blocks_token_only,
                        {"cls_depth": (2, 1), "cls_mlp_dim": (64, 16)}),
    "channels": (dict(channels=1), lambda m: m.patch_embed, {"channels": (3, 1)}),
    "positional grid": (dict(image_size=32), lambda m: m.pos_embed, {"image_size": ((16, 16), (32, 32))}),
}


@pytest.mark.parametrize("case", sorted(_STALE_CASES))
def test_save_refuses_a_config_that_no_longer_describes_the_arrays(tmp_path, case):
    changes, where, stale = _STALE_CASES[case]
    model = cait_eqx.CaiT(**_BASE, key=jax.random.key(0))
    donor = cait_eqx.CaiT(**{**_BASE, **changes}, key=jax.random.key(1))
    swapped = _swapped(model, donor, where)
    target = tmp_path / "model.safetensors"
    for write in (lambda: cait_eqx.save(target, swapped), lambda: cait_eqx.to_timm_state_dict(swapped),
                  lambda: cait_eqx.export(swapped, tmp_path / "model.jax")):
        with pytest.raises(cait_eqx.StaleConfigError) as caught:
            write()
        assert caught.value.fields == stale
        message = str(caught.value)
        for field, (said, got) in stale.items():
            assert f"{field}: the config says {said!r}, the arrays say {got!r}" in message
        assert "cait_eqx.with_config_from_arrays(model)" in message and "eqx.tree_at" in message
    assert ("reset_classifier" in message) == ("num_classes" in stale)
    assert list(tmp_path.iterdir()) == []
    # The fix the message names: a config read from the arrays, which then saves and loads bit for bit.
    fixed = cait_eqx.with_config_from_arrays(swapped)
    assert {field: getattr(fixed.config, field) for field in stale} == {f: g for f, (_, g) in stale.items()}
    loaded = cait_eqx.load(cait_eqx.save(target, fixed))
    assert loaded.config == fixed.config
    image = jax.random.normal(jax.random.key(2), (fixed.config.channels, *fixed.config.image_size))
    np.testing.assert_array_equal(eqx.nn.inference_mode(fixed)(image), loaded(image))


def test_with_config_from_arrays_keeps_a_fresh_model_and_refuses_an_unreadable_grid():
    model = cait_eqx.CaiT(**_BASE, key=jax.random.key(0))
    assert cait_eqx.with_config_from_arrays(model) is model
    # 12 patches fit no square grid: the arrays do not tell the height and width.
    odd = eqx.tree_at(lambda m: m.pos_embed, model, jnp.zeros((12, 32)))
    with pytest.raises(ValueError, match="not a square grid.*set_input_size"):
        cait_eqx.with_config_from_arrays(odd)
    # reset_classifier, the way to a new head that the message names, keeps the config right by itself.
    assert cait_eqx.reset_classifier(model, 5, key=jax.random.key(1)).config.num_classes == 5
    cait_eqx.to_timm_state_dict(cait_eqx.reset_classifier(model, 5, key=jax.random.key(1)))
