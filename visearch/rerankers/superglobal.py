"""SuperGlobal reranking: top-M descriptor augmentation (MDescAug) and reranking with maximum descriptor
aggregation (RerankwMDA), Shao et al., ICCV 2023 (arXiv 2308.06954), section 3.3.

For a query q and its cosine shortlist S (top M, best first):
  1. for every x_i in S, its K+1 nearest items in S by x_i.x_j (normally itself first); weights 1 for the first and
     beta * x_i.x_j for the others; refined d_i = sum_j w_j x_j / sum_j w_j (not re-normalised);
  2. s1_i = q.d_i; order S by s1;
  3. q' = element-wise max of d over the K+1 best by s1; final score (s1_i + q'.d_i) / 2; order by it.
Items past M keep their cosine order. Same arithmetic as the reference; where it sorts ties arbitrarily (unstable
argsort on CUDA) we sort stably, so ties keep the earlier item first. The reference builds an nq x M x (K+1) x D
tensor for all queries at once; here memory is O(batch x M x M + batch x M x D) (about 7 MB per query at M = 400).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .base import Reranker, Shortlist

log = logging.getLogger(__name__)


def _refine(q, xs, K: int, beta: float):
    """Core of SuperGlobal's refinement for a batch of queries.

    q `[b, D]`, xs `[b, m, D]` (shortlist descriptors, best cosine first). Returns (order `[b, m]` int64 positions
    into the shortlist, best first; scores `[b, m]` float32 final scores in that order)."""
    import torch

    b, m, _ = xs.shape
    k1 = min(K + 1, m)  # K neighbours plus the item itself, fewer when the shortlist is shorter
    gram = torch.bmm(xs, xs.transpose(1, 2))  # [b, m, m]
    vals, nn = torch.sort(gram, dim=-1, descending=True, stable=True)
    vals, nn = vals[..., :k1], nn[..., :k1]  # [b, m, k1]
    w = vals * beta
    w[..., 0] = 1.0  # the first neighbour (normally the item itself) weighs 1
    # Refined descriptors as a sparse-weight matrix product: W[i, nn[i, j]] = w[i, j]; d = W @ xs / sum(w).
    wmat = torch.zeros(b, m, m, dtype=xs.dtype, device=xs.device).scatter_add_(2, nn, w)
    d = torch.bmm(wmat, xs) / w.sum(-1, keepdim=True)  # [b, m, D]
    s1 = torch.bmm(d, q.unsqueeze(-1)).squeeze(-1)  # [b, m]
    s1_sorted, order1 = torch.sort(s1, dim=-1, descending=True, stable=True)
    d_sorted = torch.gather(d, 1, order1.unsqueeze(-1).expand(-1, -1, d.shape[-1]))  # [b, m, D] by s1
    q_ext = d_sorted[:, :k1].amax(dim=1)  # [b, D]: max over the K+1 best refined items (query not included)
    s2 = torch.bmm(d_sorted, q_ext.unsqueeze(-1)).squeeze(-1)
    final = (s1_sorted + s2) / 2.0  # [b, m] in s1 order, so ties resolve by s1 rank as in the reference
    scores, order2 = torch.sort(final, dim=-1, descending=True, stable=True)
    return torch.gather(order1, 1, order2), scores


def rerank(query: np.ndarray, database: np.ndarray, M: int = 400, K: int = 9, beta: float = 0.15,
           device: Any = "cpu", batch_size: int = 8) -> np.ndarray:
    """Rank the whole database for each query: SuperGlobal refinement of the cosine top-M, then the rest in cosine
    order. query `[nq, D]`, database `[N, D]` (L2-normalised float). Returns database indices `[nq, N]` int64, best
    first. Works for N < M (refines all N). `batch_size` queries are processed together."""
    import torch

    q_all = np.asarray(query, dtype=np.float32)
    x_np = np.asarray(database, dtype=np.float32)
    if q_all.ndim != 2 or x_np.ndim != 2 or q_all.shape[1] != x_np.shape[1]:
        raise UsageError(f"rerank needs query [nq, D] and database [N, D], got {q_all.shape} and {x_np.shape}")
    if M < 1 or K < 0:
        raise UsageError(f"rerank needs M >= 1 and K >= 0, got M={M}, K={K}")
    device = torch.device(device)
    n = x_np.shape[0]
    out = np.empty((q_all.shape[0], n), np.int64)
    if n == 0:
        return out
    x = torch.from_numpy(x_np).to(device)
    m = min(M, n)
    with torch.inference_mode():
        for start in range(0, q_all.shape[0], batch_size):
            q = torch.from_numpy(q_all[start:start + batch_size]).to(device)
            sims = q @ x.T  # [b, N]
            ranks = torch.sort(sims, dim=-1, descending=True, stable=True)[1]  # [b, N]
            short = ranks[:, :m]
            order, _ = _refine(q, x[short], K, beta)  # x[short]: [b, m, D]
            ranks[:, :m] = torch.gather(short, 1, order)
            out[start:start + q.shape[0]] = ranks.cpu().numpy()
    return out


class SuperGlobalReranker(Reranker):
    """Reorders a cosine shortlist with SuperGlobal's refinement; scores are the final combined scores."""

    name = "superglobal"

    def __init__(self, M: int = 400, K: int = 9, beta: float = 0.15, device: Any = "cpu", batch_size: int = 8):
        if M < 1 or K < 0:
            raise UsageError(f"superglobal rerank needs M >= 1 and K >= 0, got M={M}, K={K}",
                             "fix [rerank] in the model config")
        self.M, self.K, self.beta = int(M), int(K), float(beta)
        self.shortlist_size = self.M
        self.device = device
        self.batch_size = batch_size

    def rerank(self, query_global: np.ndarray, query_local: dict[str, np.ndarray] | None,
               shortlist: Shortlist, store: Any) -> Shortlist:
        """query_global `[nq, D]`; shortlist rows/sims `[nq, m]` best first (rows < 0 are padding and are dropped).
        Returns the first min(m, M) rows of each query reordered, with their final scores."""
        import torch

        rows_all = np.asarray(shortlist.rows)
        nq = rows_all.shape[0]
        valid = rows_all >= 0
        counts = np.minimum(valid.sum(1), self.M)
        width = int(counts.max()) if nq else 0
        out_rows = np.full((nq, width), -1, np.int64)
        out_scores = np.full((nq, width), -np.inf, np.float32)
        device = torch.device(self.device)
        qg = np.asarray(query_global, np.float32)
        with torch.inference_mode():
            for start in range(0, nq, self.batch_size):
                idx = range(start, min(nq, start + self.batch_size))
                # one sorted, de-duplicated read from the store for the whole batch of queries
                lists = [rows_all[i][valid[i]][:counts[i]] for i in idx]
                uniq = np.unique(np.concatenate(lists)) if lists else np.zeros(0, np.int64)
                if uniq.size == 0:
                    continue
                feats = torch.from_numpy(np.asarray(store.read_global(uniq), np.float32)).to(device)
                for m in sorted({len(r) for r in lists if len(r)}):  # equal-length shortlists run together
                    group = [j for j, r in enumerate(lists) if len(r) == m]
                    pos = torch.from_numpy(np.stack([np.searchsorted(uniq, lists[j]) for j in group])).to(device)
                    q = torch.from_numpy(qg[[start + j for j in group]]).to(device)
                    order, scores = _refine(q, feats[pos], self.K, self.beta)
                    order_np = order.cpu().numpy()
                    for g, j in enumerate(group):
                        out_rows[start + j, :m] = lists[j][order_np[g]]
                        out_scores[start + j, :m] = scores[g].float().cpu().numpy()
        return Shortlist(rows=out_rows, sims=out_scores)


def build(config: dict[str, Any], weights_dir: Path, device: Any) -> SuperGlobalReranker:
    """Factory (see registry.RERANKERS): M, K, beta from the config's [rerank] table."""
    r = config.get("rerank", {})
    return SuperGlobalReranker(M=int(r.get("M", 400)), K=int(r.get("K", 9)), beta=float(r.get("beta", 0.15)),
                               device=device, batch_size=int(r.get("batch_size", 8)))
