"""The XLA flags we recommend per CPU, how they combine with the user's, and that the program can still set
them (JAX has not started its backend when `cait-eqx`'s `main` runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cait_eqx
from cait_eqx import _xla_flags


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1")
    return str(path)


def test_the_vector_extension_is_read_from_cpuinfo(tmp_path):
    assert cait_eqx.cpu_isa(_cpuinfo(tmp_path, "avx avx2 fma avx512f avx512bw")) == "AVX-512"
    assert cait_eqx.cpu_isa(_cpuinfo(tmp_path, "avx avx2 fma")) == "AVX2"
    assert cait_eqx.cpu_isa(_cpuinfo(tmp_path, "avx")) == "other"
    assert cait_eqx.cpu_isa(str(tmp_path / "missing")) == "other"  # not Linux, or no /proc
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    expected = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "other"
    assert cait_eqx.cpu_isa() == expected


def test_every_vector_extension_has_a_recommendation_that_keeps_the_numbers():
    for isa in _xla_flags.ISAS:
        flags = cait_eqx.recommended_xla_flags(isa)
        assert isinstance(flags, str)
        # Fast math and lower precisions change the numbers: never recommended (issue 21, goal 4).
        assert "fast_math" not in flags and "bf16" not in flags.lower()
    assert cait_eqx.recommended_xla_flags() == cait_eqx.recommended_xla_flags(cait_eqx.cpu_isa())
    with pytest.raises(ValueError, match="isa must be one of 'AVX-512', 'AVX2', 'other', got 'avx2'"):
        cait_eqx.recommended_xla_flags("avx2")


def test_a_flag_the_user_set_keeps_the_users_value(monkeypatch):
    monkeypatch.setitem(_xla_flags.RECOMMENDED, "AVX2", ("--xla_a=1", "--xla_b=2"))
    assert cait_eqx.with_recommended_xla_flags("", "AVX2") == "--xla_a=1 --xla_b=2"
    # The user's --xla_b wins; the user's other flags are kept, after ours.
    assert cait_eqx.with_recommended_xla_flags("--xla_b=7 --xla_c", "AVX2") == "--xla_a=1 --xla_b=7 --xla_c"
    assert cait_eqx.with_recommended_xla_flags("--xla_c", "other") == "--xla_c"


def test_the_program_sets_its_flags_before_jax_starts_its_backend(tmp_path):
    """`cait-eqx`'s `main` puts the recommended flags in the environment before anything else: that only works
    if importing the package and building the parser start no JAX backend (XLA reads `XLA_FLAGS` then)."""
    code = (
        "import os, sys\n"
        "from cait_eqx import _xla_flags\n"
        "_xla_flags.RECOMMENDED[_xla_flags.cpu_isa()] = ('--xla_cpu_enable_fast_min_max=false',)\n"
        "import cait_eqx.cli as cli\n"
        "from jax._src import xla_bridge\n"
        "sys.argv = ['cait-eqx', '--version']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert not xla_bridge._backends, 'a JAX backend started before the flags were set'\n"
        "print(os.environ['XLA_FLAGS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_cpu_use_thunk_runtime=true"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (
        "--xla_cpu_enable_fast_min_max=false --xla_cpu_use_thunk_runtime=true"
    )
