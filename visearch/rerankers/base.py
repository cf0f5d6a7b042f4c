"""The reranker protocol, its shortlist type and its evaluation policy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Shortlist:
    """Candidates for `nq` queries, best first: store row indices `rows` and their global cosine similarities `sims`
    `[nq, M]`. After reranking, `scores` holds the scores that ordered the rows (e.g. AMES's combined score, or
    SuperGlobal's refined one), `sims` still the global cosines of the same rows; None before reranking."""

    rows: np.ndarray
    sims: np.ndarray
    scores: np.ndarray | None = None

    @property
    def ranking_scores(self) -> np.ndarray:
        """The scores the rows are ordered by: `scores` after reranking, else `sims`."""
        return self.sims if self.scores is None else self.scores


@runtime_checkable
class RerankerProtocol(Protocol):
    """What the pipeline needs from a reranker.

    `shortlist_size`: how many global candidates it reorders (e.g. 400 or 100); it returns at most that many rows.
    `junk_behind_shortlist`: its reference revisitop evaluation (the evaluation policy): True moves each protocol's
    ignored images behind the shortlist before reranking (AMES: Medium junk; Hard junk + easy); False reranks the
    global shortlist as is (SuperGlobal)."""

    name: str
    shortlist_size: int
    junk_behind_shortlist: bool

    def rerank(self, query_global: np.ndarray, query_local: dict[str, np.ndarray] | None,
               shortlist: Shortlist, store: Any) -> Shortlist:
        """Return the shortlist's head reordered (rows best first), with `scores` set to the scores that ordered it.

        query_global `[nq, D]` float32; query_local: the model's local fields for the queries (`[nq, ...]`) or None;
        store: an open visearch.store.Store (read_global(rows), read_local(rows))."""
        ...


class Reranker(RerankerProtocol):
    """Base class of the rerankers here: subclasses set `name`, `shortlist_size` and implement `rerank`."""

    name: str = "none"
    shortlist_size: int = 100
    junk_behind_shortlist: bool = False
    # arithmetic the reranker runs in ("fp32", "bf16", "fp16"; AMES chooses it per machine), reported by bench
    precision: str = "fp32"

    def rerank(self, query_global: np.ndarray, query_local: dict[str, np.ndarray] | None,
               shortlist: Shortlist, store: Any) -> Shortlist:
        raise NotImplementedError
