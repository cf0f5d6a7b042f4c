"""Exact cosine top-k, streamed over the store chunk by chunk on any device.

All queries of a call go through one matrix product per chunk; a running top-k is merged across chunks, so memory is
O(nq * (k + chunk)) whatever the database size. Descriptors are L2-normalised, so the dot product is the cosine.

float16 rows on the CPU (the store's dtype) take a two-step path that reads each row once, in float16, and never
converts the chunk to float32 (that conversion cost 5x the arithmetic):
1. candidates: a float16 matrix product (float32 accumulation, float16 result) scores the chunk approximately and
   keeps each query's top `k + margin`;
2. exact rescoring: those candidates' rows are converted to float32 and scored exactly, and only these exact scores
   enter the running top-k.
The result is the same as converting everything to float32, which is checked, not hoped for: the float16 score of a
unit row differs from the exact one by at most `_fp16_error_bound` (query rounding, float32 accumulation, result
rounding), so a row left out of a chunk's candidates scores at most `last candidate's approximate score + bound`.
When that is not below the running k-th exact score (many near-ties), the chunk is scored exactly in float32.
"""
from __future__ import annotations

import functools
from typing import Iterable

import numpy as np

_U16 = 2.0 ** -11  # float16 unit roundoff
_U32 = 2.0 ** -24


def _fp16_error_bound(dim: int, qnorm: np.ndarray) -> np.ndarray:
    """Per query, max |float16 score - exact score| for rows of norm <= 1 + 2^-10 (L2-normalised, stored float16).

    query rounding (u |x||q|) + float32 accumulation of exact float16 products ((D - 1) 2^-24 |x||q|) + result
    rounding (u |s|), plus float16 subnormal floors (2^-25 per query component and for the result)."""
    xn = 1.0 + 2 * _U16
    rel = (2 * _U16 + (dim - 1) * _U32) * 1.01
    return rel * qnorm * xn + np.sqrt(dim) * 2.0 ** -25 + 2.0 ** -24


@functools.lru_cache(maxsize=None)
def _fp16_matmul_accumulates_in_fp32(nq: int, dim: int) -> bool:
    """The fast path's error bound assumes float32 accumulation; a float16-accumulating kernel drifts visibly here."""
    import torch

    x = torch.full((256, dim), 0.01, dtype=torch.float16)
    q = torch.ones((max(nq, 1), dim), dtype=torch.float16)
    got = torch.mm(q, x.T).float()
    want = float(np.float16(dim * float(np.float16(0.01))))
    return bool(torch.all(torch.abs(got - want) <= abs(want) * _U16 * 2))


def _merge(best_s, best_r, s, rows, k: int):
    """Running top-k: candidates (s, rows) merged into (best_s, best_r); equal scores keep the lower row first."""
    import torch

    cand_s = torch.cat([best_s, s], 1)
    cand_r = torch.cat([best_r, rows], 1)
    kk = min(k, cand_s.shape[1])
    by_row = torch.argsort(cand_r, dim=1)
    cand_s, cand_r = cand_s.gather(1, by_row), cand_r.gather(1, by_row)
    order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :kk]
    return cand_s.gather(1, order), cand_r.gather(1, order)


def topk_stream(queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int, device=None,
                live: np.ndarray | None = None, unit_rows: bool = True,
                stats: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by dot product for each query.

    queries `[nq, D]` float32; blocks yield (first row, `[n, D]`) in any float dtype; live `[N]` bool masks dead rows.
    unit_rows: the rows are L2-normalised (as every store's are), which lets float16 rows on the CPU take the
    fast candidate + exact rescoring path (same result); False always converts chunks to float32.
    stats: when given, counts chunks per path: "fast" (float16 candidates, rescored) and "float32".
    Returns (rows `[nq, k']`, sims `[nq, k']`) best first, k' = min(k, number of live rows). Equal scores keep the
    lower row first, except for exact ties straddling the k-th place inside one chunk, which torch.topk breaks its way.
    """
    import torch

    device = device or torch.device("cpu")
    q_np = np.ascontiguousarray(queries, dtype=np.float32)
    q = torch.as_tensor(q_np, device=device)
    nq, dim = q.shape
    qnorm = np.linalg.norm(q_np.astype(np.float64), axis=1)
    fast = (device.type == "cpu" and unit_rows and nq > 0 and bool(np.all(np.isfinite(qnorm)))
            and float(qnorm.max(initial=0.0)) < 1e3 and _fp16_matmul_accumulates_in_fp32(nq, dim))
    if fast:
        q16 = q.to(torch.float16)
        bound = torch.as_tensor(_fp16_error_bound(dim, qnorm), dtype=torch.float32)
        # candidates per chunk: k plus a margin, so that the bound check almost always passes on real data
        n_cand = k + max(32, k)
    best_s = torch.full((nq, 0), -float("inf"), device=device)
    best_r = torch.zeros((nq, 0), dtype=torch.int64, device=device)
    buf = None
    with torch.inference_mode():
        for start, block in blocks:
            xb = torch.from_numpy(np.ascontiguousarray(block))
            n = xb.shape[0]
            mask = None if live is None else torch.as_tensor(live[start:start + n], device=device)
            if fast and xb.dtype == torch.float16 and n > n_cand:
                # [nq, n]: a float16 product (this operand order is the faster one on CPU), then float32 for topk
                # (8x faster on float32 than on float16 scores)
                s16 = torch.mm(q16, xb.T).to(torch.float32)
                if mask is not None:
                    s16.masked_fill_(~mask, -float("inf"))
                approx, idx = torch.topk(s16, n_cand, dim=1)
                uniq, pos = torch.unique(idx, return_inverse=True)
                exact = (xb[uniq].to(torch.float32) @ q.T).T.gather(1, pos)  # [nq, n_cand] exact scores
                if mask is not None:
                    exact = exact.masked_fill(~mask[idx], -float("inf"))
                new_s, new_r = _merge(best_s, best_r, exact, idx + start, k)
                last = approx[:, -1]
                safe = torch.isneginf(last) | (last + bound < new_s[:, k - 1])
                if bool(safe.all()):
                    best_s, best_r = new_s, new_r
                    if stats is not None:
                        stats["fast"] = stats.get("fast", 0) + 1
                    continue
                # near-ties beyond the candidates: this chunk is scored exactly below
            if device.type == "cpu" and xb.dtype != torch.float32:
                # convert float16 into one reused buffer: a fresh 512 MB allocation per chunk costs 5x the copy
                if buf is None or buf.shape[0] < n:
                    buf = torch.empty((n, xb.shape[1]), dtype=torch.float32)
                x = buf[:n]
                x.copy_(xb)
            else:
                x = xb.to(device).to(torch.float32)
            s = (x @ q.T).T  # [nq, n]; this operand order is 2x faster on CPU than q @ x.T
            rows = torch.arange(start, start + n, device=device)
            if mask is not None:
                s = s.masked_fill(~mask, -float("inf"))
            if s.shape[1] > k:  # cut the chunk to its own top-k first: a full sort of a 65k-wide chunk is 8x slower
                s, idx = torch.topk(s, k, dim=1)
                rows = rows[idx]
            else:
                rows = rows.expand(nq, -1)
            best_s, best_r = _merge(best_s, best_r, s, rows, k)
            if stats is not None:
                stats["float32"] = stats.get("float32", 0) + 1
    s_np, r_np = best_s.cpu().numpy(), best_r.cpu().numpy()
    n_live = int(live.sum()) if live is not None else s_np.shape[1]
    keep = min(s_np.shape[1], n_live)
    return r_np[:, :keep], s_np[:, :keep]


def search_store(queries: np.ndarray, store, k: int, device=None, chunk_rows: int = 16384,
                 live: np.ndarray | None = None):
    """Exact top-k over an open visearch.store.Store (dead rows excluded; `live` `[N]` bool narrows further, e.g. to
    the rows whose image is still in the dataset)."""
    return topk_stream(queries, store.iter_global(chunk_rows), k, device=device,
                       live=store.live if live is None else live)
