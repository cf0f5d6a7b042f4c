"""Store.open, ids, id lookup and commit costs for a large global-only store (issue 14, part 4).

    python benchmarks/bench_store_open.py --rows 10M --dim 16          # 10 M rows in 65,536-row shards

The rows' descriptors are tiny (--dim) so that 10 M rows fit on a small disk: what is measured is the per-row
bookkeeping (manifest, shard files, ids, dead rows), which does not depend on the dimension. The reads run in a fresh
process (so its RSS is the reader's alone): Store.open seconds and RSS, the first `ids` access, the first id lookup
(`rows_of`, which builds the sorted key table) and a second one of 1,000 ids. Then, at full size, the commits:
appending one 512-row shard, tombstoning 1,000 rows spread over every shard, and the manifest size after each.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visearch.bench import parse_sizes  # noqa: E402
from visearch.models.base import Features  # noqa: E402
from visearch.store import MANIFEST, Store, StoreWriter  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _name(i: int) -> str:
    return f"img{i:09d}"


def measure_reads(path: Path) -> dict:
    """The reader's costs, in this (fresh) process."""
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    st = Store.open(path)
    open_s = time.perf_counter() - t0
    rss_open = _rss_mb()
    t0 = time.perf_counter()
    ids = st.ids
    ids_s = time.perf_counter() - t0
    rss_ids = _rss_mb()
    n = len(st)
    t0 = time.perf_counter()
    first = st.rows_of([_name(n // 2)])
    lookup1_s = time.perf_counter() - t0
    rss_lookup = _rss_mb()
    want = np.random.default_rng(1).choice(n, 1000, replace=False)
    t0 = time.perf_counter()
    got = st.rows_of([_name(int(i)) for i in want])
    lookup1000_s = time.perf_counter() - t0
    assert first[0] == n // 2 and (got == want).all(), "rows_of returned wrong rows"
    t0 = time.perf_counter()
    live = st.live
    live_s = time.perf_counter() - t0
    st.close()
    return {"open_s": round(open_s, 3), "rss_before_open_mb": round(rss0, 1), "rss_after_open_mb": round(rss_open, 1),
            "ids_s": round(ids_s, 2), "rss_after_ids_mb": round(rss_ids, 1), "ids_dtype": str(ids.dtype),
            "first_lookup_s": round(lookup1_s, 2), "rss_after_lookup_mb": round(rss_lookup, 1),
            "lookup_1000_ids_s": round(lookup1000_s, 3), "live_s": round(live_s, 3), "live_rows": int(live.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10M")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    ap.add_argument("--reads-only", default=None, help=argparse.SUPPRESS)  # the child process: measure this store
    a = ap.parse_args()
    if a.reads_only:
        print(json.dumps(measure_reads(Path(a.reads_only))))
        return
    n = parse_sizes(a.rows)[0]
    base = Path(tempfile.mkdtemp(prefix="visearch-open-", dir=a.dir))
    try:
        path = base / "store"
        st = Store.create(path, model="synthetic", config={}, dim=a.dim, weights_sha256=None)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        with StoreWriter(st) as w:
            for s in range(0, n, a.shard_rows):
                m = min(a.shard_rows, n - s)
                g = rng.standard_normal((m, a.dim), dtype=np.float32)
                w.append([_name(i) for i in range(s, s + m)], Features(g), fingerprints=["1:1"] * m)
        write_s = time.perf_counter() - t0
        out = {"rows": n, "dim": a.dim, "shards": len(w.store.shards), "write_s": round(write_s, 1),
               "manifest_bytes": (path / MANIFEST).stat().st_size}
        child = subprocess.run([sys.executable, __file__, "--reads-only", str(path)], check=True,
                               capture_output=True, text=True)
        out.update(json.loads(child.stdout))
        with StoreWriter(Store.open(path)) as w:
            g = rng.standard_normal((512, a.dim), dtype=np.float32)
            t0 = time.perf_counter()
            w.append([f"new{i}" for i in range(512)], Features(g), fingerprints=["1:1"] * 512)
            out["commit_512_rows_s"] = round(time.perf_counter() - t0, 3)
            out["manifest_bytes_after_commit"] = (path / MANIFEST).stat().st_size
            dead = np.linspace(0, n - 1, 1000).astype(np.int64)
            t0 = time.perf_counter()
            w.tombstone(dead)
            out["tombstone_1000_rows_s"] = round(time.perf_counter() - t0, 3)
            out["manifest_bytes_after_tombstone"] = (path / MANIFEST).stat().st_size
            t0 = time.perf_counter()
            w.tombstone(dead + 1)
            out["tombstone_1000_more_s"] = round(time.perf_counter() - t0, 3)
            out["manifest_bytes_after_2nd_tombstone"] = (path / MANIFEST).stat().st_size
            out["dead_row_files"] = len(list(path.glob("dead-*.npy")))
        print(json.dumps(out))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
