"""Gradient accumulation: `TrainConfig.grad_accum_steps` K runs a step's batch as K micro-batches.

What would be wrong, and which test sees it:
- a gradient that is not the whole batch's mean (a sum, the last micro-batch's only, a micro-batch's mean
  weighted wrongly), mixing, augmentation or per-example keys drawn per micro-batch instead of as the big
  batch draws them, a teacher that sees other images, EMA / layer decay / clipping applied per micro-batch:
  `test_an_accumulated_step_equals_one_big_batch`, which compares the gradient the optimiser receives, the
  metrics and the new parameters and optimiser state with one step on the whole batch;
- `step_chunk`'s parts (the step's gradient taken in parts for speed) changing the step, or not happening:
  `test_a_step_taken_in_parts_equals_one_big_batch` (the same comparison, and the traced step's one scan
  over the parts), `test_the_trainers_step_takes_automatic_parts_on_one_cpu_device`;
- micro-batches cut across devices wrongly, or a mesh whose result depends on K:
  `test_accumulation_on_a_mesh_equals_one_big_batch_on_one_device`;
- activations of the whole batch kept alive (the memory K is for): `test_peak_memory_is_one_micro_batchs`;
- the schedule, logging, checkpoints or `max_steps` counting micro-batches, or a resume that is not exact:
  `test_fit_counts_optimiser_steps_and_resumes_exactly`;
- bad values found late or with a traceback (parts that a mesh cannot share too):
  `test_bad_accumulation_is_refused_before_anything_runs`,
  `test_bad_accumulation_flags_are_usage_errors`.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import cait_eqx
from cait_eqx import cli, data, parallel, training

TINY = dict(
    image_size=8, patch_size=4, num_classes=10, dim=16, depth=3, cls_depth=2, heads=2, mlp_dim=32, channels=1
)
BATCH = 16


def _model(key, **overrides):
    return cait_eqx.CaiT(**(TINY | overrides), key=key)


def _capture_gradient() -> optax.GradientTransformation:
    """Keeps the gradient the optimiser receives in its state (first in a chain), passing it on unchanged."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, eqx.filter(params, eqx.is_inexact_array))

    def update(updates, state, params=None):
        del state, params
        return updates, updates

    return optax.GradientTransformation(init, update)


# Every per-batch draw and every optimiser piece a micro-batch could get wrong, in three recipes.
RECIPES = {
    "mixing-ema-layer-decay": (
        dict(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.7, switch_prob=0.5,
             crop_padding=1, flip=True, reprob=0.5),
        dict(ema_decay=0.9, layer_decay=0.75, clip_norm=0.5),
    ),
    "soft-distillation-frozen-blocks": (
        dict(label_smoothing=0.1, mixup_alpha=0.8, distillation="soft", distillation_tau=2.0,
             freeze="blocks:2"),
        dict(ema_decay=0.9),
    ),
    "hard-distillation-probe": (
        dict(cutmix_alpha=1.0, distillation="hard", freeze="backbone"),
        dict(layer_decay=0.75),
    ),
}


def _step_result(step_config, optim_kwargs, accum, *, mesh=None, step_chunk=None):
    model = _model(jr.key(0), layer_dropout=0.2, dropout=0.1)
    teacher = _model(jr.key(7)) if step_config.get("distillation", "none") != "none" else None
    config = training.StepConfig(num_classes=10, grad_accum_steps=accum, step_chunk=step_chunk, **step_config)
    optim = optax.chain(_capture_gradient(), training.make_optimizer(1e-2, **optim_kwargs))
    opt_state = optim.init(training.trainable_params(model, config.freeze))
    images = jr.randint(jr.key(1), (BATCH, 1, 8, 8), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(BATCH) % 10
    pure = training.make_train_step(optim, config, jit=False)
    step = training.make_train_step(optim, config) if mesh is None else parallel.shard_train_step(pure, mesh)
    extra = () if teacher is None else (teacher,)
    new_model, new_state, metrics = step(model, opt_state, (images, labels), jr.key(2), *extra)
    return jax.device_get((eqx.filter(new_model, eqx.is_array), new_state, metrics))


def _assert_same_step(got, want):
    (model, state, metrics), (model_want, state_want, metrics_want) = got, want
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[name], metrics_want[name], rtol=2e-6, err_msg=name)
    assert bool(metrics["finite"]) and bool(metrics_want["finite"])
    # The gradient the optimiser received: the whole batch's mean, up to float32 rounding.
    grads, grads_want = jax.tree.leaves(state[0]), jax.tree.leaves(state_want[0])
    assert len(grads) == len(grads_want) > 0
    # Each leaf to rounding of its own size; a leaf whose true gradient is ~0 (sums that cancel) to rounding
    # of the gradient's size.
    largest = max(float(np.abs(b).max()) for b in grads_want)
    for a, b in zip(grads, grads_want, strict=True):
        scale = max(float(np.abs(b).max()), 1e-3 * largest)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * scale)
    # What follows from it: parameters, Adam moments, EMA. Adam's first step is lr * g / (|g| + eps), which
    # turns a rounding difference of a small gradient into a larger one of the step: within 0.1% of a step
    # (lr = 1e-2); a gradient of another batch moves parameters by a whole step.
    for a, b in zip(jax.tree.leaves((model, state[1:])), jax.tree.leaves((model_want, state_want[1:])),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# The two longest recipes run in the slow tier (`pytest -m slow`); the probe's runs in every test command.
@pytest.mark.parametrize("recipe", [
    pytest.param(name, marks=[pytest.mark.slow] if name != "hard-distillation-probe" else [])
    for name in RECIPES
], ids=list(RECIPES))
def test_an_accumulated_step_equals_one_big_batch(recipe):
    step_config, optim_kwargs = RECIPES[recipe]
    want = _step_result(step_config, optim_kwargs, 1)
    _assert_same_step(_step_result(step_config, optim_kwargs, 4), want)


@pytest.mark.parametrize(("recipe", "accum", "step_chunk", "parts"), [
    ("hard-distillation-probe", 2, 4, 4),
    pytest.param("mixing-ema-layer-decay", 2, 3, 8, marks=pytest.mark.slow),
])
def test_a_step_taken_in_parts_equals_one_big_batch(recipe, accum, step_chunk, parts):
    # `step_chunk` cuts the batch (or each accumulated micro-batch) into parts for speed only: the step is the
    # whole batch's. 2 micro-batches of 8, at most 4 a part: 4 parts; at most 3 a part: 8 parts of 2.
    # (This process has 8 devices, so the automatic chunk is off and `step_chunk=None` runs the batch whole.)
    step_config, optim_kwargs = RECIPES[recipe]
    config = training.StepConfig(num_classes=10, grad_accum_steps=accum, step_chunk=step_chunk, **step_config)
    pure = training.make_train_step(training.make_optimizer(1e-2), config, jit=False)
    model = _model(jr.key(0))
    opt_state = training.make_optimizer(1e-2).init(training.trainable_params(model, config.freeze))
    batch = (jnp.zeros((BATCH, 1, 8, 8), jnp.uint8), jnp.arange(BATCH) % 10)
    teacher = (_model(jr.key(7)),) if config.distillation != "none" else ()
    # The models closed over: their static fields (dropout rates) stay Python numbers.
    traced = jax.make_jaxpr(lambda state, b, k: pure(model, state, b, k, *teacher))
    jaxpr = traced(opt_state, batch, jr.key(2))
    lengths = [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert lengths == [parts], f"expected one scan over {parts} parts at the top of the step, got {lengths}"
    want = _step_result(step_config, optim_kwargs, 1)
    _assert_same_step(_step_result(step_config, optim_kwargs, accum, step_chunk=step_chunk), want)


def test_the_trainers_step_takes_automatic_parts_on_one_cpu_device(monkeypatch):
    # 32×32 images in 2×2 patches: 257 tokens an image, so `auto_train_chunk` is 4 and a batch of 16 runs
    # as 4 parts, when JAX has one CPU device (as a plain process has); on this process's 8 devices, whole.
    model = _model(jr.key(0), image_size=32, patch_size=2)
    assert cait_eqx.auto_train_chunk(model.config) == 4
    optim = training.make_optimizer(1e-2)
    pure = training.make_train_step(optim, training.StepConfig(num_classes=10), jit=False)
    opt_state = optim.init(training.trainable_params(model))
    batch = (jnp.zeros((BATCH, 1, 32, 32), jnp.uint8), jnp.arange(BATCH) % 10)

    def top_scans():
        jaxpr = jax.make_jaxpr(lambda state, b, k: pure(model, state, b, k))(opt_state, batch, jr.key(2))
        return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]

    assert 4 not in top_scans()  # the model's own scans over its 3 SA blocks, forward and backward
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # as on a CPU-only host, wherever this runs
    assert top_scans() == [4]


@pytest.mark.parametrize("recipe", [
    pytest.param("mixing-ema-layer-decay", marks=pytest.mark.slow),
    pytest.param("soft-distillation-frozen-blocks", marks=pytest.mark.slow),
    "hard-distillation-probe",
])
def test_accumulation_on_a_mesh_equals_one_big_batch_on_one_device(recipe):
    step_config, optim_kwargs = RECIPES[recipe]
    want = _step_result(step_config, optim_kwargs, 1)
    # 16 images, 2 micro-batches of 8, each split over data=2 × fsdp=2 devices.
    got = _step_result(step_config, optim_kwargs, 2, mesh=parallel.make_mesh(data=2, fsdp=2))
    _assert_same_step(got, want)


def _scratch_bytes(batch, accum):
    model = _model(jr.key(0), image_size=32, dim=32, mlp_dim=64, heads=4, depth=2)
    config = training.StepConfig(num_classes=10, grad_accum_steps=accum)
    optim = training.make_optimizer(1e-3)
    step = training.make_train_step(optim, config)
    images = jnp.zeros((batch, 1, 32, 32), jnp.uint8)
    state = optim.init(training.trainable_params(model))
    lowered = eqx.filter_jit(training.make_train_step(optim, config, jit=False)).lower(
        model, state, (images, jnp.zeros(batch, jnp.int32)), jr.key(0)
    )
    del step
    params = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    return lowered.compile().compiled.memory_analysis().temp_size_in_bytes, params


@pytest.mark.slow
def test_peak_memory_is_one_micro_batchs():
    """XLA's scratch memory of the compiled step: 64 images as 16 micro-batches of 4 take what a step on 4
    images takes, plus the gradient sum (one copy of the parameters), not what 64 at once take."""
    micro, params = _scratch_bytes(4, 1)
    whole, _ = _scratch_bytes(64, 1)
    accumulated, _ = _scratch_bytes(64, 16)
    assert whole > 8 * micro
    assert accumulated < micro + 3 * params, (accumulated, micro, params)


def _digits(n_train=96, n_test=32):
    train, test = data.train_test_split(data.load_digits(), test_fraction=0.2, seed=0)
    return train.subset(np.arange(n_train)), test.subset(np.arange(n_test))


@pytest.mark.slow
def test_fit_counts_optimiser_steps_and_resumes_exactly(tmp_path):
    train, test = _digits()
    model = _model(jr.key(0), layer_dropout=0.1)
    config = training.TrainConfig(
        epochs=2, batch_size=32, grad_accum_steps=4, lr=2e-3, warmup_epochs=0.5, mixup_alpha=0.5,
        ema_decay=0.9, eval_batch_size=32, log_every=1, checkpoint_every=2, keep_checkpoints=5,
    )
    steps = training.TrainSteps.build(config, 3, 10, parallel.make_mesh(data=1))

    def run(**kw):
        return training.fit(model, train, test, config, key=jr.key(1), progress=False, steps=steps, **kw)

    full = run(run_dir=tmp_path / "full")
    # 96 images in batches of 32 (each 4 micro-batches of 8): 3 optimiser steps an epoch, 6 in all.
    assert full.status == "completed" and full.step == full.total_steps == 6
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in train_records] == pytest.approx([float(steps.schedule(s)) for s in range(6)])
    assert [info.step for info in training.list_checkpoints(tmp_path / "full" / "checkpoints")] == [2, 4, 6]
    # Stopped after 4 optimiser steps and resumed: the same run, bit for bit.
    part = run(run_dir=tmp_path / "cut", max_steps=4)
    assert part.status == "max_steps" and part.step == 4
    resumed = run(run_dir=tmp_path / "cut", resume=True)
    assert resumed.step == 6
    for a, b in zip(
        jax.tree.leaves(eqx.filter((resumed.model, resumed.opt_state), eqx.is_array)),
        jax.tree.leaves(eqx.filter((full.model, full.opt_state), eqx.is_array)),
        strict=True,
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # The same training as one batch of 32 per step, up to rounding.
    one = training.fit(
        model, train, test, training.TrainConfig(**(config.to_dict() | {"grad_accum_steps": 1})),
        key=jr.key(1), progress=False,
    )
    for a, b in zip(jax.tree.leaves(eqx.filter(one.model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(full.model, eqx.is_array)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)


def test_bad_accumulation_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig `grad_accum_steps` must be >= 1, got 0"):
        training.TrainConfig(grad_accum_steps=0)
    with pytest.raises(
        ValueError,
        match=r"`grad_accum_steps` \(4\) must divide `batch_size` \(30\).*Use grad_accum_steps 3 or 5, or "
        r"batch_size 32",
    ):
        training.TrainConfig(batch_size=30, grad_accum_steps=4)
    # A micro-batch must split over the mesh like a batch: found before anything compiles or is written.
    train, test = _digits()
    config = training.TrainConfig(epochs=1, batch_size=16, grad_accum_steps=4, check_data=False)
    with pytest.raises(parallel.MeshError, match=r"micro-batch .* of 4 does not split evenly.*8 devices"):
        training.fit(_model(jr.key(0)), train, test, config, key=jr.key(0), run_dir=tmp_path / "run",
                     mesh=parallel.make_mesh(data=8), progress=False)
    assert not (tmp_path / "run").exists()
    # So must each part of `step_chunk`: 16 images, at most 2 a part, are 8 parts of 2: not for 4 devices.
    config = training.TrainConfig(epochs=1, batch_size=16, step_chunk=2, check_data=False)
    with pytest.raises(parallel.MeshError, match=r"part of a step \(batch_size / 8, from step_chunk 2\) of 2 "
                       r"does not split evenly.*4 devices"):
        training.fit(_model(jr.key(0)), train, test, config, key=jr.key(0), run_dir=tmp_path / "run",
                     mesh=parallel.make_mesh(data=4), progress=False)
    assert not (tmp_path / "run").exists()
    # A step given a batch that does not split says so at trace time.
    step = training.make_train_step(
        training.make_optimizer(1e-3), training.StepConfig(num_classes=10, grad_accum_steps=3)
    )
    model = _model(jr.key(0))
    state = training.make_optimizer(1e-3).init(training.trainable_params(model))
    with pytest.raises(ValueError, match=r"batch of 8 images does not split into `grad_accum_steps=3`"):
        step(model, state, (jnp.zeros((8, 1, 8, 8), jnp.uint8), jnp.zeros(8, jnp.int32)), jr.key(0))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grad-accum-steps", "0"], "--grad-accum-steps: must be >= 1, got 0"),
        (["--batch-size", "30", "--grad-accum-steps", "4"],
         "`grad_accum_steps` (4) must divide `batch_size` (30)"),
        (["--freeze", "blocks:0"], "--freeze: must be none, backbone or blocks:N"),
    ],
)
def test_bad_accumulation_flags_are_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_the_flag_is_a_step_field_from_trainconfig(tmp_path):
    parser = cli.build_parser()
    argv = ["train", "--grad-accum-steps", "4", "--batch-size", "32", "--out", str(tmp_path)]
    args = parser.parse_args(argv)
    config = cli.train.run_config(args, parser)
    assert config.train.grad_accum_steps == 4
    assert "grad_accum_steps" in training.TrainConfig.step_fields()
    assert config.train.step_config(10).grad_accum_steps == 4
    assert training.StepConfig(num_classes=10).grad_accum_steps == 1
