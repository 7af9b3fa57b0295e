"""The training recipe, steps, checkpoints and fit loop: masks, mixing, one trace, exact resume, faults."""

import dataclasses
import functools
import gc
import json
import os
import shutil
import signal
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import cait_eqx
from cait_eqx import data, parallel, training


def _tiny(key, **overrides):
    kwargs = dict(
        image_size=8,
        patch_size=4,
        num_classes=10,
        dim=16,
        depth=2,
        cls_depth=1,
        heads=2,
        mlp_dim=32,
        channels=1,
    )
    kwargs.update(overrides)
    return cait_eqx.CaiT(**kwargs, key=key)


@pytest.fixture(scope="module")
def digits():
    ds = data.load_digits()
    train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    # A small slice keeps the loop tests fast; the held-out part is the real split's.
    return train.subset(np.arange(160)), test.subset(np.arange(64))


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _assert_trees_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=False):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------- recipe


def test_weight_decay_mask_lists_exactly_the_linear_weights(getkey):
    model = _tiny(getkey())
    assert training.decayed_leaf_names(model) == [
        "patch_embed.proj.weight",
        "blocks.attn.qkv.weight",
        "blocks.attn.proj_l.weight",
        "blocks.attn.proj_w.weight",
        "blocks.attn.proj.weight",
        "blocks.mlp.fc1.weight",
        "blocks.mlp.fc2.weight",
        "blocks_token_only.0.attn.q.weight",
        "blocks_token_only.0.attn.k.weight",
        "blocks_token_only.0.attn.v.weight",
        "blocks_token_only.0.attn.proj.weight",
        "blocks_token_only.0.mlp.fc1.weight",
        "blocks_token_only.0.mlp.fc2.weight",
        "head.weight",
    ]
    # The mask is wired into AdamW: with zero gradients one step shrinks exactly the decayed leaves.
    lr, wd = 0.1, 0.5
    optim = training.make_optimizer(lr, weight_decay=wd)
    params = eqx.filter(model, eqx.is_array)
    state = optim.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = eqx.filter_jit(optim.update)(zeros, state, params)
    new = eqx.apply_updates(model, updates)
    flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_new = jax.tree.leaves(eqx.filter(new, eqx.is_array))
    decayed = set(training.decayed_leaf_names(model))
    for (path, old), updated in zip(flat_old, flat_new, strict=False):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        expected = old * (1 - lr * wd) if name in decayed else old
        np.testing.assert_allclose(np.asarray(updated), np.asarray(expected), rtol=1e-6, err_msg=name)
    # Kept out of decay, by type: gammas, norms, embeddings, biases (the stacked blocks included).
    assert not any(
        n.endswith(("gamma", ".bias")) or "norm" in n or n in ("pos_embed", "cls_token") for n in decayed
    )


def test_warmup_cosine_schedule_shape():
    schedule = training.warmup_cosine_schedule(1e-3, total_steps=100, warmup_steps=10, min_lr=1e-5)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0.0
    np.testing.assert_allclose(values[5], 5e-4, rtol=1e-6)
    np.testing.assert_allclose(values[10], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(values[100], 1e-5, rtol=1e-5)
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) < 0)


def test_ema_tracks_the_parameters_after_each_update():
    decay = 0.9
    optim = optax.chain(optax.sgd(1.0), training.ema_weights(decay))
    params = {"w": jnp.array([1.0, 2.0])}
    state = optim.init(params)
    expected = np.array([1.0, 2.0])
    for g in ([0.5, 0.5], [1.0, -1.0]):
        updates, state = optim.update({"w": jnp.array(g)}, state, params)
        params = optax.apply_updates(params, updates)
        expected = decay * expected + (1 - decay) * np.asarray(params["w"])
    np.testing.assert_allclose(np.asarray(training.ema_model(params, state)["w"]), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="holds no EMA"):
        training.ema_model(params, optax.sgd(1.0).init(params))


# ----------------------------------------------------------------------------------------- losses, mixing


def test_label_smoothing_and_cross_entropy():
    targets = training.smooth_labels(jnp.array([2, 0]), 4, 0.2)
    np.testing.assert_allclose(
        np.asarray(targets), [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]], rtol=1e-6
    )
    logits = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    log_p = np.asarray(jax.nn.log_softmax(logits))
    expected = -(np.asarray(targets) * log_p).sum(-1)
    np.testing.assert_allclose(np.asarray(training.cross_entropy(logits, targets)), expected, rtol=1e-6)


def _known_batch(size=6, classes=6):
    # Image i is constant i + 1, its label is class i: every pixel says where it came from.
    images = jnp.broadcast_to(jnp.arange(1.0, size + 1.0)[:, None, None, None], (size, 2, 8, 8))
    return images, jax.nn.one_hot(jnp.arange(size), classes)


def test_mixup_mixes_images_and_labels_by_the_same_weight():
    images, targets = _known_batch()
    for seed in range(5):
        mixed, mixed_targets = training.mixup(images, targets, key=jr.key(seed), alpha=0.8)
        mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
        np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
        for i in range(6):
            partner = 5 - i
            lam = mixed_targets[i, i]
            np.testing.assert_allclose(lam + mixed_targets[i, partner], 1.0, rtol=1e-6)
            np.testing.assert_allclose(mixed[i], lam * (i + 1) + (1 - lam) * (partner + 1), rtol=1e-5)


def test_cutmix_pastes_one_box_and_labels_by_its_area():
    images, targets = _known_batch()
    areas = set()
    for seed in range(12):
        mixed, mixed_targets = training.cutmix(images, targets, key=jr.key(seed), alpha=1.0)
        mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
        np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
        boxes = []
        for i in range(6):
            partner = 5 - i
            from_partner = mixed[i] == partner + 1
            assert np.all(from_partner | (mixed[i] == i + 1))
            if i != partner:
                np.testing.assert_allclose(mixed_targets[i, partner], from_partner.mean(), rtol=1e-6)
                np.testing.assert_allclose(mixed_targets[i, i], 1 - from_partner.mean(), rtol=1e-6)
            boxes.append(from_partner[0])
        box = boxes[0]
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        if rows.size:  # one axis-aligned rectangle, the same for the whole batch and every channel
            assert (
                box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
                and box.sum() == rows.size * cols.size
            )
        assert all(np.array_equal(b, box) for b in boxes)
        areas.add(round(float(box.mean()), 4))
    assert len(areas) > 3  # the box size really is drawn


def test_mix_batch_picks_one_of_the_two_and_can_be_off():
    images, targets = _known_batch()
    kinds = set()
    for seed in range(16):
        key = jr.key(seed)
        mixed, _ = training.mix_batch(
            images, targets, key=key, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5
        )
        values = np.unique(np.asarray(mixed)[0])
        kinds.add("cutmix" if set(values.tolist()) <= {1.0, 6.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}
    same, same_targets = training.mix_batch(images, targets, key=jr.key(0), mixup_alpha=0.8, prob=0.0)
    assert same is images and same_targets is targets


# -------------------------------------------------------------------------------------------------- steps


def _batch(dataset, size):
    return jnp.asarray(dataset.images[:size]), jnp.asarray(dataset.labels[:size].astype(np.int32))


def test_train_step_compiles_once_per_shape_and_donates(getkey, digits):
    train, _ = digits
    model = _tiny(getkey(), layer_dropout=0.1)
    config = training.TrainConfig(mixup_alpha=0.8, cutmix_alpha=1.0, crop_padding=1, label_smoothing=0.1)
    optim, _ = training.build_optimizer(config, 10)
    state = optim.init(eqx.filter(model, eqx.is_array))
    pure = training.make_train_step(optim, config.step_config(10), jit=False)
    counted = eqx.debug.assert_max_traces(pure, max_traces=2)
    step = eqx.filter_jit(counted, donate="all")  # exactly how make_train_step jits it
    losses = []
    for _ in range(3):
        old_leaf = model.pos_embed
        model, state, metrics = step(model, state, _batch(train, 16), getkey())
        losses.append(float(metrics["loss"]))
        assert old_leaf.is_deleted(), "the model's buffers should be donated to the step"
    assert eqx.debug.get_num_traces(counted) == 1  # three steps, one compilation
    model, state, _ = step(model, state, _batch(train, 8), getkey())  # a new batch size: one more
    assert eqx.debug.get_num_traces(counted) == 2
    with pytest.raises(RuntimeError):
        step(model, state, _batch(train, 4), getkey())  # a third shape exceeds max_traces
    assert all(np.isfinite(losses))


def test_train_step_refuses_non_finite_updates(getkey, digits):
    train, _ = digits
    model = _tiny(getkey())
    optim = training.make_optimizer(1e-3)
    state = optim.init(eqx.filter(model, eqx.is_array))
    step = training.make_train_step(optim, training.StepConfig(num_classes=10))
    images = np.asarray(train.images[:8], np.float32) / 255
    images[3, 0, 2, 2] = np.nan
    before = jax.tree.map(lambda x: np.asarray(x) if eqx.is_array(x) else x, (model, state))
    model, state, metrics = step(model, state, (jnp.asarray(images), jnp.asarray(train.labels[:8])), getkey())
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    _assert_trees_identical(model, before[0])
    _assert_trees_identical(state, before[1])


def test_eval_step_runs_in_inference_mode_and_evaluate_counts_right(getkey, digits):
    _, test = digits
    model = _tiny(getkey(), dropout=0.5, layer_dropout=0.5)
    step = training.make_eval_step()
    images, labels = _batch(test, 16)
    first = step(model, (images, labels))["logits"]
    second = step(model, (images, labels))["logits"]
    reference = jax.vmap(eqx.nn.inference_mode(model))(images.astype(jnp.float32) / 255)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    np.testing.assert_allclose(np.asarray(first), np.asarray(reference), rtol=1e-5, atol=1e-6)

    result = training.evaluate(model, test, batch_size=10)  # 64 = 6 full batches + a padded one
    logits = np.asarray(jax.vmap(eqx.nn.inference_mode(model))(jnp.asarray(test.images, jnp.float32) / 255))
    predicted = logits.argmax(-1)
    assert result.num_examples == 64 and result.confusion.sum() == 64
    assert result.top1 == pytest.approx(np.mean(predicted == test.labels))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert result.top5 == pytest.approx(np.mean((top5 == test.labels[:, None]).any(-1)))
    np.testing.assert_array_equal(np.diag(result.confusion).sum(), (predicted == test.labels).sum())


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_round_trip_keep_the_newest_and_survive_damage(tmp_path, getkey, monkeypatch):
    model = _tiny(getkey())
    optim = training.make_optimizer(1e-3, ema_decay=0.9)
    state = optim.init(eqx.filter(model, eqx.is_array))
    key = jr.key(42)
    for step in (1, 2, 3, 4):
        training.save_checkpoint(
            tmp_path,
            model=model,
            opt_state=state,
            key=key,
            step=step,
            epoch=step // 2,
            batch_index=step % 2,
            shuffle_seed=7,
            keep=2,
        )
    assert [i.step for i in training.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000003.eqx",
        "step-00000003.json",
        "step-00000004.eqx",
        "step-00000004.json",
    ]
    template = _tiny(getkey())
    restored, restored_state, restored_key, loaded = training.load_checkpoint(
        tmp_path, model=template, opt_state=optim.init(eqx.filter(template, eqx.is_array))
    )
    _assert_trees_identical(restored, model)
    _assert_trees_identical(restored_state, state)
    np.testing.assert_array_equal(jr.key_data(restored_key), jr.key_data(key))
    assert (loaded.step, loaded.epoch, loaded.batch_index, loaded.shuffle_seed) == (4, 2, 0, 7)

    # A crash between the data file and its description (simulated: the description's write is interrupted)
    # leaves the good checkpoints alone, even with keep=1; a description that fails to be written (a full
    # disk: tests/test_storage.py makes one for real) takes its data file with it.
    from cait_eqx.training import _checkpoint

    real_write = _checkpoint.atomic_write_bytes
    for stop, orphan_left in ((KeyboardInterrupt(), True), (OSError("disk full"), False)):

        def crash_on_description(path, blob, stop=stop):
            if str(path).endswith(".json"):
                raise stop
            return real_write(path, blob)

        monkeypatch.setattr(_checkpoint, "atomic_write_bytes", crash_on_description)
        with pytest.raises(type(stop)):
            training.save_checkpoint(
                tmp_path,
                model=model,
                opt_state=state,
                key=key,
                step=5,
                epoch=2,
                batch_index=1,
                shuffle_seed=7,
                keep=1,
            )
        monkeypatch.undo()
        # An orphan data file is no checkpoint.
        assert (tmp_path / "step-00000005.eqx").is_file() == orphan_left
        assert [i.step for i in training.list_checkpoints(tmp_path)] == [3, 4]

    # A damaged newest checkpoint is skipped, loudly, for the older intact one.
    newest = tmp_path / "step-00000004.eqx"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    newest.write_bytes(bytes(blob))
    with pytest.warns(training.CheckpointWarning, match="step-00000004.eqx is damaged"):
        _, _, _, fallback = training.load_checkpoint(tmp_path, model=template, opt_state=state)
    assert fallback.step == 3
    # The next good save with keep=1 clears the older checkpoints and the orphan.
    training.save_checkpoint(
        tmp_path,
        model=model,
        opt_state=state,
        key=key,
        step=6,
        epoch=3,
        batch_index=0,
        shuffle_seed=7,
        keep=1,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006.eqx", "step-00000006.json"]
    with pytest.raises(training.CheckpointError, match="does not fit"):
        bigger = _tiny(getkey(), dim=32)
        training.load_checkpoint(
            tmp_path / "step-00000006.json",
            model=bigger,
            opt_state=optim.init(eqx.filter(bigger, eqx.is_array)),
        )


# ------------------------------------------------------------------------------------------------ fit loop


def _config(**overrides):
    values = dict(
        epochs=2,
        batch_size=32,
        lr=2e-3,
        warmup_epochs=0.5,
        crop_padding=1,
        mixup_alpha=0.5,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        ema_decay=0.9,
        log_every=2,
        keep_checkpoints=2,
        eval_batch_size=64,
    )
    values.update(overrides)
    return training.TrainConfig(**values)


def test_resume_after_interruption_is_bit_exact(tmp_path, getkey, digits):
    train, test = digits
    model = _tiny(jr.key(0), layer_dropout=0.2, dropout=0.1)
    config = _config()  # 5 steps per epoch, 10 in all; mixup, cutmix, crops, stochastic depth, dropout, EMA
    # One `TrainSteps` for every call below: their training step is traced (and compiled) once.
    mesh = parallel.make_mesh(data=1)
    counted = []

    def compile_counted(pure):
        counted.append(eqx.debug.assert_max_traces(pure, max_traces=1))
        return parallel.shard_train_step(counted[-1], mesh)

    steps = training.TrainSteps.build(config, 5, 10, mesh, compile_step=compile_counted)
    full = training.fit(
        model, train, test, config, key=jr.key(1), run_dir=tmp_path / "full", progress=False, steps=steps
    )
    assert full.status == "completed" and full.step == 10

    # Stop after 3 steps (mid-epoch: data position epoch 0, batch 3), then resume to the end.
    part = training.fit(
        model, train, test, config, key=jr.key(1), run_dir=tmp_path / "cut", max_steps=3, progress=False,
        steps=steps,
    )
    assert part.status == "max_steps" and part.checkpoint.step == 3
    assert (part.checkpoint.epoch, part.checkpoint.batch_index) == (0, 3)
    # A checkpoint whose recorded position is not its step's (the data changed size under the run) is
    # refused, not resumed on other batches.
    shutil.copytree(tmp_path / "cut", tmp_path / "moved")
    sidecar = tmp_path / "moved" / "checkpoints" / f"step-{3:08d}.json"
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(record, epoch=1, batch_index=0)))
    with pytest.raises(training.CheckpointError, match=r"epoch 1, batch 0, but step 3 is epoch 0, batch 3"):
        training.fit(
            model, train, test, config, key=jr.key(1), run_dir=tmp_path / "moved", resume=True,
            progress=False, steps=steps,
        )
    resumed = training.fit(
        model, train, test, config, key=jr.key(99), run_dir=tmp_path / "cut", resume=True, progress=False,
        steps=steps,
    )  # the key comes from the checkpoint
    assert resumed.status == "completed" and resumed.step == 10
    assert full.model.remat == model.remat  # `remat=None`: the model's own
    with pytest.raises(ValueError, match="built for another config"):
        training.fit(model, train, test, _config(lr=1e-3), key=jr.key(1), progress=False, steps=steps)
    _assert_trees_identical(resumed.model, full.model)
    _assert_trees_identical(resumed.opt_state, full.opt_state)
    assert resumed.test.top1 == full.test.top1

    # Interrupted by SIGINT at step 7 (epoch 1, batch 2): a checkpoint, a clean return, then an exact resume.
    def interrupt(step, metrics):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = training.fit(
        model, train, test, config, key=jr.key(1), run_dir=tmp_path / "sig", on_step=interrupt,
        progress=False, steps=steps,
    )
    assert stopped.status == "interrupted" and stopped.checkpoint.step == stopped.step
    assert 7 <= stopped.step < 10
    again = training.fit(
        model, train, test, config, key=jr.key(1), run_dir=tmp_path / "sig", resume=True, progress=False,
        steps=steps,
    )
    _assert_trees_identical(again.model, full.model)
    assert len(counted) == 1 and eqx.debug.get_num_traces(counted[0]) == 1  # five runs, one compilation

    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    strip = lambda records: [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]  # noqa: E731
    assert strip(metrics("cut")) == strip(metrics("full")) == strip(metrics("sig"))
    first = metrics("full")[0]
    assert set(first) == {"step", "epoch", "split", "loss", "accuracy", "lr", "images_per_s"}
    assert {r["split"] for r in metrics("full")} == {"train", "test"}
    assert set(next(r for r in metrics("full") if r["split"] == "test")) == {
        "step",
        "epoch",
        "split",
        "loss",
        "accuracy",
    }
    # Resuming with different settings is refused rather than silently inexact.
    with pytest.raises(training.CheckpointError, match="lr"):
        training.fit(
            model,
            train,
            test,
            _config(lr=1e-3),
            key=jr.key(1),
            run_dir=tmp_path / "cut",
            resume=True,
            progress=False,
        )


def test_non_finite_loss_stops_naming_the_step_or_is_skipped(tmp_path, getkey, digits):
    train, _ = digits
    images = train.images.astype(np.float32) / 255
    config = _config(mixup_alpha=0.0, cutmix_alpha=0.0, ema_decay=None, checkpoint_every=1)
    order = data.Sampler(len(train), config.batch_size, config.seed).order(0)  # `fit`'s order of epoch 0
    poisoned_step = 3  # epoch 0, batch 2: poison one of its images (it comes back once in epoch 1)
    images[order[2 * config.batch_size + 5], 0, 3, 3] = np.nan
    bad = data.Dataset(images, train.labels, train.class_names, "poisoned")
    model = _tiny(getkey())
    with pytest.raises(training.NonFiniteLossError, match=f"at step {poisoned_step}") as caught:
        training.fit(model, bad, None, config, key=jr.key(0), run_dir=tmp_path, progress=False)
    assert caught.value.step == poisoned_step
    steps = [i.step for i in training.list_checkpoints(tmp_path / "checkpoints")]
    assert (
        steps and max(steps) < poisoned_step
    )  # nothing written after the bad step; the last good one intact
    skipped = training.fit(
        model, bad, None, dataclasses_replace(config, on_nonfinite="skip"), key=jr.key(0), progress=False
    )
    assert skipped.status == "completed" and skipped.skipped_steps == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in _leaves(skipped.model))


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="`epochs` must be >= 1, got 0"):
        training.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0, 1\)"):
        training.TrainConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        training.TrainConfig(on_nonfinite="ignore")


def test_train_config_takes_ints_for_floats_and_names_the_field_of_a_wrong_type():
    """The numeric tower: `lr=1` is `lr=1.0` (under beartype too); a bool or a string is a ValueError."""
    config = training.TrainConfig(lr=1, min_lr=0, warmup_epochs=0, weight_decay=0, clip_norm=1, ema_decay=0,
                                  epochs=np.int64(2), mix_prob=np.float32(0.5))
    assert config == training.TrainConfig(lr=1.0, min_lr=0.0, warmup_epochs=0.0, weight_decay=0.0,
                                          clip_norm=1.0, ema_decay=0.0, epochs=2, mix_prob=0.5)
    assert type(config.lr) is float and type(config.mix_prob) is float and type(config.epochs) is int
    assert json.dumps(config.to_dict()) == json.dumps(
        training.TrainConfig.from_dict(config.to_dict()).to_dict()
    )
    bad = [("lr", True), ("lr", "1e-3"), ("warmup_epochs", None), ("clip_norm", "1"), ("ema_decay", False),
           ("lr", 10**400), ("weight_decay", float("nan")), ("epochs", 2.0), ("seed", "0"), ("flip", 1)]
    for name, value in bad:
        with pytest.raises(ValueError, match=f"`{name}` must be") as error:
            training.TrainConfig(**{name: value})
        assert repr(value)[:20] in str(error.value), (name, value)


def test_a_warm_up_longer_than_the_run_is_cut_to_the_run():
    """The default 3 warm-up epochs in a 2-epoch run: the rate climbs to `lr` over the whole run."""
    config = training.TrainConfig(epochs=2, lr=1e-2, min_lr=0.0)
    assert config.warmup_epochs == 3.0  # kept as given; the schedule cuts it
    _, schedule = training.build_optimizer(config, steps_per_epoch=10)
    rates = np.array([float(schedule(step)) for step in range(20)])
    np.testing.assert_allclose(rates, 1e-2 * np.arange(20) / 20, rtol=1e-6, atol=1e-9)
    _, exact = training.build_optimizer(dataclasses_replace(config, warmup_epochs=2.0), steps_per_epoch=10)
    assert [float(exact(step)) for step in range(20)] == rates.tolist()


def test_train_config_is_declared_once_and_derives_the_rest():
    """Every field carries its help and check; the resume check and `StepConfig` come from them."""
    import dataclasses

    from cait_eqx._spec import specs

    declared = specs(training.TrainConfig)
    assert list(declared) == [f.name for f in dataclasses.fields(training.TrainConfig)]
    assert all(spec.help and spec.check is not None for spec in declared.values())
    # What a resumed run must keep: the settings that change the sequence of parameters (not `remat`, which
    # changes what is recomputed, nor the bookkeeping).
    assert training.TrainConfig.trajectory_fields() == (
        "epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "clip_norm", "layer_decay",
        "freeze", "lora_rank", "lora_alpha", "lora_targets", "label_smoothing", "mixup_alpha", "cutmix_alpha",
        "mix_prob", "switch_prob", "crop_padding",
        "flip", "resized_crop", "crop_scale", "crop_ratio", "interpolation", "auto_augment", "aug_repeats",
        "reprob", "remode", "recount", "ema_decay", "normalize", "distillation", "distillation_alpha",
        "distillation_tau", "seed", "compute_dtype",
    )
    # `StepConfig` is exactly `num_classes` and the "step" group, and `step_config` fills every one of them.
    step_fields = training.TrainConfig.step_fields()
    assert [f.name for f in dataclasses.fields(training.StepConfig)] == ["num_classes", *step_fields]
    config = training.TrainConfig(label_smoothing=0.2, mixup_alpha=0.3, cutmix_alpha=0.4, mix_prob=0.5,
                                  switch_prob=0.6, crop_padding=3, flip=True, normalize="imagenet")
    assert config.step_config(7) == training.StepConfig(
        num_classes=7, label_smoothing=0.2, mixup_alpha=0.3, cutmix_alpha=0.4, mix_prob=0.5, switch_prob=0.6,
        crop_padding=3, flip=True, normalize="imagenet",
    )
    # Cross-field checks, and the new `remat` field.
    with pytest.raises(ValueError, match=r"`min_lr` must be at most `lr` \(0.001\), got 0.01"):
        training.TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="TrainConfig `remat` must be one of 'none', 'weight_products'"):
        training.TrainConfig(remat="some")
    with pytest.raises(ValueError, match="TrainConfig `compute_dtype` must be one of .*loss scaling"):
        training.TrainConfig(compute_dtype="float16")
    assert training.TrainConfig.from_dict({"lr": 1e-3}).remat is None  # older records lack it


def test_remat_from_the_config_is_applied_to_a_cait_only(digits):
    train, _ = digits
    config = _config(epochs=1, remat="full", ema_decay=None, mixup_alpha=0.0, cutmix_alpha=0.0)
    model = _tiny(jr.key(0))
    assert model.remat != "full"
    result = training.fit(model, train, None, config, key=jr.key(1), progress=False, max_steps=1)
    assert result.model.remat == "full" and result.step == 1
    not_a_cait = "TrainConfig `remat` switches a `CaiT`'s `remat`, but the model is a Linear"
    with pytest.raises(TypeError, match=not_a_cait):
        training.fit(eqx.nn.Linear(4, 10, key=jr.key(0)), train, None, config, key=jr.key(1), progress=False)


def _memory_mappings():
    """How many memory mappings this process holds (`/proc/self/maps`), or `None` where Linux does not say."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


@pytest.mark.slow  # two fits with evaluation, 10-15 s
def test_fits_in_one_process_free_their_compiled_programs(digits):
    # A sweep in one process: every `fit` compiles its own steps. Each XLA:CPU program holds memory mappings
    # of its own; kept alive after their fit (as `eqx.filter_jit` kept the steps' closures), they piled up
    # by ~1,000 mappings a fit until a compilation failed at the kernel's limit (`vm.max_map_count`).
    train, test = digits
    train, test = train.subset(np.arange(32)), test.subset(np.arange(16))
    mesh = parallel.make_mesh(data=1)
    pure_steps, mappings = [], []

    def compile_step(pure):  # what `fit` does by default; only a weak reference is kept here
        pure_steps.append(weakref.ref(pure))
        return parallel.shard_train_step(pure, mesh)

    for i in range(2):
        model = _tiny(jr.key(i), dim=8, depth=1, heads=1, mlp_dim=8)
        config = training.TrainConfig(epochs=1, batch_size=16, lr=1e-3 * (i + 1), warmup_epochs=0.0,
                                      eval_batch_size=16, seed=i)
        result = training.fit(model, train, test, config, key=jr.key(i), progress=False, mesh=mesh,
                              compile_step=compile_step)
        assert result.status == "completed" and np.isfinite(result.test.loss)
        del result
        gc.collect()
        mappings.append(_memory_mappings())
    if mappings[0] is not None:  # Linux: the second fit adds none (it added ~900 mappings)
        assert mappings[1] - mappings[0] < 100, mappings
    # Nothing keeps a finished fit's training step (and so its compiled program) alive.
    assert [ref() for ref in pure_steps] == [None, None]


# ------------------------------------------------------------------------------------------------ stopping


def test_signals_only_set_flags_and_a_second_one_hands_them_back():
    """No handler raises: a raise could land in JAX's GC callback, where Python only prints it and goes on.

    Raised in this thread (`signal.raise_signal`), so each runs its handler before the next is sent: a
    signal sent to the process may land on another thread (Grain's, JAX's), and two of the same kind
    pending at once count as one. Python's own SIGINT handler is installed first: a process started in the
    background by a shell inherits SIGINT ignored, and Python then leaves it ignored."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _signals_only_set_flags()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _signals_only_set_flags():
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with training.StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.received == signal.SIGTERM and not stop.urgent
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) != previous
        signal.raise_signal(signal.SIGINT)
        assert stop.urgent and stop.received == signal.SIGTERM
        # Handed back after the second: a third signal reaches the handler that was there before.
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    with pytest.raises(KeyboardInterrupt), training.StopSignals():
        for _ in range(3):
            signal.raise_signal(signal.SIGINT)  # the third meets Python's own SIGINT handler
    assert signal.getsignal(signal.SIGINT) == previous[0]
    # `request` is the same flag, for a program that decides to stop by itself.
    with training.StopSignals(enabled=False) as stop:
        assert signal.getsignal(signal.SIGINT) == previous[0]
        stop.request()
        assert stop.requested and not stop.urgent


@pytest.mark.slow
def test_a_second_signal_stops_without_the_checkpoint_and_the_run_still_resumes_exactly(tmp_path, digits):
    train, test = digits
    model = _tiny(jr.key(0), layer_dropout=0.2)
    config = _config(log_every=4)  # 5 steps per epoch, a checkpoint at the end of each
    fit = functools.partial(training.fit, model, train, test, config, key=jr.key(1), progress=False,
                            steps=training.TrainSteps.build(config, 5, 10))  # compiled once for all four
    full = fit(run_dir=tmp_path / "full")

    def twice(step, metrics):  # step 7's metrics are read while step 8 runs
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    stopped = fit(run_dir=tmp_path / "run", on_step=twice)
    assert stopped.status == "interrupted" and stopped.step == 8
    assert stopped.checkpoint.step == 5 and stopped.test is not None  # the last checkpoint, epoch 1's test
    assert [c.step for c in training.list_checkpoints(tmp_path / "run" / "checkpoints")] == [5]
    # A stop asked for by the caller's own `StopSignals` (entered around more than `fit`): same flags.
    with training.StopSignals() as stop:
        stop.request()
        again = fit(run_dir=tmp_path / "run", resume=True, stop=stop)
    assert again.status == "interrupted" and again.step == 6 and again.checkpoint.step == 6
    done = fit(run_dir=tmp_path / "run", resume=True)
    assert done.status == "completed" and done.step == 10
    _assert_trees_identical(done.model, full.model)
    strip = lambda run: [  # noqa: E731
        {k: v for k, v in r.items() if k != "images_per_s"} for r in training.Run(tmp_path / run).metrics()
    ]
    assert strip("run") == strip("full")


# ------------------------------------------------------------------------------------------------------ runs


def test_run_names_its_files_once_and_reads_everything_back(tmp_path, digits):
    train, test = digits
    run = training.Run(tmp_path / "run")
    assert not run.exists
    assert (run.config_path, run.metrics_path, run.summary_path, run.model_path, run.ema_model_path,
            run.checkpoint_dir, run.curves_path) == tuple(run.path / name for name in (
                "config.json", "metrics.jsonl", "summary.json", "model.safetensors", "model_ema.safetensors",
                "checkpoints", "curves.png"))
    with pytest.raises(FileNotFoundError, match="No run configuration at .*config.json"):
        run.config()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        run.metrics()

    model = dict(patch_size=4, dim=16, depth=1, cls_depth=1, heads=2, mlp_dim=32)
    config = training.RunConfig(model=model, image_size=None, train=_config(epochs=1, log_every=1))
    first = training.train_run(config, run.path, data=(train, test), max_steps=3, progress=False)
    assert first.fit.status == "max_steps" and run.exists and run.summary() is None
    assert run.config().train == config.train and run.config().model["dim"] == 16
    # What the speed depended on: the CPU's vector extension and the XLA flags this process started with.
    runtime = {"isa": cait_eqx.cpu_isa(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    # And how many parts a step's batch ran as: whole here (tests/conftest.py gives this process 8 CPU
    # devices, and automatic parts are for one device).
    assert json.loads(run.config_path.read_text())["runtime"] == dict(runtime, step_parts=1)
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert run.metrics() == lines and [r["step"] for r in lines] == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match=f"model file not found: {run.model_path}"):
        run.model()
    # The newest checkpoint's model: the optimiser-state template is rebuilt as the run built it.
    newest = run.model("checkpoint")
    _assert_trees_identical(newest, first.fit.model)
    is_dropout = lambda m: isinstance(m, eqx.nn.Dropout)  # noqa: E731
    dropouts = [m for m in jax.tree.leaves(newest, is_leaf=is_dropout) if is_dropout(m)]
    assert dropouts and all(m.inference for m in dropouts)  # ready for evaluation, like `cait_eqx.load`

    done = training.train_run(config, run.path, data=(train, test), resume=True, progress=False)
    assert done.fit.status == "completed" and done.model_path == run.model_path
    _assert_trees_identical(run.model(), done.fit.model)
    _assert_trees_identical(run.model("ema"), done.fit.ema)
    assert run.summary()["status"] == "completed" and run.summary()["step"] == 5
    assert run.summary()["runtime"] == runtime
    assert not run.curves_path.exists()  # pictures are drawn by `cait_eqx.viz`, not by training
    full_train, full_test = run.data()  # the run's dataset, split as it defines (here all 1,797 digits)
    assert len(full_train) + len(full_test) == 1797 and full_train.image_size == (8, 8)
    with pytest.raises(ValueError, match="`which` must be one of 'final', 'ema', 'checkpoint'"):
        run.model("best")

    # The one reader of metrics.jsonl: a cut last line is a run killed mid-write; a bad line elsewhere is not.
    records = run.metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5] and records[-1]["split"] == "test"
    run.metrics_path.write_text(run.metrics_path.read_text() + '{"step": 9, "spl')
    assert run.metrics() == records
    run.metrics_path.write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n')
    with pytest.raises(ValueError, match="line 2"):
        run.metrics()


def test_a_default_step_config_smooths_mixes_and_augments_nothing():
    """`StepConfig` is built from `TrainConfig`'s "step" fields, with neutral defaults where the recipe's are
    not: a new step field with a recipe default that changes a batch would change every plain step, so the
    full set of defaults is written out here (add a new field's neutral value on purpose)."""
    defaults = dataclasses.asdict(training.StepConfig(num_classes=10))
    assert defaults == dict(
        num_classes=10, label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0,
        switch_prob=0.5, crop_padding=0, flip=False, reprob=0.0, remode="pixel", recount=1,
        normalize="none", distillation="none", distillation_alpha=0.5, distillation_tau=1.0,
        freeze="none", grad_accum_steps=1, step_chunk=None,
    )
    assert tuple(defaults)[1:] == training.TrainConfig.step_fields()  # declared there, in its order
    # The recipe's own step keeps the recipe's values.
    assert training.TrainConfig().step_config(10).label_smoothing == training.TrainConfig().label_smoothing


def test_checkpoints_are_read_shape_for_shape_and_old_patch_biases_still_load(tmp_path, getkey):
    """A template of other shapes is refused, naming the array. Checkpoints from before `PatchProjection`
    hold the patch-embedding bias as a convolution's `(dim, 1, 1)`: they load, the same numbers as `(d,)`."""
    model = _tiny(getkey())
    optim = optax.adam(1e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    # The old layout, written for real: the bias (and its Adam moments) shaped as the convolution had it.
    old_bias = lambda tree: tree.patch_embed.proj.bias  # noqa: E731
    legacy_model = eqx.tree_at(old_bias, model, old_bias(model).reshape(-1, 1, 1) + 0.5)
    adam = opt_state[0]
    legacy_state = (adam._replace(
        mu=eqx.tree_at(old_bias, adam.mu, old_bias(adam.mu).reshape(-1, 1, 1)),
        nu=eqx.tree_at(old_bias, adam.nu, old_bias(adam.nu).reshape(-1, 1, 1)),
    ), *opt_state[1:])
    common = dict(key=jr.key(0), step=1, epoch=0, batch_index=1, shuffle_seed=0)
    training.save_checkpoint(tmp_path / "old", model=legacy_model, opt_state=legacy_state, **common)
    restored, state, _, _ = training.load_checkpoint(tmp_path / "old", model=model, opt_state=opt_state)
    assert restored.patch_embed.proj.bias.shape == model.patch_embed.proj.bias.shape
    np.testing.assert_array_equal(restored.patch_embed.proj.bias, model.patch_embed.proj.bias + 0.5)
    assert state[0].mu.patch_embed.proj.bias.shape == model.patch_embed.proj.bias.shape

    # Another architecture with as many arrays (a wider MLP): named, not loaded.
    wider = _tiny(getkey(), mlp_dim=48)
    shapes = r"name='fc1'\), GetAttrKey\(name='weight'\)\) has changed shape from \(2, 48, 16\)"
    with pytest.raises(training.CheckpointError, match=shapes):
        training.load_checkpoint(tmp_path / "old", model=wider,
                                 opt_state=optim.init(eqx.filter(wider, eqx.is_array)))
