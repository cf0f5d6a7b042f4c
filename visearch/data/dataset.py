"""The dataset model: a revisitop-layout folder and its id -> original-file map, and how it is loaded.

Layout of `<data_dir>/<name>/`:
    jpg/<id>.jpg        every database and query image (JPEG)
    gnd_<name>.pkl      {"imlist": [ids], "qimlist": [query ids], "gnd": [{"bbx", "easy", "hard", "junk"}]}
                        exactly as filipradenovic/revisitop reads it (indices 0-based into imlist); see revisitop.py
    sources.json        id -> original file (path, size, mtime, sha256) for results and change detection, plus the
                        ground truth by id so re-runs can rebuild gnd when images come and go
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..fsutil import atomic_write
from ..paths import check_id
from .revisitop import read_gnd, validate_gnd

SOURCES_FILE = "sources.json"
SCHEMA_VERSION = 1


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
    meta = read_sources(root)
    if meta is None:  # official revisitop folder dropped into the data dir as is
        return Dataset(name, root, cfg["imlist"], cfg["qimlist"], cfg["gnd"], origin="revisitop",
                       apply_exif=False, allow_truncated=True)
    info = meta["images"]
    return Dataset(name, root, cfg["imlist"], cfg["qimlist"], cfg["gnd"],
                   sources={k: v.path for k, v in info.items()}, source_info=info,
                   origin=meta.get("origin", "folder"), apply_exif=bool(meta.get("apply_exif", True)),
                   allow_truncated=bool(meta.get("allow_truncated", False)))


# ---- sources.json -------------------------------------------------------------------------------------------------
def read_sources(root: Path) -> dict[str, Any] | None:
    p = root / SOURCES_FILE
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
        meta["images"] = {k: Source(**v) for k, v in meta.get("images", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise DatasetError(f"{p} is corrupt ({type(e).__name__})",
                           "re-run `visearch convert` on the original folder to rebuild it") from None
    problem = _sources_problem(meta)
    if problem:
        raise DatasetError(f"{p} is corrupt ({problem})",
                           "re-run `visearch convert` on the original folder to rebuild it")
    for k in meta["images"]:
        check_id(k, p)  # ids name files inside the dataset folder: no separators, '..' or NUL
    for e in meta.get("ground_truth") or []:
        for i in [e["query"], *e.get("easy", []), *e.get("hard", []), *e.get("junk", [])]:
            check_id(i, p)
    if meta.get("schema", 1) > SCHEMA_VERSION:
        raise DatasetError(f"{p} was written by a newer visearch (schema {meta.get('schema')})", "upgrade visearch")
    return meta


def _sources_problem(meta: dict[str, Any]) -> str | None:
    """Why a parsed sources.json has the wrong types (fields checked before any is used), or None."""
    for k, v in meta["images"].items():
        if not (isinstance(v.path, str) and type(v.size) is int and type(v.mtime_ns) is int
                and isinstance(v.sha256, (str, type(None))) and isinstance(v.rel, (str, type(None)))):
            return f"image {k[:60]!r} has fields of the wrong type"
    if not isinstance(meta.get("source_root", ""), (str, type(None))) or not isinstance(meta.get("origin", ""), str):
        return "source_root / origin are not strings"
    gt = meta.get("ground_truth")
    if gt is not None:
        if not isinstance(gt, list):
            return "ground_truth is not a list"
        for e in gt:
            if not isinstance(e, dict) or not isinstance(e.get("query"), str):
                return "a ground_truth entry has no query id"
            if not all(isinstance(e.get(k, []), list) and all(isinstance(i, str) for i in e.get(k, []))
                       for k in ("easy", "hard", "junk")):
                return "a ground_truth entry's easy/hard/junk are not lists of ids"
            b = e.get("bbox")
            if b is not None and not (isinstance(b, list) and len(b) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e12 for v in b)):
                return "a ground_truth bbox is not 4 numbers"
    return None


def write_sources(root: Path, meta: dict[str, Any]) -> None:
    out = dict(meta)
    out["images"] = {k: asdict(v) for k, v in sorted(meta["images"].items())}
    atomic_write(root / SOURCES_FILE, json.dumps(out, indent=1).encode("ascii"))
