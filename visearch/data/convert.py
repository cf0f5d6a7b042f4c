"""Folder of photos -> revisitop-layout dataset: walking the folder, converting each file, the report; and importing
an official revisitop folder as is. Ground truth files: see ground_truth.py."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import shutil
import stat as stat_mod
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError, ImageError, UsageError
from ..fsutil import atomic_write, cleanup_temps, fsync_dir
from ..images import exif_orientation, image_size, is_image_file, load_rgb_bytes
from ..paths import inside
from .dataset import SCHEMA_VERSION, SOURCES_FILE, Source, read_sources, write_sources
from .ground_truth import parse as parse_ground_truth
from .ground_truth import precheck as precheck_ground_truth
from .ground_truth import reapply as reapply_ground_truth
from .revisitop import is_revisitop_folder, read_gnd, validate_gnd, write_gnd

JPEG_QUALITY = 95
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---- ids ------------------------------------------------------------------------------------------------------------
def make_id(rel: str) -> str:
    """Stable id for a file at relative POSIX path `rel`: ascii slug of the path (without extension) + 10 hex of
    sha1(path). Same path -> same id on every run; equal names in different folders differ; never starts with '-'."""
    rel = unicodedata.normalize("NFC", rel)
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    slug = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "_", slug).strip("_")[-48:].strip("_") or "img"
    return f"{slug}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


# ---- report -------------------------------------------------------------------------------------------------------
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


# ---- convert ------------------------------------------------------------------------------------------------------
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
    if out.exists():
        res = out.resolve()
        ours = (out / SOURCES_FILE).is_file() and (read_sources(out) or {}).get("origin", "folder") == "folder"
        if (src == res and ours) or res in src.parents:
            raise DatasetError(f"refusing to convert {src} into itself: it is (inside) the dataset folder {out}",
                               "convert the original photo folder; the dataset folder is visearch's output")
    revisitop = is_revisitop_folder(src)
    if revisitop and ground_truth is not None:
        raise UsageError(f"{src} is a revisitop dataset with its own ground truth", "leave out --ground-truth")
    if ground_truth is not None:
        precheck_ground_truth(Path(ground_truth))  # before any image is re-encoded
    if out.exists() and any(out.iterdir()):
        if revisitop:
            return _import_revisitop(src, out, name, progress, on_total)
        return _convert_folder(src, data_dir, out, name, ground_truth, progress, on_total, workers, replace)
    # a first conversion is built beside and renamed into place at the end, so a failed or killed first run leaves
    # nothing under the name (only a hidden build folder, removed by the next run)
    _remove_stale_builds(data_dir, name)
    data_dir.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{name}{BUILD_MARK}", dir=data_dir))
    try:
        if revisitop:
            rep = _import_revisitop(src, build, name, progress, on_total)
        else:
            rep = _convert_folder(src, data_dir, build, name, ground_truth, progress, on_total, workers, replace)
        if out.exists():
            out.rmdir()  # empty (checked above); a non-empty one appearing meanwhile makes the rename fail
        os.rename(build, out)
        fsync_dir(data_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    rep.root = out
    return rep


BUILD_MARK = ".build-"


def _remove_stale_builds(data_dir: Path, name: str) -> None:
    """Remove the build folders of first conversions of `name` that were killed before their final rename."""
    if not data_dir.is_dir():
        return
    for p in data_dir.iterdir():
        if p.name.startswith(f".{name}{BUILD_MARK}") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _prepare_out(out: Path, name: str, src: Path, origin: str, replace: bool) -> dict[str, Any] | None:
    """Create the output folder; return the previous sources.json, refusing to overwrite foreign content."""
    meta = read_sources(out) if out.is_dir() else None
    if out.is_dir() and meta is None and out.resolve() != src:
        if (out / f"gnd_{name}.pkl").exists():  # a revisitop dataset from elsewhere: never overwritten
            raise DatasetError(f"{out} already holds a dataset that visearch did not create",
                               "choose another --name or move that folder away")
        if (out / "jpg").is_dir() and any((out / "jpg").iterdir()) and not replace:
            # images without ground truth or sources.json: most likely a first convert (of an older visearch) that
            # was interrupted; --replace converts into it (files of its own that no image names stay untouched)
            raise DatasetError(f"{out} holds images but no dataset record (an interrupted first convert?)",
                               "pass --replace to convert into it, or choose another --name")
    if meta is not None and meta.get("origin", "folder") != origin:
        raise DatasetError(f"dataset {name!r} was made from a {meta.get('origin')} source, not a {origin} one",
                           "choose another --name")
    if meta is not None and not replace:
        old = meta.get("source_root")
        if old and Path(old) != src:
            raise DatasetError(f"dataset {name!r} was converted from {old}, not {src}",
                               "choose another --name, or pass --replace to make this folder its source")
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    inside(out, out / "jpg" / "x.jpg")  # jpg/ must not be a link out of the dataset folder
    cleanup_temps(out)
    cleanup_temps(out / "jpg")
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
        # unchanged content, but the path is today's: after a move + --replace, results point into the new folder
        return _Result(iid, path, rel, "unchanged", dataclasses.replace(prev, path=str(path), rel=rel))
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
        atomic_write(jpg, payload)
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
        spec = parse_ground_truth(Path(ground_truth), src, info, skipped_rels, report.warnings)
    else:
        spec = reapply_ground_truth(meta.get("ground_truth") if meta else None, info, report.warnings)
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
    write_sources(out, new_meta)
    for iid in report.removed:
        try:
            inside(out, jpg_dir / f"{iid}.jpg").unlink()
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


# ---- existing revisitop datasets ----------------------------------------------------------------------------------
def _import_revisitop(src: Path, out: Path, name: str, progress: Callable[[int], None] | None,
                      on_total: Callable[[int], None] | None) -> ConvertReport:
    """Use an official revisitop folder as is: validate its gnd, link (or copy) its images, keep its ground truth."""
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
    meta = _prepare_out(out, name, src, "revisitop", replace=True) if not same else read_sources(out)
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
        dst = inside(out, out / "jpg" / f"{iid}.jpg")  # ids are checked names; this proves the write stays inside
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
    write_sources(out, {"schema": SCHEMA_VERSION, "name": name, "origin": "revisitop", "source_root": str(src),
                         "apply_exif": False, "allow_truncated": True, "images": info, "ground_truth": None})
    if not same:
        for iid in report.removed:
            try:
                inside(out, out / "jpg" / f"{iid}.jpg").unlink()
            except OSError:
                pass
    report.n_images, report.n_queries = len(cfg["imlist"]), len(cfg["qimlist"])
    return report
