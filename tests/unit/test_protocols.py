"""The explicit protocols: defaults that the pipeline relies on instead of getattr discovery."""
import numpy as np
import pytest

from visearch.detectors.base import DetectorProtocol, select_crops
from visearch.detectors.whole_image import WholeImageDetector
from visearch.index import ExactIndex, Index
from visearch.models.base import Describer, DescriberProtocol, Features
from visearch.registry import load_detector
from visearch.rerankers.base import RerankerProtocol, Shortlist


class _Tiny(Describer):
    def __init__(self):
        super().__init__(name="tiny", dim=2, config={"family": "tiny"})

    def extract(self, images):
        return Features(np.asarray([[float(len(im)), 1.0] for im in images], np.float32))


def test_extract_query_defaults_to_extract():
    d = _Tiny()
    assert isinstance(d, DescriberProtocol)
    imgs = [np.zeros((3, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]
    np.testing.assert_array_equal(d.extract_query(imgs).global_, d.extract(imgs).global_)
    assert d.local_fields == {} and d.weights_sha256 is None


@pytest.mark.parametrize("size", [(5, 5), (70, 50), (300, 16), (640, 480)])
def test_whole_image_detector_gives_the_crops_of_no_detector(size):
    """Searcher runs the whole-image detector instead of special-casing "none": the crops must be the same."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    for name in ("none", "whole-image"):
        det = load_detector(name)
        assert isinstance(det, WholeImageDetector) and isinstance(det, DetectorProtocol)
        got = select_crops(det.detect(img, "ignored"), (w, h))
        assert [c.to_dict() for c in got] == [c.to_dict() for c in select_crops([], (w, h))]


def test_rerankers_declare_their_evaluation_policy():
    from visearch.rerankers.ames import AMESReranker
    from visearch.rerankers.superglobal import SuperGlobalReranker

    sg = SuperGlobalReranker(M=10)
    assert isinstance(sg, RerankerProtocol) and sg.junk_behind_shortlist is False and sg.shortlist_size == 10
    assert AMESReranker.junk_behind_shortlist is True


def test_shortlist_ranking_scores():
    rows, sims = np.array([[2, 0, 1]]), np.array([[0.9, 0.5, 0.1]], np.float32)
    assert Shortlist(rows, sims).ranking_scores is sims
    scores = np.array([[0.7, 0.6, 0.2]], np.float32)
    assert Shortlist(rows, sims, scores).ranking_scores is scores


def test_exact_index_is_the_streamed_search(tmp_path):
    from visearch.search import search_store
    from visearch.store import Store, StoreWriter

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = Store.create(tmp_path / "s", model="m", config={}, dim=8, weights_sha256=None, local_fields={},
                         dtype="float32", dataset="d")
    with StoreWriter(store) as w:
        w.append([f"i{k}" for k in range(40)], Features(x), fingerprints=["f"] * 40)
        w.tombstone([3, 7])
    store = Store.open(tmp_path / "s")
    index = ExactIndex(store, chunk_rows=16)
    assert isinstance(index, Index) and index.exact
    q = x[[3, 10, 20]]
    rows, sims = index.search(q, 5)
    want_rows, want_sims = search_store(q, store, 5, chunk_rows=16)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(sims, want_sims)
    assert 3 not in rows[0] and rows[1, 0] == 10
