"""glibc's `malloc` set up for XLA's CPU train step, in this process, and only when asked.

Why: every call of a compiled train step on the CPU takes one large scratch buffer from `malloc` (hundreds of
MB: mostly the activations kept for the backward pass) and frees it at the end of the call. glibc serves a
request that large with a fresh `mmap` and gives it back with `munmap`, so each step faults the whole buffer
in again, 4 KB at a time. Three `mallopt` settings keep it in the heap instead, where the next step finds it
already mapped: one arena (`M_ARENA_MAX=1`; XLA allocates from worker threads, and a thread's own arena maps
large requests whatever the other settings say), no `mmap` for large requests (`M_MMAP_MAX=0`), and no giving
back of the heap's free top (`M_TRIM_THRESHOLD` at its largest). The price is memory held after the step; give
it back with `release_free_memory`. Measured side by side with glibc's huge-page tunable in
`benchmarks/README.md` ("Allocator"): it removes the page faults and most of the kernel time, but on the
machine measured the step was no faster and the heap held more, so it is an explicit choice, not a default.

Nothing here runs at import: `mallopt` changes the process's allocator for the rest of its life, so only a
caller who asks (`configure_allocator`, which `cait-eqx train --allocator` calls) gets it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from collections.abc import Mapping

__all__ = ["ALLOCATOR_MODES", "AllocatorSettings", "configure_allocator", "release_free_memory"]

# "auto": what the measurements recommend (see `configure_allocator`); "default": leave the allocator alone;
# "reuse": the settings below wherever glibc is found.
ALLOCATOR_MODES = ("auto", "default", "reuse")

# glibc's `mallopt` parameter numbers (<malloc.h>); they have been stable since glibc 2.x's first releases.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# `mallopt` takes an `int`: the largest trim threshold it accepts.
_NEVER_TRIM = 2**31 - 1
REUSE_SETTINGS: Mapping[str, int] = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": _NEVER_TRIM}
_PARAMETERS = {"M_ARENA_MAX": _M_ARENA_MAX, "M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD}


@dataclasses.dataclass(frozen=True)
class AllocatorSettings:
    """What `configure_allocator` did.

    **Fields:**

    - `mode`: the mode asked for, one of `ALLOCATOR_MODES`.
    - `libc`: the C library found, e.g. `"glibc 2.36"`, or `None` where it is not glibc.
    - `applied`: the `mallopt` parameters set, by their `<malloc.h>` names (`{}` when nothing was set).
    - `note`: one sentence saying what was done and why, for a log line.
    """

    mode: str
    libc: str | None
    applied: Mapping[str, int]
    note: str

    @property
    def active(self) -> bool:
        """Whether any `mallopt` setting was applied."""
        return bool(self.applied)


def _glibc() -> tuple[ctypes.CDLL | None, str | None]:
    """This process's C library and its glibc version, or `(None, None)` where it is not glibc on Linux."""
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # only glibc has it (musl, for one, does not)
    except (OSError, AttributeError):
        return None, None
    version.restype = ctypes.c_char_p
    return libc, f"glibc {version().decode()}"


def configure_allocator(mode: str) -> AllocatorSettings:
    """Set glibc's `malloc` up, in this process, so that the large buffer each train step takes is reused.

    Call it first thing, before JAX computes anything: the settings reach the threads that XLA starts after
    the call; a thread that has allocated already keeps its own arena, which still maps large requests.
    The settings last for the rest of the process. `cait-eqx train --allocator MODE` calls this.

    **Arguments:**

    - `mode`: `"reuse"` sets `M_ARENA_MAX=1`, `M_MMAP_MAX=0` and `M_TRIM_THRESHOLD=2**31-1` with `mallopt`
        wherever the C library is glibc. `"default"` changes nothing. `"auto"` applies
        `"reuse"` only where it was measured faster than glibc's own settings, which so far is nowhere: on
        Linux (glibc 2.36, 2 cores) it removed the page faults but not the time, and held more memory (see
        `benchmarks/README.md`, "Allocator"), so `"auto"` changes nothing today. What was faster there is
        glibc's huge-page tunable, which only the environment a process starts with can set: run
        `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 cait-eqx train ...` to choose it.

    **Returns:**

    An `AllocatorSettings` record of what was applied. Where the C library is not glibc (macOS, Windows, musl)
    nothing is set, whatever the mode, and its `note` says so.

    **Raises:**

    `ValueError` for a mode outside `ALLOCATOR_MODES`; `RuntimeError` if glibc refuses a setting.
    """
    if mode not in ALLOCATOR_MODES:
        raise ValueError(
            f"`allocator` must be one of {', '.join(repr(m) for m in ALLOCATOR_MODES)}, got {mode!r}; "
            "'default' leaves glibc's malloc as it is."
        )
    if mode == "default":
        return AllocatorSettings(mode, _glibc()[1], {}, "allocator left as it is (mode 'default').")
    libc, version = _glibc()
    if libc is None:
        return AllocatorSettings(
            mode, None, {}, "allocator left as it is: the C library is not glibc on Linux."
        )
    if mode == "auto":
        note = "allocator left as it is: 'reuse' was not measured faster than glibc's own settings."
        return AllocatorSettings(mode, version, {}, note)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for name, value in REUSE_SETTINGS.items():
        if mallopt(_PARAMETERS[name], value) != 1:
            raise RuntimeError(
                f"{version}'s mallopt refused {name}={value}; expected it to accept it. Run with "
                "`allocator='default'` (`--allocator default`) to leave the allocator alone."
            )
    return AllocatorSettings(
        mode,
        version,
        dict(REUSE_SETTINGS),
        "one malloc arena, no mmap for large blocks, no heap trimming: each step's scratch buffer is reused.",
    )


def release_free_memory() -> bool:
    """Give the memory `malloc` holds free back to the operating system (glibc's `malloc_trim(0)`).

    After training under `configure_allocator("reuse")` the heap keeps the last step's scratch buffer
    (hundreds of MB) for a next step; call this when no step follows. Harmless under any setting.

    **Returns:**

    Whether glibc gave any memory back; `False` where the C library is not glibc.
    """
    libc, _ = _glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1
