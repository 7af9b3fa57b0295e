"""DeiT's (timm's) train and evaluation transforms: the worker-side NumPy/PIL ones and random erasing in JAX.

What would be wrong if these fail: a crop box drawn from another distribution than torchvision's (area not
uniform, ratio not log-uniform, a wrong fallback), a resize with another filter or size order, a flip on the
wrong axis, an evaluation resize that rounds differently from timm's, a RandAugment operation whose level
maps to another argument (or sign, fill colour, filter) than timm's, another operation list for `inc0` /
`inc1`, magnitudes drawn or clipped differently, random erasing with other box statistics or fill semantics
than timm's, randomness that does not come from the generator/key passed (irreproducible, or identical
across examples), or bad input accepted silently.
"""

from __future__ import annotations

import pickle
import random

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

import cait_eqx
from cait_eqx import data
from cait_eqx.data import (
    AugmentOp,
    EvalTransform,
    RandAugment,
    TrainTransform,
    _rand_augment,
    erase_box,
    eval_resize_crop,
    hflip,
    random_erasing,
    resized_crop,
    rrc_params,
    vflip,
)

# ------------------------------------------------------------------------------------------ real images


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real RGB photo (scikit-learn's), cropped to 160x224 (channels first) to keep the tests quick."""
    china = load_sample_images().images[0]
    return np.ascontiguousarray(china[120:280, 200:424].transpose(2, 0, 1))


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A real handwritten digit (scikit-learn's 8x8), as uint8 0-255, upsampled 4x to (1, 32, 32)."""
    pixels = np.round(load_digits().images[7] * (255 / 16)).astype(np.uint8)
    return np.kron(pixels, np.ones((4, 4), np.uint8))[None]


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def _chw(picture) -> np.ndarray:
    pixels = np.asarray(picture)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _ks(a, b) -> float:
    """The two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.union1d(a, b)
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a)
                               - np.searchsorted(b, grid, "right") / len(b))))


class _Coin:
    """Stands in for timm's module-level `random` where only `random()` may be called: a fixed value."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


# --------------------------------------------------------------------------------------- crops and flips


@pytest.mark.torch
def test_rrc_params_draw_boxes_as_timm_and_fall_back_as_torchvision(monkeypatch):
    import timm.data.transforms as timm_transforms
    import torch
    from torchvision import transforms as tv

    get_params = timm_transforms.RandomResizedCropAndInterpolation.get_params
    # timm draws with Python's `random`: give its module a seeded generator of its own (no global state).
    monkeypatch.setattr(timm_transforms, "random", random.Random(0))
    height, width, scale, ratio = 60, 90, (0.08, 1.0), (3 / 4, 4 / 3)
    blank = Image.new("L", (width, height))
    theirs = np.array([get_params(blank, scale, ratio) for _ in range(3000)])
    rng = np.random.default_rng(0)
    ours = np.array([rrc_params(rng, height, width, scale, ratio) for _ in range(3000)])
    top, left, h, w = ours.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h >= 1) & (w >= 1))
    # The same distribution of box sizes and places (a KS gap over 0.05 rejects it at p < 0.001 here).
    for column, name in enumerate(["top", "left", "height", "width"]):
        assert _ks(ours[:, column], theirs[:, column]) < 0.05, name
    # Drawn boxes: area fraction in scale, aspect in ratio, up to the rounding of the sides.
    drawn = (h * w) / (height * width)
    assert drawn.min() > 0.08 * 0.8 and drawn.max() <= 1.0
    assert np.all(np.abs(np.log(w / h)) <= np.log(4 / 3) + np.log1p(1 / np.minimum(h, w)))
    # No box fits: the centred crop with the ratio clamped, as torchvision's and timm's.
    for size in [(10, 100), (100, 10)]:
        blank = Image.new("L", size[::-1])
        expected = get_params(blank, (0.9, 1.0), ratio)
        assert rrc_params(rng, *size, (0.9, 1.0), ratio) == expected
        with torch.random.fork_rng():  # torchvision's attempts draw from torch's global generator
            assert tuple(tv.RandomResizedCrop.get_params(blank, [0.9, 1.0], [3 / 4, 4 / 3])) == expected
    assert rrc_params(rng, 10, 100, (0.9, 1.0), ratio) == (0, 43, 10, 13)
    assert rrc_params(rng, 10, 12, (1.0, 1.0), (1.2, 1.2)) == (0, 0, 10, 12)  # exact fit: the whole image


@pytest.mark.torch
def test_resized_crop_equals_torchvision_on_pil_images(photo, digit):
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
             "nearest": InterpolationMode.NEAREST}
    cases = [(photo, (13, 40, 101, 77), (48, 64)), (photo, (0, 0, 160, 224), 96),
             (digit, (3, 5, 20, 17), (40, 24)), (photo, (20, 30, 48, 64), (48, 64))]  # the last: no resize
    for image, box, size in cases:
        for name, mode in modes.items():
            ours = resized_crop(image, *box, size, name)
            out_size = [size, size] if isinstance(size, int) else list(size)
            expected = _chw(F.resized_crop(_pil(image), *box, out_size, mode))
            assert ours.dtype == np.uint8 and ours.flags.c_contiguous
            np.testing.assert_array_equal(ours, expected, err_msg=f"{box} {name}")
    # Any number of channels: each channel resized as a greyscale image (what PIL does per band of RGB).
    five = np.concatenate([photo, photo[:2]])
    ours = resized_crop(five, 13, 40, 101, 77, (48, 64))
    np.testing.assert_array_equal(ours[:3], resized_crop(photo, 13, 40, 101, 77, (48, 64)))
    np.testing.assert_array_equal(ours[3:], ours[:2])
    with pytest.raises(ValueError, match=r"not inside the 160x224 image"):
        resized_crop(photo, 100, 0, 61, 10, 32)
    with pytest.raises(ValueError, match=r"`interpolation` must be one of"):
        resized_crop(photo, 0, 0, 10, 10, 32, "lanczos")


@pytest.mark.torch
def test_flips_are_pil_s(photo, digit):
    import torchvision.transforms.functional as F

    for image in (photo, digit, np.concatenate([photo, photo[:2]])):
        if image.shape[0] in (1, 3):
            np.testing.assert_array_equal(hflip(image), _chw(F.hflip(_pil(image))))
            np.testing.assert_array_equal(vflip(image), _chw(F.vflip(_pil(image))))
        np.testing.assert_array_equal(hflip(hflip(image)), image)
        assert not np.array_equal(hflip(image), image) and not np.array_equal(vflip(image), image)


# ------------------------------------------------------------------------------------------------- eval


@pytest.mark.torch
@pytest.mark.parametrize(
    "size, crop_pct, interpolation",
    [(224, 0.875, "bicubic"), (96, 1.0, "bilinear"), ((64, 48), 0.9, "bicubic"), ((40, 72), 0.875, "nearest"),
     (200, 0.875, "bicubic")],
)
def test_eval_resize_crop_equals_timm_eval_transform(photo, digit, size, crop_pct, interpolation):
    from timm.data import create_transform

    # use_prefetcher: timm's transform ends with the uint8 tensor (its normalisation runs on the device).
    transform = create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                 use_prefetcher=True)
    for image in (photo, photo.transpose(0, 2, 1).copy(), digit):  # landscape, portrait, greyscale
        expected = transform(_pil(image)).numpy()
        ours = eval_resize_crop(image, size, crop_pct, interpolation)
        np.testing.assert_array_equal(ours, expected)
        np.testing.assert_array_equal(EvalTransform(size, crop_pct, interpolation)(image), expected)


def test_eval_resize_crop_agrees_with_preprocess(photo):
    # `cait_eqx.preprocess` is the same resize and crop for one photo, then normalised (in JAX).
    for size, crop_pct in [(224, 1.0), ((64, 48), 0.9)]:
        pixels = eval_resize_crop(photo, size, crop_pct).astype(np.float32) / np.float32(255)
        mean = np.asarray(cait_eqx.IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
        std = np.asarray(cait_eqx.IMAGENET_STD, np.float32).reshape(3, 1, 1)
        expected = np.asarray(cait_eqx.preprocess(photo.transpose(1, 2, 0), size, crop_pct=crop_pct))
        np.testing.assert_allclose((pixels - mean) / std, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- RandAugment

_ALL_OPS = list(_rand_augment._KINDS)


def _timm_hparams(fill):
    # What timm's transform factory passes at 224 with interpolation='bicubic' (DeiT's), fill aside.
    return dict(translate_const=100, img_mean=fill, interpolation=Image.Resampling.BICUBIC)


@pytest.mark.torch
@pytest.mark.parametrize("name", _ALL_OPS)
def test_each_op_at_fixed_levels_equals_timm(name, photo, digit, monkeypatch):
    from timm.data import auto_augment

    assert set(_ALL_OPS) <= set(auto_augment.NAME_TO_OP)
    # Greyscale: timm passes its RGB fill to an "L" image, which PIL refuses; ours uses that colour's grey
    # (117 for ImageNet's mean), so timm gets 117 directly.
    for image, fill in ((photo, (124, 116, 104)), (digit, 117)):
        for level in (0, 2.7, 5, 9, 10):
            for negate in (False, True):
                monkeypatch.setattr(auto_augment, "random", _Coin(0.9 if negate else 0.1))
                hparams = _timm_hparams(fill)
                reference = auto_augment.AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)
                op = AugmentOp(name, level, probability=1.0)
                if name.startswith("Posterize") and op.argument(level) == 0:
                    # Keeping 0 bits: Pillow >= 13 refuses (timm's op raises); older PIL gave black, as ours.
                    with pytest.raises(ValueError, match="bits must be between"):
                        reference(_pil(image))
                    expected = np.zeros_like(image)
                else:
                    expected = _chw(reference(_pil(image)))
                assert op.fill == (124, 116, 104) and op.translate_const == 100
                if reference.level_fn is not None:
                    assert op.argument(level, negate) == reference.level_fn(level, reference.hparams)[0]
                ours = op.apply(image, level, negate)
                assert ours.dtype == np.uint8 and ours.shape == image.shape
                np.testing.assert_array_equal(ours, expected, err_msg=f"{name} level {level} negate {negate}")
    if AugmentOp(name).geometric:
        # Another filter reaches PIL too.
        monkeypatch.setattr(auto_augment, "random", _Coin(0.1))
        hparams = dict(_timm_hparams((124, 116, 104)), interpolation=Image.Resampling.BILINEAR)
        expected = _chw(auto_augment.AugmentOp(name, prob=1.0, magnitude=7, hparams=hparams)(_pil(photo)))
        ours = AugmentOp(name, 7, interpolation="bilinear").apply(photo, 7)
        np.testing.assert_array_equal(ours, expected)
        # Any number of channels: each channel on its own, with its own fill value.
        five = np.concatenate([photo, photo[:2]])
        fill = (124, 116, 104, 9, 200)
        ours = AugmentOp(name, 7, fill=fill).apply(five, 7)
        np.testing.assert_array_equal(ours[:3], AugmentOp(name, 7).apply(photo, 7))
        for c in (3, 4):
            single = AugmentOp(name, 7, fill=(fill[c],)).apply(five[c - 3 : c - 2], 7)
            np.testing.assert_array_equal(ours[c : c + 1], single)
    else:
        with pytest.raises(ValueError, match=rf"`{name}` is a colour operation .* got 2"):
            AugmentOp(name, 5).apply(photo[:2], 5)


@pytest.mark.torch
@pytest.mark.parametrize(
    "config", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd0-inc0", "rand-m12-mmax15-p0.7-inc1", "rand",
               "rand-n1-mstd101", "rand-m5-mmax0"]
)
def test_rand_augment_ops_match_timm_s(config):
    from timm.data import auto_augment
    from timm.data.transforms_factory import transforms_imagenet_train

    for size in (224, (96, 160)):
        transform = transforms_imagenet_train(size, auto_augment=config, interpolation="bicubic")
        (reference,) = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)]
        ours = RandAugment.from_config(config, size)
        assert ours.num_layers == reference.num_layers
        assert [op.name for op in ours.ops] == [op.name for op in reference.ops]
        for mine, theirs in zip(ours.ops, reference.ops, strict=True):
            assert mine.magnitude == theirs.magnitude and mine.probability == theirs.prob
            assert mine.magnitude_std == theirs.magnitude_std
            assert mine.magnitude_max == (theirs.magnitude_max or 10)
            hparams = theirs.hparams
            assert mine.fill == hparams["img_mean"] == (124, 116, 104)
            assert mine.translate_const == hparams["translate_const"]
            assert hparams["interpolation"] == Image.Resampling.BICUBIC and mine.interpolation == "bicubic"
            assert mine.translate_pct == hparams.get("translate_pct", 0.45)
    # The two lists are timm's.
    assert data.RAND_AUGMENT_OPS["increasing"] == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)
    assert data.RAND_AUGMENT_OPS["default"] == tuple(auto_augment._RAND_TRANSFORMS)


def test_rand_augment_draws_ops_magnitudes_and_signs_as_specified():
    augment = RandAugment.from_config("rand-m9-mstd0.5-inc1", 224)
    rng = np.random.default_rng(0)
    draws = 4000
    plans = [augment.draw(rng) for _ in range(draws)]
    applied = [step for plan in plans for step in plan]
    # Each of the 2 layers is applied with probability 0.5: 4000 expected, sd ~45.
    assert abs(len(applied) - draws) < 200
    # Uniform choice among the 15 operations: ~267 each, sd ~16.
    counts = {op.name: 0 for op in augment.ops}
    for op, _, _ in applied:
        counts[op.name] += 1
    assert all(abs(c - len(applied) / 15) < 80 for c in counts.values()), counts
    # Magnitude ~ N(9, 0.5) clipped to [0, 10].
    magnitudes = np.array([m for _, m, _ in applied])
    assert magnitudes.min() >= 0 and magnitudes.max() <= 10 and np.sum(magnitudes == 10) > 0
    assert abs(magnitudes.mean() - 8.99) < 0.03 and 0.45 < magnitudes.std() < 0.52
    # Signs: signed operations negate half the time, the others never.
    signed = [negate for op, _, negate in applied if op.name in ("Rotate", "ShearX", "ColorIncreasing")]
    assert abs(np.mean(signed) - 0.5) < 0.06
    assert not any(negate for op, _, negate in applied if op.name in ("Posterize", "SolarizeAdd", "Invert"))
    # mstd0: the magnitude is fixed; mstd above 100: uniform in [0, m]; p1: every layer applied.
    fixed = RandAugment.from_config("rand-m7-mstd0-p1.0", 224)
    assert all(len(p) == 2 and all(m == 7 for _, m, _ in p) for p in (fixed.draw(rng) for _ in range(50)))
    uniform = RandAugment.from_config("rand-m8-mstd101-p1", 224)
    values = np.array([m for _ in range(1000) for _, m, _ in uniform.draw(rng)])
    assert abs(values.mean() - 4) < 0.15 and values.min() < 0.1 and values.max() > 7.9


def test_rand_augment_call_is_its_draw_applied_and_checks_channels(photo, digit):
    augment = RandAugment.from_config("rand-m9-mstd0.5-inc1", 224)
    for seed in range(12):
        for image in (photo, digit):
            out = augment(image, np.random.default_rng(seed))
            # One PIL conversion for the whole chain gives what the operations give one by one.
            expected = image
            for op, magnitude, negate in augment.draw(np.random.default_rng(seed)):
                expected = op.apply(expected, magnitude, negate)
            np.testing.assert_array_equal(out, expected)
            assert out.dtype == np.uint8 and out.shape == image.shape
            np.testing.assert_array_equal(out, augment(image, np.random.default_rng(seed)))
    outputs = {augment(photo, np.random.default_rng(seed)).tobytes() for seed in range(12)}
    assert len(outputs) > 8  # different draws, different images
    with pytest.raises(ValueError, match=r"colour operations .* take 1 or 3 channels .* got 2"):
        augment(photo[:2], np.random.default_rng(0))
    geometric = RandAugment(tuple(AugmentOp(n, 9, fill=(0,)) for n in ("Rotate", "ShearX")), 2)
    assert geometric(photo[:2], np.random.default_rng(1)).shape == (2, 160, 224)


def test_rand_augment_config_errors():
    for config, message in [
        ("rand-m9-x3", r"Unknown RandAugment config section 'x3'"),
        ("rand-m9-w0", r"Unknown RandAugment config section 'w0'"),
        ("rand-tweights", r"Unknown RandAugment config section 'tweights'"),
        ("augmix-m5", r"starts with 'rand'"),
        ("rand-m9.5", r"section 'm9.5' needs an int after its name, got '9.5'"),
        ("rand-mstd", r"section 'mstd' needs a number after its name, got ''"),
    ]:
        with pytest.raises(ValueError, match=message):
            RandAugment.from_config(config, 224)
    with pytest.raises(ValueError, match=r"Unknown augmentation 'Cutout'"):
        AugmentOp("Cutout")
    with pytest.raises(ValueError, match=r"`probability` must be a probability in \[0, 1\]"):
        AugmentOp("Rotate", probability=1.5)


# ------------------------------------------------------------------------------------ the whole transform


def test_train_transform_is_reproducible_picklable_and_composed_in_order(photo, digit):
    transform = TrainTransform(64, rand_augment="rand-m9-mstd0.5-inc1")
    assert transform.image_size == (64, 64)
    for image in (photo, digit):
        first = [transform(image, np.random.default_rng([5, i])) for i in range(6)]
        again = [transform(image, np.random.default_rng([5, i])) for i in range(6)]
        other = [transform(image, np.random.default_rng([6, i])) for i in range(6)]
        assert all(a.shape == (image.shape[0], 64, 64) and a.dtype == np.uint8 for a in first)
        assert [a.tobytes() for a in first] == [a.tobytes() for a in again]
        assert all(a.tobytes() != b.tobytes() for a, b in zip(first, other, strict=True))
        assert len({a.tobytes() for a in first}) == 6
    # What a data worker gets: a pickled copy that transforms alike.
    copy = pickle.loads(pickle.dumps(transform))
    assert copy == transform
    np.testing.assert_array_equal(copy(photo, np.random.default_rng(3)),
                                  transform(photo, np.random.default_rng(3)))
    # The order: crop (here the whole image), then the flips.
    whole = dict(scale=(1.0, 1.0), ratio=(224 / 160, 224 / 160))
    resized = resized_crop(photo, 0, 0, 160, 224, (40, 56))
    flipped = TrainTransform((40, 56), hflip=1.0, vflip=1, **whole)(photo, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, vflip(hflip(resized)))
    plain = TrainTransform((40, 56), hflip=0, **whole)(photo, np.random.default_rng(0))
    np.testing.assert_array_equal(plain, resized)
    # Without RandAugment any number of channels goes through.
    assert TrainTransform(16)(np.zeros((5, 20, 30), np.uint8), np.random.default_rng(0)).shape == (5, 16, 16)


def test_transforms_reject_bad_arguments_and_images(photo):
    for kwargs, message in [
        (dict(scale=(0.5, 0.1)), r"`scale` must be a pair \(low, high\) with 0 < low <= high <= 1.0"),
        (dict(scale=(0.08, 1.5)), r"`scale` must be a pair"),
        (dict(ratio=(0, 1)), r"`ratio` must be a pair \(low, high\) with 0 < low <= high"),
        (dict(hflip=1.5), r"`hflip` must be a probability in \[0, 1\]"),
        (dict(interpolation="lanczos"), r"`interpolation` must be one of \('bicubic', 'bilinear', 'near"),
        (dict(rand_augment="rand-q3"), r"Unknown RandAugment config section 'q3'"),
        (dict(mean=(0.5, 0.5)), r"`mean` must be 1 or 3 per-channel means in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainTransform(32, **kwargs)
    with pytest.raises(ValueError, match=r"`image_size` sides must be positive ints"):
        TrainTransform(0)
    with pytest.raises(ValueError, match=r"`crop_pct` must be in \(0, 1\]"):
        EvalTransform(32, crop_pct=1.2)
    transform, rng = TrainTransform(32), np.random.default_rng(0)
    for image, error, message in [
        (photo.astype(np.float32) / 255, TypeError, r"uint8 images .* got dtype float32.*astype\(np.uint8\)"),
        (photo[0], ValueError, r"shape \(160, 224\)\. For one greyscale .* `image\[None\]`"),
        (photo.transpose(1, 2, 0), ValueError, r"looks channels last\. Use `image.transpose\(2, 0, 1\)`"),
        (photo[None], ValueError, r"one image of shape \(channels, height, width\)"),
    ]:
        with pytest.raises(error, match=message):
            transform(image, rng)
    # Not an array, not a generator (nothing is drawn from a global state): a TypeError naming the argument
    # (jaxtyping's when checks are on, ours otherwise).
    with pytest.raises(TypeError, match="image"):
        transform(Image.fromarray(photo.transpose(1, 2, 0)), rng)
    with pytest.raises(TypeError, match="rng"):
        transform(photo, 0)


# ----------------------------------------------------------------------------------- random erasing (JAX)


def _boxes(erased: np.ndarray) -> np.ndarray:
    """`(height, width)` of the erased (zero) region of each of a batch of all-ones images, checking it is
    one rectangle; (0, 0) where nothing was erased."""
    mask = erased[:, 0] == 0
    rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)
    assert np.array_equal(mask.sum((1, 2)), rows * cols), "an erased region is not one box"
    return np.stack([rows, cols], 1)


@pytest.mark.torch
def test_random_erasing_boxes_are_distributed_as_timm_s(monkeypatch):
    import timm.data.random_erasing as timm_erasing
    import torch

    monkeypatch.setattr(timm_erasing, "random", random.Random(0))
    n, shape = 3000, (1, 24, 32)

    def timm_masks(count, probability):
        reference = timm_erasing.RandomErasing(probability, mode="const", max_count=count, device="cpu")
        return np.stack([reference(torch.ones(shape)).numpy() for _ in range(n)])

    def our_masks(count, probability, seed):
        keys = jr.split(jr.key(seed), n)
        erase = jax.jit(jax.vmap(lambda k: random_erasing(
            jnp.ones(shape), key=k, probability=probability, mode="const", count=count)))
        return np.asarray(erase(keys))

    theirs, ours = _boxes(timm_masks(1, 1.0)), _boxes(our_masks(1, 1.0, 0))
    assert np.all((ours[:, 0] < 24) & (ours[:, 1] < 32) & (ours[:, 0] > 0))  # strictly inside, as timm's
    assert _ks(ours[:, 0], theirs[:, 0]) < 0.05 and _ks(ours[:, 1], theirs[:, 1]) < 0.05
    area = ours.prod(1) / (24 * 32)
    assert 0.02 * 0.5 < area.min() and area.max() < 1 / 3 * 1.5  # the bounds, up to rounding the sides
    # Several boxes (1 to 3, areas shared): the same erased fraction on average.
    theirs3 = (timm_masks(3, 1.0)[:, 0] == 0).mean()
    ours3 = (our_masks(3, 1.0, 1)[:, 0] == 0).mean()
    assert abs(ours3 - theirs3) < 0.01, (ours3, theirs3)
    # DeiT's probability 0.25: about a quarter of the images erased (sd 0.008).
    erased = (_boxes(our_masks(1, 0.25, 2))[:, 0] > 0).mean()
    assert abs(erased - 0.25) < 0.03


@pytest.mark.torch
@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erase_box_fills_as_timm(mode, photo, monkeypatch):
    import timm.data.random_erasing as timm_erasing
    import torch

    image = (photo[:, :24, :32].astype(np.float32) / 255 - 0.45) / 0.225  # a real normalised image
    for seed in range(4):
        monkeypatch.setattr(timm_erasing, "random", random.Random(seed))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            reference = timm_erasing.RandomErasing(1.0, mode=mode, device="cpu")
            expected = reference(torch.from_numpy(image.copy())).numpy()
        changed = np.argwhere((expected != image).any(0))
        (top, left), (bottom, right) = changed.min(0), changed.max(0) + 1
        h, w = bottom - top, right - left
        assert len(changed) == h * w and h < 24 and w < 32
        box = expected[:, top:bottom, left:right]
        if mode == "pixel":
            values = np.zeros_like(image)
            values[:, top:bottom, left:right] = box
        else:  # one value per channel (zero for const)
            assert np.all(box == box[:, :1, :1])
            values = box[:, :1, :1]
            assert mode == "rand" or not values.any()
        ours = erase_box(jnp.asarray(image), top, left, h, w, jnp.asarray(values))
        np.testing.assert_array_equal(np.asarray(ours), expected)


def test_random_erasing_is_reproducible_jits_and_vmaps(photo):
    images = jnp.asarray(np.stack([photo[:, :24, :32], photo[:, 50:74, 60:92]]).astype(np.float32) / 255)
    keys = jr.split(jr.key(7), 2)
    for mode in ("pixel", "rand", "const"):
        def erase(x, k, mode=mode):
            return random_erasing(x, key=k, probability=1.0, mode=mode, count=2)

        erase_batch = jax.jit(jax.vmap(erase))
        batch = np.asarray(erase_batch(images, keys))
        np.testing.assert_array_equal(np.asarray(erase_batch(images, keys)), batch)  # the key decides
        assert not np.array_equal(batch[0], images[0]) and not np.array_equal(batch[1], images[1])
        assert not np.array_equal(batch[0] == images[0], batch[1] == images[1])  # boxes differ across keys
        other = np.asarray(erase_batch(images, keys[::-1]))
        assert not np.array_equal(other[0], batch[0])
    # Each image of a batch as on its own.
    one = jax.jit(lambda x, k: random_erasing(x, key=k, probability=1.0, mode="const", count=2))
    np.testing.assert_array_equal(np.asarray(one(images[1], keys[1])), batch[1])
    # Per-pixel values differ across the box and channels; 'rand' values are one per channel.
    rand = jax.jit(lambda x, k: random_erasing(x, key=k, probability=1.0, mode="rand"))
    erased = np.asarray(rand(jnp.zeros((3, 24, 32)), keys[0]))
    assert len(np.unique(erased[0])) == 2 and len({float(erased[c].sum()) for c in range(3)}) == 3
    half = jax.eval_shape(lambda x: random_erasing(x, key=keys[0], probability=1.0),
                          jax.ShapeDtypeStruct((3, 24, 32), jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(random_erasing(images[0], key=keys[0], probability=0.0), images[0])
    for kwargs, message in [
        (dict(mode="noise"), r"`mode` must be one of \('pixel', 'rand', 'const'\)"),
        (dict(count=0), r"`count` .* must be an int >= 1"),
        (dict(probability=2.0), r"`probability` must be in \[0, 1\]"),
        (dict(min_area=0.5, max_area=0.4), r"0 < min_area <= max_area <= 1"),
        (dict(min_aspect=0.0), r"0 < min_aspect <= max_aspect"),
    ]:
        with pytest.raises(ValueError, match=message):
            random_erasing(images[0], key=keys[0], **kwargs)
