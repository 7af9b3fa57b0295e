"""`cait-eqx attention IMAGE`: a saved model or official weights → `cait_eqx.viz.plot_class_attention`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._parser import check_output_file

__all__ = ["NORMALIZATIONS", "add_parser", "run"]

NORMALIZATIONS = ("auto", "imagenet", "none")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `attention` on `subparsers` (from `parser.add_subparsers`); returns its parser."""
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
        choices=NORMALIZATIONS,
        default="auto",
        help=(
            "input normalisation after scaling pixels to [0, 1]: 'imagenet' mean/std, or 'none'. 'auto' "
            "(default) uses imagenet for --weights (official ImageNet models) and, for --checkpoint, the "
            "setting of the `cait-eqx train` run the checkpoint lies in (none outside a run directory)"
        ),
    )
    attention.set_defaults(func=lambda args: run(args, attention))
    return attention


def _fail(error: BaseException) -> int:
    print(f"cait-eqx attention: error: {error}", file=sys.stderr)
    return 1


def _run_normalization(checkpoint: Path) -> str:
    """The input normalisation of the `cait-eqx train` run whose directory holds `checkpoint`, or "none"."""
    from cait_eqx import training

    try:
        return training.Run(checkpoint.parent).config().train.normalize
    except (OSError, ValueError):  # not in a run directory, or not a run's configuration
        return "none"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run `cait-eqx attention` with the parsed `args`; returns the exit status (0, or 1 on an error)."""
    if args.model is not None and args.weights is None:
        parser.error("--model names the variant of --weights; it cannot be used with --checkpoint")
    if not args.image.is_file():
        parser.error(f"image file not found: {args.image}")
    weights_file = args.checkpoint if args.checkpoint is not None else args.weights
    if not weights_file.is_file():
        flag = "--checkpoint" if args.checkpoint is not None else "--weights"
        parser.error(f"{flag} file not found: {weights_file}")
    check_output_file(parser, "--out", args.out, "attn.png")  # before the model is loaded or compiled

    import cait_eqx
    from cait_eqx import viz

    try:
        if args.checkpoint is not None:
            model = cait_eqx.load(args.checkpoint)
        else:
            model = cait_eqx.load_timm(args.weights, name=args.model)
    except (ValueError, OSError, ImportError) as error:
        return _fail(error)
    if model.config.cls_depth == 0:
        return _fail(ValueError("this model has no class-attention blocks (cls_depth=0), no maps to draw"))

    normalize = args.normalize
    if normalize == "auto":
        normalize = "imagenet" if args.weights is not None else _run_normalization(args.checkpoint)
    try:
        image, display = viz.load_image(args.image, model.config, normalize=normalize)
    except (ValueError, OSError) as error:
        return _fail(error)
    out = viz.plot_class_attention(model, image, args.out, display=display, upsample=args.upsample)
    print(f"wrote {out}")
    return 0
