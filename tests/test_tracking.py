"""Experiment tracking: TensorBoard event files and an offline W&B run hold what `metrics.jsonl` holds."""

import json
import sys

import jax.random as jr
import numpy as np
import pytest

import cait_eqx
from cait_eqx.data import load_digits, train_test_split
from cait_eqx.training import TrainConfig, fit


@pytest.fixture(scope="module")
def tiny():
    train, test = train_test_split(load_digits(image_size=8), test_fraction=0.2, seed=0)
    model = cait_eqx.CaiT(image_size=8, patch_size=4, num_classes=10, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=1, key=jr.key(0))
    return model, train.subset(np.arange(256)), test.subset(np.arange(100))


def _config(**changes):
    return TrainConfig(epochs=2, batch_size=32, log_every=3, crop_padding=0, **changes)


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event under `run_dir/tensorboard`, read with TensorBoard's own loader, in order; a
    run restarted with `purge_step` drops what came after it, as TensorBoard does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(records) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for name, value in record.items():
            if name not in ("step", "split"):
                out.setdefault(f"{record['split']}/{name}", []).append((record["step"], value))
    return out


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for tag in want:
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in want[tag]], tag
        values = [v for _, v in got[tag]]
        np.testing.assert_allclose(values, [v for _, v in want[tag]], rtol=1e-6, err_msg=tag)


def _wandb_history(path) -> dict[int, dict[str, float]]:
    """`{step: {name: value}}` read back from an offline run's `run-<id>.wandb` file: W&B's 7-byte header,
    then LevelDB's log framing (32 KiB blocks of chunks, each with a 7-byte header: crc32c, u16 length,
    u8 type 1 FULL / 2 FIRST / 3 MIDDLE / 4 LAST) around `wandb_internal_pb2.Record` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, chunks, rows = 7, 32768, [], {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # padding to the block's end
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.setdefault(int(row["_step"]), {}).update(
                    {k: v for k, v in row.items() if not k.startswith("_")}
                )
    return rows


def test_tensorboard_holds_the_scalars_of_metrics_jsonl_and_a_resume_does_not_repeat_steps(tiny, tmp_path):
    model, train, test = tiny
    config = _config(log="tensorboard")
    assert config.log == ("jsonl", "tensorboard")
    fit(model, train, test, config, key=jr.key(1), run_dir=tmp_path, progress=False, handle_signals=False)
    records = _jsonl(tmp_path)
    assert {r["split"] for r in records} == {"train", "test"}
    _assert_same(_tensorboard_scalars(tmp_path), _expected(records))

    # Stopped at step 5 and resumed: the steps logged after the checkpoint are logged again, once.
    resumed = tmp_path / "resumed"
    fit(model, train, test, config, key=jr.key(1), run_dir=resumed, progress=False, handle_signals=False,
        max_steps=5)
    fit(model, train, test, config, key=jr.key(1), run_dir=resumed, progress=False, handle_signals=False,
        resume=True)
    again = _jsonl(resumed)
    timeless = [{k: v for k, v in r.items() if k != "images_per_s"} for r in again]
    assert timeless == [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]
    _assert_same(_tensorboard_scalars(resumed), _expected(again))


def test_an_offline_wandb_run_records_the_last_values(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    model, train, test = tiny
    hooks = sys.excepthook, sys.exit
    fit(model, train, test, _config(log="jsonl,wandb"), key=jr.key(1), run_dir=tmp_path, progress=False,
        handle_signals=False)
    assert (sys.excepthook, sys.exit) == hooks  # wandb.init replaces them; the tracker puts them back
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (record_file,) = runs[0].glob("*.wandb")
    # The run's file (for `wandb sync` later) holds metrics.jsonl's values, one row per step.
    history = _wandb_history(record_file)
    want: dict[int, dict[str, float]] = {}
    for record in _jsonl(tmp_path):
        want.setdefault(record["step"], {}).update(
            {f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "split")}
        )
    assert sorted(history) == sorted(want)
    for step, row in want.items():
        assert history[step] == pytest.approx(row, rel=1e-6), step

    # What the run received: W&B's own summary of the logged values (its last value of each) is
    # `metrics.jsonl`'s last record of each split, at its step.
    from cait_eqx.training._tracking import WandbTracker

    tracker = WandbTracker(tmp_path / "again", {"note": "test"}, None)
    try:
        records = _jsonl(tmp_path)
        for record in records:
            tracker.write(record)
        tracker.flush()
        last = {}
        for record in records:
            split = record["split"]
            last.update({f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")})
        summary = dict(tracker.run.summary)
        for name, value in last.items():
            assert summary[name] == pytest.approx(value, rel=1e-6), name
        assert tracker.run.offline and tracker.run.config["note"] == "test"
    finally:
        tracker.close()


def test_a_tracker_without_its_package_or_an_unknown_one_is_a_clear_error(tiny, tmp_path, monkeypatch):
    unknown = r"`log` names unknown tracker\(s\) 'mlflow'; known: jsonl, tensorboard"
    with pytest.raises(ValueError, match=unknown):
        TrainConfig(log="jsonl,mlflow")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if it were not installed
    model, train, test = tiny
    missing = r'needs the package `tensorboardX`.*pip install "cait_eqx\[tracking\]"'
    with pytest.raises(ImportError, match=missing):
        fit(model, train, test, _config(log="tensorboard"), key=jr.key(1), run_dir=tmp_path, progress=False,
            handle_signals=False)


def test_the_cli_logs_to_tensorboard_and_a_resumed_run_may_switch_it_on(tmp_path, capsys):
    from cait_eqx import cli

    run_dir = tmp_path / "run"
    common = ["--no-progress", "--max-steps"]
    assert cli.main(["train", "--quick", "--out", str(run_dir), *common, "4"]) == 0
    assert not (run_dir / "tensorboard").exists()  # jsonl only, by default
    # `--log` is how this process reports, not what the run trains: a resumed run may take it.
    assert cli.main(["train", "--resume", str(run_dir), "--log", "jsonl,tensorboard", *common, "10"]) == 0
    got = _tensorboard_scalars(run_dir)
    later = [r for r in _jsonl(run_dir) if r["step"] > 4]
    assert later and got["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6))
                                           for r in later if r["split"] == "train"]
    with pytest.raises(SystemExit):
        cli.main(["train", "--quick", "--out", str(tmp_path / "other"), "--log", "mlflow"])
    assert "--log: names unknown tracker(s) 'mlflow'" in capsys.readouterr().err
