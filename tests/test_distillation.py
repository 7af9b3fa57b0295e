"""DeiT's distillation for a model without a distillation token: the losses, the teacher in the step, errors.

What would be wrong if these fail: a loss that is not DeiT's (another reduction than `sum / numel` for the
KL, `log_target` mishandled, the temperature applied once instead of squared, label smoothing or mixing
applied to the teacher's classes, alpha on the wrong term); a gradient flowing into the teacher; a teacher
that sees other images than the student (not augmented, not mixed); a teacher in training
mode, donated with the step's buffers, or missing from a resumed run; a teacher whose classes or input
size do not fit the data accepted, or refused with a traceback instead of a sentence that says what to do.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

import cait_eqx
from cait_eqx import cli, data, parallel, training

TINY = dict(
    image_size=8, patch_size=4, num_classes=10, dim=16, depth=2, cls_depth=1, heads=2, mlp_dim=32, channels=1
)


def _deit_loss(student, targets, teacher, kind, alpha, tau):
    """DeiT's `DistillationLoss.forward` (facebookresearch/deit, losses.py), written again in torch, with the
    class token's output as both `outputs` and `outputs_kd`."""
    student, targets, teacher = (
        torch.from_numpy(np.asarray(a, np.float64)) for a in (student, targets, teacher)
    )
    base = SoftTargetCrossEntropy()(student, targets)
    if kind == "soft":
        kd = (
            F.kl_div(
                F.log_softmax(student / tau, dim=1),
                F.log_softmax(teacher / tau, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / student.numel()
        )
    else:
        kd = F.cross_entropy(student, teacher.argmax(dim=1))
    return float(base * (1 - alpha) + kd * alpha)


@pytest.mark.parametrize(
    "kind, alpha, tau",
    [("hard", 0.5, 1.0), ("hard", 0.2, 3.0), ("soft", 0.5, 1.0), ("soft", 0.7, 3.0), ("soft", 1.0, 0.5)],
)
def test_the_losses_are_deits(kind, alpha, tau):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(6, 7)).astype(np.float32) * 3
    teacher = rng.normal(size=(6, 7)).astype(np.float32) * 3
    # Mixed, smoothed targets, as the step gives the base term.
    labels = training.smooth_labels(jnp.asarray([0, 1, 2, 3, 4, 5]), 7, 0.1)
    targets = 0.7 * labels + 0.3 * labels[::-1]
    ours = training.distillation_loss(
        jnp.asarray(student), targets, jnp.asarray(teacher), kind=kind, alpha=alpha, tau=tau
    )
    reference = _deit_loss(student, np.asarray(targets), teacher, kind, alpha, tau)
    assert ours.dtype == jnp.float32 and ours.shape == ()
    assert abs(float(ours) - reference) <= 1e-6 * max(1.0, abs(reference))
    # The hard formula at DeiT's default alpha: CE(student, y)/2 + CE(student, argmax teacher)/2.
    if kind == "hard" and alpha == 0.5:
        ce = lambda t: float(jnp.mean(training.cross_entropy(jnp.asarray(student), t)))  # noqa: E731
        by_hand = ce(targets) / 2 + ce(jax.nn.one_hot(teacher.argmax(-1), 7)) / 2
        assert abs(float(ours) - by_hand) <= 1e-6
    # The teacher's logits are constants: no gradient reaches them.
    grad = jax.grad(
        lambda t: training.distillation_loss(
            jnp.asarray(student), targets, t, kind=kind, alpha=alpha, tau=tau
        )
    )(jnp.asarray(teacher))
    assert not np.any(np.asarray(grad))
    with pytest.raises(ValueError, match="`kind` must be 'hard' or 'soft'"):
        training.distillation_loss(jnp.asarray(student), targets, jnp.asarray(teacher), kind="none")


# ---------------------------------------------------------------------------------------------- in the step


@pytest.fixture(scope="module")
def digits():
    train, test = data.train_test_split(data.load_digits(), test_fraction=0.2, seed=0)
    return train.subset(np.arange(96)), test.subset(np.arange(32))  # 8x8, 1 channel, 3 steps of 32


def _recipe(**overrides):
    values = dict(
        epochs=2,
        batch_size=32,
        lr=2e-3,
        warmup_epochs=0.5,
        crop_padding=1,
        mixup_alpha=0.5,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        log_every=1,
        eval_batch_size=32,
    )
    values.update(overrides)
    return training.TrainConfig(**values)


def _first_loss(model, train, config, teacher=None, mesh=None):
    losses = []
    training.fit(
        model,
        train,
        None,
        config,
        key=jr.key(3),
        max_steps=1,
        progress=False,
        teacher=teacher,
        mesh=mesh,
        on_step=lambda step, metrics: losses.append(metrics["loss"]),
    )
    return losses[0]


@pytest.mark.slow
def test_the_teacher_sees_the_students_images_in_the_same_step(digits):
    """A teacher equal to the student (no dropout): the soft term is zero only if both saw the same
    augmented and mixed images, so the loss is exactly (1 - alpha) times the plain one."""
    train, _ = digits
    student = cait_eqx.CaiT(**TINY, key=jr.key(0))
    plain = _first_loss(student, train, _recipe())
    soft = _first_loss(
        student,
        train,
        _recipe(distillation="soft", distillation_alpha=0.4, distillation_tau=2.0),
        teacher=student,
    )
    assert soft == pytest.approx(0.6 * plain, rel=1e-6)
    # Hard: the student's own predictions as labels, a different loss.
    hard = _first_loss(student, train, _recipe(distillation="hard"), teacher=student)
    assert abs(hard - plain) > 1e-3
    # Sharded over two devices: the same loss (the teacher replicated, the batch split).
    two = parallel.make_mesh(data=2)
    assert _first_loss(
        student, train, _recipe(distillation="hard"), teacher=student, mesh=two
    ) == pytest.approx(hard, rel=1e-5)


@pytest.mark.slow
def test_a_fit_with_a_teacher_trains_and_resumes_exactly(digits, tmp_path):
    train, test = digits
    student = cait_eqx.CaiT(**TINY, layer_dropout=0.1, key=jr.key(0))
    # A teacher of another shape, with dropout of its own (switched off: it runs in inference mode).
    teacher = cait_eqx.CaiT(**dict(TINY, dim=24, heads=3, mlp_dim=48), dropout=0.5, key=jr.key(1))
    config = _recipe(distillation="soft", distillation_tau=2.0)
    kept = [np.asarray(leaf) for leaf in jax.tree.leaves(eqx.filter(teacher, eqx.is_array))]
    full = training.fit(
        student,
        train,
        test,
        config,
        key=jr.key(1),
        run_dir=tmp_path / "full",
        progress=False,
        teacher=teacher,
    )
    plain = training.fit(student, train, test, _recipe(), key=jr.key(1), progress=False)
    assert full.status == "completed" and full.step == 6

    def losses(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [record["loss"] for record in records if record["split"] == "train"]

    assert np.all(np.isfinite(losses("full")))
    assert not np.allclose(
        np.asarray(jax.tree.leaves(eqx.filter(full.model, eqx.is_array))[0]),
        np.asarray(jax.tree.leaves(eqx.filter(plain.model, eqx.is_array))[0]),
    )
    # The teacher is neither donated nor changed.
    for before, after in zip(kept, jax.tree.leaves(eqx.filter(teacher, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))
    # Stopped mid-epoch and resumed with the same teacher: bit for bit the same run.
    training.fit(
        student,
        train,
        test,
        config,
        key=jr.key(1),
        run_dir=tmp_path / "cut",
        max_steps=4,
        progress=False,
        teacher=teacher,
    )
    resumed = training.fit(
        student,
        train,
        test,
        config,
        key=jr.key(1),
        run_dir=tmp_path / "cut",
        resume=True,
        progress=False,
        teacher=teacher,
    )
    for a, b in zip(
        jax.tree.leaves(eqx.filter((resumed.model, resumed.opt_state), eqx.is_array)),
        jax.tree.leaves(eqx.filter((full.model, full.opt_state), eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses("cut") == losses("full")


def test_a_teacher_that_does_not_fit_the_data_is_a_clear_error(digits):
    train, _ = digits
    student = cait_eqx.CaiT(**TINY, key=jr.key(0))
    config = _recipe(distillation="hard")
    five = cait_eqx.CaiT(**dict(TINY, num_classes=5), key=jr.key(1))
    with pytest.raises(ValueError, match="The teacher has 5 classes but the data have 10 classes"):
        training.fit(student, train, None, config, key=jr.key(0), progress=False, teacher=five)
    big = cait_eqx.CaiT(**dict(TINY, image_size=16), key=jr.key(1))
    with pytest.raises(
        ValueError,
        match=r"cannot take the data's 8x8 images of 1 channel.*CaiT for 16x16 images "
        r"of 1 channel.*--image-size",
    ):
        training.check_teacher(big, train)
    # A pure function is a teacher too, if it answers with the data's classes.
    training.check_teacher(lambda image: jnp.zeros(10) + image.mean(), train)
    with pytest.raises(ValueError, match=r"outputs of shape \(2, 3, 10\) for 2 images"):
        training.check_teacher(lambda image: jnp.zeros((3, 10)), train)
    with pytest.raises(ValueError, match="distillation` is 'hard' but no teacher was given"):
        training.fit(student, train, None, config, key=jr.key(0), progress=False)
    with pytest.raises(ValueError, match="distillation` is 'none' but a teacher was given"):
        training.fit(student, train, None, _recipe(), key=jr.key(0), progress=False, teacher=student)
    with pytest.raises(ValueError, match="`teacher` .* and `train.distillation` .* go together"):
        training.RunConfig(train=config)


# -------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_the_cli_distils_from_a_run_directory_and_resumes(tmp_path, capsys):
    teacher_dir, run_dir = tmp_path / "teacher", tmp_path / "student"
    assert cli.main(["train", "--quick", "--max-steps", "2", "--no-progress", "--out", str(teacher_dir)]) == 0
    argv = [
        "train",
        "--quick",
        "--dim",
        "16",
        "--teacher",
        str(teacher_dir),
        "--distillation",
        "hard",
        "--max-steps",
        "2",
        "--no-progress",
        "--out",
        str(run_dir),
    ]
    capsys.readouterr()
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"teacher: run {teacher_dir.resolve()}: checkpoints (dim 32" in err
    assert "; hard distillation, alpha 0.5" in err and "stopped after step 2/" in err
    config = training.Run(run_dir).config()
    assert config.teacher == str(teacher_dir.resolve()) and config.train.distillation == "hard"
    assert config.model["dim"] == 16
    # Resumed: the teacher is read again from the record; a new teacher or recipe is refused.
    assert cli.main(["train", "--resume", str(run_dir), "--max-steps", "3", "--no-progress"]) == 0
    assert "stopped after step 3/" in capsys.readouterr().err
    for flags, message in [
        (["--resume", str(run_dir), "--teacher", str(teacher_dir)], "drop --teacher"),
        (["--teacher", str(teacher_dir)], "--teacher and --distillation hard|soft go together"),
        (["--distillation", "soft"], "--teacher and --distillation hard|soft go together"),
        (
            ["--teacher", str(teacher_dir), "--distillation", "hard", "--image-size", "24"],
            "cannot take the data's 24x24 images of 1 channel",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *flags, "--out", str(tmp_path / "bad")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
