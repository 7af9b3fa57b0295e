"""The fine-tuning recipe: layer-wise learning-rate decay (timm's grouping) and a frozen backbone.

What would be wrong, and which test sees it:
- a parameter in the wrong layer (the class-attention blocks, `norm` or the head placed as the issue's prose
  rather than timm's `group_matcher`), a stacked SA leaf with one factor for all its rows, an off-by-one in
  the exponent: `test_layer_decay_scales_equal_timms_for_every_parameter`, name by name against timm;
- the factor applied to the Adam step but not to the decoupled weight decay (timm's `lr_scale` multiplies the
  group's learning rate, and torch's AdamW decays by `lr * weight_decay`):
  `test_one_step_equals_torch_adamw_on_timms_param_groups` and `test_one_step_equals_the_hand_computation`;
- a frozen parameter that moves at all (weight decay, a signed zero, the EMA feeding back) or a head that
  does not learn: `test_a_frozen_backbone_stays_bitwise_and_the_head_learns`;
- factors kept as optimiser state, or a sharded update scaling the wrong rows: the resume and mesh tests;
- bad values reaching the optimiser silently: `test_bad_settings_are_refused_naming_the_field`.
"""

from __future__ import annotations

import json
import math

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import cait_eqx
from cait_eqx import cli, data, parallel, training

# A timm `Cait` whose class-attention stage overlaps several SA layers, and edge cases of the grouping: no
# head (the norm becomes the top layer) and more CA blocks than SA blocks (timm's ordinals go negative).
TIMM_CONFIGS = [
    dict(depth=3, depth_token_only=2, num_classes=5),
    dict(depth=4, depth_token_only=3, num_classes=0),
    dict(depth=1, depth_token_only=3, num_classes=4),
]


def _timm_cait(seed: int = 0, **overrides):
    from _timm_utils import small_timm_cait

    kwargs = dict(img_size=8, patch_size=4, embed_dim=16, num_heads=2, mlp_ratio=2.0, **overrides)
    return small_timm_cait(seed, **kwargs)


def _per_timm_name(model, tree) -> dict[str, np.ndarray]:
    """A PyTree shaped as `model`'s arrays (factors broadcast to each leaf) under timm's parameter names."""
    arrays, static = eqx.partition(model, eqx.is_array)
    full = jax.tree.map(lambda leaf, value: np.broadcast_to(np.asarray(value), leaf.shape), arrays, tree)
    return cait_eqx.to_timm_state_dict(eqx.combine(full, static))


def _timm_groups(reference, layer_decay: float, weight_decay: float = 0.05) -> dict[str, tuple[float, float]]:
    """timm's `(lr_scale, weight_decay)` of every named parameter."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(
        reference,
        weight_decay=weight_decay,
        no_weight_decay_list=reference.no_weight_decay(),
        layer_decay=layer_decay,
    )
    names = {id(p): name for name, p in reference.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.torch
@pytest.mark.parametrize("timm_config", TIMM_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("layer_decay", [0.75, 0.65])
def test_layer_decay_scales_equal_timms_for_every_parameter(timm_config, layer_decay):
    reference = _timm_cait(**timm_config)
    model = cait_eqx.from_timm_state_dict(reference.state_dict())
    expected = _timm_groups(reference, layer_decay)
    ours = _per_timm_name(model, training.layer_decay_scales(model, layer_decay))
    decayed = _per_timm_name(model, training.weight_decay_mask(model))
    assert ours.keys() == expected.keys()
    for name, (scale, weight_decay) in expected.items():
        np.testing.assert_allclose(ours[name], scale, rtol=1e-6, atol=0, err_msg=name)
        assert bool(np.all(decayed[name])) == (weight_decay > 0) and bool(np.any(decayed[name])) == (
            weight_decay > 0
        ), name
    # Spelled out for the first configuration (depth 3, two CA blocks, a head: 5 layers).
    if timm_config["depth"] == 3:
        d = layer_decay
        assert ours["patch_embed.proj.weight"].flat[0] == pytest.approx(d**4, rel=1e-6)
        assert [ours[f"blocks.{i}.mlp.fc1.weight"].flat[0] for i in range(3)] == pytest.approx(
            [d**3, d**2, d], rel=1e-6
        )
        # timm lays the CA blocks over the last SA blocks: neither gets the head's full rate.
        assert ours["blocks_token_only.0.attn.q.weight"].flat[0] == pytest.approx(d**2, rel=1e-6)
        assert ours["blocks_token_only.1.attn.q.weight"].flat[0] == pytest.approx(d, rel=1e-6)
        assert ours["norm.weight"].flat[0] == pytest.approx(d, rel=1e-6)
        assert ours["head.weight"].flat[0] == 1.0


@pytest.mark.torch
def test_one_step_equals_torch_adamw_on_timms_param_groups():
    """One AdamW step with timm's param groups (group lr = lr · lr_scale) moves every weight as ours does."""
    import torch

    lr, weight_decay, layer_decay = 1e-2, 0.3, 0.7
    reference = _timm_cait(seed=3, depth=3, depth_token_only=2, num_classes=5)
    # Copies: the JAX arrays built from torch tensors may share their memory, which `step()` overwrites.
    model = cait_eqx.from_timm_state_dict({k: v.numpy().copy() for k, v in reference.state_dict().items()})
    rng = np.random.default_rng(0)
    grads = {name: rng.normal(size=p.shape).astype(np.float32) for name, p in reference.named_parameters()}

    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(
        reference,
        weight_decay=weight_decay,
        no_weight_decay_list=reference.no_weight_decay(),
        layer_decay=layer_decay,
    )
    for group in groups:
        group["lr"] = lr * group["lr_scale"]  # what timm's schedulers do with `lr_scale`
    torch_optim = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for name, p in reference.named_parameters():
        p.grad = torch.from_numpy(grads[name])
    torch_optim.step()
    expected = {name: p.detach().numpy() for name, p in reference.named_parameters()}

    optim = training.make_optimizer(lr, weight_decay=weight_decay, layer_decay=layer_decay)
    params = eqx.filter(model, eqx.is_array)
    grad_tree = eqx.filter(cait_eqx.from_timm_state_dict(grads), eqx.is_array)
    updates, _ = optim.update(grad_tree, optim.init(params), params)
    ours = cait_eqx.to_timm_state_dict(eqx.apply_updates(model, updates))
    start = cait_eqx.to_timm_state_dict(model)
    for name, value in expected.items():
        moved = np.abs(value - start[name]).max()
        assert moved > 0, name
        # A few float32 ulps of the weight; a weight-decay term scaled wrongly would differ by ~1e-4 here.
        np.testing.assert_allclose(ours[name], value, rtol=0, atol=1e-3 * moved, err_msg=name)


def _tiny(key, **overrides):
    kwargs = dict(
        image_size=8,
        patch_size=4,
        num_classes=10,
        dim=16,
        depth=3,
        cls_depth=2,
        heads=2,
        mlp_dim=32,
        channels=1,
    )
    return cait_eqx.CaiT(**(kwargs | overrides), key=key)


def test_one_step_equals_the_hand_computation(getkey):
    """First AdamW step: m̂ = g, v̂ = g², so each leaf moves by -lr·s·(g / (|g| + eps) + wd·p·[decayed])."""
    lr, wd, layer_decay, eps = 3e-3, 0.05, 0.6, 1e-8
    model = _tiny(getkey())
    params = eqx.filter(model, eqx.is_array)
    grads = jax.tree.map(lambda p: jr.normal(getkey(), p.shape, p.dtype), params)
    optim = training.make_optimizer(lr, weight_decay=wd, eps=eps, layer_decay=layer_decay)
    updates, state = jax.jit(optim.update)(grads, optim.init(params), params)
    scales = training.layer_decay_scales(model, layer_decay)
    mask = training.weight_decay_mask(model)

    def expected(g, p, s, decayed):
        step = np.asarray(g) / (np.abs(np.asarray(g)) + eps) + (wd * np.asarray(p) if decayed else 0.0)
        return -lr * s * step

    want = jax.tree.map(expected, grads, params, scales, mask)
    # optax computes Adam's bias correction 1 - 0.999 in float32 (1.3e-5 off): ~7e-6 relative on the step.
    for got, ref in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=1e-12)
    # The stacked SA leaves carry one factor per block (a row each), broadcast: (depth, 1, 1).
    assert scales.blocks.attn.qkv.weight.shape == (3, 1, 1) and scales.blocks.gamma_1.gamma.shape == (3, 1)
    np.testing.assert_allclose(scales.blocks.attn.qkv.weight.ravel(), [0.6**3, 0.6**2, 0.6], rtol=1e-6)
    # The factors are constants, not state: the state is the plain recipe's plus one empty slot.
    plain = training.make_optimizer(lr, weight_decay=wd, eps=eps).init(params)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(plain))


def test_a_frozen_backbone_stays_bitwise_and_the_head_learns(tmp_path, getkey):
    ds = data.load_digits()
    train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    train, test = train.subset(np.arange(96)), test.subset(np.arange(32))
    model = _tiny(jr.key(0), layer_dropout=0.1)
    # A signed zero must survive too: adding +0.0 would turn it into +0.0.
    model = eqx.tree_at(lambda m: m.norm.bias, model, model.norm.bias.at[0].set(-0.0))
    config = training.TrainConfig(
        epochs=1,
        batch_size=32,
        lr=1e-2,
        warmup_epochs=0.0,
        weight_decay=0.5,
        ema_decay=0.5,
        freeze="backbone",
        layer_decay=0.75,
        eval_batch_size=32,
        log_every=1,
    )
    result = training.fit(model, train, test, config, key=jr.key(1), run_dir=tmp_path, progress=False)
    assert result.status == "completed" and result.step == 3
    before = eqx.filter(model, eqx.is_array)
    after = eqx.filter(result.model, eqx.is_array)
    for (path, old), new in zip(
        jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after), strict=True
    ):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name.startswith("head."):
            assert np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-4, name
        else:
            assert np.asarray(new).tobytes() == np.asarray(old).tobytes(), name
    # The EMA model exists, its head follows the trained one and its backbone stays at the start.
    ema = result.ema
    assert not np.allclose(np.asarray(ema.head.weight), np.asarray(model.head.weight))
    np.testing.assert_allclose(
        np.asarray(ema.blocks.attn.qkv.weight), np.asarray(model.blocks.attn.qkv.weight), rtol=1e-6
    )
    # Adam moments are kept for the head only.
    moment_sizes = sum(x.size for x in jax.tree.leaves(result.opt_state) if eqx.is_array(x))
    head_size = model.head.weight.size + model.head.bias.size
    param_size = sum(x.size for x in jax.tree.leaves(before))
    assert moment_sizes < 2 * head_size + param_size + 10  # two moments of the head, the EMA, counters


def test_freezing_a_headless_model_is_refused(getkey):
    model = _tiny(getkey(), num_classes=0)
    optim = training.make_optimizer(1e-3, freeze="backbone")
    with pytest.raises(ValueError, match=r"num_classes=0.*reset_classifier"):
        optim.init(eqx.filter(model, eqx.is_array))


@pytest.mark.slow
def test_resume_with_layer_decay_is_bit_exact(tmp_path):
    ds = data.load_digits()
    train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    train, test = train.subset(np.arange(96)), test.subset(np.arange(32))
    model = _tiny(jr.key(0), layer_dropout=0.2)
    config = training.TrainConfig(
        epochs=2,
        batch_size=32,
        lr=2e-3,
        warmup_epochs=0.5,
        layer_decay=0.75,
        ema_decay=0.9,
        keep_checkpoints=2,
        eval_batch_size=32,
        log_every=1,
    )
    steps = training.TrainSteps.build(config, 3, 10, parallel.make_mesh(data=1))

    def run(**kw):
        return training.fit(model, train, test, config, key=jr.key(1), progress=False, steps=steps, **kw)

    full = run(run_dir=tmp_path / "full")
    part = run(run_dir=tmp_path / "cut", max_steps=4)
    assert part.status == "max_steps" and part.step == 4
    resumed = run(run_dir=tmp_path / "cut", resume=True)
    assert resumed.status == "completed" and resumed.step == full.step == 6
    for a, b in zip(
        jax.tree.leaves(eqx.filter((resumed.model, resumed.opt_state), eqx.is_array)),
        jax.tree.leaves(eqx.filter((full.model, full.opt_state), eqx.is_array)),
        strict=True,
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # Another layer decay (or freezing) would change the trajectory: resuming with it is refused.
    for changed in (dict(layer_decay=0.8), dict(freeze="backbone")):
        other = training.TrainConfig(**(config.to_dict() | changed))
        with pytest.raises(training.CheckpointError, match=next(iter(changed))):
            training.fit(
                model,
                train,
                test,
                other,
                key=jr.key(1),
                run_dir=tmp_path / "cut",
                resume=True,
                progress=False,
            )


@pytest.mark.slow
def test_a_sharded_step_scales_each_row_of_a_split_weight(getkey):
    """fsdp splits the stacked weights along a non-depth axis; each block's rows keep their own factor."""
    model = _tiny(getkey(), dim=32, mlp_dim=64, heads=4)
    optim = training.make_optimizer(1e-2, weight_decay=0.1, layer_decay=0.5, clip_norm=1.0)
    step = training.make_train_step(optim, training.StepConfig(num_classes=10), jit=False)
    images = jr.uniform(getkey(), (8, 1, 8, 8))
    labels = jnp.arange(8) % 10
    key = getkey()
    state = (model, optim.init(eqx.filter(model, eqx.is_array)))
    want, _, _ = eqx.filter_jit(step)(*state, (images, labels), key)
    mesh = parallel.make_mesh(data=2, fsdp=4)
    sharded = parallel.shard_train_step(step, mesh, min_size=64)
    got, _, _ = sharded(*parallel.shard_state(state, mesh, min_size=64), (images, labels), key)
    assert "fsdp" in got.blocks.mlp.fc1.weight.sharding.spec[1:]  # really split, never along the depth
    # Adam's first step is g / (|g| + eps): a gradient near 0, summed in another order, can move by ~1e-5;
    # a block's rows scaled by another block's factor would be off by half a step, >= 5e-4.
    got, want = eqx.filter(got, eqx.is_array), eqx.filter(want, eqx.is_array)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=3e-5)


def test_the_cli_takes_the_flags_into_the_run_config(tmp_path):
    parser = cli.build_parser()
    argv = ["train", "--layer-decay", "0.75", "--freeze", "backbone", "--out", str(tmp_path)]
    config = cli.train.run_config(parser.parse_args(argv), parser)
    assert config.train.layer_decay == 0.75 and config.train.freeze == "backbone"
    assert {"layer_decay", "freeze"} <= set(training.TrainConfig.trajectory_fields())
    # The step freezes (it differentiates only what trains); the optimiser decays layers.
    assert "freeze" in training.TrainConfig.step_fields()
    assert config.train.step_config(10).freeze == "backbone"
    assert "layer_decay" not in training.TrainConfig.step_fields()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--layer-decay", "0"], "--layer-decay: must be in (0, 1]"),
        (["train", "--layer-decay", "1.5"], "--layer-decay: must be in (0, 1]"),
        (["train", "--freeze", "all"], "--freeze"),
        # The default digits model has 4 SA blocks: checked against it before anything is trained.
        (["train", "--freeze", "blocks:5"], "freezes 5 self-attention blocks, but this model has 4"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_settings_are_refused_naming_the_field(getkey):
    for value in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"TrainConfig `layer_decay` must be"):
            training.TrainConfig(layer_decay=value)
        with pytest.raises(ValueError, match=r"`layer_decay` must be in \(0, 1\]"):
            training.make_optimizer(1e-3, layer_decay=value)
    for value in ("head", "blocks:0", "blocks:-1", "blocks:x", "blocks"):
        with pytest.raises(
            ValueError, match=rf"TrainConfig `freeze` must be none, backbone or blocks:N .*got '{value}'"
        ):
            training.TrainConfig(freeze=value)
    assert training.TrainConfig(freeze="blocks:12").freeze == "blocks:12"
    with pytest.raises(ValueError, match=r"`freeze` must be one of 'none', 'backbone', got 'all'"):
        training.make_optimizer(1e-3, freeze="all")
    assert training.TrainConfig(layer_decay=1).layer_decay == 1.0  # 1: no decay, allowed
    with pytest.raises(TypeError, match="follows the layers of a `CaiT`"):
        training.layer_decay_scales({"w": jnp.zeros(3)}, 0.75)


# ----------------------------------------------------------------------- frozen parameters cost nothing


def _matmul_flops(jaxpr) -> int:
    """Multiply-add FLOPs of every `dot_general` a jaxpr runs, a scan's body counted once per iteration."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * _matmul_flops(inner)
    return total


def _step_flops(model, freeze, batch=4):
    optim = training.make_optimizer(1e-3)
    step = training.make_train_step(optim, training.StepConfig(num_classes=10, freeze=freeze), jit=False)
    state = optim.init(training.trainable_params(model, freeze))
    images, labels = jnp.zeros((batch, 1, 8, 8), jnp.uint8), jnp.arange(batch)
    return _matmul_flops(eqx.filter_make_jaxpr(step)(model, state, (images, labels), jr.key(0))[0].jaxpr)


def _forward_flops(model, batch=4):
    images = jnp.zeros((batch, 1, 8, 8))
    forward = eqx.filter_make_jaxpr(lambda m, x: jax.vmap(m)(x))(eqx.nn.inference_mode(model), images)
    return _matmul_flops(forward[0].jaxpr)


def test_frozen_parameters_cost_no_gradient_computation(getkey):
    """Counted on the traced step, not on values: the probe's step is the forward pass plus the head's weight
    gradient; each frozen SA block removes its whole backward pass (twice its forward's matmuls: the
    gradients of its inputs and of its weights), which a masked gradient would still compute."""
    model = cait_eqx.with_remat(_tiny(getkey(), depth=4), "none")  # no recomputation in the count
    batch, dim, classes = 4, 16, 10
    forward = _forward_flops(model, batch)
    assert _step_flops(model, "backbone", batch) == forward + 2 * batch * dim * classes
    one_block = _forward_flops(model, batch) - _forward_flops(_tiny(getkey(), depth=3), batch)
    frozen = [_step_flops(model, f"blocks:{n}", batch) for n in range(1, 5)]
    assert [a - b for a, b in zip(frozen, frozen[1:], strict=False)] == [2 * one_block] * 3
    full = _step_flops(model, "none", batch)
    assert full - frozen[0] > 2 * one_block and frozen[-1] < full - 8 * one_block


def _state_size(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state) if eqx.is_array(x))


def test_the_optimiser_keeps_no_state_for_frozen_parameters(getkey):
    model = _tiny(getkey(), depth=3)
    optim = training.make_optimizer(1e-3, ema_decay=0.9, layer_decay=0.75)
    counters = _state_size(optim.init({}))  # Adam's step count

    def size(tree):
        return sum(x.size for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))

    head = size(model.head)
    # Two Adam moments and the EMA of what trains, nothing else.
    assert _state_size(optim.init(training.trainable_params(model, "backbone"))) == 3 * head + counters
    stem = size((model.patch_embed, model.pos_embed, model.cls_token))
    per_block = size(model.blocks) // 3
    trained = size(model) - stem - 2 * per_block
    params = training.trainable_params(model, "blocks:2")
    assert params.blocks.attn.qkv.weight.shape[0] == 1 and jax.tree.leaves(params.patch_embed) == []
    assert _state_size(optim.init(params)) == 3 * trained + counters
    assert _state_size(optim.init(training.trainable_params(model, "none"))) == 3 * size(model) + counters
    # Layer decay still gives each trained block its own layer's factor (the last block's here).
    scales = training.layer_decay_scales(params, 0.5)
    full = training.layer_decay_scales(model, 0.5)
    np.testing.assert_array_equal(scales.blocks.attn.qkv.weight, full.blocks.attn.qkv.weight[2:])


def test_split_blocks_compute_the_same_function(getkey):
    """Frozen first blocks run as a stack of their own (`trainable_model`): the same outputs, features and
    intermediates, with the same stochastic depth, as the one stack."""
    model = _tiny(getkey(), depth=4, layer_dropout=0.3, dropout=0.1)
    split = training.trainable_model(model, training.trainable_params(model, "blocks:1"))
    assert isinstance(split.blocks, tuple) and len(split.blocks) == 2
    image, key = jr.uniform(getkey(), (1, 8, 8)), getkey()
    np.testing.assert_allclose(split(image, key=key), model(image, key=key), rtol=1e-6, atol=1e-6)
    for kw in (dict(indices=[0, 2]), dict(indices=[1, 3], stop_early=True),
               dict(indices=[0], stop_early=True)):
        got = eqx.nn.inference_mode(split).forward_intermediates(image, intermediates_only=True, **kw)
        want = eqx.nn.inference_mode(model).forward_intermediates(image, intermediates_only=True, **kw)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # `merge_trainable` is the inverse of `trainable_params`.
    merged = training.merge_trainable(model, training.trainable_params(model, "blocks:3"))
    for a, b in zip(jax.tree.leaves(eqx.filter(merged, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(model, eqx.is_array)), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow
def test_frozen_first_blocks_stay_bitwise_and_resume_exactly(tmp_path):
    ds = data.load_digits()
    train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    train, test = train.subset(np.arange(96)), test.subset(np.arange(32))
    model = _tiny(jr.key(0), layer_dropout=0.1)
    config = training.TrainConfig(
        epochs=2, batch_size=32, lr=1e-2, warmup_epochs=0.0, weight_decay=0.5, ema_decay=0.9,
        freeze="blocks:2", layer_decay=0.75, eval_batch_size=32, log_every=1, keep_checkpoints=3,
    )
    steps = training.TrainSteps.build(config, 3, 10, parallel.make_mesh(data=1))

    def run(**kw):
        return training.fit(model, train, test, config, key=jr.key(1), progress=False, steps=steps, **kw)

    full = run(run_dir=tmp_path / "full")
    assert full.status == "completed" and full.step == 6
    for name, old, new in (
        ("patch_embed", model.patch_embed, full.model.patch_embed),
        ("pos_embed", model.pos_embed, full.model.pos_embed),
        ("cls_token", model.cls_token, full.model.cls_token),
        ("first two blocks", jax.tree.map(lambda x: x[:2], eqx.filter(model.blocks, eqx.is_array)),
         jax.tree.map(lambda x: x[:2], eqx.filter(full.model.blocks, eqx.is_array))),
    ):
        for a, b in zip(jax.tree.leaves(eqx.filter(old, eqx.is_array)),
                        jax.tree.leaves(eqx.filter(new, eqx.is_array)), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
    for name, old, new in (
        ("last block", model.blocks.mlp.fc1.weight[2], full.model.blocks.mlp.fc1.weight[2]),
        ("class attention", model.blocks_token_only[0].attn.q.weight,
         full.model.blocks_token_only[0].attn.q.weight),
        ("head", model.head.weight, full.model.head.weight),
    ):
        assert np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-4, name
    # The EMA model keeps the frozen parameters as they are.
    assert np.asarray(full.ema.blocks.attn.qkv.weight[:2]).tobytes() == np.asarray(
        model.blocks.attn.qkv.weight[:2]).tobytes()
    part = run(run_dir=tmp_path / "cut", max_steps=4)
    resumed = run(run_dir=tmp_path / "cut", resume=True)
    assert part.step == 4 and resumed.step == 6
    for a, b in zip(
        jax.tree.leaves(eqx.filter((resumed.model, resumed.opt_state), eqx.is_array)),
        jax.tree.leaves(eqx.filter((full.model, full.opt_state), eqx.is_array)),
        strict=True,
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # A checkpoint of an older version (a frozen model's optimiser state over every parameter) is refused
    # with a sentence, before its arrays are read.
    newest = training.list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    meta = json.loads(newest.path.read_text())
    del meta["extra"]["optimiser_state"]
    newest.path.write_text(json.dumps(meta))
    with pytest.raises(training.CheckpointError, match=r"written by an older cait_eqx.*start a new run"):
        run(run_dir=tmp_path / "cut", resume=True)


def test_freezing_more_blocks_than_the_model_has_is_refused_before_training(tmp_path, getkey):
    ds = data.load_digits()
    train = ds.subset(np.arange(32))
    model = _tiny(getkey(), depth=3)
    config = training.TrainConfig(epochs=1, batch_size=16, freeze="blocks:4", check_data=False)
    with pytest.raises(ValueError, match=r"freezes 4 self-attention blocks, but this model has 3: N must be "
                                         r"in 1\.\.3"):
        training.fit(model, train, None, config, key=getkey(), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"this model has 3"):
        training.trainable_params(model, "blocks:4")
    with pytest.raises(TypeError, match=r"knows the layers of a `CaiT`"):
        training.trainable_params({"w": jnp.zeros(3)}, "blocks:1")
