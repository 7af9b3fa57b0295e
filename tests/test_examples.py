"""Every script in examples/ runs in its quick mode and produces what it promises (so none of them rots)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cait_eqx
from cait_eqx.data import load_digits, train_test_split
from cait_eqx.training import evaluate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: int = 240) -> str:
    env = dict(os.environ, CAIT_EQX_TYPECHECK="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_every_example_has_a_quick_mode_and_a_test():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = set(re.findall(r'run_example\("(\w+\.py)"', Path(__file__).read_text()))
    assert set(scripts) == tested, f"examples without a test here: {sorted(set(scripts) - tested)}"
    for script in scripts:
        assert "--quick" in (EXAMPLES / script).read_text(), f"{script} has no --quick mode"


@pytest.mark.slow
def test_train_digits(tmp_path):
    out = run_example("train_digits.py", "--quick", "--out", str(tmp_path / "run"))
    match = re.search(r"test accuracy ([\d.]+)% \(top-5 ([\d.]+)%\)", out)
    assert match, out
    top1, top5 = float(match.group(1)), float(match.group(2))
    # Six epochs of the recipe learn: 38.3 %, 33.9 % and 35.8 % for seeds 0, 1, 2 (chance: 10 %; the former
    # two-epoch quick mode stayed at 10.0-10.3 %, predicting one class).
    assert top1 >= 25.0 and top5 >= top1, out
    model = cait_eqx.load(tmp_path / "run" / "model.safetensors")
    assert model.config.image_size == (16, 16) and model.config.num_classes == 10
    # The saved model is the trained one: on the same held-out split it scores what the script printed.
    _, test = train_test_split(load_digits(image_size=16), test_fraction=0.2, seed=0)
    assert f"{100 * evaluate(model, test).top1:.2f}" == match.group(1)
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_finetune(tmp_path):
    out = run_example("finetune.py", "--quick", "--out", str(tmp_path / "ft"))
    # One epoch of 64 images in batches of 32.
    assert re.search(r"test accuracy after 2 steps: [\d.]+%", out), out
    # The stand-in "official" model was 224x224 with 1000 classes: it must come back resized with a new head.
    model = cait_eqx.load(tmp_path / "ft" / "finetuned.safetensors")
    assert (
        model.config.image_size == (32, 32) and model.config.num_classes == 10 and model.config.channels == 3
    )
    # ... and trained: every block moved away from the pretrained weights it started from.
    start = cait_eqx.load_timm(tmp_path / "ft" / "stand_in.safetensors", image_size=32)
    weights = {
        "SA qkv": lambda m: m.blocks.attn.qkv.weight,
        "SA fc1": lambda m: m.blocks.mlp.fc1.weight,
        "CA q": lambda m: m.blocks_token_only[0].attn.q.weight,
    }
    for name, get in weights.items():
        before, after = np.asarray(get(start)), np.asarray(get(model))
        assert before.shape == after.shape and not np.array_equal(before, after), name


@pytest.mark.slow
def test_extract_features():
    out = run_example("extract_features.py", "--quick")
    match = re.search(
        r"random init: features \((\d+),\) per image; linear-probe test accuracy ([\d.]+)%", out
    )
    assert match, out
    # A linear probe on a random CaiT's features is far above chance (10 %): 78 % here, 70-79 % over the
    # random initialisations of keys 0-5.
    assert int(match.group(1)) == 64 and float(match.group(2)) >= 50.0, out


@pytest.mark.slow
def test_dense_readout():
    out = run_example("dense_readout.py", "--quick")
    assert re.search(r"majority class: ([\d.]+)%", out), out
    majority = float(re.search(r"majority class: ([\d.]+)%", out).group(1))
    found = re.findall(r"random init: block (\d+) maps \((\d+), (\d+), (\d+)\); per-patch ink readout test "
                       r"accuracy ([\d.]+)%", out)
    from cait_eqx.training import DEFAULT_MODEL

    depth, dim = DEFAULT_MODEL["depth"], DEFAULT_MODEL["dim"]
    assert [int(b) for b, *_ in found] == sorted({0, depth // 2, depth - 1}), out  # first, middle, last
    for _, channels, rows, cols, accuracy in found:
        assert (int(channels), int(rows), int(cols)) == (dim, 4, 4), out  # 16x16 digits, 4x4 patches
        # Whether a patch holds ink is linear in its pixels, which the patch embedding keeps: the maps of
        # even a random model read it out well above the majority class.
        assert float(accuracy) >= majority + 5, out


@pytest.mark.slow
def test_attention_maps(tmp_path):
    out = run_example("attention_maps.py", "--quick", "--out", str(tmp_path / "attn"))
    assert (tmp_path / "attn" / "digit_0.png").is_file()
    assert "class token keeps" in out


@pytest.mark.slow
def test_replicate_layerscale(tmp_path):
    run_example("replicate_layerscale.py", "--quick", "--out", str(tmp_path / "repl"))
    table = (tmp_path / "repl" / "table.md").read_text()
    results = [json.loads(p.read_text()) for p in (tmp_path / "repl").glob("depth*_lr*_*.json")]
    assert {r["condition"] for r in results} == {
        "cait",
        "frozen_layerscale",
        "no_layerscale",
        "no_talking_heads",
        "class_token",
    }
    assert table.count("\n") == 2 + len(results)  # header, rule, one row per condition
    for name in ("layerscale.png", "depth.png"):
        assert (tmp_path / "repl" / name).is_file()


def test_replicate_layerscale_refuses_to_overwrite_the_documented_results_in_quick_mode():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "replicate_layerscale.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--quick needs --out" in proc.stderr
