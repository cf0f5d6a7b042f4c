"""The sharded HDF5 store: provenance, append, tombstones, chunked reads, corruption detection."""
import json

import numpy as np
import pytest

from visearch.errors import StoreError
from visearch.models.base import Features, LocalField
from visearch.store import Store, StoreWriter


def _make(tmp_path, local=False):
    fields = {"tokens": LocalField((4, 16), "uint8"), "mask": LocalField((4,), "bool")} if local else {}
    return Store.create(tmp_path / "s", model="m", config={"describe": {"a": 1}}, dim=8, weights_sha256="abc",
                        local_fields=fields)


def _feats(n, seed, local=False):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    loc = None
    if local:
        loc = {"tokens": rng.integers(0, 255, (n, 4, 16), dtype=np.uint8), "mask": rng.random((n, 4)) > 0.5}
    return Features(g, loc)


def test_append_read_and_provenance(tmp_path):
    st = _make(tmp_path, local=True)
    a, b = _feats(5, 0, True), _feats(3, 1, True)
    with StoreWriter(st) as w:
        w.append([f"a{i}" for i in range(5)], a, fingerprints=["x"] * 5)
        w.append([f"b{i}" for i in range(3)], b)
    s = Store.open(st.path)
    assert len(s) == 8 and s.id_list([5]) == ["b0"]
    np.testing.assert_allclose(s.read_global([6, 0]), np.stack([b.global_[1], a.global_[0]]), atol=1e-3)
    assert s.read_global([0]).dtype == np.float32
    loc = s.read_local([7, 2])
    np.testing.assert_array_equal(loc["tokens"][0], b.local["tokens"][2])
    np.testing.assert_array_equal(loc["mask"][1], a.local["mask"][2])
    blocks = list(s.iter_global(chunk_rows=2))
    assert [start for start, _ in blocks] == [0, 2, 4, 5, 7]
    assert s.manifest["model"] == "m" and s.manifest["weights_sha256"] == "abc"
    assert "visearch_version" in s.manifest
    s.check_compatible("m", {"describe": {"a": 1}}, "abc")
    with pytest.raises(StoreError, match="built with model"):
        s.check_compatible("other", {"describe": {"a": 1}}, "abc")
    with pytest.raises(StoreError, match="configuration"):
        s.check_compatible("m", {"describe": {"a": 2}}, "abc")
    with pytest.raises(StoreError, match="other m weights"):
        s.check_compatible("m", {"describe": {"a": 1}}, "def")


def test_tombstones_hide_rows(tmp_path):
    st = _make(tmp_path)
    with StoreWriter(st) as w:
        w.append(["a", "b", "c"], _feats(3, 0))
        w.tombstone([1])
    s = Store.open(st.path)
    assert s.live.tolist() == [True, False, True]
    assert s.live_rows_by_id() == {"a": 0, "c": 2}


def test_truncated_or_corrupt_store_is_refused(tmp_path):
    st = _make(tmp_path)
    with StoreWriter(st) as w:
        w.append(["a", "b"], _feats(2, 0))
    shard = st.path / "shard-00000.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        Store.open(st.path)
    (st.path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        Store.open(st.path)
    with pytest.raises(StoreError, match="no descriptors"):
        Store.open(tmp_path / "nothing")


def test_one_writer_at_a_time_and_bad_batches(tmp_path):
    st = _make(tmp_path)
    with StoreWriter(st) as w:
        with pytest.raises(StoreError, match="another process"):
            StoreWriter(st)
        with pytest.raises(StoreError, match="shape"):
            w.append(["a"], _feats(2, 0))
        bad = _feats(1, 0)
        bad.global_[0, 0] = np.nan
        with pytest.raises(StoreError, match="non-finite"):
            w.append(["a"], bad)
    assert json.loads((st.path / "manifest.json").read_text())["shards"] == []
    assert not list(st.path.glob("shard-*"))


def test_compaction_merges_small_shards_drops_dead_rows_and_keeps_order(tmp_path):
    st = _make(tmp_path, local=True)
    parts = [_feats(3, i, True) for i in range(5)]
    ids = [[f"p{i}r{j}" for j in range(3)] for i in range(5)]
    with StoreWriter(st) as w:
        for i, f in zip(ids, parts):
            w.append(i, f, fingerprints=[x + "-fp" for x in i])
        w.tombstone([4])  # p1r1
        assert w.compact() == 5
        assert w.compact() == 0  # nothing left to merge
    s = Store.open(st.path)
    expect = [x for i in ids for x in i if x != "p1r1"]
    assert len(s.shards) == 1 and s.id_list() == expect and s.live.all()
    assert s.fingerprints().tolist() == [(x + "-fp").encode() for x in expect]
    g = np.concatenate([p.global_ for p in parts])
    g = np.delete(g, 4, axis=0).astype(np.float16)
    np.testing.assert_array_equal(s.read_global(np.arange(14)), g.astype(np.float32))
    tok = np.delete(np.concatenate([p.local["tokens"] for p in parts]), 4, axis=0)
    np.testing.assert_array_equal(s.read_local(np.arange(14))["tokens"], tok)
    assert len(list(st.path.glob("shard-*.h5"))) == 1  # the replaced files are gone


def test_iteration_coalesces_small_shards(tmp_path):
    st = _make(tmp_path)
    with StoreWriter(st) as w:
        for i in range(6):
            w.append([f"{i}a", f"{i}b"], _feats(2, i))
    s = Store.open(st.path)
    blocks = list(s.iter_global(chunk_rows=5))
    assert [(a, len(b)) for a, b in blocks] == [(0, 4), (4, 4), (8, 4)]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), s.read_global(np.arange(12)).astype(np.float16))
