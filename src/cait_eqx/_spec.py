"""A hyper-parameter declared once: its default, its check and its help text, as a dataclass field.

`CaiTConfig` and `TrainConfig` declare every field with `hyper(...)`. From that one declaration come the
constructor's validation (`validate`), the saved metadata (`dataclasses.asdict`), the command-line flags
(`cait_eqx.cli` builds them from `Spec`; its other int and number flags use `Whole` and `Real` too, so each
rule and its wording exist once here), and, for training, the fields a resumed run must keep
(`Spec.trajectory`). This module imports nothing heavy, so that `cait-eqx --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Check",
    "OneOf",
    "Real",
    "Spec",
    "Whole",
    "boolean",
    "flag_name",
    "hyper",
    "specs",
    "validate",
]


def _bound(value: float) -> str:
    return "inf" if value == math.inf else f"{value:g}"


class Check:
    """Checks one value and returns it normalised (an int where an int goes, a float where a float goes).

    A failing check raises `ValueError` with a message that starts after the field's name, e.g.
    `"must be >= 1, got 0"`; `validate` and the CLI put the name (or the flag) in front.
    """

    #: What a command-line string is turned into before the check (int, float, str or bool).
    kind: type = str
    #: `None` is allowed (and means "off" or "derived"; the field's help says which).
    optional: bool = False

    def __call__(self, value: Any) -> Any:
        if value is None and self.optional:
            return None
        return self.check(value)

    def check(self, value: Any) -> Any:
        return value

    def parse(self, text: str) -> Any:
        """A command-line string → a checked value (raises `ValueError` with a message for the user)."""
        if self.kind is int:
            try:
                value: Any = int(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
        elif self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        else:
            value = text
        return self.check(value)


@dataclasses.dataclass(frozen=True)
class Whole(Check):
    """An int `>= minimum` (a bool is not an int here; a NumPy integer is).

    **Arguments:**

    - `minimum`: the smallest value allowed.
    - `optional`: whether `None` is allowed too.
    """

    minimum: int = 1
    optional: bool = False
    kind = int

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"must be an int >= {self.minimum}, got {value!r} of type {type(value).__name__}"
            )
        if value < self.minimum:
            raise ValueError(f"must be >= {self.minimum}, got {value}")
        return int(value)


@dataclasses.dataclass(frozen=True)
class Real(Check):
    """A finite real number in an interval (an int or a NumPy scalar is a fine float).

    **Arguments:**

    - `low`, `high`: the interval's ends (default: the whole line).
    - `low_open`, `high_open`: whether that end is excluded (`(0, 1]`: `low_open=True`).
    - `optional`: whether `None` is allowed too.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    kind = float

    @property
    def interval(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}"
            f"{')' if self.high_open else ']'}"
        )

    def check(self, value: Any) -> float:
        finite = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if finite:
            try:
                number = float(value)
            except OverflowError:
                finite = False
        if not finite or not math.isfinite(number):
            kind = " or None" if self.optional else ""
            raise ValueError(f"must be a finite number{kind}, got {value!r}")
        below = number <= self.low if self.low_open else number < self.low
        above = number >= self.high if self.high_open else number > self.high
        if below or above:
            raise ValueError(f"must be in {self.interval}, got {value!r}")
        return number


@dataclasses.dataclass(frozen=True)
class OneOf(Check):
    """One of a few names.

    **Arguments:**

    - `choices`: the names allowed.
    - `optional`: whether `None` is allowed too.
    """

    choices: tuple[str, ...] = ()
    optional: bool = False
    kind = str

    def check(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class _Boolean(Check):
    kind = bool

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be a bool, got {value!r}")
        return value


boolean = _Boolean()


@dataclasses.dataclass(frozen=True)
class Spec:
    """What `hyper` records about a field (in `field.metadata["spec"]`).

    - `help`: one sentence for the docs and `--help`.
    - `check`: a `Check`, or a callable `value -> value` raising `ValueError` (then the CLI passes the
        string through it, so it must also accept strings), or `None` (checked by the class itself).
    - `flag`: the command-line flag, default `--field-name`; `None` with `cli=False`.
    - `cli`: whether the field has a flag (`False` for values that come from elsewhere, e.g. the data).
    - `metavar`: the placeholder in `--help`.
    - `trajectory`: changing it changes the sequence of parameters a run goes through, so a resumed run
        must keep it.
    - `group`: which `TrainConfig` part it belongs to (e.g. `"step"`: what happens to a batch in the step).
    """

    help: str
    check: Callable[[Any], Any] | None = None
    flag: str | None = None
    cli: bool = True
    metavar: str | None = None
    trajectory: bool = False
    group: str = ""


def hyper(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    check: Callable[[Any], Any] | None = None,
    flag: str | None = None,
    cli: bool = True,
    metavar: str | None = None,
    trajectory: bool = False,
    group: str = "",
) -> Any:
    """A dataclass field that carries its `Spec`: `dim: int = hyper(help="token width", check=Whole())`."""
    spec = Spec(
        help=help, check=check, flag=flag, cli=cli, metavar=metavar, trajectory=trajectory, group=group
    )
    return dataclasses.field(default=default, metadata={"spec": spec})


def specs(cls_or_instance: Any) -> dict[str, Spec]:
    """The `Spec` (help, check, flag) of every field of a config dataclass, in declaration order.

    Public as `cait_eqx.hyperparameters(cait_eqx.CaiTConfig)` (and `cait_eqx.training.TrainConfig`).
    """
    return {
        field.name: field.metadata["spec"]
        for field in dataclasses.fields(cls_or_instance)
        if "spec" in field.metadata
    }


def flag_name(name: str, spec: Spec) -> str:
    """The command-line flag of field `name`."""
    return spec.flag or "--" + name.replace("_", "-")


def validate(instance: Any, prefix: str = "", names: Sequence[str] | None = None) -> None:
    """Run the check of every field (or of `names`) of a frozen dataclass and store the normalised values.

    Raises `ValueError("{prefix}`name` must be ...")` on the first field that fails.
    """
    for name, spec in specs(instance).items():
        if spec.check is None or (names is not None and name not in names):
            continue
        value = getattr(instance, name)
        try:
            checked = spec.check(value)
        except ValueError as error:
            raise ValueError(f"{prefix}`{name}` {error}.") from None
        object.__setattr__(instance, name, checked)
