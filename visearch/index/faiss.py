"""A FAISS first-stage index (faiss-cpu; faiss-gpu is used the same way when installed), keyed by stable image keys.

Files, in the store's `index/` folder: `index.json` (replaced atomically: what the index is and which store state it
covers) naming `index-<uid>.faiss` (the FAISS index) and `index-<uid>.npz` (keys, store rows and fingerprint keys,
loaded with allow_pickle=False). A writer writes new files, then replaces index.json, then deletes the old files, so a
reader sees the old or the new index, never a torn one.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import numpy as np

from ..errors import SearchIndexError, UsageError

SCHEMA_VERSION = 1
META = "index.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("FAISS is not installed", "pip install visearch[faiss] (faiss-cpu)") from None
    return faiss


class FaissIndex:
    name = "faiss"
    exact = False
    kind = "faiss"

    def __init__(self, index, factory: str, dim: int, keys: np.ndarray | None = None, rows: np.ndarray | None = None,
                 fps: np.ndarray | None = None, nprobe: int | None = None, state: str | None = None,
                 train_size: int = 0):
        self.index, self.factory, self.dim = index, factory, dim
        self.keys = np.empty(0, np.int64) if keys is None else keys  # sorted
        self.rows = np.empty(0, np.int64) if rows is None else rows  # store row of each key
        self.fps = np.empty(0, np.int64) if fps is None else fps  # fingerprint key of each key's image version
        self.state, self.train_size = state, train_size
        self.nprobe = nprobe
        if nprobe:
            self.set_nprobe(nprobe)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, factory: str, dim: int) -> "FaissIndex":
        faiss = _faiss()
        spec = factory if "IVF" in factory or factory.startswith("IDMap") else f"IDMap2,{factory}"
        try:
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise UsageError(f"FAISS cannot build {factory!r}: {str(e).strip().splitlines()[-1][:160]}",
                             "see https://github.com/facebookresearch/faiss/wiki/The-index-factory") from None
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
            # polysemous training only serves Hamming-filtered search (not used here) and costs 30x the PQ training
            faiss.downcast_index(ivf).do_polysemous_training = False
        return cls(index, factory, dim)

    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self.train_size = len(vectors)
        if self.nprobe is None and self.ivf() is not None:
            self.set_nprobe(min(64, self.ivf().nlist))

    def ivf(self):
        return _faiss().try_extract_index_ivf(self.index)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists scanned per query (IVF only); the HNSW coarse quantizer searches at least twice as wide."""
        ivf = self.ivf()
        if ivf is None:
            return
        self.nprobe = int(nprobe)
        ivf.nprobe = self.nprobe
        q = _faiss().downcast_index(ivf.quantizer)
        if hasattr(q, "hnsw"):
            q.hnsw.efSearch = max(2 * self.nprobe, 64)

    # ---- the protocol ---------------------------------------------------------------------------------------------
    def add(self, keys: np.ndarray, vectors: np.ndarray, rows: np.ndarray, fps: np.ndarray | None = None) -> None:
        keys = np.asarray(keys, np.int64)
        if not len(keys):
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)
        fps = np.zeros(len(keys), np.int64) if fps is None else np.asarray(fps, np.int64)
        allk = np.concatenate([self.keys, keys])
        order = np.argsort(allk, kind="stable")
        self.keys = allk[order]
        self.rows = np.concatenate([self.rows, np.asarray(rows, np.int64)])[order]
        self.fps = np.concatenate([self.fps, fps])[order]

    def remove(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64)
        if not len(keys):
            return
        self.index.remove_ids(keys)
        keep = ~np.isin(self.keys, keys)
        self.keys, self.rows, self.fps = self.keys[keep], self.rows[keep], self.fps[keep]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(int(k), len(self))) if len(self) else 1
        scores, labels = self.index.search(q, k)
        return self.rows_of(labels), scores.astype(np.float32)

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """Store rows of FAISS labels (-1 stays -1)."""
        if not len(self.keys):
            return np.full(labels.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.keys, labels), 0, len(self.keys) - 1)
        return np.where((labels >= 0) & (self.keys[pos] == labels), self.rows[pos], -1)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def code_bytes(self) -> float:
        """Bytes per vector of the codes (ids and lists excluded)."""
        faiss = _faiss()
        ivf = self.ivf()
        if ivf is not None:
            return float(ivf.code_size)
        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else self.index
        return float(getattr(inner, "code_size", self.dim * 4))

    # ---- files ----------------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        old = _read_meta(folder) if (folder / META).exists() else None
        uid = secrets.token_hex(6)
        fx, arr = folder / f"index-{uid}.faiss", folder / f"index-{uid}.npz"
        try:
            faiss.write_index(self.index, str(fx) + ".tmp")
            os.replace(str(fx) + ".tmp", fx)
            with open(str(arr) + ".tmp", "wb") as f:
                np.savez(f, keys=self.keys, rows=self.rows, fps=self.fps)
                f.flush()
                os.fsync(f.fileno())
            os.replace(str(arr) + ".tmp", arr)
            meta = {"schema_version": SCHEMA_VERSION, "kind": self.kind, "factory": self.factory, "dim": self.dim,
                    "ntotal": len(self), "nprobe": self.nprobe, "store_state": self.state,
                    "train_size": self.train_size, "faiss_file": fx.name, "arrays_file": arr.name,
                    "faiss_version": getattr(faiss, "__version__", "?"),
                    "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            tmp = folder / f".{META}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
            os.replace(tmp, folder / META)
        except OSError as e:
            for p in (fx, arr, Path(str(fx) + ".tmp"), Path(str(arr) + ".tmp")):
                p.unlink(missing_ok=True)
            raise SearchIndexError(f"cannot write the index to {folder}: {e.strerror or e}",
                                   "free disk space and run `visearch index build` again") from None
        if old:
            for name in (old.get("faiss_file"), old.get("arrays_file")):
                if name and name not in (fx.name, arr.name):
                    (folder / name).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path) -> "FaissIndex":
        faiss = _faiss()
        folder = Path(folder)
        meta = _read_meta(folder)
        try:
            index = faiss.read_index(str(folder / meta["faiss_file"]))
            with np.load(folder / meta["arrays_file"], allow_pickle=False) as z:
                keys, rows, fps = z["keys"].astype(np.int64), z["rows"].astype(np.int64), z["fps"].astype(np.int64)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise SearchIndexError(f"index at {folder} is damaged ({str(e).strip().splitlines()[0][:120]})",
                                   "run `visearch index build` again") from None
        if not (len(keys) == len(rows) == len(fps) == index.ntotal):
            raise SearchIndexError(f"index at {folder} is damaged (its arrays disagree with the FAISS file)",
                                   "run `visearch index build` again")
        return cls(index, meta["factory"], int(meta["dim"]), keys, rows, fps, meta.get("nprobe"),
                   meta.get("store_state"), int(meta.get("train_size") or 0))


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta["schema_version"] != SCHEMA_VERSION or meta["kind"] != "faiss":
            raise SearchIndexError(f"index at {folder} has schema {meta['schema_version']} / kind {meta['kind']!r}",
                                   "run `visearch index build` again")
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        raise SearchIndexError(f"index metadata {folder / META} is missing or corrupt",
                               "run `visearch index build` again") from None
