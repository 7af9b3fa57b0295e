"""The parser of `cait-eqx`: one-line usage errors, flag types, and flags made from the config dataclasses.

`add_config_flags` turns every field of a config dataclass declared with a `cait_eqx.Spec` (`CaiTConfig`,
`TrainConfig`) into one flag: its name from `cait_eqx.flag_name`, its type from the field's check, its help
and metavar from the `Spec`. So a new hyper-parameter has its flag without an edit here. Pure Python: building
the parser imports no JAX, so `cait-eqx --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import cait_eqx

__all__ = [
    "UsageParser",
    "add_config_flags",
    "add_field_flag",
    "check_output_file",
    "config_fields",
    "dataset_spec",
    "existing_dir",
    "float_in",
    "given_values",
    "int_at_least",
    "mesh_spec",
    "source_spec",
]


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (no usage dump, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------ flags of the config fields


def config_fields(config_class: type) -> dict[str, cait_eqx.Spec]:
    """The fields of `config_class` that have a command-line flag (`Spec.cli`), with their `Spec`s."""
    return {name: spec for name, spec in cait_eqx.hyperparameters(config_class).items() if spec.cli}


def _type_name(check: Any) -> str:
    """A short name for a flag's type; the tests derive bad values from it (`int>=N`, `number`, ...)."""
    kind = getattr(check, "kind", str)
    if kind is int and hasattr(check, "minimum"):
        return f"int>={check.minimum}"
    if kind is float:
        return "number"
    return type(check).__name__.strip("_").lower()


def _flag_type(check: Any) -> Callable[[str], Any]:
    """The argparse `type` of a field: the check's `parse` (or the check itself), a `ValueError` made a usage
    error that names the flag."""
    parse = getattr(check, "parse", check)

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = _type_name(check)
    return convert


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return str(value)


def add_field_flag(
    group: Any, name: str, spec: cait_eqx.Spec, *, default: Any = None, help: str | None = None
) -> argparse.Action:
    """Add the flag of config field `name` to `group` (a parser or an argument group).

    The flag's value lands in `args.<name>`; it is `None` when the flag is not given, so that "not set" is
    distinguishable from every value (the config's own default then applies).

    **Arguments:**

    - `group`: where the flag goes.
    - `name`, `spec`: the field and its `cait_eqx.Spec`.
    - `default`: the value that applies when the flag is not given, shown in the help (`None`: not shown).
        (Keyword only argument.)
    - `help`: the help text instead of `spec.help`. (Keyword only argument.)

    **Returns:** the argparse action.
    """
    text = (spec.help if help is None else help).replace("%", "%%")
    if default is not None and "default" not in text:  # some helps say it in their own words
        text += f" (default {_shown(default)})"
    check = spec.check
    options: dict[str, Any] = dict(dest=name, default=None, help=text)
    if getattr(check, "kind", None) is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif getattr(check, "choices", None):
        options.update(choices=tuple(check.choices), metavar=spec.metavar)
    else:
        options.update(type=str if check is None else _flag_type(check), metavar=spec.metavar)
    return group.add_argument(cait_eqx.flag_name(name, spec), **options)


def add_config_flags(
    group: Any,
    config_class: type,
    *,
    defaults: Mapping[str, Any] | None = None,
    skip: Collection[str] = (),
) -> list[argparse.Action]:
    """Add one flag per command-line field of `config_class` (a dataclass declared with `cait_eqx.Spec`s).

    **Arguments:**

    - `group`: a parser or an argument group.
    - `config_class`: e.g. `cait_eqx.CaiTConfig` or `cait_eqx.training.TrainConfig`.
    - `defaults`: the values that apply when a flag is not given, by field, where they differ from the
        dataclass's own defaults (shown in the help). (Keyword only argument.)
    - `skip`: fields whose flag goes elsewhere (added with `add_field_flag`). (Keyword only argument.)

    **Returns:** the argparse actions, in field order.
    """
    own = {
        field.name: field.default
        for field in dataclasses.fields(config_class)
        if field.default is not dataclasses.MISSING
    }
    own.update(defaults or {})
    return [
        add_field_flag(group, name, spec, default=own.get(name))
        for name, spec in config_fields(config_class).items()
        if name not in skip
    ]


def given_values(args: argparse.Namespace, names: Collection[str]) -> dict[str, Any]:
    """The values of the flags among `names` (field names) that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# --------------------------------------------------------------------------- types of the other flags


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer `>= minimum`, checked (and worded) by `cait_eqx.Whole`, as a config
    field's flag is."""
    return _flag_type(cait_eqx.Whole(minimum))


def float_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from `low` to `high`, checked (and worded) by
    `cait_eqx.Real`, as a config field's flag is."""
    return _flag_type(cait_eqx.Real(low, high, low_open=low_open, high_open=high_open))


def dataset_spec(text: str) -> str:
    """An argparse type: `digits`, `mnist`, `folder:PATH`, `npz:PATH` or `npy:DIR` (paths made absolute)."""
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
    if kind == "npy" and where:
        if not Path(where).is_dir():
            raise argparse.ArgumentTypeError(f"folder of images.npy and labels.npy not found: {where}")
        return f"npy:{Path(where).resolve()}"
    raise argparse.ArgumentTypeError(
        f"expected digits, mnist, folder:PATH, npz:PATH or npy:DIR, got {text!r}"
    )



def existing_dir(text: str) -> Path:
    """An argparse type: a directory that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"directory not found: {text}")
    return path



def source_spec(text: str) -> str:
    """An argparse type: a SOURCE of weights (`cait_eqx.training.load_source`); an existing path is made
    absolute (a run resumed from elsewhere finds it), anything else (a variant name) is kept as given."""
    path = Path(text).expanduser()
    if text and path.exists():
        return str(path.resolve())
    import cait_eqx

    if text in cait_eqx.list_models():
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a variant name, a file or a run directory (no such path); variants: "
        f"{', '.join(cait_eqx.list_models())}"
    )


def mesh_spec(text: str) -> str:
    """An argparse type: a device mesh such as `data=4,fsdp=2` (checked here, built by the command)."""
    from cait_eqx import parallel

    try:
        parallel.parse_mesh_spec(text)
    except parallel.MeshError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def check_output_file(parser: argparse.ArgumentParser, flag: str, path: Path, example: str) -> None:
    """A usage error (one line) unless `path`, the file `flag` names, can be written: not a folder, in a
    folder where a file can be created (`cait_eqx.check_writable_dir`). Commands check this first, before
    they load or compile anything, so a bad output path never costs the work before it.

    **Arguments:**

    - `parser`: the command's parser (its `error` ends the program).
    - `flag`: how the path was given, for the message (e.g. `"--json"`).
    - `path`: the file to write.
    - `example`: a file name to suggest when `path` is a folder (e.g. `"results.json"`).
    """
    if path.is_dir():
        parser.error(f"{flag} {path} is a folder; give a file name, e.g. {path / example}")
    try:
        cait_eqx.check_writable_dir(path.parent, path.name)
    except OSError as error:
        parser.error(f"{flag} {path}: {error}")
