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


def test_eval_per_protocol_shortlists(tmp_path):
    """AMES's reference evaluation reranks with each protocol's ignored images moved behind the shortlist (Medium:
    junk, Hard: junk + easy). Checked with a real SuperGlobal reranker (shortlist 2) switched to that mode: without
    junk the Medium pass (also giving Easy) equals the plain rerank, and the Hard pass, where the easy positive leaves
    the head for the darker hard copy, ranks the hard positive no worse."""
    import json

    from PIL import Image

    from tests.photos import photo_array, rescaled_copy

    photos = tmp_path / "photos"
    photos.mkdir()
    for n in ("coffee", "rocket", "coins", "camera", "chelsea"):
        Image.fromarray(photo_array(n, 160)).save(photos / f"{n}.jpg", quality=92)
    Image.fromarray((photo_array("coffee", 160) * 0.35).astype("uint8")).save(photos / "coffee_dark.jpg", quality=92)
    (photos / "q").mkdir()
    rescaled_copy(photos / "coffee.jpg", photos / "q" / "query.jpg", 0.7)
    gt = {"queries": [{"image": "q/query.jpg", "positives": ["coffee.jpg"], "hard": ["coffee_dark.jpg"]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    data = tmp_path / "data"
    api.convert(photos, "gt", data, ground_truth=tmp_path / "gt.json")
    api.extract("gt", "lite", data, device="cpu")
    s = api.Searcher("gt", "lite", data, device="cpu")
    s.reranker = SuperGlobalReranker(M=2, K=0)
    plain = api.evaluate("gt", searcher=s)
    s.reranker.junk_behind_shortlist = True
    moved = api.evaluate("gt", searcher=s)
    assert moved["global"] == plain["global"]
    # no junk in this ground truth: the Medium pass (which also gives Easy) is the plain rerank
    assert moved["reranked"]["medium"] == plain["reranked"]["medium"]
    assert moved["reranked"]["easy"] == plain["reranked"]["easy"]
    # the Hard pass ranks the hard positive at least as well as the plain rerank does
    assert moved["reranked"]["hard"]["map"] >= plain["reranked"]["hard"]["map"]
    for res in (plain, moved):
        for proto in ("easy", "medium", "hard"):
            assert 0 <= res["reranked"][proto]["map"] <= 100
