"""visearch.metrics: hand-computed revisitop mAP / mP@k cases and a golden comparison with the reference code.

tests/data/revisitop_golden.npz was produced by running filipradenovic/revisitop python/evaluate.py (with
`np.in1d = np.isin`, since NumPy 2.4 removed in1d) OUTSIDE this repository on seeded random ranks and ground truth
(N=300 database images, 25 queries, easy/hard/junk sets incl. queries without easy, without hard, and without any
positives; plus the Medium protocol on a ranking truncated to the top 150). Only inputs and outputs are stored.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from visearch.errors import UsageError
from visearch.metrics import compute_map, evaluate_protocols, protocol_gnd

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "revisitop_golden.npz"


def col(*ids: int, n: int = 10) -> np.ndarray:
    """A ranking column starting with `ids`, then the remaining indices of 0..n-1 in order: [n, 1]."""
    rest = [i for i in range(n) if i not in ids]
    return np.array(list(ids) + rest)[:, None]


def test_perfect_ranking():
    m, aps, pr, _ = compute_map(col(0, 1), [{"ok": [0, 1], "junk": []}])
    assert m == 1.0 and aps.tolist() == [1.0]
    assert pr.tolist() == [1.0, 1.0, 1.0]  # P@5 uses kq = min(last positive, 5) = 2


def test_single_positive_at_third_place():
    m, _, pr, _ = compute_map(col(5, 6, 0), [{"ok": [0]}])
    # j=0, r=2: (0/2 + 1/3) / 2
    assert m == pytest.approx(1 / 6)
    # 1-based position 3: P@1 -> kq=1, none; P@5 -> kq=3, 1/3; P@10 -> kq=3, 1/3
    assert pr.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3])


def test_junk_ranked_above_positive_is_ignored():
    ranks = col(5, 7)
    with_junk, *_ = compute_map(ranks, [{"ok": [7], "junk": [5]}])
    without, *_ = compute_map(ranks, [{"ok": [7], "junk": []}])
    assert with_junk == 1.0
    assert without == pytest.approx((0 / 1 + 1 / 2) / 2)


def test_two_positives_with_junk_between():
    # positives at 0 and 3, junk at 1 -> corrected positions 0 and 2
    m, _, pr, _ = compute_map(col(1, 9, 2, 3), [{"ok": [1, 3], "junk": [9]}])
    want = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert m == pytest.approx(want)
    # 1-based corrected positions 1, 3: P@1 = 1, P@5 -> kq = 3: 2/3
    assert pr.tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])


def test_query_without_positives_is_nan_and_excluded():
    ranks = np.hstack([col(0), col(0)])
    m, aps, pr, prs = compute_map(ranks, [{"ok": [0], "junk": []}, {"ok": [], "junk": [0]}])
    assert m == 1.0 and pr.tolist() == [1.0, 1.0, 1.0]
    assert aps[0] == 1.0 and math.isnan(aps[1]) and np.isnan(prs[1]).all()


def test_no_query_with_positives():
    m, aps, pr, _ = compute_map(col(0), [{"ok": []}])
    assert math.isnan(m) and np.isnan(pr).all() and np.isnan(aps).all()


def test_truncated_ranking():
    ranks = np.array([[0], [1], [2]])  # top-3 only; positive 99 never retrieved
    m, *_ = compute_map(ranks, [{"ok": [0, 99]}])
    assert m == pytest.approx(0.5)  # the missing positive counts in nres
    m, _, pr, _ = compute_map(ranks, [{"ok": [99]}])  # the reference crashes here; we score 0
    assert m == 0.0 and pr.tolist() == [0.0, 0.0, 0.0]


def test_fraction_not_percent_and_custom_kappas():
    m, _, pr, prs = compute_map(col(3, 0), [{"ok": [0]}], kappas=[2])
    assert m == pytest.approx((0 / 1 + 1 / 2) / 2) and pr.shape == (1,) and prs.shape == (1, 1) and pr[0] == 0.5
    _, _, pr, prs = compute_map(col(3, 0), [{"ok": [0]}], kappas=[])
    assert pr.shape == (0,) and prs.shape == (1, 0)


def test_shape_errors():
    with pytest.raises(UsageError, match="columns"):
        compute_map(np.zeros((5, 2), int), [{"ok": [1]}])
    with pytest.raises(UsageError, match="2-D"):
        compute_map(np.arange(5), [{"ok": [1]}])


def test_protocols_and_percentages():
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranks = col(2, 1, 0)
    res = evaluate_protocols(ranks, gnd)
    assert set(res) == {"easy", "medium", "hard"}
    assert set(res["easy"]) == {"map", "mp@1", "mp@5", "mp@10"}
    # easy: ok [0], junk [2, 1] -> corrected position 0 -> 100
    assert res["easy"]["map"] == 100.0
    # hard: ok [1], junk [2, 0] -> corrected position 0 -> 100
    assert res["hard"]["map"] == 100.0 and res["hard"]["mp@1"] == 100.0
    # medium: ok [0, 1], junk [2] -> corrected 0 and 1 -> 100
    assert res["medium"]["map"] == 100.0
    res = evaluate_protocols(col(2, 0, 1), [{"easy": [1], "hard": [], "junk": []}])
    assert res["hard"] == {"map": None, "mp@1": None, "mp@5": None, "mp@10": None}
    assert res["easy"]["map"] == round(((0 / 2 + 1 / 3) / 2) * 100, 2) == 16.67
    with pytest.raises(UsageError):
        protocol_gnd(gnd, "extreme")


def _golden():
    z = np.load(GOLDEN)

    def unflat(k):
        return np.split(z[f"gnd_{k}_flat"], np.cumsum(z[f"gnd_{k}_len"])[:-1])

    gnd = [{"easy": e, "hard": h, "junk": j} for e, h, j in zip(unflat("easy"), unflat("hard"), unflat("junk"))]
    return z, gnd


@pytest.mark.parametrize("protocol", ["easy", "medium", "hard"])
def test_golden_against_revisitop_reference(protocol):
    z, gnd = _golden()
    m, aps, pr, prs = compute_map(z["ranks"], protocol_gnd(gnd, protocol), [1, 5, 10])
    assert any(len(g["easy"]) == 0 for g in gnd) and any(len(g["hard"]) == 0 for g in gnd)
    # same arithmetic in the same order: identical floats, not just close
    assert m == float(z[f"{protocol}_map"])
    assert np.array_equal(aps, z[f"{protocol}_aps"], equal_nan=True)
    assert np.array_equal(pr, z[f"{protocol}_pr"])
    assert np.array_equal(prs, z[f"{protocol}_prs"], equal_nan=True)


def test_golden_truncated_ranking():
    z, gnd = _golden()
    top = int(z["trunc_top"])
    m, aps, _, prs = compute_map(z["ranks"][:top], protocol_gnd(gnd, "medium"), [1, 5, 10])
    assert m == float(z["trunc_medium_map"])
    assert np.array_equal(aps, z["trunc_medium_aps"], equal_nan=True)
    assert np.array_equal(prs, z["trunc_medium_prs"], equal_nan=True)


def test_golden_percentages_as_revisitop_prints():
    z, gnd = _golden()
    res = evaluate_protocols(z["ranks"], gnd)
    for p in ("easy", "medium", "hard"):
        assert res[p]["map"] == float(np.around(z[f"{p}_map"] * 100, decimals=2))
        assert [res[p][f"mp@{k}"] for k in (1, 5, 10)] == np.around(z[f"{p}_pr"] * 100, decimals=2).tolist()
