"""`cait-eqx predict MODEL IMAGES...`: the top-k classes of image files, as a table, CSV or JSON.

MODEL is anything `cait_eqx.training.load_source` reads (a variant name, a model file, a run directory).
IMAGES are files, folders (searched recursively for `cait_eqx.data.IMAGE_SUFFIXES`) or glob patterns
(expanded here too, so a quoted `'photos/*.jpg'` or `'**/*.png'` works). The images are preprocessed as the
model expects: a model from `cait-eqx train` (a run directory, or a file inside one) sees them as its
training saw its data (`cait_eqx.data.load_images`: greyscale or RGB by the model's channels, a bilinear
resize, pixels in [0, 1], the run's `--normalize`); an ImageNet model (a variant name, or a 1000-class RGB
file) gets timm's evaluation transform (`cait_eqx.preprocess`). Every batch, the last one padded, goes
through one compiled function.
"""

from __future__ import annotations

import argparse
import csv
import functools
import glob
import io
import json
import os
from pathlib import Path
from typing import Any

from ._parser import check_output_file, int_at_least

__all__ = ["PREPROCESSING", "add_parser", "find_images", "run"]

# `--preprocess`: how image files become model inputs.
PREPROCESSING = ("auto", "timm", "resize")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `predict` on `subparsers` (from `parser.add_subparsers`); returns its parser."""
    predict = subparsers.add_parser(
        "predict",
        help="the top-k classes of image files, by a model file, run directory or variant",
        description=(
            "Classify image files with a CaiT and print each image's most probable classes, with names "
            "when the model has them (a run's classes, or ImageNet's). MODEL: a run directory, a model "
            "file (cait_eqx or timm/deit) or a variant name (its published ImageNet weights). IMAGES: "
            "files, folders (searched recursively) or glob patterns."
        ),
    )
    predict.add_argument("model", metavar="MODEL", help="a run directory, a model file or a variant name")
    predict.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or globs")
    predict.add_argument("--top-k", type=int_at_least(1), default=5, metavar="K", help="classes per image")
    predict.add_argument("--batch-size", type=int_at_least(1), default=32, metavar="B")
    predict.add_argument(
        "--preprocess",
        choices=PREPROCESSING,
        default="auto",
        help=(
            "timm: timm's ImageNet evaluation transform; resize: as `cait-eqx train` reads a folder "
            "(bilinear resize, pixels in [0, 1]); auto (default): timm for a variant name or a 1000-class "
            "RGB file not in a run directory, resize otherwise"
        ),
    )
    predict.add_argument(
        "--normalize",
        choices=("none", "imagenet"),
        help="with --preprocess resize: the input normalisation (default: the run's, else none)",
    )
    predict.add_argument("--csv", type=Path, metavar="FILE", help="also write the predictions as CSV")
    predict.add_argument("--json", type=Path, metavar="FILE", help="also write the predictions as JSON")
    predict.set_defaults(func=lambda args: run(args, predict))
    return predict


def find_images(patterns: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """The image files named by `patterns`, in order, each once: files as given, folders searched
    recursively for `suffixes` (hidden entries skipped), glob patterns expanded (`**` crosses folders).

    **Raises:** `FileNotFoundError` naming a pattern that matches nothing, or a path that does not exist.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        if Path(pattern).exists():
            matches = [pattern]
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        else:
            raise FileNotFoundError(f"no such image file or folder: {pattern}")
        before = len(found)
        for match in map(Path, matches):
            if match.is_dir():
                for path in sorted(match.rglob("*")):
                    hidden = any(part.startswith(".") for part in path.relative_to(match).parts)
                    if path.is_file() and not hidden and path.suffix.lower() in suffixes:
                        found[path] = None
            elif match.is_file():
                found[match] = None
        if len(found) == before:
            raise FileNotFoundError(
                f"no images matched {pattern!r} (looked for files ending in {', '.join(suffixes)})"
            )
    return list(found)


def _run_directory(source: Any, model_arg: str) -> Path | None:
    """The run directory a loaded model comes from: MODEL itself, or the folder holding a model file."""
    from cait_eqx import training

    if source.kind == "run":
        return Path(model_arg)
    if source.kind == "file" and training.Run(source.path.parent).exists:
        return source.path.parent
    return None


def _run_facts(run_dir: Path | None) -> tuple[list[str] | None, str]:
    """`(class names, input normalisation)` recorded by the run (`None`, "none" without one)."""
    if run_dir is None:
        return None, "none"
    from cait_eqx import training

    run = training.Run(run_dir)
    names = json.loads(run.config_path.read_text()).get("data", {}).get("class_names")
    return (list(map(str, names)) if names else None), run.config().train.normalize


def _batches(paths: list[Path], args: argparse.Namespace, cfg: Any, how: str):
    """Input batches of `args.batch_size` images (the last padded by repeating its first) and their counts."""
    import numpy as np

    import cait_eqx
    from cait_eqx import data

    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        if how == "timm":
            from PIL import Image

            images = []
            for path in chunk:
                try:
                    with Image.open(path) as img:
                        img.load()
                        images.append(np.asarray(cait_eqx.preprocess(img, cfg.image_size)))
                except (OSError, SyntaxError, ValueError) as error:
                    raise ValueError(f"Cannot read image {path}: {error}. Fix or remove the file.") from None
            batch = np.stack(images)
        else:
            batch = data.load_images(chunk, image_size=cfg.image_size, channels=cfg.channels)
        pad = args.batch_size - len(chunk)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)])
        yield batch, len(chunk)


@functools.cache
def _compiled_logits() -> Any:
    """One compiled `logits(model, images, normalize)` per process (built on first use, so `--help` stays
    fast): a function built per call would keep every call's compiled programs alive in JAX's caches."""
    import equinox as eqx

    import cait_eqx
    from cait_eqx import data

    @eqx.filter_jit
    def logits(model, images, normalize):
        return cait_eqx.batched(model)(data.normalize_images(data.to_unit_float(images), normalize))

    return logits


def _predict_logits(model: Any, batches: Any, normalize: str) -> Any:
    """The logits of every real image, each batch through one compiled function."""
    import numpy as np

    logits = _compiled_logits()
    out = [np.asarray(logits(model, batch, normalize))[:count] for batch, count in batches]
    return np.concatenate(out)


def _write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary file beside it, flushed, then renamed over it.

    **Raises:** `cait_eqx.DiskFullError` (the file's size and the space free) when it does not fit.
    """
    import cait_eqx

    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = isinstance(error, OSError) and cait_eqx.DiskFullError.from_error(error, path, len(data))
        if full:
            raise full from None
        raise


def _check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`--csv` and `--json` must be files we can write: checked before the model is loaded or compiled."""
    for flag, path in (("--csv", args.csv), ("--json", args.json)):
        if path is not None:
            check_output_file(parser, flag, path, f"predictions.{flag[2:]}")


def _table(rows: list[dict[str, Any]], k: int) -> str:
    """One line per image: the image, then its top-k classes as `name (index) probability`."""
    cells = [
        [row["image"]] + [f"{p['name']} ({p['index']}) {p['probability']:.1%}" for p in row["top_k"]]
        for row in rows
    ]
    header = ["image"] + [f"top-{i + 1}" for i in range(k)]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]
    )


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "rank", "class_index", "class_name", "probability"])
    for row in rows:
        for rank, p in enumerate(row["top_k"], start=1):
            writer.writerow([row["image"], rank, p["index"], p["name"], repr(p["probability"])])
    return buffer.getvalue()


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run `cait-eqx predict` with the parsed `args`; returns the exit status (0; usage errors exit 2)."""
    import cait_eqx
    from cait_eqx import data, training

    _check_outputs(args, parser)
    try:
        paths = find_images(args.images, data.IMAGE_SUFFIXES)
    except FileNotFoundError as error:
        parser.error(str(error))
    try:
        source = training.load_source(args.model)
    except (OSError, ValueError) as error:  # not a CaiT, no such source, weights unavailable
        parser.error(str(error))
    model, cfg = source.model, source.model.config
    run_dir = _run_directory(source, args.model)
    class_names, normalize = _run_facts(run_dir)
    if class_names is not None and len(class_names) != cfg.num_classes:
        class_names = None  # e.g. a model re-headed after training: indices rather than wrong names
    imagenet = cfg.num_classes == 1000 and cfg.channels == 3
    how = args.preprocess
    if how == "auto":
        how = "timm" if source.kind == "variant" or (run_dir is None and imagenet) else "resize"
    if how == "timm" and cfg.channels != 3:
        parser.error(f"--preprocess timm makes RGB images, but the model takes {cfg.channels} channels")
    if how == "resize" and cfg.channels not in (1, 3):
        parser.error(
            f"the model takes {cfg.channels}-channel images; image files give greyscale (1) or RGB (3)"
        )
    if cfg.num_classes == 0:
        parser.error("the model has no classifier head (num_classes=0): there are no classes to predict")
    if args.top_k > cfg.num_classes:
        parser.error(f"--top-k {args.top_k} is more than the model's {cfg.num_classes} classes")
    normalize = "none" if how == "timm" else (args.normalize or normalize)
    if class_names is None and imagenet:
        class_names = cait_eqx.imagenet_class_names()
    try:
        logits = _predict_logits(model, _batches(paths, args, cfg, how), normalize)
    except ValueError as error:  # an unreadable image (named)
        parser.error(str(error))
    rows = []
    for path, row in zip(paths, logits, strict=True):
        top = cait_eqx.top_k(row, args.top_k, class_names=class_names)
        rows.append({"image": str(path), "top_k": [p._asdict() for p in top]})
    print(f"{source.description}; {len(paths)} images, preprocessing: {how}")
    print(_table(rows, args.top_k))
    if args.csv is not None:
        _write(args.csv, _csv(rows))
        print(f"wrote {args.csv}")
    if args.json is not None:
        record = {
            "model": args.model,
            "description": source.description,
            "preprocess": how,
            "normalize": normalize,
            "class_names": class_names,
            "predictions": rows,
        }
        _write(args.json, json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
