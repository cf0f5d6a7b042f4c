"""The exact index: the store itself, scanned by visearch.search (no file of its own, always current)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class ExactIndex:
    """Brute-force cosine top-k over an open Store's live rows; add/remove follow the store (nothing to do here)."""

    name = "exact"
    exact = True

    def __init__(self, store: Any, device: Any = None, chunk_rows: int = 16384, live: np.ndarray | None = None):
        self.store = store
        self.device = device
        self.chunk_rows = int(chunk_rows)
        self.live = live  # `[N]` bool: rows that may be returned (default: the store's live rows)

    @classmethod
    def build(cls, store, **_: object) -> "ExactIndex":
        return cls(store)

    def add(self, keys: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> None:
        """The store already holds the rows."""

    def remove(self, keys: np.ndarray) -> None:
        """The store's tombstones already hide them."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from ..search import search_store

        rows, sims = search_store(queries, self.store, k, device=self.device, chunk_rows=self.chunk_rows, live=self.live)
        return rows.astype(np.int64), sims.astype(np.float32)

    def save(self, folder: Path) -> None:
        """Nothing to save."""

    def __len__(self) -> int:
        return self.store.num_live()
