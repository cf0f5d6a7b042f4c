"""Datasets in the revisitop layout: reading (restricted unpickler), conversion from folders, ground truth.

Layout of `<data_dir>/<name>/`:
    jpg/<id>.jpg        every database and query image (JPEG)
    gnd_<name>.pkl      {"imlist": [ids], "qimlist": [query ids], "gnd": [{"bbx", "easy", "hard", "junk"}]}
                        exactly as filipradenovic/revisitop reads it (indices 0-based into imlist)
    sources.json        id -> original file (path, size, mtime, sha256) for results and change detection, plus the
                        ground truth by id so re-runs can rebuild gnd when images come and go

Ground truth file for `convert(..., ground_truth=FILE)` (paths relative to the source folder, or absolute paths
inside it; a bare file name is enough when it is unique in the folder):

    JSON: {"queries": [{"image": "queries/bridge.jpg", "bbox": [12, 30, 200, 180],
                        "positives": ["db/bridge_1.jpg", "db/bridge_2.jpg"],
                        "hard": ["db/bridge_night.jpg"], "junk": ["db/bridge_blurry.jpg"]}]}
          (a bare list of query objects is accepted too; "easy" is an alias of "positives")
    CSV:  header row, one row per query; lists separated by ";"; empty x1..y2 = whole image;
          the hard and junk columns may be left out:
              query,x1,y1,x2,y2,positives,hard,junk
              queries/bridge.jpg,12,30,200,180,db/bridge_1.jpg;db/bridge_2.jpg,db/bridge_night.jpg,db/bridge_blurry.jpg

    bbox is [x1, y1, x2, y2] in pixels of the upright (EXIF-rotated) query image. "positives" are revisitop's "easy"
    images, "hard" its hard ones (positives in the Medium and Hard protocols), "junk" images are ignored when scoring.
    Query images are taken out of the database (revisitop convention); other images become the database.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import re
import stat as stat_mod
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError, ImageError, UsageError
from .images import exif_orientation, image_size, is_image_file, load_rgb_bytes

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.json"
SCHEMA_VERSION = 1
JPEG_QUALITY = 95
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TMP_MARK = ".tmp-"


# ---- the dataset ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where an image came from and what it looked like then (for change detection)."""

    path: str  # absolute original path
    size: int
    mtime_ns: int
    sha256: str | None = None  # None for linked revisitop images (not hashed)
    rel: str | None = None  # path relative to the source folder, POSIX separators


@dataclass
class Dataset:
    """A revisitop-layout dataset. `gnd[i]` has "bbx" (list of 4 floats or absent) and "easy"/"hard"/"junk" (lists
    of int indices into imlist). `sources` maps id -> original path (str); `source_info` has size/mtime/sha."""

    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)
    source_info: dict[str, Source] = field(default_factory=dict)
    origin: str = "folder"  # "folder" (converted by us) or "revisitop" (official layout, images used as is)
    apply_exif: bool = True  # the revisitop reference loader ignores EXIF and accepts truncated JPEGs
    allow_truncated: bool = False

    @property
    def images_dir(self) -> Path:
        return self.root / "jpg"

    @property
    def gnd_path(self) -> Path:
        return self.root / f"gnd_{self.name}.pkl"

    def __len__(self) -> int:
        return len(self.imlist)

    def image_path(self, image: str | int) -> Path:
        """Path of a database image by id (or by index into imlist)."""
        iid = self.imlist[image] if isinstance(image, (int, np.integer)) else image
        return self.images_dir / f"{iid}.jpg"

    def query_path(self, i: int) -> Path:
        """Path of the i-th query image (uncropped; crop with images.crop_box(img, gnd[i]["bbx"]))."""
        return self.images_dir / f"{self.qimlist[i]}.jpg"

    def source_path(self, image_id: str) -> str:
        """The user's original file for an id (falls back to the dataset copy)."""
        return self.sources.get(image_id) or str(self.images_dir / f"{image_id}.jpg")

    @property
    def has_ground_truth(self) -> bool:
        return len(self.qimlist) > 0

    def load_options(self) -> dict[str, bool]:
        """Keyword arguments for images.load_rgb / ImageFileDataset that match how this dataset is meant to be read."""
        return {"apply_exif": self.apply_exif, "allow_truncated": self.allow_truncated}


def list_datasets(data_dir: str | Path) -> list[str]:
    """Names of the datasets (folders holding gnd_<name>.pkl) in data_dir."""
    d = Path(data_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and (p / f"gnd_{p.name}.pkl").is_file())


def load_dataset(data_dir: str | Path, name: str) -> Dataset:
    """Read `<data_dir>/<name>` (gnd pickle through the restricted unpickler, sources.json when present)."""
    root = Path(data_dir) / name
    if not root.is_dir():
        known = list_datasets(data_dir)
        hint = f"run `visearch convert <folder> --name {name}` first, or point --data-dir / VISEARCH_DATA_DIR to it"
        if known:
            hint += f"; datasets in {data_dir}: {', '.join(known)}"
        raise DatasetError(f"dataset {name!r} not found in {data_dir}", hint)
    gnd_file = root / f"gnd_{name}.pkl"
    if not gnd_file.is_file():
        raise DatasetError(f"dataset folder {root} has no gnd_{name}.pkl",
                           f"re-run `visearch convert <folder> --name {name}` to rebuild it")
    cfg = validate_gnd(read_gnd(gnd_file), gnd_file)
    if not (root / "jpg").is_dir():
        raise DatasetError(f"dataset folder {root} has no jpg/ folder of images",
                           f"re-run `visearch convert <folder> --name {name}`")
    meta = _read_sources(root)
    if meta is None:  # official revisitop folder dropped into the data dir as is
        return Dataset(name, root, cfg["imlist"], cfg["qimlist"], cfg["gnd"], origin="revisitop",
                       apply_exif=False, allow_truncated=True)
    info = meta["images"]
    return Dataset(name, root, cfg["imlist"], cfg["qimlist"], cfg["gnd"],
                   sources={k: v.path for k, v in info.items()}, source_info=info,
                   origin=meta.get("origin", "folder"), apply_exif=bool(meta.get("apply_exif", True)),
                   allow_truncated=bool(meta.get("allow_truncated", False)))


# ---- restricted unpickler -------------------------------------------------------------------------------------------
# Globals that plain data pickles need: numpy arrays/scalars/dtypes (numpy 1.x and 2.x module names; _codecs.encode
# appears in protocol-2 pickles of bytes), and a few harmless builtin containers. Anything else is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], tuple[str, str]] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = ("multiarray", "_reconstruct")
    _ALLOWED_GLOBALS[(_mod, "scalar")] = ("multiarray", "scalar")
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS[(_mod, "_frombuffer")] = ("numeric", "_frombuffer")
_ALLOWED_GLOBALS[("numpy", "ndarray")] = ("numpy", "ndarray")
_ALLOWED_GLOBALS[("numpy", "dtype")] = ("numpy", "dtype")
_ALLOWED_GLOBALS[("_codecs", "encode")] = ("_codecs", "encode")
for _mod in ("builtins", "__builtin__"):
    for _n in ("set", "frozenset", "complex"):
        _ALLOWED_GLOBALS[(_mod, _n)] = ("builtins", _n)
_ALLOWED_GLOBALS[("collections", "OrderedDict")] = ("collections", "OrderedDict")


def _resolve_allowed(kind: str, name: str) -> Any:
    import importlib

    if kind == "multiarray" or kind == "numeric":
        try:
            mod = importlib.import_module(f"numpy._core.{kind}")  # numpy >= 2
        except ImportError:
            mod = importlib.import_module(f"numpy.core.{kind}")
        return getattr(mod, name)
    return getattr(importlib.import_module(kind), name)


def _safe_bytes(*args: Any) -> bytes:
    """bytes() for protocol-2 pickles of empty buffers; refuses to allocate from a bare size (memory bomb)."""
    if args and isinstance(args[0], int):
        raise _ForbiddenGlobal("bytes(<size>) is not plain data")
    return bytes(*args)


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asks for a callable outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name == "bytes":
            return _safe_bytes
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise _ForbiddenGlobal(f"global {module}.{name} is not plain data")
        return _resolve_allowed(*target)


def read_gnd(path: str | Path) -> dict[str, Any]:
    """Load a gnd_*.pkl with an unpickler that only builds plain containers, numbers, strings and numpy arrays.

    A pickle that references any other callable (os.system, eval, ...) is refused with DatasetError, before the
    callable is ever looked up. Python 2 pickles (the official files) load through latin-1 decoding."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read ground truth {path} ({e.strerror or e})", "check the file") from None
    if not data:
        raise DatasetError(f"ground truth {path} is empty (0 bytes)", "re-run convert or download it again")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise DatasetError(f"refusing to load {path}: {e}",
                           "gnd pickles may hold only lists, dicts, numbers, strings and numpy arrays; "
                           "get the file from the official source") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage: EOFError, ValueError, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DatasetError(f"cannot read ground truth {path}: truncated or not a pickle ({msg})",
                           "re-run convert or download it again") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"ground truth {path} holds a {type(obj).__name__}, expected a dict with imlist, "
                           "qimlist and gnd", "use a revisitop gnd_<name>.pkl")
    return obj


def _int_list(x: Any, what: str, path: Path) -> list[int]:
    try:
        arr = np.asarray(x if x is not None else [], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: {what} is not a list of indices", "fix or re-create the ground truth") from None
    if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))):
        raise DatasetError(f"{path}: {what} holds non-integer indices", "fix or re-create the ground truth")
    return [int(v) for v in arr]


def validate_gnd(cfg: dict[str, Any], path: str | Path = "gnd") -> dict[str, Any]:
    """Check a loaded gnd dict and normalise it: imlist/qimlist -> list[str], gnd entries -> {"bbx": [4 floats]
    (if present), "easy"/"hard"/"junk": list[int]} with every index in range. Old-style entries with "ok" are read
    as easy. Raises DatasetError naming the first problem."""
    path = Path(path)
    for key in ("imlist", "qimlist"):
        if key not in cfg:
            raise DatasetError(f"{path} has no {key!r}", "a revisitop gnd pickle needs imlist, qimlist and gnd")
    try:
        imlist = [str(s) for s in list(cfg["imlist"])]
        qimlist = [str(s) for s in list(cfg["qimlist"])]
    except TypeError:
        raise DatasetError(f"{path}: imlist/qimlist are not lists of names", "fix the ground truth") from None
    raw = cfg.get("gnd", [])
    raw = list(raw) if raw is not None else []
    if len(raw) != len(qimlist):
        raise DatasetError(f"{path}: {len(raw)} gnd entries for {len(qimlist)} queries",
                           "gnd must have one entry per query in qimlist")
    if len(set(imlist)) != len(imlist):
        dup = next(s for s in imlist if imlist.count(s) > 1)
        raise DatasetError(f"{path}: image {dup!r} appears twice in imlist", "image names must be unique")
    n = len(imlist)
    gnd = []
    for qi, g in enumerate(raw):
        if not isinstance(g, dict):
            raise DatasetError(f"{path}: gnd[{qi}] is a {type(g).__name__}, expected a dict", "fix the ground truth")
        easy = g["easy"] if "easy" in g else g.get("ok", [])
        e = {"easy": _int_list(easy, f"gnd[{qi}].easy", path),
             "hard": _int_list(g.get("hard", []), f"gnd[{qi}].hard", path),
             "junk": _int_list(g.get("junk", []), f"gnd[{qi}].junk", path)}
        for k in ("easy", "hard", "junk"):
            bad = [v for v in e[k] if v < 0 or v >= n]
            if bad:
                raise DatasetError(f"{path}: gnd[{qi}].{k} index {bad[0]} is out of range for {n} database images",
                                   "the ground truth does not belong to this image list")
        if g.get("bbx") is not None:
            try:
                bbx = [float(v) for v in np.asarray(g["bbx"], dtype=np.float64).reshape(-1)]
            except (TypeError, ValueError):
                bbx = []
            if len(bbx) != 4 or not all(np.isfinite(bbx)) or bbx[2] <= bbx[0] or bbx[3] <= bbx[1]:
                raise DatasetError(f"{path}: gnd[{qi}].bbx {g['bbx']!r} is not a box [x1, y1, x2, y2] with x1 < x2, "
                                   "y1 < y2", "fix the ground truth")
            e["bbx"] = bbx
        gnd.append(e)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


# ---- atomic writes --------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
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
    try:  # make the rename durable too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _cleanup_temps(folder: Path) -> None:
    """Remove temp files a killed run left behind."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and _TMP_MARK in p.name:
            try:
                p.unlink()
            except OSError:
                pass


def write_gnd(path: Path, imlist: list[str], qimlist: list[str], gnd: list[dict[str, Any]]) -> None:
    """Atomically write a revisitop gnd pickle (plain lists, ints and floats only)."""
    obj = {"imlist": list(imlist), "qimlist": list(qimlist),
           "gnd": [{k: ([float(v) for v in g[k]] if k == "bbx" else [int(v) for v in g[k]])
                    for k in ("bbx", "easy", "hard", "junk") if k in g} for g in gnd]}
    _atomic_write(path, pickle.dumps(obj, protocol=2))


def _read_sources(root: Path) -> dict[str, Any] | None:
    p = root / SOURCES_FILE
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
        meta["images"] = {k: Source(**v) for k, v in meta.get("images", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{p} is corrupt ({type(e).__name__})",
                           "re-run `visearch convert` on the original folder to rebuild it") from None
    if meta.get("schema", 1) > SCHEMA_VERSION:
        raise DatasetError(f"{p} was written by a newer visearch (schema {meta.get('schema')})", "upgrade visearch")
    return meta


def _write_sources(root: Path, meta: dict[str, Any]) -> None:
    out = dict(meta)
    out["images"] = {k: asdict(v) for k, v in sorted(meta["images"].items())}
    _atomic_write(root / SOURCES_FILE, json.dumps(out, indent=1).encode("ascii"))


# ---- ids ------------------------------------------------------------------------------------------------------------
def make_id(rel: str) -> str:
    """Stable id for a file at relative POSIX path `rel`: ascii slug of the path (without extension) + 10 hex of
    sha1(path). Same path -> same id on every run; equal names in different folders differ; never starts with '-'."""
    rel = unicodedata.normalize("NFC", rel)
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    slug = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "_", slug).strip("_")[-48:].strip("_") or "img"
    return f"{slug}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


# ---- report ---------------------------------------------------------------------------------------------------------
@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class ConvertReport:
    """What a convert run did. `added` + `updated` ids need (re-)describing; `removed` ids must leave the store."""

    name: str
    root: Path
    source: Path
    origin: str = "folder"
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: int = 0  # files without an image extension, hidden files
    warnings: list[str] = field(default_factory=list)
    n_images: int = 0  # database images (imlist)
    n_queries: int = 0

    @property
    def changed(self) -> list[str]:
        return self.added + self.updated

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["root"], d["source"] = str(self.root), str(self.source)
        return d

    def summary(self) -> str:
        head = (f"{self.name}: {self.n_images} database images, {self.n_queries} queries -> {self.root} "
                f"({len(self.added)} added, {len(self.updated)} updated, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged, {len(self.skipped)} skipped, {self.ignored} ignored)")
        lines = [head]
        for s in self.skipped:  # undecodable file names (surrogates) must not break printing
            p = s.path.encode("utf-8", "backslashreplace").decode("utf-8")
            lines.append(f"  skipped {p}: {s.reason}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


# ---- convert --------------------------------------------------------------------------------------------------------
def is_revisitop_folder(folder: str | Path) -> bool:
    """A folder with jpg/ and a gnd_*.pkl (e.g. roxford5k, rparis6k as distributed)."""
    f = Path(folder)
    return (f / "jpg").is_dir() and any(f.glob("gnd_*.pkl"))


def convert(
    source: str | Path,
    data_dir: str | Path,
    name: str,
    ground_truth: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    on_total: Callable[[int], None] | None = None,
    workers: int | None = None,
    replace: bool = False,
) -> ConvertReport:
    """Folder of images (recursive) -> `<data_dir>/<name>` in revisitop layout; or import a revisitop folder.

    Re-running adds new images, re-converts changed ones (same path, new content), prunes deleted ones; the report
    lists them. Bad files are skipped with a reason, never fatal. `progress(n)` is called as files are processed,
    `on_total(n)` once with the number of image files found. `replace=True` lets a dataset switch to another source
    folder (e.g. after the folder moved). Ground truth format: see the module docstring.
    """
    if not _NAME_RE.match(name or ""):
        raise UsageError(f"invalid dataset name {name!r}",
                         "use letters, digits, '.', '_' or '-', starting with a letter or digit (max 64)")
    src = Path(source).expanduser()
    if not src.exists():
        raise DatasetError(f"source folder {src} does not exist", "check the path")
    if not src.is_dir():
        raise DatasetError(f"source {src} is not a folder", "pass a folder of images (it is searched recursively)")
    src = src.resolve()
    data_dir = Path(data_dir).expanduser()
    out = data_dir / name
    if is_revisitop_folder(src):
        if ground_truth is not None:
            raise UsageError(f"{src} is a revisitop dataset with its own ground truth", "leave out --ground-truth")
        return _import_revisitop(src, out, name, progress, on_total)
    return _convert_folder(src, data_dir, out, name, ground_truth, progress, on_total, workers, replace)


def _prepare_out(out: Path, name: str, src: Path, origin: str, replace: bool) -> dict[str, Any] | None:
    """Create the output folder; return the previous sources.json, refusing to overwrite foreign content."""
    meta = _read_sources(out) if out.is_dir() else None
    foreign = out.is_dir() and meta is None and ((out / "jpg").exists() or (out / f"gnd_{name}.pkl").exists())
    if foreign and out.resolve() != src:
        raise DatasetError(f"{out} already holds a dataset that visearch did not create",
                           "choose another --name or move that folder away")
    if meta is not None and meta.get("origin", "folder") != origin:
        raise DatasetError(f"dataset {name!r} was made from a {meta.get('origin')} source, not a {origin} one",
                           "choose another --name")
    if meta is not None and not replace:
        old = meta.get("source_root")
        if old and Path(old) != src:
            raise DatasetError(f"dataset {name!r} was converted from {old}, not {src}",
                               "choose another --name, or pass --replace to make this folder its source")
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    _cleanup_temps(out)
    _cleanup_temps(out / "jpg")
    return meta


def _walk(root: Path, exclude: list[Path], report: ConvertReport) -> list[tuple[Path, str]]:
    """Image files under root as (path, relative POSIX path), sorted; follows directory symlinks once (loops are
    skipped with a reason); hidden entries and non-image files are counted as ignored."""
    visited: set[tuple[int, int]] = set()
    found: list[tuple[Path, str]] = []
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        d, rel = stack.pop()
        try:
            st = d.stat()
        except OSError as e:
            report.skipped.append(SkippedFile(str(d), _os_reason(e)))
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            report.skipped.append(SkippedFile(str(d), "symlink loop: folder already visited"))
            continue
        visited.add(key)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            report.skipped.append(SkippedFile(str(d), f"cannot list folder ({_os_reason(e)})"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                report.ignored += 1
                continue
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir()  # follows symlinks; False for broken or looping links
            except OSError:
                is_dir = False
            if is_dir:
                p = Path(e.path)
                try:
                    rp = p.resolve()
                except (OSError, RuntimeError):
                    rp = p
                if any(rp == x or x in rp.parents for x in exclude):
                    continue  # our own output (data dir inside the source folder)
                subdirs.append((p, r))
            elif is_image_file(e.name):
                found.append((Path(e.path), r))
            else:
                report.ignored += 1
        stack.extend(reversed(subdirs))
    found.sort(key=lambda t: t[1])
    return found


def _os_reason(e: OSError) -> str:
    import errno

    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "broken symlink or file vanished"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


@dataclass
class _Result:
    iid: str
    path: Path
    rel: str
    status: str  # "added" | "updated" | "unchanged" | "skipped"
    source: Source | None = None
    reason: str = ""


def _process_file(path: Path, rel: str, iid: str, prev: Source | None, jpg: Path) -> _Result:
    """Stat, hash and (if new or changed) decode + write one image. Never raises for a bad file."""
    from PIL import Image

    try:
        st = os.stat(path)
    except OSError as e:
        return _Result(iid, path, rel, "skipped", reason=_os_reason(e))
    if not stat_mod.S_ISREG(st.st_mode):
        return _Result(iid, path, rel, "skipped", reason="not a regular file")
    have_jpg = jpg.is_file()
    if prev is not None and have_jpg and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns:
        return _Result(iid, path, rel, "unchanged", prev)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return _Result(iid, path, rel, "skipped", reason=_os_reason(e))
    sha = hashlib.sha256(data).hexdigest()
    src = Source(str(path), st.st_size, st.st_mtime_ns, sha, rel)
    if prev is not None and have_jpg and prev.sha256 == sha:
        return _Result(iid, path, rel, "unchanged", src)  # touched, not changed
    try:
        arr = load_rgb_bytes(data, name=str(path))
        # an upright baseline RGB JPEG is kept byte for byte (no re-encoding loss); everything else is re-encoded
        verbatim = False
        if data[:3] == b"\xff\xd8\xff":
            with Image.open(io.BytesIO(data)) as im:
                verbatim = im.mode == "RGB" and exif_orientation(im) == 1 and im.size == (arr.shape[1], arr.shape[0])
        if verbatim:
            payload = data
        else:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
            payload = buf.getvalue()
    except ImageError as e:
        msg = e.message
        prefix = f"{path}: "
        return _Result(iid, path, rel, "skipped", reason=msg.removeprefix(prefix))
    except Exception as e:  # noqa: BLE001 - never abort the run on one file
        return _Result(iid, path, rel, "skipped", reason=f"cannot convert ({type(e).__name__}: {e})"[:200])
    try:
        _atomic_write(jpg, payload)
    except OSError as e:
        # the output side failing (disk full) is not a bad input file: stop with a clear message
        raise DatasetError(f"cannot write {jpg} ({e.strerror or e})", "free disk space and re-run convert; "
                           "images already converted are kept") from None
    return _Result(iid, path, rel, "updated" if prev is not None else "added", src)


def _convert_folder(src: Path, data_dir: Path, out: Path, name: str, ground_truth: str | Path | None,
                    progress: Callable[[int], None] | None, on_total: Callable[[int], None] | None,
                    workers: int | None, replace: bool) -> ConvertReport:
    meta = _prepare_out(out, name, src, "folder", replace)
    prev_info: dict[str, Source] = meta["images"] if meta else {}
    report = ConvertReport(name, out, src, "folder")
    # never import our own output: the dataset folder, and the whole data dir when it sits inside the source
    exclude = [out.resolve()]
    ddir = data_dir.resolve()
    if src in ddir.parents:  # data dir inside the source folder: skip all of it (features, other datasets)
        exclude.append(ddir)
    files = _walk(src, exclude, report)
    if on_total:
        on_total(len(files))

    # ids from relative paths; on the (practically impossible) clash of two paths, the later gets a longer hash
    jobs: list[tuple[Path, str, str]] = []
    taken: dict[str, str] = {}
    for path, rel in files:
        iid = make_id(rel)
        if iid in taken and taken[iid] != rel:
            iid = f"{iid.rsplit('-', 1)[0]}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:20]}"
        taken[iid] = rel
        jobs.append((path, rel, iid))

    jpg_dir = out / "jpg"
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    results: list[_Result] = []

    def run(job: tuple[Path, str, str]) -> _Result:
        path, rel, iid = job
        return _process_file(path, rel, iid, prev_info.get(iid), jpg_dir / f"{iid}.jpg")

    if n_workers <= 1:
        for job in jobs:
            results.append(run(job))
            if progress:
                progress(1)
    else:
        with ThreadPoolExecutor(n_workers) as pool:  # Pillow releases the GIL while decoding and encoding
            for r in pool.map(run, jobs):
                results.append(r)
                if progress:
                    progress(1)

    info: dict[str, Source] = {}
    for r in results:
        if r.status == "skipped":
            report.skipped.append(SkippedFile(str(r.path), r.reason))
            continue
        assert r.source is not None
        info[r.iid] = r.source
        if r.status == "added":
            report.added.append(r.iid)
        elif r.status == "updated":
            report.updated.append(r.iid)
        else:
            report.unchanged += 1
    # a previously converted file that is now unreadable/corrupt keeps no entry: it is pruned like a deleted one
    report.removed = sorted(set(prev_info) - set(info))

    # ground truth: a new file replaces the stored one; otherwise the stored one is re-applied to the new image set
    skipped_rels = {r.rel for r in results if r.status == "skipped"}
    if ground_truth is not None:
        spec = _parse_ground_truth(Path(ground_truth), src, info, skipped_rels, report)
    else:
        spec = _reapply_spec(meta.get("ground_truth") if meta else None, info, report)
    qids = [q["query"] for q in spec]
    qset = set(qids)

    # imlist: previous order kept, new ids appended (sorted), queries excluded
    prev_imlist: list[str] = []
    gnd_file = out / f"gnd_{name}.pkl"
    if gnd_file.is_file():
        try:
            old = validate_gnd(read_gnd(gnd_file), gnd_file)
            prev_imlist = old["imlist"] + old["qimlist"]
        except DatasetError as e:
            report.warnings.append(f"previous {gnd_file.name} unreadable, rebuilt ({e.message})")
    seen = set()
    imlist = []
    for iid in prev_imlist + sorted(info):
        if iid in info and iid not in qset and iid not in seen:
            imlist.append(iid)
            seen.add(iid)
    index = {iid: k for k, iid in enumerate(imlist)}
    gnd = []
    for q in spec:
        e: dict[str, Any] = {k: sorted(index[i] for i in q[k] if i in index) for k in ("easy", "hard", "junk")}
        bbx = q.get("bbox")
        w, h = image_size(jpg_dir / f"{q['query']}.jpg")
        if bbx is None:
            bbx = [0.0, 0.0, float(w), float(h)]
        _check_box(bbx, w, h, f"query {info[q['query']].path}", report)
        e["bbx"] = [float(v) for v in bbx]
        gnd.append(e)

    # commit: gnd, then sources.json; only then delete the files of removed images
    write_gnd(gnd_file, imlist, qids, gnd)
    new_meta = {"schema": SCHEMA_VERSION, "name": name, "origin": "folder", "source_root": str(src),
                "apply_exif": True, "allow_truncated": False, "images": info, "ground_truth": spec or None}
    _write_sources(out, new_meta)
    for iid in report.removed:
        try:
            (jpg_dir / f"{iid}.jpg").unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            report.warnings.append(f"could not delete {iid}.jpg ({e.strerror})")
    report.n_images, report.n_queries = len(imlist), len(qids)
    return report


def _check_box(bbx: Sequence[float], w: int, h: int, what: str, report: ConvertReport) -> None:
    """A box must overlap its image (else DatasetError); one that sticks out is kept (crops clip it) with a warning."""
    x1, y1, x2, y2 = (float(v) for v in bbx)
    if not (x2 > x1 and y2 > y1):
        raise DatasetError(f"{what}: box {list(bbx)} is empty (need x1 < x2, y1 < y2)", "fix the ground truth")
    if int(x2) <= 0 or int(y2) <= 0 or int(x1) >= w or int(y1) >= h or min(int(x2), w) <= max(int(x1), 0) \
            or min(int(y2), h) <= max(int(y1), 0):
        raise DatasetError(f"{what}: box {list(bbx)} lies outside the {w}x{h} image",
                           "boxes are [x1, y1, x2, y2] in pixels of the upright image")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        report.warnings.append(f"{what}: box {list(bbx)} extends beyond the {w}x{h} image; it is clipped when cropping")


# ---- ground truth files ---------------------------------------------------------------------------------------------
def _read_gt_rows(path: Path) -> list[dict[str, Any]]:
    """Parse the CSV or JSON ground-truth file into [{"image", "bbox" or None, "easy", "hard", "junk"}]."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DatasetError(f"cannot read ground truth {path} ({e.strerror or e})", "check the path") from None
    except UnicodeDecodeError:
        raise DatasetError(f"ground truth {path} is not UTF-8 text", "save it as UTF-8 CSV or JSON") from None
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DatasetError(f"ground truth {path} is not valid JSON ({e})", "see the format in README") from None
        items = obj.get("queries") if isinstance(obj, dict) else obj
        if not isinstance(items, list):
            raise DatasetError(f"ground truth {path}: expected {{\"queries\": [...]}} or a list", "see README")
        for k, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("image") or it.get("query"), str):
                raise DatasetError(f"ground truth {path}: query #{k + 1} has no \"image\" path", "see README")
            pos = list(it.get("positives", [])) + list(it.get("easy", []))
            rows.append({"image": it.get("image") or it.get("query"), "bbox": it.get("bbox", it.get("bbx")),
                         "easy": pos, "hard": list(it.get("hard", [])), "junk": list(it.get("junk", [])),
                         "where": f"query #{k + 1}"})
        return rows
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "query" not in fields or "positives" not in fields:
        raise DatasetError(f"ground truth {path}: CSV header must have query and positives columns "
                           f"(got {', '.join(fields) or 'none'})", "header: query,x1,y1,x2,y2,positives,hard,junk")
    for line, raw in enumerate(reader, start=2):
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not r.get("query"):
            continue
        coords = [r.get(c, "") for c in ("x1", "y1", "x2", "y2")]
        if any(coords):
            try:
                bbox = [float(c) for c in coords]
            except ValueError:
                raise DatasetError(f"ground truth {path} line {line}: bad box {coords}", "x1,y1,x2,y2 are numbers") \
                    from None
        else:
            bbox = None

        def split(s: str) -> list[str]:
            return [p.strip() for p in s.split(";") if p.strip()]

        rows.append({"image": r["query"], "bbox": bbox, "easy": split(r.get("positives", "")),
                     "hard": split(r.get("hard", "")), "junk": split(r.get("junk", "")), "where": f"line {line}"})
    return rows


def _parse_ground_truth(path: Path, src: Path, info: dict[str, Source], skipped_rels: set[str],
                        report: ConvertReport) -> list[dict[str, Any]]:
    """Ground-truth file -> spec by ids: [{"query": id, "bbox": [..] or None, "easy"/"hard"/"junk": [ids]}]."""
    if not path.is_file():
        raise DatasetError(f"ground truth file {path} not found", "check the --ground-truth path")
    rows = _read_gt_rows(path)
    by_rel = {s.rel: iid for iid, s in info.items() if s.rel}
    by_name: dict[str, list[str]] = {}
    for rel, iid in by_rel.items():
        by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(iid)
    skipped_names = {r.rsplit("/", 1)[-1] for r in skipped_rels if r}

    def lookup(p: str, where: str) -> str | None:
        """id of a ground-truth path, None for a skipped (bad) image; DatasetError when unknown."""
        q = p.replace("\\", "/")
        cand = Path(q)
        if cand.is_absolute():
            try:
                q = cand.resolve().relative_to(src).as_posix()
            except ValueError:
                raise DatasetError(f"ground truth {path} {where}: {p} is outside the source folder {src}",
                                   "put query and database images inside the folder being converted") from None
        q = q.removeprefix("./")
        q = unicodedata.normalize("NFC", q)
        if q in by_rel:
            return by_rel[q]
        if q in skipped_rels or ("/" not in q and q in skipped_names):
            return None
        if "/" not in q and len(by_name.get(q, [])) == 1:
            return by_name[q][0]
        if "/" not in q and len(by_name.get(q, [])) > 1:
            raise DatasetError(f"ground truth {path} {where}: file name {p} is ambiguous "
                               f"({len(by_name[q])} files)", "give the path relative to the source folder")
        raise DatasetError(f"ground truth {path} {where}: image {p} is not in {src}",
                           "paths are relative to the source folder")

    spec: list[dict[str, Any]] = []
    for row in rows:
        qid = lookup(str(row["image"]), row["where"])
        if qid is None:
            report.warnings.append(f"ground truth {row['where']}: query {row['image']} was skipped (bad image); "
                                   "query dropped")
            continue
        entry: dict[str, Any] = {"query": qid, "bbox": None}
        if row["bbox"] is not None:
            try:
                bbox = [float(v) for v in row["bbox"]]
            except (TypeError, ValueError):
                bbox = []
            if len(bbox) != 4:
                raise DatasetError(f"ground truth {path} {row['where']}: bbox {row['bbox']} is not [x1, y1, x2, y2]",
                                   "see the format in README")
            entry["bbox"] = bbox
        for k in ("easy", "hard", "junk"):
            ids = []
            for p in row[k]:
                iid = lookup(str(p), row["where"])
                if iid is None:
                    report.warnings.append(f"ground truth {row['where']}: {p} was skipped (bad image); left out")
                elif iid != qid:
                    ids.append(iid)
            entry[k] = sorted(set(ids))
        spec.append(entry)
    qset = {e["query"] for e in spec}
    for e in spec:
        for k in ("easy", "hard"):
            clash = [i for i in e[k] if i in qset]
            if clash:
                raise DatasetError(f"ground truth {path}: query image {info[clash[0]].rel} is also listed as a "
                                   f"positive of {info[e['query']].rel}",
                                   "query images are not part of the database (revisitop); use another copy")
        e["junk"] = [i for i in e["junk"] if i not in qset]
    if len(qset) != len(spec):
        raise DatasetError(f"ground truth {path}: a query image is listed twice", "one entry per query image")
    return spec


def _reapply_spec(spec: list[dict[str, Any]] | None, info: dict[str, Source],
                  report: ConvertReport) -> list[dict[str, Any]]:
    """Stored ground truth restricted to the images that still exist."""
    out = []
    for e in spec or []:
        if e["query"] not in info:
            report.warnings.append(f"ground-truth query {e['query']} no longer exists; query dropped")
            continue
        out.append({"query": e["query"], "bbox": e.get("bbox"),
                    **{k: [i for i in e.get(k, []) if i in info] for k in ("easy", "hard", "junk")}})
    return out


# ---- existing revisitop datasets ------------------------------------------------------------------------------------
def _import_revisitop(src: Path, out: Path, name: str, progress: Callable[[int], None] | None,
                      on_total: Callable[[int], None] | None) -> ConvertReport:
    """Use an official revisitop folder as is: validate its gnd, link (or copy) its images, keep its ground truth."""
    import shutil

    pkls = sorted(src.glob("gnd_*.pkl"))
    preferred = src / f"gnd_{src.name}.pkl"
    if preferred in pkls:
        gnd_src = preferred
    elif len(pkls) == 1:
        gnd_src = pkls[0]
    else:
        raise DatasetError(f"{src} holds several ground-truth files ({', '.join(p.name for p in pkls)})",
                           f"keep only gnd_{src.name}.pkl")
    cfg = validate_gnd(read_gnd(gnd_src), gnd_src)
    same = out.exists() and out.resolve() == src
    meta = _prepare_out(out, name, src, "revisitop", replace=True) if not same else _read_sources(out)
    prev_info: dict[str, Source] = meta["images"] if meta else {}
    report = ConvertReport(name, out, src, "revisitop")
    all_ids = cfg["imlist"] + cfg["qimlist"]
    if on_total:
        on_total(len(all_ids))
    missing = [i for i in all_ids if not (src / "jpg" / f"{i}.jpg").is_file()]
    if missing:
        raise DatasetError(f"{src}: {len(missing)} images named in {gnd_src.name} are missing from jpg/ "
                           f"(e.g. {missing[0]}.jpg)", "download the complete dataset")
    for qi, g in enumerate(cfg["gnd"]):
        if "bbx" in g:
            try:
                w, h = image_size(src / "jpg" / f"{cfg['qimlist'][qi]}.jpg", apply_exif=False)
            except ImageError as e:
                raise DatasetError(f"query image unreadable: {e.message}", "download the dataset again") from None
            _check_box(g["bbx"], w, h, f"{gnd_src.name} query {qi} ({cfg['qimlist'][qi]})", report)

    info: dict[str, Source] = {}
    for iid in all_ids:
        s = src / "jpg" / f"{iid}.jpg"
        st = s.stat()
        info[iid] = Source(str(s), st.st_size, st.st_mtime_ns, None, None)
        dst = out / "jpg" / f"{iid}.jpg"
        if not same:
            ok = False
            try:
                ok = dst.is_symlink() and Path(os.readlink(dst)) == s
            except OSError:
                pass
            if not ok:
                if dst.exists() or dst.is_symlink():
                    dst.unlink()
                try:
                    os.symlink(s, dst)
                except OSError:
                    shutil.copy2(s, dst)  # no symlinks on this filesystem
        prev = prev_info.get(iid)
        if prev is None:
            report.added.append(iid)
        elif (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
            report.updated.append(iid)
        else:
            report.unchanged += 1
        if progress:
            progress(1)
    report.removed = sorted(set(prev_info) - set(info))
    gnd_dst = out / f"gnd_{name}.pkl"
    if not (same and gnd_dst == gnd_src):
        write_gnd(gnd_dst, cfg["imlist"], cfg["qimlist"], cfg["gnd"])
    _write_sources(out, {"schema": SCHEMA_VERSION, "name": name, "origin": "revisitop", "source_root": str(src),
                         "apply_exif": False, "allow_truncated": True, "images": info, "ground_truth": None})
    if not same:
        for iid in report.removed:
            try:
                (out / "jpg" / f"{iid}.jpg").unlink()
            except OSError:
                pass
    report.n_images, report.n_queries = len(cfg["imlist"]), len(cfg["qimlist"])
    return report
