"""XLA flags for this CPU: what we recommend, what is in force, and how the two combine.

XLA reads `XLA_FLAGS` once, when JAX starts its CPU backend (the first computation, not `import jax`), so a
flag must be in the environment before then. The library never sets it: `recommended_xla_flags()` returns
the flags, the user (or the `cait-eqx` program, which is the process's owner) puts them in the environment.
A flag the user has set keeps the user's value (`with_recommended_xla_flags`).

Which flags, and why, is measured by `benchmarks/step_settings.py` (benchmarks/README.md, "Settings before
start-up"). Nothing recommended here changes the numbers beyond float32 rounding: fast math and lower
precisions are never recommended.
"""

from __future__ import annotations

import os

__all__ = ["cpu_isa", "recommended_xla_flags", "with_recommended_xla_flags", "xla_flags_in_force"]

ISAS = ("AVX-512", "AVX2", "other")

# Per vector extension of an x86 CPU: the flags that made the training step faster on machines of that kind,
# side by side in `benchmarks/step_settings.py` (see benchmarks/README.md for the figures). Empty: nothing
# measured faster than XLA's defaults.
RECOMMENDED: dict[str, tuple[str, ...]] = {
    "AVX-512": (),
    "AVX2": (),
    "other": (),
}


def cpu_isa(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This CPU's widest x86 vector extension: `"AVX-512"`, `"AVX2"`, or `"other"` (no AVX2, not x86, or
    `/proc/cpuinfo` unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    except OSError:
        pass
    return "other"


def recommended_xla_flags(isa: str | None = None) -> str:
    """The XLA flags we recommend for a CPU with vector extension `isa` (default: this CPU's, `cpu_isa()`),
    as one string to put in `XLA_FLAGS` before JAX starts; `""` when XLA's defaults are best.

    **Example:** in a shell,
    `XLA_FLAGS="$(python -c 'import cait_eqx; print(cait_eqx.recommended_xla_flags())')" python train.py`;
    in a script, before its first JAX computation,
    `os.environ["XLA_FLAGS"] = cait_eqx.with_recommended_xla_flags(os.environ.get("XLA_FLAGS", ""))`.
    """
    isa = cpu_isa() if isa is None else isa
    if isa not in RECOMMENDED:
        raise ValueError(f"isa must be one of {', '.join(map(repr, ISAS))}, got {isa!r}")
    return " ".join(RECOMMENDED[isa])


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-")


def with_recommended_xla_flags(user_flags: str, isa: str | None = None) -> str:
    """`user_flags` (an `XLA_FLAGS` value) with every recommended flag the user has not set added in front:
    a flag the user set keeps the user's value."""
    user = user_flags.split()
    names = {_flag_name(f) for f in user}
    ours = [f for f in recommended_xla_flags(isa).split() if _flag_name(f) not in names]
    return " ".join(ours + user)


def xla_flags_in_force() -> str:
    """The `XLA_FLAGS` of this process's environment (what XLA reads when JAX starts its backend); recorded
    in every run's `config.json` and `summary.json` and in every benchmark's JSON."""
    return os.environ.get("XLA_FLAGS", "")
