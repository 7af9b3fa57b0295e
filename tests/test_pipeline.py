"""The streaming data pipeline: lazy sources (image folders, memory-mapped arrays), the
`TrainPipeline` (order, workers, exact resume), bad files, and worker processes that never outlive a trainer.

Real files throughout: MNIST-5k digits written as PNGs, `.npy` arrays opened memory-mapped.
"""

import dataclasses
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cait_eqx import data
from cait_eqx.data import BadImageError, Sampler, TrainPipeline


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist()


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory, mnist):
    """60 real MNIST digits as PNGs, 20 in each of three class folders."""
    root = tmp_path_factory.mktemp("mnist_folder")
    for digit in (3, 5, 8):
        folder = root / f"digit{digit}"
        folder.mkdir()
        for j, i in enumerate(np.flatnonzero(mnist.labels == digit)[:20]):
            Image.fromarray(mnist.images[i, 0]).save(folder / f"{j:03d}.png")
    return root


def _all_batches(pipeline, *args, **kwargs):
    return list(pipeline.batches(*args, **kwargs))


# ------------------------------------------------------------------------------------------------- sources


def test_scanned_folder_reads_what_the_eager_reader_reads_and_holds_no_pixels(mnist_folder):
    eager = data.load_image_folder(mnist_folder)
    lazy = data.scan_image_folder(mnist_folder)
    assert (lazy.class_names, len(lazy), lazy.channels, lazy.image_size) == (
        eager.class_names, len(eager), 1, (28, 28)
    )
    np.testing.assert_array_equal(lazy.labels, eager.labels)
    np.testing.assert_array_equal(lazy.read(np.arange(len(lazy))), eager.images)
    # The file list only: what is pickled into each data worker is a few bytes per file, not 784 pixels.
    assert len(pickle.dumps(lazy)) < 40 * len(lazy) + 1000
    # Resized on read, as the eager reader resizes; a split stays lazy and reads the same examples.
    small = data.scan_image_folder(mnist_folder, image_size=14)
    eager_small = data.load_image_folder(mnist_folder, image_size=14)
    np.testing.assert_array_equal(small.read(np.arange(5)), eager_small.images[:5])
    train, test = data.train_test_split(lazy, test_fraction=0.25, seed=0)
    eager_train, eager_test = data.train_test_split(eager, test_fraction=0.25, seed=0)
    assert isinstance(test, data.SubsetSource)
    np.testing.assert_array_equal(test.read(np.arange(len(test))), eager_test.images)
    np.testing.assert_array_equal(train.labels, eager_train.labels)
    assert data.load_dataset(f"folder:{mnist_folder}", lazy=True).files.tolist() == lazy.files.tolist()


def test_a_folder_that_mixes_modes_or_sizes_or_has_an_empty_class_is_refused(tmp_path, mnist):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(mnist.images[0, 0]).save(tmp_path / "a" / "0.png")
    colour = np.repeat(mnist.images[1, 0][..., None], 3, axis=-1)
    colour[..., 0] = 255
    Image.fromarray(colour).save(tmp_path / "b" / "0.png")
    Image.fromarray(mnist.images[2, 0][:20]).save(tmp_path / "b" / "1.png")
    source = data.scan_image_folder(tmp_path)  # greyscale and 28×28, from the first image
    with pytest.raises(ValueError, match=r"b/0.png is a colour image .* mixes modes. Pass channels=3"):
        source.read_native(1)
    with pytest.raises(ValueError, match=r"b/1.png is 28×20 but the folder's images are 28×28 .* image_size"):
        source.read_native(2)
    # Both are fine when asked for: RGB for everything, one size for everything.
    rgb = data.scan_image_folder(tmp_path, channels=3, image_size=28)
    assert rgb.read(np.arange(3)).shape == (3, 3, 28, 28)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"Class folder .*c holds no image files"):
        data.scan_image_folder(tmp_path)


def test_memory_mapped_arrays_read_rows_and_refuse_wrong_dtype_or_layout(tmp_path, mnist):
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "images.npy", mnist.images[:100])
    np.save(folder / "labels.npy", mnist.labels[:100].astype(np.int64))
    (folder / "class_names.txt").write_text("\n".join(f"digit {i}" for i in range(10)))
    source = data.load_dataset(f"npy:{folder}")
    assert isinstance(source.images, np.memmap) and source.class_names[3] == "digit 3"
    picks = np.array([17, 3, 99, 3])
    np.testing.assert_array_equal(source.read(picks), mnist.images[picks])
    # Pickled by path (into the workers), not by its pixels.
    assert len(pickle.dumps(source)) < 2000
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source)).read(picks), mnist.images[picks])
    first_100 = data.Dataset(mnist.images[:100], mnist.labels[:100], mnist.class_names)
    resized = data.open_arrays(folder, image_size=14).read(picks)
    np.testing.assert_array_equal(resized, first_100.resized(14).images[picks])
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "labels.npy", np.zeros(4, np.int64))
    for array, message in [
        (np.zeros((4, 1, 8, 8), np.float32), r"float32 images; memory-mapped images must be uint8"),
        (np.zeros((4, 8, 8), np.uint8), r"shape \(4, 8, 8\); memory-mapped images must be \(n, channels"),
        (np.zeros((4, 8, 8, 3), np.uint8), r"looks channels-last .*transpose\(0, 3, 1, 2\)"),
        (np.asfortranarray(np.zeros((4, 1, 8, 8), np.uint8)), r"Fortran order"),
    ]:
        np.save(bad / "images.npy", array)
        with pytest.raises(ValueError, match=message):
            data.open_arrays(bad)
    np.save(bad / "images.npy", np.zeros((5, 1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"must hold 5 integer labels .* got shape \(4,\)"):
        data.open_arrays(bad)


# ------------------------------------------------------------------------------------------------- sampler


@pytest.mark.torch
def test_repeated_augmentation_orders_examples_as_timms_repeat_aug_sampler():
    from timm.data.distributed_sampler import RepeatAugSampler

    n = 50
    # Unshuffled, one replica, no rounding of the epoch: timm's order is ours exactly.
    timm_sampler = RepeatAugSampler(range(n), num_replicas=1, rank=0, shuffle=False, num_repeats=3,
                                    selected_round=0)
    theirs = list(timm_sampler)
    np.testing.assert_array_equal(Sampler(n, 10, seed=0, shuffle=False, repeats=3).order(0), theirs)
    # Shuffled: each image of the permutation three times in a row, the epoch as long as the data.
    order = Sampler(n, 10, seed=4, repeats=3).order(2)
    assert len(order) == n
    assert np.all(order[0:48:3] == order[1:48:3]) and np.all(order[0:48:3] == order[2:48:3])
    assert len(np.unique(order)) == 17  # ceil(50 / 3) images this epoch
    np.testing.assert_array_equal(np.unique(order[::3]), np.sort(order[::3]))  # no image in two triples
    # Without repeats the order is epoch 5's permutation drawn from `default_rng([seed, epoch])`.
    ds = data.load_digits()
    np.testing.assert_array_equal(
        Sampler(len(ds), 64, seed=3).order(5), np.random.default_rng([3, 5]).permutation(len(ds))
    )


# ---------------------------------------------------------------------------------------- the pipeline


def test_batches_are_the_same_bytes_whatever_the_workers_and_resume_exactly(mnist_folder):
    source = data.scan_image_folder(mnist_folder, image_size=16)
    eager = data.load_image_folder(mnist_folder, image_size=16)
    serial = _all_batches(TrainPipeline(source, 8, seed=1, workers=0), 0, 0, 2)
    assert [(b.epoch, b.index) for b in serial] == [(e, i) for e in range(2) for i in range(7)]
    in_memory = _all_batches(TrainPipeline(eager, 8, seed=1), 0, 0, 2)
    two = TrainPipeline(source, 8, seed=1, workers=2)
    parallel = _all_batches(two, 0, 0, 2)
    for a, b, c in zip(serial, parallel, in_memory, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.images, c.images)
        np.testing.assert_array_equal(a.labels, c.labels)
    # The batch's labels are its images' labels: the order is that of `Sampler`.
    order = Sampler(len(source), 8, seed=1).order(1)
    np.testing.assert_array_equal(serial[8].labels, source.labels[order[8:16]])
    # Resume after batch 9 from its position alone (no iterator state), with as many workers or another
    # count: the same batches either way.
    for pipeline in (two, TrainPipeline(source, 8, seed=1, workers=0)):
        rest = _all_batches(pipeline, 1, 3, 2)
        assert [(b.epoch, b.index) for b in rest] == [(1, i) for i in range(3, 7)]
        for a, b in zip(rest, parallel[10:], strict=True):
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.labels, b.labels)


def test_an_unreadable_file_is_named_or_skipped_and_counted(tmp_path, mnist):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for j in range(6):
            Image.fromarray(mnist.images[j + (6 if name == "b" else 0), 0]).save(tmp_path / name / f"{j}.png")
    (tmp_path / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "a" / "5.png").write_text("not an image")
    source = data.scan_image_folder(tmp_path)
    named = r"Cannot read .*(b/3|a/5).png.*--check-data.*--bad-images skip"
    with pytest.raises(BadImageError, match=named) as caught:
        _all_batches(TrainPipeline(source, 4, seed=0, workers=1), 0, 0, 1)
    assert caught.value.paths[0].endswith(("b/3.png", "a/5.png"))
    # Skip: replaced by the next readable example of the epoch and counted, every batch still whole.
    batches = _all_batches(TrainPipeline(source, 4, seed=0, bad_images="skip"), 0, 0, 1)
    assert sum(b.skipped for b in batches) == 2 and {b.images.shape for b in batches} == {(4, 1, 28, 28)}
    # The check pass lists every bad file; `fit`'s check stops with that list, or leaves them out.
    bad = data.find_bad_images(source, workers=1)
    assert [source.describe(i)[-7:] for i, _ in bad] == ["a/5.png", "b/3.png"]
    from cait_eqx.training import TrainConfig, check_images

    listed = r"2 image\(s\) cannot be read:\n  Cannot read image .*a/5.png"
    with pytest.raises(BadImageError, match=listed) as caught:
        check_images(source, None, TrainConfig(check_data=True))
    assert [p[-7:] for p in caught.value.paths] == ["a/5.png", "b/3.png"]
    kept, _ = check_images(source, None, TrainConfig(check_data=True, bad_images="skip"))
    assert len(kept) == 10 and kept.checked  # marked: `fit` does not read it all again
    assert kept.read(np.arange(10)).shape == (10, 1, 28, 28)  # every image left reads


@pytest.mark.slow
def test_fit_trains_from_a_lazy_folder_with_workers_as_from_memory(mnist_folder):
    import jax.random as jr

    import cait_eqx
    from cait_eqx.training import TrainConfig, fit

    model = cait_eqx.CaiT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=1, key=jr.key(0))
    config = TrainConfig(epochs=1, batch_size=8, log_every=1, data_workers=1)
    losses = {}
    for name, source in (("lazy", data.scan_image_folder(mnist_folder, image_size=16)),
                         ("memory", data.load_image_folder(mnist_folder, image_size=16))):
        losses[name] = []
        fit(model, source, None, config, key=jr.key(1), progress=False, handle_signals=False,
            on_step=lambda step, m, name=name: losses[name].append(m["loss"]))
    assert len(losses["lazy"]) == 7 and losses["lazy"] == losses["memory"]


# ------------------------------------------------------------------------------------ worker processes

_TRAINER = textwrap.dedent(
    """
    import sys
    import jax.random as jr
    import cait_eqx
    from cait_eqx import data
    from cait_eqx.training import TrainConfig, fit

    if __name__ == "__main__":
        source = data.scan_image_folder(sys.argv[1], image_size=16)
        model = cait_eqx.CaiT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1,
                              heads=2, mlp_dim=32, channels=1, key=jr.key(0))
        def on_step(step, metrics):
            print(f"step {step}", flush=True)
        config = TrainConfig(epochs=10000, batch_size=8, data_workers=2)
        result = fit(model, source, None, config, key=jr.key(1), progress=False, on_step=on_step)
        print("status", result.status, flush=True)
    """
)


def _tagged_processes(tag: str) -> list[int]:
    """The processes whose environment carries `tag` (a trainer and every process it started)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _start_trainer(tmp_path, folder):
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    tag = f"CAIT_EQX_TEST_TAG={uuid.uuid4().hex}"
    env = {**os.environ, "CAIT_EQX_TEST_TAG": tag.split("=")[1]}
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("step 3"):
            break
        assert time.monotonic() < deadline, "the trainer did not start"
    else:
        pytest.fail(f"the trainer ended early:\n{proc.stderr.read()[-3000:]}")
    workers = [pid for pid in _tagged_processes(tag) if pid != proc.pid]
    assert len(workers) >= 2, workers  # the two data workers
    return proc, tag


def _wait_gone(tag: str, seconds: float = 20.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_trainer_leaves_no_data_worker_behind(tmp_path, mnist_folder):
    proc, tag = _start_trainer(tmp_path, mnist_folder)
    proc.kill()  # SIGKILL: the trainer cannot clean up; its workers must die with it
    proc.communicate()
    assert _wait_gone(tag) == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_the_trainer_and_its_workers_cleanly(tmp_path, mnist_folder):
    proc, tag = _start_trainer(tmp_path, mnist_folder)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "status interrupted" in out
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err[-3000:]
    assert _wait_gone(tag) == []


@pytest.mark.slow
def test_deits_augmentations_run_in_the_workers_reproducibly_and_train(mnist_folder):
    """Random-resized crop + RandAugment in the workers (the same bytes with 0 or 2 of them, a pure function
    of the seed), repeated augmentation (copies of one image augmented differently), random erasing and
    mixup/cutmix on the device: `fit` trains with DeiT's whole recipe."""
    import jax.random as jr

    import cait_eqx
    from cait_eqx.training import TrainConfig, fit, train_transform

    # Read at 16×16 (evaluation); the workers crop the native 28×28 images to that size.
    source = data.scan_image_folder(mnist_folder, image_size=16, channels=3)
    config = TrainConfig(epochs=1, batch_size=12, resized_crop=True, auto_augment="rand-m9-mstd0.5-inc1",
                         aug_repeats=3, reprob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, flip=True,
                         normalize="imagenet", data_workers=2)
    transform = train_transform(config, (16, 16))
    assert isinstance(transform, data.TrainTransform) and transform.rand_augment == config.auto_augment
    runs = [
        _all_batches(TrainPipeline(source, 12, seed=5, transform=transform, workers=w, repeats=3), 0, 0, 1)
        for w in (0, 2)
    ]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
    first = runs[0][0]
    assert first.images.shape == (12, 3, 16, 16) and first.images.dtype == np.uint8
    assert first.labels[0] == first.labels[1] == first.labels[2]  # one image, three times
    assert not np.array_equal(first.images[0], first.images[1])  # augmented independently
    other = TrainPipeline(source, 12, seed=6, transform=transform, workers=0, repeats=3)
    other_seed = _all_batches(other, 0, 0, 1)
    assert not np.array_equal(other_seed[0].images, first.images)
    model = cait_eqx.CaiT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=3, key=jr.key(0))
    result = fit(model, source, None, config, key=jr.key(1), progress=False, handle_signals=False)
    assert result.status == "completed" and result.step == 5


def _data_workers() -> list:
    import multiprocessing

    from cait_eqx._constants import DATA_WORKER_NAME

    return [p for p in multiprocessing.active_children() if p.name.startswith(DATA_WORKER_NAME)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_data_worker_reads_and_augments_without_importing_jax(mnist_folder):
    """A data worker decodes and augments with NumPy and PIL only: JAX (about 130 MB resident) is not
    mapped into it, and it stays far below a process that imports JAX (about 180 MB;
    benchmarks/worker_memory.py). Wrong would be a worker that imports JAX through the package's jaxtyping
    hook or through what unpickles its work."""
    source = data.scan_image_folder(mnist_folder, image_size=16)
    stream = TrainPipeline(source, 8, seed=0, workers=1, transform=data.TrainTransform((16, 16))).batches()
    try:
        next(stream)
        next(stream)
        (worker,) = _data_workers()
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
        status = Path(f"/proc/{worker.pid}/status").read_text().splitlines()
        rss_mb = int([line for line in status if line.startswith("VmRSS")][0].split()[1]) / 1024
    finally:
        stream.close()
    assert "jaxlib" not in maps and "libjax" not in maps, "JAX is loaded in the data worker"
    assert rss_mb < 100, f"a data worker holds {rss_mb:.0f} MB"


_MAIN_THAT_IMPORTS_THE_PACKAGE = '''
import multiprocessing, sys
from pathlib import Path

from cait_eqx.cli import main  # what the `cait-eqx` command's script does at its top
from cait_eqx import data
from cait_eqx._constants import DATA_WORKER_NAME

if __name__ == "__main__":
    source = data.scan_image_folder(sys.argv[1], image_size=16)
    pipe = data.TrainPipeline(source, 8, seed=0, workers=1, transform=data.TrainTransform((16, 16)))
    stream = pipe.batches()
    next(stream)
    next(stream)
    (worker,) = [p for p in multiprocessing.active_children() if p.name.startswith(DATA_WORKER_NAME)]
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    status = Path(f"/proc/{worker.pid}/status").read_text().splitlines()
    rss = [line for line in status if line.startswith("VmRSS")]
    stream.close()
    print("jax" if ("jaxlib" in maps or "libjax" in maps) else "no-jax", int(rss[0].split()[1]) // 1024)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_data_worker_stays_light_under_a_main_script_that_imports_the_package(tmp_path, mnist_folder):
    """multiprocessing's spawn runs the parent's main script again in each worker (as `__mp_main__`) before
    any code of ours; the `cait-eqx` command's script imports `cait_eqx`, whose checking hook, once on, makes
    the worker's first checked function import JAX (about 185 MB instead of 45; as `cait-eqx train` did until
    this test). The package keeps its hook off in a process named as its data workers. Wrong would be JAX
    mapped into the worker of such a script."""
    script = tmp_path / "main.py"
    script.write_text(_MAIN_THAT_IMPORTS_THE_PACKAGE)
    done = subprocess.run([sys.executable, str(script), str(mnist_folder)], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "CAIT_EQX_TYPECHECK"})
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, rss_mb = done.stdout.split()
    assert loaded == "no-jax", f"JAX is loaded in the data worker ({rss_mb} MB)"
    assert int(rss_mb) < 100, f"a data worker holds {rss_mb} MB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and PR_SET_PDEATHSIG")
@pytest.mark.parametrize(
    ("sig", "said"),
    [
        (signal.SIGKILL, r"killed by SIGKILL: on Linux most often the kernel's out-of-memory killer.*fewer "
                         r"of them \(now 2; `--data-workers`"),
        (signal.SIGSEGV, r"crashed \(SIGSEGV\) in native code.*`--check-data`"),
    ],
    ids=["SIGKILL", "SIGSEGV"],
)
def test_a_data_worker_that_dies_stops_the_stream_with_what_happened(mnist_folder, sig, said):
    """A worker that dies is seen at once: the error says how it died and what to change, and keeps the exit
    status. Wrong would be a hang, or a bare "terminated unexpectedly"."""
    source = data.scan_image_folder(mnist_folder, image_size=16)
    stream = TrainPipeline(source, 8, seed=0, workers=2).batches()
    try:
        next(stream)
        (victim, _) = _data_workers()
        os.kill(victim.pid, sig)
        started = time.monotonic()
        with pytest.raises(data.DataWorkerError, match=said) as caught:
            for _ in range(10_000):  # the workers' buffers drain, then the dead one's turn comes
                next(stream)
        assert caught.value.exit_code == -sig and time.monotonic() - started < 60
    finally:
        stream.close()
    assert _data_workers() == []  # the live worker is stopped too


def test_a_dead_worker_of_the_check_pass_is_told_with_its_cause():
    from cait_eqx.data._workers import worker_died

    died = worker_died(3, 1, "reading every image once (the --check-data pass)")
    assert died.exit_code == 3 and "the --check-data pass): it exited with status 3" in str(died)
    assert 'without `if __name__ == "__main__":`' in str(died)  # the usual cause of a status
    assert pickle.loads(pickle.dumps(died)).exit_code == 3  # crosses processes as BadImageError does


@pytest.mark.slow
def test_a_script_without_the_main_guard_is_told_what_is_missing_not_left_waiting(tmp_path, mnist_folder):
    """spawn imports the script again in each worker; unguarded, the worker's own pipeline fails to start and
    it exits. Wrong would be a trainer that waits for it, or an error that does not name the missing guard."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\nfrom cait_eqx import data\n"
        f"source = data.scan_image_folder({str(mnist_folder)!r}, image_size=16)\n"
        "next(data.TrainPipeline(source, 8, seed=0, workers=1).batches())\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cait_eqx.data._workers.DataWorkerError: A data worker process died"), last
    assert 'status 1: code run in the worker ended it (its traceback is above). Most often a script that ' \
        'trains without `if __name__ == "__main__":`' in last


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cli_run_whose_data_worker_dies_stops_with_one_line_and_a_resume_hint(tmp_path, mnist_folder):
    out = tmp_path / "run"
    tag = uuid.uuid4().hex
    env = {**os.environ, "CAIT_EQX_TEST_TAG": tag}
    program = Path(sys.executable).with_name("cait-eqx")  # the tests' own environment's console script
    program = str(program) if program.is_file() else shutil.which("cait-eqx")
    # 64-pixel images in patches of 16 (a 16-token model): 32 KB batches, which travel in shared memory.
    cmd = [program, "train", "--dataset", f"folder:{mnist_folder}", "--image-size", "64", "--patch-size",
           "16", "--batch-size", "8", "--epochs", "100000", "--data-workers", "1", "--no-check-data",
           "--log-every", "1", "--checkpoint-every", "5", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        workers = []
        for pid in _tagged_processes(f"CAIT_EQX_TEST_TAG={tag}"):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "resource_tracker" not in err and "leaked" not in err, err[-3000:]  # no shared memory left
    (line,) = [line for line in err.splitlines() if line.startswith("cait-eqx train: stopped:")]
    assert "A data worker process died while preparing training batches: it was killed by SIGKILL" in line
    assert line.endswith(f"continue with cait-eqx train --resume {out}")


# ---------------------------------------------------------------------------------- a worker that hangs


def _stuck_file(path: Path) -> bytes:
    """Make `path` (a listed image) a named pipe without a writer: opening it blocks for ever, as a file of a
    stalled network file system does. Returns the file's bytes, to put back."""
    content = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return content


def _release(path: Path) -> None:
    """Let a reader blocked on the pipe `path` go on (it then reads an empty file)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left
        pass


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="named pipes, SIGKILL")
def test_a_worker_stuck_in_a_read_stops_fit_naming_the_batch_keeping_a_checkpoint_and_it_resumes(
    tmp_path, mnist_folder
):
    """A read that never returns (a named pipe where a PNG was listed) must not hang the trainer: after
    `data_timeout` it stops with a `DataWorkerError` naming the batch and the file, its workers gone, the
    steps done checkpointed; once the file is back, resuming continues exactly. Wrong would be a trainer
    that waits for ever, an error without the file, a worker left blocked, or lost steps."""
    import jax.random as jr

    import cait_eqx
    from cait_eqx.training import TrainConfig, fit, list_checkpoints

    folder = tmp_path / "folder"
    shutil.copytree(mnist_folder, folder)
    source = data.scan_image_folder(folder, image_size=16)
    config = TrainConfig(epochs=1, batch_size=8, log_every=1, data_workers=1, data_timeout=1.5,
                         check_data=False, checkpoint_every=100)
    pipeline = TrainPipeline(source, 8, seed=config.seed)
    batch = [source.describe(int(i)) for i in pipeline.batch_examples(3)]  # after the workers started
    stuck = Path(batch[5])
    content = _stuck_file(stuck)
    model = cait_eqx.CaiT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=1, key=jr.key(0))
    run = tmp_path / "run"
    started = time.monotonic()
    try:
        with pytest.raises(data.DataWorkerError, match=r"Training batch 3 \(epoch 0, batch 3 of 7\) did not "
                           r"come from its 1 data worker\(s\) in 1.5 s") as caught:
            fit(model, source, None, config, key=jr.key(1), run_dir=run, progress=False,
                handle_signals=False)
        assert time.monotonic() - started < 120
        error = caught.value
        assert (error.batch, error.epoch, error.index, error.exit_code) == (3, 0, 3, None)
        assert error.paths == tuple(batch) and f"Its files: {', '.join(batch[:4])} and 4 more." in str(error)
        deadline = time.monotonic() + 10
        while _data_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _data_workers() == []  # killed: none is left blocked on the pipe
        (kept,) = list_checkpoints(run / "checkpoints")
        assert (kept.step, kept.epoch, kept.batch_index) == (3, 0, 3)  # the three steps done
    finally:
        _release(stuck)
        stuck.unlink()
        stuck.write_bytes(content)
    resumed = fit(model, source, None, config, key=jr.key(1), run_dir=run, resume=True, progress=False,
                  handle_signals=False)
    whole = fit(model, source, None, config, key=jr.key(1), progress=False, handle_signals=False)
    assert resumed.status == "completed" and resumed.step == 7
    for a, b in zip(jax_leaves(resumed.model), jax_leaves(whole.model), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(model):
    import equinox as eqx
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="named pipes, SIGKILL")
@pytest.mark.parametrize("workers", [0, 1])
def test_the_check_pass_stops_on_a_read_that_never_returns_naming_the_files(tmp_path, mnist_folder, workers):
    """`--check-data` reads every file first: a file that blocks there must stop it after the timeout too,
    naming the files of the chunk that did not come (with workers, none left behind)."""
    folder = tmp_path / "folder"
    shutil.copytree(mnist_folder, folder)
    source = data.scan_image_folder(folder, image_size=16)
    stuck = Path(source.describe(25))
    content = _stuck_file(stuck)
    started = time.monotonic()
    try:
        said = r"Reading images 20 to 39 of folder \(the --check-data pass\) did not finish in 1 s"
        with pytest.raises(data.DataWorkerError, match=said) as caught:
            data.find_bad_images(source, workers=workers, chunk=20, timeout=1.0)
        assert time.monotonic() - started < 90
        assert caught.value.paths == tuple(source.describe(i) for i in range(20, 40))
        if workers:
            deadline = time.monotonic() + 10
            while _data_workers() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _data_workers() == []
    finally:
        _release(stuck)  # without workers, the thread blocked in `open` goes on, and ends
        deadline = time.monotonic() + 10
        reading = lambda: any(t.name == "cait-eqx-prefetch" for t in threading.enumerate())  # noqa: E731
        while reading() and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck.unlink()
        stuck.write_bytes(content)


def _wait_for_reader_threads() -> None:
    """After `_release`: the thread that was blocked in `open` goes on, and ends."""
    deadline = time.monotonic() + 10
    reading = lambda: any(t.name == "cait-eqx-prefetch" for t in threading.enumerate())  # noqa: E731
    while reading() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="named pipes")
def test_a_held_out_image_that_never_reads_stops_fit_naming_the_eval_batch_and_keeps_the_steps(
    tmp_path, mnist_folder
):
    """The evaluation of a lazy held-out folder during training is bounded by `data_timeout` too: a held-out
    file that blocks when opened (a named pipe) stops `fit` with a `DataWorkerError` naming the evaluation
    batch and its files, after about `data_timeout` seconds, with the epoch's steps checkpointed. Wrong would
    be a trainer that waits for ever at the end of the epoch, an error without the file, or lost steps."""
    import jax.random as jr

    import cait_eqx
    from cait_eqx.training import TrainConfig, fit, list_checkpoints

    folder = tmp_path / "folder"
    shutil.copytree(mnist_folder, folder)
    source = data.scan_image_folder(folder, image_size=16)
    train, test = source.subset(np.arange(0, 60, 2), "train"), source.subset(np.arange(1, 60, 2), "test")
    config = TrainConfig(epochs=1, batch_size=8, eval_batch_size=8, data_workers=0, data_timeout=1.0,
                         check_data=False, checkpoint_every=100, log_every=100)
    stuck = Path(test.describe(13))  # in evaluation batch 1 (images 8 to 15)
    content = _stuck_file(stuck)
    model = cait_eqx.CaiT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=1, key=jr.key(0))
    run = tmp_path / "run"
    try:
        with pytest.raises(data.DataWorkerError, match=r"Evaluation batch 1 of 4 \(images 8 to 15 of test\) "
                           r"was not read in 1 s") as caught:
            fit(model, train, test, config, key=jr.key(1), run_dir=run, progress=False, handle_signals=False)
        error = caught.value
        assert error.paths == tuple(test.describe(i) for i in range(8, 16))
        assert str(stuck) in error.paths and "Its files: " in str(error) and "and 4 more." in str(error)
        (kept,) = list_checkpoints(run / "checkpoints")
        assert kept.step == 3  # the epoch's three steps (30 images, batches of 8) are kept
    finally:
        _release(stuck)
        _wait_for_reader_threads()
        stuck.unlink()
        stuck.write_bytes(content)


def test_eval_batches_with_a_timeout_give_what_they_give_without_one(mnist_folder):
    """The bounded read (in a thread) must not change the batches: same images, labels and padding."""
    source = data.scan_image_folder(mnist_folder, image_size=16).subset(np.arange(0, 60, 7), "some")
    plain = list(data.eval_batches(source, 4))
    bounded = list(data.eval_batches(source, 4, timeout=30))
    assert len(plain) == len(bounded) == 3
    for a, b in zip(plain, bounded, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="named pipes")
def test_cli_run_whose_data_worker_hangs_stops_with_one_line_a_checkpoint_and_a_resume_hint(
    tmp_path, mnist_folder
):
    """`cait-eqx train` on a folder one of whose files starts to block mid-run (swapped for a named pipe once
    training runs, so the next epoch's read of it hangs): one line, exit 1, the steps done checkpointed."""
    folder = tmp_path / "folder"
    shutil.copytree(mnist_folder, folder)
    out = tmp_path / "run"
    program = Path(sys.executable).with_name("cait-eqx")
    program = str(program) if program.is_file() else shutil.which("cait-eqx")
    # 64-pixel images in patches of 16 (a 16-token model): 32 KB batches, which travel in shared memory.
    cmd = [program, "train", "--dataset", f"folder:{folder}", "--image-size", "64", "--patch-size", "16",
           "--batch-size", "8", "--epochs", "100000", "--data-workers", "1", "--no-check-data",
           "--data-timeout", "2", "--log-every", "1", "--checkpoint-every", "1000", "--no-progress",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A file of the run's training split (the held-out fifth is read by the evaluation, in the trainer).
    train, _ = data.train_test_split(data.scan_image_folder(folder, image_size=16), test_fraction=0.2, seed=0)
    stuck = Path(train.describe(0))
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        content = _stuck_file(stuck)  # read again within the next epoch
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _release(stuck)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "resource_tracker" not in err and "leaked" not in err, err[-3000:]  # no shared memory left
    (line,) = [line for line in err.splitlines() if line.startswith("cait-eqx train: stopped:")]
    assert re.search(r"stopped: Training batch (\d+) \(epoch \d+, batch \d+ of 6\) did not come from its 1 "
                     r"data worker\(s\) in 2 s", line), line
    assert line.endswith(f"continue with cait-eqx train --resume {out}")
    from cait_eqx.training import list_checkpoints

    batch = int(re.search(r"Training batch (\d+)", line).group(1))
    assert list_checkpoints(out / "checkpoints")[-1].step == batch  # every step done is kept
    assert content


# ------------------------------------------------------------------------------ evaluation as timm does it


@pytest.mark.torch  # timm's create_transform is the reference
def test_the_trainer_evaluates_a_folder_as_timms_validate_does(mnist_folder):
    """A folder is evaluated as timm's `validate.py` evaluates a CaiT: shorter side resized to size /
    crop_pct (bicubic), centre crop; default crop_pct 1.0 (CaiT's pretrained configs), `eval_crop_pct` to
    change it. Wrong would be the whole image squashed to the size (what `read` gives), which makes a
    fine-tuned model's accuracy incomparable with timm's on the same folder."""
    import jax.random as jr
    from timm.data import create_transform

    import cait_eqx
    from cait_eqx.training import TrainConfig, TrainSteps, eval_transform, fit

    source = data.scan_image_folder(mnist_folder, image_size=16)
    assert eval_transform(TrainConfig(), source) == data.EvalTransform(16, 1.0, "bicubic")
    assert eval_transform(TrainConfig(), data.load_image_folder(mnist_folder, image_size=16)) is None
    config = TrainConfig(epochs=1, batch_size=20, eval_crop_pct=0.875, data_workers=0, check_data=False)
    transform = eval_transform(config, source)
    assert transform == data.EvalTransform(16, 0.875, "bicubic")
    (images, labels, valid), = data.eval_batches(source, 60, transform)
    assert valid.all() and images.shape == (60, 1, 16, 16)
    timm_eval = create_transform(input_size=(1, 16, 16), crop_pct=0.875, interpolation="bicubic", mean=(0,),
                                 std=(1,))
    for i in (0, 31, 59):
        with Image.open(source.path(i)) as img:
            want = timm_eval(img.convert("L")).numpy()  # in [0, 1]: timm's ToTensor of the crop
        np.testing.assert_array_equal(images[i], np.round(want * 255).astype(np.uint8))
    squashed = source.read(np.arange(60))
    assert not np.array_equal(images, squashed)  # a crop, not the whole image resized

    # What the trainer's evaluation feeds the model: its own eval step, watched.
    model = cait_eqx.CaiT(image_size=16, patch_size=4, num_classes=3, dim=16, depth=1, cls_depth=1, heads=2,
                          mlp_dim=32, channels=1, key=jr.key(0))
    steps = TrainSteps.build(config, 3, 3)
    seen = []

    def watched(model, batch):
        seen.append(np.asarray(batch[0]))
        return steps.eval_step(model, batch)

    watched_steps = dataclasses.replace(steps, eval_step=watched)
    result = fit(model, source, source, config, key=jr.key(1), progress=False, handle_signals=False,
                 steps=watched_steps)
    assert result.test is not None and len(seen) == 1  # one evaluation (the end of the epoch), one batch
    np.testing.assert_array_equal(seen[0], images)


# ---------------------------------------------------------------------------- batches in shared memory

_SHARED_MEMORY_RUN = '''
import os, signal, sys, threading, time
from pathlib import Path
from cait_eqx import data
from cait_eqx.data import TrainPipeline
from cait_eqx.data._loader import prefetch
from cait_eqx.data._shared import BLOCK_PREFIX


def blocks():
    return {n for n in os.listdir("/dev/shm") if n.startswith(BLOCK_PREFIX)}


def pipeline(source, workers=2):
    # 8 images of 48 x 48: 18 KB a batch, enough to travel in shared memory.
    return TrainPipeline(source, 8, seed=0, workers=workers, transform=data.TrainTransform((48, 48)))


class Watch:
    """The blocks that appear in /dev/shm while it is open, looked at every 5 ms from a thread (a block
    lives from its worker's write to the trainer's read: a look between two batches can miss them all)."""

    def __enter__(self):
        self.seen, self.done = set(), threading.Event()
        self.thread = threading.Thread(target=self._look, daemon=True)
        self.thread.start()
        return self

    def _look(self):
        while not self.done.wait(0.005):
            self.seen |= blocks()

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def say(case, seen):
    print(case, len(seen), len(blocks()), flush=True)


if __name__ == "__main__":
    folder = sys.argv[1]
    source = data.scan_image_folder(folder, image_size=16)
    plain = [b.images for b in pipeline(source, workers=0).batches(stop_epoch=2)]

    seen = set()  # blocks seen in /dev/shm while a stream runs
    for got, want in zip(pipeline(source).batches(stop_epoch=2), plain, strict=True):
        seen |= blocks()
        assert (got.images == want).all()
    say("end", seen)

    stream = pipeline(source).batches()
    next(stream)
    time.sleep(1.0)  # the workers fill their buffers
    seen = blocks()
    stream.close()
    say("stopped", seen)

    stream = pipeline(source).batches()
    next(stream)
    time.sleep(1.0)
    seen = blocks()
    worker = next(p for p in __import__("multiprocessing").active_children() if "data-worker" in p.name)
    os.kill(worker.pid, signal.SIGKILL)
    try:
        for _ in range(10_000):
            next(stream)
    except data.DataWorkerError:
        pass
    stream.close()
    say("died", seen)

    # A file that blocks when opened (a named pipe), read in batch 3 (worker 1's second): `fit`'s timeout
    # path, when worker 0 has made batches 4 and 5 ahead, which nobody takes.
    pipe = pipeline(source)
    path = Path(source.describe(int(pipe.batch_examples(3)[0])))
    content = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    try:
        batches = prefetch(pipe.batches(), size=2, timeout=2.0, startup=60.0,
                           on_timeout=lambda given: pipe.stalled(given, 2.0))
        with Watch() as watch:
            try:
                for _ in batches:
                    pass
            except data.DataWorkerError:
                pass
        batches.close()
    finally:
        path.unlink()
        path.write_bytes(content)
    say("timeout", watch.seen)

    # Left open: the interpreter's exit stops its workers and removes its blocks (checked by the test).
    stream = pipeline(source).batches()
    next(stream)
    time.sleep(1.0)
    say("exit", blocks())
'''


@pytest.mark.slow  # five streams in a fresh interpreter, 20-40 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists /dev/shm; named pipes, SIGKILL")
def test_batches_travel_in_shared_memory_and_no_block_is_left_however_the_stream_ends(tmp_path, mnist_folder):
    """The workers hand their batches over in shared memory blocks, which the trainer removes: none is left
    in /dev/shm after a stream that ends, one its consumer stops, one whose worker dies, one stopped by the
    timeout (a worker stuck in a read), or one still open when the interpreter exits, and multiprocessing's
    resource tracker finds none to warn about when the process exits. Wrong would be blocks that pile up in
    /dev/shm (memory the system gets back only at a reboot), or the same bytes through another route (no
    block seen while the stream runs)."""
    from cait_eqx.data._shared import BLOCK_PREFIX

    folder = tmp_path / "folder"
    shutil.copytree(mnist_folder, folder)
    script = tmp_path / "run.py"
    script.write_text(_SHARED_MEMORY_RUN)
    before = {n for n in os.listdir("/dev/shm") if n.startswith(BLOCK_PREFIX)}
    done = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict((line.split()[0], line.split()[1:]) for line in done.stdout.splitlines())
    assert set(lines) == {"end", "stopped", "died", "timeout", "exit"}, done.stdout
    for case, (seen, left) in lines.items():
        assert int(seen) > 0, f"{case}: no batch went through shared memory"
        assert int(left) == 0 or case == "exit", f"{case}: {left} blocks left in /dev/shm"
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr[-3000:]
    after = {n for n in os.listdir("/dev/shm") if n.startswith(BLOCK_PREFIX)}
    assert after <= before  # nothing of this run's, even after its exit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists /dev/shm")
def test_sweep_removes_a_block_whose_worker_died_before_giving_it_a_size():
    """A worker killed between creating a block and sizing it leaves an empty file in /dev/shm, which
    `SharedMemory` cannot map ("cannot mmap an empty file"). The sweep after a dead worker must remove it
    like any other block. Wrong would be the sweep raising ValueError over the worker's DataWorkerError (as a
    CI run once did) or leaving the empty block behind."""
    import _posixshmem

    from cait_eqx.data._shared import block_name, new_prefix, sweep

    prefix = new_prefix()
    unsized, sized, absent = (block_name(prefix, 1, place) for place in range(3))
    os.close(_posixshmem.shm_open("/" + unsized, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600))
    block = shared_memory.SharedMemory(name=sized, create=True, size=1 << 14)
    block.close()
    try:
        assert sweep([unsized, sized, absent]) == 2
    finally:
        for name in (unsized, sized):
            if os.path.exists(f"/dev/shm/{name}"):
                os.unlink(f"/dev/shm/{name}")
    assert not {unsized, sized} & set(os.listdir("/dev/shm"))
