"""`cait_eqx.restart_with_huge_pages` and `cait-eqx`'s use of it.

What would be wrong: restarting where the tunable changes nothing or the user chose otherwise (their own
`GLIBC_TUNABLES`, `CAIT_EQX_HUGE_PAGES=0`), dropping their other tunables, restarting with other arguments or
in a loop, or a restarted process whose glibc does not in fact ask the kernel for huge pages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import cait_eqx
from cait_eqx import _hugepages, cli
from cait_eqx._hugepages import huge_pages_environment, transparent_huge_pages_mode

LINUX = dict(thp_mode="madvise", glibc=(2, 36), system="linux")


def test_the_tunable_is_added_where_it_changes_something():
    env = huge_pages_environment({"PATH": "/bin"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", _hugepages.RESTARTED: "1"}
    assert huge_pages_environment(env, **LINUX) is None  # the restarted process does not restart again


def test_other_tunables_are_kept():
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env is not None
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("value", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1", "x=1:glibc.malloc.hugetlb=0"])
def test_the_users_own_setting_stands(value):
    assert huge_pages_environment({"GLIBC_TUNABLES": value}, **LINUX) is None


@pytest.mark.parametrize("value", ["0", "off", "false", "no", " OFF "])
def test_opt_out(value):
    assert huge_pages_environment({"CAIT_EQX_HUGE_PAGES": value}, **LINUX) is None


@pytest.mark.parametrize(
    "where",
    [
        dict(thp_mode="always", glibc=(2, 36), system="linux"),  # every large mapping gets huge pages already
        dict(thp_mode="never", glibc=(2, 36), system="linux"),  # none can
        dict(thp_mode=None, glibc=(2, 36), system="linux"),  # unknown kernel setting
        dict(thp_mode="madvise", glibc=(2, 34), system="linux"),  # glibc before the tunable
        dict(thp_mode="madvise", glibc=None, system="linux"),  # musl
        dict(thp_mode="madvise", glibc=(2, 36), system="darwin"),
    ],
)
def test_no_restart_where_it_would_change_nothing(where):
    assert huge_pages_environment({}, **where) is None


def test_kernel_mode_is_read_from_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert transparent_huge_pages_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert transparent_huge_pages_mode(str(path)) == "always"
    path.write_text("garbage\n")
    assert transparent_huge_pages_mode(str(path)) is None
    assert transparent_huge_pages_mode(str(tmp_path / "missing")) is None


# A child that restarts itself (with the platform checks made to pass, so that the restart path runs on any
# Linux machine), then allocates 64 MB with glibc's malloc and reports whether glibc asked the kernel for huge
# pages for that mapping: `hg` in its VmFlags (/proc/self/smaps) is MADV_HUGEPAGE.
CHILD = textwrap.dedent(
    """
    import ctypes, os, sys
    from cait_eqx import _hugepages
    print("start", os.getpid(), flush=True)
    if os.environ.get("FORCE_APPLICABLE") == "1":
        _hugepages.transparent_huge_pages_mode = lambda: "madvise"
        _hugepages._glibc_version = lambda: (2, 36)
    restarted = _hugepages.restart_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    address = libc.malloc(64 * 2**20)
    flags = None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    print("done", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), "hg" in (flags or []), sys.argv[1:])
    """
)


def _run_child(env_extra: dict[str, str]):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CAIT_EQX_HUGE_PAGES")}
    env.pop(_hugepages.RESTARTED, None)
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "--an-argument", "kept"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    starts = [ln.split()[1] for ln in lines if ln.startswith("start")]
    done = [ln.split(" ", 4) for ln in lines if ln.startswith("done")]
    assert len(done) == 1, proc.stdout
    return starts, done[0][1:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc tunables are Linux things")
def test_restarted_process_asks_the_kernel_for_huge_pages():
    starts, (pid, tunables, huge, argv) = _run_child({"FORCE_APPLICABLE": "1"})
    assert starts == [pid, pid], "the code before the call runs again, once, in the same process"
    assert argv == "['--an-argument', 'kept']"
    assert tunables == "glibc.malloc.hugetlb=1"
    glibc = _hugepages._glibc_version()
    if glibc is not None and glibc >= (2, 35) and transparent_huge_pages_mode() == "madvise":
        assert huge == "True", "glibc did not madvise(MADV_HUGEPAGE) a 64 MB allocation"

    # Without the restart (opted out), glibc does not ask for huge pages.
    starts, (pid, tunables, huge, argv) = _run_child({"FORCE_APPLICABLE": "1", "CAIT_EQX_HUGE_PAGES": "0"})
    assert starts == [pid] and tunables == "" and huge == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc tunables are Linux things")
def test_never_restarts_twice_even_if_the_tunable_is_dropped():
    """glibc's secure mode (a setuid or capability-bearing interpreter) erases the tunable from the
    environment at start-up; the restart marker must still stop a second restart."""
    starts, (pid, tunables, _, _) = _run_child(
        {"FORCE_APPLICABLE": "1", _hugepages.RESTARTED: "1", "GLIBC_TUNABLES": "x.y=1"}
    )
    assert starts == [pid] and tunables == "x.y=1"


def _fake_linux(monkeypatch, calls):
    monkeypatch.setattr(_hugepages, "transparent_huge_pages_mode", lambda: "madvise")
    monkeypatch.setattr(_hugepages, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(_hugepages, "_system", lambda: "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("CAIT_EQX_HUGE_PAGES", raising=False)
    monkeypatch.delenv(_hugepages.RESTARTED, raising=False)

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)


def test_the_cait_eqx_program_restarts_itself_with_the_same_arguments(monkeypatch):
    calls = []
    _fake_linux(monkeypatch, calls)
    monkeypatch.setattr(sys, "argv", ["cait-eqx", "train", "--epochs", "3"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "/bin/cait-eqx", "train", "--epochs", "3"])
    with pytest.raises(SystemExit):
        cli.main()
    [(path, argv, env)] = calls
    assert path == sys.executable
    assert argv == [sys.executable, "/bin/cait-eqx", "train", "--epochs", "3"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_failed_exec_leaves_the_process_running(monkeypatch):
    """An interpreter path that cannot be executed (embedded Python, a removed environment) is no crash."""
    calls = []
    _fake_linux(monkeypatch, calls)

    def failing_execve(path, argv, env):
        calls.append(path)
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(os, "execve", failing_execve)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "train.py"])
    assert cait_eqx.restart_with_huge_pages() is False and len(calls) == 1


@pytest.mark.parametrize("how", ["interactive", "notebook", "stdin", "frozen"])
def test_no_restart_where_state_would_be_lost(monkeypatch, how):
    calls = []
    _fake_linux(monkeypatch, calls)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "train.py"])
    if how == "interactive":
        monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    elif how == "notebook":
        monkeypatch.setitem(sys.modules, "ipykernel", sys)
    elif how == "stdin":
        monkeypatch.setattr(sys, "argv", ["-"])
    else:
        monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert cait_eqx.restart_with_huge_pages() is False and calls == []


def test_only_train_restarts(monkeypatch, tmp_path, capsys):
    """Evaluation and the picture commands are short and inference-only: no restart for them."""
    calls = []
    _fake_linux(monkeypatch, calls)
    monkeypatch.setattr(sys, "argv", ["cait-eqx", "evaluate", str(tmp_path / "no-run")])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2  # the missing run directory is reported as usual, by this same process
    assert calls == []
    assert "no-run" in capsys.readouterr().err


def test_main_called_from_python_never_restarts(monkeypatch, capsys):
    calls = []
    _fake_linux(monkeypatch, calls)
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and calls == []
    assert cait_eqx.__version__ in capsys.readouterr().out
