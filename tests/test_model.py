"""Behaviour of the model itself: initialisation, randomness, LayerScale, training, compile structure."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cait_eqx


def _image(key, shape=(3, 16, 16)):
    return jax.random.normal(key, shape)


# ------------------------------------------------------------------------------------------ initialisation


def test_output_depends_on_input_at_init(tiny_config, getkey):
    # The Flax port's zero-initialised head mixes made the logits ignore the image; ours must not.
    model = cait_eqx.CaiT(**tiny_config, key=getkey())
    a, b = model(_image(getkey())), model(_image(getkey()))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4 * float(jnp.max(jnp.abs(a)))


def test_every_parameter_gets_a_gradient_at_init(tiny_config, getkey):
    """Every leaf (every row of the stacked SA blocks) gets a non-zero gradient, except `proj_l`'s bias.

    `proj_l`'s bias adds the same number to every logit of a head before the softmax, which the softmax
    cancels: its gradient is exactly zero in the official model too.
    """
    model = cait_eqx.CaiT(**tiny_config, key=getkey())
    images = jax.vmap(_image)(jax.random.split(getkey(), 4))
    labels = jnp.arange(4)

    @eqx.filter_grad
    def grads(m):
        logits = jax.vmap(m)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g = eqx.filter_jit(grads)(model)  # one compiled program (op by op it takes twice as long)
    flat, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(g, eqx.is_array))
    assert len(flat) > 30
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if "proj_l" in name and "bias" in name:
            np.testing.assert_allclose(np.asarray(leaf), 0.0, atol=1e-9)
            continue
        if name.startswith(".blocks."):  # stacked: every block must receive gradient
            per_block = jnp.max(jnp.abs(leaf.reshape(leaf.shape[0], -1)), axis=1)
            assert bool(jnp.all(per_block > 0)), f"{name} has a block with zero gradient"
        else:
            assert float(jnp.max(jnp.abs(leaf))) > 0, f"{name} has zero gradient"


def test_initialisation_statistics(tiny_config, getkey):
    model = cait_eqx.CaiT(**tiny_config, key=getkey())
    # Head mixes are random (std .02), never zero; biases start at zero; LayerNorm at (1, 0).
    for mix in (model.blocks.attn.proj_l, model.blocks.attn.proj_w):
        assert mix is not None
        assert 0.005 < float(jnp.std(mix.weight)) < 0.05
        assert float(jnp.max(jnp.abs(mix.bias))) == 0.0
    assert float(jnp.std(model.blocks.attn.qkv.weight)) == pytest.approx(0.02 * 0.88, rel=0.1)
    assert bool(jnp.all(model.norm.weight == 1)) and bool(jnp.all(model.norm.bias == 0))
    # Different blocks get different weights (no key reuse across the stack).
    w = model.blocks.attn.qkv.weight
    assert float(jnp.max(jnp.abs(w[0] - w[1]))) > 0


# ------------------------------------------------------------------------------------------ LayerScale rule


@pytest.mark.parametrize(
    "depth,expected", [(1, 0.1), (12, 0.1), (18, 0.1), (19, 1e-5), (24, 1e-5), (25, 1e-6)]
)
def test_layerscale_rule_by_total_depth(tiny_config, depth, expected):
    config = dict(tiny_config, depth=depth)
    model = eqx.filter_eval_shape(cait_eqx.CaiT, **config, key=jax.random.key(0))
    assert model.config.init_values == expected
    assert cait_eqx.default_init_values(depth) == expected


def test_layerscale_gammas_are_learnable_and_use_init_values(tiny_config, getkey):
    model = cait_eqx.CaiT(**dict(tiny_config, depth=3), init_values=0.25, key=getkey())
    for block in (model.blocks, *model.blocks_token_only):
        for gamma in (block.gamma_1.gamma, block.gamma_2.gamma):
            assert gamma.shape[-1] == tiny_config["dim"]
            assert bool(jnp.all(gamma == 0.25))
    # Same ε everywhere: one choice for the whole network (depth 3 -> every block, SA and CA).
    default = cait_eqx.CaiT(**dict(tiny_config, depth=3), key=getkey())
    assert bool(jnp.all(default.blocks.gamma_1.gamma == 0.1))
    assert bool(jnp.all(default.blocks_token_only[1].gamma_2.gamma == 0.1))
    # Learnable: they are array leaves, so optimisers see (and update) them.
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    assert any(leaf is model.blocks.gamma_1.gamma for leaf in leaves)


# ------------------------------------------------------------------------------------------ randomness


def test_inference_is_deterministic_and_needs_no_key(tiny_config, getkey):
    rates = dict(dropout=0.2, emb_dropout=0.2, layer_dropout=0.2, attn_dropout=0.2)
    model = cait_eqx.CaiT(**tiny_config, **rates, key=getkey())
    x = _image(getkey())
    model = eqx.nn.inference_mode(model)
    # Inference is the model without dropout: the same weights with every rate 0 give the same logits (two
    # compiled programs, so to float32 rounding). A dropout left on would move them by far more.
    plain = cait_eqx.with_dropout(model, dropout=0.0, emb_dropout=0.0, layer_dropout=0.0, attn_dropout=0.0)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(plain(x)), rtol=1e-6, atol=1e-6)
    # A key is accepted and ignored in inference (it would change the logits if it drove any dropout).
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x, key=getkey())))


def test_training_with_dropout_needs_a_key_and_varies_with_it(tiny_config, getkey):
    model = cait_eqx.CaiT(**tiny_config, dropout=0.2, layer_dropout=0.2, key=getkey())
    x = _image(getkey())
    with pytest.raises(RuntimeError, match="needs a key"):
        model(x)
    a = model(x, key=jax.random.key(1))
    b = model(x, key=jax.random.key(2))
    c = model(x, key=jax.random.key(1))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-6
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    # `inference=True` overrides the modules' training flags for one call: the model in inference mode.
    np.testing.assert_allclose(
        np.asarray(model(x, inference=True)), np.asarray(eqx.nn.inference_mode(model)(x)), rtol=1e-6,
        atol=1e-6,
    )
    assert float(jnp.max(jnp.abs(model(x, inference=True) - a))) > 1e-6


def test_no_dropout_means_no_key_needed(tiny_config, getkey):
    model = cait_eqx.CaiT(**tiny_config, key=getkey())
    x = _image(getkey())
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x, key=getkey())))


def test_drop_path_drops_whole_samples_with_rate_p():
    p = 0.3
    drop = cait_eqx.DropPath(p)
    x = jnp.ones((5, 7))
    n = 20000
    out = jax.vmap(lambda k: drop(x, key=k))(jax.random.split(jax.random.key(0), n))
    flat = out.reshape(n, -1)
    dropped = jnp.all(flat == 0, axis=1)
    kept = jnp.all(jnp.isclose(flat, 1 / (1 - p)), axis=1)
    # Whole sample either dropped or kept and rescaled: never a partial mask.
    assert bool(jnp.all(dropped | kept))
    rate = float(jnp.mean(dropped))
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(rate - p) < 5 * sigma
    assert abs(float(jnp.mean(flat)) - 1.0) < 5 * sigma / (1 - p)
    # Off in inference, identity at p = 0.
    np.testing.assert_array_equal(np.asarray(drop(x, inference=True)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(cait_eqx.DropPath(0.0)(x)), np.asarray(x))
    with pytest.raises(RuntimeError, match="needs a `key`"):
        drop(x)


def test_drop_path_uniform_over_sa_blocks_and_absent_from_ca_blocks(tiny_config, getkey):
    rates = dict(dropout=0.3, attn_dropout=0.3, layer_dropout=0.3)
    model = cait_eqx.CaiT(**dict(tiny_config, depth=5), **rates, key=getkey())
    # One stacked SA block: every one of the 5 blocks shares the same rate (no linear decay schedule).
    assert model.blocks.drop_path.p == 0.3
    assert model.blocks.attn.qkv.weight.shape[0] == 5
    # Class-attention blocks: no stochastic depth and no dropout at all.
    ca_random = [
        m
        for m in jax.tree_util.tree_leaves(
            model.blocks_token_only, is_leaf=lambda m: isinstance(m, (eqx.nn.Dropout, cait_eqx.DropPath))
        )
        if isinstance(m, (eqx.nn.Dropout, cait_eqx.DropPath)) and m.p > 0
    ]
    assert ca_random == []
    # Functionally, with only layer_dropout on and one SA block: 2 SA branches can each be kept or dropped,
    # so exactly 4 distinct outputs may occur, with probabilities .49/.21/.21/.09. A drop path in either CA
    # block would multiply the number of outcomes.
    one = cait_eqx.CaiT(**dict(tiny_config, depth=1), layer_dropout=0.3, init_values=1.0, key=getkey())
    x = _image(getkey())
    n = 2000
    outs = np.asarray(jax.vmap(lambda k: one(x, key=k))(jax.random.split(getkey(), n)))
    _, counts = np.unique(outs, axis=0, return_counts=True)
    assert len(counts) == 4
    expected = np.array([0.09, 0.21, 0.21, 0.49]) * n
    np.testing.assert_allclose(np.sort(counts), expected, atol=5 * np.sqrt(0.25 * n))


def test_model_runs_under_strict_dtype_promotion(tiny_config, getkey):
    model = cait_eqx.CaiT(**tiny_config, dropout=0.1, layer_dropout=0.1, key=getkey())
    x = _image(getkey())
    with jax.numpy_dtype_promotion("strict"):  # traced (and so checked) inside the context
        out = eqx.filter_jit(lambda m, x, k: m(x, key=k))(model, x, getkey())
        grads = eqx.filter_jit(eqx.filter_grad(lambda m: m(x, key=jax.random.key(0)).sum()))(model)
    assert out.shape == (10,)
    assert grads.blocks.attn.qkv.weight.shape == model.blocks.attn.qkv.weight.shape


# ------------------------------------------------------------------------------------------ the seed's API


def test_num_classes_zero_gives_features(tiny_config, getkey):
    model = cait_eqx.CaiT(**dict(tiny_config, num_classes=0), key=getkey())
    assert model.head is None
    x = _image(getkey())
    out = model(x)
    assert out.shape == (tiny_config["dim"],)
    features = model.forward_features(x)  # every normalised token, the class token first
    assert features.shape == (1 + model.config.num_patches, tiny_config["dim"])
    # `model(x)` normalises the class token alone, `forward_features` every token: two programs, which agree
    # to float32 rounding (a wrong token or a missing norm would be off by O(1)).
    np.testing.assert_allclose(np.asarray(out), np.asarray(features[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(model.forward_head(features, pre_logits=True)), rtol=1e-6, atol=1e-6
    )


def test_class_attention_maps(tiny_config, getkey):
    model = cait_eqx.CaiT(**dict(tiny_config, image_size=(16, 24)), key=getkey())
    maps = model.class_attention(jax.random.normal(getkey(), (3, 16, 24)))
    assert maps.shape == (2, 4, 1 + 4 * 6)
    np.testing.assert_allclose(np.asarray(maps.sum(-1)), 1.0, rtol=1e-5)
    assert bool(jnp.all(maps >= 0))


def test_plain_class_token_when_cls_depth_is_zero(tiny_config, getkey):
    # cls_depth=0: the class token joins the patches at the SA stage's input (ViT-style) — the output still
    # depends on the image (it would not if the class token were only normalised).
    model = cait_eqx.CaiT(**dict(tiny_config, cls_depth=0), key=getkey())
    assert model.blocks_token_only == ()
    a, b = model(_image(getkey())), model(_image(getkey()))
    assert float(jnp.max(jnp.abs(a - b))) > 0
    with pytest.raises(ValueError, match="no class-attention blocks"):
        model.class_attention(_image(getkey()))


@pytest.mark.slow
def test_readme_example_runs(capsys):
    """The README's first Python block (the seed's example, written the Equinox way) runs as shown."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    # It prints what its comments say it prints: the logits' shape, then the shape and the parameter count.
    promised = re.findall(r"print\(.*\)  # (.+)", block)
    assert promised[-1].endswith(" parameters"), promised
    assert out.splitlines() == promised


# ------------------------------------------------------------------------------------------ training


def test_tiny_training_loop_fits_a_batch_and_compiles_once(tiny_config, getkey):
    model = cait_eqx.CaiT(**dict(tiny_config, layer_dropout=0.1), key=getkey())
    images = jax.vmap(_image)(jax.random.split(getkey(), 8))
    labels = jnp.arange(8) % 10
    optim = optax.adamw(3e-3, weight_decay=0.0)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, opt_state, key):
        def loss_fn(m):
            keys = jax.random.split(key, images.shape[0])
            logits = jax.vmap(lambda x, k: m(x, key=k))(images, keys)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    first = None
    for i in range(150):
        model, opt_state, loss = step(model, opt_state, jax.random.fold_in(getkey(), i))
        first = float(loss) if first is None else first
    final = eqx.nn.inference_mode(model)
    logits = jax.vmap(final)(images)
    eval_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    assert first > 1.5
    assert eval_loss < 0.05
    assert bool(jnp.all(jnp.argmax(logits, -1) == labels))


# ------------------------------------------------------------------------------------------ compile structure


def test_program_size_does_not_grow_with_depth():
    """A 48-block model traces to the same program as a 2-block one (the blocks run under `lax.scan`)."""
    sizes = {}
    for depth in (2, 48):
        config = dict(
            image_size=32, patch_size=16, num_classes=10, dim=64, depth=depth, cls_depth=2, heads=16,
            mlp_dim=128,
        )
        model = eqx.filter_eval_shape(cait_eqx.CaiT, **config, key=jax.random.key(0))
        params, static = eqx.partition(model, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))
        x = jax.ShapeDtypeStruct((3, 32, 32), jnp.float32)

        def forward(p, x, static=static):
            return eqx.combine(p, static)(x)

        sizes[depth] = len(str(jax.make_jaxpr(forward)(params, x)).splitlines())
    # The only difference is the leading depth axis in the scanned shapes, not the number of operations.
    assert sizes[48] == sizes[2]


@pytest.mark.parametrize("heads", [1, 4, 8, 16])
def test_talking_heads_mix_equals_a_product_over_the_head_axis(heads, getkey):
    """`_mix_heads` writes the mix out as scaled sums (up to `UNROLL_HEAD_MIX` heads) or uses a product:
    either way value and gradients are those of `Linear(heads, heads)` over the head axis, to float rounding.
    A mix that used `W` instead of `Wᵀ`, dropped the bias or mixed the wrong axis would be off by O(1)."""
    from cait_eqx._layers import UNROLL_HEAD_MIX, Linear, _mix_heads

    assert (heads > UNROLL_HEAD_MIX) == (heads == 16)  # the last one takes the product path
    mix = Linear(heads, heads, key=getkey())
    mix = eqx.tree_at(lambda m: m.bias, mix, jax.random.normal(getkey(), (heads,)))
    maps = jax.random.normal(getkey(), (heads, 5, 7))

    def reference(mix, maps):
        return jnp.einsum("...h,hqk->qk...", mix.weight, maps).transpose(2, 0, 1) + mix.bias[:, None, None]

    np.testing.assert_allclose(_mix_heads(mix, maps), reference(mix, maps), rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(getkey(), (heads, 5, 7))
    ours = jax.grad(lambda m, a: jnp.vdot(_mix_heads(m, a), cotangent), argnums=(0, 1))(mix, maps)
    theirs = jax.grad(lambda m, a: jnp.vdot(reference(m, a), cotangent), argnums=(0, 1))(mix, maps)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("talking_heads", [True, False])
def test_heads_major_inference_attention_equals_the_token_major_form(talking_heads, getkey):
    """From `HEADS_MAJOR_MIN_TOKENS` tokens on, an inference forward runs the self-attention heads first
    (`TalkingHeadAttention._heads_major`); it must compute what the token-major form computes (the form every
    training step and timm's parity tests use), with and without the talking-heads mixes and biases. A wrong
    weight view (heads and dim_head swapped, q/k/v out of order), a missing bias or scale would be off by
    O(1). The layout must be taken at and above the threshold only, and never in training mode."""
    from cait_eqx import _layers

    tokens = _layers.HEADS_MAJOR_MIN_TOKENS
    attention = _layers.TalkingHeadAttention(48, 4, 12, talking_heads=talking_heads, key=getkey())
    biased = eqx.tree_at(
        lambda a: (a.qkv.bias, a.proj.bias), attention,
        (jax.random.normal(getkey(), (144,)), jax.random.normal(getkey(), (48,))),
    )
    x = jax.random.normal(getkey(), (tokens, 48))
    for module in (attention, biased):
        heads_major = module(x, inference=True)
        token_major = module(x, inference=False)  # no dropout here: the same maths, token-major
        np.testing.assert_allclose(heads_major, token_major, rtol=1e-5, atol=1e-6)

    def program(n, inference):
        return str(jax.make_jaxpr(lambda v: attention(v, inference=inference))(x[:n]))

    assert program(tokens, True) != program(tokens, False)  # the heads-major form was taken
    assert program(tokens - 1, True) == program(tokens - 1, False)  # below the threshold: the one form
    trained_in_inference_mode = eqx.nn.inference_mode(attention)
    assert str(jax.make_jaxpr(lambda v: trained_in_inference_mode(v))(x)) == program(tokens, True)


def test_forward_and_reverse_mode_autodiff_agree(getkey):
    """Forward mode works through the whole model (no custom VJP rule blocks `jax.jvp`, which Hessian-vector
    products need) and gives the same input Jacobian as reverse mode, entry by entry."""
    model = cait_eqx.CaiT(16, 4, 5, 32, 2, 1, 4, 64, channels=1, init_values=0.5, key=getkey())
    x = jax.random.normal(getkey(), (1, 16, 16))
    forward = eqx.filter_jit(lambda m, x: jax.jacfwd(m)(x))(model, x)
    reverse = eqx.filter_jit(lambda m, x: jax.jacrev(m)(x))(model, x)
    assert forward.shape == (5, 1, 16, 16) and float(jnp.abs(reverse).max()) > 0
    np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-5 * float(jnp.abs(reverse).max()))


def test_the_patch_embedding_is_the_convolution_timm_computes(tiny_config):
    """`PatchEmbed.proj` is a linear map over flattened patches (`PatchProjection`), stored in the kernel
    layout of timm's stride-p convolution: running that convolution on the same weights gives the same
    tokens, and the initialisation is the convolution's (Equinox's `Conv2d` draws, bit for bit)."""
    key = jax.random.key(3)
    embed = cait_eqx.PatchEmbed((16, 24), 4, 3, 32, key=key)
    conv = eqx.nn.Conv2d(3, 32, kernel_size=4, stride=4, key=key)
    np.testing.assert_array_equal(embed.proj.weight, conv.weight)
    np.testing.assert_array_equal(embed.proj.bias, conv.bias.reshape(-1))
    assert embed.proj.bias.shape == (32,)
    image = jax.random.normal(jax.random.key(4), (3, 16, 24))
    tokens = conv(image).reshape(32, -1).T  # (dim, rows, cols) -> (rows * cols, dim), row-major patches
    np.testing.assert_allclose(embed(image), tokens, rtol=0, atol=1e-5)
    assert not any(isinstance(m, eqx.nn.Conv2d) for m in jax.tree.leaves(
        cait_eqx.CaiT(**tiny_config, key=key), is_leaf=lambda m: isinstance(m, eqx.nn.Conv2d)))
