"""Checkpoint files in (deit `.pth`, timm `.pth` / `model.safetensors`), weights out to timm, new resolutions
and new heads — against the real timm `Cait` on random weights where every block matters.

What would be wrong if these fail: deit's `"model"` wrapper or `module.` prefixes not handled, a tensor
loaded into the wrong slot, a key silently skipped or invented, an architecture inferred wrongly, a truncated
or foreign file accepted, PyTorch needed for safetensors, a positional grid resampled with another kernel or
in the wrong (row/column) order, or a new head that leaves the config (or the rest of the model) stale; a
named variant whose size or LayerScale value differs from timm's.
"""

from __future__ import annotations

import argparse
import logging
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import timm.models.cait as timm_cait
import torch
from _timm_utils import randomise_, relative_error, small_timm_cait, timm_logits
from timm.models.cait import Cait
from timm.models.vision_transformer import VisionTransformer

import cait_eqx

TOL = 1e-5
# Not a named variant: 4x4 patch grid, 3 SA blocks, 2 CA blocks, 10 classes.
SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, depth_token_only=2,
             mlp_ratio_token_only=1.5, num_classes=10, init_values=0.5)


def _images(shape, n=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _ours(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, jnp.asarray(images)))


def _timm_kwargs(cfg: cait_eqx.CaiTConfig) -> dict:
    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels,
                num_classes=cfg.num_classes, embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                mlp_ratio=cfg.mlp_dim / cfg.dim, qkv_bias=cfg.qkv_bias, depth_token_only=cfg.cls_depth,
                mlp_ratio_token_only=cfg.cls_mlp_dim / cfg.dim)


def _to_timm(model) -> Cait:
    """timm's `Cait` of the same configuration, loaded with our export under `strict=True`."""
    reference = Cait(**_timm_kwargs(model.config)).eval()
    state = {k: torch.from_numpy(v) for k, v in cait_eqx.to_timm_state_dict(model).items()}
    reference.load_state_dict(state, strict=True)
    return reference


def _torch_bicubic(grid: np.ndarray, size) -> np.ndarray:
    """timm's reference for ViT position grids: torch bicubic, antialiased, `align_corners=False`."""
    x = torch.from_numpy(np.array(grid, np.float32)).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", antialias=True,
                                        align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


def _deit_pth(state_dict, path):
    """A file laid out like deit's release checkpoints: {"model": {"module.<timm key>": tensor}}."""
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random small timm CaiT, its files in both layouts, and its logits on two images."""
    directory = tmp_path_factory.mktemp("small")
    reference = small_timm_cait(seed=11, **SMALL)
    state = reference.state_dict()
    images = _images((3, 32, 32), seed=1)
    safetensors.torch.save_file(state, directory / "model.safetensors")
    return dict(
        reference=reference,
        state=state,
        pth=_deit_pth(state, directory / "deit.pth"),
        timm_pth=torch.save(state, directory / "timm.pth") or directory / "timm.pth",
        safetensors=directory / "model.safetensors",
        images=images,
        logits=timm_logits(reference, images),
        dir=directory,
    )


@pytest.fixture(scope="module")
def xxs24(tmp_path_factory):
    """timm's real `cait_xxs24_224` structure with every parameter random, in both file layouts."""
    directory = tmp_path_factory.mktemp("xxs24")
    reference = randomise_(timm.create_model("cait_xxs24_224", pretrained=False), seed=12)
    state = reference.state_dict()
    safetensors.torch.save_file(state, directory / "model.safetensors")
    return dict(reference=reference, state=state, pth=_deit_pth(state, directory / "XXS24_224.pth"),
                safetensors=directory / "model.safetensors")


# ------------------------------------------------------------------------------------------- 1. files in


def test_named_variant_files_load_with_and_without_name_and_match_timm(xxs24, caplog):
    images = _images((3, 224, 224), n=2, seed=3)
    reference_logits = timm_logits(xxs24["reference"], images)
    expected_config = cait_eqx.create_model("cait_xxs24_224", key=jax.random.key(0)).config
    for path in (xxs24["pth"], xxs24["safetensors"]):
        for name in ("cait_xxs24_224", None):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="cait_eqx"):
                model = cait_eqx.load_timm(path, name=name)
            # Without a name the architecture is inferred, and the user is told which variant it matched.
            said = [r.getMessage() for r in caplog.records if r.name == "cait_eqx"]
            if name is None:
                assert len(said) == 1 and "cait_xxs24_224" in said[0] and "no `name`" in said[0], said
            else:
                assert not said, said
            assert model.config == expected_config
            ours = _ours(model, images)
            assert relative_error(ours, reference_logits) <= TOL, (path.name, name)
    # The random weights make the whole network matter: different images, clearly different logits.
    assert relative_error(ours[0], ours[1]) > 1e-2


def test_small_files_in_every_layout_match_timm(small, caplog):
    for key in ("pth", "timm_pth", "safetensors"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cait_eqx"):
            model = cait_eqx.load_timm(small[key])
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "no named variant" in said and "depth=3" in said and "heads=4" in said, said
        assert model.config.depth == 3 and model.config.cls_depth == 2 and model.config.num_classes == 10
        assert model.config.mlp_dim == 96 and model.config.cls_mlp_dim == 72
        assert relative_error(_ours(model, small["images"]), small["logits"]) <= TOL, key
    # Loaded for inference: no dropout key needed, and every dropout is off.
    assert all(m.inference for m in jax.tree_util.tree_leaves(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.Dropout)) if isinstance(m, eqx.nn.Dropout))


def test_safetensors_load_without_torch_and_pth_says_what_is_missing(small, monkeypatch):
    expected = cait_eqx.to_timm_state_dict(cait_eqx.load_timm(small["safetensors"]))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as without PyTorch
    model = cait_eqx.load_timm(small["safetensors"])
    for key, value in cait_eqx.to_timm_state_dict(model).items():
        np.testing.assert_array_equal(value, expected[key])
    with pytest.raises(ImportError, match=r"needs PyTorch.*safetensors"):
        cait_eqx.load_timm(small["pth"])


def test_create_model_with_a_local_weights_file(xxs24, getkey):
    model = cait_eqx.create_model("cait_xxs24_224", weights=xxs24["pth"])
    np.testing.assert_array_equal(np.asarray(model.pos_embed), xxs24["state"]["pos_embed"][0].numpy())
    tuned = cait_eqx.create_model("cait_xxs24_224", weights=xxs24["safetensors"], num_classes=10,
                                  key=getkey())
    assert tuned.head.weight.shape == (10, 192) and tuned.config.num_classes == 10
    np.testing.assert_array_equal(np.asarray(tuned.blocks.attn.proj_l.weight),
                                  np.asarray(model.blocks.attn.proj_l.weight))
    with pytest.raises(ValueError, match="needs a key"):
        cait_eqx.create_model("cait_xxs24_224", weights=xxs24["pth"], num_classes=10)
    with pytest.raises(ValueError, match="needs a key"):
        cait_eqx.create_model("cait_xxs24_224")


# ------------------------------------------------------------------------------------------ 2. export


def test_export_loads_strictly_into_timm_and_gives_the_same_logits(getkey):
    model = cait_eqx.CaiT((32, 48), 8, 6, 64, 2, 2, 4, 128, init_values=0.5, cls_mlp_dim=96, key=getkey())
    # Move every array off its initial value (biases start at zero, norms at one) so each one matters.
    rng = np.random.default_rng(8)
    model = eqx.nn.inference_mode(jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) + 0.2 * rng.normal(size=x.shape).astype(np.float32))
        if eqx.is_array(x) else x, model))
    images = _images((3, 32, 48), seed=4)
    reference = _to_timm(model)  # strict=True inside
    assert relative_error(_ours(model, images), timm_logits(reference, images)) <= TOL


# ------------------------------------------------------------------------------------------ 3. bad files


def _expect(path, match, **kwargs):
    with pytest.raises(cait_eqx.WeightsError, match=match):
        cait_eqx.load_timm(path, **kwargs)


def test_truncated_empty_and_foreign_files_are_named_errors(small, tmp_path):
    for key in ("pth", "safetensors"):
        data = small[key].read_bytes()
        cut = tmp_path / f"cut_{small[key].name}"
        cut.write_bytes(data[: len(data) // 2])
        _expect(cut, r"truncated or corrupt")
    (tmp_path / "empty.pth").write_bytes(b"")
    _expect(tmp_path / "empty.pth", r"empty \(0 bytes\)")
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    _expect(tmp_path / "notes.pth", r"neither a safetensors file nor a PyTorch checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    _expect(tmp_path / "tensor.pth", r"does not hold a state dict")
    # A training checkpoint with pickled Python objects: refused by weights_only=True, with the reason.
    torch.save({"model": small["state"], "args": argparse.Namespace(lr=1e-3)}, tmp_path / "train.pth")
    _expect(tmp_path / "train.pth", r"weights_only=True")
    with pytest.raises(FileNotFoundError, match="No weights file"):
        cait_eqx.load_timm(tmp_path / "absent.safetensors")


def test_a_vit_checkpoint_is_not_taken_for_a_cait(tmp_path):
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=10)
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    _expect(tmp_path / "vit.safetensors", r"does not look like a CaiT.*blocks\.0\.gamma_1")
    # Checked against a variant, its ViT blocks lack CaiT's LayerScale and class-attention blocks.
    _expect(tmp_path / "vit.safetensors", r"444 missing key\(s\)(.|\n)*mis-shaped key\(s\): cls_token",
            name="cait_xxs24_224")


def test_missing_and_extra_keys_are_listed_not_skipped(small, tmp_path):
    missing = {k: v for k, v in small["state"].items() if k != "blocks.1.gamma_2"}
    safetensors.torch.save_file(missing, tmp_path / "missing.safetensors")
    _expect(tmp_path / "missing.safetensors", r"1 missing key\(s\): blocks\.1\.gamma_2\n")
    extra = {**small["state"], "blocks.0.attn.extra_scale": torch.ones(4)}
    torch.save(extra, tmp_path / "extra.pth")
    _expect(tmp_path / "extra.pth", r"1 unexpected key\(s\): blocks\.0\.attn\.extra_scale")
    # A wrong number of classes is a mis-shaped head, with the way to a new head in the message.
    _expect(small["safetensors"], r"head\.weight: expected \(7, 48\), got \(10, 48\)(.|\n)*reset_classifier",
            num_classes=7)


def test_a_file_of_another_variant_is_refused(small, xxs24):
    _expect(xxs24["safetensors"], r"mis-shaped key\(s\): .*expected \(1, 1, 384\), got \(1, 1, 192\)",
            name="cait_s24_224")
    _expect(xxs24["pth"], r"mis-shaped key\(s\): pos_embed: expected \(1, 576, 192\), got \(1, 196, 192\)",
            name="cait_xxs24_384")
    _expect(small["pth"], r"missing key\(s\): blocks\.3\.(.|\n)*mis-shaped", name="cait_xxs24_224")


# ------------------------------------------------------------------------------- 5. new resolutions, heads


def test_a_224_checkpoint_loads_into_a_384_model(xxs24):
    model = cait_eqx.load_timm(xxs24["pth"], name="cait_xxs24_224", image_size=384)
    assert model.config == cait_eqx.load_timm(xxs24["safetensors"], image_size=384).config
    expected = cait_eqx.variant_config("cait_xxs24_384")
    assert model.config.image_size == (384, 384) and model.config.depth == expected["depth"]
    grid = xxs24["state"]["pos_embed"][0].numpy().reshape(14, 14, 192)
    independent = _torch_bicubic(grid, (24, 24)).reshape(576, 192)
    np.testing.assert_allclose(np.asarray(model.pos_embed), independent, atol=1e-5, rtol=0)
    # What timm does for ViTs, applied to the same grid.
    timm_way = timm.layers.resample_abs_pos_embed(xxs24["state"]["pos_embed"], [24, 24], num_prefix_tokens=0)
    np.testing.assert_allclose(np.asarray(model.pos_embed), timm_way[0].numpy(), atol=1e-5, rtol=0)
    # Everything else is carried over unchanged.
    exported = cait_eqx.to_timm_state_dict(model)
    for key, value in xxs24["state"].items():
        if key != "pos_embed":
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_non_square_resampling_is_exact_and_the_model_is_timm_s_function(small):
    model = cait_eqx.load_timm(small["safetensors"], image_size=(24, 48))  # 4x4 grid -> 3x6
    grid = small["state"]["pos_embed"][0].numpy().reshape(4, 4, 48)
    np.testing.assert_allclose(np.asarray(model.pos_embed), _torch_bicubic(grid, (3, 6)).reshape(18, 48),
                               atol=1e-5, rtol=0)
    images = _images((3, 24, 48), seed=6)
    assert relative_error(_ours(model, images), timm_logits(_to_timm(model), images)) <= TOL
    # And back from a non-square grid, on a model in memory: rows and columns are not mixed up.
    wide = cait_eqx.set_input_size(model, (40, 16))  # 3x6 -> 5x2
    np.testing.assert_allclose(
        np.asarray(wide.pos_embed),
        _torch_bicubic(np.asarray(model.pos_embed).reshape(3, 6, 48), (5, 2)).reshape(10, 48),
        atol=1e-5, rtol=0,
    )
    assert wide.config.image_size == (40, 16) and wide.pos_drop.inference
    assert cait_eqx.set_input_size(eqx.nn.inference_mode(model, False), 32).pos_drop.inference is False


def test_resampling_needs_a_known_source_grid(tmp_path):
    reference = small_timm_cait(seed=13, **{**SMALL, "img_size": (32, 48)})  # 4x6: not square
    safetensors.torch.save_file(reference.state_dict(), tmp_path / "wide.safetensors")
    _expect(tmp_path / "wide.safetensors", r"24 patches, which is not a square grid(.|\n)*set_input_size",
            image_size=64)
    with pytest.raises(ValueError, match=r"holds 16"):
        cait_eqx.resample_pos_embed(jnp.zeros((24, 8)), (4, 4), (6, 6))


def test_reset_classifier_gives_a_fresh_head_and_keeps_the_rest(small, getkey):
    model = cait_eqx.load_timm(small["safetensors"])
    training = eqx.nn.inference_mode(model, False)
    new = cait_eqx.reset_classifier(training, 3, key=getkey())
    assert new.config.num_classes == 3 and new.head.weight.shape == (3, 48)
    assert float(jnp.std(new.head.weight)) < 0.03 and not np.any(np.asarray(new.head.bias))
    assert new.pos_drop.inference is False  # the mode is kept
    assert new.config == cait_eqx.CaiTConfig(**{**model.config.kwargs(), "num_classes": 3})
    old_sd, new_sd = cait_eqx.to_timm_state_dict(model), cait_eqx.to_timm_state_dict(new)
    assert set(old_sd) == set(new_sd)
    for key in old_sd:
        if not key.startswith("head."):
            np.testing.assert_array_equal(old_sd[key], new_sd[key], err_msg=key)
    # Exported with the new head, timm loads it strictly and agrees.
    images = _images((3, 32, 32), seed=7)
    inference = eqx.nn.inference_mode(new)
    assert relative_error(_ours(inference, images), timm_logits(_to_timm(inference), images)) <= TOL
    # No head: the model returns its features.
    headless = cait_eqx.reset_classifier(model, 0)
    assert headless.head is None and headless.config.num_classes == 0
    x = jnp.asarray(images[0])
    np.testing.assert_allclose(  # two programs: float32 rounding
        np.asarray(headless(x)), np.asarray(model.forward_features(x)[0]), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="needs a key"):
        cait_eqx.reset_classifier(model, 5)


# ------------------------------------------------------------------------------------ 6. the named variants


def test_variants_match_timm_parameter_counts():
    for name in cait_eqx.list_models():
        shapes = eqx.filter_eval_shape(cait_eqx.create_model, name, key=jax.random.key(0))
        ours = sum(
            int(np.prod(leaf.shape))
            for leaf in jax.tree_util.tree_leaves(shapes)
            if isinstance(leaf, jax.ShapeDtypeStruct)
        )
        with torch.device("meta"):
            reference = timm.create_model(name, pretrained=False)
        theirs = sum(p.numel() for p in reference.parameters())
        assert ours == theirs, name
        assert tuple(shapes.config.image_size) == tuple(reference.patch_embed.img_size), name
    assert cait_eqx.create_model("cait_xxs24_224", key=jax.random.key(0)).num_params == 11_956_264


class _Captured(Exception):
    pass


def test_variants_use_timms_layerscale_values(monkeypatch):
    captured = {}

    def capture(variant, pretrained=False, **kwargs):
        captured[variant] = kwargs
        raise _Captured  # we only want timm's factory arguments, not a model

    monkeypatch.setattr(timm_cait, "_create_cait", capture)
    for name in cait_eqx.list_models():
        with pytest.raises(_Captured):
            getattr(timm_cait, name)()
    for name in cait_eqx.list_models():
        ours, theirs = cait_eqx.variant_config(name), captured[name]
        assert ours["init_values"] == theirs["init_values"], name
        assert (ours["dim"], ours["depth"], ours["heads"], ours["patch_size"]) == (
            theirs["embed_dim"],
            theirs["depth"],
            theirs["num_heads"],
            theirs["patch_size"],
        ), name
