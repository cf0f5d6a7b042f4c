"""Exact cosine top-k, streamed over the store chunk by chunk on any device.

All queries of a call go through one matrix product per chunk; a running top-k is merged across chunks, so memory is
O(nq * (k + chunk)) whatever the database size. Descriptors are L2-normalised, so the dot product is the cosine.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def topk_stream(queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int, device=None,
                live: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by dot product for each query.

    queries `[nq, D]` float32; blocks yield (first row, `[n, D]`) in any float dtype; live `[N]` bool masks dead rows.
    Returns (rows `[nq, k']`, sims `[nq, k']`) best first, k' = min(k, number of live rows). Ties keep the lower row
    first (as a stable sort of the full score list would).
    """
    import torch

    device = device or torch.device("cpu")
    q = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=device)
    nq = q.shape[0]
    best_s = torch.full((nq, 0), -float("inf"), device=device)
    best_r = torch.zeros((nq, 0), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for start, block in blocks:
            x = torch.as_tensor(np.ascontiguousarray(block), device=device).to(torch.float32)
            s = q @ x.T
            rows = torch.arange(start, start + x.shape[0], device=device)
            if live is not None:
                mask = torch.as_tensor(live[start:start + x.shape[0]], device=device)
                s = s.masked_fill(~mask, -float("inf"))
            cand_s = torch.cat([best_s, s], 1)
            cand_r = torch.cat([best_r, rows.expand(nq, -1)], 1)
            kk = min(k, cand_s.shape[1])
            # stable descending sort on (score, row) keeps earlier rows first among equal scores
            order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :kk]
            best_s, best_r = cand_s.gather(1, order), cand_r.gather(1, order)
    s_np, r_np = best_s.cpu().numpy(), best_r.cpu().numpy()
    n_live = int(live.sum()) if live is not None else s_np.shape[1]
    keep = min(s_np.shape[1], n_live)
    return r_np[:, :keep], s_np[:, :keep]


def search_store(queries: np.ndarray, store, k: int, device=None, chunk_rows: int = 65536):
    """Exact top-k over an open visearch.store.Store (dead rows excluded)."""
    return topk_stream(queries, store.iter_global(chunk_rows), k, device=device, live=store.live)
