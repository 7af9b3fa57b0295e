"""The measuring scripts in experiments/ whose figures the docs quote keep working and count what they say.

What would be wrong if these fail: `experiments/distillation.py` drawing a student's labelled digits from the
held-out fifth, or not 10 per class, or differently for the three conditions of a seed (then they are not
paired); its table taking differences of means where it claims paired differences by seed, or averaging
the wrong runs into a cell; the script no longer running end to end (teacher saved, loaded, teaching).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def distillation():
    spec = importlib.util.spec_from_file_location("distillation_experiment", EXPERIMENTS / "distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_students_labelled_digits_come_from_the_training_part(distillation):
    train, test = distillation.digits()
    assert (len(train), len(test)) == (1437, 360)  # the split of cait-eqx train and transfer.py
    labels_of = {}  # a training image's content -> its label(s)
    for image, label in zip(train.images, train.labels, strict=True):
        labels_of.setdefault(image.tobytes(), set()).add(int(label))
    draws = {seed: distillation.label_set(train, "k10", seed) for seed in (0, 1)}
    for seed, chosen in draws.items():
        assert np.bincount(chosen.labels, minlength=10).tolist() == [10] * 10
        # Every image is a training image, with its label: none comes from the held-out fifth.
        for image, label in zip(chosen.images, chosen.labels, strict=True):
            assert int(label) in labels_of.get(image.tobytes(), set())
        again = distillation.label_set(train, "k10", seed)  # each condition of the seed draws it again
        np.testing.assert_array_equal(again.images, chosen.images)
    assert not np.array_equal(draws[0].images, draws[1].images)
    assert distillation.label_set(train, "all", 5) is train


def test_the_table_pairs_the_conditions_by_seed(distillation, tmp_path, capsys):
    accuracy = {  # (set, condition, seed) -> accuracy; soft has no seed 2
        ("all", "none", 0): 0.90, ("all", "none", 1): 0.80, ("all", "none", 2): 0.70,
        ("all", "hard", 0): 0.91, ("all", "hard", 1): 0.82, ("all", "hard", 2): 0.73,
        ("all", "soft", 0): 0.95, ("all", "soft", 1): 0.80,
    }
    lines = [dict(role="teacher", params=1000, test_accuracy=0.99, steps=10, seconds=3.0)]
    for (name, condition, seed), acc in accuracy.items():
        lines.append(dict(role="student", label_set=name, condition=condition, seed=seed, params=10,
                          train_images=1437, test_accuracy=acc, seconds=10.0 + seed, teacher_agreement=1.0))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    distillation.table(path)
    out = capsys.readouterr().out
    assert "teacher: 1,000 parameters, 99.0 % on the held-out digits" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| all 1,437 |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:4] == ["80.0 ± 10.0 % (11 s)", "82.0 ± 9.0 % (11 s)", "87.5 ± 10.6 % (10 s)"]
    # hard - none per seed: +1, +2, +3. soft - none over the seeds both have (0, 1): +5 and 0, whereas
    # the difference of the cells' means would be +7.5.
    assert cells[4:] == ["+2.0 ± 1.0", "+2.5 ± 3.5"]
    assert "10 per class" not in out  # no runs, no row


@pytest.mark.slow
def test_the_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, CAIT_EQX_TYPECHECK="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "distillation.py"), "--smoke"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    # The teacher (untrained in the smoke) was saved, then loaded to teach a student for two steps.
    assert re.search(r"teacher: 35,938 parameters, [\d.]+% on the held-out digits after 0 steps", proc.stdout)
    assert re.search(r"k10 seed=0 soft: [\d.]+%", proc.stdout)
    assert re.search(r"\| 10 per class \(100\) \| — \| — \| [\d.]+ % \(\d+ s\) \| — \| — \|", proc.stdout)
    assert not list(tmp_path.iterdir())  # everything went to a scratch directory
