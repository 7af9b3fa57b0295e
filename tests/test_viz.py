"""Class-attention maps and training curves as pictures (`cait_eqx.viz`) and their CLI commands."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import cait_eqx
from cait_eqx import viz
from cait_eqx.cli import main
from cait_eqx.data import load_image_folder

# A non-square image (rows != cols) so a transposed or square-assuming reshape cannot pass.
IMAGE_SIZE = (16, 24)
PATCH = 4
GRID = (4, 6)


@pytest.fixture(scope="module")
def model():
    return cait_eqx.CaiT(IMAGE_SIZE, PATCH, 10, 32, 2, 2, 4, 64, key=jax.random.key(0))


@pytest.fixture(scope="module")
def image():
    return jax.random.normal(jax.random.key(1), (3, *IMAGE_SIZE))


def test_maps_are_the_class_attention_weights_on_the_patch_grid(model, image):
    weights = np.asarray(model.class_attention(image))  # (cls_depth, heads, 1 + N)
    maps = np.asarray(viz.class_attention_maps(model, image))
    assert maps.shape == (2, 4, *GRID)
    # Before upsampling: class-token weight + the patch map sum to one for every block and head.
    np.testing.assert_allclose(weights[:, :, 0] + maps.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    # Patch token k (row-major) sits at grid cell (k // cols, k % cols): no transposition, no shift by one.
    # The two come from different compiled programs, so they agree to float32 rounding (a few ulp), not
    # bit for bit; a misplaced token would be off by the spread of the weights, > 1e-4 (checked below).
    for k in (0, 1, GRID[1], GRID[0] * GRID[1] - 1):
        np.testing.assert_allclose(
            maps[:, :, k // GRID[1], k % GRID[1]], weights[:, :, 1 + k], rtol=1e-6, atol=0
        )
    # The weights are not uniform for a random model, so the comparison above is informative.
    assert np.ptp(weights[:, :, 1:]) > 1e-4


def test_heatmaps_have_the_image_size_and_repeat_each_patch_weight(model, image):
    maps = np.asarray(viz.class_attention_maps(model, image))
    heat = np.asarray(viz.attention_heatmaps(model, image))
    assert heat.shape == (2, 4 + 1, *IMAGE_SIZE)
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            pixels = heat[:, :4, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
            # Nearest upsampling copies one value over the patch's pixels: equal within the one array ...
            np.testing.assert_array_equal(pixels, np.broadcast_to(pixels[..., :1, :1], pixels.shape))
            # ... and that value is the patch's weight, computed by another program (float32 rounding).
            np.testing.assert_allclose(pixels[..., 0, 0], maps[:, :, r, c], rtol=1e-6, atol=0)
    np.testing.assert_allclose(heat[:, 4], heat[:, :4].mean(axis=1), rtol=1e-6)
    # Each head's nearest-upsampled map keeps the patch mass: sum / patch area = patch weights' sum.
    np.testing.assert_allclose(heat[:, :4].sum(axis=(-2, -1)) / PATCH**2, maps.sum(axis=(-2, -1)), rtol=1e-5)


def test_bilinear_heatmaps_interpolate_within_the_patch_weights(model, image):
    maps = np.asarray(viz.class_attention_maps(model, image))
    heat = np.asarray(viz.attention_heatmaps(model, image, upsample="bilinear"))
    assert heat.shape == (2, 5, *IMAGE_SIZE)
    low = maps.min(axis=(-2, -1))[..., None, None]
    high = maps.max(axis=(-2, -1))[..., None, None]
    assert np.all(heat[:, :4] >= low - 1e-7) and np.all(heat[:, :4] <= high + 1e-7)
    assert not np.allclose(heat[:, :4], np.asarray(viz.attention_heatmaps(model, image))[:, :4])


def test_plot_class_attention_writes_a_png_of_the_expected_layout(model, image, tmp_path):
    out = viz.plot_class_attention(model, image, tmp_path / "sub" / "attn.png", panel_inches=1.5, dpi=50)
    assert out == tmp_path / "sub" / "attn.png"
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    # 2 CA blocks x (input + 4 heads + mean) panels of 1.5 in, scaled by the image aspect 24/16, at 50 dpi.
    assert (width, height) == (round(6 * 1.5 * 1.5 * 50), round(2 * 1.5 * 1.15 * 50))
    assert pixels.std() > 10  # something was drawn, not a blank canvas
    assert not list(tmp_path.glob("sub/.*.tmp"))  # written atomically, no temporary left behind


def test_models_without_class_attention_are_refused(image, getkey):
    plain = cait_eqx.CaiT(IMAGE_SIZE, PATCH, 10, 32, 2, 0, 4, 64, key=getkey())
    with pytest.raises(ValueError, match="cls_depth=0"):
        viz.class_attention_maps(plain, image)


def test_load_image_matches_the_training_reader_and_timm_preprocessing(tmp_path, model):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos" / "some_class"
    folder.mkdir(parents=True)
    path = folder / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
    # "none": what `cait_eqx.data.load_image_folder` gives a model trained on this folder, scaled to [0, 1].
    raw, display = viz.load_image(path, model.config, normalize="none")
    reference = load_image_folder(tmp_path / "photos", image_size=IMAGE_SIZE, channels=3).images[0] / 255.0
    assert raw.shape == (3, *IMAGE_SIZE) and display.shape == (*IMAGE_SIZE, 3)
    np.testing.assert_allclose(np.asarray(raw), reference, atol=1e-6)
    np.testing.assert_allclose(np.asarray(raw).transpose(1, 2, 0), display, atol=1e-6)
    # "imagenet": exactly `cait_eqx.preprocess` (timm's eval transform); the display undoes the normalisation.
    normed, shown = viz.load_image(path, model.config, normalize="imagenet")
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(normed), np.asarray(cait_eqx.preprocess(img, IMAGE_SIZE)))
    mean = np.asarray(cait_eqx.IMAGENET_MEAN)
    std = np.asarray(cait_eqx.IMAGENET_STD)
    np.testing.assert_allclose(
        shown, np.clip(np.asarray(normed).transpose(1, 2, 0) * std + mean, 0, 1), atol=1e-6
    )
    grey_config = cait_eqx.CaiT(
        IMAGE_SIZE, PATCH, 10, 32, 1, 1, 4, 64, channels=1, key=jax.random.key(2)
    ).config
    grey, grey_display = viz.load_image(path, grey_config)
    assert grey.shape == (1, *IMAGE_SIZE) and grey_display.shape == IMAGE_SIZE
    with pytest.raises(ValueError, match="3-channel"):
        viz.load_image(path, grey_config, normalize="imagenet")


def _write_metrics(run_dir, *, truncated_tail=False):
    lines = []
    for step in range(1, 21):
        lines.append(
            {
                "step": step,
                "epoch": step / 10,
                "split": "train",
                "loss": 2.0 / step,
                "accuracy": min(1.0, 0.1 * step),
                "lr": 1e-3 * min(1.0, step / 5),
                "images_per_s": 500.0,
            }
        )
        if step % 10 == 0:
            lines.append(
                {
                    "step": step,
                    "epoch": step / 10,
                    "split": "test",
                    "loss": 3.0 / step,
                    "accuracy": 0.045 * step,
                }
            )
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if truncated_tail:
        text += '{"step": 21, "epoch": 2.1, "spl'
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)
    return lines


def test_read_metrics_keeps_every_record_and_tolerates_a_cut_last_line(tmp_path):
    lines = _write_metrics(tmp_path / "run", truncated_tail=True)
    assert viz.read_metrics(tmp_path / "run") == lines
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train"}\nnot json\n{"step": 2, "split": "train"}\n'
    )
    with pytest.raises(ValueError, match="line 2"):
        viz.read_metrics(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        viz.read_metrics(tmp_path / "nowhere")


def test_training_curves_plot_the_recorded_values(tmp_path):
    lines = _write_metrics(tmp_path / "run")
    records = viz.read_metrics(tmp_path / "run")
    fig = viz._curves_figure(records, "run")
    ax_loss, ax_acc, ax_lr, ax_speed = fig.axes
    train = [r for r in lines if r["split"] == "train"]
    test = [r for r in lines if r["split"] == "test"]
    (train_loss, test_loss) = ax_loss.lines
    np.testing.assert_allclose(train_loss.get_xydata(), [[r["step"], r["loss"]] for r in train])
    np.testing.assert_allclose(test_loss.get_xydata(), [[r["step"], r["loss"]] for r in test])
    np.testing.assert_allclose(ax_acc.lines[1].get_xydata(), [[r["step"], r["accuracy"]] for r in test])
    np.testing.assert_allclose(ax_lr.lines[0].get_xydata(), [[r["step"], r["lr"]] for r in train])
    assert ax_loss.get_yscale() == "log"  # loss falls 20x (> 10x): a log axis keeps the tail readable
    assert "90.00%" in fig.get_suptitle()  # the last test accuracy, 0.045 * 20

    out = viz.plot_training_curves(tmp_path / "run")
    assert out == tmp_path / "run" / "curves.png"
    with Image.open(out) as png:
        assert png.size == (1000, 700)


def test_cli_plot_writes_curves(tmp_path, capsys):
    _write_metrics(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file() and "c.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention", "img.png"], "one of the arguments --checkpoint --weights is required"),
        (["attention", "img.png", "--checkpoint", "a", "--weights", "b"], "not allowed with argument"),
        (["attention", "img.png", "--checkpoint", "m.safetensors", "--model", "cait_xxs24_224"], "--model"),
        (["attention", "MISSING.png", "--checkpoint", "m.safetensors"], "image file not found: MISSING.png"),
        (
            ["attention", "img.png", "--checkpoint", "NOFILE.safetensors"],
            "--checkpoint file not found: NOFILE",
        ),
        (["attention", "img.png", "--weights", "w.pth", "--upsample", "cubic"], "invalid choice"),
        (["plot", "NO_RUN"], "run directory not found: NO_RUN"),
    ],
)
def test_cli_usage_errors_exit_2_and_name_the_problem(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save("img.png")
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_plot_reports_a_run_without_metrics(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert main(["plot", str(tmp_path / "empty_run")]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err


def test_cli_attention_from_a_saved_checkpoint(model, tmp_path, capsys):
    checkpoint = cait_eqx.save(tmp_path / "run" / "model.safetensors", model)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(
        tmp_path / "x.png"
    )
    out = tmp_path / "maps" / "attn.png"
    assert (
        main(["attention", str(tmp_path / "x.png"), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    )
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as png:  # 2 CA blocks x (input + 4 heads + mean) at the default 2 in / 100 dpi
        assert png.size == (round(6 * 2.0 * 1.5 * 100), round(2 * 2.0 * 1.15 * 100))


def test_cli_attention_from_timm_weights_infers_the_model(tmp_path, capsys, getkey):
    from safetensors.numpy import save_file

    square = cait_eqx.CaiT(16, 4, 10, 32, 1, 1, 4, 64, key=getkey())
    save_file(cait_eqx.to_timm_state_dict(square), str(tmp_path / "model.safetensors"))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.png")
    argv = [
        "attention",
        str(tmp_path / "x.png"),
        "--weights",
        str(tmp_path / "model.safetensors"),
        "--out",
        str(tmp_path / "attn.png"),
    ]
    assert main(argv) == 0
    with Image.open(tmp_path / "attn.png") as png:  # 1 CA block x (input + 4 heads + mean)
        assert png.size == (6 * 200, round(1 * 2.0 * 1.15 * 100))
    # A file that is not a CaiT: a clear one-line error, exit status 1, no traceback.
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    argv[3] = str(tmp_path / "bad.safetensors")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("cait-eqx attention: error:") and "Traceback" not in err
