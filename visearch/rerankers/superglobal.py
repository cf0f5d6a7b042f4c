"""SuperGlobal reranking: top-M descriptor augmentation (MDescAug) and reranking with maximum descriptor
aggregation (RerankwMDA), Shao et al., ICCV 2023 (arXiv 2308.06954), section 3.3.

For a query q and its cosine shortlist S (top M, best first):
  1. for every x_i in S, its K+1 nearest items in S by x_i.x_j (normally itself first); weights 1 for the first and
     beta * x_i.x_j for the others; refined d_i = sum_j w_j x_j / sum_j w_j (not re-normalised);
  2. s1_i = q.d_i; order S by s1;
  3. q' = element-wise max of d over the K+1 best by s1; final score (s1_i + q'.d_i) / 2; order by it.
Items past M keep their cosine order. Same arithmetic as the reference; where it sorts ties arbitrarily (unstable
argsort on CUDA) we sort stably, so ties keep the earlier item first. The reference builds an nq x M x (K+1) x D
tensor for all queries at once; here memory is O(batch x M x (M + D)) (about 4 MB per query at M = 400).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .base import Reranker, Shortlist

log = logging.getLogger(__name__)


def _top_neighbours(gram, k1: int):
    """The k1 largest entries of each row of `gram` `[b, m, m]`, best first, exactly as a stable descending sort
    would give them (equal values keep the lower index first), at the cost of a top-k instead of a full sort."""
    import torch

    m = gram.shape[-1]
    vals, idx = torch.topk(gram, min(k1 + 1, m), dim=-1)
    if m > k1:
        tie = vals[..., k1 - 1] == vals[..., k1]  # which equal values make the cut is up to topk: sort those rows
        vals, idx = vals[..., :k1].contiguous(), idx[..., :k1].contiguous()
        if bool(tie.any()):
            v2, i2 = torch.sort(gram[tie], dim=-1, descending=True, stable=True)
            vals[tie], idx[tie] = v2[..., :k1], i2[..., :k1]
    idx, perm = torch.sort(idx, dim=-1)  # index order first, then a stable sort by value: ties by index
    vals = torch.gather(vals, -1, perm)
    vals, perm = torch.sort(vals, dim=-1, descending=True, stable=True)
    return vals, torch.gather(idx, -1, perm)


def _refine(q, xs, K: int, beta: float):
    """Core of SuperGlobal's refinement for a batch of queries.

    q `[b, D]`, xs `[b, m, D]` (shortlist descriptors, best cosine first). Returns (order `[b, m]` int64 positions
    into the shortlist, best first; scores `[b, m]` float32 final scores in that order).

    The refined descriptors d_i = sum_j w_ij x_j / sum_j w_ij enter the scores only through dot products, so by
    linearity q.d_i = sum_j w_ij (q.x_j) / sum_j w_ij: d is materialised only for the K+1 items that build q'. Same
    function as the reference (which forms all d_i), equal up to float32 rounding; the cost is the Gram matrix."""
    import torch

    b, m, _ = xs.shape
    k1 = min(K + 1, m)  # K neighbours plus the item itself, fewer when the shortlist is shorter
    gram = torch.bmm(xs, xs.transpose(1, 2))  # [b, m, m]
    vals, nn = _top_neighbours(gram, k1)  # [b, m, k1]
    w = vals * beta
    w[..., 0] = 1.0  # the first neighbour (normally the item itself) weighs 1
    wsum = w.sum(-1)  # [b, m]

    def refined_dot(v):
        """v `[b, m]` = y.x_j for a vector y -> y.d_i `[b, m]`."""
        return (torch.gather(v.unsqueeze(1).expand(b, m, m), 2, nn) * w).sum(-1) / wsum

    s1 = refined_dot(torch.bmm(xs, q.unsqueeze(-1)).squeeze(-1))  # q.d_i
    s1_sorted, order1 = torch.sort(s1, dim=-1, descending=True, stable=True)
    # d of the K+1 best items by s1: [b, k1, D]; q' is their element-wise max (the query itself is not included)
    top = order1[:, :k1]
    nn_top = torch.gather(nn, 1, top.unsqueeze(-1).expand(b, k1, k1))  # [b, k1, k1]
    w_top = torch.gather(w, 1, top.unsqueeze(-1).expand(b, k1, k1))
    x_nb = torch.gather(xs, 1, nn_top.reshape(b, k1 * k1, 1).expand(-1, -1, xs.shape[-1]))
    d_top = (x_nb.view(b, k1, k1, -1) * w_top.unsqueeze(-1)).sum(2) / torch.gather(wsum, 1, top).unsqueeze(-1)
    q_ext = d_top.amax(dim=1)  # [b, D]
    s2 = refined_dot(torch.bmm(xs, q_ext.unsqueeze(-1)).squeeze(-1))  # q'.d_i
    final = (s1_sorted + torch.gather(s2, 1, order1)) / 2.0  # in s1 order, so ties resolve by s1 rank as the ref
    scores, order2 = torch.sort(final, dim=-1, descending=True, stable=True)
    return torch.gather(order1, 1, order2), scores


def rerank(query: np.ndarray, database: np.ndarray, M: int = 400, K: int = 9, beta: float = 0.15,
           device: Any = "cpu", batch_size: int = 8, search_batch: int = 64) -> np.ndarray:
    """Rank the whole database for each query: SuperGlobal refinement of the cosine top-M, then the rest in cosine
    order. query `[nq, D]`, database `[N, D]` (L2-normalised float). Returns database indices `[nq, N]` int64, best
    first. Works for N < M (refines all N). Cosines are computed for `search_batch` queries at a time (one pass
    over the database each), the refinement for `batch_size` at a time."""
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
        for start in range(0, q_all.shape[0], search_batch):
            q = torch.from_numpy(q_all[start:start + search_batch]).to(device)
            ranks = torch.sort(q @ x.T, dim=-1, descending=True, stable=True)[1]  # [b, N] cosine order
            for s in range(0, q.shape[0], batch_size):  # refinement in smaller batches: [b', M, M + D] floats
                short = ranks[s:s + batch_size, :m]
                order, _ = _refine(q[s:s + batch_size], x[short], K, beta)  # x[short]: [b', m, D]
                ranks[s:s + batch_size, :m] = torch.gather(short, 1, order)
            out[start:start + q.shape[0]] = ranks.cpu().numpy()
    return out


class SuperGlobalReranker(Reranker):
    """Reorders a cosine shortlist with SuperGlobal's refinement; `scores` are the final combined scores."""

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
        Returns the first min(m, M) rows of each query reordered, with their final scores in `scores` (the global
        cosines of the same rows in `sims`)."""
        import torch

        rows_all = np.asarray(shortlist.rows)
        nq = rows_all.shape[0]
        valid = rows_all >= 0
        counts = np.minimum(valid.sum(1), self.M)
        width = int(counts.max()) if nq else 0
        out_rows = np.full((nq, width), -1, np.int64)
        out_scores = np.full((nq, width), -np.inf, np.float32)
        out_sims = np.full((nq, width), -np.inf, np.float32)
        sims_all = np.asarray(shortlist.sims, np.float32)
        device = torch.device(self.device)
        qg = np.asarray(query_global, np.float32)
        with torch.inference_mode():
            for start in range(0, nq, self.batch_size):
                idx = range(start, min(nq, start + self.batch_size))
                # one sorted, de-duplicated read from the store for the whole batch of queries
                lists = [rows_all[i][valid[i]][:counts[i]] for i in idx]
                sim_lists = [sims_all[i][valid[i]][:counts[i]] for i in idx]
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
                        out_sims[start + j, :m] = sim_lists[j][order_np[g]]
                        out_scores[start + j, :m] = scores[g].float().cpu().numpy()
        return Shortlist(rows=out_rows, sims=out_sims, scores=out_scores)


def build(config: dict[str, Any], weights_dir: Path, device: Any) -> SuperGlobalReranker:
    """Factory (see registry.RERANKERS): M, K, beta from the config's [rerank] table."""
    r = config["rerank"]  # a resolved model config: every key present (defaults: config/schema.py)
    return SuperGlobalReranker(M=int(r["M"]), K=int(r["K"]), beta=float(r["beta"]), device=device,
                               batch_size=int(r["batch_size"]))
