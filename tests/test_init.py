"""Runs that start from weights (`RunConfig.init`, `cait-eqx train --init SOURCE`), against real timm files.

What would be wrong if these fail: a kind of SOURCE not read (variant name through the Hub cache, timm or
deit `.pth`, `.safetensors`, a `cait_eqx.save` file, a finished or interrupted run directory); a tensor
changed that should be carried over as it is; the RGB kernels adapted otherwise than timm's
`adapt_input_conv`; the positional grid resampled otherwise than timm's `resample_abs_pos_embed`; a head
kept that does not fit the data, or replaced when it does; the resolved architecture not recorded, so that a
resumed run rebuilds another model, reads the source again or does not continue bit for bit; a bad SOURCE,
size or flag accepted, or refused with a traceback instead of a sentence that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import equinox as eqx
import huggingface_hub
import jax
import jax.random as jr
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from _timm_utils import randomise_, small_timm_cait
from timm.models.vision_transformer import VisionTransformer

import cait_eqx
from cait_eqx import cli, data, training

# The source: a random timm CaiT on 32x32 RGB images in 4x4 patches (an 8x8 grid), 5 classes. The data:
# the digits at 16x16, one channel, 10 classes, so the grid, the channels and the head all change.
SOURCE = dict(
    img_size=32,
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
    depth_token_only=1,
    num_classes=5,
    init_values=0.5,
)
RECIPE = dict(
    epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.5, mixup_alpha=0.5, log_every=1, eval_batch_size=64
)


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _assert_trees_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def digits():
    dataset = data.load_dataset("digits", image_size=16)
    train, test = data.train_test_split(dataset, test_fraction=0.2, seed=0)
    return train.subset(np.arange(96)), test.subset(np.arange(64))  # 3 steps per epoch of 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The source in every file layout, and its tensors."""
    directory = tmp_path_factory.mktemp("sources")
    state = small_timm_cait(seed=5, **SOURCE).state_dict()
    safetensors.torch.save_file(state, directory / "model.safetensors")
    torch.save(state, directory / "timm.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, directory / "deit.pth")
    cait_eqx.save(directory / "ours.safetensors", cait_eqx.load_timm(directory / "model.safetensors"))
    return dict(dir=directory, state={k: v.numpy() for k, v in state.items()})


def _config(source, **model):
    return training.RunConfig(model=model, init=str(source), train=training.TrainConfig(**RECIPE))


def _start(source, digits, run_dir, **model):
    """The model an `init` run starts from (no step taken), and the run's record."""
    summary = training.train_run(_config(source, **model), run_dir, data=digits, max_steps=0, progress=False)
    assert summary.fit.status == "max_steps" and summary.fit.step == 0
    return summary.fit.model, json.loads((run_dir / "config.json").read_text())


def _check_fitted_to_digits(model, state, *, head_kept=False):
    """`model` is the timm source `state` fitted to 16x16 one-channel images of 10 classes, timm's way."""
    ours = cait_eqx.to_timm_state_dict(model)
    assert set(ours) == set(state)
    proj = torch.from_numpy(state["patch_embed.proj.weight"])
    np.testing.assert_allclose(
        ours["patch_embed.proj.weight"], timm.models.adapt_input_conv(1, proj).numpy(), atol=1e-5, rtol=0
    )
    resampled = timm.layers.resample_abs_pos_embed(
        torch.from_numpy(state["pos_embed"]), [4, 4], old_size=[8, 8], num_prefix_tokens=0
    )
    np.testing.assert_allclose(ours["pos_embed"], resampled.numpy(), atol=1e-5, rtol=0)
    for key, value in state.items():
        if key.startswith("head."):
            if head_kept:
                np.testing.assert_array_equal(ours[key], value, err_msg=key)
            else:
                assert ours[key].shape[0] == 10 and ours[key].shape[1:] == value.shape[1:]
        elif key not in ("patch_embed.proj.weight", "pos_embed"):
            np.testing.assert_array_equal(ours[key], value, err_msg=key)


# --------------------------------------------------------------------------------- each kind of SOURCE


@pytest.mark.parametrize("name", ["model.safetensors", "timm.pth", "deit.pth", "ours.safetensors"])
def test_a_checkpoint_file_starts_a_run_fitted_to_the_data(files, digits, tmp_path, name):
    model, record = _start(files["dir"] / name, digits, tmp_path / "run", layer_dropout=0.1)
    _check_fitted_to_digits(model, files["state"])
    assert model.config.layer_dropout == 0.1 and model.config.channels == 1
    has_mode = lambda m: hasattr(m, "inference")  # noqa: E731
    modes = [m.inference for m in jax.tree.leaves(model, is_leaf=has_mode) if has_mode(m)]
    assert modes and not any(modes)  # training mode (a loaded model comes in inference mode)
    # The resolved architecture is the record, and the source.
    assert record["init"] == str(files["dir"] / name)
    assert record["model"] == {**model.config.kwargs(), "image_size": [16, 16]}
    assert (record["model"]["dim"], record["model"]["patch_size"], record["model"]["channels"]) == (32, 4, 1)


def test_the_input_channels_are_adapted_as_timm_does(files, getkey):
    """1 channel sums the RGB kernels; more repeat them, scaled by 3 / channels (timm's adapt_input_conv)."""
    source = cait_eqx.load_timm(files["dir"] / "model.safetensors")
    proj = torch.from_numpy(files["state"]["patch_embed.proj.weight"])
    for channels in (1, 2, 5):
        model, notes = training.adapt_to_data(
            source, image_size=(32, 32), channels=channels, num_classes=5, key=getkey()
        )
        expected = timm.models.adapt_input_conv(channels, proj).numpy()
        np.testing.assert_allclose(np.asarray(model.patch_embed.proj.weight), expected, atol=1e-5, rtol=0)
        _assert_trees_identical(model, cait_eqx.adapt_input_channels(source, channels))
        rule = "RGB kernels summed" if channels == 1 else f"RGB kernels repeated, scaled by 3/{channels}"
        assert notes == [
            f"input channels 3 -> {channels} ({rule}; timm's adapt_input_conv)",
            "head kept: its 5 classes fit the data",
        ]


def _cache_like_the_hub(cache_dir, name, state):
    """A real timm checkpoint laid out as huggingface_hub's cache holds it: a blob named by its SHA-256,
    a snapshot linking to it, `refs/main` naming the snapshot."""
    repo = cache_dir / f"models--{cait_eqx.hub_repo_id(name).replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    staging = cache_dir / "staging.safetensors"
    safetensors.torch.save_file(state, staging)
    sha = hashlib.sha256(staging.read_bytes()).hexdigest()
    staging.rename(repo / "blobs" / sha)
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    os.symlink(f"../../blobs/{sha}", repo / "snapshots" / commit / "model.safetensors")


def test_a_variant_name_reads_its_weights_from_the_hub_cache_offline(tmp_path, monkeypatch, capsys):
    """`cait-eqx train --init cait_xxs24_224` with no network: the cached copy of the published file."""
    cache = tmp_path / "hub"
    reference = randomise_(timm.create_model("cait_xxs24_224", pretrained=False), seed=7)
    state = reference.state_dict()
    _cache_like_the_hub(cache, "cait_xxs24_224", state)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    run_dir = tmp_path / "run"
    argv = ["train", "--init", "cait_xxs24_224", "--max-steps", "0", "--no-progress", "--out", str(run_dir)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert (
        "init: cait_xxs24_224: published weights (dim 192, depth 24+2, patch 16, 224x224x3, 1000 classes)"
        in err
    )
    assert "init: positional grid resampled 14x14 -> 1x1 (bicubic) for 16x16 images" in err
    assert "init: input channels 3 -> 1" in err and "init: new head: 1000 -> 10 classes" in err
    record = json.loads((run_dir / "config.json").read_text())
    assert record["init"] == "cait_xxs24_224" and record["model_name"] is None
    expected = cait_eqx.variant_config("cait_xxs24_224")
    for name in ("dim", "depth", "cls_depth", "heads", "mlp_dim", "patch_size", "init_values"):
        assert record["model"][name] == expected[name], name
    assert (record["model"]["image_size"], record["model"]["channels"]) == ([16, 16], 1)
    # The run's checkpoint-free start is the cached file's weights (here: a block deep inside the scan).
    model = training.initial_model(
        training.Run(run_dir).config(), training.Run(run_dir).data()[0], key=jr.key(0)
    )[0]
    ours = cait_eqx.to_timm_state_dict(model)
    for key in ("blocks.17.attn.proj_l.weight", "blocks_token_only.1.mlp.fc2.bias", "norm.weight"):
        np.testing.assert_array_equal(ours[key], state[key].numpy(), err_msg=key)


# ------------------------------------------------------------------------- runs: record, resume, as SOURCE


@pytest.fixture(scope="module")
def runs(files, digits, tmp_path_factory):
    """An `init` run done in one go, and the same run stopped and resumed twice: once after a checkpoint
    (mid-epoch, step 4 of 6), once before its first one (step 0). Copies of the stopped runs are kept as
    interrupted run directories."""
    root = tmp_path_factory.mktemp("runs")
    config = _config(files["dir"] / "model.safetensors", layer_dropout=0.1)
    out = {"root": root}
    out["full"] = training.train_run(config, root / "full", data=digits, progress=False)
    for name, stop in (("cut", 4), ("early", 0)):
        stopped = training.train_run(config, root / name, data=digits, max_steps=stop, progress=False)
        assert stopped.fit.status == "max_steps" and stopped.fit.step == stop
        shutil.copytree(root / name, root / f"{name}-interrupted")
        out[name] = training.train_run(config, root / name, data=digits, resume=True, progress=False)
    return out


@pytest.mark.slow
def test_an_init_run_resumes_bit_for_bit_after_and_before_its_first_checkpoint(runs, files):
    full = runs["full"].fit
    assert full.status == "completed" and full.step == 6
    for name in ("cut", "early"):
        resumed = runs[name].fit
        assert resumed.status == "completed" and resumed.step == 6
        _assert_trees_identical(resumed.model, full.model)
        _assert_trees_identical(resumed.opt_state, full.opt_state)
        assert resumed.test.top1 == full.test.top1
    strip = lambda run: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "images_per_s"}
        for line in (runs["root"] / run / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip("cut") == strip("full") == strip("early")
    # The run trained the source, not something else: its SA weights moved from the source's, a little.
    trained = cait_eqx.to_timm_state_dict(full.model)["blocks.0.attn.qkv.weight"]
    source = files["state"]["blocks.0.attn.qkv.weight"]
    assert 0 < np.max(np.abs(trained - source)) < 0.1 * np.max(np.abs(source))


@pytest.mark.slow
def test_resuming_after_a_checkpoint_does_not_read_the_source_again(runs, files, digits, tmp_path):
    # A copy of the interrupted run whose source is gone: resuming needs only the record and checkpoint.
    gone = tmp_path / "gone.safetensors"
    shutil.copy(files["dir"] / "model.safetensors", gone)
    config = _config(gone, layer_dropout=0.1)
    training.train_run(config, tmp_path / "run", data=digits, max_steps=0, progress=False)
    gone.unlink()
    run_dir = tmp_path / "cut"
    shutil.copytree(runs["root"] / "cut-interrupted", run_dir)
    record = json.loads((run_dir / "config.json").read_text())
    record["init"] = str(gone)
    (run_dir / "config.json").write_text(json.dumps(record))
    resumed = training.train_run(
        training.Run(run_dir).config(), run_dir, resume=True, data=digits, progress=False
    )
    _assert_trees_identical(resumed.fit.model, runs["full"].fit.model)
    # Before the first checkpoint the source is read again, and must still give the recorded architecture.
    with pytest.raises(ValueError, match="no such path"):
        training.train_run(config, tmp_path / "run", data=digits, resume=True, progress=False)
    other = small_timm_cait(seed=5, **dict(SOURCE, embed_dim=16)).state_dict()
    safetensors.torch.save_file(other, gone)
    with pytest.raises(ValueError, match=r"recorded another architecture .*dim: 32 recorded, 16 now"):
        training.train_run(config, tmp_path / "run", data=digits, resume=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "cut-interrupted"])
def test_a_run_directory_is_a_source_and_its_head_is_kept(runs, digits, tmp_path, name):
    """A finished run gives its final model, an interrupted one its newest checkpoint's; both fit the
    digits already, so nothing changes but the rates asked for."""
    source = training.Run(runs["root"] / name)
    expected = source.model("final" if name == "full" else "checkpoint")
    model, record = _start(source.path, digits, tmp_path / "run")
    _assert_trees_identical(model, expected)
    assert model.config == expected.config and record["model"]["layer_dropout"] == 0.1
    model, _ = _start(source.path, digits, tmp_path / "run2", layer_dropout=0.0)
    assert model.config == expected.config.replace(layer_dropout=0.0)
    loaded = training.load_source(source.path)
    assert (
        loaded.kind == "run"
        and ("model.safetensors" if name == "full" else "checkpoints") in loaded.description
    )
    _, notes = training.adapt_to_data(
        loaded.model, image_size=(16, 16), channels=1, num_classes=10, key=jr.key(0)
    )
    assert notes == ["head kept: its 10 classes fit the data"]


@pytest.mark.slow
def test_the_cli_starts_from_a_run_directory_and_says_what_it_changed(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    source = (runs["root"] / "full").resolve()
    argv = [
        "train",
        "--init",
        str(source),
        "--image-size",
        "24",
        "--layer-dropout",
        "0.2",
        "--quick",
        "--max-steps",
        "2",
        "--no-progress",
        "--out",
        str(run_dir),
    ]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"init: run {source}: model.safetensors (dim 32, depth 2+1, patch 4, 16x16x1, 10 classes)" in err
    assert "init: positional grid resampled 4x4 -> 6x6 (bicubic) for 24x24 images" in err
    assert "init: head kept" in err and "init: rates set: layer_dropout 0.1 -> 0.2" in err
    assert "stopped after step 2/" in err
    config = training.Run(run_dir).config()
    assert config.init == str(source) and config.image_size == 24 and config.train.epochs == 2  # --quick
    assert config.model["image_size"] == (24, 24) and config.model["layer_dropout"] == 0.2
    # --resume goes on from the checkpoint with the recorded architecture; --init with it is refused.
    assert cli.main(["train", "--resume", str(run_dir), "--max-steps", "3", "--no-progress"]) == 0
    assert "stopped after step 3/" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ errors


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    return err


def test_a_source_that_is_not_a_cait_is_refused(tmp_path, capsys):
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(cait_eqx.WeightsError, match="does not hold a CaiT"):
        training.load_source(tmp_path / "vit.safetensors")
    err = _usage_error(
        ["train", "--init", str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "r")], capsys
    )
    assert "does not hold a CaiT" in err and "SOURCE must be a CaiT checkpoint" in err
    err = _usage_error(["train", "--init", "cait_xxs25_224", "--out", str(tmp_path / "r")], capsys)
    assert "is not a variant name, a file or a run directory" in err
    err = _usage_error(["train", "--init", str(tmp_path), "--out", str(tmp_path / "r")], capsys)
    assert "not a cait_eqx run" in err
    assert not (tmp_path / "r").exists()


def test_a_patch_size_that_does_not_divide_the_data_names_a_size_that_works(files, tmp_path, capsys):
    err = _usage_error(
        [
            "train",
            "--init",
            str(files["dir"] / "model.safetensors"),
            "--image-size",
            "18",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert "patch size 4 does not divide the data's 18x18 images" in err and "--image-size 16x16" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dim", "64", "--depth", "3"], "--init takes the architecture from SOURCE; drop --depth, --dim"),
        (["--patch-size", "8"], "drop --patch-size (only the rates --dropout, --emb-dropout"),
        (["--model", "cait_xxs24_224"], "--init takes the architecture from SOURCE; drop --model"),
    ],
)
def test_structure_flags_and_model_with_init_are_usage_errors(files, flags, message, tmp_path, capsys):
    argv = ["train", "--init", str(files["dir"] / "model.safetensors"), *flags, "--out", str(tmp_path / "r")]
    assert message in _usage_error(argv, capsys)


@pytest.mark.slow
def test_resume_refuses_init_and_run_config_refuses_structure(runs, files, capsys):
    err = _usage_error(["train", "--resume", str(runs["root"] / "full"), "--init", "cait_xxs24_224"], capsys)
    assert "drop --init" in err
    with pytest.raises(
        ValueError,
        match=r"sets cls_depth, depth, dim, heads, mlp_dim, patch_size, but with "
        r"`init` .* e\.g\. `model=\{\}`",
    ):
        training.RunConfig(init=str(files["dir"] / "model.safetensors"))  # the default model's keys
    # A record of an older version, without `init`, still reads.
    record = json.loads((runs["root"] / "full" / "config.json").read_text())
    del record["init"]
    assert training.RunConfig.from_dict(record).init is None
