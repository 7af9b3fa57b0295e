"""`TrainConfig`, the training recipe, declared once; `StepConfig` and `RunConfig` built from it.

Every field of `TrainConfig` is declared with `cait_eqx._spec.hyper`: its default, its check and its help.
From that one declaration come the constructor's validation, the saved metadata (`to_dict`/`from_dict`),
the fields a resumed run must keep (`trajectory_fields`), the per-batch part of the recipe (`step_config`,
the fields of group `"step"`) and the `cait-eqx train` flags. Pure Python: importing it does not import JAX,
so the command line can build its flags from it at once.

It is one room, though over 400 lines: `TrainConfig` is the one place every training hyper-parameter is
declared (recipe, data pipeline, augmentations, bookkeeping), and its field order is the flags' order.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from .._config import REMAT_POLICIES, CaiTConfig
from .._constants import (
    BAD_IMAGE_POLICIES,
    DEFAULT_LORA_TARGETS,
    ERASE_MODES,
    INTERPOLATIONS,
    LORA_TARGETS,
    NORMALIZATIONS,
)
from .._spec import Check, OneOf, Real, Whole, boolean, hyper, specs, validate

__all__ = [
    "DEFAULT_MODEL",
    "DISTILLATION_KINDS",
    "FREEZE_MODES",
    "TRAIN_COMPUTE_DTYPES",
    "RunConfig",
    "StepConfig",
    "TrainConfig",
    "frozen_blocks",
]

# The compute dtypes training offers (float16 would need loss scaling, which the step does not do).
TRAIN_COMPUTE_DTYPES = ("float32", "bfloat16")

# What `TrainConfig.distillation` may hold: off, or DeiT's two kinds (`distillation_loss`).
DISTILLATION_KINDS = ("none", "hard", "soft")

# What `TrainConfig.freeze` may hold: `"none"` trains everything, `"backbone"` only the classifier head;
# besides these names, `"blocks:N"` (`frozen_blocks`) keeps the stem and the first N SA blocks fixed.
FREEZE_MODES = ("none", "backbone")
_FROZEN_BLOCKS = re.compile(r"blocks:([0-9]+)")


def frozen_blocks(freeze: str) -> int | None:
    """N of `freeze="blocks:N"` (the stem and the first N self-attention blocks stay fixed), else `None`."""
    match = _FROZEN_BLOCKS.fullmatch(freeze) if isinstance(freeze, str) else None
    return None if match is None else int(match.group(1))

@dataclasses.dataclass(frozen=True)
class _Freeze(Check):
    """`none`, `backbone`, or `blocks:N` with N >= 1 (whether N fits the model's depth is checked against the
    model: `cait_eqx.training.check_freeze`)."""

    def check(self, value: Any) -> str:
        if value in FREEZE_MODES:
            return value
        count = frozen_blocks(value)
        if count is None or count < 1:
            raise ValueError(
                f"must be none, backbone or blocks:N (N >= 1: the stem and the first N self-attention blocks "
                f"stay fixed, e.g. blocks:12), got {value!r}"
            )
        return value


# The default small CaiT for `cait-eqx train` on digits (chosen by experiment: experiments/defaults.md).
DEFAULT_MODEL: dict[str, Any] = dict(
    patch_size=4,
    dim=64,
    depth=4,
    cls_depth=2,
    heads=4,
    mlp_dim=128,
    layer_dropout=0.05,
)

RUN_FORMAT = "cait_eqx.run/1"


@dataclasses.dataclass(frozen=True)
class _ComputeDtype(OneOf):
    """`OneOf` that says why float16 is missing."""

    def check(self, value: Any) -> str:
        try:
            return super().check(value)
        except ValueError as error:
            raise ValueError(f"{error} (float16 would need loss scaling, which training lacks)") from None


@dataclasses.dataclass(frozen=True)
class _AutoAugment(Check):
    """A RandAugment config string of timm's form, `rand-m9-mstd0.5-inc1` (read in full by the data workers'
    `RandAugment.from_config`; checked for its shape here, without importing them)."""

    optional: bool = False

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not _AUTO_AUGMENT.fullmatch(value):
            raise ValueError(
                f"must be a RandAugment config string like 'rand-m9-mstd0.5-inc1' (rand, then -m<magnitude>, "
                f"-n<layers>, -mstd<std>, -mmax<max>, -inc<0|1>, -p<prob>), got {value!r}"
            )
        return value


@dataclasses.dataclass(frozen=True)
class _Trackers(Check):
    """Where records go: a comma-separated list (or a sequence) of `TRACKERS`; `jsonl` is always kept."""

    def check(self, value: Any) -> tuple[str, ...]:
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"must be a comma-separated list of {', '.join(TRACKERS)}, got {value!r}")
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"names unknown tracker(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(TRACKERS)}")
        return tuple(n for n in TRACKERS if n == "jsonl" or n in names)


@dataclasses.dataclass(frozen=True)
class _LoraTargets(Check):
    """The layers LoRA adapts: a comma-separated list (or a sequence) of `cait_eqx.LORA_TARGETS`, kept in that
    order (whether each names a layer of the model is checked against it: `cait_eqx.lora`)."""

    def check(self, value: Any) -> tuple[str, ...]:
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"must be a comma-separated list of {', '.join(LORA_TARGETS)}, got {value!r}")
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in LORA_TARGETS]
        if unknown or not names:
            mixes = " (the talking-heads mixes are too small to adapt)" if {"proj_l", "proj_w"} & set(
                unknown) else ""
            raise ValueError(f"must name layers among {', '.join(LORA_TARGETS)}, got {value!r}{mixes}")
        return tuple(n for n in LORA_TARGETS if n in names)


# The experiment trackers `TrainConfig.log` may name (`cait_eqx.training._tracking` opens them).
TRACKERS = ("jsonl", "tensorboard", "wandb")
_AUTO_AUGMENT = re.compile(r"rand(-(m|n|mmax|inc)[0-9]+|-(mstd|p)[0-9.]+)*")
_POSITIVE = Whole(1)
_COUNT = Whole(0)
_NON_NEGATIVE = Real(0.0)
_PROBABILITY = Real(0.0, 1.0)
_RATE = Real(0.0, 1.0, high_open=True)


# Checked by `__post_init__` (`validate`): ints where floats go, and clear `ValueError`s rather than beartype
# violations.
@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training recipe and the loop's bookkeeping. The defaults are `cait-eqx train`'s digits defaults.

    Recipe: `epochs`, `batch_size`, peak learning rate `lr` reached after `warmup_epochs` of linear warm-up
    and cosine-decayed to `min_lr` (a warm-up as long as the run or longer, e.g. the default 3 epochs in a
    2-epoch run, is cut to the run: the rate then rises to `lr` over the whole run and does not decay);
    AdamW `weight_decay` (masked off biases, norms, LayerScale, `pos_embed`, `cls_token`); `clip_norm`
    (global-norm gradient clipping, `None` = off); `label_smoothing`; mixup / cutmix (`mixup_alpha`,
    `cutmix_alpha`, `mix_prob`, `switch_prob`; 0 = off); random crop with `crop_padding` and left–right
    `flip`; `ema_decay` (EMA of the weights, `None` = off); input `normalize` (`"none"`: pixels in [0, 1],
    or `"imagenet"`); `seed` (batch order and every random draw); `compute_dtype` (`None`: the model's own;
    `"bfloat16"`: mixed precision, the model computes in bfloat16 with its float32 weights, gradients and
    optimiser state, float32 LayerNorm statistics, softmaxes and loss; `"float32"`); `remat` (`None`: the
    model's own; else one of `cait_eqx.REMAT_POLICIES`, what the self-attention stage keeps for the
    backward pass). Stochastic depth and dropout are the model's own (`layer_dropout`, `dropout`).
    Fine-tuning: `layer_decay` (layer-wise learning-rate decay, timm's grouping; `None` = off) and `freeze`
    (`"backbone"`: a linear probe, only the head trains; `"blocks:N"`: the stem and the first N SA blocks stay
    fixed; frozen parameters get neither gradients nor optimiser state); LoRA (`lora_rank` R > 0: `fit` puts
    adapters of rank R and scale `lora_alpha` / R on the `lora_targets` layers, `cait_eqx.lora`, and trains
    them and the head alone; `freeze` must then be `"none"`). `grad_accum_steps` (K): each step
    runs its batch as K micro-batches in turn and takes the whole batch's mean gradient. `step_chunk`: at most
    this many images per forward and backward pass (`None`: `cait_eqx.auto_train_chunk` on one CPU device),
    for speed only. Distillation as
    DeiT's (`distillation` = `"hard"` or `"soft"`, weight `distillation_alpha`, temperature
    `distillation_tau`), from the teacher `fit(..., teacher=...)` takes.

    Data (DeiT's augmentations): `resized_crop` (a random-resized crop of each image to the model's size,
    areas in [`crop_scale`, 1], aspect ratios in [1/`crop_ratio`, `crop_ratio`], resampled with
    `interpolation`), `auto_augment` (RandAugment, timm's config string) — both in the data workers — and
    `aug_repeats` (repeated augmentation, `cait_eqx.data.Sampler`); random erasing on the device after
    normalisation (`reprob`, `remode`, `recount`). The pipeline: `data_workers` (`None`: automatic),
    `data_timeout` (the longest wait for one batch, then `cait_eqx.data.DataWorkerError`; 0: for ever),
    `bad_images` (`"error"` or `"skip"`) and `check_data` (read every image once before training).
    Experiment tracking: `log`, any of `"jsonl"` (always), `"tensorboard"`, `"wandb"`.

    Bookkeeping: evaluate every `eval_every` epochs; log training metrics every `log_every` steps;
    checkpoint every `checkpoint_every` steps (0: at the end of each epoch) and always at the end or on an
    interrupt, keeping the newest `keep_checkpoints`; `on_nonfinite` = `"stop"` (raise
    `NonFiniteLossError`) or `"skip"` (drop that update and go on); `eval_batch_size`; `eval_crop_pct`
    (images read from files are evaluated as timm evaluates: resize, centre crop; `eval_transform`).

    Bad values raise `ValueError("TrainConfig `name` must be ...")`. Each field's help text is
    `cait_eqx._spec.specs(TrainConfig)[name].help`.
    """

    epochs: int = hyper(100, help="passes over the training data", check=_POSITIVE, metavar="N",
                        trajectory=True)
    batch_size: int = hyper(
        64, help="examples per step over all devices (the global batch)", check=_POSITIVE, metavar="B",
        trajectory=True,
    )
    lr: float = hyper(2e-3, help="peak learning rate", check=Real(0.0, low_open=True), metavar="LR",
                      trajectory=True)
    min_lr: float = hyper(1e-5, help="final learning rate of the cosine decay (at most lr)",
                          check=_NON_NEGATIVE, metavar="LR", trajectory=True)
    warmup_epochs: float = hyper(
        3.0, help="epochs of linear warm-up (cut to the run when longer)", check=_NON_NEGATIVE, metavar="E",
        trajectory=True,
    )
    weight_decay: float = hyper(0.05, help="AdamW's decoupled weight decay, on the linear maps' weights",
                                check=_NON_NEGATIVE, metavar="W", trajectory=True)
    clip_norm: float | None = hyper(
        None, help="clip the gradient's global norm to C (default: no clipping)",
        check=Real(0.0, low_open=True, optional=True), metavar="C", trajectory=True,
    )
    layer_decay: float | None = hyper(
        None, help="layer-wise learning-rate decay as timm's (e.g. 0.75): each layer below the head "
        "learns this much slower than the one above it (default: none, one rate)",
        check=Real(0.0, 1.0, low_open=True, optional=True), metavar="D", trajectory=True,
    )
    freeze: str = hyper(
        "none", help="what not to train: none; backbone (a linear probe: only the classifier head learns); "
        "or blocks:N (the patch embedding, positional embedding, class token and first N self-attention "
        "blocks stay fixed). Frozen parameters get no gradient computation and no optimiser state",
        check=_Freeze(), metavar="WHAT", trajectory=True, group="step",
    )
    grad_accum_steps: int = hyper(
        1, help="gradient accumulation: each optimiser step runs its batch as K micro-batches of "
        "batch_size / K images, one after the other (the memory of one micro-batch), and takes the mean "
        "gradient over the whole batch, the same as one big batch", check=_POSITIVE, metavar="K",
        group="step",
    )
    step_chunk: int | None = hyper(
        None, help="images per forward and backward pass inside a step, at most: the batch (or each "
        "grad_accum_steps micro-batch) runs as equal parts of at most N images, one after the other, and "
        "their mean gradient is the batch's (the same step to float32 rounding, smaller, and faster on the "
        "AVX-512 CPU measured; benchmarks/README.md). Default: cait_eqx.auto_train_chunk(model.config) on a "
        "CPU backend of one device, the whole batch on an accelerator or when JAX has several devices",
        check=Whole(1, optional=True),
        metavar="N", group="step",
    )
    lora_rank: int = hyper(
        0, help="LoRA: train low-rank adapters of rank R on the lora_targets layers (and the classifier "
        "head) instead of the weights, which stay frozen: no gradients, no optimiser state. The run saves "
        "the merged model and the adapters alone (adapters.safetensors). 0: off", check=_COUNT, metavar="R",
        trajectory=True,
    )
    lora_alpha: float | None = hyper(
        None, help="LoRA scale: the update is (alpha / rank) B A (default: the rank, a scale of 1)",
        check=Real(0.0, low_open=True, optional=True), metavar="A", trajectory=True,
    )
    lora_targets: tuple[str, ...] = hyper(
        DEFAULT_LORA_TARGETS, help="the layers LoRA adapts, comma-separated: qkv (self-attention), q, k, v "
        "(class attention), proj, fc1, fc2 (both kinds of block), head", check=_LoraTargets(),
        metavar="LIST", trajectory=True,
    )
    label_smoothing: float = hyper(0.1, help="label-smoothing epsilon", check=_RATE, metavar="E",
                                   trajectory=True, group="step")
    mixup_alpha: float = hyper(0.0, help="mixup Beta alpha (0 = off)", check=_NON_NEGATIVE, flag="--mixup",
                               metavar="ALPHA", trajectory=True, group="step")
    cutmix_alpha: float = hyper(0.0, help="cutmix Beta alpha (0 = off)", check=_NON_NEGATIVE,
                                flag="--cutmix", metavar="ALPHA", trajectory=True, group="step")
    mix_prob: float = hyper(1.0, help="probability of mixing a batch when mixup or cutmix is on",
                            check=_PROBABILITY, metavar="P", trajectory=True, group="step")
    switch_prob: float = hyper(0.5, help="probability of cutmix rather than mixup when both are on",
                               check=_PROBABILITY, metavar="P", trajectory=True, group="step")
    crop_padding: int = hyper(2, help="random-crop padding in pixels (0 = no crops)", check=_COUNT,
                              metavar="N", trajectory=True, group="step")
    flip: bool = hyper(False, help="random left-right flips (off by default: wrong for digits)",
                       check=boolean, trajectory=True, group="step")
    resized_crop: bool = hyper(
        False, help="random-resized crop of each image to the model's size, in the data workers (DeiT's; "
        "instead of the padded crop)", check=boolean, trajectory=True, group="data",
    )
    crop_scale: float = hyper(0.08, help="smallest area fraction a random-resized crop keeps (largest: 1)",
                              check=Real(0.0, 1.0, low_open=True), metavar="S", trajectory=True, group="data")
    crop_ratio: float = hyper(4 / 3, help="aspect ratios of a random-resized crop lie in [1/R, R]",
                              check=Real(1.0), metavar="R", trajectory=True, group="data")
    interpolation: str = hyper("bicubic", help="resampling filter of the random-resized crop",
                               check=OneOf(INTERPOLATIONS), trajectory=True, group="data")
    auto_augment: str | None = hyper(
        None, help="RandAugment in the data workers, as timm's config string, e.g. rand-m9-mstd0.5-inc1 "
        "(DeiT's); default off", check=_AutoAugment(optional=True), metavar="CONFIG", trajectory=True,
        group="data",
    )
    aug_repeats: int = hyper(
        1, help="repeated augmentation: each image of an epoch's order is served R times in a row, "
        "augmented independently (DeiT: 3)", check=_POSITIVE, metavar="R", trajectory=True, group="data",
    )
    reprob: float = hyper(0.0, help="random-erasing probability per image, after normalisation (DeiT: 0.25)",
                          check=_PROBABILITY, metavar="P", trajectory=True, group="step")
    remode: str = hyper("pixel", help="random-erasing fill: pixel (per-pixel normal values), rand (one per "
                        "channel) or const (zeros)", check=OneOf(ERASE_MODES), trajectory=True, group="step")
    recount: int = hyper(1, help="random erasing draws 1 to N boxes per image", check=_POSITIVE, metavar="N",
                         trajectory=True, group="step")
    ema_decay: float | None = hyper(
        None, help="also keep an EMA of the weights with this decay (default: none)",
        check=Real(0.0, 1.0, high_open=True, optional=True), metavar="D", trajectory=True,
    )
    normalize: str = hyper("none", help="input normalisation: none (pixels in [0, 1]) or imagenet",
                           check=OneOf(NORMALIZATIONS), trajectory=True, group="step")
    distillation: str = hyper(
        "none", help="learn from a teacher as DeiT does (needs a teacher): hard (its predicted class) or "
        "soft (its probabilities at temperature tau); none = off", check=OneOf(DISTILLATION_KINDS),
        trajectory=True, group="step",
    )
    distillation_alpha: float = hyper(
        0.5, help="weight of the distillation term; the labels' cross-entropy gets 1 - alpha (DeiT's)",
        check=_PROBABILITY, metavar="A", trajectory=True, group="step",
    )
    distillation_tau: float = hyper(
        1.0, help="temperature of soft distillation (DeiT's tau)", check=Real(0.0, low_open=True),
        metavar="T", trajectory=True, group="step",
    )
    seed: int = hyper(0, help="seeds the initialisation, the batch order and every random draw",
                      check=_COUNT, metavar="N", trajectory=True)
    eval_every: int = hyper(1, help="evaluate every E epochs", check=_POSITIVE, metavar="E", group="loop")
    log_every: int = hyper(10, help="log training metrics every N steps", check=_POSITIVE, metavar="N",
                           group="loop")
    checkpoint_every: int = hyper(0, help="checkpoint every N steps (0: at the end of every epoch)",
                                  check=_COUNT, metavar="N", group="loop")
    keep_checkpoints: int = hyper(3, help="keep the newest K checkpoints", check=_POSITIVE, metavar="K",
                                  group="loop")
    on_nonfinite: str = hyper("stop", help="on a non-finite loss or gradient: stop, or skip that update",
                              check=OneOf(("stop", "skip")), group="loop")
    eval_batch_size: int = hyper(500, help="examples per evaluation step", check=_POSITIVE, metavar="B",
                                 group="loop")
    eval_crop_pct: float | None = hyper(
        None, help="evaluate images read from files (a folder, npy arrays) as timm's validate.py does: the "
        "shorter side resized to the image size / P (bicubic), then the centre cropped (default: CaiT's "
        "pretrained configs' crop_pct, 1.0); images read into memory are evaluated as read",
        check=Real(0.0, 1.0, low_open=True, optional=True), metavar="P", group="loop",
    )
    compute_dtype: str | None = hyper(
        None,
        help="dtype of the computation (default: the model's own, float32). bfloat16: mixed precision for "
        "accelerators (GPU/TPU): bfloat16 activations and matmuls; float32 weights, gradients, optimiser "
        "state, LayerNorm statistics, softmaxes and loss. Usually slower on CPUs",
        check=_ComputeDtype(TRAIN_COMPUTE_DTYPES, optional=True),
        trajectory=True,
    )
    remat: str | None = hyper(
        None,
        help="what the self-attention stage keeps for the backward pass (default: the model's own); trades "
        "memory for recomputation, the same maths (see benchmarks/README.md)",
        check=OneOf(REMAT_POLICIES, optional=True),
    )
    data_workers: int | None = hyper(
        None, help="processes that read, decode and augment the images (default: none for arrays in memory "
        "without per-image transforms, else one per spare core, at most 8)", check=Whole(0, optional=True),
        metavar="N", group="loop",
    )
    data_timeout: float = hyper(
        300.0, help="seconds to wait for one batch (of training or of the evaluation) before stopping "
        "with an error that names its files (a file that blocks when read, as on a stalled network file "
        "system; a decoder that hangs); "
        "0 waits for ever", check=_NON_NEGATIVE, metavar="SECONDS", group="loop",
    )
    bad_images: str = hyper("error", help="a training image that cannot be read: error (stop, naming it) or "
                            "skip (replace it by the next readable one, and count it)",
                            check=OneOf(BAD_IMAGE_POLICIES), group="loop")
    log: tuple[str, ...] = hyper(
        ("jsonl",), help="where training records go, comma-separated: jsonl (metrics.jsonl, always), "
        "tensorboard, wandb (offline without an API key); the last two need the tracking extra "
        "(pip install \"cait_eqx[tracking]\")",
        check=_Trackers(), metavar="LIST", group="loop",
    )
    check_data: bool = hyper(
        True, help="read every image of a lazy source (a folder, npy arrays) once before training and report "
        "each that cannot be read (bad_images then stops the run with the list or leaves them out); "
        "--no-check-data skips the pass", check=boolean, group="loop",
    )

    def __post_init__(self):
        validate(self, "TrainConfig ")
        if self.batch_size % self.grad_accum_steps:
            divisors = [k for k in range(1, self.batch_size + 1) if self.batch_size % k == 0]
            below = [k for k in divisors if k < self.grad_accum_steps][-1:]
            nearby = below + [k for k in divisors if k > self.grad_accum_steps][:1]
            multiple = -(-self.batch_size // self.grad_accum_steps) * self.grad_accum_steps
            raise ValueError(
                f"TrainConfig `grad_accum_steps` ({self.grad_accum_steps}) must divide `batch_size` "
                f"({self.batch_size}): each step splits its batch into that many equal micro-batches. Use "
                f"grad_accum_steps {' or '.join(map(str, sorted(nearby)))}, or batch_size {multiple}."
            )
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets != DEFAULT_LORA_TARGETS):
            raise ValueError(
                "TrainConfig `lora_alpha` and `lora_targets` set LoRA adapters up, but `lora_rank` is 0 "
                "(off): give a rank (e.g. lora_rank=8), or leave them out."
            )
        if self.lora_rank > 0 and self.freeze != "none":
            raise ValueError(
                f"TrainConfig `freeze` ({self.freeze!r}) and `lora_rank` ({self.lora_rank}) conflict: LoRA "
                f"already freezes every base weight (only the adapters and the head train). Use "
                f"freeze='none' with LoRA, or freeze without LoRA (lora_rank=0)."
            )
        if self.min_lr > self.lr:
            raise ValueError(
                f"TrainConfig `min_lr` must be at most `lr` ({self.lr:g}), got {self.min_lr!r}: the schedule "
                f"decays from `lr` to `min_lr`. Lower `min_lr` or raise `lr`."
            )

    @classmethod
    def trajectory_fields(cls) -> tuple[str, ...]:
        """The fields that change the sequence of parameters a run goes through: a resumed run keeps them."""
        return tuple(name for name, spec in specs(cls).items() if spec.trajectory)

    @classmethod
    def step_fields(cls) -> tuple[str, ...]:
        """The fields of group `"step"`: what happens to a batch inside the step (`StepConfig`'s fields)."""
        return tuple(name for name, spec in specs(cls).items() if spec.group == "step")

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (what a run's `config.json` and a checkpoint record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The `TrainConfig` of `to_dict`'s output; a field missing (an older record) takes its default."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def step_config(self, num_classes: int) -> StepConfig:
        """The per-batch part of the recipe (the `"step"` fields), for `make_train_step`."""
        step_values = {name: getattr(self, name) for name in self.step_fields()}
        return StepConfig(num_classes=num_classes, **step_values)


def _with_step_fields(cls: type) -> type:
    """Declare `TrainConfig`'s fields of group `"step"` on `cls`, after its own and in their order, each with
    `TrainConfig`'s type, help and default (or the one `cls.NEUTRAL` gives it), and make `cls` a frozen
    dataclass: a step setting is declared once, in `TrainConfig`."""
    step_fields = TrainConfig.step_fields()
    for field in dataclasses.fields(TrainConfig):
        if field.name in step_fields:
            default = cls.NEUTRAL.get(field.name, field.default)
            cls.__annotations__[field.name] = field.type
            setattr(cls, field.name, dataclasses.field(default=default, metadata=field.metadata))
    return dataclasses.dataclass(frozen=True)(cls)


@_with_step_fields
class StepConfig:
    """What happens to a batch inside the training step, besides the optimiser.

    Its fields are `num_classes` (the size of the targets), then the `TrainConfig` fields of group `"step"`
    (`TrainConfig.step_fields()`: what the step does to a batch's images and targets, and the terms of its
    loss), declared there once, with the help given there (`cait_eqx.hyperparameters(StepConfig)`).
    `TrainConfig.step_config` builds one from a recipe. The defaults are `TrainConfig`'s, but neutral where
    the recipe's are not (`NEUTRAL`: no label smoothing, no crop), so that `StepConfig(num_classes=10)`
    smooths, mixes and augments nothing.
    """

    # The defaults that differ from `TrainConfig`'s, whose recipe smooths labels and crops by default.
    NEUTRAL: typing.ClassVar[dict[str, Any]] = {"label_smoothing": 0.0, "crop_padding": 0}

    num_classes: int

    @property
    def augment(self):
        """The per-image `cait_eqx.data.Augment` of `crop_padding` and `flip`."""
        from ..data import Augment  # JAX: imported when a step is built

        return Augment(crop_padding=self.crop_padding, flip=self.flip)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run, as written to `RUN_DIR/config.json`.

    - `model`: `CaiT` keywords (without `image_size`, `channels`, `num_classes`, which come from the data
        unless given), e.g. `DEFAULT_MODEL` or `cait_eqx.variant_config(name)`.
    - `dataset`: `"digits"`, `"mnist"`, `"folder:PATH"` (read lazily), `"npz:PATH"` or `"npy:DIR"`
        (memory-mapped, `cait_eqx.data.open_arrays`); `image_size`: resize to this
        (`None`: native); `test_fraction` and `split_seed`: the fixed held-out split.
    - `train`: the `TrainConfig` (its `seed` also seeds the model's initialisation).
    - `model_name`: the variant name when the model came from one (for the record).
    - `init`: start from the weights of this SOURCE (`cait_eqx.training.load_source`: a variant name, a
        checkpoint file or a run directory) instead of fresh ones; the architecture is the source's, fitted
        to the data (`adapt_to_data`). `model` then holds only rates to change (`INIT_MODEL_KEYS`, e.g.
        `model={"layer_dropout": 0.1}`, or `{}`), or, as `config.json` records it, the whole resolved
        architecture; any other key is an error.
    - `teacher`: with `train.distillation` `"hard"` or `"soft"`, the SOURCE of the teacher (`load_source`),
        which must take the data's images and classes as they are.
    """

    # With `init`, the `model` keys that may change the source's model: its dropout and stochastic-depth
    # rates (`cait_eqx.with_dropout`); everything else is the source's.
    INIT_MODEL_KEYS: typing.ClassVar[tuple[str, ...]] = (
        "dropout", "emb_dropout", "attn_dropout", "layer_dropout"
    )

    model: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MODEL))
    dataset: str = "digits"
    image_size: int | tuple[int, int] | None = 16
    test_fraction: float = 0.2
    split_seed: int = 0
    train: TrainConfig = TrainConfig()
    model_name: str | None = None
    init: str | None = None
    teacher: str | None = None

    def __post_init__(self):
        if (self.teacher is None) != (self.train.distillation == "none"):
            raise ValueError(
                f"RunConfig `teacher` ({self.teacher!r}) and `train.distillation` "
                f"({self.train.distillation!r}) go together: give a teacher with distillation 'hard' or "
                f"'soft', or neither."
            )
        if self.init is None or self.model_is_resolved:
            return
        structural = sorted(set(self.model) - set(self.INIT_MODEL_KEYS))
        if structural:
            raise ValueError(
                f"RunConfig `model` sets {', '.join(structural)}, but with `init` ({self.init!r}) the "
                f"architecture comes from the source. Give only the rates to change "
                f"({', '.join(self.INIT_MODEL_KEYS)}), e.g. `model={{}}`."
            )

    @property
    def model_is_resolved(self) -> bool:
        """Whether `model` is a whole resolved architecture (every keyword `CaiT` requires), as `config.json`
        records it, rather than the keywords a user gives."""
        required = [f.name for f in dataclasses.fields(CaiTConfig) if f.default is dataclasses.MISSING]
        return all(name in self.model for name in required)

    def to_dict(self) -> dict[str, Any]:
        """The record written to `config.json` (before `train_run` adds the resolved model and versions)."""
        return {
            "format": RUN_FORMAT,
            "model_name": self.model_name,
            "model": dict(self.model),
            "data": {
                "dataset": self.dataset,
                "image_size": self.image_size,
                "test_fraction": self.test_fraction,
                "split_seed": self.split_seed,
            },
            "train": self.train.to_dict(),
            "init": self.init,
            "teacher": self.teacher,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Read a `config.json` record back (`ValueError` when it is not one)."""
        if values.get("format") != RUN_FORMAT:
            raise ValueError(
                f"Not a cait_eqx run configuration (format {values.get('format')!r}, expected "
                f"{RUN_FORMAT!r})."
            )
        data = values["data"]
        model = dict(values["model"])
        if isinstance(model.get("image_size"), list):
            model["image_size"] = tuple(model["image_size"])
        return cls(
            model=model,
            dataset=data["dataset"],
            image_size=_size_from_json(data["image_size"]),
            test_fraction=data["test_fraction"],
            split_seed=data["split_seed"],
            train=TrainConfig.from_dict(values["train"]),
            model_name=values.get("model_name"),
            init=values.get("init"),  # absent from records older than `init`
            teacher=values.get("teacher"),
        )


def _size_from_json(size):
    """JSON has no tuples: a saved `(height, width)` image size comes back as a list."""
    return tuple(size) if isinstance(size, list) else size
