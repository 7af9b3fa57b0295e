"""Mixed precision: bfloat16 computation with float32 weights, checked against the float32 computation.

What would be wrong: logits that drift from the float32 ones by more than 1e-2 relative; casts silently
dropped (the products would run in float32, or the weights would be stored in bfloat16); softmax or LayerNorm
statistics in bfloat16; gradients or optimiser state in bfloat16; a compute dtype lost by `load`, by the
training loop or by the run's config; a bad dtype accepted.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import cait_eqx
from cait_eqx import data, training
from cait_eqx.cli import build_parser
from cait_eqx.cli.train import run_config

TOLERANCE = 1e-2  # issue 8: max |Δ logit| / max |logit| of bfloat16 against float32 computation


def _small(key, **overrides):
    kwargs = dict(
        image_size=16, patch_size=4, num_classes=10, dim=64, depth=4, cls_depth=2, heads=4, mlp_dim=128,
        channels=1,
    )
    kwargs.update(overrides)
    return cait_eqx.CaiT(**kwargs, key=key)


def _logits(model, images):
    return eqx.filter_jit(lambda m, x: jax.vmap(eqx.nn.inference_mode(m))(x))(model, images)


def _relative_error(model, images) -> float:
    """Max |Δ| / max |logit| between the model computing in bfloat16 and in float32, on the same weights."""
    reference = _logits(cait_eqx.with_compute_dtype(model, jnp.float32), images)
    mixed = _logits(cait_eqx.with_compute_dtype(model, jnp.bfloat16), images)
    assert reference.dtype == mixed.dtype == jnp.float32  # logits come back in the parameter dtype
    assert bool(jnp.all(jnp.isfinite(mixed)))
    return float(jnp.max(jnp.abs(mixed - reference)) / jnp.max(jnp.abs(reference)))


def _float_leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


@pytest.fixture(scope="module")
def digits():
    train, test = data.train_test_split(data.load_digits(image_size=16), test_fraction=0.2, seed=0)
    return train.subset(np.arange(64)), test.subset(np.arange(64))


def _images(dataset, n):
    return jnp.asarray(dataset.images[:n], jnp.float32) / 255.0


@pytest.fixture(scope="module")
def bf16_fit(digits):
    """A small CaiT trained by `fit` with `compute_dtype="bfloat16"` (30 steps on 64 digits), and losses."""
    train, _ = digits
    losses = []
    config = training.TrainConfig(
        epochs=15, batch_size=32, lr=3e-3, warmup_epochs=0.0, weight_decay=0.0, label_smoothing=0.0,
        crop_padding=0, compute_dtype="bfloat16",
    )
    result = training.fit(
        _small(jr.key(0)), train, None, config, key=jr.key(1), progress=False,
        on_step=lambda step, metrics: losses.append(metrics["loss"]),
    )
    return result, losses


# ---------------------------------------------------------------------------------------------- accuracy


def test_bf16_logits_match_fp32_for_a_fresh_small_model(digits):
    # timm's initialisation (truncated normal .02, LayerScale 0.1 at this depth), real digit images.
    error = _relative_error(_small(jr.key(3)), _images(digits[1], 32))
    assert error <= TOLERANCE, f"bf16 logits differ from fp32 by {error:.2e} relative (> {TOLERANCE})"


def test_bf16_logits_match_fp32_for_a_trained_model(bf16_fit, digits):
    model = bf16_fit[0].model
    error = _relative_error(model, _images(digits[1], 64))
    assert error <= TOLERANCE, f"bf16 logits of the trained model differ by {error:.2e} relative"
    # Training moved the weights well away from their initialisation: the check is on trained weights.
    fresh = _small(jr.key(0))
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(_float_leaves(model), _float_leaves(fresh), strict=True)
    )
    assert moved > 0.02


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_bf16_logits_match_fp32_for_cait_xxs24_224(init_values, getkey):
    # The paper's smallest ImageNet model at 224×224, as built (LayerScale 1e-5), and with LayerScale 0.1 so
    # that its 24 self-attention blocks weigh in the residual stream as in a trained model.
    overrides = {} if init_values is None else {"init_values": init_values}
    model = cait_eqx.create_model("cait_xxs24_224", key=getkey(), **overrides)
    images = jr.uniform(getkey(), (2, 3, 224, 224))
    error = _relative_error(model, images)
    assert error <= TOLERANCE, f"cait_xxs24_224 bf16 logits differ by {error:.2e} relative"


# ------------------------------------------------------------------------------- where the casts happen


def _equations(jaxpr, in_scan=False):
    """`(equation, inside a scan)` for every equation of a jaxpr and of the jaxprs nested in it (scan, remat,
    jit, custom rules). The SA blocks, and only they, run inside a `scan` (forward and backward)."""
    for eqn in jaxpr.eqns:
        yield eqn, in_scan
        inner = in_scan or eqn.primitive.name == "scan"
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    yield from _equations(item.jaxpr, inner)
                elif isinstance(item, jax.extend.core.Jaxpr):
                    yield from _equations(item, inner)


def _dtypes_of(jaxpr, primitive: str, in_scan: bool | None = None) -> list[tuple[str, ...]]:
    return [
        tuple(str(v.aval.dtype) for v in eqn.invars)
        for eqn, inside in _equations(jaxpr)
        if eqn.primitive.name == primitive and in_scan in (None, inside)
    ]


def test_products_run_in_bf16_and_statistics_in_fp32(getkey):
    model = eqx.nn.inference_mode(_small(getkey()))
    images = jr.uniform(getkey(), (2, 1, 16, 16))

    mixed = jax.make_jaxpr(jax.vmap(cait_eqx.with_compute_dtype(model, jnp.bfloat16)))(images).jaxpr
    # The SA blocks (one scan body): qkv, q·k, attn·v, proj, fc1, fc2, all in bfloat16 ...
    blocks = _dtypes_of(mixed, "dot_general", in_scan=True)
    assert len(blocks) == 6 and all(operands == ("bfloat16", "bfloat16") for operands in blocks), blocks
    # ... and the two talking-heads mixes, written out as heads² scaled maps each (`_layers._mix_heads`).
    heads = model.config.heads
    scaled = [eqn for eqn, inside in _equations(mixed) if inside and eqn.primitive.name == "mul"
              and [v.aval.ndim for v in eqn.invars] == [0, 4]]  # (batch, 1, q, k)
    assert len(scaled) == 2 * heads**2, len(scaled)
    assert all(str(v.aval.dtype) == "bfloat16" for eqn in scaled for v in eqn.invars)
    # Patch embedding, 8 products per CA block, the head: in the parameter dtype.
    rest = _dtypes_of(mixed, "dot_general", in_scan=False)
    assert len(rest) == 1 + 8 * model.config.cls_depth + 1
    assert all(operands == ("float32", "float32") for operands in rest), rest
    # Softmax (its exp and max) and LayerNorm (mean, variance, rsqrt) in float32, in the blocks too.
    for primitive in ("exp", "reduce_max", "reduce_sum", "rsqrt"):
        found = _dtypes_of(mixed, primitive, in_scan=True)
        assert found and all(d == ("float32",) for d in found), (primitive, found)

    # The control: the same model computing in float32 runs every product in float32.
    plain = jax.make_jaxpr(jax.vmap(model))(images).jaxpr
    assert all(operands == ("float32", "float32") for operands in _dtypes_of(plain, "dot_general"))


def test_parameters_and_gradients_stay_fp32_while_the_backward_pass_runs_in_bf16(getkey):
    model = cait_eqx.with_compute_dtype(_small(getkey()), "bfloat16")
    images = jr.uniform(getkey(), (4, 1, 16, 16))
    labels = jnp.array([0, 3, 5, 9])

    def loss(m):
        logits = jax.vmap(lambda x: m(x, inference=True))(images)
        assert logits.dtype == jnp.float32  # the loss is computed in float32
        return training.cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean()

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    grads = grad(model)
    assert all(leaf.dtype == jnp.float32 for leaf in _float_leaves(model))
    assert all(leaf.dtype == jnp.float32 for leaf in _float_leaves(grads))
    # The gradients agree in direction with the float32 computation's.
    reference = grad(cait_eqx.with_compute_dtype(model, None))
    g = jnp.concatenate([leaf.ravel() for leaf in _float_leaves(grads)])
    r = jnp.concatenate([leaf.ravel() for leaf in _float_leaves(reference)])
    cosine = float(g @ r / (jnp.linalg.norm(g) * jnp.linalg.norm(r)))
    assert cosine > 0.99, cosine
    # The SA blocks' products, forward and backward (recomputed forward, two transposes each), in bfloat16.
    params, static = eqx.partition(model, eqx.is_array)
    backward = jax.make_jaxpr(lambda p: eqx.filter_grad(loss)(eqx.combine(p, static)))(params).jaxpr
    products = _dtypes_of(backward, "dot_general", in_scan=True)
    assert len(products) >= 3 * 6 and all(operands == ("bfloat16", "bfloat16") for operands in products)


# ------------------------------------------------------------------------------------------------ training


def test_fit_with_bf16_compute_lowers_the_loss_on_digits(bf16_fit):
    result, losses = bf16_fit
    assert result.model.compute_dtype == "bfloat16"
    assert all(np.isfinite(losses)) and result.skipped_steps == 0
    assert len(losses) == 30
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.2, losses  # about 2.33 -> 1.97
    # Weights and optimiser state stayed float32.
    assert all(leaf.dtype == jnp.float32 for leaf in _float_leaves(result.model))
    assert all(leaf.dtype == jnp.float32 for leaf in _float_leaves(result.opt_state))


def test_compute_dtype_is_in_the_run_config_and_the_cli(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "--quick", "--compute-dtype", "bfloat16", "--out", str(tmp_path)])
    config = run_config(args, parser)
    assert config.train.compute_dtype == "bfloat16"
    # Written to and read back from RUN_DIR/config.json, which `--resume` trains with.
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert training.load_run_config(tmp_path).train.compute_dtype == "bfloat16"
    # A config written before the option existed computes in the model's own dtype.
    old = config.to_dict()
    del old["train"]["compute_dtype"]
    assert training.RunConfig.from_dict(old).train.compute_dtype is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--compute-dtype", "float16"])  # no loss scaling: not offered
    with pytest.raises(ValueError, match="compute_dtype"):
        training.TrainConfig(compute_dtype="float16")


# ------------------------------------------------------------------------------------------ API and files


def test_with_compute_dtype_round_trips_and_shares_the_weights(getkey):
    model = _small(getkey())
    assert model.compute_dtype == "float32"
    mixed = cait_eqx.with_compute_dtype(model, jnp.bfloat16)
    assert mixed.compute_dtype == "bfloat16" and model.compute_dtype == "float32"  # a copy
    # weights not cast
    assert all(a is b for a, b in zip(_float_leaves(mixed), _float_leaves(model), strict=True))
    back = cait_eqx.with_compute_dtype(mixed, None)  # None: the parameter dtype
    assert back.compute_dtype == "float32"
    images = jr.uniform(getkey(), (2, 1, 16, 16))
    np.testing.assert_array_equal(np.asarray(_logits(back, images)), np.asarray(_logits(model, images)))
    assert not np.array_equal(np.asarray(_logits(mixed, images)), np.asarray(_logits(model, images)))
    # The constructor and `create_model` take it too, by dtype or by name.
    assert _small(getkey(), compute_dtype="bfloat16").compute_dtype == "bfloat16"
    assert _small(getkey(), dtype=jnp.bfloat16).compute_dtype == "bfloat16"  # follows the parameters
    built = cait_eqx.create_model("cait_xxs24_224", key=getkey(), depth=1, compute_dtype=jnp.float16)
    assert built.compute_dtype == "float16" and built.pos_embed.dtype == jnp.float32
    maps = cait_eqx.with_compute_dtype(model, "bfloat16").class_attention(images[0])
    assert maps.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(maps.sum(-1)), 1.0, atol=1e-2)
    # Copies made by the weight tools keep the choice (it is not part of the architecture they rebuild).
    assert cait_eqx.set_input_size(mixed, 24).compute_dtype == "bfloat16"
    assert cait_eqx.reset_classifier(mixed, 3, key=getkey()).compute_dtype == "bfloat16"


@pytest.mark.parametrize("bad", ["int8", jnp.int32, "float64", "bf16", 3, object()])
def test_bad_compute_dtypes_are_clear_value_errors(bad, getkey):
    model = _small(getkey())
    with pytest.raises(ValueError, match=r"`compute_dtype` must be one of float32, bfloat16, float16"):
        cait_eqx.with_compute_dtype(model, bad)
    with pytest.raises(ValueError, match="compute_dtype"):
        _small(getkey(), compute_dtype=bad)
    with pytest.raises(ValueError, match="compute_dtype"):
        cait_eqx.create_model("cait_xxs24_224", key=getkey(), compute_dtype=bad)


def test_save_and_load_keep_fp32_weights_bit_exact(tmp_path, getkey):
    model = cait_eqx.with_compute_dtype(eqx.nn.inference_mode(_small(getkey())), jnp.bfloat16)
    path = cait_eqx.save(tmp_path / "model.safetensors", model)
    # The file is the float32 model's: the compute dtype is a run-time choice, not stored.
    plain = cait_eqx.with_compute_dtype(model, None)
    assert path.read_bytes() == cait_eqx.save(tmp_path / "plain.safetensors", plain).read_bytes()
    loaded = cait_eqx.load(path)
    assert loaded.compute_dtype == "float32"
    mixed = cait_eqx.load(path, compute_dtype="bfloat16")
    assert mixed.compute_dtype == "bfloat16"
    for restored in (loaded, mixed):
        for a, b in zip(_float_leaves(restored), _float_leaves(model), strict=True):
            assert a.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    images = jr.uniform(getkey(), (2, 1, 16, 16))
    np.testing.assert_array_equal(np.asarray(_logits(mixed, images)), np.asarray(_logits(model, images)))
    # With a resampled positional embedding, and through the timm state-dict path.
    bigger = cait_eqx.load(path, image_size=24, compute_dtype=jnp.bfloat16)
    assert bigger.compute_dtype == "bfloat16" and bigger.pos_embed.shape == (36, 64)
    state_dict = cait_eqx.to_timm_state_dict(model)
    assert all(v.dtype == np.float32 for v in state_dict.values())
    again = cait_eqx.from_timm_state_dict(state_dict, compute_dtype="bfloat16", channels=1, image_size=16)
    assert again.compute_dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(_logits(again, images)), np.asarray(_logits(model, images)))
