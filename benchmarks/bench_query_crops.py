"""Per-query cost of detect + describe + search for each weight-free detector, with the crops of a query described
in one batch (as `query` does) and one by one, `lite` model, on the demo collection (built in a temp dir).

    python benchmarks/bench_query_crops.py [--queries 20] [--threads 2]
Prints medians in ms per query and the batched / one-by-one ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    from benchmarks.make_demo import build
    from visearch import api
    from visearch.detectors.base import crop, select_crops
    from visearch.images import load_rgb

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        data = root / "data"
        api.convert(root / "photos", "demo", data, ground_truth=root / "ground_truth.json")
        api.extract("demo", "lite", data, device="cpu")
        queries = sorted((root / "photos" / "queries").glob("*.jpg"))
        print(f"{len(queries)} distinct queries, {a.queries} timed per setting, {a.threads} threads, lite, CPU")
        for det in ("none", "tiles"):
            s = api.Searcher("demo", "lite", data, device="cpu", detector=det)
            imgs = [load_rgb(q) for q in queries]
            for img in imgs[:2]:  # warm-up
                s.query(img)
            times: dict[str, list[float]] = {"batched": [], "one by one": []}
            n_crops = 0
            for i in range(a.queries):
                img = imgs[i % len(imgs)]
                for mode in times:
                    t0 = time.perf_counter()
                    boxes = s.detector.detect(img, None) if det != "none" else []
                    crops = [crop(img, b) for b in select_crops(boxes, (img.shape[1], img.shape[0]))]
                    if mode == "batched":
                        feats = s.describe_queries(crops)
                    else:
                        parts = [s.describe_queries([c]) for c in crops]
                        feats = type(parts[0])(torch.cat([torch.from_numpy(p.global_) for p in parts]).numpy())
                    s.search_features(feats, 5)
                    times[mode].append(time.perf_counter() - t0)
                n_crops = len(crops)
            b, o = (statistics.median(times[m]) * 1000 for m in ("batched", "one by one"))
            print(f"{det:6s} {n_crops:2d} crops/query: batched {b:8.1f} ms, one by one {o:8.1f} ms, "
                  f"ratio {o / b:.2f}x")


if __name__ == "__main__":
    main()
