"""Paths from untrusted places: ids read from dataset files, output files named on the command line.

Every id read from a file (gnd_*.pkl, sources.json, ground truth, a store) becomes a file name under the dataset
folder, so it must be one plain name: `check_id` refuses separators, `..`, absolute paths, NUL and control
characters. `inside` proves that a path we are about to write resolves inside a given folder (symlinks followed).
`check_writable` tests an output file's folder before a long run, so a bad `--html` or `--show` fails at once.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import DatasetError, UsageError

MAX_ID_LEN = 200  # file names are limited to 255 bytes; ids get ".jpg" (and temp suffixes) appended


def id_problem(image_id: object) -> str | None:
    """Why `image_id` cannot name a file inside the dataset folder, or None when it can."""
    if not isinstance(image_id, str):
        return f"is a {type(image_id).__name__}, not a string"
    if not image_id or image_id.strip() != image_id:
        return "is empty or has leading/trailing spaces"
    if image_id in (".", "..") or image_id.startswith("."):
        return "starts with a dot"
    if "/" in image_id or "\\" in image_id or (os.altsep and os.altsep in image_id):
        return "contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in image_id):
        return "contains NUL or control characters"
    if len(image_id.encode("utf-8", "surrogatepass")) > MAX_ID_LEN:
        return f"is longer than {MAX_ID_LEN} bytes"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def check_id(image_id: object, where: str | os.PathLike) -> str:
    """`image_id` when it is one safe file name (see `id_problem`); DatasetError naming `where` otherwise."""
    why = id_problem(image_id)
    if why:
        shown = repr(image_id)[:80]
        raise DatasetError(f"{where}: image id {shown} {why}; refusing it (ids name files inside the dataset folder)",
                           "fix or remove the file; ids are plain names such as `all_souls_000013`")
    return image_id  # type: ignore[return-value]


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` when it resolves (symlinks followed, `..` collapsed) to a place strictly inside `root`; DatasetError
    otherwise. Used before every write into a dataset folder."""
    r = Path(root).resolve()
    p = Path(path)
    resolved = (p.parent.resolve() / p.name) if p.name not in ("", ".", "..") else p.resolve()
    if resolved == r or r not in resolved.parents:
        raise DatasetError(f"refusing to write {p}: it is not inside {r}",
                           "a dataset file names a path outside the dataset folder")
    return p


def check_writable(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Fail now (UsageError, one line) when the output file `path` cannot be written: it is a folder, its suffix is
    not one of `suffixes`, or the nearest existing folder above it is not a writable folder (tested by creating
    and removing a temporary file there, which also catches read-only mounts and root without write rights)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder", f"give a file name for {what}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {p}: unsupported file type {p.suffix or '(none)'!r}",
                         f"use a name ending in {' or '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir would fail later
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {what} {p}: {parent} is not a folder", f"choose another path for {what}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".visearch-write-test-", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"cannot write {what} {p}: {parent}: {e.strerror or e}",
                         f"choose a writable folder for {what}") from None
    return p
