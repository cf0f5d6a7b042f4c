"""AMES reranking (Suma et al., ECCV 2024, arXiv 2408.03282): the global shortlist reordered by the AMES
transformer's pair scores (the network: visearch/models/nets/ames_transformer.py).

Reranking: `s = lam * global + (1 - lam) * sigmoid(gamma * logit)` over the first k of the global order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, UsageError
from ..models.nets.ames_transformer import AMES, load_ames
from .base import Reranker, Shortlist


def combined_scores(global_sims: np.ndarray, logits: np.ndarray, lam: float, gamma: float) -> np.ndarray:
    """`lam * g + (1 - lam) * sigmoid(gamma * logit)` in float64, same shape as the inputs."""
    g = np.asarray(global_sims, np.float64)
    z = np.asarray(logits, np.float64)
    return lam * g + (1.0 - lam) / (1.0 + np.exp(-gamma * z))


def rerank(global_sims: np.ndarray, global_ids: np.ndarray, logits: np.ndarray, lam: float, gamma: float,
           k: int) -> np.ndarray:
    """Reorder the first k of each global ranking by the combined score; the rest keeps the global order.

    global_sims, global_ids [nq, N] in global order; logits [nq, >= k] for the first k of that order.
    Returns ids [nq, N]. Ties (equal combined scores) keep their global order (stable sort); the reference uses an
    unstable torch.sort, so on ties it may differ from us, nowhere else."""
    sims = np.asarray(global_sims)
    ids = np.asarray(global_ids)
    if sims.shape != ids.shape or sims.ndim != 2:
        raise UsageError(f"global_sims {sims.shape} and global_ids {ids.shape} must both be [nq, N]")
    k = min(int(k), ids.shape[1])
    lg = np.asarray(logits)
    if lg.ndim != 2 or lg.shape[0] != ids.shape[0] or lg.shape[1] < k:
        raise UsageError(f"logits {lg.shape} must be [nq, >= {k}]")
    s = combined_scores(sims[:, :k], lg[:, :k], lam, gamma)
    order = np.argsort(-s, axis=1, kind="stable")
    out = ids.copy()
    out[:, :k] = np.take_along_axis(ids[:, :k], order, axis=1)
    return out


class AMESReranker(Reranker):
    """Reranks a global shortlist with AMES on the stored local tokens (`tokens`, `mask` fields of the store)."""

    name = "ames"
    junk_behind_shortlist = True  # the AMES reference evaluation does this; see pipeline/evaluate.py

    def __init__(self, model: AMES, shortlist_size: int = 100, query_len: int = 600, db_len: int = 50,
                 lam: float = 0.65, gamma: float = 0.20, batch_size: int = 50):
        self.model = model
        self.shortlist_size = int(shortlist_size)
        self.query_len = int(query_len)
        self.db_len = int(db_len)
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.batch_size = int(batch_size)

    @property
    def precision(self) -> str:  # type: ignore[override]
        return self.model.precision

    def logits(self, query_local: dict[str, np.ndarray], shortlist: Shortlist, store: Any) -> np.ndarray:
        """AMES logits [nq, k] for the first k = min(shortlist_size, M) candidates of each query."""
        for key in ("tokens", "mask"):
            if query_local is None or key not in query_local:
                raise ModelError("AMES reranking needs the query's local fields 'tokens' and 'mask'",
                                 "describe the query with an AMES model")
        rows = np.asarray(shortlist.rows)
        k = min(self.shortlist_size, rows.shape[1])
        out = np.zeros((rows.shape[0], k), np.float32)
        for i in range(rows.shape[0]):
            local = store.read_local(rows[i, :k])
            if "tokens" not in local or "mask" not in local:
                raise ModelError("the store has no AMES local tokens", "extract the collection with an AMES model")
            out[i] = self.model.score_tokens(query_local["tokens"][i][:self.query_len],
                                             query_local["mask"][i][:self.query_len],
                                             local["tokens"][:, :self.db_len], local["mask"][:, :self.db_len],
                                             self.batch_size)
        return out

    def rerank(self, query_global: np.ndarray, query_local: dict[str, np.ndarray] | None,
               shortlist: Shortlist, store: Any) -> Shortlist:
        """Shortlist reordered: the first k by the combined score (`scores`: that score there, the global cosine
        after), the rest as given; `sims` stay the global cosines of the reordered rows."""
        rows = np.asarray(shortlist.rows)
        sims = np.asarray(shortlist.sims, np.float32)
        k = min(self.shortlist_size, rows.shape[1])
        if k == 0:
            return Shortlist(rows=rows.copy(), sims=sims.copy(), scores=sims.copy())
        lg = self.logits(query_local, shortlist, store)
        s = combined_scores(sims[:, :k], lg, self.lam, self.gamma)
        order = np.argsort(-s, axis=1, kind="stable")
        new_rows, new_sims, new_scores = rows.copy(), sims.copy(), sims.copy()
        new_rows[:, :k] = np.take_along_axis(rows[:, :k], order, axis=1)
        new_sims[:, :k] = np.take_along_axis(sims[:, :k], order, axis=1)
        new_scores[:, :k] = np.take_along_axis(s, order, axis=1).astype(np.float32)
        return Shortlist(rows=new_rows, sims=new_sims, scores=new_scores)


def build(config: dict[str, Any], weights_dir: Path, device: Any) -> AMESReranker:
    """Registry factory: AMESReranker from config `[rerank]` (variant, checkpoint, shortlist, query_len, db_len,
    lam, gamma, batch_size)."""
    rr = config["rerank"]  # a resolved model config: every key present (defaults: config/schema.py)
    model = load_ames(config, weights_dir, device)
    return AMESReranker(model, shortlist_size=rr["shortlist"], query_len=rr["query_len"], db_len=rr["db_len"],
                        lam=rr["lam"], gamma=rr["gamma"], batch_size=rr["batch_size"])
