"""The `cait-eqx` command: quick training run (as in CI), evaluate, resume, usage errors, Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cait_eqx import cli

METRIC_KEYS = {
    "train": {"step", "epoch", "split", "loss", "accuracy", "lr", "images_per_s"},
    "test": {"step", "epoch", "split", "loss", "accuracy"},
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "quick"
    status = cli.main(["train", "--quick", "--no-progress", "--out", str(run_dir)])
    return status, run_dir


def test_quick_train_writes_a_complete_run_directory(quick_run, capsys):
    status, run_dir = quick_run
    assert status == 0
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "checkpoints",
        "curves.png",
        "summary.json",
        "model.safetensors",
    } <= names
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["model"]["image_size"] == [16, 16]
    assert config["model"]["channels"] == 1 and config["model"]["num_classes"] == 10
    assert config["data"]["dataset"] == "digits" and config["data"]["num_test"] == 360
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert set(record) == METRIC_KEYS[record["split"]]
    assert [r["step"] for r in records if r["split"] == "test"] == [44, 88]  # 1437 // 32 = 44 steps per epoch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 88
    # Two epochs of a tiny model already learn something: the training loss falls and the held-out accuracy
    # beats chance (10%; with 360 images, 15% is three standard deviations above it).
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.1
    assert summary["test_accuracy"] > 0.15
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_the_same_accuracy_and_a_confusion_matrix(quick_run, capsys, tmp_path):
    status, run_dir = quick_run
    summary = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["evaluate", str(run_dir), "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert f"top-1 accuracy: {100 * summary['test_accuracy']:.2f}%" in out
    assert "confusion matrix" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_examples"] == 360 and sum(map(sum, result["confusion"])) == 360
    assert result["top1"] == pytest.approx(summary["test_accuracy"])
    assert result["top5"] >= result["top1"]
    # The newest checkpoint is the final state, so it scores the same.
    assert cli.main(["evaluate", str(run_dir), "--checkpoint", "--json", str(tmp_path / "ckpt.json")]) == 0
    assert json.loads((tmp_path / "ckpt.json").read_text())["top1"] == pytest.approx(summary["test_accuracy"])


def test_resume_of_a_finished_run_adds_nothing(quick_run, tmp_path, capsys):
    _, run_dir = quick_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = (copy / "metrics.jsonl").read_text()
    assert cli.main(["train", "--resume", str(copy), "--no-progress"]) == 0
    assert (copy / "metrics.jsonl").read_text() == before
    assert "test accuracy" in capsys.readouterr().out


def test_stopping_before_the_first_log_line_is_clean(tmp_path, capsys):
    """`--max-steps` below `--log-every`: a checkpoint, no metrics yet, no curves, and the run continues."""
    run_dir = tmp_path / "short"
    assert cli.main(["train", "--quick", "--max-steps", "2", "--no-progress", "--out", str(run_dir)]) == 0
    assert "stopped after step 2/88" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == "" and not (run_dir / "curves.png").exists()
    assert cli.main(["train", "--resume", str(run_dir), "--max-steps", "10", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10] and (run_dir / "curves.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epochs", "0"], "--epochs: must be >= 1"),
        (["train", "--lr", "-1"], "--lr: must be in (0, inf]"),
        (["train", "--lr", "fast"], "--lr: expected a number"),
        (["train", "--dataset", "cifar"], "--dataset: expected digits, mnist"),
        (["train", "--dataset", "folder:/no/such/dir"], "image folder not found: /no/such/dir"),
        (["train", "--model", "cait_xxs25_224"], "Did you mean 'cait_xxs24_224'"),
        (["train", "--patch-size", "5"], "not divisible by `patch_size` 5"),
        (["train", "--dim", "30", "--heads", "4"], "must be divisible by `heads`"),
        (["train", "--label-smoothing", "1"], "--label-smoothing: must be in [0, 1)"),
        (["train", "--resume", "/no/such/run"], "directory not found"),
        (["evaluate", "/no/such/run"], "directory not found"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and message in err and "Traceback" not in err


def test_resume_refuses_new_settings(quick_run, capsys):
    _, run_dir = quick_run
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--resume", str(run_dir), "--lr", "0.1"])
    assert exit_info.value.code == 2
    assert "drop --lr" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """The installed `cait-eqx` script, interrupted mid-run, checkpoints, says how to resume, and resumes."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, CAIT_EQX_TYPECHECK="0")
    beside = Path(sys.executable).with_name("cait-eqx")  # the tests' own environment, activated or not
    script = str(beside) if beside.is_file() else shutil.which("cait-eqx")
    script = script or pytest.fail("the `cait-eqx` entry point is not installed")
    process = subprocess.Popen(
        [script, "train", "--quick", "--epochs", "200", "--no-progress", "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and f"cait-eqx train --resume {run_dir}" in err
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.json"))
    assert checkpoints
    stopped_at = json.loads(checkpoints[-1].read_text())["step"]
    assert 0 < stopped_at < 200 * 44
    # Resume for a few steps more: it starts where it stopped.
    assert (
        cli.main(["train", "--resume", str(run_dir), "--max-steps", str(stopped_at + 3), "--no-progress"])
        == 0
    )
    newest = sorted((run_dir / "checkpoints").glob("step-*.json"))[-1]
    assert json.loads(newest.read_text())["step"] == stopped_at + 3


def test_help_and_subcommands_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "attention", "plot"):
        assert command in out
