"""Atomic file writes: a reader never sees a half-written file under the target name.

Every file is written under a temporary name beside its target, flushed to disk, then renamed over the
target. The temporary file is created as `open(path, "w")` creates a file (mode `0o666` less the process
umask, or the directory's default ACL), not with `tempfile.mkstemp`'s private `0o600`; an existing target
keeps its mode, as it would when rewritten in place. No umask is read or changed, so threads are safe.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_with"]

# As tempfile.mkstemp opens its files (no following a planted link, not inherited by children), but with the
# default mode of a new file: the kernel applies the umask, exactly as for the user's own files.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL
for _flag in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):  # those this platform has
    _CREATE_FLAGS |= getattr(os, _flag, 0)
_NEW_FILE_MODE = 0o666
_NAME_ATTEMPTS = 100


def _create_temporary(target: Path) -> tuple[int, str]:
    """Create an empty temporary file beside `target`; returns its descriptor and name."""
    for _ in range(_NAME_ATTEMPTS):
        name = str(target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, _CREATE_FLAGS, _NEW_FILE_MODE), name
        except FileExistsError:
            continue
    raise FileExistsError(
        f"Could not create a temporary file beside {target}: {_NAME_ATTEMPTS} random names were all taken. "
        f"Remove the stale `.{target.name}.*.tmp` files in {target.parent}."
    )


def _final_mode(target: Path, tmp_name: str) -> int:
    """The mode the file must end with: the previous file's, else the one the new file was created with."""
    # Rewriting a file must not widen (or narrow) the permissions its owner gave it.
    with contextlib.suppress(FileNotFoundError):
        return stat.S_IMODE(os.stat(target).st_mode)
    return stat.S_IMODE(os.stat(tmp_name).st_mode)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some platforms and filesystems cannot open a directory, which is fine.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    If the body raises (or the process dies), `path` keeps its previous content (or stays absent) and the
    temporary file is removed (or left as an ignorable `.tmp` file after a hard kill).

    **Arguments:**

    - `path`: the file to produce; its parent folders are created.
    - `mode`: `"wb"` (bytes) or `"w"` (text).

    **Returns:** a context manager giving the open temporary file. The file gets the permissions any new
    file of the user gets (`0o666` less the umask), or the previous file's mode if `path` existed.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', got {mode!r}.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(target)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _final_mode(target, tmp_name))
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_open`).

    **Arguments:**

    - `path`: the file to produce; its parent folders are created.
    - `data`: its whole content.

    **Returns:** `path` as a `Path`.
    """
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Atomically produce `path` with a `writer(tmp_path)` that writes a whole file by name (safetensors).

    **Arguments:**

    - `path`: the file to produce; its parent folders are created.
    - `writer`: called once with the temporary file's name (the file exists, empty); it writes the content.

    **Returns:** `path` as a `Path`, with the same permissions as from `atomic_open`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(target)
    os.close(fd)
    try:
        mode = _final_mode(target, tmp_name)
        writer(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)  # last: the final mode may be read-only
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)
    return target
