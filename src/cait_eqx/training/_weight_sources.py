"""Where a run's starting weights (or a teacher, or a model to predict with) come from; fitting them to data.

- `load_source(SOURCE)`: a variant name (its published weights, from the Hugging Face cache or the Hub), a
    checkpoint file (timm/deit `.pth`/`.safetensors`, or a `cait_eqx.save` file), or a run directory (its
    final model, else its newest checkpoint) → a `LoadedSource`.
- `adapt_to_data(model, ...)`: the positional grid resampled to the data's image size, the input channels
    adapted, a new head for the data's classes (kept when it fits); one line of description per change.
- `initial_model(config, train_data, ...)`: both, for a run with `RunConfig.init`, plus the run's rates.

A run can start from another run: `load_source` reads a run directory with `Run`, whose room (`_run.py`)
starts runs from the sources read here, so it imports `Run` where it reads one, not when it loads.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import equinox as eqx
from jaxtyping import PRNGKeyArray

from .._config import CaiTConfig
from .._io import load, load_timm
from .._model import CaiT
from .._pretrained import create_model
from .._surgery import adapt_input_channels, reset_classifier, set_input_size, with_dropout
from .._timm import WeightsError
from .._variants import list_models
from ..data import DataSource
from ._config import RunConfig

__all__ = ["LoadedSource", "adapt_to_data", "initial_model", "load_source"]


@dataclasses.dataclass(frozen=True)
class LoadedSource:
    """A model read from a SOURCE: `model` (inference mode), `kind` (`"variant"`, `"file"` or `"run"`),
    `path` (the file read), and `description` (one line for the log)."""

    model: CaiT
    kind: str
    path: Path | None
    description: str


def _describe(model: CaiT) -> str:
    cfg = model.config
    size = "x".join(map(str, cfg.image_size))
    return (
        f"dim {cfg.dim}, depth {cfg.depth}+{cfg.cls_depth}, patch {cfg.patch_size}, {size}x{cfg.channels}, "
        f"{cfg.num_classes} classes"
    )


def _load_file(path: Path) -> CaiT:
    """A `cait_eqx.save` file, else a timm/deit checkpoint; a `WeightsError` naming SOURCE otherwise."""
    try:
        return load(path)
    except WeightsError as error:
        if "was not written by `cait_eqx.save`" not in str(error):
            raise WeightsError(f"{path} is not a usable cait_eqx model file: {error}") from None
    try:
        return load_timm(path)
    except WeightsError as error:
        first = str(error).splitlines()[0]
        raise WeightsError(
            f"{path} does not hold a CaiT: its tensors are not those of a timm/deit CaiT ({first} ...). "
            f"SOURCE must be a CaiT checkpoint (timm, deit or cait_eqx), a run directory or a variant name."
        ) from None


def load_source(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> LoadedSource:
    """Read a CaiT from SOURCE, the way `cait-eqx train --init SOURCE` and `--teacher SOURCE` do.

    **Arguments:**

    - `source`: a variant name (`cait_eqx.list_models()`: its published ImageNet weights, from the Hugging
        Face cache, downloading them if allowed); a checkpoint file (timm or deit `.pth`/`.safetensors`, or
        a `cait_eqx.save` file); or a run directory (`model.safetensors` once finished, else the model of
        its newest checkpoint).
    - `cache_dir`: the Hugging Face cache directory for a variant name. (Keyword only argument.)

    **Returns:** a `LoadedSource` (its model in inference mode).

    **Raises:** `ValueError` (a `WeightsError` for files) that says which kinds of SOURCE there are when
    `source` is none of them or does not hold a CaiT; `FileNotFoundError` for a run directory without a
    model or checkpoint; `cait_eqx.PretrainedWeightsUnavailable` for a variant whose weights cannot be had.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists() and text in list_models():
        model = create_model(text, pretrained=True, cache_dir=cache_dir)
        return LoadedSource(model, "variant", None, f"{text}: published weights ({_describe(model)})")
    if path.is_dir():
        from ._run import Run  # the room that starts runs from sources (see the module's docstring)

        run = Run(path)
        if not run.exists:
            raise ValueError(
                f"{path} is a directory but not a cait_eqx run (no {Run.CONFIG_FILE}); SOURCE must be a "
                f"variant name, a checkpoint file or a run directory."
            )
        if run.model_path.is_file():
            model = load(run.model_path)
            where = run.model_path
        else:
            model = run.model("checkpoint")  # FileNotFoundError when there is none either
            where = run.checkpoint_dir
        return LoadedSource(model, "run", where, f"run {path}: {where.name} ({_describe(model)})")
    if path.is_file():
        model = _load_file(path)
        return LoadedSource(model, "file", path, f"{path} ({_describe(model)})")
    raise ValueError(
        f"SOURCE {text!r} is not a variant name, a file or a run directory (no such path). Variants: "
        f"{', '.join(list_models())}."
    )


def adapt_to_data(
    model: CaiT,
    *,
    image_size: tuple[int, int],
    channels: int,
    num_classes: int,
    key: PRNGKeyArray,
) -> tuple[CaiT, list[str]]:
    """Fit a loaded model to a dataset's images and classes; every change is described in one line.

    - Another image size: the positional grid resampled bicubically (`set_input_size`); the patch size
        must divide the size (else a `ValueError` that names a size that works).
    - Other channels: the RGB patch kernels adapted (`adapt_input_channels`, timm's rule).
    - Other classes: a fresh head (`reset_classifier`); the head is kept when its classes fit.

    **Arguments:**

    - `model`: the `CaiT`.
    - `image_size`, `channels`, `num_classes`: the data's. (Keyword only arguments.)
    - `key`: for a new head. (Keyword only argument.)

    **Returns:** `(model, notes)`.
    """
    cfg = model.config
    notes: list[str] = []
    image_size = tuple(image_size)
    if image_size != cfg.image_size:
        p = cfg.patch_size
        if image_size[0] % p or image_size[1] % p:
            fit = "x".join(str(max(p, round(s / p) * p)) for s in image_size)
            raise ValueError(
                f"The model's patch size {p} does not divide the data's {image_size[0]}x{image_size[1]} "
                f"images: resize the data to a multiple of {p} (e.g. --image-size {fit})."
            )
        before = cfg.grid_size
        model = set_input_size(model, image_size)
        after = model.config.grid_size
        notes.append(
            f"positional grid resampled {before[0]}x{before[1]} -> {after[0]}x{after[1]} (bicubic) for "
            f"{image_size[0]}x{image_size[1]} images"
        )
    if channels != cfg.channels:
        model = adapt_input_channels(model, channels)
        rule = "RGB kernels summed" if channels == 1 else f"RGB kernels repeated, scaled by 3/{channels}"
        notes.append(f"input channels {cfg.channels} -> {channels} ({rule}; timm's adapt_input_conv)")
    if num_classes != cfg.num_classes:
        model = reset_classifier(model, num_classes, key=key)
        notes.append(f"new head: {cfg.num_classes} -> {num_classes} classes (freshly initialised)")
    else:
        notes.append(f"head kept: its {num_classes} classes fit the data")
    return model, notes


def initial_model(
    config: RunConfig,
    train_data: DataSource,
    *,
    key: PRNGKeyArray,
    source: LoadedSource | None = None,
) -> tuple[CaiT, LoadedSource, list[str]]:
    """The starting model of a run with `config.init`: the SOURCE read, fitted to the training data
    (`adapt_to_data`), the rates `config.model` gives applied (`cait_eqx.with_dropout`), in training mode.

    When `config.model` is the whole recorded architecture (a run's `config.json`, resumed before its first
    checkpoint), the result must have that architecture: a source that has changed since is an error.

    **Arguments:**

    - `config`: the `RunConfig` (its `init` must be set).
    - `train_data`: the training split (its image size, channels and classes).
    - `key`: for a new head. (Keyword only argument.)
    - `source`: `config.init` already read by `load_source` (e.g. by a caller that reported it); `None`
        reads it. (Keyword only argument.)

    **Returns:** `(model, source, notes)`: the `CaiT` (training mode), the `LoadedSource`, and one line per
    change made to the source's model.
    """
    if config.init is None:
        raise ValueError("`initial_model` needs a RunConfig with `init` (the SOURCE to start from).")
    loaded = load_source(config.init) if source is None else source
    model, notes = adapt_to_data(
        loaded.model,
        image_size=train_data.image_size,
        channels=train_data.channels,
        num_classes=train_data.num_classes,
        key=key,
    )
    before = model.config
    rates = {
        name: config.model[name]
        for name in RunConfig.INIT_MODEL_KEYS
        if name in config.model and config.model[name] != getattr(before, name)
    }
    if rates:
        model = with_dropout(model, **rates)
        changes = ", ".join(f"{name} {getattr(before, name):g} -> {rate:g}" for name, rate in rates.items())
        notes.append(f"rates set: {changes}")
    if config.model_is_resolved:
        recorded = CaiTConfig(**config.model)
        if recorded != model.config:
            differ = [
                f"{name}: {value!r} recorded, {getattr(model.config, name)!r} now"
                for name, value in recorded.kwargs().items()
                if getattr(model.config, name) != value
            ]
            raise ValueError(
                f"The run recorded another architecture than {config.init!r} gives now "
                f"({'; '.join(differ)}): the source has changed since the run started. Start a new run "
                f"from it instead."
            )
    return eqx.nn.inference_mode(model, False), loaded, notes
