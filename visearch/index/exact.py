"""The exact index: cosine top-k streamed over the store chunk by chunk (visearch/search.py), no state of its own,
so it is always current with the store it was given."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Index


class ExactIndex(Index):
    name = "exact"
    exact = True

    def __init__(self, store: Any, device: Any = None, chunk_rows: int = 16384):
        self.store = store
        self.device = device
        self.chunk_rows = int(chunk_rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from ..search import search_store

        return search_store(queries, self.store, k, device=self.device, chunk_rows=self.chunk_rows)
