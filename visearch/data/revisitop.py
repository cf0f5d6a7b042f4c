"""The revisitop ground-truth file gnd_<name>.pkl: reading it without running code (a restricted unpickler),
validating it, and writing it exactly as filipradenovic/revisitop reads it.

    {"imlist": [ids], "qimlist": [query ids], "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [..], "hard": [..],
     "junk": [..]}]}   (indices 0-based into imlist)
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, first_line
from ..fsutil import atomic_write
from ..paths import check_id


def is_revisitop_folder(folder: str | Path) -> bool:
    """A folder with jpg/ and a gnd_*.pkl (e.g. roxford5k, rparis6k as distributed)."""
    f = Path(folder)
    return (f / "jpg").is_dir() and any(f.glob("gnd_*.pkl"))


# ---- restricted unpickler -----------------------------------------------------------------------------------------
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
    if len(data) > MAX_GND_BYTES:
        raise DatasetError(f"ground truth {path} is {len(data) / 2**20:.0f} MiB, more than a gnd pickle can need "
                           f"({MAX_GND_BYTES >> 20} MiB)", "use a revisitop gnd_<name>.pkl")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise DatasetError(f"refusing to load {path}: {e}",
                           "gnd pickles may hold only lists, dicts, numbers, strings and numpy arrays; "
                           "get the file from the official source") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage: EOFError, ValueError, ...
        raise DatasetError(f"cannot read ground truth {path}: truncated or not a pickle ({first_line(e)})",
                           "re-run convert or download it again") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"ground truth {path} holds a {type(obj).__name__}, expected a dict with imlist, "
                           "qimlist and gnd", "use a revisitop gnd_<name>.pkl")
    problem = _shape_problem(obj, max(MIN_NODE_BUDGET, 4 * len(data)))
    if problem:
        raise DatasetError(f"refusing ground truth {path}: {problem}",
                           "a gnd pickle holds plain lists, dicts, numbers and strings; use a revisitop gnd_<name>.pkl")
    return obj


MAX_GND_BYTES = 256 << 20  # the official roxford5k / rparis6k files are under 1 MiB
MIN_NODE_BUDGET = 1_000_000
MAX_DEPTH = 6  # dict -> gnd list -> entry dict -> list -> number is 4 deep


def _shape_problem(obj: Any, budget: int) -> str | None:
    """Walk the unpickled object once, counting every visit (shared references too, so a "billion laughs" pickle
    of 40 self-doubling lists is cut off after `budget` visits instead of expanding to 2**40 nodes) and refusing
    nesting deeper than MAX_DEPTH. Returns why the object cannot be a gnd dict, or None."""
    left = [budget]
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        left[0] -= 1
        if left[0] < 0:
            return f"it expands to more than {budget:,} objects (a pickle bomb?)"
        if depth > MAX_DEPTH:
            return f"it is nested more than {MAX_DEPTH} levels deep"
        if isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, (str, int)):
                    return f"a dict key is a {type(k).__name__}"
                stack.append((v, depth + 1))
        elif isinstance(x, (list, tuple, set, frozenset)):
            if len(x) > left[0]:
                return f"it expands to more than {budget:,} objects (a pickle bomb?)"
            stack.extend((v, depth + 1) for v in x)
        elif isinstance(x, np.ndarray):
            if x.dtype == object:
                if x.size > left[0]:
                    return f"it expands to more than {budget:,} objects (a pickle bomb?)"
                stack.extend((v, depth + 1) for v in x.reshape(-1))
            elif x.dtype.kind not in "biufUS":
                return f"it holds a numpy array of dtype {x.dtype}"
        elif not isinstance(x, (str, bytes, int, float, np.generic)) and x is not None:
            return f"it holds a {type(x).__name__}"
    return None


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
    lists = {}
    for key in ("imlist", "qimlist"):
        v = cfg[key]
        if isinstance(v, np.ndarray) and v.dtype.kind == "U":
            v = v.tolist()
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            raise DatasetError(f"{path}: {key} is not a list of image names (a {type(v).__name__})",
                               "fix the ground truth")
        lists[key] = [check_id(str(s), f"{path} {key}") for s in v]  # ids name files: no '/', '..', NUL
    imlist, qimlist = lists["imlist"], lists["qimlist"]
    raw = cfg.get("gnd", [])
    if raw is not None and not isinstance(raw, (list, tuple)):
        raise DatasetError(f"{path}: gnd is a {type(raw).__name__}, expected a list with one dict per query",
                           "fix the ground truth")
    raw = list(raw) if raw is not None else []
    if len(raw) != len(qimlist):
        raise DatasetError(f"{path}: {len(raw)} gnd entries for {len(qimlist)} queries",
                           "gnd must have one entry per query in qimlist")
    if len(set(imlist)) != len(imlist):
        seen: set[str] = set()
        dup = next(s for s in imlist if s in seen or seen.add(s))
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


def write_gnd(path: Path, imlist: list[str], qimlist: list[str], gnd: list[dict[str, Any]]) -> None:
    """Atomically write a revisitop gnd pickle (plain lists, ints and floats only)."""
    obj = {"imlist": list(imlist), "qimlist": list(qimlist),
           "gnd": [{k: ([float(v) for v in g[k]] if k == "bbx" else [int(v) for v in g[k]])
                    for k in ("bbx", "easy", "hard", "junk") if k in g} for g in gnd]}
    atomic_write(path, pickle.dumps(obj, protocol=2))
