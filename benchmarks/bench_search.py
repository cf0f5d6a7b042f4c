"""Streamed exact search: the current visearch.search against an earlier implementation file, same data, one run.

    python benchmarks/bench_search.py [--old path/to/old_search.py] [--rows 131072] [--dim 2048] [--queries 6]
Prints the median of 5 calls of topk_stream (top-100) for each implementation.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import numpy as np
import torch

from visearch.search import topk_stream


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_search", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.topk_stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="an earlier search.py to compare against")
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x = np.random.default_rng(0).standard_normal((a.rows, a.dim)).astype(np.float16)
    q = np.random.default_rng(1).standard_normal((a.queries, a.dim)).astype(np.float32)

    def blocks():
        for s in range(0, a.rows, a.chunk):
            yield s, x[s:s + a.chunk]

    impls = {"current": topk_stream}
    if a.old:
        impls["old"] = _load(a.old)
    times: dict[str, list[float]] = {k: [] for k in impls}
    results = {}
    for _ in range(5):  # interleaved, so load changes hit both alike
        for name, fn in impls.items():
            t = time.perf_counter()
            results[name] = fn(q, blocks(), 100)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:8s} median {statistics.median(ts) * 1000:8.1f} ms  ({a.rows} x {a.dim} fp16, {a.queries} queries)")
    if "old" in results:
        same = np.array_equal(results["old"][0], results["current"][0])
        print(f"ratio old/current {statistics.median(times['old']) / statistics.median(times['current']):.2f}x; "
              f"identical rows: {same}")


if __name__ == "__main__":
    main()
