"""The Index protocol: the first stage of a query, global descriptors -> a shortlist of store rows."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Index(Protocol):
    """Top-k search over the live rows of one store.

    `search(queries, k)`: queries `[nq, D]` float32 (L2-normalised) -> (rows `[nq, k']` int64 store rows, sims
    `[nq, k']` float32 cosines), best first, k' = min(k, live rows); dead (tombstoned) rows are never returned.
    `exact` says whether the scores are the exact cosines of the stored descriptors (an approximate index's callers
    may rescore its shortlist exactly)."""

    name: str
    exact: bool

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ...
