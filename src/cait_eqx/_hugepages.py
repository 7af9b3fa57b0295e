"""Transparent huge pages for the process, through glibc's `glibc.malloc.hugetlb` tunable.

Why it matters on the CPU: every call of a compiled train step asks the allocator for one large scratch buffer
(784 MB for `cait_xxs24_224` at batch 16: mostly the activations kept for the backward pass) and returns it at
the end. glibc serves a request that large with a fresh `mmap`, so each step first-touches the whole buffer
again: about 190,000 page faults and 0.3 s of kernel time per step, measured with `getrusage`. Where the
kernel's transparent huge pages are in `madvise` mode (the common default), glibc asks for huge pages only if
the tunable is set, and the same buffer then costs about 800 faults. The tunable is read once, when the
process starts, so the only way to set it from Python is to start the process again with it set.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["huge_pages_environment", "restart_with_huge_pages", "transparent_huge_pages_mode"]

TUNABLE = "glibc.malloc.hugetlb"
# Set to "0" to keep `cait-eqx` (and `restart_with_huge_pages`) from restarting the process.
OPT_OUT = "CAIT_EQX_HUGE_PAGES"
# Set in the restarted process: never restart twice, even where glibc drops the tunable from the environment
# (a setuid or capability-bearing interpreter runs in glibc's secure mode, which erases it).
RESTARTED = "CAIT_EQX_HUGE_PAGES_RESTARTED"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with the `glibc.malloc.hugetlb` tunable


def transparent_huge_pages_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (`"always"`, `"madvise"` or `"never"`), or None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _system() -> str:
    return sys.platform


def _glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def huge_pages_environment(
    environ: Mapping[str, str],
    *,
    thp_mode: str | None,
    glibc: tuple[int, ...] | None,
    system: str | None = None,
) -> dict[str, str] | None:
    """The environment to restart with so that glibc's malloc uses huge pages, or None where that would
    change nothing or is not wanted.

    None when: not Linux (`system`, default `sys.platform`) with glibc ≥ 2.35; the kernel's mode is not
    `madvise` (with `always` every large mapping gets huge pages already, with `never` none can);
    `GLIBC_TUNABLES` already names the tunable (the user's own choice stands, `=0` included);
    `CAIT_EQX_HUGE_PAGES=0`; or this process is itself the restarted one. Otherwise a copy of `environ` with
    `glibc.malloc.hugetlb=1` appended to `GLIBC_TUNABLES` (and the restart marker set).
    """
    system = _system() if system is None else system
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off") or RESTARTED in environ:
        return None
    if not system.startswith("linux") or glibc is None or glibc < _MIN_GLIBC or thp_mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0].strip() == TUNABLE for item in tunables.split(":")):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    env[RESTARTED] = "1"
    return env


def _interactive() -> bool:
    """An interactive interpreter, a notebook kernel, a script read from stdin or a frozen application: a
    restart would lose state, or has nothing to rerun."""
    return bool(
        sys.flags.interactive
        or hasattr(sys, "ps1")
        or "ipykernel" in sys.modules
        or "IPython" in sys.modules
        or bool(getattr(sys, "frozen", False))
        or sys.argv[:1] in ([""], ["-"])
        or not getattr(sys, "orig_argv", None)
    )


def restart_with_huge_pages() -> bool:
    """Start this Python process again, same interpreter, arguments and process id, with glibc's malloc
    asking for transparent huge pages. Returns False (and does nothing) where it would change nothing; else
    does not return.

    Call it first thing in a training script run on the CPU, before any work that should not be done twice:
    everything before the call runs again in the restarted process, and nothing of the first start survives
    (standard output and error are flushed; other open files, `atexit` handlers and `finally` blocks are not
    run). The script is found again by the path it was started with, so do not `chdir` before the call if
    that path is relative. `cait-eqx train` does this by itself. It made `cait_xxs24_224`'s train step 1.13×
    faster on the 2-core CPU machines of this project (see `benchmarks/README.md`).

    Does nothing in an interactive interpreter, a notebook kernel, a script read from stdin or a frozen
    application, and at most once per process. Opt out with the environment variable
    `CAIT_EQX_HUGE_PAGES=0`, or by setting `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` yourself.
    """
    if _interactive():
        return False
    env = huge_pages_environment(os.environ, thp_mode=transparent_huge_pages_mode(), glibc=_glibc_version())
    if env is None:
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:  # no usable interpreter path (embedded Python, a removed environment): carry on as we are
        return False
    return True  # not reached: `execve` replaces the process
