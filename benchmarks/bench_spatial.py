"""Spatial verification (lite-sv) against lite alone and SIFT + RANSAC alone, on a dataset with ground truth.

    python benchmarks/bench_spatial.py --synthetic /tmp/sv              # builds tests/spatial_scenes.py's set there
    python benchmarks/bench_spatial.py --data-dir /tmp/photos/data --dataset photos
    python benchmarks/bench_spatial.py --synthetic /tmp/sv --set model=homography --set ratio=0.8

Prints mAP Easy/Medium/Hard for `lite` (global), `lite-sv` (global shortlist + spatial reranking: 100 candidates for
a full-size crop, more for crops with fewer keypoints) and `sift-only` (RootSIFT + USAC inlier count against every
database image, no global stage), the rerank cost per query crop, for full-size crops and per pair (medians; 2
threads unless OMP_NUM_THREADS says otherwise) and the bytes per image of the lite-sv store.
`--set KEY=VALUE` overrides a [rerank] setting of lite-sv (no re-extraction needed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=Path, help="build the synthetic scene set under this folder and use it")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of lite-sv's [rerank]")
    ap.add_argument("--no-sift-only", action="store_true", help="skip the (slow) SIFT-only baseline")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from visearch import api
    from visearch.images import crop_box, load_rgb
    from visearch.metrics import evaluate_protocols
    from visearch.registry import load_model

    if args.synthetic:
        from tests.spatial_scenes import write_scene_set

        args.data_dir = args.data_dir or args.synthetic / "data"
        if not (args.data_dir / args.dataset).is_dir():
            gt = write_scene_set(args.synthetic / "photos", seed=0)
            api.convert(args.synthetic / "photos", args.dataset, args.data_dir, ground_truth=gt)
    if args.data_dir is None:
        ap.error("give --data-dir (and --dataset) or --synthetic")
    overrides = {"rerank": {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
                 "dataset": args.dataset, "overrides": overrides["rerank"]}
    for m in ("lite", "lite-sv"):
        t0 = time.perf_counter()
        r = api.extract(args.dataset, m, args.data_dir, device="cpu", workers=0)
        out.setdefault("extract_s", {})[m] = round(time.perf_counter() - t0, 2)
        print(f"extract {m}: {r.added} added in {r.seconds:.1f} s", file=sys.stderr)

    res = api.evaluate(args.dataset, "lite", args.data_dir, device="cpu", rerank=False)
    out["map"] = {"lite": {p: res["global"][p]["map"] for p in ("easy", "medium", "hard")}}
    describer = load_model("lite-sv", device="cpu", overrides=overrides)
    s = api.Searcher(args.dataset, "lite-sv", args.data_dir, device="cpu", describer=describer)
    res = api.evaluate(args.dataset, searcher=s)
    out["map"]["lite-sv"] = {p: res["reranked"][p]["map"] for p in ("easy", "medium", "hard")}
    out["map"]["lite-sv global"] = {p: res["global"][p]["map"] for p in ("easy", "medium", "hard")}

    # timing: one rerank of the top shortlist per query crop (store reads included)
    ds, rr = s.dataset, s.reranker
    from visearch.rerankers.spatial import unpack_local

    per_query, per_pair, cpu_query, sift_ranks, full_query, depths = [], [], [], [], [], []
    live = s.store.live_rows_by_id()
    all_rows = np.array([live[i] for i in ds.imlist], np.int64)
    row_to_pos = np.full(len(s.store), -1, np.int64)
    row_to_pos[all_rows] = np.arange(len(all_rows))
    for qi in range(len(ds.qimlist)):
        img = load_rgb(ds.query_path(qi), **ds.load_options())
        if ds.gnd[qi].get("bbx") is not None:
            img = crop_box(img, ds.gnd[qi]["bbx"])
        feats = s.describe_queries([img])
        rows, sims = s.search_features(feats, rr.shortlist_size, rerank=False)
        t0, c0 = time.perf_counter(), time.process_time()
        s.rerank_shortlist(feats, rows, sims)
        dt = time.perf_counter() - t0
        qd, qxy = unpack_local(feats.local["kp_desc"][0], feats.local["kp_xy"][0])
        depth = min(rr.depth(len(qd)), rows.shape[1])
        per_query.append(dt)
        cpu_query.append(time.process_time() - c0)
        per_pair.append(dt / max(1, depth))
        if len(qd) >= rr.keypoints:  # full-size crops verify exactly `shortlist` candidates: the worst case
            full_query.append(dt)
        depths.append(depth)
        if not args.no_sift_only:
            inl = np.concatenate([rr.verify(qd, qxy, **s.store.read_local(all_rows[a:a + 100]))
                                  for a in range(0, len(all_rows), 100)])
            sift_ranks.append(row_to_pos[all_rows[np.argsort(-inl, kind="stable")]])
    if sift_ranks:
        r = evaluate_protocols(np.stack(sift_ranks, 1), ds.gnd)
        out["map"]["sift-only"] = {p: r[p]["map"] for p in ("easy", "medium", "hard")}
    out["rerank_ms_per_query"] = {"median": round(1000 * statistics.median(per_query), 1),
                                  "p95": round(1000 * float(np.percentile(per_query, 95)), 1)}
    out["rerank_ms_per_pair"] = round(1000 * statistics.median(per_pair), 3)
    out["rerank_ms_full_crop"] = round(1000 * statistics.median(full_query), 1) if full_query else None
    out["depth"] = {"median": statistics.median(depths), "max": max(depths)}
    # CPU seconds of the process (all threads): on a shared machine, wall time / (CPU time / threads) is the slowdown
    out["rerank_cpu_ms_per_query"] = round(1000 * statistics.median(cpu_query), 1)
    nb = s.store.nbytes()
    n = s.store.num_live()
    out["bytes_per_image"] = {"global": round(nb["global"] / n), "local": round(nb["local"] / n),
                              "row": s.store.row_bytes()}
    print(f"{'':12s} {'easy':>7s} {'medium':>7s} {'hard':>7s}")
    for k, v in out["map"].items():
        print(f"{k:12s} " + " ".join(f"{(v[p] if v[p] is not None else float('nan')):7.2f}"
                                     for p in ("easy", "medium", "hard")))
    print(f"rerank per query crop (depth {rr.shortlist}..{rr.max_shortlist}, median {out['depth']['median']}): "
          f"median {out['rerank_ms_per_query']['median']} ms, p95 {out['rerank_ms_per_query']['p95']} ms; "
          f"full-size crops (top {rr.shortlist}): median {out['rerank_ms_full_crop']} ms; "
          f"per pair {out['rerank_ms_per_pair']} ms; CPU time per query {out['rerank_cpu_ms_per_query']} ms")
    print(f"bytes per image: {out['bytes_per_image']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
