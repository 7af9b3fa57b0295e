"""The `cait-eqx` command: quick training run (as in CI), evaluate, resume, usage errors, Ctrl-C, and flags
made from the config dataclasses (a field without its flag, or a flag without a field, fails here)."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cait_eqx
from cait_eqx import cli, training

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


@pytest.mark.slow
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
    # The stop is cooperative: no exception swallowed inside JAX, no C++ abort on the way out.
    assert "Exception ignored" not in err and "terminate called" not in err, err
    assert "checkpoint saved in" in err
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


# ------------------------------------------------------------------------------- flags from the configs


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name]


def _config_flags() -> dict[str, str]:
    """Every command-line field of `CaiTConfig` and `TrainConfig` → its flag."""
    flags = {}
    for config_class in (cait_eqx.CaiTConfig, training.TrainConfig):
        for name, spec in cait_eqx.hyperparameters(config_class).items():
            if spec.cli:
                assert name not in flags, f"two configs declare `{name}`: their flags would collide"
                flags[name] = cait_eqx.flag_name(name, spec)
    return flags


def test_every_config_field_has_exactly_its_flag_and_every_other_flag_is_declared():
    train = _subparser("train")
    actions = {a.dest: a for a in train._actions if a.option_strings and a.dest != "help"}
    fields = _config_flags()
    for name, flag in fields.items():
        assert name in actions, f"config field `{name}` has no flag {flag}"
        action = actions[name]
        negated = [f"--no-{flag[2:]}"] if isinstance(action, argparse.BooleanOptionalAction) else []
        assert action.option_strings == [flag, *negated], (name, action.option_strings)
        assert action.default is None  # not given = the config's own default
    # Every other flag is one the command declares as its own (data, run, devices, --model).
    others = {action.option_strings[0] for dest, action in actions.items() if dest not in fields}
    assert others == set(cli.train.NON_CONFIG_FLAGS)
    assert not set(cli.train.NON_CONFIG_FLAGS) & set(fields.values())
    # Fields the data decide have no flag.
    for config_class in (cait_eqx.CaiTConfig, training.TrainConfig):
        for name, spec in cait_eqx.hyperparameters(config_class).items():
            assert spec.cli or name not in actions, name
    assert "num_classes" not in actions and "channels" not in actions
    # The spec's help, metavar and type are the flag's.
    specs = {
        **cait_eqx.hyperparameters(cait_eqx.CaiTConfig), **cait_eqx.hyperparameters(training.TrainConfig)
    }
    for name in fields.keys() - {"image_size"}:  # `--image-size` explains its data side
        action = actions[name]
        assert action.help.startswith(specs[name].help.replace("%", "%%")), name
        if action.choices is None and action.nargs != 0:
            assert action.metavar == specs[name].metavar, name


def test_new_config_fields_come_with_their_flags_into_the_run_config(tmp_path):
    parser = cli.build_parser()
    argv = ["train", "--cls-mlp-dim", "48", "--no-talking-heads", "--no-qkv-bias", "--dtype", "float32",
            "--remat", "full", "--mixup", "0.2", "--cutmix", "1", "--flip", "--image-size", "24",
            "--eval-batch-size", "7", "--out", str(tmp_path)]
    config = cli.train.run_config(parser.parse_args(argv), parser)
    assert config.model["cls_mlp_dim"] == 48 and config.model["talking_heads"] is False
    assert config.model["qkv_bias"] is False and config.model["dtype"] == "float32"
    assert config.model["image_size"] == 24 and config.image_size == 24  # square: one int, as always
    assert config.train.remat == "full" and config.train.mixup_alpha == 0.2 and config.train.cutmix_alpha == 1
    assert config.train.flip is True and config.train.eval_batch_size == 7
    # Not given: the defaults of the default model and of `TrainConfig`.
    plain = cli.train.run_config(parser.parse_args(["train"]), parser)
    assert {k: plain.model[k] for k in training.DEFAULT_MODEL} == training.DEFAULT_MODEL
    assert plain.train == training.TrainConfig() and plain.image_size == 16


def test_a_non_square_image_size_reaches_the_data_and_the_model(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--image-size", "16X24", "--quick", "--out", str(tmp_path)])
    config = cli.train.run_config(args, parser)
    assert config.model["image_size"] == (16, 24) and config.image_size == (16, 24)
    # Written to RUN_DIR/config.json and read back as the same run.
    (tmp_path / training.Run.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    assert training.Run(tmp_path).config() == config
    train_data, _ = training.load_run_data(config)
    assert train_data.image_size == (16, 24)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--image-size", "16x"], "--image-size: expected S or HxW"),
        (["train", "--dtype", "int8"], "--dtype: must be one of"),
        (["train", "--remat", "some"], "--remat: invalid choice: 'some'"),
        (["train", "--cls-mlp-dim", "0"], "--cls-mlp-dim: must be >= 1"),
    ],
)
def test_new_flags_are_checked_as_their_fields(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_help_imports_no_jax():
    """`cait-eqx --help` and `cait-eqx train --help` answer without importing JAX (seconds of start-up)."""
    code = (
        "import sys\n"
        "from cait_eqx.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'jax', 'jaxlib', 'equinox', 'optax'}))\n"
    )
    env = dict(os.environ, CAIT_EQX_TYPECHECK="1")  # the default: checking on must not pull JAX in either
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "--talking-heads, --no-talking-heads" in proc.stdout and "--max-steps" in proc.stdout
    assert out[-1] == "[]", f"building the parser imported {out[-1]}"


def test_an_interrupt_outside_the_training_loop_says_what_to_do(monkeypatch, tmp_path, capsys):
    """Ctrl-C while the data load (no run yet) or after the run has started: exit 130 and the next step."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "load_run_data", interrupted)
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--quick", "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    expected = f"the run had not started (no {run_dir / 'config.json'} yet): start it again"
    assert err == f"cait-eqx: interrupted; {expected}\n", err
    monkeypatch.undo()
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(training.RunConfig().to_dict()))
    monkeypatch.setattr(training, "train_run", interrupted)
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"cait-eqx: interrupted; continue from its newest checkpoint with: "
                        f"cait-eqx train --resume {run_dir}\n"), err


def test_list_models_prints_every_variant_and_main_reads_the_command_line(monkeypatch, capsys):
    """`cait-eqx train --list-models` (the program: `main()` reads `sys.argv`) prints the variants, one a
    line, and trains nothing."""
    monkeypatch.setattr(sys, "argv", ["cait-eqx", "train", "--list-models"])
    assert cli.main() == 0
    assert capsys.readouterr().out.splitlines() == list(cait_eqx.list_models())
