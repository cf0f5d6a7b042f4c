"""Exact streamed top-k equals a plain numpy full sort."""
import numpy as np

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


def test_streamed_topk_matches_numpy_across_chunk_sizes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[[3, 500, 999]] + 0.1 * rng.standard_normal((3, 64)).astype(np.float32)
    ref_r, ref_s = _numpy_topk(q, x, 10)
    for chunk in (7, 100, 1000, 5000):
        r, s = topk_stream(q, _blocks(x, chunk), 10)
        np.testing.assert_array_equal(r, ref_r)
        np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-6)
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
    ref_r, _ = _numpy_topk(q, x, 47, live)
    np.testing.assert_array_equal(r, ref_r)


def test_float16_blocks_and_ties_keep_lower_row_first():
    x = np.zeros((6, 4), np.float16)
    x[:, 0] = 1  # all identical: every score ties
    r, s = topk_stream(np.array([[1, 0, 0, 0]], np.float32), _blocks(x, 4), 6)
    assert r.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert np.allclose(s, 1)
