"""Every documented configuration error, wrong input and bad state dict raises a clear, named error."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import cait_eqx
from cait_eqx._inputs import check_image


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(image_size=18), r"`image_size` \(18, 18\) is not divisible by `patch_size` 4"),
        (dict(image_size=(16, 20), patch_size=8), r"not divisible by `patch_size` 8 \(width 20"),
        (dict(dim=30), r"`dim` \(30\) must be divisible by `heads` \(4\)"),
        (dict(dropout=1.0), r"`dropout` must be in \[0, 1\)"),
        (dict(emb_dropout=-0.1), r"`emb_dropout` must be in \[0, 1\)"),
        (dict(layer_dropout=1.5), r"`layer_dropout` must be in \[0, 1\)"),
        (dict(attn_dropout=2), r"`attn_dropout` must be in \[0, 1\)"),
        (dict(depth=0), r"`depth` must be >= 1, got 0"),
        (dict(cls_depth=-1), r"`cls_depth` must be >= 0, got -1"),
        (dict(heads=0), r"`heads` must be >= 1"),
        (dict(patch_size=0), r"`patch_size` must be >= 1"),
        (dict(num_classes=-3), r"`num_classes` must be >= 0"),
        (dict(dim=32.0), r"`dim` must be an int"),
        (dict(image_size=(16,)), r"`image_size` must be an int or a \(height, width\) pair"),
        (dict(image_size=(16, 0)), r"`image_size` sides must be positive ints"),
        (dict(init_values=0.0), r"`init_values` .* must be a positive, finite float"),
        (dict(dim_head=0), r"`dim_head` must be >= 1"),
        (dict(talking_heads=1), r"`talking_heads` must be a bool"),
        (dict(dtype=jnp.int32), r"`dtype` must be one of"),
    ],
)
def test_configuration_errors(tiny_config, change, message):
    with pytest.raises(ValueError, match=message):
        cait_eqx.CaiT(**dict(tiny_config, **change), key=jax.random.key(0))


def test_dim_head_lifts_the_divisibility_rule(tiny_config):
    model = cait_eqx.CaiT(**dict(tiny_config, dim=30), dim_head=8, key=jax.random.key(0))
    assert model.blocks.attn.qkv.weight.shape[1:] == (3 * 4 * 8, 30)
    assert model(jnp.zeros((3, 16, 16))).shape == (10,)


def test_unknown_variant_suggests_names():
    with pytest.raises(ValueError, match="Did you mean 'cait_xxs24_224'"):
        cait_eqx.create_model("cait_xxs24_22", key=jax.random.key(0))


# How jaxtyping's import hook (on in every test, tests/conftest.py) reports a wrong argument: our own checks
# (`cait_eqx._inputs.check_image`, active with the hook off too) say "argument `x`", so this tells the two
# apart.
BY_JAXTYPING = r"typechecking parameter 'x'"


@pytest.mark.parametrize(
    "shape,message",
    [
        ((2, 3, 16, 16), BY_JAXTYPING),  # a batch given to the per-example call: the annotation's rank
        ((16, 16), BY_JAXTYPING),  # no channel axis
        ((1, 16, 16), r"\(channels, height, width\) = \(3, 16, 16\), got shape \(1, 16, 16\)"),
        ((3, 16, 20), r"got shape \(3, 16, 20\)"),
        ((16, 16, 3), r"got shape \(16, 16, 3\)"),  # channels-last
    ],
)
def test_wrong_input_shapes_raise_type_check_errors(tiny_model, shape, message):
    with pytest.raises(TypeCheckError, match=message):
        tiny_model(jnp.zeros(shape))
    # The same check fires at trace time under jit.
    with pytest.raises(TypeCheckError, match=message):
        eqx.filter_jit(tiny_model)(jnp.zeros(shape))


def test_batched_input_error_says_to_vmap(tiny_model):
    with pytest.raises(TypeCheckError, match=BY_JAXTYPING):
        tiny_model(jnp.zeros((2, 3, 16, 16)))
    # Our own check (also active with jaxtyping off) names the fix.
    with pytest.raises(TypeCheckError, match=r"jax.vmap\(model\)\(images\)"):
        check_image(tiny_model.config, jnp.zeros((2, 3, 16, 16)), dynamic=False)


def test_integer_images_are_rejected(tiny_model):
    with pytest.raises(TypeCheckError, match=BY_JAXTYPING):
        tiny_model(jnp.zeros((3, 16, 16), jnp.uint8))
    with pytest.raises(TypeCheckError, match=r"floating-point image .* got dtype uint8"):
        check_image(tiny_model.config, jnp.zeros((3, 16, 16), jnp.uint8), dynamic=False)


_CALLS_WITH_WRONG_ARGUMENTS = """
import jax, jax.numpy as jnp, cait_eqx
print("enabled", cait_eqx.TYPECHECKING_ENABLED)
m = cait_eqx.CaiT(16, 4, 10, 32, 2, 2, 4, 64, key=jax.random.key(0))
for name, call in [
    ("batch", lambda: m(jnp.zeros((2, 3, 16, 16)))),
    ("inference='yes'", lambda: m(jnp.zeros((3, 16, 16)), inference="yes")),
]:
    try:
        out = call()
        print(name, "ran", out.shape)
    except Exception as error:
        print(name, type(error).__name__, " ".join(str(error).split()))
"""


@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_import_hook_does_the_checking_and_can_be_switched_off(setting):
    """`CAIT_EQX_TYPECHECK` decides whether jaxtyping checks every call; our own shape checks hold either way.

    With the hook on, jaxtyping refuses a batch (naming parameter `x`) and an `inference` that is not a bool;
    with it off (`CAIT_EQX_TYPECHECK=0`, read at the first `import cait_eqx`), the batch still fails, by our
    own check, and the wrong `inference` goes through unchecked.
    """
    out = subprocess.run(
        [sys.executable, "-c", _CALLS_WITH_WRONG_ARGUMENTS],
        env={**os.environ, "CAIT_EQX_TYPECHECK": setting, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    if setting == "1":
        assert lines["enabled"] == "True"
        assert re.search(r"^TypeCheckError .*" + BY_JAXTYPING, lines["batch"]), lines["batch"]
        assert re.search(r"^TypeCheckError .*typechecking parameter 'inference'", lines["inference='yes'"])
    else:
        assert lines["enabled"] == "False"
        assert lines["batch"].startswith("TypeCheckError CaiT got a batch (2, 3, 16, 16)"), lines["batch"]
        assert "typechecking parameter" not in lines["batch"]
        assert lines["inference='yes'"] == "ran (10,)"


# ------------------------------------------------------------------------------------------ state dicts


def _state_dict(model):
    return dict(cait_eqx.to_timm_state_dict(model))


def test_state_dict_round_trip_is_exact(tiny_model):
    back = cait_eqx.from_timm_state_dict(_state_dict(tiny_model))
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(tiny_model, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(back, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.config == tiny_model.config
    # Returned in inference mode.
    assert back.pos_drop.inference and back.blocks.drop_path.inference


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tiny_model):
    sd = _state_dict(tiny_model)
    del sd["blocks.1.attn.proj_w.bias"]
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["blocks_token_only.0.mlp.fc1.weight"] = np.zeros((64, 31), np.float32)
    with pytest.raises(cait_eqx.WeightsError) as info:
        cait_eqx.from_timm_state_dict(sd)
    text = str(info.value)
    assert "1 missing key(s): blocks.1.attn.proj_w.bias" in text
    assert "1 unexpected key(s): blocks.0.attn.extra" in text
    assert "blocks_token_only.0.mlp.fc1.weight: expected (64, 32), got (64, 31)" in text


def test_wrong_variant_is_refused(tiny_model):
    with pytest.raises(cait_eqx.WeightsError, match="mis-shaped"):
        cait_eqx.from_timm_state_dict(_state_dict(tiny_model), name="cait_xxs24_224")


def test_not_a_cait_state_dict():
    with pytest.raises(cait_eqx.WeightsError, match="does not look like a CaiT"):
        cait_eqx.from_timm_state_dict({"conv1.weight": np.zeros((3, 3), np.float32)})


def test_no_silent_reshape_of_a_transposed_weight(tiny_model):
    sd = _state_dict(tiny_model)
    sd["head.weight"] = sd["head.weight"].T.copy()  # same number of elements, wrong layout
    with pytest.raises(cait_eqx.WeightsError, match=r"head.weight: expected \(10, 32\), got \(32, 10\)"):
        cait_eqx.from_timm_state_dict(sd, num_classes=10)
