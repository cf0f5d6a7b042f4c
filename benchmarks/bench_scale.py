"""Exact search cost against collection size on synthetic descriptors (`visearch bench scale` as a script).

    python benchmarks/bench_scale.py                       # 10k, 100k, 1M x 2048 float16, 6 query crops, CPU
    python benchmarks/bench_scale.py --sizes 10k,100k --json scale.json

10k and 100k rows are distinct random unit vectors held in memory, and are also searched through a real sharded HDF5
store; 1M streams one 65,536-row block 16 times (same arithmetic and memory traffic per row, without 4 GB of RAM or
disk). FAISS IndexFlatIP (float32, exact) runs where its index fits --faiss-max-gb, FAISS
IndexScalarQuantizer(QT_fp16) on the same float16 rows where they are held in memory, and a plain memory copy of the
same blocks gives the bandwidth to compare with. See visearch/bench.py:scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visearch import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10k,100k,1M")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=6, help="query crops searched together")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS threads (this machine: 2 cores)")
    ap.add_argument("--faiss-max-gb", type=float, default=2.0)
    ap.add_argument("--json", dest="json_path", help="also write the result as JSON")
    a = ap.parse_args()
    res = bench.scale(bench.parse_sizes(a.sizes), dim=a.dim, nq=a.queries, k=a.top_k, reps=a.reps, device=a.device,
                      faiss_max_gb=a.faiss_max_gb, threads=a.threads)
    from rich.console import Console

    Console(width=200).print(bench.scale_table(res))
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
