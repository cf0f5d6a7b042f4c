"""SuperGlobal reranking (visearch.rerankers.superglobal) against the reference MDescAug + RerankwMDA.

tests/data/superglobal_rerank.npz holds the reference's full rankings on the synthetic set below (seed 0), computed
outside the repository by running the reference modules (github.com/ShihaoShao-GH/SuperGlobal, HEAD 8694696) on CPU
with `Tensor.cuda` as identity: sim = X @ Q.T, ranks = argsort(-sim, 0), MDescAug()(X, Q, ranks), RerankwMDA()(...);
"full": N = 1000, queries 3, 6, 18; "small": the first 300 items (N < M = 400), queries 0, 1, 2.
Why exact equality is a fair test: all entries are multiples of 2^-12, so the cosines and the Gram matrix are exact in
float32 in any summation order, and no two decisive ones tie (smallest gaps 4e-7 and 2e-6); the queries were picked
among 30 candidates so that the s1 cut (10th vs 11th) is >= 4e-4 apart and consecutive final scores >= 3e-6 apart,
while float32 moves the final scores by <= 5e-7 (measured against float64).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from visearch.rerankers.base import Shortlist
from visearch.rerankers.superglobal import SuperGlobalReranker, build, rerank


def synthetic_rerank_set(seed: int = 0, n: int = 1000, d: int = 2048, nq: int = 30,
                         clusters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(queries [nq, d], database [n, d]): unit norm up to rounding, entries exact multiples of 2^-12, so every dot
    product of two of them (below 1 in magnitude) is exact in float32 whatever the summation order.

    Item i is c_i q0 + r_i v_i with cosines c_i a random permutation of an evenly spaced grid over [0, 0.9] and v_i
    (orthogonal to q0) drawn around one of `clusters` centres, so items have clear neighbours and the refinement
    reorders the shortlist; the queries are q0 plus small random perturbations."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 1 + clusters)))[0].T  # orthonormal rows
    q0, centres = basis[:1], basis[1:]
    c = (0.9 * (rng.permutation(n) + rng.uniform(0.25, 0.75, n)) / n)[:, None]  # [n, 1]
    v = centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, d)) / np.sqrt(d)
    v -= (v @ q0.T) @ q0  # keep v orthogonal to q0
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    x = c * q0 + np.sqrt(1.0 - c ** 2) * v
    q = q0 + 0.3 * rng.standard_normal((nq, d)) / np.sqrt(d)

    def quant(a: np.ndarray) -> np.ndarray:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return (np.round(a * 4096) / 4096).astype(np.float32)

    return quant(q), quant(x)


DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def data():
    q, x = synthetic_rerank_set(0)
    return q, x, np.load(DATA / "superglobal_rerank.npz")


def test_synthetic_set_is_exact_lattice(data):
    q, x, _ = data
    assert x.shape == (1000, 2048) and q.shape[1] == 2048
    assert np.array_equal(x * 4096, np.round(x * 4096)) and np.array_equal(q * 4096, np.round(q * 4096))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("case", ["full", "small"])
def test_matches_reference_order(data, case):
    """Identical full ranking to the reference: N = 1000 (M = 400) and N = 300 < M."""
    q, x, g = data
    qi, n = g[f"{case}_query_idx"], int(g[f"{case}_n"])
    got = rerank(q[qi], x[:n], M=400, K=9, beta=0.15)
    ref = g[f"{case}_ranks"].astype(np.int64)
    assert got.shape == ref.shape == (len(qi), n)
    np.testing.assert_array_equal(got, ref)
    # the refinement really reorders (so the comparison is not only of cosine order)
    init = np.argsort(-(q[qi] @ x[:n].T), axis=1, kind="stable")
    assert (got[:, :10] != init[:, :10]).any()


def test_output_is_permutation_and_tail_keeps_cosine_order(data):
    q, x, _ = data
    got = rerank(q[:5], x, M=50, K=3, beta=0.3, batch_size=2)
    init = np.argsort(-(q[:5].astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")
    for g, i in zip(got, init):
        assert sorted(g) == list(range(1000))
        assert set(g[:50]) == set(i[:50])
        np.testing.assert_array_equal(g[50:], i[50:])


def test_batch_size_does_not_change_result(data):
    q, x, _ = data
    a = rerank(q[:6], x[:500], batch_size=1)
    b = rerank(q[:6], x[:500], batch_size=4)
    np.testing.assert_array_equal(a, b)


def test_tiny_database_and_argument_checks():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = rerank(x[:2], x)  # N = 4 < K + 1 = 10 < M
    assert got.shape == (2, 4) and all(sorted(r) == [0, 1, 2, 3] for r in got)
    assert rerank(x[:1], x[:0]).shape == (1, 0)
    from visearch.errors import UsageError

    with pytest.raises(UsageError):
        rerank(x, x[:, :4])
    with pytest.raises(UsageError):
        rerank(x, x, M=0)


def _store(tmp_path, x):
    from visearch.models.base import Features
    from visearch.store import Store, StoreWriter

    st = Store.create(tmp_path / "st", model="superglobal-r50", config={}, dim=x.shape[1], weights_sha256=None,
                      dtype="float32")
    with StoreWriter(st) as w:
        w.append([f"im{i}" for i in range(len(x))], Features(global_=x))
    return Store.open(tmp_path / "st")


def test_reranker_on_store_shortlist(tmp_path, data):
    """SuperGlobalReranker on a real store and the real search: same order as rerank(), scores descending."""
    from visearch.search import search_store

    q, x, g = data
    qi = g["full_query_idx"]
    store = _store(tmp_path, x)
    rows, sims = search_store(q[qi], store, 400)
    rr = SuperGlobalReranker(M=400, K=9, beta=0.15)
    assert rr.shortlist_size == 400
    out = rr.rerank(q[qi], None, Shortlist(rows=rows, sims=sims), store)
    np.testing.assert_array_equal(out.rows, g["full_ranks"][:, :400])
    assert out.scores.shape == (len(qi), 400) and (np.diff(out.scores, axis=1) <= 0).all()
    # scores are the final combined scores, not the cosines
    assert not np.allclose(np.sort(out.scores, axis=1), np.sort(sims, axis=1), atol=1e-3)
    # sims stay the global cosines of the same rows
    for i in range(len(qi)):
        pos = {int(r): j for j, r in enumerate(rows[i])}
        np.testing.assert_array_equal(out.sims[i], sims[i][[pos[int(r)] for r in out.rows[i]]])


def test_reranker_padding_and_shorter_lists(tmp_path, data):
    q, x, _ = data
    store = _store(tmp_path, x[:50])
    rows, _ = np.argsort(-(q[:2] @ x[:50].T), axis=1, kind="stable"), None
    padded = np.full((2, 60), -1, np.int64)
    padded[0, :50] = rows[0]
    padded[1, :20] = rows[1, :20]
    out = SuperGlobalReranker(M=400).rerank(q[:2], None, Shortlist(rows=padded, sims=np.zeros((2, 60))), store)
    assert out.rows.shape == (2, 50)
    np.testing.assert_array_equal(out.rows[0], rerank(q[:1], x[:50])[0])
    np.testing.assert_array_equal(out.rows[1, 20:], -1)
    assert sorted(out.rows[1, :20]) == sorted(rows[1, :20])
    np.testing.assert_array_equal(out.rows[1, :20], rows[1, :20][rerank(q[1:2], x[rows[1, :20]])[0]])


def test_build_from_config():
    from visearch.config import load_model_config
    from visearch.registry import load_reranker

    cfg = load_model_config("superglobal-r50", {"rerank": {"M": 100, "beta": 0.2}})
    rr = build(cfg, Path("."), torch.device("cpu"))
    assert (rr.M, rr.K, rr.beta, rr.shortlist_size) == (100, 9, 0.2, 100)
    assert isinstance(load_reranker(load_model_config("superglobal"), device="cpu"), SuperGlobalReranker)


def test_neighbour_selection_equals_stable_sort_with_ties():
    from visearch.rerankers.superglobal import _top_neighbours

    g = torch.from_numpy(np.random.default_rng(3).integers(0, 4, (2, 30, 30)).astype(np.float32))  # many ties
    vals, idx = _top_neighbours(g, 10)
    v_ref, i_ref = torch.sort(g, dim=-1, descending=True, stable=True)
    assert torch.equal(vals, v_ref[..., :10]) and torch.equal(idx, i_ref[..., :10])


def test_duplicates_in_database(data):
    """Exact duplicates (common in real collections) give a valid, deterministic ranking."""
    q, x, _ = data
    xd = np.concatenate([x[:200], x[:200]])
    a, b = rerank(q[:2], xd, M=300), rerank(q[:2], xd, M=300, batch_size=1)
    np.testing.assert_array_equal(a, b)
    assert all(sorted(r) == list(range(400)) for r in a)
