"""Real photos into a pretrained CaiT's input, and its logits back out as ImageNet class names.

What would be wrong if these fail: another resize kernel or rounding of the resized size, a crop off by one
pixel, the wrong mean/std or channel order, channels last instead of first, class names in another order
than the 1000 logits, or a top-k that sorts or normalises wrongly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import timm.data
from PIL import Image
from sklearn.datasets import load_sample_images

import cait_eqx


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return list(load_sample_images().images)  # two 427x640 RGB photos shipped with scikit-learn


def test_matches_timm_eval_transform_for_cait_xxs24_224(photos):
    config = timm.data.resolve_data_config({}, model=timm.create_model("cait_xxs24_224", pretrained=False))
    # What the weights were trained with (guards against comparing with another recipe).
    assert config["crop_pct"] == 1.0 and config["interpolation"] == "bicubic"
    assert config["input_size"] == (3, 224, 224)
    assert config["mean"] == cait_eqx.IMAGENET_MEAN and config["std"] == cait_eqx.IMAGENET_STD
    transform = timm.data.create_transform(**config)
    for photo in photos:
        expected = transform(Image.fromarray(photo)).numpy()
        for given in (photo, Image.fromarray(photo)):
            ours = cait_eqx.preprocess(given, 224)
            assert ours.shape == (3, 224, 224) and ours.dtype == jnp.float32
            assert np.max(np.abs(np.asarray(ours) - expected)) <= 1e-4


@pytest.mark.parametrize("size, crop_pct", [((160, 224), 1.0), (96, 0.875), ((64, 48), 0.9)])
def test_matches_timm_for_other_sizes_and_crops(photos, size, crop_pct):
    transform = timm.data.transforms_factory.transforms_imagenet_eval(
        img_size=size, crop_pct=crop_pct, interpolation="bicubic"
    )
    for photo in (photos[0], photos[1].transpose(1, 0, 2)):  # landscape and portrait
        expected = transform(Image.fromarray(np.ascontiguousarray(photo))).numpy()
        ours = np.asarray(cait_eqx.preprocess(photo, size, crop_pct=crop_pct))
        assert ours.shape == expected.shape
        assert np.max(np.abs(ours - expected)) <= 1e-4


def test_other_image_modes_and_bad_inputs(photos):
    photo = Image.fromarray(photos[1])
    for mode in ("L", "RGBA", "P"):
        converted = photo.convert(mode)
        rgb = converted.convert("RGB")
        np.testing.assert_array_equal(np.asarray(cait_eqx.preprocess(converted, 64)),
                                      np.asarray(cait_eqx.preprocess(rgb, 64)))
    grey = np.asarray(photo.convert("L"))
    np.testing.assert_array_equal(np.asarray(cait_eqx.preprocess(grey, 64)),
                                  np.asarray(cait_eqx.preprocess(photo.convert("L"), 64)))
    with pytest.raises(TypeError, match=r"uint8(.|\n)*astype\(np.uint8\)"):
        cait_eqx.preprocess(photos[0] / 255.0)
    with pytest.raises(ValueError, match=r"transpose\(1, 2, 0\)"):
        cait_eqx.preprocess(photos[0].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="crop_pct"):
        cait_eqx.preprocess(photos[0], crop_pct=1.5)


def test_imagenet_class_names_are_timm_s_in_logit_order():
    full = cait_eqx.imagenet_class_names(full=True)
    assert full == timm.data.ImageNetInfo("imagenet-1k").label_descriptions()
    short = cait_eqx.imagenet_class_names()
    assert len(short) == 1000 and short[:2] == ["tench", "goldfish"] and short[999] == "toilet tissue"
    assert all(f.startswith(s) for s, f in zip(short, full, strict=True))


def test_top_k_names_sorts_and_normalises():
    logits = np.full(1000, -2.0, np.float32)
    logits[[1, 207, 980]] = [3.0, 5.0, 4.0]  # goldfish, golden retriever, volcano
    predictions = cait_eqx.top_k(jnp.asarray(logits), 3)
    assert [p.index for p in predictions] == [207, 980, 1]
    assert [p.name for p in predictions] == ["golden retriever", "volcano", "goldfish"]
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([p.probability for p in predictions], softmax[[207, 980, 1]], rtol=1e-6)
    lines = cait_eqx.format_top_k(logits, 2).splitlines()
    assert len(lines) == 2 and "golden retriever (207)" in lines[0] and "volcano (980)" in lines[1]
    few = cait_eqx.top_k(np.array([0.0, 2.0, 1.0], np.float32), 2, class_names=["cat", "dog", "fox"])
    assert [(p.index, p.name) for p in few] == [(1, "dog"), (2, "fox")]
    assert cait_eqx.top_k(np.array([0.0, 2.0], np.float32), 1)[0].name == "class 1"
    with pytest.raises(ValueError, match="between 1 and the number of classes"):
        cait_eqx.top_k(logits, 0)
