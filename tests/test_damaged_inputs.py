"""Damaged data, damaged weights files and bad command lines: a clear error that names the culprit, or a
correct conversion — never a traceback from deep inside, a silently wrong model, or code run from a file.

What would be wrong if these fail:
- image folders: a truncated or fake image that crashes without its path, or is skipped silently; a
  greyscale / 16-bit / palette / transparent image converted to the wrong pixels; a folder layout mistake
  that is not explained;
- weights: a truncated or bit-flipped file (where its format can tell: the safetensors header, the CRC-32
  of every record of a `.pth` zip) that loads; a `.pth` whose pickle runs code; a file that is not a CaiT
  taken for one;
- the command line: a bad flag value that prints a traceback or a usage dump instead of one line and exit
  status 2; a missing file that is not named; a dataset smaller than one batch that is not a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path

import jax
import jax.random as jr
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import cait_eqx
from cait_eqx import cli, data

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# Hypothesis writes the repr of each call (fixtures included) for its reports; after other test modules
# in the same process a fixture's repr can pass its size warning, which says nothing about the inputs.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)


# ------------------------------------------------------------------------------------------ image folders


def _png_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, **kwargs).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _good_folder(root: Path, size=(12, 10)) -> Path:
    """Two classes of three real (random-pixel) greyscale PNGs each."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(_png_bytes(rng.integers(0, 256, size, dtype=np.uint8)))
    return root


def _damaged_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    png, jpeg = _png_bytes(picture), _jpeg_bytes(np.stack([picture] * 3, -1))
    return {
        "cut.png": png[: len(png) // 2],  # a download that stopped half way
        "cut.jpg": jpeg[: len(jpeg) * 2 // 3],
        "header_only.png": png[:40],
        "empty.png": b"",
        "notes.jpg": b"these are my notes, not a photo\n",  # the wrong suffix
        "page.gif": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",  # a saved error page
        "noise.webp": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "model.tiff": b"II*\x00" + bytes(20),  # a TIFF header with nothing behind it
    }


@pytest.mark.parametrize("name", sorted(_damaged_files()))
def test_an_unreadable_image_is_reported_with_its_path(tmp_path, name):
    root = _good_folder(tmp_path / "images")
    bad = root / "dog" / name
    bad.write_bytes(_damaged_files()[name])
    with pytest.raises(ValueError, match="Cannot read image") as info:
        data.load_image_folder(root)
    assert str(bad) in str(info.value)


def test_the_cli_reports_a_damaged_image_as_a_one_line_usage_error(tmp_path, capsys):
    root = _good_folder(tmp_path / "images")
    bad = root / "cat" / "cut.png"
    bad.write_bytes(_damaged_files()["cut.png"])
    (root / "dog" / "empty.png").write_bytes(b"")
    argv = ["train", "--dataset", f"folder:{root}", "--image-size", "8", "--out", str(tmp_path / "run")]
    message = _usage_error(argv, capsys)
    # The `--check-data` pass (on by default) lists every file that cannot be read, before any training.
    assert "2 image(s) cannot be read" in message and str(bad) in message
    assert str(root / "dog" / "empty.png") in message and "--bad-images skip" in message
    assert not (tmp_path / "run").exists()


def _pixels(mode: str) -> tuple[Image.Image, np.ndarray, int]:
    """An image in `mode` and the uint8 pixels, channels first, the folder reader must make of it."""
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent row
    alpha[1, :] = 255  # fully opaque row
    on_black = lambda colour: np.round(colour.astype(np.float64) * alpha[..., None] / 255)  # noqa: E731
    if mode == "1":
        bits = grey > 127
        return Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8)[None], 1
    if mode == "L":
        return Image.fromarray(grey), grey[None], 1
    if mode == "LA":
        image = Image.fromarray(np.stack([grey, alpha], -1), mode="LA")
        return image, on_black(grey[..., None])[..., 0][None].astype(np.uint8), 1
    if mode == "I;16":
        wide = (grey.astype(np.uint16) * 257).astype(np.uint16)  # the full 16-bit range
        return Image.fromarray(wide), grey[None], 1
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        image = Image.fromarray(grey, mode="L").convert("P")
        image.putpalette(palette.reshape(-1).tolist())
        return image, palette[grey].transpose(2, 0, 1), 3
    if mode == "RGB":
        return Image.fromarray(rgb), rgb.transpose(2, 0, 1), 3
    if mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), mode="RGBA")
        return image, on_black(rgb).astype(np.uint8).transpose(2, 0, 1), 3
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I;16", "P", "RGB", "RGBA"])
def test_every_image_mode_is_converted_to_the_right_pixels(tmp_path, mode):
    image, expected, channels = _pixels(mode)
    (tmp_path / "only").mkdir()
    image.save(tmp_path / "only" / "picture.png")
    with Image.open(tmp_path / "only" / "picture.png") as reread:
        assert reread.mode in (mode, "I") or (mode == "1" and reread.mode == "1")  # PNG kept the mode
    dataset = data.load_image_folder(tmp_path)
    assert dataset.channels == channels and dataset.images.dtype == np.uint8
    got = dataset.images[0].astype(int)
    # Transparency is flattened onto black (alpha compositing rounds by at most one level).
    tolerance = 1 if "A" in mode else 0
    assert np.abs(got - expected.astype(int)).max() <= tolerance, (got, expected)
    if "A" in mode:
        assert not got[:, 0].any(), "a fully transparent pixel must come out black"
        np.testing.assert_array_equal(got[:, 1], expected[:, 1])  # opaque pixels unchanged


def test_folder_layout_mistakes_are_explained(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "0.png").write_bytes(_png_bytes(np.zeros((4, 4), np.uint8)))
    with pytest.raises(ValueError, match=r"No class folders in .*flat.*sub-folder named after the class"):
        data.load_image_folder(flat)
    root = _good_folder(tmp_path / "images")
    (root / "bird").mkdir()
    (root / "bird" / "README.txt").write_text("photos to come\n")  # a class with no images yet
    with pytest.raises(ValueError, match=r"Class folder .*bird holds no image files"):
        data.load_image_folder(root)
    (root / "bird" / "README.txt").unlink()
    (root / "bird").rmdir()
    (root / "cat" / "album.png").mkdir()  # a folder with an image suffix is not an image, and no problem
    loaded = data.load_image_folder(root)
    assert len(loaded) == 6 and loaded.class_names == ("cat", "dog")


def test_a_dataset_smaller_than_one_batch_is_a_clear_error(tmp_path):
    root = _good_folder(tmp_path / "images")
    dataset = data.load_image_folder(root)
    model = cait_eqx.CaiT((12, 10), 2, 2, 8, 1, 1, 2, 8, channels=1, key=jr.key(0))
    config = cait_eqx.training.TrainConfig(epochs=1, batch_size=7, warmup_epochs=0.0)
    with pytest.raises(ValueError, match=r"has 6 examples, fewer than one batch of 7.*at most 6"):
        cait_eqx.training.fit(model, dataset, None, config, key=jr.key(0), progress=False)


def test_the_cli_refuses_a_batch_larger_than_the_training_split(tmp_path, capsys):
    root = _good_folder(tmp_path / "images", size=(16, 16))  # 6 images: 4 to train on, 2 held out
    message = _usage_error(["train", "--dataset", f"folder:{root}", "--batch-size", "64", "--no-progress",
                            "--out", str(tmp_path / "run")], capsys)
    assert "--batch-size" in message and "64" in message


# ------------------------------------------------------------------------------------------ weights files


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small model and its files: our safetensors, a timm-style `.pth` (zip) and a legacy `.pth`."""
    root = tmp_path_factory.mktemp("weights")
    model = cait_eqx.CaiT(16, 4, 5, 16, 2, 1, 2, 24, key=jr.key(3))
    state = {k: torch.from_numpy(v) for k, v in cait_eqx.to_timm_state_dict(model).items()}
    torch.save(state, root / "model.pth")
    torch.save(state, root / "legacy.pth", _use_new_zipfile_serialization=False)
    return dict(model=model, state=state, ours=cait_eqx.save(root / "model.safetensors", model),
                pth=root / "model.pth", legacy=root / "legacy.pth", root=root)


def _arrays(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(model) if hasattr(x, "shape")]


def _load_quietly(loader, path):
    logger = logging.getLogger("cait_eqx")  # load_timm warns that it infers the architecture
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return loader(path)
    finally:
        logger.setLevel(level)


@settings(max_examples=40, **SETTINGS)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True), kind=st.sampled_from(["ours", "pth", "legacy"]))
def test_a_file_cut_anywhere_is_refused(weights, tmp_path_factory, fraction, kind):
    blob = weights[kind].read_bytes()
    cut = tmp_path_factory.mktemp("cut") / weights[kind].name
    cut.write_bytes(blob[: int(len(blob) * fraction)])
    for loader in (cait_eqx.load_timm, cait_eqx.load):
        with pytest.raises(cait_eqx.WeightsError):
            _load_quietly(loader, cut)


def _header_length(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


STRUCTURE_FREE = {"dropout", "emb_dropout", "attn_dropout", "layer_dropout", "init_values"}


@settings(max_examples=60, **SETTINGS)
@given(position=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_in_the_safetensors_header_is_an_error_or_changes_nothing(
    weights, tmp_path_factory, position, bit
):
    """The header (tensor names, dtypes, shapes, offsets, our stored config) is checked; its data is not."""
    blob = bytearray(weights["ours"].read_bytes())
    index = int(_header_length(blob) * position)
    blob[index] ^= 1 << bit
    flipped = tmp_path_factory.mktemp("flip") / "model.safetensors"
    flipped.write_bytes(bytes(blob))
    try:
        loaded = cait_eqx.load(flipped)
    except cait_eqx.WeightsError:
        return
    # Accepted only where the flip hit something that does not change the model (e.g. the package
    # version, or a dropout rate that inference ignores): every array and the structure are the same.
    for a, b in zip(_arrays(loaded), _arrays(weights["model"]), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = {f.name for f in dataclasses.fields(loaded.config)
               if getattr(loaded.config, f.name) != getattr(weights["model"].config, f.name)}
    assert changed <= STRUCTURE_FREE, changed


def test_a_flipped_bit_in_the_stored_dtype_is_a_weights_error(weights, tmp_path):
    """Where a flip makes the stored configuration invalid, the file is blamed, not the caller's code."""
    blob = weights["ours"].read_bytes()
    # The configuration is JSON inside the header's JSON: its quotes are escaped. Same lengths, same offsets.
    for good, bad in ((rb'\"dtype\": \"float32\"', rb'\"dtype\": \"floau32\"'),
                      (rb'\"dropout\": 0.0', rb'\"dropout\": 1.0'), (rb'\"depth\": 2', rb'\"depth\": 0')):
        assert blob.count(good) == 1
        path = tmp_path / "model.safetensors"
        path.write_bytes(blob.replace(good, bad))
        with pytest.raises(cait_eqx.WeightsError, match=r"stored model configuration is invalid"):
            cait_eqx.load(path)


def test_a_flipped_bit_in_any_record_of_a_pth_zip_is_caught_by_its_crc(weights, tmp_path):
    blob = weights["pth"].read_bytes()
    with zipfile.ZipFile(weights["pth"]) as archive:
        records = [info for info in archive.infolist() if info.file_size > 0]
    assert len(records) > len(weights["state"])  # the pickle, one record per tensor, version, ...
    for number, info in enumerate(records):
        # The record's data follows its 30-byte local header, file name and extra field.
        local_header = blob[info.header_offset : info.header_offset + 30]
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        damaged = bytearray(blob)
        damaged[start + (number * 7919) % info.file_size] ^= 1 << (number % 8)
        path = tmp_path / "flipped.pth"
        path.write_bytes(bytes(damaged))
        with pytest.raises(cait_eqx.WeightsError, match=r"corrupt") as caught:
            _load_quietly(cait_eqx.load_timm, path)
        assert str(path) in str(caught.value)


class _Payload:
    """Unpickling this runs a shell command that creates `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pth_that_would_run_code_is_refused_and_the_code_never_runs(weights, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    payload = {**weights["state"], "__init__": _Payload(marker)}
    torch.save(payload, tmp_path / "zip.pth")
    torch.save(payload, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"model": payload}, protocol=4))
    # The payload is real: plain unpickling does run it (checked on a copy, then the marker is removed).
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()
    for name in ("zip.pth", "legacy.pth", "raw.pkl"):
        for loader in (cait_eqx.load_timm, cait_eqx.load):
            with pytest.raises(cait_eqx.WeightsError, match=r"weights_only=True") as info:
                loader(tmp_path / name)
            assert str(tmp_path / name) in str(info.value)
    # And through the command line, which reports it in one line (exit status 1, no traceback).
    picture = tmp_path / "picture.png"
    picture.write_bytes(_png_bytes(np.zeros((16, 16, 3), np.uint8)))
    capsys.readouterr()
    assert cli.main(["attention", str(picture), "--weights", str(tmp_path / "zip.pth")]) == 1
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "Traceback" not in err
    assert not marker.exists(), "unpickling the checkpoint ran code from the file"


def test_files_that_are_not_cait_weights_are_named_errors(weights, tmp_path):
    np.savez(tmp_path / "arrays.npz", weight=np.zeros(3))  # a zip too, but not PyTorch's
    (tmp_path / "photo.png").write_bytes(_png_bytes(np.zeros((8, 8), np.uint8)))
    (tmp_path / "config.json").write_text(json.dumps({"dim": 16}))
    for name, message in (("arrays.npz", "Could not read .* as a PyTorch checkpoint"),
                          ("photo.png", "neither a safetensors file nor a PyTorch checkpoint"),
                          ("config.json", "neither a safetensors file nor a PyTorch checkpoint")):
        with pytest.raises(cait_eqx.WeightsError, match=message) as info:
            cait_eqx.load_timm(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(FileNotFoundError, match="No weights file"):
        cait_eqx.load(tmp_path)  # a directory
    # Our own file, asked to become another architecture: refused by name, not reshaped.
    with pytest.raises(cait_eqx.WeightsError, match=r"mis-shaped key\(s\)"):
        cait_eqx.load(weights["ours"], dim=32)


# ----------------------------------------------------------------------------------------- command line


def _usage_error(argv: list[str], capsys) -> str:
    """Run the CLI, expect a one-line usage error with exit status 2; return the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("cait-eqx") and "error:" in err, (argv, err)
    assert "Traceback" not in err and "usage:" not in err, (argv, err)
    return err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _bad_values(action: argparse.Action) -> list[str]:
    kind = getattr(action.type, "__name__", "")
    if action.choices is not None:
        return ["bogus", ""]
    if kind.startswith("int>="):
        minimum = int(kind[len("int>="):])
        return ["many", "2.5", "1e3", str(minimum - 1), ""]
    if kind == "number":  # every numeric range of the CLI starts at 0
        return ["fast", "nan", "inf", "-1", "1e400", ""]
    if kind == "dataset_spec":
        return ["cifar10", "folder:", "folder:/no/such/folder", "npz:/no/such/file.npz", "digits:extra"]
    if kind == "source_spec":  # a variant name, a checkpoint file or a run directory
        return ["no_such_model", "/no/such/file.safetensors", ""]
    if kind == "existing_dir":
        return ["/no/such/run"]
    if kind == "imagesize":  # `--image-size S` or `HxW`
        return ["0", "16x", "axb", "4x4x4", "16x0", ""]
    if kind == "dtype":
        return ["int8", "bf16", ""]
    if kind == "autoaugment":  # timm's RandAugment config string
        return ["rand-x", "autoaugment", "rand-m", ""]
    if kind == "trackers":  # --log: names of experiment trackers
        return ["mlflow", "jsonl,tb"]
    if kind == "freeze":  # none, backbone or blocks:N (N >= 1)
        return ["everything", "blocks:0", "blocks:x", "blocks:", "blocks:-1", ""]
    if kind == "loratargets":  # --lora-targets: layer names
        return ["attention", "qkv,proj_l", ""]
    if kind == "mesh_spec":
        return ["data=0", "tp=2", "data=2,data=2", ""]
    return []


# The smallest valid command line of each sub-command, so that only the flag under test is wrong.
PREFIX = {
    "train": ["train"],
    "evaluate": ["evaluate", "."],
    "attention": ["attention", "x.png", "--checkpoint", "m.safetensors"],
    "plot": ["plot", "."],
    "predict": ["predict", "m.safetensors", "x.png"],
}


def _all_bad_flags():
    cases = []
    for command, sub in _subcommands().items():
        for action in sub._actions:
            for value in _bad_values(action):
                if action.option_strings:
                    cases.append((command, PREFIX[command] + [action.option_strings[0], value],
                                  action.option_strings[0]))
                else:  # a positional argument: replace the prefix's
                    argv = [command, value] + PREFIX[command][2:]
                    cases.append((command, argv, action.metavar or action.dest))
            if action.option_strings and action.nargs is None:  # the value left out
                flag = action.option_strings[0]
                cases.append((command, PREFIX[command] + [flag], flag))
    return cases


BAD_FLAGS = _all_bad_flags()


def test_every_bad_flag_value_is_a_one_line_usage_error_naming_the_flag(capsys):
    assert len(BAD_FLAGS) > 150  # every option of every sub-command, several bad values each
    # Every checked flag (also one made from a new config field) has bad values to try.
    for command, sub in _subcommands().items():
        for action in sub._actions:
            if action.type not in (None, str, Path) or action.choices is not None:
                assert _bad_values(action), (command, action.option_strings, action.type)
    for _, argv, flag in BAD_FLAGS:
        message = _usage_error(argv, capsys)
        assert flag in message, (argv, message)


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A run directory holding only its configuration, as a run killed before its first checkpoint."""
    from cait_eqx.training import RunConfig

    run = tmp_path_factory.mktemp("runs") / "unfinished"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    return run


def test_values_that_only_fail_together_are_usage_errors(tmp_path, unfinished_run, capsys):
    cases = [
        (["train", "--lr", "0.01", "--min-lr", "0.1"], "`min_lr` must be at most `lr` (0.01)"),
        (["train", "--batch-size", "60", "--mesh", "data=8"], "--batch-size sets the global batch"),
        (["train", "--image-size", "10"], "not divisible by `patch_size` 4"),
        (["train", "--model", "cait_xxs24_224", "--image-size", "100"], "not divisible by `patch_size` 16"),
        (["train", "--heads", "3"], "must be divisible by `heads` (3)"),
        (["train", "--model", "cait_s24"], "argument --model: Unknown"),
        (["train", "--resume", str(unfinished_run), "--out", str(tmp_path)], "drop --out"),
        (["train", "--resume", str(unfinished_run), "--epochs", "3"], "drop --epochs"),
        (["train", "--out", str(unfinished_run)], "already holds a run"),
        (["evaluate", str(unfinished_run), "--checkpoint", "--ema"], "not allowed with argument"),
    ]
    for argv, message in cases:
        assert message in _usage_error(argv, capsys), argv


def test_a_missing_file_is_named(tmp_path, unfinished_run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["train", "--resume", str(empty)], f"No run configuration at {empty / 'config.json'}"),
        (["evaluate", str(empty)], f"No run configuration at {empty / 'config.json'}"),
        (["evaluate", str(unfinished_run)], f"model file not found: {unfinished_run / 'model.safetensors'}"),
        (["evaluate", str(unfinished_run), "--ema"], f"{unfinished_run / 'model_ema.safetensors'}"),
        (["evaluate", str(unfinished_run), "--checkpoint"], f"no checkpoints in {unfinished_run}"),
        (["train", "--dataset", f"npz:{tmp_path / 'gone.npz'}"], f"file not found: {tmp_path / 'gone.npz'}"),
    ]
    for argv, message in cases:
        assert message in _usage_error(argv, capsys), argv


def test_an_out_path_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a directory\n")
    assert str(taken) in _usage_error(["train", "--quick", "--no-progress", "--out", str(taken)], capsys)
