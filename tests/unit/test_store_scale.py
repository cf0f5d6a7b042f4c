"""The store at scale (issue 14.4): ids as one numpy array with an id -> row lookup, commits whose manifest does not
grow with the images or their tombstones, bounded compaction memory, schema-1 stores still read, and tombstones
under real SIGKILLs."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

import visearch.store
from tests.clitools import sigkill
from visearch.errors import StoreError
from visearch.idkeys import keys_for
from visearch.models.base import Features
from visearch.store import MANIFEST, Store, StoreWriter

ROOT = Path(__file__).resolve().parents[2]


def _g(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _create(tmp_path: Path, dim: int = 8) -> Path:
    path = tmp_path / "store"
    Store.create(path, model="m", config={}, dim=dim, weights_sha256=None)
    return path


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


# ---- ids as numpy, lookup by id ------------------------------------------------------------------------------------
IDS_A = ["a", "Ärger/ü.jpg", "日本/東京.png", "b"]
IDS_B = ["a-much-longer-id/than/the-first-shard/" + "x" * 60 + ".jpg", "c", "emoji-😀.jpg"]


def test_ids_are_one_bytes_array_and_rows_are_found_by_id(tmp_path):
    path = _create(tmp_path)
    with StoreWriter(Store.open(path)) as w:
        w.append(IDS_A, Features(_g(4)), fingerprints=["f1"] * 4)
        w.append(IDS_B, Features(_g(3, seed=1)), fingerprints=["f2"] * 3)
        w.tombstone([3])  # "b"
    s = Store.open(path)
    assert isinstance(s.ids, np.ndarray) and s.ids.dtype.kind == "S"
    assert s.ids.dtype.itemsize == max(len(x.encode()) for x in IDS_A + IDS_B)  # the widest shard's width
    assert s.id_list() == IDS_A + IDS_B and s.id_list([5, 1]) == ["c", "Ärger/ü.jpg"]
    np.testing.assert_array_equal(s.id_keys(), keys_for(IDS_A + IDS_B))  # stored keys are the index's keys
    query = ["emoji-😀.jpg", "b", "nope", "日本/東京.png", IDS_B[0], "a"]
    np.testing.assert_array_equal(s.rows_of(query), [6, -1, -1, 2, 4, 0])  # "b" is dead: no live row
    assert s.fingerprints().tolist() == [b"f1"] * 4 + [b"f2"] * 3
    fresh = Store.open(path)  # without the ids array loaded, only the hits' ids are read
    np.testing.assert_array_equal(fresh.rows_of(query), [6, -1, -1, 2, 4, 0])
    assert fresh._ids is None and fresh.id_list([6]) == ["emoji-😀.jpg"]
    assert s.live_rows_by_id() == {i: r for r, i in enumerate(IDS_A + IDS_B) if i != "b"}


def test_a_key_shared_by_many_ids_is_resolved_by_the_ids_themselves(tmp_path, monkeypatch):
    """Every key equal (the worst collision): lookups must still return each id's own row, never another's."""
    monkeypatch.setattr(visearch.store, "keys_for", lambda ids: np.zeros(len(ids), np.int64))
    path = _create(tmp_path)
    ids = [f"img{i}" for i in range(50)]
    with StoreWriter(Store.open(path)) as w:
        w.append(ids, Features(_g(50)))
        w.tombstone([7])
    s = Store.open(path)
    assert (s.id_keys() == 0).all()
    np.testing.assert_array_equal(s.rows_of(["img7", "img49", "img0", "img50"]), [-1, 49, 0, -1])


def test_nul_in_an_id_is_refused(tmp_path):
    path = _create(tmp_path)
    with StoreWriter(Store.open(path)) as w, pytest.raises(StoreError, match="NUL"):
        w.append(["ok", "bad\0id"], Features(_g(2)))


# ---- commit cost -----------------------------------------------------------------------------------------------------
def test_manifest_does_not_grow_with_tombstones_and_each_commit_touches_only_its_shards(tmp_path):
    path = _create(tmp_path)
    rows, n_shards = 3000, 6
    with StoreWriter(Store.open(path)) as w:
        for k in range(n_shards):
            w.append([f"s{k}-{j}" for j in range(rows)], Features(_g(rows, seed=k)))
        w.tombstone([0])
        small = (path / MANIFEST).stat().st_size
        w.tombstone(np.arange(1, 2 * rows))  # 6,000 rows dead in shards 0 and 1
        w.tombstone(np.arange(3 * rows, 6 * rows - 1))  # nearly all of shards 3..5
        big = (path / MANIFEST).stat().st_size
        files = sorted(p.name for p in path.glob("dead-*.npy"))
        assert [f.split("-")[1] for f in files] == ["0", "1", "3", "4", "5"]  # replaced dead-row files are gone
        before = {p.name: p.stat().st_mtime_ns for p in path.glob("dead-*.npy")}
        w.tombstone([6 * rows - 1])  # the last live row of shard 5: only its file is rewritten
        after = {p.name: p.stat().st_mtime_ns for p in path.glob("dead-*.npy")}
        assert len(set(before) - set(after)) == 1 and len(set(after) - set(before)) == 1
    # 5 shards went from no dead rows to thousands: the manifest grew by one short entry each, not per row
    assert big - small < 5 * 120, (small, big)
    assert (path / MANIFEST).stat().st_size < 300 * n_shards
    s = Store.open(path)
    assert s.num_live() == rows * n_shards - (2 * rows) - (3 * rows - 1) - 1
    assert s.rows_of(["s2-5", "s0-5", "s5-2999"]).tolist() == [2 * rows + 5, -1, -1]


def test_long_runs_of_small_commits_are_compacted_as_they_go(tmp_path):
    """extract commits every ~512 rows; compact_if_due after each keeps the shard count (and the manifest that every
    commit rewrites) at about rows / target instead of rows / commit, with rows and ids unchanged."""
    path = _create(tmp_path, dim=64)
    counts = []
    with StoreWriter(Store.open(path)) as w:
        for k in range(60):
            w.append([f"c{k}-{j}" for j in range(100)], Features(_g(100, 64, seed=k)))
            w.compact_if_due(target_bytes=1)  # target = 1,024 rows (the floor)
            counts.append(len(w.store.shards))
    assert max(counts) <= 6 + 60 * 100 // 512, counts  # each 512 rows become one shard; a short tail waits
    s = Store.open(path)
    assert s.id_list() == [f"c{k}-{j}" for k in range(60) for j in range(100)]
    want = np.concatenate([_g(100, 64, seed=k) for k in range(60)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(s.read_global(np.arange(6000)), want)


def test_compaction_holds_about_one_target_shard_in_memory(tmp_path):
    dim, rows, n_shards = 256, 500, 40  # a 20,000-row run, 10 MB of float16; the target is 1,024 rows (0.5 MB)
    path = _create(tmp_path, dim=dim)
    with StoreWriter(Store.open(path)) as w:
        for k in range(n_shards):
            w.append([f"r{k}-{j}" for j in range(rows)], Features(_g(rows, dim, seed=k)))
        w.tombstone(np.arange(0, rows * n_shards, 97))
        tracemalloc.start()
        replaced = w.compact(target_bytes=1)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert replaced == n_shards
    run_bytes = rows * n_shards * dim * 2
    assert peak < run_bytes / 4, f"compaction peaked at {peak / 1e6:.1f} MB for a {run_bytes / 1e6:.1f} MB run"
    s = Store.open(path)
    assert len(s) == rows * n_shards - len(range(0, rows * n_shards, 97)) and s.live.all()
    assert max(x.rows for x in s.shards) <= 1024


def test_shard_names_of_any_digit_count_are_numbered_after_the_highest(tmp_path):
    path = _create(tmp_path)
    with StoreWriter(Store.open(path)) as w:
        w.append(["a"], Features(_g(1)))
        w.append(["b"], Features(_g(1, seed=1)))
    m = _manifest(path)
    for s, new in zip(m["shards"], ("shard-9.h5", "shard-1234567.h5")):
        (path / s["file"]).rename(path / new)
        s["file"] = new
    (path / MANIFEST).write_text(json.dumps(m))
    with StoreWriter(Store.open(path)) as w:
        w.append(["c"], Features(_g(1, seed=2)))
        w.tombstone([0])
    s = Store.open(path)
    assert [x.file for x in s.shards] == ["shard-9.h5", "shard-1234567.h5", "shard-1234568.h5"]
    assert s.id_list() == ["a", "b", "c"] and s.live.tolist() == [False, True, True]


# ---- schema 1 stores -----------------------------------------------------------------------------------------------
def _write_schema1(path: Path, dim: int = 8) -> np.ndarray:
    """A store as visearch wrote it before schema 2, by hand: variable-length utf-8 ids, dead rows listed inline."""
    path.mkdir(parents=True)
    g = _g(5, dim).astype(np.float16)
    shards = []
    for k, (ids, rows) in enumerate(((["x0", "ü1", "x2"], slice(0, 3)), (["y0", "y1"], slice(3, 5)))):
        name = f"shard-{k:05d}.h5"
        with h5py.File(path / name, "w") as f:
            f.attrs["schema_version"] = 1
            f.attrs["uid"] = f"uid{k}"
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("fingerprints", data=np.array(["1:2"] * len(ids), dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("global", data=g[rows], chunks=(len(ids), dim), fletcher32=True)
        shards.append({"file": name, "rows": len(ids), "bytes": (path / name).stat().st_size,
                       "dead": [1] if k == 0 else [], "uid": f"uid{k}"})
    manifest = {"schema_version": 1, "visearch_version": "0.1", "model": "m", "config": {}, "weights_sha256": None,
                "dataset": None, "dim": dim, "dtype": "float16", "local_fields": {}, "created": "", "shards": shards}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return g.astype(np.float32)


def test_a_schema_1_store_is_read_and_upgraded_by_its_first_writer(tmp_path):
    path = tmp_path / "old"
    g = _write_schema1(path)
    s = Store.open(path)
    assert s.id_list() == ["x0", "ü1", "x2", "y0", "y1"] and s.ids.dtype.kind == "S"
    assert s.live.tolist() == [True, False, True, True, True]
    np.testing.assert_array_equal(s.rows_of(["y1", "ü1", "x0"]), [4, -1, 0])
    np.testing.assert_array_equal(s.read_global(np.arange(5)), g)
    np.testing.assert_array_equal(s.fingerprint_keys(), keys_for(["1:2"] * 5))
    s.verify()
    with StoreWriter(s) as w:
        w.append(["z0"], Features(_g(1, seed=3)), fingerprints=["9:9"])
    m = _manifest(path)
    assert m["schema_version"] == 2 and m["shards"][0]["dead"]["count"] == 1  # moved to a dead-row file
    s2 = Store.open(path)
    assert s2.id_list() == ["x0", "ü1", "x2", "y0", "y1", "z0"] and s2.live.tolist() == [True, False] + [True] * 4
    with StoreWriter(s2) as w:
        assert w.compact() == 3  # old and new shards merged into one schema-2 shard
    s3 = Store.open(path)
    assert s3.id_list() == ["x0", "x2", "y0", "y1", "z0"] and len(s3.shards) == 1
    np.testing.assert_array_equal(s3.read_global(np.arange(4)), g[[0, 2, 3, 4]])
    assert not list(path.glob("dead-*.npy"))


def test_a_damaged_dead_row_file_is_refused_with_the_rebuild_hint(tmp_path):
    path = _create(tmp_path)
    with StoreWriter(Store.open(path)) as w:
        w.append(["a", "b", "c"], Features(_g(3)))
        w.tombstone([1])
    f = next(path.glob("dead-*.npy"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="rebuild") as e:
        Store.open(path)
    assert "checksum" in str(e.value) and f.name in str(e.value)
    f.unlink()
    with pytest.raises(StoreError, match=f"missing {f.name}"):
        Store.open(path)


# ---- SIGKILL during tombstones ---------------------------------------------------------------------------------------
# Batch j tombstones local row j of every shard: one commit writes a dead-row file per shard, then one manifest. A
# state is complete when every shard holds the same dead rows 0..j-1.
TOMBSTONER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from visearch.store import Store, StoreWriter
path, rows = sys.argv[2], int(sys.argv[3])
with StoreWriter(Store.open(path)) as w:
    print("go", flush=True)
    n = len(w.store.shards)
    j = len(w.store.shards[0].dead)
    while j < rows:
        w.tombstone(np.arange(n) * rows + j)
        j += 1
print("done", flush=True)
"""


def _batches_done(s: Store, rows: int) -> int:
    j = len(s.shards[0].dead)
    for x in s.shards:
        assert x.dead.tolist() == list(range(j)), f"a torn tombstone: shard {x.file} has {x.dead.tolist()[:8]}..."
    assert s.live.reshape(-1, rows)[:, :j].sum() == 0 and s.live.reshape(-1, rows)[:, j:].all()
    return j


def _filled(tmp_path: Path, rows: int, n_shards: int) -> Path:
    path = _create(tmp_path)
    with StoreWriter(Store.open(path)) as w:
        for k in range(n_shards):
            w.append([f"s{k}-{j}" for j in range(rows)], Features(_g(rows, seed=k)))
    return path


def _start(path: Path, rows: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", TOMBSTONER, str(ROOT), str(path), str(rows)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go", p.stderr.read()
    return p


def _leftovers(path: Path) -> list[str]:
    m = _manifest(path)
    listed = {x["file"] for x in m["shards"]} | {x["dead"]["file"] for x in m["shards"] if x["dead"]}
    return sorted(p.name for p in path.iterdir()
                  if p.name.endswith(".tmp") or (p.name.startswith(("shard-", "dead-")) and p.name not in listed))


def test_sigkill_during_tombstones_leaves_the_old_or_the_new_dead_set(tmp_path):
    seed = int(os.environ.get("VISEARCH_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    rows, n_shards = 400, 8
    path = _filled(tmp_path, rows, n_shards)
    done, leftovers = [], 0
    for _ in range(6):
        p = _start(path, rows)
        time.sleep(rng.uniform(0.0, 0.3))
        sigkill(p)
        leftovers += bool(_leftovers(path))
        with Store.open(path) as s:
            done.append(_batches_done(s, rows))
            np.testing.assert_array_equal(s.read_global(np.arange(rows)), _g(rows, seed=0).astype(np.float16)
                                          .astype(np.float32))
    assert done == sorted(done) and done[-1] >= 2, f"{done} (seed {seed})"
    with StoreWriter(Store.open(path)):
        assert _leftovers(path) == []  # the next writer removes what killed ones left
    print(f"seed {seed}: batches after each kill {done}, kills that left files: {leftovers}")


def test_a_reader_racing_tombstones_sees_only_complete_states(tmp_path):
    rows, n_shards = 300, 6
    path = _filled(tmp_path, rows, n_shards)
    p = _start(path, rows)
    seen = set()
    try:
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end and p.poll() is None:
            with Store.open(path) as s:
                seen.add(_batches_done(s, rows))
    finally:
        if p.poll() is None:
            sigkill(p)
    assert len(seen) >= 3, f"the reader saw too few states to test anything: {sorted(seen)}"


def test_compaction_of_two_separate_runs_gives_each_merged_shard_its_own_name(tmp_path):
    """small, small, big, small, small: the second run's merged shard once took the first one's name (and
    overwrote it)."""
    path = _create(tmp_path)
    sizes = [10, 10, 600, 10, 10]  # the target is 1,024 rows: 600 is not small
    ids = [[f"r{k}-{j}" for j in range(n)] for k, n in enumerate(sizes)]
    with StoreWriter(Store.open(path)) as w:
        for k, i in enumerate(ids):
            w.append(i, Features(_g(len(i), seed=k)))
        assert w.compact(target_bytes=1) == 4
    s = Store.open(path)
    assert [x.rows for x in s.shards] == [20, 600, 20] and len({x.file for x in s.shards}) == 3
    assert s.id_list() == [x for i in ids for x in i]
    want = np.concatenate([_g(n, seed=k) for k, n in enumerate(sizes)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(s.read_global(np.arange(len(s))), want)
