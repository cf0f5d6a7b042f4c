"""Revisited Oxford/Paris evaluation: mAP and mean precision at k (Radenovic et al., CVPR 2018).

Same signature, semantics and numbers as filipradenovic/revisitop `python/evaluate.py` (our own implementation):
    - ranks: `[N, nq]` database indices, best first, one column per query
    - each positive's position is reduced by the number of junk images ranked before it
    - AP: trapezoidal rule over the positives' (junk-corrected) positions, divided by the number of positives
    - queries without positives get NaN and are left out of the means
    - mP@k: kq = min(last positive position (1-based), k), precision = #(positions <= kq) / kq
One documented difference: when none of a query's positives appear in `ranks` (a truncated ranking), the reference
crashes (max of an empty array); here that query scores AP = 0 and P@k = 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import UsageError

PROTOCOLS = ("easy", "medium", "hard")


def _ap(pos: np.ndarray, nres: int) -> float:
    """Trapezoidal AP from sorted 0-based (junk-corrected) positions of the retrieved positives."""
    if pos.size == 0:
        return 0.0
    j = np.arange(pos.size, dtype=np.float64)
    r = pos.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r == 0, 1.0, j / np.where(r == 0, 1.0, r))
    p1 = (j + 1.0) / (r + 1.0)
    # accumulate in order, like the reference loop, so the float result matches bit for bit in practice
    ap = 0.0
    step = 1.0 / nres
    for a, b in zip(p0.tolist(), p1.tolist()):
        ap += (a + b) * step / 2.0
    return ap


def compute_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = (1, 5, 10)
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP, per-query AP `[nq]`, mean precision at kappas `[len(kappas)]`, per-query precision `[nq, len(kappas)]`.

    ranks: `[N, nq]` int array (database indices, best first). gnd: per query a dict with "ok" (positive indices)
    and optionally "junk". mAP is a fraction in [0, 1]; NaN when no query has positives."""
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2:
        raise UsageError(f"ranks must be a 2-D [N, nq] array, got shape {ranks.shape}", "one column per query")
    if ranks.shape[1] != nq:
        raise UsageError(f"ranks has {ranks.shape[1]} columns for {nq} queries", "ranks is [N, nq], one column "
                         "per query (transpose a [nq, N] array)")
    kappas = [int(k) for k in kappas]
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    pr = np.zeros(len(kappas))
    total, nempty = 0.0, 0
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"], dtype=np.int64).reshape(-1)
        if ok.size == 0:
            aps[i] = math.nan
            prs[i, :] = math.nan
            nempty += 1
            continue
        junk = np.asarray(gnd[i].get("junk", []), dtype=np.int64).reshape(-1)
        col = ranks[:, i]
        pos = np.flatnonzero(np.isin(col, ok))  # 0-based positions of positives, ascending
        if junk.size:
            jpos = np.flatnonzero(np.isin(col, junk))
            # junk ranked strictly before each positive (an index both ok and junk does not shift itself)
            pos = pos - np.searchsorted(jpos, pos, side="left")
        ap = _ap(pos, ok.size)
        aps[i] = ap
        total += ap
        if kappas:
            if pos.size:
                p1 = pos + 1  # 1-based
                last = int(p1.max())
                for j, k in enumerate(kappas):
                    kq = min(last, k)
                    prs[i, j] = np.count_nonzero(p1 <= kq) / kq
            pr = pr + prs[i, :]
    nvalid = nq - nempty
    if nvalid == 0:
        return math.nan, aps, np.full(len(kappas), math.nan), prs
    return total / nvalid, aps, pr / nvalid, prs


def protocol_gnd(gnd: Sequence[dict[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """revisitop gnd entries (easy/hard/junk) -> {"ok", "junk"} for the Easy, Medium or Hard protocol."""
    def get(g: dict[str, Any], k: str) -> np.ndarray:
        return np.asarray(g.get(k, []), dtype=np.int64).reshape(-1)

    out = []
    for g in gnd:
        easy, hard, junk = get(g, "easy"), get(g, "hard"), get(g, "junk")
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif protocol == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise UsageError(f"unknown protocol {protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
    return out


def evaluate_protocols(ranks: np.ndarray, gnd: Sequence[dict[str, Any]], kappas: Sequence[int] = (1, 5, 10)
                       ) -> dict[str, dict[str, float | None]]:
    """{"easy"|"medium"|"hard": {"map": %, "mp@1": %, "mp@5": %, "mp@10": %}}, percentages rounded to 2 decimals
    as revisitop prints them; None where a protocol has no query with positives."""
    out: dict[str, dict[str, float | None]] = {}
    for p in PROTOCOLS:
        m, _, pr, _ = compute_map(ranks, protocol_gnd(gnd, p), kappas)
        res: dict[str, float | None] = {"map": _pct(m)}
        for k, v in zip(kappas, pr):
            res[f"mp@{int(k)}"] = _pct(float(v))
        out[p] = res
    return out


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else float(np.around(x * 100, decimals=2))
