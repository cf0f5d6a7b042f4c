"""Exact streamed top-k equals a plain numpy full sort."""
import numpy as np

from tests.ties import assert_topk_up_to_ties
from visearch.search import topk_stream


def _blocks(x, chunk):
    for a in range(0, len(x), chunk):
        yield a, x[a:a + chunk]


def _numpy_topk(q, x, k, live=None):
    s = q @ x.T
    if live is not None:
        s[:, ~live] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def _next_score(q, x, k, live=None):
    """The k+1-th best score per query (-inf when there is none)."""
    s = q @ x.T
    if live is not None:
        s[:, ~live] = -np.inf
    s = -np.sort(-s, axis=1)
    return s[:, k] if s.shape[1] > k else np.full(len(q), -np.inf)


def test_streamed_topk_matches_numpy_across_chunk_sizes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[[3, 500, 999]] + 0.1 * rng.standard_normal((3, 64)).astype(np.float32)
    ref_r, ref_s = _numpy_topk(q, x, 10)
    for chunk in (7, 100, 1000, 5000):
        r, s = topk_stream(q, _blocks(x, chunk), 10)
        np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-6)
        # torch's chunked matmul and numpy's round differently: rows compare up to near-equal scores
        assert_topk_up_to_ties(r, ref_r, ref_s, 1e-5, _next_score(q, x, 10))
    assert r[0, 0] == 3 and r[1, 0] == 500 and r[2, 0] == 999


def test_dead_rows_are_never_returned_and_k_is_capped():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    live = np.ones(50, bool)
    live[[0, 10, 20]] = False
    q = x[[0, 10]]
    r, s = topk_stream(q, _blocks(x, 8), 100, live=live)
    assert r.shape == (2, 47)
    assert not set(r.ravel()) & {0, 10, 20}
    ref_r, ref_s = _numpy_topk(q, x, 47, live)
    assert_topk_up_to_ties(r, ref_r, ref_s, 1e-5, _next_score(q, x, 47, live))


def test_float16_blocks_and_ties_keep_lower_row_first():
    x = np.zeros((6, 4), np.float16)
    x[:, 0] = 1  # all identical: every score ties
    r, s = topk_stream(np.array([[1, 0, 0, 0]], np.float32), _blocks(x, 4), 6)
    assert r.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert np.allclose(s, 1)


def test_tie_aware_topk_comparison_accepts_only_swaps_of_near_equal_scores():
    """The helper the parity tests use (issue 10 item 1): a swap inside a tie passes, any other difference fails."""
    import pytest

    ref_r, ref_s = np.array([[4, 7, 1, 9]]), np.array([[0.9, 0.5 + 1e-7, 0.5, 0.1]])
    assert_topk_up_to_ties(np.array([[4, 1, 7, 9]]), ref_r, ref_s, 1e-5)  # rows 7 and 1 tie to 1e-7
    with pytest.raises(AssertionError):
        assert_topk_up_to_ties(np.array([[7, 4, 1, 9]]), ref_r, ref_s, 1e-5)  # 0.9 vs 0.5: a real difference
    # the last place tied with the first one left out: either row of that tie is right
    assert_topk_up_to_ties(np.array([[4, 7, 1, 3]]), ref_r, ref_s, 1e-5, next_scores=np.array([0.1]))
    with pytest.raises(AssertionError):
        assert_topk_up_to_ties(np.array([[4, 7, 1, 3]]), ref_r, ref_s, 1e-5, next_scores=np.array([0.05]))


def _unit16(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def test_float16_fast_path_gives_the_float32_top_k():
    """float16 candidates + exact rescoring == converting every chunk to float32 (rows and scores), dead rows too."""
    rng = np.random.default_rng(2)
    x = _unit16(rng, 6000, 256)
    q = x[[5, 3000, 5999]].astype(np.float32) + 0.05 * rng.standard_normal((3, 256)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    live = np.ones(6000, bool)
    live[rng.choice(6000, 900, replace=False)] = False
    live[5] = False
    ref_r, ref_s = _numpy_topk(q, x.astype(np.float32), 20, live)
    for chunk in (1000, 2048, 6000):
        stats = {}
        r, s = topk_stream(q, _blocks(x, chunk), 20, live=live, stats=stats)
        slow_r, slow_s = topk_stream(q, _blocks(x, chunk), 20, live=live, unit_rows=False)
        assert stats.get("fast", 0) >= 1  # the float16 path really ran
        np.testing.assert_array_equal(r, ref_r)
        np.testing.assert_array_equal(r, slow_r)
        np.testing.assert_allclose(s, ref_s, rtol=0, atol=2e-6)
        np.testing.assert_allclose(s, slow_s, rtol=0, atol=2e-6)
    assert 5 not in r and r[1, 0] == 3000


def test_float16_near_ties_fall_back_to_float32():
    """Rows closer to each other than float16 can tell apart: the bound check sends the chunk to float32."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(128).astype(np.float32)
    x = (base + 1e-3 * rng.standard_normal((800, 128)).astype(np.float32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    q = (base / np.linalg.norm(base))[None].astype(np.float32)
    stats = {}
    r, s = topk_stream(q, _blocks(x, 400), 10, stats=stats)
    assert stats.get("float32", 0) >= 1
    slow_r, slow_s = topk_stream(q, _blocks(x, 400), 10, unit_rows=False)
    np.testing.assert_array_equal(r, slow_r)
    np.testing.assert_array_equal(s, slow_s)


def test_fp16_error_bound_covers_the_observed_error():
    import torch

    from visearch.search import _fp16_error_bound

    rng = np.random.default_rng(4)
    x = _unit16(rng, 4000, 2048)
    q = rng.standard_normal((4, 2048)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[0] = np.abs(q[0])  # all-positive products: the worst case for accumulation error
    x[:2000] = np.abs(x[:2000])
    approx = torch.mm(torch.from_numpy(q).half(), torch.from_numpy(x).T).float().numpy()
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    bound = _fp16_error_bound(2048, np.linalg.norm(q, axis=1))
    assert np.all(np.abs(approx - exact) <= bound[:, None])
    assert np.all(bound < 2e-3)  # tight enough to be useful
