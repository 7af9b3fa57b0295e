"""`cait-eqx predict`: image files in, the model's own top-k out, with the run's class names.

What would be wrong: images preprocessed otherwise than the training saw them (another resize, scaling or
channel order), rows that do not match their images, indices without the run's names, a glob taken
literally, one compilation per batch, or a traceback instead of a one-line error for bad input.
"""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import cait_eqx
from cait_eqx import cli, data, training

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A folder of real digits as 16x16 PNGs (class folders named in words) and a `--quick` run on it."""
    root = tmp_path_factory.mktemp("predict")
    digits = data.load_digits(image_size=16)
    folder = root / "digits"
    for label, name in enumerate(NAMES):
        (folder / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.labels == label)[:12]):
            Image.fromarray(digits.images[index, 0]).save(folder / name / f"{i:02d}.png")
    run_dir = root / "run"
    argv = ["train", "--quick", "--dataset", f"folder:{folder}", "--image-size", "16", "--out", str(run_dir)]
    assert cli.main([*argv, "--no-progress"]) == 0
    return folder, run_dir


def _expected(model, paths, k, names):
    """The top-k of the model's own `jax.vmap` on the PNGs' pixels in [0, 1] (what the training saw)."""
    pixels = np.stack([np.asarray(Image.open(p))[None] for p in paths]).astype(np.float32) / 255
    logits = np.asarray(jax.vmap(model)(jnp.asarray(pixels)), np.float64)
    rows = []
    for row in logits:
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        order = np.argsort(-row, kind="stable")[:k]
        rows.append([(int(i), names[i], float(probabilities[i])) for i in order])
    return rows


def test_predict_a_folder_matches_the_model_with_the_runs_class_names(digits_run, tmp_path, capsys):
    folder, run_dir = digits_run
    out_csv, out_json = tmp_path / "out.csv", tmp_path / "out" / "out.json"
    argv = ["predict", str(run_dir), str(folder), "--top-k", "3", "--batch-size", "16"]
    assert cli.main([*argv, "--csv", str(out_csv), "--json", str(out_json)]) == 0
    record = json.loads(out_json.read_text())
    rows = record["predictions"]
    assert len(rows) == 120 and record["preprocess"] == "resize"
    paths = [row["image"] for row in rows]
    assert paths == sorted(str(p) for p in folder.rglob("*.png"))  # recursive, in order, each once
    # The training's own reading of the folder sees the same pixels as the PNGs hold.
    assert np.array_equal(
        data.load_image_folder(folder, image_size=16).images,
        np.stack([np.asarray(Image.open(p))[None] for p in paths]),
    )
    model = training.Run(run_dir).model()
    run_names = json.loads((run_dir / "config.json").read_text())["data"]["class_names"]
    assert record["class_names"] == run_names == sorted(NAMES)
    expected = _expected(model, paths, 3, run_names)
    for row, want in zip(rows, expected, strict=True):
        assert [(p["index"], p["name"]) for p in row["top_k"]] == [w[:2] for w in want]
        np.testing.assert_allclose([p["probability"] for p in row["top_k"]], [w[2] for w in want], atol=1e-5)
    with out_csv.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3 * 120
    for line in table:
        prediction = rows[paths.index(line["image"])]["top_k"][int(line["rank"]) - 1]
        assert (int(line["class_index"]), line["class_name"]) == (prediction["index"], prediction["name"])
        assert float(line["probability"]) == prediction["probability"]
    screen = capsys.readouterr().out
    assert "top-3" in screen and f"{paths[0]}  " in screen and str(out_csv) in screen
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_glob_and_a_model_file_inside_the_run(digits_run, tmp_path):
    folder, run_dir = digits_run
    out = tmp_path / "seven.json"
    pattern = str(folder / "seven" / "*.png")
    argv = ["predict", str(run_dir / "model.safetensors"), pattern, str(folder / "one" / "00.png")]
    assert cli.main([*argv, "--top-k", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    images = [row["image"] for row in record["predictions"]]
    assert images == sorted(str(p) for p in (folder / "seven").glob("*.png")) + [
        str(folder / "one" / "00.png")
    ]
    assert record["class_names"] == sorted(NAMES)  # the file's run directory gave the names
    deep = tmp_path / "deep.json"
    assert cli.main(["predict", str(run_dir), str(folder / "**" / "0[0-1].png"), "--json", str(deep)]) == 0
    assert len(json.loads(deep.read_text())["predictions"]) == 20


def test_an_imagenet_model_file_gets_timms_transform_and_imagenet_names(tmp_path):
    model = cait_eqx.CaiT(
        image_size=16, patch_size=4, num_classes=1000, dim=32, depth=1, cls_depth=1, heads=2, mlp_dim=64,
        key=jax.random.key(5),
    )  # fmt: skip
    path = cait_eqx.save(tmp_path / "imagenet_like.safetensors", model)
    photo = tmp_path / "photo.jpg"
    rgb = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(photo, quality=95)
    out = tmp_path / "p.json"
    assert cli.main(["predict", str(path), str(photo), "--top-k", "2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["preprocess"] == "timm"
    x = cait_eqx.preprocess(Image.open(photo), 16)
    want = cait_eqx.top_k(model(x), 2)
    got = record["predictions"][0]["top_k"]
    assert [(p["index"], p["name"]) for p in got] == [(w.index, w.name) for w in want]
    assert want[0].name == cait_eqx.imagenet_class_names()[want[0].index]


def _usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_bad_input_is_a_one_line_usage_error(digits_run, tmp_path, capsys):
    folder, run_dir = digits_run
    run = str(run_dir)
    _usage_error(capsys, ["predict", run, str(tmp_path / "none" / "*.png")], "no images matched")
    _usage_error(capsys, ["predict", run, str(tmp_path / "missing.png")], "no such image file or folder")
    (tmp_path / "empty").mkdir()
    _usage_error(capsys, ["predict", run, str(tmp_path / "empty")], "no images matched")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    _usage_error(capsys, ["predict", run, str(folder / "one"), str(broken)], f"Cannot read image {broken}")
    from safetensors.numpy import save_file

    save_file({"weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    image = str(folder / "one" / "00.png")
    _usage_error(capsys, ["predict", str(tmp_path / "other.safetensors"), image], "does not hold a CaiT")
    _usage_error(capsys, ["predict", str(tmp_path), image], "not a cait_eqx run")
    four = cait_eqx.CaiT(**dict(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1,
                                heads=2, mlp_dim=32, channels=4), key=jax.random.key(0))  # fmt: skip
    cait_eqx.save(tmp_path / "four.safetensors", four)
    _usage_error(capsys, ["predict", str(tmp_path / "four.safetensors"), image], "4-channel images")
    _usage_error(capsys, ["predict", run, image, "--top-k", "11"], "more than the model's 10 classes")


def test_predict_help_imports_no_jax():
    code = (
        "import sys\n"
        "from cait_eqx.cli import main\n"
        "try:\n"
        "    main(['predict', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'jax', 'jaxlib', 'equinox', 'PIL'}))\n"
    )
    env = dict(os.environ, CAIT_EQX_TYPECHECK="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--top-k" in proc.stdout and "--preprocess" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"
