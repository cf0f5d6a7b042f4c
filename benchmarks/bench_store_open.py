"""Store.open time and RSS for a large global-only store (issue 14, part 4).

    python benchmarks/bench_store_open.py --rows 10M --dim 16          # 10 M rows in 65,536-row shards

The rows' descriptors are tiny (--dim) so that 10 M rows fit on a small disk: what is measured is the per-row
bookkeeping (manifest, shard files, ids), which does not depend on the dimension. Prints one JSON object: write time,
Store.open seconds, RSS after open, seconds and RSS after the first `ids` access and after `live`.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visearch.bench import parse_sizes  # noqa: E402
from visearch.models.base import Features  # noqa: E402
from visearch.store import Store, StoreWriter  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10M")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    a = ap.parse_args()
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
                w.append([f"img{i:09d}" for i in range(s, s + m)], Features(g), fingerprints=["1:1"] * m)
        write_s = time.perf_counter() - t0
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        st = Store.open(path)
        open_s = time.perf_counter() - t0
        rss_open = _rss_mb()
        t0 = time.perf_counter()
        ids = st.ids
        ids_s = time.perf_counter() - t0
        rss_ids = _rss_mb()
        t0 = time.perf_counter()
        live = st.live
        live_s = time.perf_counter() - t0
        out = {"rows": n, "dim": a.dim, "shards": len(st.shards), "write_s": round(write_s, 1),
               "manifest_bytes": (path / "manifest.json").stat().st_size, "open_s": round(open_s, 3),
               "rss_before_open_mb": round(rss0, 1), "rss_after_open_mb": round(rss_open, 1),
               "ids_s": round(ids_s, 2), "rss_after_ids_mb": round(rss_ids, 1), "ids_type": type(ids).__name__,
               "live_s": round(live_s, 3), "live_rows": int(live.sum())}
        st.close()
        print(json.dumps(out))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
