"""`cait_eqx.training.configure_allocator` and `release_free_memory`: glibc's malloc set up in-process.

What would be wrong: settings that are recorded but never reach glibc (a large block still mapped afresh by a
thread, as XLA's worker threads allocate), settings applied without being asked (at import, under "default",
or under "auto", which follows the measurement), memory that `release_free_memory` cannot give back, or a
crash where the C library is not glibc. Each check of glibc's behaviour runs in a child process, so this test
process keeps its allocator as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cait_eqx.training import ALLOCATOR_MODES, AllocatorSettings, configure_allocator, release_free_memory

REUSE_SETTINGS = {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}

# A child that imports the module, applies a mode, then, from a new thread (as XLA allocates), takes 256 MB
# with malloc, touches it and frees it, and reports what glibc's `mallinfo2` said at each point, in MB.
CHILD = textwrap.dedent(
    """
    import ctypes, json, sys, threading
    from cait_eqx.training import configure_allocator, release_free_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    SIZE = 256 * 2**20

    def info():
        m = libc.mallinfo2()
        return dict(heap=m.arena / 2**20, free=m.fordblks / 2**20, mapped=m.hblkhd / 2**20)

    record = None if sys.argv[1] == "none" else configure_allocator(sys.argv[1])
    out = dict(record=None if record is None else dict(mode=record.mode, libc=record.libc,
               applied=dict(record.applied), note=record.note, active=record.active))

    def work():
        out["before"] = info()
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        out["allocated"] = info()
        libc.free(block)
        out["freed"] = info()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    out["released"] = release_free_memory()
    out["trimmed"] = info()
    print(json.dumps(out))
    """
)

GLIBC = configure_allocator("default").libc is not None  # "default" touches nothing; it only looks


def _child(mode: str, **env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mapped_afresh(out: dict) -> bool:
    """Whether the 256 MB block was served by its own `mmap` (and so given back at `free`)."""
    return out["allocated"]["mapped"] - out["before"]["mapped"] >= 255


def _kept_in_heap(out: dict) -> bool:
    """Whether the 256 MB block came from the heap and stayed there, free, after `free`."""
    # The heap may have had some room already: it grows by most of the block, and then holds all of it free.
    return out["freed"]["heap"] - out["before"]["heap"] >= 200 and out["freed"]["free"] >= 250


def test_reuse_keeps_a_threads_large_block_in_the_heap_until_released():
    out = _child("reuse")
    record = out["record"]
    assert record["mode"] == "reuse"
    if not GLIBC:  # not glibc: nothing to set, and the record says so
        assert record["applied"] == {} and not record["active"] and "not glibc" in record["note"]
        assert out["released"] is False
        return
    assert record["applied"] == REUSE_SETTINGS
    assert record["active"] and record["libc"].startswith("glibc ")
    assert not _mapped_afresh(out), out  # glibc really took the settings: no mmap for the thread's block
    assert _kept_in_heap(out), out  # ... and the freed block stays mapped, ready for the next step
    # `malloc_trim(0)` hands it back: the heap shrinks by (at least most of) the block.
    assert out["released"] is True
    assert out["freed"]["heap"] - out["trimmed"]["heap"] >= 200, out


def test_default_and_import_leave_glibc_as_it_is():
    """glibc's own behaviour, as seen by a process that never imports the module, is what a process gets that
    imports it and calls "default": a large block mapped on its own and unmapped at `free`."""
    plain, default = _child("none"), _child("default")
    assert default["record"]["applied"] == {} and not default["record"]["active"]
    if GLIBC:
        for out in (plain, default):
            assert _mapped_afresh(out) and not _kept_in_heap(out), out
            assert out["freed"]["mapped"] - out["before"]["mapped"] < 1, out  # unmapped at free


def test_auto_follows_the_measurement_and_leaves_glibc_alone():
    """`benchmarks/allocator.py` found "reuse" no faster than glibc's own settings, so "auto" (the CLI's
    default) must not change the allocator: a large block is still mapped on its own."""
    out = _child("auto")
    record = out["record"]
    assert record["mode"] == "auto" and record["applied"] == {} and not record["active"]
    if GLIBC:
        assert "'reuse' was not measured faster" in record["note"]
        assert _mapped_afresh(out) and not _kept_in_heap(out), out


@pytest.mark.parametrize(
    "env",
    [{"MALLOC_ARENA_MAX": "2"}, {"MALLOC_MMAP_MAX_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}],
)
def test_reuse_applies_whatever_the_environment_says(env):
    """An explicit request: the `mallopt` settings win over the environment's start-up settings."""
    out = _child("reuse", **env)
    assert out["record"]["applied"] == (REUSE_SETTINGS if GLIBC else {})
    if GLIBC:
        assert not _mapped_afresh(out) and _kept_in_heap(out), out


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match=r"`allocator` must be one of 'auto', 'default', 'reuse', got 'fast'"
    ):
        configure_allocator("fast")
    assert ALLOCATOR_MODES == ("auto", "default", "reuse")


@pytest.mark.parametrize("mode", ALLOCATOR_MODES)
def test_off_linux_every_mode_is_a_no_op_that_says_so(monkeypatch, mode):
    monkeypatch.setattr(sys, "platform", "darwin")
    record = configure_allocator(mode)
    assert isinstance(record, AllocatorSettings)
    assert record.mode == mode and record.libc is None and record.applied == {} and not record.active
    if mode != "default":
        assert record.note == "allocator left as it is: the C library is not glibc on Linux."
    assert release_free_memory() is False


def test_the_library_never_replaces_the_process(monkeypatch, tmp_path, capsys):
    """No process tricks (the old `cait-eqx train` re-executed itself to set a glibc tunable): the command
    line answers, and reports a missing run directory, in the process that called it, and no module of the
    package calls an `exec` function."""
    import pathlib
    import re

    import cait_eqx
    from cait_eqx import cli

    calls = []
    for name in [n for n in dir(os) if n.startswith(("exec", "posix_spawn", "spawn"))]:
        monkeypatch.setattr(os, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and cait_eqx.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", str(tmp_path / "no-run")])
    assert info.value.code == 2  # the missing run directory is reported as usual, by this same process
    assert "no-run" in capsys.readouterr().err
    assert calls == []
    package = pathlib.Path(cait_eqx.__file__).parent
    pattern = re.compile(r"\bos\.(exec\w*|posix_spawn\w*|spawn\w*)\b|\bexecv")
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == [], f"process-replacing calls in {offenders}"
