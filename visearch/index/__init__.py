"""First-stage indexes over a store: the exact scan (always available) and FAISS (built by `visearch index build`).

A FAISS index lives in the store folder (`<store>/index/`), records the store state it covers (`store_state`) and is
refused when the store changed without it; `extract` keeps it current (`update_index`: adds new rows, removes deleted
and changed ones). Searching through it returns a shortlist that `rescore` scores exactly from the stored
descriptors, so the approximate first stage only costs recall.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SearchIndexError
from .base import Index, choose_factory, parse_bytes, store_state
from .exact import ExactIndex

__all__ = ["Index", "ExactIndex", "IndexReport", "build_index", "open_index", "update_index", "rescore",
           "index_folder", "choose_factory", "parse_bytes", "store_state"]


def index_folder(store) -> Path:
    return Path(store.path) / "index"


@dataclass
class IndexReport:
    factory: str
    vectors: int
    train_size: int
    seconds: float
    code_bytes: float
    file_bytes: int
    added: int = 0
    removed: int = 0


def _live_table(store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, rows, fingerprint keys) of the store's live rows; two ids with one key are refused."""
    rows = np.nonzero(np.asarray(store.live))[0].astype(np.int64)
    keys = store.id_keys()[rows]  # stored with the shards: no hashing of N ids here
    fkeys = store.fingerprint_keys()[rows]
    if len(np.unique(keys)) != len(keys):
        raise SearchIndexError(f"two image ids of {store.path} share an index key", "report this as a bug")
    return keys, rows, fkeys


def _add_rows(index, store, keys: np.ndarray, rows: np.ndarray, fkeys: np.ndarray, chunk: int = 65536) -> None:
    for a in range(0, len(rows), chunk):
        r = rows[a:a + chunk]
        index.add(keys[a:a + chunk], store.read_global(r), r, fkeys[a:a + chunk])


def build_index(store, factory: str | None = None, memory_budget: int | None = None, train_size: int | None = None,
                nprobe: int | None = None, seed: int = 0):
    """Build a FAISS index over the store's live rows and save it in the store folder. Returns (index, report)."""
    import time

    from .faiss import FaissIndex

    t0 = time.perf_counter()
    keys, rows, fkeys = _live_table(store)
    if not len(rows):
        raise SearchIndexError(f"store {store.path} has no descriptors to index", "run `visearch extract` first")
    factory = factory or choose_factory(len(rows), store.dim, memory_budget)
    idx = FaissIndex.create(factory, store.dim)
    if nprobe:
        idx.nprobe = nprobe
    if not idx.is_trained():
        ivf = idx.ivf()
        need = 39 * ivf.nlist if ivf is not None else 1
        n_train = min(len(rows), train_size or max(need, 50_000))
        if ivf is not None and len(rows) < ivf.nlist:
            raise SearchIndexError(f"{factory} has {ivf.nlist} lists but the store holds only {len(rows)} vectors",
                                   "use a smaller IVF, or let --memory-budget pick the index")
        sample = np.sort(np.random.default_rng(seed).choice(rows, n_train, replace=False))
        idx.train(store.read_global(sample))
    if nprobe:
        idx.set_nprobe(nprobe)
    _add_rows(idx, store, keys, rows, fkeys)
    idx.state = store_state(store)
    folder = index_folder(store)
    idx.save(folder)
    return idx, IndexReport(factory, len(idx), idx.train_size, time.perf_counter() - t0, idx.code_bytes(),
                            sum(p.stat().st_size for p in folder.iterdir() if p.is_file()))


def open_index(store, required: bool = False):
    """The store's FAISS index, or None when it has none (required: raise instead). A stale index is refused."""
    folder = index_folder(store)
    if not (folder / "index.json").exists():
        if required:
            raise SearchIndexError(f"store {store.path} has no index", "run `visearch index build DATASET` first")
        return None
    from .faiss import FaissIndex

    idx = FaissIndex.load(folder)
    if idx.state != store_state(store):
        raise SearchIndexError(f"the index at {folder} covers an older state of the store (it changed since)",
                               "run `visearch index build DATASET --model M` again, or search with --exact")
    if idx.dim != store.dim:
        raise SearchIndexError(f"the index at {folder} holds {idx.dim}-D vectors, the store {store.dim}-D",
                               "run `visearch index build` again")
    return idx


def update_index(store) -> IndexReport | None:
    """Bring an existing index up to the store's state: add new or changed images, remove deleted or changed ones.
    None when the store has no index. Row numbers are refreshed (compaction renumbers rows)."""
    import time

    folder = index_folder(store)
    if not (folder / "index.json").exists():
        return None
    from .faiss import FaissIndex

    t0 = time.perf_counter()
    idx = FaissIndex.load(folder)
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if idx.state == store_state(store):  # nothing changed: no rewrite of a possibly large file
        return IndexReport(idx.factory, len(idx), idx.train_size, time.perf_counter() - t0, idx.code_bytes(),
                           folder_bytes)
    keys, rows, fkeys = _live_table(store)
    order = np.argsort(keys, kind="stable")
    keys, rows, fkeys = keys[order], rows[order], fkeys[order]
    pos = np.clip(np.searchsorted(idx.keys, keys), 0, max(0, len(idx.keys) - 1))
    known = (idx.keys[pos] == keys) & (idx.fps[pos] == fkeys) if len(idx.keys) else np.zeros(len(keys), bool)
    stale = ~np.isin(idx.keys, keys[known])  # deleted, or changed (new fingerprint)
    removed = idx.keys[stale]
    idx.remove(removed)
    idx.rows = rows[known][np.searchsorted(keys[known], idx.keys)] if len(idx.keys) else idx.rows
    add = ~known
    _add_rows(idx, store, keys[add], rows[add], fkeys[add])
    idx.state = store_state(store)
    idx.save(folder)
    return IndexReport(idx.factory, len(idx), idx.train_size, time.perf_counter() - t0, idx.code_bytes(),
                       sum(p.stat().st_size for p in folder.iterdir() if p.is_file()), int(add.sum()), len(removed))


def rescore(queries: np.ndarray, store, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of a shortlist: rows `[nq, m]` (-1 = none) -> the best k by exact cosine from the stored
    descriptors (rows `[nq, k']`, scores float32), ties keeping the lower row first."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out_r, out_s = [], []
    for qi in range(len(q)):
        r = np.unique(rows[qi][rows[qi] >= 0])  # sorted: equal scores keep the lower row
        s = store.read_global(r) @ q[qi] if len(r) else np.empty(0, np.float32)
        order = np.argsort(-s, kind="stable")[:k]
        out_r.append(r[order])
        out_s.append(s[order].astype(np.float32))
    width = min(len(x) for x in out_r) if out_r else 0
    return np.stack([x[:width] for x in out_r]), np.stack([x[:width] for x in out_s])
