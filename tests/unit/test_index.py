"""First-stage indexes over a real Store: FAISS build/search/rescore, staleness, incremental update, the rule."""
import json

import numpy as np
import pytest

from visearch.errors import SearchIndexError, UsageError
from visearch.idkeys import keys_for
from visearch.index import (
    ExactIndex,
    Index,
    build_index,
    choose_factory,
    open_index,
    parse_bytes,
    rescore,
    update_index,
)
from visearch.models.base import Features
from visearch.search import search_store
from visearch.store import Store, StoreWriter

pytest.importorskip("faiss")


def _clustered(rng, n, d, centers=20):
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _store(path, x, start=0, shard=1000):
    st = Store.create(path, model="synthetic", config={}, dim=x.shape[1], weights_sha256=None)
    with StoreWriter(st) as w:
        for a in range(0, len(x), shard):
            ids = [f"img{i}" for i in range(start + a, start + min(a + shard, len(x)))]
            w.append(ids, Features(x[a:a + shard]), fingerprints=["v1"] * len(ids))
    return Store.open(path)


def test_flat_index_shortlist_rescored_equals_exact_and_survives_reload(tmp_path):
    rng = np.random.default_rng(0)
    x = _clustered(rng, 3000, 64)
    st = _store(tmp_path / "s", x)
    idx, rep = build_index(st, factory="SQfp16")
    assert isinstance(idx, Index) and isinstance(ExactIndex(st), Index)
    assert rep.vectors == 3000 and rep.code_bytes == 128 and rep.factory == "SQfp16"
    q = x[[1, 1500, 2999]] + 0.05 * rng.standard_normal((3, 64)).astype(np.float32)
    ref_r, ref_s = search_store(q, st, 10)
    again = open_index(st, required=True)  # from the files
    cand, _ = again.search(q, 50)
    r, s = rescore(q, st, cand, 10)
    np.testing.assert_array_equal(r, ref_r)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert r[1, 0] == 1500


def test_ivf_pq_recall_after_exact_rescoring(tmp_path):
    rng = np.random.default_rng(1)
    x = _clustered(rng, 6000, 64)
    st = _store(tmp_path / "s", x)
    idx, rep = build_index(st, factory="PCAR32,IVF32,PQ8", nprobe=8, train_size=3000)
    assert rep.train_size == 3000 and rep.code_bytes == 8
    q = _clustered(rng, 20, 64)
    ref_r, _ = search_store(q, st, 10)
    r, _ = rescore(q, st, idx.search(q, 200)[0], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r, ref_r)])
    assert recall >= 0.9


def test_stale_index_refused_then_extract_style_update_follows_adds_deletes_changes_and_compaction(tmp_path):
    rng = np.random.default_rng(2)
    x = _clustered(rng, 2500, 32)
    st = _store(tmp_path / "s", x)
    build_index(st, factory="Flat")
    with StoreWriter(st) as w:  # new images, one deleted, one changed (tombstoned + re-added with a new version)
        extra = _clustered(rng, 300, 32)
        w.append([f"new{i}" for i in range(300)], Features(extra), fingerprints=["v1"] * 300)
        w.tombstone([5, 7])
        changed = _clustered(rng, 1, 32)
        w.append(["img7"], Features(changed), fingerprints=["v2"])
        st2 = w.store
    with pytest.raises(SearchIndexError, match="older state"):
        open_index(st2)
    rep = update_index(st2)
    assert rep.added == 301 and rep.removed == 2
    idx = open_index(st2)
    assert len(idx) == 2500 - 2 + 301
    q = np.concatenate([x[5:6], changed, extra[:1]])
    cand, _ = idx.search(q, 20)
    assert 5 not in cand and 7 not in cand  # dead rows never come back
    r, s = rescore(q, st2, cand, 5)
    ref_r, ref_s = search_store(q, st2, 5)
    np.testing.assert_array_equal(r, ref_r)
    assert st2.id_list([r[1, 0]]) == ["img7"] and s[1, 0] == pytest.approx(1, abs=1e-3)
    with StoreWriter(st2) as w:  # compaction renumbers rows: the update maps keys to the new rows
        w.compact()
        st3 = w.store
    assert update_index(st3).added == 0
    idx = open_index(st3)
    r, _ = rescore(q, st3, idx.search(q, 20)[0], 5)
    np.testing.assert_array_equal(r, search_store(q, st3, 5)[0])
    assert len(list((tmp_path / "s" / "index").glob("index-*"))) == 2  # old files removed after each save


def test_damaged_index_is_one_clear_error(tmp_path):
    rng = np.random.default_rng(3)
    st = _store(tmp_path / "s", _clustered(rng, 500, 16))
    assert open_index(st) is None
    with pytest.raises(SearchIndexError, match="no index"):
        open_index(st, required=True)
    build_index(st, factory="Flat")
    meta = json.loads((tmp_path / "s" / "index" / "index.json").read_text())
    arrays = tmp_path / "s" / "index" / meta["arrays_file"]
    np.savez(arrays, keys=np.array([object()], dtype=object), rows=np.zeros(1), fps=np.zeros(1))  # pickled objects
    with pytest.raises(SearchIndexError, match="damaged"):
        open_index(st)
    (tmp_path / "s" / "index" / "index.json").write_text("{not json")
    with pytest.raises(SearchIndexError, match="corrupt"):
        open_index(st)
    with pytest.raises(UsageError, match="FAISS cannot build"):
        build_index(st, factory="NoSuchIndex42")


def test_factory_rule_and_sizes():
    assert choose_factory(50_000, 2048) == "SQfp16"
    assert choose_factory(50_000, 2048, memory_budget=100 << 20) == "PCAR256,IVF1024_HNSW32,PQ64"  # 205 MB > 100 MB
    f = choose_factory(1_000_000, 2048)
    assert f == "PCAR256,IVF4096_HNSW32,PQ64"
    assert choose_factory(100_000_000, 2048, parse_bytes("4GB")) == "PCAR128,IVF32768_HNSW32,PQ32"
    assert choose_factory(500_000, 2048, parse_bytes("1GB")).endswith("PQ64")
    with pytest.raises(UsageError):
        choose_factory(10**9, 2048, parse_bytes("1GB"))
    assert parse_bytes("4GB") == 4 << 30 and parse_bytes("512mb") == 512 << 20 and parse_bytes("1000") == 1000
    with pytest.raises(UsageError):
        parse_bytes("lots")
    k = keys_for(["a", "b", "a"])
    assert k[0] == k[2] != k[1] and (k >= 0).all()
