"""File-system helpers used by every writer: atomic replacement and file hashing (one implementation each)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"  # in the names of the temp files atomic_write leaves behind when killed (see cleanup_temps)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def cleanup_temps(folder: str | Path) -> None:
    """Remove the temp files of atomic_write that a killed run left behind in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name:
            try:
                p.unlink()
            except OSError:
                pass


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in chunks (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def refused_writes(what: str, error: type | None = None):
    """Map a refused write (permission denied, read-only file system, a file where a folder should be) to one line
    naming the path, as `error` (a VisearchError class; DatasetError by default); other errors pass unchanged."""
    from .errors import DatasetError

    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            raise
        raise (error or DatasetError)(f"cannot write {e.filename or what}: {e.strerror or e}",
                                      f"{what} must be a writable folder; nothing already written was changed") \
            from None
