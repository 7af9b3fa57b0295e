"""Datasets, the image-folder reader, arrays/.npz, the seeded training batches, prefetching and
augmentation."""

import threading

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from PIL import Image

from cait_eqx import data


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist()


# ------------------------------------------------------------------------------------------ shipped datasets


def test_digits_are_the_sklearn_digits_scaled_to_uint8():
    from sklearn.datasets import load_digits

    ds = data.load_digits()
    raw = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.class_names == tuple(str(i) for i in range(10))
    np.testing.assert_array_equal(ds.labels, raw.target)
    # 0..16 stretched to 0..255, nothing else changed.
    np.testing.assert_array_equal(ds.images[:, 0], np.round(raw.images * 255 / 16).astype(np.uint8))
    big = data.load_digits(image_size=16)
    assert big.images.shape == (1797, 1, 16, 16)
    # Bilinear upsampling keeps each image's overall brightness (within rounding and edge effects).
    np.testing.assert_allclose(big.images.mean(axis=(1, 2, 3)), ds.images.mean(axis=(1, 2, 3)), atol=6)


def test_mnist_5k_is_real_mnist(mnist):
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels).tolist() == [500] * 10
    assert mnist.images.max() == 255 and mnist.images.min() == 0
    # Real digits: ink in the middle, the border rows nearly empty.
    assert mnist.images[:, 0, 12:16, 12:16].mean() > 4 * mnist.images[:, 0, :2, :].mean()


def test_split_is_fixed_disjoint_and_stratified():
    ds = data.load_digits()
    train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    again_train, again_test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(train.images, again_train.images)
    np.testing.assert_array_equal(test.labels, again_test.labels)
    assert len(train) + len(test) == len(ds) and len(test) == 360
    # Disjoint and complete: every image appears exactly once across the two parts.
    both = np.concatenate([train.images, test.images]).reshape(len(ds), -1)
    original = ds.images.reshape(len(ds), -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, original))
    # Stratified: each class has 20% (±1) of its examples in the test part.
    expected = np.bincount(ds.labels) * 0.2
    assert np.all(np.abs(np.bincount(test.labels, minlength=10) - expected) <= 1)
    _, other_test = data.train_test_split(ds, test_fraction=0.2, seed=1)
    assert not np.array_equal(other_test.images, test.images)


def test_dataset_checks_its_arrays():
    with pytest.raises(ValueError, match="labels must lie in"):
        data.Dataset(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 3]), ("a", "b"))
    with pytest.raises(ValueError, match="uint8 .* or floating"):
        data.Dataset(np.zeros((2, 1, 4, 4), np.int16), np.array([0, 1]), ("a", "b"))
    with pytest.raises(ValueError, match="unknown dataset|Unknown dataset"):
        data.load_dataset("cifar")


# -------------------------------------------------------------------------------------------- image folders


def _write_mnist_folder(root, mnist, per_class=4):
    """Three classes whose sorted names differ from their digit order: labels must follow the names."""
    chosen = {"seven": 7, "one": 1, "three": 3}
    expected = {}
    for name, digit in chosen.items():
        folder = root / name
        folder.mkdir(parents=True)
        picks = np.flatnonzero(mnist.labels == digit)[:per_class]
        for j, i in enumerate(picks):
            Image.fromarray(mnist.images[i, 0]).save(folder / f"{j:03d}.png")
            expected[(name, j)] = mnist.images[i, 0]
    return expected


def test_image_folder_reads_real_pngs_with_labels_and_class_names(tmp_path, mnist):
    expected = _write_mnist_folder(tmp_path, mnist)
    (tmp_path / "one" / "notes.txt").write_text("not an image, ignored by suffix")
    (tmp_path / ".hidden").mkdir()
    ds = data.load_image_folder(tmp_path)
    assert ds.class_names == ("one", "seven", "three")
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(12):
        name = ds.class_names[ds.labels[i]]
        np.testing.assert_array_equal(ds.images[i, 0], expected[(name, i % 4)])
    # Resizing on read, and the dataset spec form.
    small = data.load_dataset(f"folder:{tmp_path}", image_size=14)
    assert small.images.shape == (12, 1, 14, 14)


def test_image_folder_converts_colour_and_alpha(tmp_path, mnist):
    grey = mnist.images[0, 0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(grey).save(tmp_path / "a" / "grey.png")
    rgb = np.stack([grey, grey // 2, np.zeros_like(grey)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "b" / "colour.png")
    rgba = np.concatenate([rgb, np.full_like(grey, 255)[..., None]], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "b" / "alpha.png")
    ds = data.load_image_folder(tmp_path)
    assert ds.channels == 3  # one colour image makes the whole set RGB
    # Sorted by class folder, then file: a/grey, b/alpha, b/colour.
    by_name = dict(zip(["grey", "alpha", "colour"], ds.images, strict=True))
    np.testing.assert_array_equal(by_name["grey"], np.stack([grey] * 3))
    np.testing.assert_array_equal(by_name["colour"], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(by_name["alpha"], rgb.transpose(2, 0, 1))  # opaque alpha: same pixels
    grey_ds = data.load_image_folder(tmp_path, channels=1)
    np.testing.assert_array_equal(grey_ds.images[0, 0], grey)


def test_image_folder_reports_bad_content_by_path(tmp_path, mnist):
    _write_mnist_folder(tmp_path, mnist, per_class=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*no image files"):
        data.load_image_folder(tmp_path)
    (tmp_path / "empty").rmdir()
    broken = tmp_path / "one" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image_folder(tmp_path)
    broken.unlink()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "one" / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png is 12×10.*--image-size"):
        data.load_image_folder(tmp_path)
    assert data.load_image_folder(tmp_path, image_size=28).images.shape == (4, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match="missing"):
        data.load_image_folder(tmp_path / "missing")


# --------------------------------------------------------------------------------------------- arrays, npz


def test_arrays_and_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    ds = data.load_arrays(nhwc, labels, class_names=["x", "y", "z"])
    np.testing.assert_array_equal(ds.images, nhwc.transpose(0, 3, 1, 2))
    path = tmp_path / "set.npz"
    np.savez(path, images=nhwc, labels=labels, class_names=np.array(["x", "y", "z"]))
    loaded = data.load_npz(path)
    np.testing.assert_array_equal(loaded.images, ds.images)
    assert loaded.class_names == ("x", "y", "z")
    np.testing.assert_array_equal(data.load_dataset(f"npz:{path}").labels, labels)
    with pytest.raises(ValueError, match="layout='nchw' or layout='nhwc'"):
        data.load_arrays(np.zeros((2, 3, 4, 3), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        data.load_arrays(np.full((2, 4, 4), 255.0), np.array([0, 1]))
    np.savez(tmp_path / "wrong.npz", pixels=nhwc)
    with pytest.raises(ValueError, match="'images'.*'labels'"):
        data.load_npz(tmp_path / "wrong.npz")


# -------------------------------------------------------------------------------------------------- loader


def _toy(n=10):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 1, 2, 2), np.uint8)
    return data.Dataset(images, np.arange(n) % 3, ("a", "b", "c"), "toy")


def test_training_batches_are_seeded_permutations_per_epoch():
    """The training batches `fit` trains on (`TrainPipeline`, here reading in this process)."""
    pipeline = data.TrainPipeline(_toy(10), 3, seed=5, workers=0)
    assert pipeline.steps_per_epoch == 3
    batches = list(pipeline.batches(0, 0, stop_epoch=3))
    assert [(b.epoch, b.index) for b in batches] == [(e, i) for e in range(3) for i in range(3)]
    per_epoch = [np.concatenate([b.images[:, 0, 0, 0] for b in batches[3 * e : 3 * e + 3]]) for e in range(3)]
    for seen in per_epoch:
        assert len(set(seen.tolist())) == 9  # no example twice in an epoch; one dropped (10 = 3*3 + 1)
    assert not np.array_equal(per_epoch[0], per_epoch[1])  # reshuffled each epoch
    # Same seed: same order; resuming mid-run gives exactly the tail of the full stream.
    again = data.TrainPipeline(_toy(10), 3, seed=5, workers=0)
    tail = list(again.batches(1, 2, stop_epoch=3))
    assert [(b.epoch, b.index) for b in tail] == [(e, i) for e, i in [(1, 2), (2, 0), (2, 1), (2, 2)]]
    for b, ref in zip(tail, batches[5:], strict=True):
        np.testing.assert_array_equal(b.images, ref.images)
        np.testing.assert_array_equal(b.labels, ref.labels)
    other = next(data.TrainPipeline(_toy(10), 3, seed=6, workers=0).batches(0, 0, stop_epoch=1))
    assert not np.array_equal(other.images, batches[0].images)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.TrainPipeline(_toy(4), 5, seed=0, workers=0)


def test_eval_batches_pad_and_mark_the_tail():
    parts = list(data.eval_batches(_toy(7), 3))
    assert [p[0].shape[0] for p in parts] == [3, 3, 3]
    assert parts[-1][2].tolist() == [True, False, False]
    seen = np.concatenate([p[0][p[2]][:, 0, 0, 0] for p in parts])
    assert seen.tolist() == list(range(7))


def test_prefetch_keeps_order_raises_producer_errors_and_stops():
    out = list(data.prefetch(iter(range(20)), size=2, put=lambda x: x * 10))
    assert out == [10 * i for i in range(20)]

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = data.prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)

    before = threading.active_count()
    endless = data.prefetch(iter(range(10**9)), size=1)
    next(endless)
    endless.close()  # leaving the loop stops the thread
    assert threading.active_count() == before


# ---------------------------------------------------------------------------------------------- augmentation


def test_random_crop_is_a_bounded_shift_and_covers_every_offset():
    image = jnp.arange(1, 3 * 5 * 6 + 1, dtype=jnp.float32).reshape(3, 5, 6)
    pad = 2
    padded = np.pad(np.asarray(image), ((0, 0), (pad, pad), (pad, pad)))
    crops = jax.vmap(lambda k: data.random_crop(image, key=k, padding=pad))(jr.split(jr.key(0), 400))
    offsets = set()
    for crop in np.asarray(crops):
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(crop, padded[:, dy : dy + 5, dx : dx + 6])
        ]
        assert len(found) == 1, (
            "every crop must be the image shifted by at most `padding` pixels, zero-filled"
        )
        offsets.add(found[0])
    assert len(offsets) == (2 * pad + 1) ** 2
    assert data.random_crop(image, key=jr.key(1), padding=0) is image


def test_augment_flips_only_when_asked():
    image = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    keys = jr.split(jr.key(3), 64)
    flipped = np.asarray(jax.vmap(lambda k: data.Augment(flip=True)(image, key=k))(keys))
    mirrored = np.asarray(image)[:, :, ::-1]
    is_flip = [np.array_equal(f, mirrored) for f in flipped]
    is_same = [np.array_equal(f, np.asarray(image)) for f in flipped]
    assert all(a or b for a, b in zip(is_flip, is_same, strict=False)) and 10 < sum(is_flip) < 54
    unchanged = jax.vmap(lambda k: data.Augment()(image, key=k))(keys)
    np.testing.assert_array_equal(np.asarray(unchanged), np.broadcast_to(np.asarray(image), (64, 1, 3, 4)))
    with pytest.raises(ValueError, match="crop_padding"):
        data.Augment(crop_padding=-1)


def test_pixels_to_unit_floats_and_normalisation():
    pixels = jnp.asarray(np.array([0, 51, 255], np.uint8).reshape(1, 1, 3))
    np.testing.assert_allclose(np.asarray(data.to_unit_float(pixels)), [[[0.0, 0.2, 1.0]]], rtol=1e-6)
    rgb = jnp.ones((2, 3, 2, 2), jnp.float32)
    out = np.asarray(data.normalize_images(rgb, "imagenet"))
    np.testing.assert_allclose(
        out[0, :, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="3 channels"):
        data.normalize_images(jnp.ones((1, 2, 2)), "imagenet")
