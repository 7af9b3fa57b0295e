"""The `cait-eqx` command: `train` (the README's main job), `evaluate`, `predict`, `attention` and `plot`.

`cait-eqx train` with no arguments trains the default small CaiT on scikit-learn's digits and writes a run
directory; `cait-eqx train --resume RUN_DIR` continues it exactly; `cait-eqx evaluate RUN_DIR` reports
top-1/top-5 and the confusion matrix; `cait-eqx predict MODEL IMAGES...` classifies image files. Bad flag
values are one-line usage errors with exit status 2.

One module per command (`train`, `evaluate`, `predict`, `attention`, `plot`), each mapping its flags to public
calls of `cait_eqx`, `cait_eqx.training`, `cait_eqx.data`, `cait_eqx.parallel` and `cait_eqx.viz`. Building
the parser imports no JAX (the flags come from the pure-Python config dataclasses): `--help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from . import attention, evaluate, plot, predict, train
from ._parser import UsageParser

__all__ = ["build_parser", "main"]

COMMANDS = (train, evaluate, predict, attention, plot)


def build_parser() -> argparse.ArgumentParser:
    """The `cait-eqx` argument parser with all its sub-commands.

    **Returns:** an `argparse.ArgumentParser` whose parsed arguments carry `func(args) -> int`, the command.
    """
    import cait_eqx

    parser = UsageParser(
        prog="cait-eqx",
        description="CaiT in Equinox: train, evaluate and look inside Class-Attention image Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"cait-eqx {cait_eqx.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """The line printed after a Ctrl-C that interrupted a command (the training loop stops by itself)."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None:
        return "cait-eqx: interrupted"
    from cait_eqx import training

    run = training.Run(run_dir)
    if run.exists:
        hint = f"continue from its newest checkpoint with: cait-eqx train --resume {run_dir}"
        return f"cait-eqx: interrupted; {hint}"
    return f"cait-eqx: interrupted; the run had not started (no {run.config_path} yet): start it again"


def use_recommended_xla_flags() -> None:
    """Put the XLA flags recommended for this CPU (`cait_eqx.recommended_xla_flags`) in this process's
    `XLA_FLAGS`, before JAX starts its backend. Only the `cait-eqx` program does this: it owns its process,
    the library never changes a user's. A flag the user set in `XLA_FLAGS` keeps the user's value; the flags
    in force are recorded in the run's `config.json` and `summary.json` (`runtime.xla_flags`)."""
    import cait_eqx

    flags = cait_eqx.with_recommended_xla_flags(os.environ.get("XLA_FLAGS", ""))
    if flags:
        os.environ["XLA_FLAGS"] = flags


def main(argv: list[str] | None = None) -> int:
    """Run `cait-eqx` with `argv` (default `sys.argv[1:]`); returns the exit status.

    **Arguments:**

    - `argv`: the command line without the program name, e.g. `["train", "--quick"]`; `None`: `sys.argv[1:]`
        (the `cait-eqx` program).

    The program (`argv=None`) first sets the XLA flags recommended for this CPU (`use_recommended_xla_flags`).

    **Returns:** 0 on success, 1 on an error the command reports (a full disk included: one line naming the
    file, the space needed and free, and what is safe), 2 on a usage error (raised as `SystemExit`
    by the parser), 130 when interrupted (Ctrl-C or SIGTERM; a training run saves a checkpoint first).
    """
    if argv is None:
        use_recommended_xla_flags()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.as_program = argv is None  # the `cait-eqx` program (a fresh process), not `main([...])` from Python
    try:
        return int(args.func(args))
    except OSError as error:
        import cait_eqx

        if not isinstance(error, cait_eqx.StorageError):
            raise
        # A full disk or a folder that cannot be written: the message says what is safe and how to go on.
        print(f"cait-eqx {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if argv is None:  # the `cait-eqx` program: another Ctrl-C must not interrupt the way out
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(_interrupted(args), file=sys.stderr)
        if argv is None:
            # Leave without interpreter teardown, which can abort in C++ ("terminate called ...") while a
            # background thread is still inside JAX. Nothing is lost: every file is written atomically and
            # the metrics one whole line per write; the standard streams are flushed here.
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os._exit(130)
        return 130
