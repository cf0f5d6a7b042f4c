"""The first-stage index protocol, and what every index shares: stable keys, the store state it covers, the factory
rule.

An index answers `search(queries, k) -> (rows, scores)` over a store's live rows; `rows` are store rows (-1 pads a
query with fewer than k results) and `scores` its own (possibly approximate) similarities: callers rescore the
shortlist exactly from the stored descriptors (visearch.index.rescore), so an approximate index only costs recall.
Vectors are added and removed by *key*, a stable int64 per image id (`visearch.idkeys.keys_for`), because store
rows are renumbered by compaction while ids are not.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Index(Protocol):
    """Top-k search over the live rows of one store; build (classmethod of each implementation), add, remove,
    search, save / load.

    `search(queries, k)`: queries `[nq, D]` float32 (L2-normalised) -> (rows `[nq, k']` int64 store rows, sims
    `[nq, k']` float32), best first; dead (tombstoned) rows are never returned. `exact` says whether the scores are
    the exact cosines of the stored descriptors (an approximate index's shortlist is rescored exactly by callers)."""

    name: str
    exact: bool

    def add(self, keys: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> None:
        """Add vectors `[n, D]` under `keys` `[n]` (int64), located at store `rows` `[n]`."""
        ...

    def remove(self, keys: np.ndarray) -> None:
        """Tombstone these keys: never returned again."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries `[nq, D]` float32 -> (store rows `[nq, k]` int64, -1 padded; scores `[nq, k]` float32)."""
        ...

    def save(self, folder: Path) -> None:
        ...

    def __len__(self) -> int:
        ...


def store_state(store) -> str:
    """A digest of the store's committed state (its shards, their uids, rows and tombstones): an index records the
    state it covers, and a store that changed since is detected whatever changed."""
    shards = [[s.file, s.uid, s.rows, s.dead.tolist()] for s in store.shards]  # dead: sorted already
    return hashlib.sha256(json.dumps(shards, separators=(",", ":")).encode()).hexdigest()


def parse_bytes(text: str) -> int:
    """'4GB', '512MB', '1.5G', '10000' (bytes) -> bytes (powers of 1024 for K/M/G/T)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        from ..errors import UsageError

        raise UsageError(f"cannot read {text!r} as a size", "write it like 4GB, 512MB or 1.5G") from None


def choose_factory(n: int, dim: int, memory_budget: int | None = None) -> str:
    """The index for `n` vectors of `dim` under `memory_budget` bytes (autofaiss's rule, simplified):

    - below 1 M vectors, when the float16 codes (2 * dim B/vector) fit the budget: `SQfp16` (a flat scan on float16
      codes, exact up to float16 rounding, no training);
    - otherwise IVF-PQ: `PCAR{4m},IVF{nlist}_HNSW32,PQ{m}` with nlist the power of two nearest 4 * sqrt(n)
      (at least 256, at most n / 39 so each list trains on >= 39 points), and m the largest of 64, 32, 16, 8 bytes
      per vector whose codes (m + 8 B for the id) fit the budget; without a budget m = 64.
    The PCA (with a random rotation, which balances the variance over the PQ sub-vectors as OPQ does, at a fraction
    of OPQ's training cost) reduces the dimension to 4m first, so that training stays affordable at 2048-D; the exact
    rescoring of the shortlist recovers what the reduction loses. `--factory "OPQ64_256,..."` trains OPQ instead.
    """
    budget = memory_budget if memory_budget is not None else math.inf
    if n < 1_000_000 and n * dim * 2 <= budget:
        return "SQfp16"
    m = next((m for m in (64, 32, 16, 8) if n * (m + 8) <= budget), None)
    if m is None:
        from ..errors import UsageError

        raise UsageError(f"{n:,} vectors do not fit in {budget:,.0f} bytes even at 8 bytes per vector",
                         "raise --memory-budget")
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = int(max(256, min(nlist, 2 ** int(math.log2(max(256, n // 39))))))
    return f"PCAR{4 * m},IVF{nlist}_HNSW32,PQ{m}"
