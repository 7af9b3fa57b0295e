"""Every script in examples/ runs in its quick mode and produces what it promises (so none of them rots)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cait_eqx

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


def test_train_digits(tmp_path):
    out = run_example("train_digits.py", "--quick", "--out", str(tmp_path / "run"))
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", out).group(1))
    assert 0.0 <= accuracy <= 100.0
    model = cait_eqx.load(tmp_path / "run" / "model.safetensors")
    assert model.config.image_size == (16, 16) and model.config.num_classes == 10
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_finetune(tmp_path):
    out = run_example("finetune.py", "--quick", "--out", str(tmp_path / "ft"))
    assert "test accuracy after" in out
    # The stand-in "official" model was 224x224 with 1000 classes: it must come back resized with a new head.
    model = cait_eqx.load(tmp_path / "ft" / "finetuned.safetensors")
    assert (
        model.config.image_size == (32, 32) and model.config.num_classes == 10 and model.config.channels == 3
    )


def test_extract_features():
    out = run_example("extract_features.py", "--quick")
    match = re.search(
        r"random init: features \((\d+),\) per image; linear-probe test accuracy ([\d.]+)%", out
    )
    assert match, out
    assert int(match.group(1)) == 64 and 0.0 <= float(match.group(2)) <= 100.0


def test_attention_maps(tmp_path):
    out = run_example("attention_maps.py", "--quick", "--out", str(tmp_path / "attn"))
    assert (tmp_path / "attn" / "digit_0.png").is_file()
    assert "class token keeps" in out


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
