"""Training faults: killed runs, interrupted checkpoint writes, and runs whose numbers blow up.

What would be wrong if these fail:
- a `cait-eqx train` killed at some moment (SIGKILL: no clean-up at all; SIGTERM; an impatient double
  Ctrl-C) cannot be resumed, or resumes to a different model than the run that was never interrupted;
- a checkpoint, the final model or the run's configuration can be seen half-written under its real name;
- pruning to the newest K checkpoints can leave no intact checkpoint at some instant;
- a learning rate so high that training diverges is not stopped at the step where the numbers stop being
  finite, or the checkpoint it leaves behind holds non-finite weights.

Bit-exactness: every run here is a CPU process with the same flags, environment and XLA build, and every
random draw comes from the run's key and seed (folded with the step), so a resumed run must produce the
same bytes as the uninterrupted one; no tolerance is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import cait_eqx
from cait_eqx import cli, data, training

ENV = dict(os.environ, CAIT_EQX_TYPECHECK="0")
# 3 epochs of 44 steps (digits, batch 32): a checkpoint every 3 steps, the newest 2 kept.
RUN = ["train", "--quick", "--epochs", "3", "--checkpoint-every", "3", "--keep-checkpoints", "2",
       "--no-progress"]
CHECKPOINT_NAME = re.compile(r"^step-\d{8}\.(eqx|json)$")
TEMPORARY_NAME = re.compile(r"^\..+\.tmp$")  # what an atomic write leaves behind when killed mid-write


def _script() -> str:
    """The `cait-eqx` program of the environment running the tests (its venv need not be activated)."""
    beside = Path(sys.executable).with_name("cait-eqx")
    found = str(beside) if beside.is_file() else shutil.which("cait-eqx")
    return found or pytest.fail("the `cait-eqx` entry point is not installed")


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([_script(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)


def _newest_step(run_dir: Path) -> int:
    steps = [int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step-*.json")]
    return max(steps, default=0)


def _assert_nothing_half_written(run_dir: Path) -> list[int]:
    """Every file under its real name is whole; returns the steps of the intact checkpoints."""
    json.loads((run_dir / "config.json").read_text())
    intact = []
    for path in sorted((run_dir / "checkpoints").iterdir()):
        assert CHECKPOINT_NAME.match(path.name) or TEMPORARY_NAME.match(path.name), path
        if path.suffix == ".json" and CHECKPOINT_NAME.match(path.name):
            description = json.loads(path.read_text())  # never a partial description
            blob = path.with_suffix(".eqx").read_bytes()  # a description is written only after its data
            assert hashlib.sha256(blob).hexdigest() == description["sha256"], f"{path} describes other bytes"
            intact.append(description["step"])
    if (run_dir / "model.safetensors").exists():
        cait_eqx.load(run_dir / "model.safetensors")
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())
    return intact


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def _wait_for_step(process: subprocess.Popen, run_dir: Path, after: int, target: int, timeout=120.0) -> bool:
    """Wait until the run has checkpointed a step beyond `after` and at least `target`; False if it ended."""
    deadline = time.monotonic() + timeout
    while not (_newest_step(run_dir) > after and _newest_step(run_dir) >= target):
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.005)
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run that is never interrupted: every interrupted run must end with its bytes."""
    reference = tmp_path_factory.mktemp("faults") / "reference"
    done = subprocess.run([_script(), *RUN, "--out", str(reference)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    return reference


# 2805159009: stops that, while a second Ctrl-C still raised `KeyboardInterrupt` from the signal handler,
# could land it in JAX's garbage-collection callback ("Exception ignored in: _xla_gc_callback ..."), and
# failed this test on a clean clone. A failing random seed is printed: add it here to keep it.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [2805159009, None], ids=["seed-2805159009", "random-seed"])
def test_killed_runs_resume_to_exactly_the_uninterrupted_model(tmp_path, reference, seed):
    """SIGKILL at a random moment, then SIGTERM, then a double Ctrl-C, resuming after each: same final bytes.

    The moments are random steps of the 132 (plus a random few milliseconds, so a stop lands anywhere in a
    step, an evaluation or a checkpoint write), drawn from a seed printed with any failure.
    """
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = random.Random(seed)
    first = rng.randint(4, 40)
    second = rng.randint(first + 10, 80)
    targets = [first, second, rng.randint(second + 10, 118)]
    note = f"(stops at steps {targets} drawn with random.Random({seed}))"

    run = tmp_path / "run"
    stops = [(signal.SIGKILL,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)]
    for number, (signals, target) in enumerate(zip(stops, targets, strict=True)):
        argv = [*RUN, "--out", str(run)] if number == 0 else ["train", "--resume", str(run), "--no-progress"]
        before = _newest_step(run) if run.exists() else 0
        process = _start(argv)
        assert _wait_for_step(process, run, before, target), f"{process.communicate()} {note}"
        time.sleep(rng.uniform(0.0, 0.03))
        for sig in signals:
            process.send_signal(sig)
            time.sleep(0.01)
        _, err = process.communicate(timeout=120)
        assert "Traceback" not in err and "terminate called" not in err, f"{err} {note}"
        if signals == (signal.SIGKILL,):
            assert process.returncode == -signal.SIGKILL, note
        elif signals == (signal.SIGTERM,):
            # Caught: a checkpoint of the last step and a hint. Only in the last instants of the run (after
            # the loop, while saving the final model) is the default handler back; the run is then complete
            # or resumable all the same.
            assert process.returncode in (130, -signal.SIGTERM), f"{process.returncode} {err} {note}"
            if process.returncode == 130:
                assert f"cait-eqx train --resume {run}" in err, err
        else:
            # A double Ctrl-C: the first asks for a checkpoint, the second to stop at once (without the
            # checkpoint or evaluation still to come); either way exit status 130 with the way to resume,
            # never a traceback nor a C++ abort at interpreter teardown (status -6).
            assert process.returncode == 130, f"{process.returncode} {err} {note}"
            assert f"cait-eqx train --resume {run}" in err, f"{err} {note}"
        intact = _assert_nothing_half_written(run)
        assert intact, f"no intact checkpoint left after stop {number} {note}"
        assert max(intact) >= min(target, before + 1), note

    final = subprocess.run([_script(), "train", "--resume", str(run), "--no-progress"], capture_output=True,
                           text=True, env=ENV)
    assert final.returncode == 0, final.stderr
    _assert_nothing_half_written(run)
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes(), note
    assert _metrics(run) == _metrics(reference), note
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] == json.loads((reference / "summary.json").read_text())["test_accuracy"]


# ------------------------------------------------------------------------------ interrupted checkpoint writes


def _tiny_state(seed: int):
    model = cait_eqx.CaiT(8, 4, 3, 8, 1, 1, 2, 8, channels=1, key=jr.key(seed))
    optim = training.make_optimizer(1e-3)
    state = optim.init(eqx.filter(model, eqx.is_array))
    return model, state


def _same(a, b) -> bool:
    leaves = [jax.tree.leaves(eqx.filter(tree, eqx.is_array)) for tree in (a, b)]
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(*leaves, strict=True))


def test_a_checkpoint_write_stopped_at_any_instant_leaves_an_intact_checkpoint(tmp_path, monkeypatch):
    """Photograph the directory before and after every rename, fsync and delete of a save with `keep=1`.

    Each photograph is what a SIGKILL at that instant would leave on disk (for a crash of the machine the
    fsyncs are what matter). From every one of them a checkpoint loads, intact and without warnings, and
    training can go on saving.
    """
    directory = tmp_path / "checkpoints"
    states = {step: _tiny_state(step) for step in (1, 2, 3)}
    key = jr.key(7)

    def save(where, step, keep):
        model, opt_state = states[step]
        return training.save_checkpoint(where, model=model, opt_state=opt_state, key=key, step=step, epoch=0,
                                        batch_index=step, shuffle_seed=0, keep=keep)

    save(directory, 1, keep=2)
    save(directory, 2, keep=2)
    photos: list[tuple[str, Path]] = []

    def photograph(label):
        target = tmp_path / f"photo-{len(photos):02d}"
        shutil.copytree(directory, target)
        for partial in target.glob(".*.tmp"):  # a kill inside the write leaves the temporary file short
            partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
        photos.append((label, target))

    def watched(name, real):
        def call(*args, **kwargs):
            photograph(f"before {name}{args[:1]}")
            result = real(*args, **kwargs)
            photograph(f"after {name}{args[:1]}")
            return result

        return call

    for name in ("replace", "fsync", "unlink"):
        monkeypatch.setattr(os, name, watched(name, getattr(os, name)))
    save(directory, 3, keep=1)  # writes step 3, then deletes steps 1 and 2
    monkeypatch.undo()
    assert len(photos) >= 16 and sorted(p.name for p in directory.iterdir()) == [
        "step-00000003.eqx", "step-00000003.json"]

    template = _tiny_state(0)
    seen = set()
    for label, photo in photos:
        model, opt_state, restored_key, info = training.load_checkpoint(photo, model=template[0],
                                                                        opt_state=template[1])
        assert info.step in (2, 3), label  # never the superseded step 1 alone, never nothing
        assert _same(model, states[info.step][0]) and _same(opt_state, states[info.step][1]), label
        seen.add(info.step)
        # Training goes on from here: its next save succeeds, and clears what the stop left behind.
        training.save_checkpoint(photo, model=model, opt_state=opt_state, key=restored_key,
                                 step=info.step + 1, epoch=0, batch_index=0, shuffle_seed=0, keep=1)
        left = sorted(p.name for p in photo.iterdir() if not TEMPORARY_NAME.match(p.name))
        assert left == [f"step-{info.step + 1:08d}.eqx", f"step-{info.step + 1:08d}.json"], (label, left)
    assert seen == {2, 3}


def test_old_checkpoints_go_only_after_the_new_one_is_read_back(tmp_path, monkeypatch):
    """A new checkpoint that does not read back (the disk returned other bytes) deletes nothing."""
    model, state = _tiny_state(1)
    for step in (1, 2):
        training.save_checkpoint(tmp_path, model=model, opt_state=state, key=jr.key(0), step=step, epoch=0,
                                 batch_index=step, shuffle_seed=0, keep=1)
    assert [i.step for i in training.list_checkpoints(tmp_path)] == [2]
    from cait_eqx.training import _checkpoint

    real = _checkpoint.atomic_write_bytes

    def corrupting(path, blob):
        if str(path).endswith(".eqx"):
            blob = blob[:-1] + bytes([blob[-1] ^ 1])
        return real(path, blob)

    monkeypatch.setattr(_checkpoint, "atomic_write_bytes", corrupting)
    with pytest.raises(training.CheckpointError, match="damaged"):
        training.save_checkpoint(tmp_path, model=model, opt_state=state, key=jr.key(0), step=3, epoch=0,
                                 batch_index=3, shuffle_seed=0, keep=1)
    monkeypatch.undo()
    with pytest.warns(training.CheckpointWarning, match="step-00000003.eqx is damaged"):
        _, _, _, info = training.load_checkpoint(tmp_path, model=model, opt_state=state)
    assert info.step == 2  # the only good checkpoint survived keep=1


# ---------------------------------------------------------------------------------------- numerical faults


@pytest.mark.slow
def test_a_diverging_learning_rate_stops_the_run_at_the_first_non_finite_step(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    flags = ["train", "--quick", "--epochs", "1", "--lr", "100", "--warmup-epochs", "0",
             "--checkpoint-every", "1", "--keep-checkpoints", "3", "--log-every", "1"]
    assert cli.main([*flags, "--no-progress", "--out", str(run)]) == 1
    err = capsys.readouterr().err
    match = re.search(r"stopped: Non-finite loss or gradient at step (\d+) .*update was not applied", err)
    assert match and "Traceback" not in err, err
    bad = int(match.group(1))
    losses = [r["loss"] for r in _metrics(run) if r["split"] == "train"]
    assert len(losses) == bad - 1 and bad > 3, "it should train a few steps before the numbers overflow"
    assert max(losses) > 100 * losses[0], "the loss should grow by orders of magnitude first: a divergence"
    assert f"The last checkpoint, {run / 'checkpoints' / f'step-{bad - 1:08d}.json'}, is intact" in err
    assert _assert_nothing_half_written(run) == [bad - 3, bad - 2, bad - 1]  # nothing at or after it
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    # The last checkpoint loads, and its weights are all finite: it is a good place to resume with a lower lr.
    config = training.load_run_config(run)
    train_data, _ = training.load_run_data(config)
    template = training.build_model(config, train_data, key=jr.key(0))
    optim, _ = training.build_optimizer(config.train, len(train_data) // config.train.batch_size)
    model, _, _, info = training.load_checkpoint(run / "checkpoints", model=template,
                                                 opt_state=optim.init(eqx.filter(template, eqx.is_array)))
    assert info.step == bad - 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))

    # With `--on-nonfinite skip` the same run goes to its end, naming each step it skipped (on the
    # "cait_eqx" logger without a progress bar: Python prints it on stderr unless logging is set up).
    skip = tmp_path / "skip"
    with caplog.at_level("WARNING", logger="cait_eqx"):
        assert cli.main([*flags, "--no-progress", "--on-nonfinite", "skip", "--out", str(skip)]) == 0
    said = "\n".join(record.getMessage() for record in caplog.records)
    skipped = [int(s) for s in re.findall(r"step (\d+): non-finite loss or gradient, update skipped", said)]
    summary = json.loads((skip / "summary.json").read_text())
    assert skipped and skipped[0] == bad and summary["skipped_steps"] == len(skipped), said
    final = cait_eqx.load(skip / "model.safetensors")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(eqx.filter(final, eqx.is_array)))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr=1e39 as float32
def test_an_update_that_overflows_is_refused_like_a_non_finite_gradient(tmp_path):
    train = data.load_digits().subset(np.arange(64))
    model = cait_eqx.CaiT(8, 4, 10, 16, 1, 1, 2, 16, channels=1, key=jr.key(0))
    # Finite as a Python float, infinite as the float32 the optimiser computes in: the first update overflows.
    config = training.TrainConfig(epochs=1, batch_size=16, lr=1e39, warmup_epochs=0.0, checkpoint_every=1)
    with pytest.raises(training.NonFiniteLossError) as caught:
        training.fit(model, train, None, config, key=jr.key(0), run_dir=tmp_path, progress=False)
    for info in training.list_checkpoints(tmp_path / "checkpoints"):
        opt_state = training.build_optimizer(config, 4)[0].init(eqx.filter(model, eqx.is_array))
        restored, _, _, _ = training.load_checkpoint(info.path, model=model, opt_state=opt_state)
        leaves = jax.tree.leaves(eqx.filter(restored, eqx.is_array))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), f"checkpoint {info.step} is not finite"
    assert caught.value.step == 1
