"""LoRA adapters: `cait_eqx.lora`, `merge_lora`, `save_lora` / `load_lora`, and LoRA training.

What would be wrong, and which test sees it:
- an adapter that changes the function before it is trained (B not zero, a scale applied to the base
  product, a cast): `test_an_adapted_model_computes_the_base_model_exactly`, with `array_equal`;
- adapters in the wrong place (one adapter shared by all the stacked blocks, the class-attention blocks
  left out): `test_adapters_are_stacked_along_the_depth_and_per_class_attention_block`;
- a merge that drops the scale, transposes B A or forgets a layer: `test_merged_equals_unmerged...`;
- base weights that still get weight gradients (masked afterwards) or optimiser moments:
  `test_base_weights_cost_no_weight_gradient` (on the traced step) and
  `test_the_optimiser_keeps_state_for_the_adapters_and_head_only`;
- a run that moves a base weight, or does not resume bit for bit, or saves the adapters where the model
  should be: `test_a_lora_run_moves_only_adapters_and_head_and_resumes_exactly`,
  `test_a_lora_run_saves_the_merged_model_and_the_adapters_alone`;
- bad requests that train or silently do something else: `test_bad_lora_requests_are_refused_naming_the_fix`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import cait_eqx
from cait_eqx import cli, data, parallel, training


def _tiny(key, **overrides):
    kwargs = dict(image_size=8, patch_size=4, num_classes=10, dim=16, depth=3, cls_depth=2, heads=2,
                  mlp_dim=32, channels=1)
    return cait_eqx.CaiT(**(kwargs | overrides), key=key)


def _perturbed(model, key):
    """Every adapter matrix given random values (B too), so that the update is not zero."""
    layer_keys = iter(jr.split(key, 64))

    def bump(node):
        if isinstance(node, cait_eqx.LoRALinear):
            ka, kb = jr.split(next(layer_keys))
            return eqx.tree_at(lambda m: (m.lora_a, m.lora_b), node, (
                0.3 * jr.normal(ka, node.lora_a.shape), 0.3 * jr.normal(kb, node.lora_b.shape)))
        return node

    return jax.tree.map(bump, model, is_leaf=lambda n: isinstance(n, cait_eqx.LoRALinear))


def _bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _named(tree) -> dict[str, bytes]:
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x).tobytes() for p, x in leaves}


def test_an_adapted_model_computes_the_base_model_exactly(getkey):
    model = _tiny(getkey(), layer_dropout=0.2, dropout=0.1)
    adapted = cait_eqx.lora(model, rank=4, alpha=16, targets=cait_eqx.LORA_TARGETS, key=getkey())
    images, key = jr.uniform(getkey(), (4, 1, 8, 8)), getkey()
    keys = jr.split(key, 4)
    # In training mode (dropout, stochastic depth) and in inference mode: the same logits, bit for bit.
    assert np.array_equal(jax.vmap(lambda x, k: adapted(x, key=k))(images, keys),
                          jax.vmap(lambda x, k: model(x, key=k))(images, keys))
    assert np.array_equal(jax.vmap(eqx.nn.inference_mode(adapted))(images),
                          jax.vmap(eqx.nn.inference_mode(model))(images))
    # The base weights are the model's own arrays, under their own names.
    assert np.array_equal(adapted.blocks.attn.qkv.weight, model.blocks.attn.qkv.weight)
    assert cait_eqx.lora_settings(adapted) == {"rank": 4, "alpha": 16.0, "targets": cait_eqx.LORA_TARGETS}


def test_adapters_are_stacked_along_the_depth_and_per_class_attention_block(getkey):
    model = _tiny(getkey(), depth=3)
    adapted = cait_eqx.lora(model, rank=2, key=getkey())
    qkv = adapted.blocks.attn.qkv
    assert isinstance(qkv, cait_eqx.LoRALinear) and qkv.lora_a.shape == (3, 2, 16)
    assert qkv.lora_b.shape == (3, 48, 2) and not np.any(qkv.lora_b)
    # Each block's A is its own draw (not one adapter broadcast over the depth).
    assert not np.allclose(qkv.lora_a[0], qkv.lora_a[1])
    for block in adapted.blocks_token_only:
        attn, mlp = block.attn, block.mlp
        for layer in (attn.q, attn.k, attn.v, attn.proj, mlp.fc1, mlp.fc2):
            assert isinstance(layer, cait_eqx.LoRALinear) and layer.lora_a.ndim == 2
    # The default targets leave the head, the talking-heads mixes and the patch embedding as they are.
    assert type(adapted.head) is cait_eqx.Linear and type(adapted.blocks.attn.proj_l) is cait_eqx.Linear
    only_qkv = cait_eqx.lora(model, rank=2, targets="qkv", key=getkey())
    assert type(only_qkv.blocks.attn.proj) is cait_eqx.Linear
    assert type(only_qkv.blocks_token_only[0].attn.q) is cait_eqx.Linear


def test_merged_equals_unmerged_and_saves_like_any_cait(tmp_path, getkey):
    model = _tiny(getkey())
    adapted = _perturbed(cait_eqx.lora(model, rank=3, alpha=6.0, targets=cait_eqx.LORA_TARGETS,
                                       key=getkey()), getkey())
    merged = cait_eqx.merge_lora(adapted)
    assert not any(isinstance(n, cait_eqx.LoRALinear) for n in jax.tree.leaves(
        merged, is_leaf=lambda n: isinstance(n, cait_eqx.LoRALinear)))
    images = jr.uniform(getkey(), (4, 1, 8, 8))
    want = jax.vmap(eqx.nn.inference_mode(adapted))(images)
    got = jax.vmap(eqx.nn.inference_mode(merged))(images)
    assert np.abs(np.asarray(want) - np.asarray(jax.vmap(eqx.nn.inference_mode(model))(images))).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The merged model is a plain CaiT: save / load round trip, and timm's names and shapes.
    loaded = cait_eqx.load(cait_eqx.save(tmp_path / "merged.safetensors", merged))
    assert np.array_equal(jax.vmap(loaded)(images), jax.vmap(eqx.nn.inference_mode(merged))(images))
    state = cait_eqx.to_timm_state_dict(merged)
    base = cait_eqx.to_timm_state_dict(model)
    assert state.keys() == base.keys() and all(state[k].shape == base[k].shape for k in base)
    assert not np.array_equal(state["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    # Writing the unmerged model under timm's names would drop the adapters: refused, naming the fix.
    with pytest.raises(cait_eqx.LoRAError, match=r"carries LoRA adapters.*merge_lora"):
        cait_eqx.save(tmp_path / "unmerged.safetensors", adapted)
    assert not (tmp_path / "unmerged.safetensors").exists()


def test_the_adapters_file_applies_to_the_base_model(tmp_path, getkey):
    model = _tiny(getkey())
    adapted = _perturbed(cait_eqx.lora(model, rank=2, targets=("qkv", "fc2"), key=getkey()), getkey())
    # The run trains a head for 5 classes: the file holds it whole, and the base gets it.
    adapted = cait_eqx.reset_classifier(adapted, 5, key=getkey())
    path = cait_eqx.save_lora(tmp_path / "adapters.safetensors", adapted, base="tiny")
    assert path.stat().st_size < 0.3 * cait_eqx.save(tmp_path / "m.safetensors",
                                                      cait_eqx.merge_lora(adapted)).stat().st_size
    loaded = cait_eqx.load_lora(model, path)
    assert cait_eqx.lora_settings(loaded) == {"rank": 2, "alpha": 2.0, "targets": ("qkv", "fc2")}
    assert loaded.config.num_classes == 5
    for a, b in zip(_bytes(loaded), _bytes(adapted), strict=True):
        assert a == b
    merged = cait_eqx.load_lora(model, path, merge=True)
    assert type(merged.blocks.attn.qkv) is cait_eqx.Linear
    with pytest.raises(cait_eqx.LoRAError, match=r"another architecture.*dim: 16 in the file, 32 here"):
        cait_eqx.load_lora(_tiny(getkey(), dim=32), path)
    with pytest.raises(cait_eqx.LoRAError, match=r"not a LoRA adapters file.*cait_eqx.load"):
        cait_eqx.load_lora(model, tmp_path / "m.safetensors")


# ------------------------------------------------------------------------- frozen base weights cost nothing


def _dot_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The output shapes of every `dot_general` in a jaxpr, nested ones (scan bodies) included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(eqn.outvars[0].aval.shape))
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _dot_shapes(inner)
    return found


def _step_jaxpr(model, batch=4):
    optim = training.make_optimizer(1e-3)
    step = training.make_train_step(optim, training.StepConfig(num_classes=10), jit=False)
    state = optim.init(training.trainable_params(model))
    images, labels = jnp.zeros((batch, 1, 8, 8), jnp.uint8), jnp.arange(batch)
    return eqx.filter_make_jaxpr(step)(model, state, (images, labels), jr.key(0))[0].jaxpr


def test_base_weights_cost_no_weight_gradient(getkey):
    """On the traced step, not on values: a weight's gradient is the one product whose result has the
    weight's shape (a contraction over the batch and tokens). The full fine-tune computes one for every
    adapted layer; the LoRA step computes none (only its adapters' `(rank, in)` and `(out, rank)`)."""
    # Widths chosen so that no other product has a weight's shape: dim 16, qkv 48, mlp 40, cls_mlp 24.
    model = cait_eqx.with_remat(_tiny(getkey(), mlp_dim=40, cls_mlp_dim=24), "none")
    weights = {(48, 16), (16, 16), (40, 16), (16, 40), (24, 16), (16, 24)}
    full = _dot_shapes(_step_jaxpr(model))
    assert weights <= full | {(s[1], s[0]) for s in full}  # the check sees them when they are there
    adapted = cait_eqx.lora(model, rank=3, key=getkey())
    shapes = _dot_shapes(_step_jaxpr(adapted))
    assert not (weights | {(b, a) for a, b in weights}) & shapes, shapes
    assert {(3, 16), (48, 3)} <= shapes | {(s[1], s[0]) for s in shapes}  # the adapters' own gradients


def test_the_optimiser_keeps_state_for_the_adapters_and_head_only(getkey):
    model = cait_eqx.lora(_tiny(getkey(), depth=3), rank=2, targets=("qkv", "fc1"), key=getkey())
    optim = training.make_optimizer(1e-3, ema_decay=0.9, layer_decay=0.75)
    counters = sum(x.size for x in jax.tree.leaves(optim.init({})) if eqx.is_array(x))
    params = training.trainable_params(model)
    # Adapters: SA qkv (3 x (2x16 + 48x2)), SA fc1 (3 x (2x16 + 32x2)), CA fc1 (2 x (2x16 + 32x2)); head 170.
    trained = 3 * (32 + 96) + 3 * (32 + 64) + 2 * (32 + 64) + 16 * 10 + 10
    assert sum(x.size for x in jax.tree.leaves(params)) == trained
    state = optim.init(params)
    assert sum(x.size for x in jax.tree.leaves(state) if eqx.is_array(x)) == 3 * trained + counters
    # The adapters' matrices take weight decay; the frozen base weights are not in the tree at all.
    mask = training.weight_decay_mask(params)
    assert mask.blocks.attn.qkv.lora_a is True and mask.blocks.attn.qkv.weight is None
    assert mask.head.weight is True and mask.head.bias is False


# -------------------------------------------------------------------------------------------- training


def _digits(n_train=96, n_test=32):
    train, test = data.train_test_split(data.load_digits(), test_fraction=0.2, seed=0)
    return train.subset(np.arange(n_train)), test.subset(np.arange(n_test))


@pytest.mark.slow
def test_a_lora_run_moves_only_adapters_and_head_and_resumes_exactly(tmp_path):
    train, test = _digits()
    model = _tiny(jr.key(0), layer_dropout=0.1)
    config = training.TrainConfig(
        epochs=2, batch_size=32, lr=1e-2, warmup_epochs=0.0, weight_decay=0.5, ema_decay=0.9,
        lora_rank=4, lora_alpha=8.0, layer_decay=0.75, eval_batch_size=32, log_every=1, keep_checkpoints=3,
    )
    steps = training.TrainSteps.build(config, 3, 10, parallel.make_mesh(data=1))

    def run(**kw):
        return training.fit(model, train, test, config, key=jr.key(1), progress=False, steps=steps, **kw)

    full = run(run_dir=tmp_path / "full")
    assert full.status == "completed" and full.step == 6
    trained = full.model
    assert cait_eqx.lora_settings(trained)["rank"] == 4
    # Every base array, bit for bit: the adapters' base weights and everything that is not adapted.
    before = _named(model)
    frozen = _named(eqx.filter(trained, cait_eqx.lora_trainable(trained), inverse=True))
    assert len(frozen) == len(before) - 2  # all but the head's weight and bias
    for name, value in frozen.items():
        assert value == before[name], name
    # Every block's own adapter learns (rows of the stack), and the class-attention blocks' too.
    assert (np.abs(np.asarray(trained.blocks.attn.qkv.lora_b)).max(axis=(1, 2)) > 1e-4).all()
    for name, leaf in (("SA fc2 B", trained.blocks.mlp.fc2.lora_b),
                       ("CA q B", trained.blocks_token_only[1].attn.q.lora_b)):
        assert np.abs(np.asarray(leaf)).max() > 1e-4, name
    assert np.abs(np.asarray(trained.head.weight) - np.asarray(model.head.weight)).max() > 1e-4
    part = run(run_dir=tmp_path / "cut", max_steps=4)
    resumed = run(run_dir=tmp_path / "cut", resume=True)
    assert part.step == 4 and resumed.step == 6
    for a, b in zip(_bytes((resumed.model, resumed.opt_state)), _bytes((full.model, full.opt_state)),
                    strict=True):
        assert a == b
    # A resumed run must keep the LoRA settings.
    with pytest.raises(training.CheckpointError, match=r"lora_rank: 4 → 8"):
        training.fit(model, train, test, config.__class__(**{**config.to_dict(), "lora_rank": 8}),
                     key=jr.key(1), progress=False, run_dir=tmp_path / "cut", resume=True)


@pytest.mark.slow
def test_a_lora_run_saves_the_merged_model_and_the_adapters_alone(tmp_path):
    train, test = _digits(64, 32)
    config = training.RunConfig(
        model=dict(patch_size=4, dim=16, depth=2, cls_depth=1, heads=2, mlp_dim=32), image_size=8,
        train=training.TrainConfig(epochs=1, batch_size=32, lr=1e-2, warmup_epochs=0.0, lora_rank=2,
                                   lora_targets=("qkv", "proj"), eval_batch_size=32),
    )
    summary = training.train_run(config, tmp_path / "run", progress=False, data=(train, test))
    run = training.Run(tmp_path / "run")
    assert summary.adapters_path == run.adapters_path and run.adapters_path.is_file()
    final = run.model()
    assert type(final.blocks.attn.qkv) is cait_eqx.Linear  # a plain CaiT
    images = data.to_unit_float(jnp.asarray(test.images[:8]))
    want = jax.vmap(eqx.nn.inference_mode(summary.fit.model))(images)
    np.testing.assert_allclose(jax.vmap(final)(images), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(run.model("checkpoint"))(images), want, rtol=1e-5, atol=1e-5)
    # The adapters apply to the run's base model (its initialisation here) and give the same model.
    base = training.build_model(config, train, key=jr.fold_in(jr.key(config.train.seed), 0))
    again = cait_eqx.load_lora(eqx.nn.inference_mode(base), run.adapters_path, merge=True)
    np.testing.assert_allclose(jax.vmap(again)(images), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_sharded_lora_step_equals_the_single_device_one(getkey):
    """fsdp splits the base weights; the adapters follow the same rule (split when large enough), and the
    step computes the same update."""
    model = cait_eqx.lora(_tiny(getkey(), dim=32, mlp_dim=64, heads=4), rank=4, key=getkey())
    optim = training.make_optimizer(1e-2, weight_decay=0.1)
    step = training.make_train_step(optim, training.StepConfig(num_classes=10), jit=False)
    images, labels, key = jr.uniform(getkey(), (8, 1, 8, 8)), jnp.arange(8) % 10, getkey()
    state = (model, optim.init(training.trainable_params(model)))
    want, _, _ = eqx.filter_jit(step)(*state, (images, labels), key)
    mesh = parallel.make_mesh(data=2, fsdp=4)
    got, _, _ = parallel.shard_train_step(step, mesh, min_size=64)(
        *parallel.shard_state(state, mesh, min_size=64), (images, labels), key)
    assert "fsdp" in got.blocks.mlp.fc1.weight.sharding.spec[1:]
    assert "fsdp" in got.blocks.mlp.fc1.lora_b.sharding.spec[1:]  # (depth, 64, 4): split like a weight
    got, want = eqx.filter(got, eqx.is_array), eqx.filter(want, eqx.is_array)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=3e-5)


# ------------------------------------------------------------------------------------------ bad requests


def test_bad_lora_requests_are_refused_naming_the_fix(tmp_path, getkey):
    model = _tiny(getkey())
    cases = [
        (dict(rank=4, targets=("qkv", "attention")), r"name\(s\) no layer: 'attention'\. Valid targets: qkv, "
                                                     r"q, k, v, proj, fc1, fc2, head"),
        (dict(rank=4, targets="proj_w"), r"talking-heads mixes .* not targets"),
        (dict(rank=0), r"rank` must be an int in 1\.\.16, got 0"),
        (dict(rank=17), r"rank` must be an int in 1\.\.16, got 17.*blocks.attn.qkv maps 16 -> 48"),
        (dict(rank=4, alpha=0.0), r"`alpha` must be a number > 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(cait_eqx.LoRAError, match=message):
            cait_eqx.lora(model, key=getkey(), **kwargs)
    with pytest.raises(cait_eqx.LoRAError, match=r"q \(cls_depth=0\) name no layer.*Its layers: qkv, proj"):
        cait_eqx.lora(_tiny(getkey(), cls_depth=0), rank=2, targets=("qkv", "q"), key=getkey())
    with pytest.raises(cait_eqx.LoRAError, match=r"head \(num_classes=0\)"):
        cait_eqx.lora(_tiny(getkey(), num_classes=0), rank=2, targets="head", key=getkey())
    adapted = cait_eqx.lora(model, rank=2, key=getkey())
    with pytest.raises(cait_eqx.LoRAError, match=r"already carries LoRA adapters.*merge_lora"):
        cait_eqx.lora(adapted, rank=2, key=getkey())
    with pytest.raises(cait_eqx.LoRAError, match=r"carries none: it is already a plain model"):
        cait_eqx.merge_lora(model)
    # Freezing and LoRA together: refused in the recipe, and on a model that carries adapters.
    with pytest.raises(ValueError, match=r"`freeze` \('backbone'\) and `lora_rank` \(8\) conflict.*"
                                         r"freeze='none'"):
        training.TrainConfig(lora_rank=8, freeze="backbone")
    with pytest.raises(cait_eqx.LoRAError, match=r"`freeze='blocks:1'` and LoRA adapters conflict"):
        training.trainable_params(adapted, "blocks:1")
    with pytest.raises(ValueError, match=r"`lora_rank` is 0 \(off\)"):
        training.TrainConfig(lora_alpha=16.0)
    with pytest.raises(ValueError, match=r"`lora_targets` must name layers among qkv"):
        training.TrainConfig(lora_rank=4, lora_targets="qkv,proj_l")
    # Nothing is trained (no run directory made) before a rank that does not fit is refused.
    train, _ = _digits(32, 8)
    config = training.TrainConfig(epochs=1, batch_size=16, lora_rank=17, check_data=False)
    with pytest.raises(cait_eqx.LoRAError, match=r"1\.\.16, got 17"):
        training.fit(model, train, None, config, key=getkey(), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(cait_eqx.LoRAError, match=r"carries adapters already"):
        training.fit(adapted, train, None, config.__class__(epochs=1, batch_size=16, lora_rank=2),
                     key=getkey(), progress=False)


def test_the_cli_takes_the_lora_flags(tmp_path, capsys):
    parser = cli.build_parser()
    argv = ["train", "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "proj, qkv", "--out",
            str(tmp_path)]
    config = cli.train.run_config(parser.parse_args(argv), parser)
    assert (config.train.lora_rank, config.train.lora_alpha, config.train.lora_targets) == (8, 16.0,
                                                                                            ("qkv", "proj"))
    assert {"lora_rank", "lora_alpha", "lora_targets"} <= set(training.TrainConfig.trajectory_fields())
    # The default digits model is 64 wide: a rank of 100 is a usage error before anything is trained.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--lora-rank", "100", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank` must be an int in 1..64, got 100" in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
