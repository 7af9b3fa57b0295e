"""Atomic file writes: a reader never sees a half-written file under the target name.

A write that runs out of space (`ENOSPC`, `EDQUOT`) or past a file-size limit (`EFBIG`) raises
`DiskFullError`, which names the file, the bytes it needed and the bytes free; `check_writable_dir` tells,
before any work, whether files can be created in a folder at all (`NotWritableError`). Both are
`StorageError`s, which are `OSError`s.

Every file is written under a temporary name beside its target, flushed to disk, then renamed over the
target. The temporary file is created as `open(path, "w")` creates a file (mode `0o666` less the process
umask, or the directory's default ACL), not with `tempfile.mkstemp`'s private `0o600`; an existing target
keeps its mode, as it would when rewritten in place. No umask is read or changed, so threads are safe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "DiskFullError",
    "NotWritableError",
    "StorageError",
    "atomic_open",
    "atomic_write_bytes",
    "check_writable_dir",
]

# As tempfile.mkstemp opens its files (no following a planted link, not inherited by children), but with the
# default mode of a new file: the kernel applies the umask, exactly as for the user's own files.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL
for _flag in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"):  # those this platform has
    _CREATE_FLAGS |= getattr(os, _flag, 0)
_NEW_FILE_MODE = 0o666
_NAME_ATTEMPTS = 100
# Out of space: the device (ENOSPC), the user's quota (EDQUOT), or one file's size limit (EFBIG: `ulimit -f`,
# or a file system's largest file).
_FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code)


class StorageError(OSError):
    """A file cannot be written where it was asked for: the disk is full, or the folder cannot be written.

    An `OSError`; `str(error)` is one sentence saying what happened and what to do. `filename` is the file
    or folder concerned.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.filename = None if path is None else str(path)
        self.errno = code

    def __str__(self) -> str:
        return self.message

    def with_note(self, note: str) -> StorageError:
        """The same error with `note` (what is safe, how to continue) added to its message."""
        new = type(self)(f"{self.message} {note}", path=self.filename, code=self.errno)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k != "message"})
        return new


class DiskFullError(StorageError):
    """A write ran out of space (`ENOSPC`, `EDQUOT`) or past a file-size limit (`EFBIG`).

    Nothing is half-written: the file under its real name keeps its previous content (or stays absent) and
    no temporary file is left. `needed` is the size of the whole file in bytes (`None` if unknown), `free`
    the bytes free on its file system when the write failed.
    """

    needed: int | None = None
    free: int | None = None

    @classmethod
    def from_error(cls, error: OSError, path: str | os.PathLike, needed: int | None) -> DiskFullError | None:
        """`error` (raised writing `path`, a file of `needed` bytes) as a `DiskFullError`, or `None` when it
        is not about space (`ENOSPC`, `EDQUOT`, `EFBIG`).

        The message names the file, the bytes needed and the bytes free on its file system (and the
        file-size limit, for `EFBIG` past `ulimit -f`).
        """
        target = Path(path)
        if isinstance(error, DiskFullError) or error.errno not in _FULL:
            return None
        free = _free_bytes(target.parent)
        sizes = f"it needs {_count(needed)} bytes and {_count(free)} bytes are free on that file system"
        if error.errno == errno.EFBIG:
            limit = _file_size_limit()
            cause = (
                f"larger than this process may write to one file (its file-size limit, `ulimit -f`, is "
                f"{limit:,} bytes)" if limit is not None and needed is not None and needed > limit
                else "larger than the file system allows for one file"
            )
            what = f"File too large: cannot write {target}, {cause}; {sizes}."
        else:
            what = f"No space left on the device to write {target}: {sizes}."
        full = cls(f"{what} Nothing was left half-written.", path=target, code=error.errno)
        full.needed, full.free = needed, free
        return full


class NotWritableError(StorageError):
    """A folder in which no file can be created: a read-only file system, no permission, or a path that
    names a file (or passes through one) where a folder is needed. Raised before any work is done."""


def _free_bytes(directory: Path) -> int | None:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(directory).free
    return None


def _file_size_limit() -> int | None:
    """This process's file-size limit in bytes (`ulimit -f`), `None` when unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _count(value: int | None) -> str:
    return "an unknown number of" if value is None else f"{value:,}"


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

    **Raises:** `DiskFullError` (the bytes needed unknown here; `atomic_write_bytes` knows them) when the disk
    is full or the file over a file-size limit, after removing the temporary file.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', got {mode!r}.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = _create_temporary(target)
    except OSError as error:  # no room even for an empty file (no inode left)
        full = DiskFullError.from_error(error, target, None)
        if full is not None:
            raise full from None
        raise
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _final_mode(target, tmp_name))
        os.replace(tmp_name, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        full = DiskFullError.from_error(error, target, None) if isinstance(error, OSError) else None
        if full is not None:
            raise full from None
        raise
    _fsync_directory(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | tuple[bytes | memoryview, ...]) -> Path:
    """Write `data` to `path` atomically (see `atomic_open`).

    **Arguments:**

    - `path`: the file to produce; its parent folders are created.
    - `data`: its whole content, or its parts in order (written one after the other, never joined in memory).

    **Returns:** `path` as a `Path`.

    **Raises:** `DiskFullError`, naming the file's size and the space free, when the device is full or the
    file is over a file-size limit; the previous file under `path` is kept and no temporary file is left.
    """
    parts = (data,) if isinstance(data, bytes) else data
    try:
        with atomic_open(path, "wb") as handle:
            for part in parts:
                handle.write(part)
    except DiskFullError as error:  # the size is known here: say it
        needed = sum(memoryview(part).nbytes for part in parts)
        raise DiskFullError.from_error(OSError(error.errno, ""), Path(path), needed) from None
    return Path(path)


def check_writable_dir(directory: str | os.PathLike, what: str) -> Path:
    """Raise `NotWritableError` unless files can be created in `directory` (or in the folder that would
    hold it, when it does not exist yet); checked before any work, so a run cannot fail at its first write.

    Permission bits do not tell (root ignores them; a read-only mount does not show in them): a file is
    created (exclusively, under a random name) and removed in the nearest existing folder. Nothing is
    created or left behind.

    **Arguments:**

    - `directory`: the folder to write into.
    - `what`: what will be written there, for the message (e.g. "the run directory").

    **Returns:** `directory` as a `Path`.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "it is a file" if existing == directory else f"{existing} is a file, not a folder"
        raise NotWritableError(
            f"Cannot write {what} to {directory}: {where}. Give a folder path (one that does not pass "
            f"through a file).", path=directory, code=errno.ENOTDIR,
        )
    try:
        fd, name = _create_temporary(existing / ".cait_eqx-write-probe")
    except OSError as error:
        raise NotWritableError(
            f"Cannot write {what} to {directory}: no file can be created in {existing} ({error.strerror}; a "
            f"read-only file system or a folder without write permission). Choose a folder you can write.",
            path=directory, code=error.errno,
        ) from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
    return directory
