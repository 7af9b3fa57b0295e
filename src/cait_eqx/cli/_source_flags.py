"""The SOURCE flags of `cait-eqx train`, `--init` and `--teacher`: what they allow besides them, reading the
sources once before training, checking them against the data, and the lines that report them."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import cait_eqx
from cait_eqx import training

from ._parser import config_fields, given_values

__all__ = ["Sources", "check_teacher_flags", "init_model_flags", "read_sources"]


def init_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The model keywords of an `--init` run: the rates given; `--model` and structure flags are errors."""
    if args.model is not None:
        parser.error("--init takes the architecture from SOURCE; drop --model")
    fields = config_fields(cait_eqx.CaiTConfig)
    rates = training.RunConfig.INIT_MODEL_KEYS
    structural = sorted(
        cait_eqx.flag_name(name, spec)
        for name, spec in fields.items()
        if name not in rates and name != "image_size" and getattr(args, name, None) is not None
    )
    if structural:
        allowed = ", ".join(cait_eqx.flag_name(name, fields[name]) for name in rates)
        parser.error(
            f"--init takes the architecture from SOURCE; drop {', '.join(structural)} (only the rates "
            f"{allowed} may change it; --image-size resizes the data)"
        )
    return given_values(args, rates)


def check_teacher_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, train: Any) -> None:
    """`--teacher` and `--distillation hard|soft` (`train`: the `TrainConfig`) come together, or neither."""
    if (args.teacher is None) != (train.distillation == "none"):
        parser.error(
            "--teacher and --distillation hard|soft go together: give both (e.g. --teacher RUN_DIR "
            "--distillation hard) or neither"
        )


@dataclasses.dataclass(frozen=True)
class Sources:
    """The sources of a new run, read once: `init` (and the `init_notes` of fitting it to the data) and
    `teacher`, each `None` when not asked for."""

    init: Any = None
    init_notes: tuple[str, ...] = ()
    teacher: Any = None

    def report(self, config: training.RunConfig) -> list[str]:
        """One line per source and per change made to the starting model, for stderr."""
        lines = []
        if self.init is not None:
            lines += [f"init: {line}" for line in (self.init.description, *self.init_notes)]
        if self.teacher is not None:
            train = config.train
            tau = f", tau {train.distillation_tau:g}" if train.distillation == "soft" else ""
            lines.append(
                f"teacher: {self.teacher.description}; {train.distillation} distillation, alpha "
                f"{train.distillation_alpha:g}{tau}"
            )
        return lines


def read_sources(config: training.RunConfig, train_data: Any, *, key: Any) -> Sources:
    """Read `config.init` and `config.teacher` and check them against `train_data` (a new run).

    **Raises:** `ValueError` (a usage error: not a CaiT, a size the patch does not divide, a teacher that
    does not fit the data) or `OSError` (a file or the published weights missing).
    """
    init, notes, teacher = None, (), None
    if config.init is not None:
        init = training.load_source(config.init)
        model, _, notes = training.initial_model(config, train_data, key=key, source=init)
        training.check_freeze(model, config.train.freeze)  # `--freeze blocks:N` against the source's depth
        training.with_adapters(model, config.train, key)  # `--lora-rank`, `--lora-targets` against its layers
    if config.teacher is not None:
        teacher = training.load_source(config.teacher)
        training.check_teacher(teacher.model, train_data)
    return Sources(init, tuple(notes), teacher)
