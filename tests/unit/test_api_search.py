"""Searcher.search_features: a reranker reorders the head of the shortlist, the tail keeps global order (so a full
ranking for eval stays full even when SuperGlobal refines only the first M)."""
import numpy as np
import pytest

from tests.photos import write_photos
from visearch import api
from visearch.rerankers.superglobal import SuperGlobalReranker


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    write_photos(root / "photos", ["chelsea", "astronaut", "coffee", "rocket", "coins", "camera"], max_side=160)
    api.convert(root / "photos", "six", root / "data")
    api.extract("six", "lite", root / "data", device="cpu")
    return api.Searcher("six", "lite", root / "data", device="cpu")


def test_rerank_of_the_head_keeps_the_tail_in_global_order(searcher):
    from visearch.images import load_rgb

    img = load_rgb(searcher.dataset.image_path(searcher.dataset.imlist[2]))
    feats = searcher.describe_queries([img])
    g_rows, g_sims = searcher.search_features(feats, 6, rerank=False)
    assert g_rows.shape == (1, 6)
    searcher.reranker = SuperGlobalReranker(M=3, K=1, beta=0.15)
    try:
        rows, sims = searcher.search_features(feats, 6)
    finally:
        searcher.reranker = None
    assert rows.shape == (1, 6) and len(set(rows[0])) == 6
    assert set(rows[0, :3]) == set(g_rows[0, :3])  # the head is a reordering of the global top 3
    np.testing.assert_array_equal(rows[0, 3:], g_rows[0, 3:])  # the tail untouched
    np.testing.assert_allclose(sims[0, 3:], g_sims[0, 3:])
