"""Descriptor store: the only module that imports h5py.

Layout: one folder per (dataset, model), `<data>/<name>/features/<model>/`, holding
  manifest.json      provenance (model, describe config, weights sha256, visearch and schema versions, dim, dtypes,
                     local fields) and the list of committed shards: file, row count, byte size, uid, dead-row file;
  shard-<n>.h5       immutable HDF5 files (any number of digits, five at least): `ids` [n] and `fingerprints` [n]
                     as fixed-length utf-8 byte strings (one width per shard, so a shard's ids are one numpy read),
                     `keys` / `fp_keys` [n] int64 (their visearch.idkeys keys), `global` [n, D], `local/<field>`;
  dead-<n>-<token>.npy  the sorted dead (tombstoned) rows of shard n, immutable, named by the manifest.

Why shards plus an atomically replaced manifest instead of one growing HDF5 file: HDF5 is not crash-safe while it is
being appended to (a SIGKILL mid-write can corrupt the whole file) and a reader racing a writer can see torn metadata.
Here a shard is written to a temporary name, fsync'd and renamed, and only then listed in a new manifest (temp + fsync +
rename). A crash leaves at worst an unlisted temp file; a reader sees the old or the new manifest, each complete.
Deleted or changed images are tombstoned (their rows marked dead) and never returned. Sharding also lets a
100-million-image store be read chunk by chunk without holding it in memory.

Cost of a commit at scale (schema 2): the manifest holds one short entry per shard and nothing per row, so a commit
rewrites O(shards) bytes, never O(images). Dead rows live in one small immutable file per shard that has any: a
tombstone writes a new file for each shard it touches (O(shard)), then the manifest naming it, then deletes the file
it replaced, so a crash leaves the old or the new dead set, never a mix (an unlisted file is a leftover the next
writer removes). Compaction (which extract also runs whenever the small shards of a long run add up to one full
shard) keeps shards at ~`target_bytes`, so 100 M images are ~1,500 shards and a ~200 kB manifest. Ids are read as
one numpy array (no Python object per row), and id -> row is a binary search in the sorted keys stored with the
shards (`rows_of`), collisions settled by comparing the stored id.

Schema 1 stores (variable-length string ids, dead rows listed in the manifest) are read as they are; the first
writer's commit rewrites their manifest as schema 2 (their shards stay, read the old way).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from . import __version__
from .errors import StoreError
from .idkeys import keys_for
from .models.base import Features, LocalField

SCHEMA_VERSION = 2  # what this visearch writes
READ_VERSIONS = (1, 2)  # what it reads
MANIFEST = "manifest.json"
REBUILD_HINT = "run `visearch extract ... --rebuild` to rebuild it"


def _max_open_files() -> int:
    """Shard files kept open per Store: half the open-file limit, at least 64. A big collection has thousands of
    shards; past the cap the least recently used is closed and reopened on demand (shards are immutable; one that a
    compaction has deleted meanwhile is read through the newer manifest, see Store._read)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(64, (soft if soft != resource.RLIM_INFINITY else 1 << 20) // 2)


SHARD_RE = re.compile(r"shard-(\d+)\.h5")


def shard_number(file: str) -> int:
    """`shard-00042.h5` -> 42; any digit count (five at least in new names: older stores read the same)."""
    m = SHARD_RE.fullmatch(file)
    if not m:
        raise StoreError(f"unexpected shard file name {file!r} in a store manifest", REBUILD_HINT)
    return int(m.group(1))


DEAD_RE = re.compile(r"dead-(\d+)-([0-9a-f]{8,32})\.npy")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"  # zero-padded to 5 digits, longer past 99,999: never wraps or collides


# Writer locks held by this process (fd numbers). A flock lock belongs to the open file, which a fork shares with the
# child: a forked decoder worker orphaned by a SIGKILL would keep the store locked. Every forked child therefore points
# these fds at /dev/null first thing (os.register_at_fork), so the lock lives and dies with the process that took it.
_HELD_LOCKS: set[int] = set()


def _drop_locks_in_child() -> None:
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in _HELD_LOCKS:
            with contextlib.suppress(OSError):
                os.dup2(null, fd, inheritable=False)  # drops this process's reference to the lock; fd stays valid
    finally:
        os.close(null)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _take_lock(path: Path, hint: str) -> int:
    """Exclusive writer lock on `path/.lock` (an fd opened close-on-exec, dropped by forked children); StoreError
    when another process holds it."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"another process is writing to {path}", hint) from None
    _HELD_LOCKS.add(fd)
    return fd


def _release_lock(fd: int) -> None:
    _HELD_LOCKS.discard(fd)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def store_path(data_dir: str | Path, dataset: str, model: str) -> Path:
    return Path(data_dir) / dataset / "features" / model


def remove_store(path: str | Path) -> None:
    """Delete a store (for `extract --rebuild`) under the writer lock, so a running writer is never pulled from under
    its feet (it would go on writing beside the rebuild); the lock file itself stays."""
    import shutil

    path = Path(path)
    if not path.is_dir():
        return
    lock = _take_lock(path, "wait for it to finish, then rebuild")
    try:
        (path / MANIFEST).unlink(missing_ok=True)  # first: from now on readers see no store, not missing shards
        for p in path.iterdir():
            if p.name == ".lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    finally:
        _release_lock(lock)


def _as_bytes(values: Any) -> np.ndarray:
    """Strings (str or bytes; a numpy 'S' array is returned as it is) as numpy 'S' of their utf-8 bytes: how
    schema-2 shards store ids; schema-1 variable-length strings come back from h5py as an object array."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":
        return values
    items = [x if isinstance(x, bytes) else str(x).encode() for x in (values.tolist() if isinstance(values, np.ndarray)
                                                                     else values)]
    return np.array(items, dtype=bytes) if items else np.empty(0, "S1")


def _decode(values: np.ndarray) -> list[str]:
    return [x.decode() for x in _as_bytes(values).tolist()]


def _manifest_version(path: Path) -> tuple[int, int] | None:
    """Identity of the current manifest file: it is replaced by rename, so a new one has a new inode."""
    try:
        st = (path / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (temp file, fsync, rename; the caller fsyncs the folder)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())
    _fsync_dir(path.parent)


MAX_DIM = 1 << 16
MAX_SHARD_ROWS = 1 << 31
STORE_DTYPES = ("float16", "float32", "bfloat16", "uint8", "int8", "bool")
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,120}\.h5")


def _is_int(x: Any, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def _manifest_problem(m: Any) -> str | None:
    """Why a parsed manifest.json cannot be a store's (types and ranges of every field), or None. Shard and dead-row
    file names must be plain names inside the store folder: a manifest can never make a reader open or a writer
    delete a file elsewhere."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if not isinstance(m.get("model"), str):
        return "model is not a string"
    if not _is_int(m.get("dim"), 1, MAX_DIM):
        return f"dim {m.get('dim')!r:.40} is not an integer in 1..{MAX_DIM}"
    if m.get("dtype") not in STORE_DTYPES:
        return f"dtype {m.get('dtype')!r:.40} is not one of {', '.join(STORE_DTYPES)}"
    lf = m.get("local_fields")
    if not isinstance(lf, dict):
        return "local_fields is not an object"
    for k, v in lf.items():
        shape = v.get("shape") if isinstance(v, dict) else None
        if (not re.fullmatch(r"[A-Za-z0-9_]{1,64}", k) or not isinstance(shape, list) or not shape
                or not all(_is_int(d, 1, MAX_DIM) for d in shape) or v.get("dtype") not in STORE_DTYPES):
            return f"local field {k!r:.40} has a bad name, shape or dtype"
    shards = m.get("shards")
    if not isinstance(shards, list):
        return "shards is not a list"
    seen = set()
    for s in shards:
        if not isinstance(s, dict):
            return "a shard entry is not an object"
        f = s.get("file")
        if not isinstance(f, str) or not NAME_RE.fullmatch(f) or f in seen:
            return f"shard file {f!r:.60} is not a plain shard name in the store folder (or is listed twice)"
        seen.add(f)
        rows = s.get("rows")
        if not _is_int(rows, 0, MAX_SHARD_ROWS) or not _is_int(s.get("bytes"), 0, 1 << 50):
            return f"{f}: rows or bytes out of range"
        dead = s.get("dead")
        if m.get("schema_version") == 1:  # dead rows listed inline
            if (not isinstance(dead, list) or not all(_is_int(r, 0, rows - 1) for r in dead)
                    or len(set(dead)) < len(dead)):
                return f"{f}: dead rows are not distinct row numbers in 0..{rows - 1}"
        elif dead is not None:  # schema 2: the file holding them
            df = dead.get("file") if isinstance(dead, dict) else None
            if (not isinstance(df, str) or not DEAD_RE.fullmatch(df) or df in seen
                    or not _is_int(dead.get("count"), 1, max(1, rows)) or not _is_int(dead.get("crc32"), 0, 2**32 - 1)):
                return f"{f}: the dead rows entry is not a plain dead-*.npy name with a count in 1..{rows} and a crc32"
            seen.add(df)
        if s.get("uid") is not None and not isinstance(s.get("uid"), str):
            return f"{f}: uid is not a string"
    return None


_NO_DEAD = np.empty(0, np.int64)
_NO_DEAD.flags.writeable = False


@dataclass
class _Shard:
    file: str
    rows: int
    bytes: int
    dead: np.ndarray  # sorted row numbers inside this shard (int64)
    uid: str | None = None  # also stored in the file: a shard replaced by another file is caught (older stores: None)
    dead_file: str | None = None  # the file holding `dead` (None: none written yet, e.g. inline in a schema-1 store)
    dead_crc32: int | None = None

    def entry(self) -> dict[str, Any]:
        """Its manifest entry (schema 2)."""
        dead = ({"file": self.dead_file, "count": len(self.dead), "crc32": self.dead_crc32} if len(self.dead)
                else None)
        return {"file": self.file, "rows": self.rows, "bytes": self.bytes, "uid": self.uid, "dead": dead}


def _load_shard(path: Path, s: dict[str, Any], version: int) -> _Shard:
    """A manifest entry -> _Shard, reading its dead-row file (schema 2: checked against the entry's count and
    crc32; missing means a writer replaced it after this manifest was read, and Store.open reads the new one)."""
    d = s["dead"]
    common = {"file": s["file"], "rows": s["rows"], "bytes": s["bytes"], "uid": s.get("uid")}
    if version == 1:
        return _Shard(dead=np.unique(np.asarray(d, np.int64)), **common)
    if d is None:
        return _Shard(dead=_NO_DEAD, **common)
    f = path / d["file"]
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"store {path} is missing {d['file']}", REBUILD_HINT) from None
    if zlib.crc32(data) != d["crc32"]:
        raise StoreError(f"store file {f} is corrupt (checksum mismatch)", REBUILD_HINT)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise StoreError(f"store file {f} is corrupt (not a numpy array)", REBUILD_HINT) from None
    if (arr.ndim != 1 or arr.dtype.kind not in "iu" or len(arr) != d["count"]
            or (len(arr) and (arr[0] < 0 or arr[-1] >= s["rows"] or (np.diff(arr.astype(np.int64)) <= 0).any()))):
        raise StoreError(f"store file {f} is corrupt (not {d['count']} increasing rows of {s['file']})", REBUILD_HINT)
    return _Shard(dead=arr.astype(np.int64), dead_file=d["file"], dead_crc32=d["crc32"], **common)


_KEYS_OF = {"keys": "ids", "fp_keys": "fingerprints"}
_STRINGS = ("ids", "fingerprints")


class Store:
    """An open store. Rows are numbered across shards in manifest order; `ids[row]`, `live[row]`."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[_Shard] | None = None):
        self.path = path
        self.manifest = manifest
        if shards is None:
            version = manifest.get("schema_version", SCHEMA_VERSION)
            shards = [_load_shard(path, s, version) for s in manifest["shards"]]
        self.shards = shards
        self.dim: int = manifest["dim"]
        self.dtype = np.dtype(manifest["dtype"])
        self.local_fields = {k: LocalField(tuple(v["shape"]), v["dtype"]) for k, v in manifest["local_fields"].items()}
        self._offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self._files: dict[str, h5py.File] = {}
        self._max_open = _max_open_files()
        self._ids: np.ndarray | None = None
        self._table: tuple[np.ndarray, np.ndarray] | None = None
        self._live: np.ndarray | None = None
        # shards closed by the LRU: their (ids, fingerprints), and a newer view of the store to read them from when a
        # compaction has deleted them meanwhile (see _read_moved)
        self._evicted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._successor: Store | None = None
        self._successor_version: tuple[int, int] | None = None
        self._moved_rows: dict[str, np.ndarray] = {}
        self._derived: dict[tuple[str, str], np.ndarray] = {}  # keys of schema-1 shards, computed

    # ---- creation and opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, model: str, config: dict[str, Any], dim: int,
               weights_sha256: str | None, local_fields: dict[str, LocalField] | None = None,
               dtype: str = "float16", dataset: str | None = None) -> "Store":
        """Create an empty store (replacing any existing one at `path` only when it is empty or `rebuild`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "visearch_version": __version__,
            "model": model,
            "config": config,
            "weights_sha256": weights_sha256,
            "dataset": dataset,
            "dim": int(dim),
            "dtype": np.dtype(dtype).name,
            "local_fields": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in (local_fields or {}).items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "shards": [],
        }
        _atomic_write_json(path / MANIFEST, manifest)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path, check_files: bool = True) -> "Store":
        """Open a store read-only; a missing, truncated or corrupt store raises StoreError with a way out.

        Opening holds every shard open and reads every dead-row file, so a compaction or tombstone that deletes
        replaced files later cannot pull them from under this reader; a file deleted between reading the manifest
        and opening it means a newer manifest is in place, so that is read again."""
        path = Path(path)
        for attempt in range(5):
            before = _manifest_version(path)
            try:
                return cls._open_once(path, check_files)
            except StoreError:
                # a writer replaced the manifest meanwhile (e.g. a compaction removed a shard we were about to
                # open): read the new one; a store that fails while its manifest stands still is really damaged
                if attempt == 4 or _manifest_version(path) == before:
                    raise
                time.sleep(0.02)
        raise AssertionError("unreachable")

    @classmethod
    def _open_once(cls, path: Path, check_files: bool) -> "Store":
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"no descriptors at {path}", "run `visearch extract` for this dataset and model first")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            version = manifest["schema_version"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise StoreError(f"store manifest {mpath} is corrupt", REBUILD_HINT) from None
        if version not in READ_VERSIONS:
            raise StoreError(f"store {path} has schema version {version}, this visearch reads "
                             f"{' and '.join(map(str, READ_VERSIONS))}", REBUILD_HINT)
        problem = _manifest_problem(manifest)
        if problem:
            raise StoreError(f"store manifest {mpath} is corrupt ({problem})", REBUILD_HINT)
        try:
            store = cls(path, manifest)
        except (KeyError, TypeError, ValueError, AttributeError):  # valid JSON, wrong structure
            raise StoreError(f"store manifest {mpath} is corrupt", REBUILD_HINT) from None
        if check_files:
            store.check()
        return store

    def check(self) -> None:
        """Each listed shard exists with its recorded size and row count (catches truncation and lost files)."""
        for s in self.shards:
            f = self.path / s.file
            if not f.is_file():
                raise StoreError(f"store {self.path} is missing {s.file}", REBUILD_HINT)
            if f.stat().st_size != s.bytes:
                raise StoreError(f"store file {f} is truncated or changed ({f.stat().st_size} bytes, "
                                 f"expected {s.bytes})", REBUILD_HINT)
            try:
                h5 = self._file(s.file)
                n = h5["global"].shape[0]
                uid = h5.attrs.get("uid")
            except (OSError, KeyError) as e:
                raise StoreError(f"store file {f} is corrupt ({str(e).splitlines()[0][:120]})", REBUILD_HINT) from None
            if n != s.rows:
                raise StoreError(f"store file {f} holds {n} rows, the manifest says {s.rows}", REBUILD_HINT)
            if s.uid is not None and uid != s.uid:
                raise StoreError(f"store file {f} is not the shard the manifest lists (replaced or restored from "
                                 "another copy)", REBUILD_HINT)

    def verify(self, block_bytes: int = 32 << 20) -> None:
        """Read every array of every shard, so each chunk's fletcher32 checksum is tested: a flipped byte raises
        StoreError naming the shard (`extract` runs this when it opens a store; memory stays ~`block_bytes`)."""
        local = {f"local/{k}": int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for k, f in self.local_fields.items()}
        sizes = {"ids": 64, "fingerprints": 64, "keys": 8, "fp_keys": 8, "global": self.dim * self.dtype.itemsize,
                 **local}
        for s in self.shards:
            for key, row_bytes in sizes.items():
                if key in _KEYS_OF and not self._has(s.file, key):
                    continue  # a schema-1 shard: no stored keys
                step = max(1, block_bytes // max(1, row_bytes))
                for a in range(0, s.rows, step):
                    self._read(s.file, key, slice(a, min(s.rows, a + step)))

    def _file(self, name: str) -> h5py.File:
        """The open shard `name`; at most `_max_open_files()` stay open (least recently used closed first)."""
        f = self._files.pop(name, None)
        if f is None:
            while len(self._files) >= self._max_open:
                old_name, old = next(iter(self._files.items()))
                del self._files[old_name]
                with contextlib.suppress(Exception):
                    if old_name not in self._evicted:  # what a later _read_moved needs to find its rows again
                        self._evicted[old_name] = (_as_bytes(old["ids"][:]), _as_bytes(old["fingerprints"][:]))
                    old.close()
            f = h5py.File(self.path / name, "r")
        self._files[name] = f  # re-inserted last: dicts keep insertion order
        return f

    def _reopened(self, name: str) -> h5py.File | None:
        """`_file(name)`; None when `name` was closed by the LRU and is no longer the file this store listed (a
        compaction deleted it, or a rebuild reused its name, after this store was opened)."""
        if name in self._files or name not in self._evicted:
            return self._file(name)
        try:
            f = self._file(name)
        except OSError:
            if (self.path / name).is_file():
                raise
            return None
        uid = next((s.uid for s in self.shards if s.file == name), None)
        if uid is not None and f.attrs.get("uid") != uid:
            self._files.pop(name).close()
            return None
        return f

    def _read(self, name: str, key: str, sel: Any) -> np.ndarray:
        """`file[key][sel]`, a checksum or I/O failure (bit rot, a bad disk) raised as StoreError. A shard that
        vanished since this store was opened (closed by the LRU, then compacted away) is read through the current
        manifest: compaction keeps every live row's bytes, so the rows are found there by id and fingerprint."""
        try:
            f = self._reopened(name)
            return self._read_moved(name, key, sel) if f is None else f[key][sel]
        except (OSError, KeyError) as e:
            raise StoreError(f"store file {self.path / name} is corrupt, reading {key} failed "
                             f"({str(e).splitlines()[0][:120]})", REBUILD_HINT) from None

    def _has(self, name: str, key: str) -> bool:
        """Whether shard `name` holds dataset `key` (False for a vanished shard: see _read_moved)."""
        try:
            f = self._reopened(name)
        except OSError as e:
            raise StoreError(f"store file {self.path / name} is corrupt ({str(e).splitlines()[0][:120]})",
                             REBUILD_HINT) from None
        return f is not None and key in f

    def _column(self, name: str, key: str, sel: Any) -> np.ndarray:
        """`_read`, with ids and fingerprints as numpy 'S' and keys computed for a shard that has none (schema 1)."""
        if key in _KEYS_OF and not self._has(name, key):
            if (name, key) not in self._derived:  # hashed once per shard (~1 us an id)
                self._derived[name, key] = keys_for(self._column(name, _KEYS_OF[key], slice(None)))
            return self._derived[name, key][sel]
        out = self._read(name, key, sel)
        return _as_bytes(out) if key in _STRINGS else out

    def _read_moved(self, name: str, key: str, sel: Any) -> np.ndarray:
        """Rows `sel` of the vanished shard `name`, from the current store (see `_read`). Rows that were dead in this
        view read as zeros (never returned: `live` masks them); a live row whose image has changed or left the
        store since is an error (the caller should open the store again)."""
        si = next(i for i, s in enumerate(self.shards) if s.file == name)
        shard = self.shards[si]
        local = np.arange(shard.rows)[sel]
        if key in _STRINGS:
            return self._moved_strings(si)[_STRINGS.index(key)][local]
        if self._successor is None or _manifest_version(self.path) != self._successor_version:
            self._successor_version = _manifest_version(self.path)
            if self._successor is not None:
                self._successor.close()
            self._successor = Store.open(self.path, check_files=False)
            self._moved_rows = {}
        succ = self._successor
        if name not in self._moved_rows:  # this shard's rows -> rows of the current store (-1: none)
            ids, fps = self._moved_strings(si)
            cand = succ.rows_of(ids)
            ok = cand >= 0
            if ok.any():
                ok[ok] = succ._gather(cand[ok], "fingerprints") == fps[ok]
            self._moved_rows[name] = np.where(ok, cand, -1)
        rows = self._moved_rows[name][local]
        lost = (rows < 0) & ~np.isin(local, shard.dead)
        if lost.any():
            raise StoreError(f"store {self.path} changed while it was being read (a compaction or a re-extraction "
                             "replaced rows it still needed)", "open the store again")
        ok = rows >= 0
        block = succ._gather(rows[ok], key)
        out = np.zeros((len(rows),) + block.shape[1:], block.dtype)
        out[ok] = block
        return out

    def _moved_strings(self, si: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, fingerprints) of shard `si` in this view, as read when the LRU closed it."""
        got = self._evicted.get(self.shards[si].file)
        if got is None:  # never opened before it vanished (opened with check_files=False)
            raise StoreError(f"store {self.path} changed while it was being read", "open the store again")
        return got

    def close(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(Exception):
                f.close()
        self._files.clear()
        if self._successor is not None:
            self._successor.close()
            self._successor = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- provenance ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.manifest["model"]

    def check_compatible(self, model: str, config: dict[str, Any], weights_sha256: str | None) -> None:
        """Refuse to mix descriptors of another model, configuration or weights file."""
        m = self.manifest
        if m["model"] != model:
            raise StoreError(f"store {self.path} was built with model {m['model']!r}, not {model!r}",
                             f"use --model {m['model']} or re-extract with --model {model}")
        if m["config"] != config:
            raise StoreError(f"store {self.path} was built with another {model} configuration",
                             "use the configuration it was built with, or " + REBUILD_HINT)
        if m["weights_sha256"] and weights_sha256 and m["weights_sha256"] != weights_sha256:
            raise StoreError(f"store {self.path} was built with other {model} weights "
                             f"(sha256 {m['weights_sha256'][:12]}..., now {weights_sha256[:12]}...)",
                             "pass the same --weights file, or " + REBUILD_HINT)

    # ---- reading ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def ids(self) -> np.ndarray:
        """Every row's id as utf-8 bytes, numpy 'S' `[N]` (one array, no Python object per row: ~13 B a row for
        12-byte ids); `id_list` decodes the rows you need, `rows_of` finds rows by id."""
        if self._ids is None:
            self._ids = self._strings("ids")
        return self._ids

    def fingerprints(self) -> np.ndarray:
        """Every row's fingerprint (the source image version it was described from), numpy 'S' `[N]`."""
        return self._strings("fingerprints")

    def id_keys(self) -> np.ndarray:
        """int64 `[N]`: visearch.idkeys.keys_for of every row's id, as stored with the shards."""
        return self._concat("keys", np.int64)

    def fingerprint_keys(self) -> np.ndarray:
        return self._concat("fp_keys", np.int64)

    def _strings(self, key: str) -> np.ndarray:
        """A string column of every shard, in row order, as one 'S' array as wide as its longest value."""
        return self._concat(key, "S1")

    def _concat(self, key: str, empty_dtype: Any) -> np.ndarray:
        parts = [self._column(s.file, key, slice(None)) for s in self.shards]
        return np.concatenate(parts) if parts else np.empty(0, empty_dtype)

    def id_list(self, rows: Any = None) -> list[str]:
        """The ids of `rows` (all rows when None) as str: what results show. Without the `ids` array loaded, only
        these rows are read."""
        if rows is None:
            return _decode(self.ids)
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"row index out of range for store {self.path}")
        return _decode(self._ids_at(rows))

    def rows_of(self, ids: Any) -> np.ndarray:
        """The live row of each id (str, or utf-8 bytes as numpy 'S'), -1 where it has none: a binary search in the
        sorted stored keys of the live rows (built once per Store, 16 B a live row), each hit confirmed by comparing
        the stored id, so a key collision can never return another image's row."""
        q = _as_bytes(ids)
        out = np.full(len(q), -1, np.int64)
        keys, rows = self._id_table()
        if not len(q) or not len(keys):
            return out
        qk = keys_for(q)
        lo, hi = np.searchsorted(keys, qk, "left"), np.searchsorted(keys, qk, "right")
        one = np.nonzero(hi - lo == 1)[0]
        if len(one):
            cand = rows[lo[one]]
            ok = self._ids_at(cand) == q[one]
            out[one[ok]] = cand[ok]
        for j in np.nonzero(hi - lo > 1)[0]:  # one key, several live rows: compare the ids themselves
            cand = rows[lo[j]:hi[j]]
            hit = cand[self._ids_at(cand) == q[j]]
            if len(hit):
                out[j] = hit.min()
        return out

    def _id_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted keys, their rows) of the live rows: 12 B a row below 2**31 rows (int32 rows)."""
        if self._table is None:
            keys, live = self.id_keys(), self.live
            rows = None if live.all() else np.nonzero(live)[0]
            if rows is not None:
                keys = keys[rows]
            order = np.argsort(keys)  # ties (collisions) are settled by the ids, not by order
            keys = keys[order]
            order = order.astype(np.int32) if len(self) < 2**31 else order
            self._table = keys, (order if rows is None else rows[order])
        return self._table

    def _ids_at(self, rows: np.ndarray) -> np.ndarray:
        """The ids of `rows` as 'S': from the loaded array, else read for these rows only (a few rows of a big store)."""
        return self.ids[rows] if self._ids is not None or len(rows) > 1024 else self._gather(rows, "ids")

    @property
    def live(self) -> np.ndarray:
        """Bool `[N]`: False for tombstoned rows (deleted or superseded images)."""
        if self._live is None:
            live = np.ones(len(self), bool)
            for off, s in zip(self._offsets, self.shards):
                if len(s.dead):
                    live[off + s.dead] = False
            self._live = live
        return self._live

    def live_rows_by_id(self) -> dict[str, int]:
        """{id: row} of the live rows: a Python dict over the store, for small stores and tests (`rows_of` scales)."""
        rows = np.nonzero(self.live)[0]
        return dict(zip(self.id_list(rows), rows.tolist()))

    def num_live(self) -> int:
        return int(self.live.sum())

    def iter_global(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, block `[n, D]` in the stored dtype), never more than `chunk_rows` rows at once.

        Consecutive small shards are read into one block, so a store of many small shards is still searched in a
        few large matrix products."""
        parts: list[np.ndarray] = []
        start = n = 0
        for off, s in zip(self._offsets, self.shards):
            for a in range(0, s.rows, chunk_rows):
                b = min(a + chunk_rows, s.rows)
                if n + (b - a) > chunk_rows and parts:
                    yield start, np.concatenate(parts) if len(parts) > 1 else parts[0]
                    parts, n = [], 0
                if not parts:
                    start = int(off + a)
                parts.append(self._read(s.file, "global", slice(a, b)))
                n += b - a
        if parts:
            yield start, np.concatenate(parts) if len(parts) > 1 else parts[0]

    def row_bytes(self) -> int:
        """Bytes of one row's arrays (global and local), before HDF5 overhead."""
        local = sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in self.local_fields.values())
        return self.dim * self.dtype.itemsize + local

    def _gather(self, rows: Any, key: str) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"row index out of range for store {self.path}")
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        blocks = []
        for si in np.unique(shard_of):
            sel = np.nonzero(shard_of == si)[0]
            local = rows[sel] - self._offsets[si]
            uniq, inverse = np.unique(local, return_inverse=True)  # h5py wants increasing unique indices
            blocks.append((sel, self._column(self.shards[si].file, key, uniq)[inverse]))
        if not blocks:
            if key in _STRINGS:
                return np.empty(0, "S1")
            if key in _KEYS_OF:
                return np.empty(0, np.int64)
            ds = self._file(self.shards[0].file)[key] if self.shards else None
            shape = ds.shape[1:] if ds is not None else (self.dim,)
            return np.empty((0,) + tuple(shape), ds.dtype if ds is not None else self.dtype)
        dtype = np.result_type(*[b.dtype for _, b in blocks])  # strings: the widest shard's width
        out = np.empty((rows.size,) + blocks[0][1].shape[1:], dtype)
        for sel, b in blocks:
            out[sel] = b
        return out

    def read_global(self, rows: np.ndarray) -> np.ndarray:
        """Global descriptors of `rows` as float32 `[len(rows), D]`, in the order given."""
        return self._gather(rows, "global").astype(np.float32, copy=False)

    def read_local(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each local field of `rows`: `{field: [len(rows), *shape]}`."""
        return {k: self._gather(rows, f"local/{k}") for k in self.local_fields}

    def nbytes(self) -> dict[str, int]:
        """Bytes on disk of the stored global and local arrays (HDF5 storage size) and of the whole folder."""
        out = {"global": 0, "local": 0}
        for s in self.shards:
            f = self._file(s.file)
            out["global"] += f["global"].id.get_storage_size()
            for k in self.local_fields:
                out["local"] += f[f"local/{k}"].id.get_storage_size()
        out["total_on_disk"] = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return out


def _string_dataset(f: h5py.File, key: str, values: np.ndarray) -> None:
    """Fixed-width utf-8 strings (NUL-padded to the shard's longest value): read back as one numpy 'S' array."""
    dt = h5py.string_dtype("utf-8", max(1, values.dtype.itemsize))  # 'S' tagged utf-8: written without conversion
    f.create_dataset(key, data=values.astype(dt), dtype=dt, chunks=(min(len(values), 65536),), fletcher32=True)


class StoreWriter:
    """Appends shards to a store under an exclusive lock (one writer at a time; readers never block)."""

    def __init__(self, store: Store):
        self.store = store
        self.path = store.path
        self._lock: int | None = _take_lock(self.path, "wait for it to finish")
        # another writer may have committed since `store` was opened: work from the current manifest, or its shards
        # would be dropped from ours and deleted as leftovers
        try:
            self.store = Store.open(self.path, check_files=False)
        except BaseException:
            self.close()
            raise
        self._clean_temp_files()

    def _clean_temp_files(self) -> None:
        """Remove leftovers of a crashed writer (never listed in the manifest, so never read)."""
        listed = {s.file for s in self.store.shards} | {s.dead_file for s in self.store.shards if s.dead_file}
        for p in self.path.iterdir():
            if p.name.endswith(".tmp") or (p.name.startswith(("shard-", "dead-")) and p.name not in listed):
                p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            _release_lock(self._lock)
            self._lock = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _next_name(self, extra: list[_Shard] = ()) -> str:
        used = [shard_number(s.file) for s in self.store.shards] + [shard_number(s.file) for s in extra]
        return shard_name((max(used) + 1) if used else 0)

    def append(self, ids: list[str], features: Features, fingerprints: list[str] | None = None) -> None:
        """Write one immutable shard with these rows, then publish it in a new manifest.

        `fingerprints` identify the version of each source image (so a changed file is re-described)."""
        st = self.store
        g = np.asarray(features.global_)
        if g.ndim != 2 or g.shape != (len(ids), st.dim):
            raise StoreError(f"descriptor batch has shape {g.shape}, expected ({len(ids)}, {st.dim})")
        if not len(ids):
            return
        if not np.isfinite(g).all():
            raise StoreError("model produced non-finite descriptors; refusing to store them")
        fingerprints = fingerprints if fingerprints is not None else [""] * len(ids)
        if len(fingerprints) != len(ids):
            raise StoreError(f"{len(fingerprints)} fingerprints for {len(ids)} ids")
        bad = next((x for x in (*ids, *fingerprints) if "\0" in x), None)
        if bad is not None:  # fixed-width strings are NUL-padded: a NUL inside would be cut
            raise StoreError(f"image id or fingerprint {bad!r:.60} contains a NUL character")
        local = {}
        for k, spec in st.local_fields.items():
            local[k] = np.asarray((features.local or {})[k], dtype=spec.dtype)
            if local[k].shape != (len(ids),) + spec.shape:
                raise StoreError(f"local field {k!r} has shape {local[k].shape}, expected {(len(ids),) + spec.shape}")
        ids_b, fps_b = _as_bytes(ids), _as_bytes(fingerprints)
        shard = self._write_shard(self._next_name(), ids_b, fps_b, keys_for(ids_b), keys_for(fps_b),
                                  g.astype(st.dtype), local)
        self._publish(st.shards + [shard])

    def _write_shard(self, name: str, ids: np.ndarray, fingerprints: np.ndarray, keys: np.ndarray,
                     fp_keys: np.ndarray, g: np.ndarray, local: dict[str, np.ndarray]) -> _Shard:
        """Write a complete shard file under its final name (temp file, fsync, rename)."""
        st = self.store
        uid = secrets.token_hex(8)
        tmp = self.path / f"{name}.tmp"
        try:
            # built in memory, then written with plain file I/O: HDF5 itself never meets a full disk (it then spews
            # errors from destructors and can crash the process at exit), and ENOSPC becomes one clean OSError
            with h5py.File(f"{name}-in-memory", "w", driver="core", backing_store=False) as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["uid"] = uid
                _string_dataset(f, "ids", ids)
                _string_dataset(f, "fingerprints", fingerprints)
                # fletcher32: a checksum per chunk, so bit rot fails the read instead of returning wrong numbers
                for key, v in (("keys", keys), ("fp_keys", fp_keys)):
                    f.create_dataset(key, data=np.asarray(v, np.int64), chunks=(min(len(v), 65536),), fletcher32=True)
                f.create_dataset("global", data=g, chunks=(min(len(ids), 1024), st.dim), fletcher32=True)
                for k, spec in st.local_fields.items():
                    f.create_dataset(f"local/{k}", data=local[k], chunks=(1,) + spec.shape, fletcher32=True)
                f.flush()
                image = f.id.get_file_image()
            with open(tmp, "wb") as fh:
                fh.write(image)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write to {self.path}: {e.strerror or str(e).splitlines()[0]}",
                             "free disk space and re-run; everything written before is intact") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _Shard(name, len(ids), (self.path / name).stat().st_size, _NO_DEAD, uid)

    @staticmethod
    def _target_rows(st: Store, target_bytes: int) -> int:
        return int(min(65536, max(1024, target_bytes // max(1, st.row_bytes()))))

    @staticmethod
    def _small(s: _Shard, target: int) -> bool:
        return s.rows - len(s.dead) < target // 2 or bool(len(s.dead))

    def compact(self, target_bytes: int = 256 << 20) -> int:
        """Merge runs of small shards (and drop tombstoned rows) into shards of about `target_bytes`.

        Extraction commits small shards often (so a crash loses little); compaction keeps a large store at a few
        big shards, so searching it is a few large reads and its manifest stays short. Rows keep their order.
        Returns the number of shards replaced."""
        st = self.store
        target = self._target_rows(st, target_bytes)
        shards = st.shards
        out: list[_Shard] = []
        replaced = 0
        i = 0
        while i < len(shards):
            j = i
            while j < len(shards) and self._small(shards[j], target):
                j += 1
            run = shards[i:j]
            if len(run) >= 2 or (run and len(run[0].dead)):
                out += self._merge(run, target, out)
                replaced += len(run)
                i = j
            else:
                out.append(shards[i])
                i += 1
        if replaced:
            listed = {x.file for x in out}
            self._publish(out)
            for x in shards:  # readers retry on a shard that vanished under an old manifest (see Store.open)
                if x.file not in listed:
                    (self.path / x.file).unlink(missing_ok=True)
        return replaced

    def compact_if_due(self, target_bytes: int = 256 << 20) -> int:
        """`compact` once the trailing run of small shards (where commits land) holds half a full shard's rows (so
        what it makes is no longer small, and no row is rewritten twice): called after every commit of a long
        extraction, it keeps the number of shards, and so the manifest each commit rewrites, at ~N / target rather
        than N / commit size."""
        st = self.store
        target = self._target_rows(st, target_bytes)
        n = rows = 0
        for s in reversed(st.shards):
            if not self._small(s, target):
                break
            n, rows = n + 1, rows + s.rows - len(s.dead)
        return self.compact(target_bytes) if n >= 2 and rows >= target // 2 else 0

    def _merge(self, run: list[_Shard], target: int, before: list[_Shard]) -> list[_Shard]:
        """Rewrite the live rows of `run` into new shards of at most `target` rows, holding at most one new shard's
        rows in memory (read shard by shard in slices of at most `target` rows)."""
        st = self.store
        keys = ["ids", "fingerprints", "keys", "fp_keys", "global"] + [f"local/{k}" for k in st.local_fields]
        bufs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        new: list[_Shard] = []
        n = 0

        def flush() -> None:
            nonlocal bufs, n
            if n:
                cat = {k: np.concatenate(v) for k, v in bufs.items()}
                bufs = {k: [] for k in keys}  # drop the parts before the shard image is built
                local = {k: cat[f"local/{k}"] for k in st.local_fields}
                new.append(self._write_shard(self._next_name(extra=before + new), cat["ids"], cat["fingerprints"],
                                             cat["keys"], cat["fp_keys"], cat["global"], local))
            n = 0

        for s in run:
            keep = np.setdiff1d(np.arange(s.rows), s.dead)
            for a in range(0, len(keep), target):
                sel = keep[a:a + target]
                if n + len(sel) > target:
                    flush()
                where = slice(int(sel[0]), int(sel[-1]) + 1) if not len(s.dead) else sel  # slices read fastest
                for k in keys:
                    bufs[k].append(st._column(s.file, k, where))
                n += len(sel)
        flush()
        return new

    def tombstone(self, rows: Any) -> None:
        """Mark rows dead (their images were deleted or changed): one new dead-row file per shard touched, then one
        manifest; the cost is that of the shards touched, not of the store."""
        rows = np.unique(np.asarray(rows, np.int64).reshape(-1))
        if not len(rows):
            return
        st = self.store
        if rows[0] < 0 or rows[-1] >= len(st):
            raise StoreError(f"row index out of range for store {self.path}")
        shard_of = np.searchsorted(st._offsets, rows, side="right") - 1
        shards = list(st.shards)
        changed = False
        for si in np.unique(shard_of):
            s = shards[si]
            dead = np.union1d(s.dead, rows[shard_of == si] - st._offsets[si])
            if len(dead) != len(s.dead):
                shards[si] = replace(s, dead=dead, dead_file=None, dead_crc32=None)
                changed = True
        if changed:
            self._publish(shards)

    def _write_dead(self, s: _Shard) -> tuple[str, int]:
        """Write shard `s`'s dead rows to a new file; returns (name, crc32)."""
        buf = io.BytesIO()
        np.save(buf, s.dead.astype("<u4"), allow_pickle=False)  # rows < 2**31 (MAX_SHARD_ROWS)
        data = buf.getvalue()
        name = f"dead-{shard_number(s.file)}-{secrets.token_hex(8)}.npy"
        _atomic_write_bytes(self.path / name, data)
        return name, zlib.crc32(data)

    def _publish(self, shards: list[_Shard]) -> None:
        """Make `shards` the store's state: their new dead-row files, then the manifest (schema 2), then the
        replaced dead-row files go (a reader opening an old manifest then retries, see Store.open)."""
        old = self.store
        written: list[str] = []
        try:
            shards = list(shards)
            for i, s in enumerate(shards):
                if len(s.dead) and s.dead_file is None:
                    name, crc = self._write_dead(s)
                    written.append(name)
                    shards[i] = replace(s, dead_file=name, dead_crc32=crc)
            if written:
                _fsync_dir(self.path)  # the files are there before any manifest names them
            manifest = dict(old.manifest, schema_version=SCHEMA_VERSION, shards=[s.entry() for s in shards],
                            visearch_version=__version__)
            _atomic_write_json(self.path / MANIFEST, manifest)
        except OSError as e:
            for name in written:
                (self.path / name).unlink(missing_ok=True)
            raise StoreError(f"cannot write to {self.path}: {e.strerror or e}",
                             "free disk space and re-run; everything written before is intact") from None
        new = Store(self.path, manifest, shards)
        new._files, old._files = old._files, {}
        self.store = new
        keep = {s.dead_file for s in shards}
        for s in old.shards:
            if s.dead_file and s.dead_file not in keep:
                (self.path / s.dead_file).unlink(missing_ok=True)
