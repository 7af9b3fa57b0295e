"""The streaming data pipeline measured: memory that stays flat as an image folder grows, and the images per
second it delivers against those the training step consumes.

Three parts (`--only`), each run in fresh processes so that one part's memory and threads do not leak into
another's figures:

- `rss`: two folders of small PNGs (`--sizes`, default 10,000 and 100,000 images: MNIST-5k digits from
  `cait_eqx.data.load_mnist()` written out again and again with random shifts, one folder per class),
  generated once into `--cache` and reused. For each folder, `cait-eqx train --dataset folder:PATH
  --image-size 16` (the default small model) runs in a fresh process for `--rss-steps` steps, without an
  evaluation, then (`--epoch-runs`) for one whole epoch, which ends with the evaluation of the held-out
  fifth, read in the trainer's own process. While it runs, this script samples `/proc` every
  `--interval` seconds: each process's own peak resident set (`VmHWM`, the kernel's high-water mark) for
  the trainer and every process below it (the data workers and multiprocessing's resource tracker),
  and the sum of their resident sets and of their proportional sets (`Pss`, shared pages split between
  the processes sharing them). The trainer's peak is also read exactly when it exits, from `os.wait4`
  (where it exceeds this script's own: Linux carries the launcher's high-water mark into the child).
  Beside it, a fresh process lists each folder (`scan_image_folder` plus the run's held-out split) and
  reports what the lazy source keeps in memory per file.
- `digits` and `deit`: throughput. `digits` is the default `cait-eqx train` (16×16, batch 64, the default
  model), with the data from scikit-learn's digits in memory and from the 10,000-PNG folder; `deit` is
  `cait_xxs24_224` at 224×224 on `--jpegs` RGB JPEGs of 256×256 (MNIST digits upsampled and coloured),
  with DeiT's augmentation (random-resized crop and RandAugment in the data workers, repeated
  augmentation, random erasing, mixup, cutmix, flips). One fresh process per data source measures three
  things. The training step alone, on one real batch: compiled by a first call, then twice (before and
  after the rest) a few untimed calls and `--digits-steps` / `--deit-steps` timed ones, back to back. The
  pipeline alone (`TrainPipeline.batches`, nothing else running) with each of `--workers` (default 0, 1
  and 2): the first batch (worker start-up included) and `--warmup` more untimed, then
  `--digits-batches` / `--deit-batches` timed. And `fit` itself with the same workers, both at once on the
  same cores, its step the one compiled above: at least as many steps, timed after `--warmup` + 1
  (each end of the window a step after which `fit` has nothing due, so that its stamp is exact).

Run `python benchmarks/data_pipeline.py --help`; the results are in `benchmarks/README.md` ("Data pipeline").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

PARTS = ("rss", "digits", "deit")
DEIT_AUGMENT = dict(
    resized_crop=True,
    auto_augment="rand-m9-mstd0.5-inc1",
    aug_repeats=3,
    reprob=0.25,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    flip=True,
)
_MB = 2**20
# What the generator writes, in its marker file: a cached folder of another layout is not reused.
LAYOUT = "mnist5k-round-robin-v1"


# --- generated data ------------------------------------------------------------------------------------


def png_folder(cache: Path, count: int) -> Path:
    return cache / f"mnist-png-{count}"


def jpeg_folder(cache: Path, count: int, side: int) -> Path:
    return cache / f"mnist-rgb{side}-jpeg-{count}"


def _marker(folder: Path) -> Path:
    return folder / ".complete.json"  # hidden and outside the class folders: never read as an image


def generate(spec: dict) -> dict:
    """Write `spec["count"]` images into `spec["folder"]` (a worker; see `ensure_folder`)."""
    import numpy as np
    from PIL import Image

    from cait_eqx.data import load_mnist

    folder, count, kind = Path(spec["folder"]), spec["count"], spec["kind"]
    mnist = load_mnist()
    digits, labels = mnist.images[:, 0], mnist.labels
    rng = np.random.default_rng(spec["seed"])
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    for name in mnist.class_names:
        (partial / name).mkdir(parents=True)
    started = time.perf_counter()
    # MNIST-5k is sorted by class: go through it shuffled and round-robin over the classes (the k-th digit of
    # every class, then the (k+1)-th), so that any count of at least 10 has every class, about equally.
    shuffled = rng.permutation(len(digits))
    rank = np.zeros(len(digits), np.int64)
    for c in np.unique(labels):
        rank[labels[shuffled] == c] = np.arange(np.sum(labels == c))
    order = shuffled[np.lexsort((labels[shuffled], rank))]
    for i in range(count):
        j = order[i % len(digits)]
        if kind == "png":
            # A copy of digit j moved by up to 3 pixels each way (zeros shifted in), as a greyscale PNG.
            dy, dx = rng.integers(0, 7, size=2)
            pixels = np.pad(digits[j], 3)[dy : dy + 28, dx : dx + 28]
            Image.fromarray(pixels).save(partial / mnist.class_names[labels[j]] / f"{i:06d}.png")
        else:
            # Upsampled to side × side and coloured: ink and paper of random colours, so that RandAugment's
            # colour operations have something to change. JPEG, as ImageNet's files are.
            side = spec["side"]
            ink = np.asarray(Image.fromarray(digits[j]).resize((side, side), Image.BICUBIC), np.float32) / 255
            fg, bg = rng.uniform(0, 255, size=(2, 3))
            rgb = (bg + (fg - bg) * ink[..., None]).clip(0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(partial / mnist.class_names[labels[j]] / f"{i:06d}.jpg", quality=90)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_blocks * 512 for f in partial.rglob("*") if f.is_file())
    info = dict(
        kind=kind,
        count=count,
        seed=spec["seed"],
        side=spec.get("side"),
        layout=spec["layout"],
        seconds=seconds,
        disk_mb=size / _MB,
    )
    _marker(partial).write_text(json.dumps(info))
    os.rename(partial, folder)
    return info


def ensure_folder(folder: Path, spec: dict, args) -> dict:
    """The folder's generation record: read from the cache when it matches `spec`, else written now (in a
    fresh process, under the lock)."""
    marker = _marker(folder)
    if marker.is_file():
        info = json.loads(marker.read_text())
        if all(info.get(k) == v for k, v in spec.items()):
            return dict(info, generated_now=False, folder=str(folder))
        # Written by this script with other settings (its marker says so): replaced.
        print(f"{folder} was generated with other settings ({info}); writing it again", file=sys.stderr)
        shutil.rmtree(folder)
    if folder.exists():
        raise SystemExit(f"{folder} exists but is incomplete (no {marker.name}): remove it.")
    if spec["count"] < 10:
        raise SystemExit(f"a generated folder needs at least 10 images (one per class), not {spec['count']}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating {spec['count']} {spec['kind']} files into {folder} ...", file=sys.stderr, flush=True)
    info = run_worker(dict(spec, what="generate", folder=str(folder)), args)
    return dict(info, generated_now=True, folder=str(folder))


# --- workers -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(args):
    """Hold `--lock` while inside; the time spent waiting for it is added up (and left out of the totals)."""
    asked = time.perf_counter()
    with bench.holding(args.lock):
        args.lock_wait_s += time.perf_counter() - asked
        yield


def run_worker(spec: dict, args) -> dict:
    """`spec` measured in a fresh process (holding the lock while it runs); its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    with locked(args):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def file_list(spec: dict) -> dict:
    """What a lazy image folder holds in memory, per file: the listing, the run's split of it, the peak of
    the Python objects made while listing, and what is pickled into each data worker."""
    import pickle
    import tracemalloc

    import numpy as np

    from cait_eqx.data import scan_image_folder, train_test_split

    folder = Path(spec["folder"])
    # Once untimed and untraced, so that imports (PIL, scikit-learn for the split) and the file system's
    # cold caches count in neither the time nor the memory below.
    train_test_split(scan_image_folder(folder, image_size=16), test_fraction=0.2, seed=0)
    tracemalloc.start()
    started = time.perf_counter()
    source = scan_image_folder(folder, image_size=16)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    train, test = train_test_split(source, test_fraction=0.2, seed=0)
    n = len(source)
    order = np.random.default_rng([0, 0]).permutation(len(train))  # what a worker caches: one epoch's order
    return dict(
        count=n,
        scan_s=seconds,
        name_bytes=int(source.files.dtype.itemsize),
        # The source's own arrays: names (fixed-width bytes) and labels; the split adds indices and labels.
        listing_bytes_per_file=(source.files.nbytes + source.labels.nbytes) / n,
        split_bytes_per_file=sum(p.indices.nbytes + p.labels.nbytes for p in (train, test)) / n,
        scan_peak_bytes_per_file=peak / n,  # every allocation traced while listing, at its highest
        order_bytes_per_file=order.nbytes / n,
        pickled_train_bytes_per_file=len(pickle.dumps(train)) / n,
    )


def _read_late(step: int, config, steps_per_epoch: int) -> int:
    """The first step from `step` on whose metrics `fit` reads after calling the next step: nothing is due
    after it (no log, no epoch's end, no checkpoint; as `fit`'s loop, `cait_eqx.training._fit`, decides,
    from step 0)."""
    while (
        step % config.log_every == 0
        or step % steps_per_epoch == 0
        or (config.checkpoint_every and step % config.checkpoint_every == 0)
    ):
        step += 1
    return step


def throughput(spec: dict) -> dict:
    """Train step alone, pipeline alone and `fit` (both), for one data source and recipe (a worker)."""
    import dataclasses

    import equinox as eqx
    import jax
    import jax.random as jr

    import cait_eqx
    from cait_eqx.data import TrainPipeline
    from cait_eqx.parallel import shard_batch, shard_state
    from cait_eqx.training import (
        DEFAULT_MODEL,
        RunConfig,
        TrainConfig,
        TrainSteps,
        build_model,
        fit,
        load_run_data,
        train_transform,
    )

    train_config = TrainConfig(batch_size=spec["batch"], **spec["augment"])
    # The model as `cait-eqx train` builds it: a variant's architecture (its classes from the data), given
    # keywords, or the default small model.
    if spec.get("model"):
        model_kwargs = cait_eqx.variant_config(spec["model"])
        model_kwargs.pop("num_classes")
    else:
        model_kwargs = dict(DEFAULT_MODEL, **(spec.get("model_kwargs") or {}))
    model_kwargs["image_size"] = spec["image_size"]
    run = RunConfig(
        model=model_kwargs, dataset=spec["dataset"], image_size=spec["image_size"], train=train_config
    )
    train, _ = load_run_data(run)
    transform = train_transform(train_config, train.image_size)

    def pipeline(workers: int) -> TrainPipeline:
        return TrainPipeline(
            train,
            train_config.batch_size,
            seed=train_config.seed,
            transform=transform,
            workers=workers,
            repeats=train_config.aug_repeats,
            bad_images=train_config.bad_images,
        )

    # The step alone, on one real batch of this recipe: compiled by its first call, then twice (before and
    # after the rows below, so that neither the process's first minute nor what the rows leave behind
    # decides alone) `step_warmup` untimed calls and `steps` timed ones, dispatched back to back as a
    # training loop does (each on its own copy of the batch, put on the device beforehand: the step
    # donates it), timed to the end of the last one.
    probe = pipeline(0)
    batches = probe.batches()
    first = next(batches)
    batches.close()
    steps = TrainSteps.build(train_config, probe.steps_per_epoch, train.num_classes)
    key = jr.key(train_config.seed)
    model = build_model(run, train, key=key)
    opt_state = steps.optim.init(eqx.filter(model, eqx.is_array))
    state = list(shard_state((model, opt_state), steps.mesh))
    calls = [0]

    def run_steps(count: int) -> float:
        device_batches = [shard_batch((first.images, first.labels), mesh=steps.mesh) for _ in range(count)]
        jax.block_until_ready(device_batches)
        t = time.perf_counter()
        for batch in device_batches:
            state[0], state[1], _ = steps.train_step(*state, batch, jr.fold_in(key, calls[0]))
            calls[0] += 1
        jax.block_until_ready(state)
        return time.perf_counter() - t

    first_call_s = run_steps(1)
    passes = []

    def step_alone() -> None:
        warmup_s = run_steps(spec["step_warmup"])
        passes.append(dict(warmup_s=warmup_s, timed_s=run_steps(spec["steps"])))

    step_alone()

    rows = []
    for workers in spec["workers"]:
        pipe = pipeline(workers)
        started = time.perf_counter()
        stream = pipe.batches()
        next(stream)
        first_batch_s = time.perf_counter() - started
        for _ in range(spec["warmup"]):
            next(stream)
        t0 = time.perf_counter()
        for _ in range(spec["batches"]):
            next(stream)
        seconds = time.perf_counter() - t0
        stream.close()
        pipeline_ips = spec["batches"] * train_config.batch_size / seconds

        # `fit` with these workers, its compiled step the one timed above (the step ignores `data_workers`).
        # `on_step(k)` comes when step k's metrics reach the host. `eqx.filter_jit` returns only once a step
        # is done, and `fit` usually asks for step k's metrics after it has called step k + 1: then the
        # stamp is the end of step k + 1. Where something is due after step k (a log, an epoch's end, a
        # checkpoint, the last step), `fit` reads them at once: that stamp is the end of step k itself. The
        # window runs between two stamps of the first kind, past the warm-up and at least `fit_steps`
        # apart: both one step late, so the difference is exactly `end - begin` steps, and everything `fit`
        # does in between (its logs, its epochs' ends) is in it.
        config = dataclasses.replace(train_config, data_workers=workers)
        shared = dataclasses.replace(steps, config=config)
        begin = _read_late(spec["warmup"] + 1, config, steps.steps_per_epoch)
        end = _read_late(begin + spec["fit_steps"], config, steps.steps_per_epoch)
        stamps: dict[int, float] = {}
        started = time.perf_counter()
        fit(
            build_model(run, train, key=key),
            train,
            None,
            config,
            key=key,
            max_steps=end + 2,  # step end + 1 is called, and is not the last
            progress=False,
            handle_signals=False,
            steps=shared,
            on_step=lambda s, _, stamps=stamps: stamps.__setitem__(s, time.perf_counter()),
        )
        fit_wall = time.perf_counter() - started
        fit_ips = (end - begin) * train_config.batch_size / (stamps[end] - stamps[begin])
        rows.append(
            dict(
                workers=workers,
                pipeline_images_per_s=pipeline_ips,
                pipeline_batches=spec["batches"],
                first_batch_s=first_batch_s,
                fit_images_per_s=fit_ips,
                fit_timed_steps=end - begin,
                fit_wall_s=fit_wall,
            )
        )
        print(
            f"  workers {workers}: pipeline {pipeline_ips:.0f} img/s, fit {fit_ips:.0f} img/s",
            file=sys.stderr,
            flush=True,
        )
    step_alone()
    timed_s = sum(p["timed_s"] for p in passes)
    step = dict(
        first_call_s=first_call_s,
        passes=passes,
        timed_steps=spec["steps"] * len(passes),
        timed_s=timed_s,
        step_s=timed_s / (spec["steps"] * len(passes)),
        images_per_s=spec["steps"] * len(passes) * train_config.batch_size / timed_s,
    )
    return dict(
        part=spec["part"],
        source=spec["source"],
        model=spec.get("model") or ("a smaller one (--quick)" if spec.get("model_kwargs") else "default"),
        image_size=spec["image_size"],
        batch=train_config.batch_size,
        augment=spec["augment"],
        transform=None if transform is None else type(transform).__name__,
        train_examples=len(train),
        step=step,
        rows=rows,
    )


def worker(spec: dict) -> dict:
    what = spec["what"]
    if what == "generate":
        return generate(spec)
    if what == "file_list":
        return file_list(spec)
    if what == "throughput":
        return throughput(spec)
    raise SystemExit(f"unknown worker {what!r}")


# --- the trainer, watched ------------------------------------------------------------------------------


def _children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    children, found, todo = _children_by_parent(), [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _read_kb(path: str, fields: tuple[str, ...]) -> dict[str, int] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            out[name] = int(rest.split()[0])
    return out


def _role(pid: int, trainer: int) -> str:
    if pid == trainer:
        return "trainer"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    return "data worker" if "multiprocessing" in cmdline else "other"


def watch_training(cmd: list[str], log_path: Path, interval: float) -> dict:
    """Run `cmd` and sample the memory of it and its descendants until it exits (see the module doc)."""
    own_peak = bench._proc_status_mb("VmHWM")  # a child's ru_maxrss starts from its parent's at exec
    peaks: dict[int, tuple[str, float]] = {}
    peak_sum_rss = peak_sum_pss = 0.0
    samples = 0
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while True:
        # Reaped here, not by Popen, so that its resource usage comes back with it.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        total_rss = total_pss = 0.0
        for p in [proc.pid, *_descendants(proc.pid)]:
            status_kb = _read_kb(f"/proc/{p}/status", ("VmHWM", "VmRSS"))
            if not status_kb or "VmHWM" not in status_kb:
                continue  # gone, or a zombie
            role = peaks.get(p, (None,))[0] or _role(p, proc.pid)
            peaks[p] = (role, max(peaks.get(p, (role, 0.0))[1], status_kb["VmHWM"] / 1024))
            total_rss += status_kb["VmRSS"] / 1024
            total_pss += (_read_kb(f"/proc/{p}/smaps_rollup", ("Pss",)) or {}).get("Pss", 0) / 1024
        peak_sum_rss, peak_sum_pss = max(peak_sum_rss, total_rss), max(peak_sum_pss, total_pss)
        samples += 1
        time.sleep(interval)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{log_path.read_text()[-4000:]}")
    by_role: dict[str, list[float]] = {}
    for role, peak in peaks.values():
        by_role.setdefault(role, []).append(peak)
    # Linux carries a process's high-water mark across exec, so wait4's figure is the larger of the trainer's
    # own peak and this process's resident set when it forked: exact (to the end of the run) where it is
    # above this process's peak, and otherwise not the trainer's at all, which then has the sampled one.
    exited_peak, sampled_peak = usage.ru_maxrss / 1024, max(by_role.get("trainer", [0.0]))
    exact = exited_peak > own_peak
    return dict(
        wall_s=wall,
        samples=samples,
        trainer_peak_mb=exited_peak if exact else sampled_peak,
        trainer_peak_from="wait4" if exact else "samples",
        trainer_sampled_peak_mb=sampled_peak,
        worker_peaks_mb=by_role.get("data worker", []),  # in the order they started
        other_peaks_mb={r: v for r, v in by_role.items() if r not in ("trainer", "data worker")},
        peak_sum_rss_mb=peak_sum_rss,
        peak_sum_pss_mb=peak_sum_pss,
        watcher_peak_mb=own_peak,
    )


def _run_progress(run_dir: Path) -> dict:
    """Steps done, test images read and training images/s of a finished run, from its `metrics.jsonl`.

    The images/s is the median over the run's logging windows after the first (which holds the compilation);
    a run stopped by `--max-steps` writes no `summary.json`, so this reads the metrics and the checkpoints'
    names for every run alike.
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in records if r.get("split") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    summary = run_dir / "summary.json"
    tested = json.loads(summary.read_text()).get("test_examples", 0) if summary.is_file() else 0
    rates = [r["images_per_s"] for r in train[1:]] or [r["images_per_s"] for r in train] or [float("nan")]
    # Every run ends with a checkpoint named after its step (`checkpoints/step-00000200.json`).
    saved = [int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.json")]
    return dict(
        steps=max(saved),
        evaluations=len(test),
        test_examples=tested,
        images_per_s=statistics.median(rates),
    )


def _keep(args, results: dict) -> None:
    """Write what is measured so far (a long run loses nothing to a later failure)."""
    results["meta"]["wall_s"] = time.perf_counter() - args.started
    results["meta"]["lock_wait_s"] = args.lock_wait_s
    if args.json:
        bench.write_json_atomic(args.json, results)


def rss_part(args, results: dict) -> None:
    sizes = sorted(args.sizes)
    folders = {count: png_folder(args.cache, count) for count in sizes}
    for count, folder in folders.items():
        results["generated"].append(
            ensure_folder(folder, dict(kind="png", count=count, seed=args.seed, layout=LAYOUT), args)
        )
        _keep(args, results)
    for count, folder in folders.items():
        print(f"[rss] file list of {count} ...", file=sys.stderr, flush=True)
        results["file_list"].append(run_worker(dict(what="file_list", folder=str(folder)), args))
        _keep(args, results)
    # No evaluation within `--rss-steps` (its epochs never reach `--eval-every`); then one epoch, which ends
    # with the evaluation of the held-out fifth.
    runs = [("steps", ["--max-steps", str(args.rss_steps), "--eval-every", "1000000"])]
    if args.epoch_runs:
        runs.append(("epoch", ["--epochs", "1"]))
    entry = os.path.join(os.path.dirname(sys.executable), "cait-eqx")
    for run, flags in runs:
        for count, folder in folders.items():
            print(f"[rss] training on {count} images ({run}) ...", file=sys.stderr, flush=True)
            given = [
                "--dataset",
                f"folder:{folder}",
                "--image-size",
                "16",
                "--data-workers",
                str(args.rss_workers),
                "--seed",
                str(args.seed),
                "--no-progress",
                *flags,
            ]
            with tempfile.TemporaryDirectory(prefix="data-pipeline-run-") as tmp:
                out = Path(tmp) / "run"
                with locked(args):
                    memory = watch_training(
                        [entry, "train", *given, "--out", str(out)], Path(tmp) / "log.txt", args.interval
                    )
                progress = _run_progress(out)
            command = " ".join(["cait-eqx", "train", *given, "--out", "RUN_DIR"])
            results["rss"].append(dict(run=run, folder_images=count, command=command, **progress, **memory))
            _keep(args, results)


def throughput_part(part: str, args, results: dict) -> None:
    common = dict(what="throughput", part=part, workers=args.workers, warmup=args.warmup)
    if part == "digits":
        count = min(args.sizes)
        png = png_folder(args.cache, count)
        results["generated"].append(
            ensure_folder(png, dict(kind="png", count=count, seed=args.seed, layout=LAYOUT), args)
        )
        specs = [
            dict(
                common,
                source=source,
                dataset=dataset,
                image_size=16,
                batch=64,
                augment={},
                model=None,
                # --quick: a smaller model than the default, to keep CI short.
                model_kwargs={"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32} if args.quick else None,
                steps=args.digits_steps,
                step_warmup=5,
                batches=args.digits_batches,
                fit_steps=args.digits_steps,
            )
            for source, dataset in (
                # --quick: the files only (CI's time; reading them is the pipeline's own work).
                *([] if args.quick else [("digits (in memory)", "digits")]),
                (f"{png.name} (PNG files)", f"folder:{png}"),
            )
        ]
    else:
        jpegs = jpeg_folder(args.cache, args.jpegs, args.jpeg_side)
        spec = dict(kind="jpeg", count=args.jpegs, seed=args.seed, side=args.jpeg_side, layout=LAYOUT)
        results["generated"].append(ensure_folder(jpegs, spec, args))
        quick_model = {"patch_size": 8, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
        specs = [
            dict(
                common,
                source=f"{jpegs.name} (JPEG files)",
                dataset=f"folder:{jpegs}",
                image_size=args.deit_size,
                batch=args.deit_batch,
                augment=DEIT_AUGMENT,
                model=None if args.quick else args.deit_model,
                model_kwargs=quick_model if args.quick else None,
                steps=args.deit_steps,
                step_warmup=1,
                batches=args.deit_batches,
                fit_steps=args.deit_steps,
            )
        ]
    _keep(args, results)
    for spec in specs:
        print(f"[{part}] {spec['source']} ...", file=sys.stderr, flush=True)
        results["throughput"].append(run_worker(spec, args))
        _keep(args, results)


# --- tables --------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Machine: {bench.machine_line(meta)}, {meta['cpus']} CPUs ({meta['machine']}); {meta['date'][:10]}; "
        f"whole run {meta.get('wall_s', 0) - meta.get('lock_wait_s', 0):.0f} s (not counting "
        f"{meta.get('lock_wait_s', 0):.0f} s waiting for the CPU lock).",
        "",
    ]
    if results["generated"]:
        lines += ["| folder | files | generation s | MB on disk | this run |", "|---|---|---|---|---|"]
        seen = set()
        for g in results["generated"]:
            if g["folder"] in seen:
                continue
            seen.add(g["folder"])
            lines.append(
                f"| {Path(g['folder']).name} | {g['count']} | {g['seconds']:.1f} | {g['disk_mb']:.0f} | "
                f"{'generated' if g['generated_now'] else 'reused'} |"
            )
        lines.append("")
    if results["file_list"]:
        lines += [
            "| folder images | listing s | bytes per name | source B/file | split B/file | "
            "peak while listing B/file | pickled train split B/file | one epoch's order B/file |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in results["file_list"]:
            lines.append(
                f"| {f['count']} | {f['scan_s']:.2f} | {f['name_bytes']} | "
                f"{f['listing_bytes_per_file']:.1f} | {f['split_bytes_per_file']:.1f} | "
                f"{f['scan_peak_bytes_per_file']:.0f} | "
                f"{f['pickled_train_bytes_per_file']:.1f} | {f['order_bytes_per_file']:.1f} |"
            )
        lines.append("")
    if results["rss"]:
        lines += [
            "| run | folder images | steps | test images read | trainer peak RSS MB | × smallest folder | "
            "data worker peak RSS MB | peak of the sum: RSS MB | PSS MB | wall s | train images/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in dict.fromkeys(r["run"] for r in results["rss"]):
            rows = sorted((r for r in results["rss"] if r["run"] == run), key=lambda r: r["folder_images"])
            base = rows[0]["trainer_peak_mb"]
            for r in rows:
                label = f"{r['steps']} steps" if run == "steps" else "1 epoch + evaluation"
                workers = ", ".join(f"{w:.0f}" for w in r["worker_peaks_mb"]) or "–"
                lines.append(
                    f"| {label} | {r['folder_images']} | {r['steps']} | {r['test_examples']} | "
                    f"{r['trainer_peak_mb']:.0f} | {r['trainer_peak_mb'] / base:.3f}× | {workers} | "
                    f"{r['peak_sum_rss_mb']:.0f} | {r['peak_sum_pss_mb']:.0f} | {r['wall_s']:.1f} | "
                    f"{r['images_per_s']:.0f} |"
                )
        lines.append("")
    if results["throughput"]:
        lines += [
            "| source | model | batch | workers | pipeline images/s | first batch s | step images/s | "
            "pipeline / step | fit images/s | fit / step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in results["throughput"]:
            step = t["step"]["images_per_s"]
            for r in t["rows"]:
                lines.append(
                    f"| {t['source']} | {t['model']} {t['image_size']}×{t['image_size']} | {t['batch']} | "
                    f"{r['workers']} | {r['pipeline_images_per_s']:.0f} | {r['first_batch_s']:.2f} | "
                    f"{step:.1f} | {r['pipeline_images_per_s'] / step:.2f}× | {r['fit_images_per_s']:.1f} | "
                    f"{r['fit_images_per_s'] / step:.2f}× |"
                )
    return "\n".join(lines).rstrip() + "\n"


# --- main ----------------------------------------------------------------------------------------------


def _git_head() -> str | None:
    """The checkout's commit, with `+changes` when the working tree differs from it (the digest in
    `cait_eqx_source_sha256` then says which code was measured)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            cwd=root,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cait_eqx_data_pipeline",
        help="where generated folders are kept, and reused when present (default: %(default)s)",
    )
    p.add_argument(
        "--sizes",
        type=_int_list,
        default=[10_000, 100_000],
        help="images in each PNG folder of the rss part (the smallest also feeds `digits`)",
    )
    p.add_argument("--rss-steps", type=int, default=200, help="training steps of each rss run")
    p.add_argument("--rss-workers", type=int, default=1, help="--data-workers of the rss runs")
    p.add_argument(
        "--epoch-runs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train one whole epoch per folder, ending with its evaluation",
    )
    p.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument("--workers", type=_int_list, default=[0, 1, 2], help="data workers of the throughput rows")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches (and fit steps) after the first")
    p.add_argument("--digits-batches", type=int, default=300, help="timed pipeline batches, digits")
    p.add_argument("--digits-steps", type=int, default=100, help="timed steps (step alone, and fit), digits")
    p.add_argument("--jpegs", type=int, default=512, help="JPEG files of the deit part")
    p.add_argument("--jpeg-side", type=int, default=256, help="their side in pixels")
    p.add_argument("--deit-model", default="cait_xxs24_224", help="the deit part's variant")
    p.add_argument("--deit-size", type=int, default=224, help="the deit part's image size")
    p.add_argument("--deit-batch", type=int, default=16, help="the deit part's batch")
    p.add_argument("--deit-batches", type=int, default=40, help="timed pipeline batches, deit")
    p.add_argument("--deit-steps", type=int, default=6, help="timed steps (step alone, and fit), deit")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated folders and of the runs")
    p.add_argument("--lock", metavar="PATH", help="hold an exclusive flock on PATH while each process runs")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: tiny folders and models, few batches and steps, workers 0 and 1",
    )
    p.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    p.add_argument("--table", metavar="JSON", help="only print the tables of an earlier --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)), end="")
        return 0
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    parts = list(dict.fromkeys(v.strip() for v in args.only.split(",") if v.strip()))
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise SystemExit(f"--only: unknown or no part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.sizes, args.rss_steps, args.epoch_runs = [256, 512], 3, False
        args.workers, args.warmup = [0, 1], 1
        args.digits_batches, args.digits_steps = 3, 3
        args.jpegs, args.jpeg_side, args.deit_size, args.deit_batch = 64, 40, 32, 8
        args.deit_batches, args.deit_steps = 2, 2
    args.started, args.lock_wait_s = time.perf_counter(), 0.0
    results = dict(
        meta=dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            machine=platform.processor() or platform.machine(),
            cpus=len(os.sched_getaffinity(0)),
            parts=parts,
            quick=args.quick,
            git_head=_git_head(),
            **bench.machine_meta(),
            **bench.source_meta(),
        ),
        generated=[],
        file_list=[],
        rss=[],
        throughput=[],
    )
    for part in parts:
        if part == "rss":
            rss_part(args, results)
        else:
            throughput_part(part, args, results)
    _keep(args, results)
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
