"""Tie-aware comparison of orders, for parity tests (issue 10 item 1).

A golden order computed on one CPU may differ from ours on another wherever two sort keys are equal within float
noise (AVX2 vs AVX-512/BF16 kernels round differently): such entries may swap. These helpers compare an order only
where consecutive keys differ by more than `tol`, and tied groups as sets.

    groups = tie_groups(ref_weights, tol)             # index arrays of consecutive near-equal keys
    perm = align_within_ties(ref_keys, our_keys, ref_weights, tol)
    # our_rows[perm] lines up with ref_rows; raises AssertionError when a tied group holds other members
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def tie_groups(values: Sequence[float], tol: float) -> list[np.ndarray]:
    """Split positions 0..n-1 of an already sorted `values` into runs whose consecutive values differ by <= tol."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        return []
    cuts = np.nonzero(np.abs(np.diff(v)) > tol)[0] + 1
    return np.split(np.arange(v.size), cuts)


def align_within_ties(ref_keys: Sequence[Hashable], our_keys: Sequence[Hashable], ref_values: Sequence[float],
                      tol: float) -> np.ndarray:
    """The permutation `perm` with `our_keys[perm[j]] == ref_keys[j]`, moving entries only inside the tie groups of
    `ref_values` (sorted). AssertionError when a group of ours holds other keys than the reference's group."""
    ref_keys, our_keys = list(ref_keys), list(our_keys)
    assert len(ref_keys) == len(our_keys), (len(ref_keys), len(our_keys))
    perm = np.empty(len(ref_keys), np.int64)
    for g in tie_groups(ref_values, tol):
        where = {our_keys[i]: int(i) for i in g}
        want = [ref_keys[j] for j in g]
        assert set(where) == set(want), (f"positions {g[0]}..{g[-1]} (keys within {tol} of each other) differ: "
                                          f"ours {sorted(map(str, where))[:5]}, reference {sorted(map(str, want))[:5]}")
        perm[g] = [where[k] for k in want]
    return perm


def assert_order_up_to_ties(ours: Sequence[Hashable], ref: Sequence[Hashable], ref_values: Sequence[float],
                            tol: float) -> None:
    """`ours` equals `ref` except for reorderings inside groups of near-equal `ref_values` (sorted)."""
    perm = align_within_ties(ref, ours, ref_values, tol)
    assert [list(ours)[i] for i in perm] == list(ref)


def assert_topk_up_to_ties(rows: np.ndarray, ref_rows: np.ndarray, ref_scores: np.ndarray, tol: float,
                           next_scores: np.ndarray | None = None) -> None:
    """Top-k lists `[nq, k]` equal up to ties: per query, each group of near-equal reference scores holds the same
    rows (in any order). A last group tied with the first score left out (`next_scores` [nq], the k+1-th) may hold
    other rows of that tie, so only its size is compared."""
    rows, ref_rows, ref_scores = np.asarray(rows), np.asarray(ref_rows), np.asarray(ref_scores)
    assert rows.shape == ref_rows.shape, (rows.shape, ref_rows.shape)
    for qi in range(len(ref_rows)):
        groups = tie_groups(ref_scores[qi], tol)
        for n, g in enumerate(groups):
            cut = (n == len(groups) - 1 and next_scores is not None
                   and abs(float(ref_scores[qi, g[-1]]) - float(next_scores[qi])) <= tol)
            if not cut:
                assert set(rows[qi, g].tolist()) == set(ref_rows[qi, g].tolist()), (qi, g.tolist(), rows[qi, g],
                                                                                    ref_rows[qi, g])
