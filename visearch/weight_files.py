"""Weight files: safe loading, the manifest (visearch/weights_manifest.toml), status, downloads and verification.

Only the standard library is imported at module level so that `visearch weights list` stays instant;
requests / gdown / huggingface_hub / torch / numpy are imported where they are used."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UsageError, WeightsError, first_line
from .fsutil import sha256_file


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True on CPU; every failure becomes a one-line WeightsError naming the file."""
    import pickle
    import warnings
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}", "run `visearch weights list` to see where files go")
    if path.stat().st_size == 0:
        raise WeightsError(f"weight file is empty: {path}", "download it again (`visearch weights download`)")
    try:
        with warnings.catch_warnings():  # garbage files make the unpickler warn about pickle protocols: noise
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = first_line(e) if str(e).strip() else "unsupported pickle content"
        raise WeightsError(f"refusing to load {path}: it holds objects other than tensors ({first})",
                           "only plain checkpoints (tensors, dicts, numbers) are accepted") from None
    except MemoryError:
        raise WeightsError(f"cannot read checkpoint {path}: it asks for more memory than there is",
                           "download it again and check it with `visearch weights verify`") from None
    except Exception as e:  # noqa: BLE001 - garbage bytes make the unpickler raise KeyError, IndexError, struct.error..
        msg = first_line(e)
        if not isinstance(e, (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)):
            msg = f"{type(e).__name__}: {msg}"
        raise WeightsError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({msg})",
                           "download it again and check it with `visearch weights verify`") from None


# --------------------------------------------------------------------------------------------------------------------
# Manifest, status, downloads and verification.


log = logging.getLogger(__name__)

MIRROR_ENV = "VISEARCH_WEIGHTS_MIRROR"      # base URL serving every file item as <base>/<file>
HF_ENDPOINT_ENV = "VISEARCH_HF_ENDPOINT"    # Hugging Face hub endpoint for the hf-folder items
MANIFEST_ENV = "VISEARCH_WEIGHTS_MANIFEST"  # another manifest file (tests, private deployments)
_PACKAGED_MANIFEST = "weights_manifest.toml"  # package data of `visearch`, read through importlib.resources
_CHUNK = 1 << 20
_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds for HTTP

Progress = Callable[[int, "int | None"], None]  # progress(bytes_done, bytes_total or None)


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable item of the manifest. `size` / `sha256` are None when unknown (then not checked)."""

    name: str
    file: str                       # file name, or folder name for kind "hf-folder", inside the weights dir
    kind: str                       # "file" | "hf-folder"
    description: str = ""
    urls: tuple[str, ...] = ()
    gdrive_folder: str | None = None
    gdrive_file: str | None = None
    hf_repo: str | None = None
    size: int | None = None
    sha256: str | None = None
    approx_size: int | None = None
    license: str = ""
    used_by: tuple[str, ...] = ()

    def path(self, weights_dir: str | Path) -> Path:
        return Path(weights_dir) / self.file

    def sources(self) -> list[str]:
        """Human-readable places this item comes from, in the order they are tried (mirror override applied)."""
        mirror = os.environ.get(MIRROR_ENV)
        if self.kind == "hf-folder":
            endpoint = os.environ.get(HF_ENDPOINT_ENV) or "https://huggingface.co"
            return [f"{endpoint.rstrip('/')}/{self.hf_repo}"]
        if mirror:
            return [_mirror_url(mirror, self.file)]
        out = list(self.urls)
        if self.gdrive_file:
            out.append(f"https://drive.google.com/file/d/{self.gdrive_file}")
        elif self.gdrive_folder:
            out.append(f"https://drive.google.com/drive/folders/{self.gdrive_folder} ({self.file})")
        return out


class _FinalError(WeightsError):
    """A download that reached its source but must not be retried elsewhere (hash mismatch, cut-off transfer)."""


class WeightStatus(NamedTuple):
    spec: WeightSpec
    present: bool
    path: Path
    size: int       # bytes on disk (sum over the folder for hf-folder items); 0 when absent


class VerifyResult(NamedTuple):
    spec: WeightSpec
    ok: bool
    message: str


def _mirror_url(base: str, file: str) -> str:
    return f"{base.rstrip('/')}/{file}"


def manifest_path():
    """The manifest in use: $VISEARCH_WEIGHTS_MANIFEST, else the copy packaged as visearch/weights_manifest.toml
    (a Path or an importlib.resources Traversable)."""
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env)
    from importlib import resources

    return resources.files(__package__).joinpath(_PACKAGED_MANIFEST)


def _read_manifest() -> dict[str, Any]:
    path = manifest_path()
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"weights manifest not found: {path}", f"set {MANIFEST_ENV} or reinstall visearch") from None
    except OSError as e:
        raise WeightsError(f"cannot read weights manifest {path}: {e.strerror or type(e).__name__}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"weights manifest {path} is not valid TOML ({e})") from None


def _spec_from_table(t: dict[str, Any]) -> WeightSpec:
    kind = t.get("kind", "file")
    if kind not in ("file", "hf-folder"):
        raise WeightsError(f"manifest item {t.get('name')!r} has unknown kind {kind!r}", "use 'file' or 'hf-folder'")
    return WeightSpec(
        name=t["name"], file=t["file"], kind=kind, description=t.get("description", ""),
        urls=tuple(t.get("urls", ())), gdrive_folder=t.get("gdrive_folder") or None,
        gdrive_file=t.get("gdrive_file") or None, hf_repo=t.get("hf_repo") or None,
        size=int(t["size"]) if t.get("size") else None,
        sha256=str(t["sha256"]).lower() if t.get("sha256") else None,
        approx_size=int(t["approx_size"]) if t.get("approx_size") else None,
        license=t.get("license", ""), used_by=tuple(t.get("used_by", ())),
    )


def manifest() -> list[WeightSpec]:
    """Every downloadable item, in manifest order."""
    try:
        return [_spec_from_table(t) for t in _read_manifest().get("item", [])]
    except KeyError as e:
        raise WeightsError(f"weights manifest {manifest_path()} has an item without {e}") from None


def get_spec(name: str) -> WeightSpec:
    """The item called `name`; UsageError listing the known names otherwise."""
    for spec in manifest():
        if spec.name == name:
            return spec
    raise UsageError(f"unknown weights item {name!r}", f"known: {', '.join(s.name for s in manifest())}")


def requirements() -> dict[str, list[str]]:
    """Model or detector name -> names of the items it needs (`lite` -> [])."""
    data = _read_manifest()
    out: dict[str, list[str]] = {}
    for table in ("models", "detectors"):
        out.update({k: list(v) for k, v in data.get(table, {}).items()})
    return out


def download_hint(file_name: str, model: str | None = None) -> str:
    """How to get the weight file `file_name`: the `weights download` command of the manifest item holding it (or
    of `model`), else where to put it by hand. Hints never name something `weights download` refuses."""
    for spec in manifest():
        if spec.file == file_name:
            return f"run `visearch weights download {spec.name}`"
    if model and model in requirements():
        return f"run `visearch weights download {model}`"
    return f"put {file_name} in the weights folder (--weights-dir)"


def items_for(name: str) -> list[WeightSpec]:
    """A model or detector name -> the items it needs (maybe none); an item name -> [that item]. A name that is
    both (e.g. `ames-dist`, `superglobal-r50`) means the model, whose list includes the item of that name."""
    specs = {s.name: s for s in manifest()}
    reqs = requirements()
    if name in reqs:
        unknown = [n for n in reqs[name] if n not in specs]
        if unknown:
            raise WeightsError(f"weights manifest: {name} needs unknown item(s) {', '.join(unknown)}")
        return [specs[n] for n in reqs[name]]
    if name in specs:
        return [specs[name]]
    raise UsageError(f"unknown weights item or model {name!r}",
                     f"items: {', '.join(specs)}; models: {', '.join(reqs)}")


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _hf_folder_complete(path: Path) -> bool:
    """A usable transformers folder: config.json plus at least one weights file."""
    if not (path / "config.json").is_file():
        return False
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def status(weights_dir: str | Path) -> list[WeightStatus]:
    """Per manifest item: whether it is present in `weights_dir`, its path and its size on disk."""
    out = []
    for spec in manifest():
        path = spec.path(weights_dir)
        if spec.kind == "hf-folder":
            present = path.is_dir() and _hf_folder_complete(path)
            size = _folder_size(path) if present else 0
        else:
            present = path.is_file() and path.stat().st_size > 0
            size = path.stat().st_size if present else 0
        out.append(WeightStatus(spec, present, path, size))
    return out


def _check_file(spec: WeightSpec, path: Path) -> str | None:
    """None when `path` matches the known size and hash, else what is wrong (one line)."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"size {size} bytes, expected {spec.size}"
    if spec.sha256 is not None:
        digest = sha256_file(path)
        if digest != spec.sha256:
            return f"sha256 {digest}, expected {spec.sha256}"
    return None


# ---- offline detection ---------------------------------------------------------------------------------------------

def _is_offline(exc: BaseException) -> bool:
    """True when `exc` (or anything in its cause chain) says the host could not be reached at all."""
    import socket

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if isinstance(e, (ConnectionError, socket.gaierror, socket.timeout, TimeoutError)):
            return True
        if name in ("ConnectionError", "ConnectTimeout", "ConnectError", "LocalEntryNotFoundError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def _offline_error(spec: WeightSpec, weights_dir: Path) -> WeightsError:
    src = spec.sources()[0] if spec.sources() else "(no published source)"
    where = spec.path(weights_dir)
    what = "folder" if spec.kind == "hf-folder" else "file"
    return WeightsError(
        f"cannot download {spec.name}: this machine appears to be offline",
        f"on a networked machine fetch {src} and put the {what} at {where}",
    )


# ---- HTTP(S) with resume -------------------------------------------------------------------------------------------

def _http_download(url: str, spec: WeightSpec, dest: Path, progress: Progress | None, session: Any) -> None:
    """GET `url` into `<dest>.part` (resuming it with a Range request), check size/hash, rename onto `dest`.
    Errors leave no `dest`; an interrupted transfer keeps the .part for the next try."""
    import requests
    import urllib3

    part = dest.with_name(dest.name + ".part")
    sess = session or requests.Session()
    try:
        for _attempt in range(2):  # a second pass restarts from zero when the server rejects our range
            start = part.stat().st_size if part.is_file() else 0
            if spec.size is not None and start > spec.size:
                part.unlink()
                start = 0
            if spec.size is not None and start == spec.size and start > 0:
                break  # the .part is already complete; only the checks and the rename are missing
            # identity encoding: byte ranges must refer to the file itself, not to a compressed stream
            headers = {"Accept-Encoding": "identity"}
            if start:
                headers["Range"] = f"bytes={start}-"
            with sess.get(url, headers=headers, stream=True, timeout=_TIMEOUT) as r:
                if r.status_code == 416 and start:
                    if r.headers.get("Content-Range", "") == f"bytes */{start}":
                        break  # the .part already holds the whole file (an earlier run stopped before the rename)
                    part.unlink()  # our partial file does not fit the server's file: restart
                    continue
                if r.status_code >= 400:
                    raise WeightsError(f"cannot download {spec.name} from {url}: HTTP {r.status_code} {r.reason}")
                if r.status_code == 206:
                    got = r.headers.get("Content-Range", "")
                    if not got.startswith(f"bytes {start}-"):
                        raise WeightsError(f"cannot resume {spec.name} from {url}: unexpected Content-Range {got!r}")
                    total: int | None = int(got.rsplit("/", 1)[1]) if got.rsplit("/", 1)[1].isdigit() else None
                    mode = "ab"
                else:  # 200: the whole file (the server ignored or did not get a range)
                    start, mode = 0, "wb"
                    length = r.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                if total is not None and spec.size is not None and total != spec.size:
                    raise WeightsError(f"{url} serves {total} bytes for {spec.name}, the manifest expects {spec.size}",
                                       "the published file changed or the mirror is wrong")
                done = start
                if progress:
                    progress(done, total)
                with open(part, mode) as f:
                    # read1 hands back whatever arrived, so a dropped connection loses no received bytes
                    while block := r.raw.read1(_CHUNK):
                        f.write(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
                if total is not None and done < total:
                    raise _FinalError(f"download of {spec.name} stopped at {done} of {total} bytes",
                                       f"run the download again to resume from {part}")
            break
        _accept(spec, part, dest, f"source {url}")
    except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError) as e:
        raise _FinalError(f"download of {spec.name} was cut off ({type(e).__name__})",
                           f"run it again to resume from {part}") from None
    finally:
        if session is None:
            sess.close()


def _accept(spec: WeightSpec, staged: Path, dest: Path, source: str) -> None:
    """Size/hash check of a finished download, then the atomic rename onto its final name (or delete it)."""
    problem = _check_file(spec, staged)
    if problem:
        staged.unlink()
        raise _FinalError(f"downloaded {spec.name} does not match the manifest: {problem}",
                          f"nothing was kept; {source}")
    os.replace(staged, dest)


# ---- Google Drive via gdown ----------------------------------------------------------------------------------------

def _gdrive_download(spec: WeightSpec, dest: Path, progress: Progress | None) -> None:
    try:
        import gdown
    except ImportError:
        raise WeightsError(f"{spec.name} is published on Google Drive and needs the gdown package",
                           "pip install gdown (or visearch[download])") from None
    file_id = spec.gdrive_file
    if file_id is None:
        # the authors publish a folder: list it (no download) and pick our file by name
        listing = gdown.download_folder(id=spec.gdrive_folder, skip_download=True, quiet=True)
        matches = [f.id for f in listing or [] if Path(f.path).name == spec.file]
        if not matches:
            raise WeightsError(f"{spec.file} is not in Google Drive folder {spec.gdrive_folder}",
                               "the authors may have moved it; download it by hand")
        file_id = matches[0]
    # gdown resumes its own `<name>XXXXXXXX.part` files; it writes `staged` only when complete, and we
    # rename onto `dest` only after the size/hash checks.
    staged = dest.with_name(dest.name + ".unverified")
    import inspect

    kwargs: dict[str, Any] = {"quiet": True, "resume": True}
    if progress is not None and "progress" in inspect.signature(gdown.download).parameters:
        kwargs["progress"] = progress  # gdown >= 6 only
    gdown.download(id=file_id, output=str(staged), **kwargs)
    _accept(spec, staged, dest, f"source Google Drive id {file_id}")


# ---- Hugging Face hub folder ---------------------------------------------------------------------------------------

def _hf_download(spec: WeightSpec, dest: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"{spec.name} comes from the Hugging Face hub and needs huggingface_hub",
                           "pip install huggingface_hub (or visearch[download])") from None
    # into a sibling staging folder (snapshot_download resumes there), renamed when complete
    staging = dest.with_name(dest.name + ".part")
    snapshot_download(spec.hf_repo, local_dir=staging, endpoint=os.environ.get(HF_ENDPOINT_ENV) or None)
    if not _hf_folder_complete(staging):
        raise WeightsError(f"download of {spec.hf_repo} has no config.json or weights file", f"look in {staging}")
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # hub bookkeeping, not needed to load
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)


def download(name: str, weights_dir: str | Path, progress: Progress | None = None, session: Any = None,
             *, force: bool = False) -> Path:
    """Fetch item `name` into `weights_dir` and return its path. Sources are tried in manifest order
    ($VISEARCH_WEIGHTS_MIRROR replaces them for file items). HTTP downloads resume from `<file>.part`; size and
    sha256 are checked when known; the final name appears only once complete and checked. An item already
    present (and matching its known size/hash) is not fetched again unless `force`.
    `progress(bytes_done, bytes_total_or_None)` is called as bytes arrive (not for hf-folder items).
    `session`: a requests.Session to use for HTTP (for proxies, retries or tests)."""
    spec = get_spec(name)
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = spec.path(weights_dir)

    if spec.kind == "hf-folder":
        if not force and dest.is_dir() and _hf_folder_complete(dest):
            return dest
        try:
            _hf_download(spec, dest)
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001 (the hub raises many types; classify, never swallow)
            if _is_offline(e):
                raise _offline_error(spec, weights_dir) from None
            raise WeightsError(f"cannot download {spec.hf_repo}: {_one_line(e)}") from None
        return dest

    if not force and dest.is_file() and _check_file(spec, dest) is None:
        return dest
    if force and dest.is_file():
        dest.unlink()

    mirror = os.environ.get(MIRROR_ENV)
    attempts: list[tuple[str, Callable[[], None]]] = []
    if mirror:
        url = _mirror_url(mirror, spec.file)
        attempts.append((url, lambda u=url: _http_download(u, spec, dest, progress, session)))
    else:
        for url in spec.urls:
            attempts.append((url, lambda u=url: _http_download(u, spec, dest, progress, session)))
        if spec.gdrive_file or spec.gdrive_folder:
            attempts.append(("Google Drive", lambda: _gdrive_download(spec, dest, progress)))
    if not attempts:
        raise WeightsError(f"{spec.name} has no download source in the manifest",
                           f"put the file at {dest} by hand")

    failures: list[str] = []
    offline = 0
    for where, attempt in attempts:
        try:
            attempt()
            log.info("downloaded %s from %s to %s", spec.name, where, dest)
            return dest
        except _FinalError:
            raise  # a mismatch or a cut-off transfer: trying another source would hide it
        except WeightsError as e:
            failures.append(f"{where}: {e.message}")
        except Exception as e:  # noqa: BLE001 (requests/gdown errors: classify, try the next source)
            if _is_offline(e):
                offline += 1
                failures.append(f"{where}: unreachable")
            else:
                failures.append(f"{where}: {_one_line(e)}")
        log.info("could not download %s from %s", spec.name, failures[-1])
    if offline == len(attempts):
        raise _offline_error(spec, weights_dir)
    raise WeightsError(f"cannot download {spec.name}: " + "; ".join(failures)[:400],
                       f"put the file at {dest} by hand ({spec.sources()[0]})")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# ---- verification --------------------------------------------------------------------------------------------------

def _verify_hf_folder(path: Path) -> str | None:
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json unreadable ({_one_line(e)})"
    for st in path.glob("*.safetensors"):
        # safetensors: 8-byte little-endian header length, then a JSON header; a truncated file fails here
        with open(st, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                if n <= 0 or n + 8 > st.stat().st_size:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
                end = 0
                for k, v in header.items():
                    if k == "__metadata__":
                        continue
                    a, b = v["data_offsets"]
                    if not (type(a) is int and type(b) is int and 0 <= a <= b):
                        raise ValueError(f"tensor {k[:60]!r} has bad data_offsets {v['data_offsets']!r:.60}")
                    end = max(end, b)
            except (ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
                return f"{st.name}: not a safetensors file ({_one_line(e)})"
            if 8 + n + end > st.stat().st_size:
                return f"{st.name}: truncated ({st.stat().st_size} bytes, header needs {8 + n + end})"
    return None


def _verify_one(spec: WeightSpec, path: Path) -> VerifyResult:
    if spec.kind == "hf-folder":
        problem = _verify_hf_folder(path)
        return VerifyResult(spec, problem is None, problem or f"ok ({_folder_size(path)} bytes)")
    problem = _check_file(spec, path)
    if problem:
        return VerifyResult(spec, False, problem)
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth", ".pyth"):
            obj = safe_torch_load(path)
            if not isinstance(obj, dict):
                return VerifyResult(spec, False, f"loads, but holds a {type(obj).__name__}, not a checkpoint dict")
        elif suffix == ".npz":
            import zipfile

            import numpy as np

            try:
                with np.load(path, allow_pickle=False) as z:
                    for key in z.files:
                        z[key]  # reading each array finds truncation
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                return VerifyResult(spec, False, f"not a readable .npz ({_one_line(e)})")
    except WeightsError as e:
        return VerifyResult(spec, False, e.message)
    known = "size and sha256 checked" if spec.sha256 and spec.size else (
        "sha256 checked" if spec.sha256 else "size checked, sha256 unknown" if spec.size else "size/sha256 unknown")
    return VerifyResult(spec, True, f"ok, loads ({path.stat().st_size} bytes, {known})")


def verify(weights_dir: str | Path, names: list[str] | None = None, *,
           include_missing: bool = False) -> list[VerifyResult]:
    """Check the items present in `weights_dir` (or only `names`): size and sha256 when known, and that
    .pt/.pth/.pyth files load with safe_torch_load (tensors only), .npz files read without pickle, hub folders
    have a config and untruncated safetensors. Missing items are skipped, or reported not ok with
    `include_missing`."""
    out = []
    for st in status(weights_dir):
        if names is not None and st.spec.name not in names:
            continue
        if not st.present:
            if include_missing:
                out.append(VerifyResult(st.spec, False, f"not downloaded (expected at {st.path})"))
            continue
        try:
            out.append(_verify_one(st.spec, st.path))
        except Exception as e:  # noqa: BLE001 - one garbage file must not hide the report on the others
            out.append(VerifyResult(st.spec, False, f"unreadable ({_one_line(e)})"))
    return out


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file (hex), e.g. to fill in the manifest after checking a download by hand."""
    return sha256_file(Path(path))
