"""The `cait-eqx attention` and `cait-eqx plot` sub-commands.

`cait_eqx.cli` builds the parser and calls `add_commands(subparsers)`; every sub-command registered here sets
`func(args) -> int` (the exit code). Heavy imports (JAX, matplotlib) happen inside the commands, so building
the parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_commands"]

_NORMALISATIONS = ("auto", "imagenet", "none")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the `attention` and `plot` sub-commands on `subparsers` (from `parser.add_subparsers`)."""
    attention = subparsers.add_parser(
        "attention",
        help="draw the class-attention maps of a model on an image (PNG)",
        description=(
            "Draw where the class token looks: the class-attention weights of every class-attention block "
            "and head (and their mean), upsampled to the image and overlaid on it, written as one PNG. The "
            "model comes from a checkpoint written by `cait_eqx.save` / `cait-eqx train` (--checkpoint), or "
            "from official timm/deit weights (--weights, with --model naming the variant, or none to infer "
            "it)."
        ),
    )
    attention.add_argument("image", type=Path, metavar="IMAGE", help="the image file (PNG, JPEG, ...)")
    source = attention.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="FILE", help="a model saved by `cait_eqx.save`")
    source.add_argument(
        "--weights", type=Path, metavar="FILE", help="timm / deit weights (.pth or .safetensors)"
    )
    attention.add_argument(
        "--model",
        metavar="NAME",
        help="the variant the --weights belong to (default: inferred from the file)",
    )
    attention.add_argument(
        "--out", type=Path, default=Path("attn.png"), metavar="FILE", help="output PNG (default: attn.png)"
    )
    attention.add_argument(
        "--upsample",
        choices=("nearest", "bilinear"),
        default="nearest",
        help="how patch weights become pixels: 'nearest' keeps each patch's exact weight (default)",
    )
    attention.add_argument(
        "--normalize",
        choices=_NORMALISATIONS,
        default="auto",
        help=(
            "input normalisation after scaling pixels to [0, 1]: 'imagenet' mean/std, or 'none'. 'auto' "
            "(default) uses imagenet for --weights (official ImageNet models) and, for --checkpoint, the "
            "run's own setting from config.json beside the checkpoint (none when there is no such file)"
        ),
    )
    attention.set_defaults(func=lambda args: _attention(args, attention))

    plot = subparsers.add_parser(
        "plot",
        help="plot the loss / accuracy / learning-rate curves of a training run (PNG)",
        description="Read RUN_DIR/metrics.jsonl (written by `cait-eqx train`) and draw its curves as a PNG.",
    )
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory of `cait-eqx train`")
    plot.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="output PNG (default: RUN_DIR/curves.png)"
    )
    plot.set_defaults(func=lambda args: _plot(args, plot))


def _fail(command: str, error: BaseException) -> int:
    print(f"cait-eqx {command}: error: {error}", file=sys.stderr)
    return 1


def _attention(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.model is not None and args.weights is None:
        parser.error("--model names the variant of --weights; it cannot be used with --checkpoint")
    if not args.image.is_file():
        parser.error(f"image file not found: {args.image}")
    weights_file = args.checkpoint if args.checkpoint is not None else args.weights
    if not weights_file.is_file():
        flag = "--checkpoint" if args.checkpoint is not None else "--weights"
        parser.error(f"{flag} file not found: {weights_file}")

    import cait_eqx
    from cait_eqx import viz

    try:
        if args.checkpoint is not None:
            model = cait_eqx.load(args.checkpoint)
        else:
            model = cait_eqx.load_timm(args.weights, name=args.model)
    except (ValueError, OSError, ImportError) as error:
        return _fail("attention", error)
    if model.config.cls_depth == 0:
        return _fail(
            "attention", ValueError("this model has no class-attention blocks (cls_depth=0), no maps to draw")
        )

    normalize = args.normalize
    if normalize == "auto":
        normalize = "imagenet" if args.weights is not None else _run_normalization(args.checkpoint)
    try:
        image, display = viz.load_image(args.image, model.config, normalize=normalize)
    except (ValueError, OSError) as error:
        return _fail("attention", error)
    out = viz.plot_class_attention(model, image, args.out, display=display, upsample=args.upsample)
    print(f"wrote {out}")
    return 0


def _run_normalization(checkpoint: Path) -> str:
    """The input normalisation of the `cait-eqx train` run that wrote `checkpoint`, or "none"."""
    config = checkpoint.parent / "config.json"
    if not config.is_file():
        return "none"
    try:
        value = json.loads(config.read_text()).get("train", {}).get("normalize", "none")
    except (ValueError, AttributeError):
        return "none"
    return value if value in ("none", "imagenet") else "none"


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.run_dir.is_dir():
        parser.error(f"run directory not found: {args.run_dir}")
    from cait_eqx import viz

    try:
        out = viz.plot_training_curves(args.run_dir, args.out)
    except (ValueError, OSError) as error:
        return _fail("plot", error)
    print(f"wrote {out}")
    return 0
