"""The reranker protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Shortlist:
    """Global-search candidates for `nq` queries: store row indices and cosine similarities `[nq, M]`, best first."""

    rows: np.ndarray
    sims: np.ndarray


class Reranker:
    """Subclasses set `name` and `shortlist_size` (how many global candidates they need, e.g. 400 or 100)."""

    name: str = "none"
    shortlist_size: int = 100
    # revisitop evaluation: move each protocol's ignored images behind the shortlist before reranking (AMES does)
    junk_behind_shortlist: bool = False
    # arithmetic the reranker runs in ("fp32", "bf16", "fp16"; AMES chooses it per machine), reported by bench
    precision: str = "fp32"

    def rerank(self, query_global: np.ndarray, query_local: dict[str, np.ndarray] | None,
               shortlist: Shortlist, store: Any) -> Shortlist:
        """Return the shortlist reordered (rows best first) with the scores that ordered it.

        query_global `[nq, D]` float32; query_local: the model's local fields for the queries (`[nq, ...]`) or None;
        store: an open visearch.store.Store (read_global(rows), read_local(rows))."""
        raise NotImplementedError
