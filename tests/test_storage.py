"""Storage faults, made for real: a disk that fills up, and folders that cannot be written.

A full disk is a per-process file-size limit (`RLIMIT_FSIZE`, `ulimit -f`) in a child process: a write past
it fails with `EFBIG` (SIGXFSZ ignored, so the write fails instead of killing the process), which the
package treats as `ENOSPC`. No mount privileges are needed, so this runs in any CI. An unwritable folder is
a path that names a file, a path under a file, and `/proc`, where not even root can create a file.

What would be wrong if these fail:
- a full disk ends a run, a save or `cait-eqx predict` in a traceback instead of one sentence naming the file,
  the bytes it needed and the bytes free, and (for a run) the intact checkpoint and the resume command;
- it leaves a temporary file, a checkpoint without its description, or a cut line in `metrics.jsonl`, or
  loses the previous model or checkpoint;
- a failing TensorBoard writer ends the run;
- an unwritable `--out`, `--csv`, `--json` or `run_dir` is found only after compiling and training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.random as jr
import numpy as np
import pytest

import cait_eqx
from cait_eqx import cli, data, training

# No persistent compilation cache in the children: JAX would write its entries under the same limit (and
# leave cut ones behind for the other tests' processes).
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
ENV.update(CAIT_EQX_TYPECHECK="0", JAX_ENABLE_COMPILATION_CACHE="false")
TEMPORARY = re.compile(r"^\..+\.tmp$")
# Not even root can create a file here, on every Linux: `/proc` holds only what the kernel puts there.
READ_ONLY = Path("/proc/cait-eqx-storage-test")


# Runs argv[2:] with files that may not grow past argv[1] bytes: a write past it fails (EFBIG). SIGXFSZ is
# ignored, which exec keeps, so the write fails instead of killing the process. (A launcher rather than a
# `preexec_fn`, which would fork this multithreaded JAX process.)
_LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _script() -> str:
    beside = Path(sys.executable).with_name("cait-eqx")
    found = str(beside) if beside.is_file() else shutil.which("cait-eqx")
    return found or pytest.fail("the `cait-eqx` entry point is not installed")


def _cli(argv: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    launch = [] if limit is None else [sys.executable, "-c", _LIMITED, str(limit)]
    return subprocess.run([*launch, _script(), *argv], capture_output=True, text=True, env=ENV, timeout=600)


def _temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if TEMPORARY.match(path.name)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ a full disk

# Each write below is attempted under a file-size limit of 4,000 bytes, after its previous version was
# written without one; what it raised is printed as JSON.
_LIBRARY_WRITES = """
import json, resource, signal, sys
from pathlib import Path
import jax.random as jr
import cait_eqx
from cait_eqx import training, viz
from cait_eqx.training._metrics import MetricsLog

out = Path(sys.argv[1])
model = cait_eqx.CaiT(16, 4, 10, 32, 2, 2, 4, 64, key=jr.key(0))
other = cait_eqx.CaiT(16, 4, 10, 32, 2, 2, 4, 64, key=jr.key(1))
cait_eqx.save(out / "model.safetensors", model)
needed = {"save": cait_eqx.save(out / "sized.safetensors", other).stat().st_size}
(out / "sized.safetensors").unlink()
state = dict(model=model, opt_state=(), key=jr.key(0), epoch=0, batch_index=0, shuffle_seed=0)
training.save_checkpoint(out / "checkpoints", step=1, **state)
log = MetricsLog(out, None)
log.write({"step": 1, "split": "train", "loss": 1.0})
viz.plot_training_curves(out, out / "curves.png")

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.RLIM_INFINITY))
attempts = {
    "save": lambda: cait_eqx.save(out / "model.safetensors", other),
    "checkpoint": lambda: training.save_checkpoint(out / "checkpoints", step=2, **state),
    "metrics": lambda: log.write({"step": 2, "split": "train", "loss": 0.5, "note": "x" * 5000}),
    "curves": lambda: viz.plot_training_curves(out, out / "curves.png", dpi=300),
}
raised = {}
for name, attempt in attempts.items():
    try:
        attempt()
        raised[name] = None
    except OSError as error:
        raised[name] = dict(type=type(error).__name__, message=str(error), needed=error.needed,
                            free=error.free, errno=error.errno,
                            storage=isinstance(error, cait_eqx.StorageError))
print(json.dumps(dict(raised=raised, needed=needed)))
"""


def test_library_writes_on_a_full_disk_raise_a_disk_full_error_and_lose_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-c", _LIBRARY_WRITES, str(tmp_path)], capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name, error in report["raised"].items():
        assert error is not None, f"{name}: a write past the file-size limit raised nothing"
        assert error["type"] == "DiskFullError" and error["storage"] and error["errno"] == 27, (name, error)
        assert "\n" not in error["message"] and "file-size limit" in error["message"], error["message"]
        assert re.search(rf"it needs {error['needed']:,} bytes and {error['free']:,} bytes are free",
                         error["message"]), error["message"]
        assert error["needed"] > 4000 and error["free"] == pytest.approx(shutil.disk_usage(tmp_path).free,
                                                                         rel=0.05)
    messages = {name: error["message"] for name, error in report["raised"].items()}
    assert str(tmp_path / "model.safetensors") in messages["save"]
    assert report["raised"]["save"]["needed"] == report["needed"]["save"]  # the whole file's size, exactly
    assert str(tmp_path / "checkpoints" / "step-00000002.eqx") in messages["checkpoint"]
    assert str(tmp_path / "metrics.jsonl") in messages["metrics"]
    assert str(tmp_path / "curves.png") in messages["curves"]

    # The previous versions are whole and nothing is left behind: no temporary file, no data file without
    # its description, no cut line.
    assert _temporaries(tmp_path) == []
    assert cait_eqx.load(tmp_path / "model.safetensors").config.num_classes == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001.eqx",
                                                                          "step-00000001.json"]
    assert [info.step for info in training.list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(
        {"step": 1, "split": "train", "loss": 1.0}) + "\n"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# `fit` checkpoints at step 2, then resumes under a file-size limit that the next checkpoint exceeds.
_FIT_ON_A_FILLING_DISK = """
import json, resource, signal, sys
from pathlib import Path
import jax.random as jr, numpy as np
import cait_eqx
from cait_eqx import data, parallel, training

run_dir = Path(sys.argv[1])
train = data.load_digits().subset(np.arange(64))
model = cait_eqx.CaiT(8, 4, 10, 16, 1, 1, 2, 32, channels=1, key=jr.key(0))
config = training.TrainConfig(epochs=2, batch_size=16, checkpoint_every=2, log_every=1, eval_every=1)
steps = training.TrainSteps.build(config, 4, 10, parallel.make_mesh(data=1))
common = dict(config=config, key=jr.key(1), run_dir=run_dir, progress=False, steps=steps)
first = training.fit(model, train, None, max_steps=2, **common)
size = first.checkpoint.data_path.stat().st_size
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
try:
    training.fit(model, train, None, resume=True, **common)
    print(json.dumps(None))
except cait_eqx.DiskFullError as error:
    print(json.dumps(dict(message=str(error), size=size, needed=error.needed)))
"""


@pytest.mark.slow
def test_fit_on_a_disk_that_fills_up_names_the_intact_checkpoint_and_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", _FIT_ON_A_FILLING_DISK, str(run_dir)], capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report is not None, "a checkpoint past the file-size limit raised nothing"
    message = report["message"]
    assert "\n" not in message
    assert f"cannot write {run_dir / 'checkpoints' / 'step-00000004.eqx'}" in message
    assert f"it needs {report['size']:,} bytes" in message and report["needed"] == report["size"]
    assert "The last checkpoint, step-00000002 (step 2), is intact" in message
    assert f"cait-eqx train --resume {run_dir}" in message and "resume=True" in message
    assert _temporaries(run_dir) == []
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002.eqx",
                                                                         "step-00000002.json"]
    # metrics.jsonl holds whole lines only, up to the step the run reached.
    records = training.Run(run_dir).metrics()
    assert records and max(r["step"] for r in records) == 4


def test_cait_eqx_train_on_a_full_disk_prints_one_line_and_exits_1(tmp_path):
    """Fails at the first file (`config.json`, about 2 kB): one line, before any compilation."""
    run_dir = tmp_path / "run"
    result = _cli(["train", "--quick", "--no-progress", "--out", str(run_dir)], limit=1000)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    config = run_dir / "config.json"
    assert errors[0].startswith(f"cait-eqx train: error: File too large: cannot write {config}"), errors[0]
    assert "No checkpoint had been written yet" in errors[0]
    assert _temporaries(tmp_path) == []


@pytest.mark.slow
def test_cait_eqx_train_on_a_disk_that_fills_up_later_keeps_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    first = _cli(["train", "--quick", "--no-progress", "--max-steps", "3", "--checkpoint-every", "3",
                  "--out", str(run_dir)])
    assert first.returncode == 0, first.stderr[-3000:]
    size = (run_dir / "checkpoints" / "step-00000003.eqx").stat().st_size
    before = _sha(run_dir / "checkpoints" / "step-00000003.eqx")
    result = _cli(["train", "--resume", str(run_dir), "--no-progress"], limit=size // 2)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr
    assert line.startswith(f"cait-eqx train: error: File too large: cannot write "
                           f"{run_dir / 'checkpoints' / 'step-00000006.eqx'}"), line
    assert f"it needs {size:,} bytes" in line
    assert "The last checkpoint, step-00000003 (step 3), is intact" in line
    assert f"cait-eqx train --resume {run_dir}" in line
    assert _sha(run_dir / "checkpoints" / "step-00000003.eqx") == before and _temporaries(run_dir) == []


@pytest.fixture(scope="module")
def classifier_and_images(tmp_path_factory):
    """A small 1-channel classifier file and three digit images (PNG)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("predict")
    model = cait_eqx.CaiT(8, 4, 10, 16, 1, 1, 2, 32, channels=1, key=jr.key(0))
    cait_eqx.save(folder / "model.safetensors", model)
    images = folder / "images"
    images.mkdir()
    digits = data.load_digits()
    for i in range(3):
        pixels = np.asarray(digits.images[i, 0] * 255, dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    return folder / "model.safetensors", images


@pytest.mark.parametrize("flag", ["--csv", "--json"])
def test_predict_on_a_full_disk_prints_one_line_and_leaves_no_file(classifier_and_images, tmp_path, flag):
    model, images = classifier_and_images
    target = tmp_path / f"predictions.{flag[2:]}"
    result = _cli(["predict", str(model), str(images), flag, str(target)], limit=200)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"cait-eqx predict: error: File too large: cannot write {target}"), line
    assert re.search(r"it needs [\d,]+ bytes and [\d,]+ bytes are free", line)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_a_failing_tensorboard_writer_is_dropped_and_the_run_goes_on(tmp_path, caplog):
    """TensorBoard's event file outgrows the limit while metrics.jsonl does not (a record of many numbers
    is larger as events than as one JSON line)."""
    script = """
import json, resource, signal, sys
from pathlib import Path
from cait_eqx.training._metrics import MetricsLog
from cait_eqx.training._tracking import TensorBoardTracker

run_dir = Path(sys.argv[1])
log = MetricsLog(run_dir, None, [TensorBoardTracker(run_dir, None)])
record = lambda step: {"step": step, "split": "train", **{f"m{k}": 1.0 for k in range(50)}}
log.write(record(1))
events = next((run_dir / "tensorboard").iterdir()).stat().st_size
line = (run_dir / "metrics.jsonl").stat().st_size
limit = events * 3 // 2  # one more record's events do not fit, four records' lines do
assert 4 * line < limit < 2 * events, (line, events)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
for step in (2, 3, 4):
    log.write(record(step))
print(json.dumps(dict(trackers=len(log.trackers))))
log.close()
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"trackers": 0}
    assert "TensorBoardTracker failed (OSError: [Errno 27] File too large) and gets no more records" in (
        result.stderr)
    assert [r["step"] for r in training.Run(tmp_path).metrics()] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- folders we cannot write


def _unwritable(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Paths no file can be written under, even by root, and what the error says about each."""
    file = tmp_path / "a-file"
    file.write_text("not a folder\n")
    return {
        "a file": (file, "it is a file"),
        "under a file": (file / "sub", f"{file} is a file, not a folder"),
        "read-only": (READ_ONLY / "run", "no file can be created in /proc"),
    }


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_check_writable_dir_probes_for_real(tmp_path, case):
    path, says = _unwritable(tmp_path)[case]
    with pytest.raises(cait_eqx.NotWritableError, match=re.escape(says)) as caught:
        cait_eqx.check_writable_dir(path, "the run directory")
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    assert isinstance(caught.value, OSError)
    before = sorted(tmp_path.rglob("*"))
    assert cait_eqx.check_writable_dir(tmp_path / "new" / "deeper", "x") == tmp_path / "new" / "deeper"
    assert sorted(tmp_path.rglob("*")) == before  # the probe leaves nothing, creates no folder


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_fit_refuses_an_unwritable_run_dir_before_compiling(tmp_path, case):
    path, says = _unwritable(tmp_path)[case]
    train = data.load_digits().subset(np.arange(32))
    model = cait_eqx.CaiT(8, 4, 10, 16, 1, 1, 2, 32, channels=1, key=jr.key(0))
    compiled = []
    with pytest.raises(cait_eqx.NotWritableError, match=re.escape(says)):
        training.fit(model, train, None, training.TrainConfig(epochs=1, batch_size=16), key=jr.key(0),
                     run_dir=path, progress=False, compile_step=lambda step: compiled.append(step) or step)
    assert compiled == []  # the training step was not even built


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_cait_eqx_train_refuses_an_unwritable_out_in_one_line(tmp_path, case, capsys):
    path, says = _unwritable(tmp_path)[case]
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "--quick", "--no-progress", "--out", str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cait-eqx train: error: --out {path}: ") and says in err, err


@pytest.mark.parametrize("flag", ["--csv", "--json"])
@pytest.mark.parametrize("case", ["a file's folder", "under a file", "read-only", "a folder"])
def test_cait_eqx_predict_refuses_an_unwritable_output_before_loading_the_model(tmp_path, case, flag, capsys):
    cases = {name: (path / f"out.{flag[2:]}", says) for name, (path, says) in _unwritable(tmp_path).items()}
    cases["a file's folder"] = cases.pop("a file")
    cases["a folder"] = (tmp_path, "is a folder; give a file name")
    path, says = cases[case]
    with pytest.raises(SystemExit) as caught:
        # MODEL names nothing: the output is checked first, before anything is loaded or compiled.
        cli.main(["predict", str(tmp_path / "no-such-model"), str(tmp_path), flag, str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cait-eqx predict: error: {flag} {path}") and says in err, err


def _output_cases(tmp_path: Path, name: str) -> dict[str, tuple[Path, str]]:
    """Output files that cannot be written (even by root) and what the error says: in a folder that is a
    file, under a file, on a read-only file system, and a folder where a file is needed."""
    cases = {case: (path / name, says) for case, (path, says) in _unwritable(tmp_path).items()}
    cases["a file's folder"] = cases.pop("a file")
    cases["a folder"] = (tmp_path, "is a folder; give a file name")
    return cases


OUTPUT_CASES = ["a file's folder", "under a file", "read-only", "a folder"]


def _one_usage_line(caught, capsys, starts: str, says: str) -> None:
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(starts) and says in err, err


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_cait_eqx_evaluate_refuses_an_unwritable_json_before_loading_the_run(tmp_path, case, capsys):
    path, says = _output_cases(tmp_path, "results.json")[case]
    empty_run = tmp_path / "run"  # no model, no config: anything read first would fail otherwise
    empty_run.mkdir()
    with pytest.raises(SystemExit) as caught:
        cli.main(["evaluate", str(empty_run), "--json", str(path)])
    _one_usage_line(caught, capsys, f"cait-eqx evaluate: error: --json {path}", says)


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_cait_eqx_attention_refuses_an_unwritable_out_before_loading_the_model(tmp_path, case, capsys):
    path, says = _output_cases(tmp_path, "attn.png")[case]
    image, model = tmp_path / "image.png", tmp_path / "model.safetensors"
    image.write_bytes(b"not an image")  # files that exist but cannot be read: loading them would fail
    model.write_bytes(b"not a model")
    with pytest.raises(SystemExit) as caught:
        cli.main(["attention", str(image), "--checkpoint", str(model), "--out", str(path)])
    _one_usage_line(caught, capsys, f"cait-eqx attention: error: --out {path}", says)


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_cait_eqx_plot_refuses_an_unwritable_out_before_reading_the_metrics(tmp_path, case, capsys):
    path, says = _output_cases(tmp_path, "curves.png")[case]
    empty_run = tmp_path / "run"  # no metrics: reading them first would fail otherwise
    empty_run.mkdir()
    with pytest.raises(SystemExit) as caught:
        cli.main(["plot", str(empty_run), "--out", str(path)])
    _one_usage_line(caught, capsys, f"cait-eqx plot: error: --out {path}", says)


def test_cait_eqx_plot_into_a_run_directory_it_cannot_write_says_to_use_out(capsys):
    """Without --out the curves go into the run directory: one that cannot be written (here `/proc`, a
    folder not even root can create a file in) is a usage error that names --out."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["plot", "/proc"])
    _one_usage_line(caught, capsys, "cait-eqx plot: error: Cannot write curves.png to /proc: no file can be "
                    "created in /proc", "Or draw the curves elsewhere with --out FILE")
