"""AMES figures: rerank time per query crop, extraction throughput (one pass vs two), bytes per image.

Random weights in the official formats (timings do not depend on the values). Usage:
    python benchmarks/bench_ames.py [--device cpu] [--threads 2] [--query-len 600] [--db-len 50] [--shortlist 100]
Prints one JSON object. The "full database" figure extrapolates from `--full-sample` pairs to 8,000 images.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "models"))

from visearch.device import resolve_device, synchronize  # noqa: E402
from visearch.models.nets.ames_transformer import AMES, random_state  # noqa: E402


def _timed(fn, device, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_rerank(args, device) -> dict:
    """Per query crop: AMES over the shortlist from stored tokens (query tokens encoded once)."""
    out = {}
    rs = np.random.RandomState(0)
    for variant in ("dist", "float"):
        model = AMES(variant)
        model.load_state_dict(random_state(variant, 1))
        model.to(device)
        q = rs.standard_normal((1, args.query_len, 1024)).astype(np.float32)
        qm = np.zeros((1, args.query_len), bool)
        d = rs.standard_normal((args.shortlist, args.db_len, 1024)).astype(np.float32)
        dm = np.zeros((args.shortlist, args.db_len), bool)
        q_tok = model.encode(q, qm, database=False)[0]
        d_tok = model.encode(d, dm, database=True)
        t_short = _timed(lambda: model.score_tokens(q_tok, qm[0], d_tok, dm, args.batch_size), device, 2)
        n = args.full_sample
        d_full = np.concatenate([d_tok] * int(np.ceil(n / args.shortlist)))[:n]
        t_sample = _timed(lambda: model.score_tokens(q_tok, qm[0], d_full, np.zeros(d_full.shape[:2], bool),
                                                     args.batch_size), device, 1)
        t_8000 = t_sample / n * 8000
        out[variant] = {"shortlist": args.shortlist, "query_len": args.query_len, "db_len": args.db_len,
                        "seconds_per_query_shortlist": round(t_short, 3),
                        "seconds_per_query_8000_images": round(t_8000, 1),
                        "ratio_8000_over_shortlist": round(t_8000 / t_short, 1)}
    return out


def bench_extract(args, device) -> dict:
    """Images/s of global + local in one pass (decode once, two forward passes) vs two separate passes."""
    import test_ames as T

    from visearch.images import load_rgb
    from visearch.registry import load_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_ames_"))
    wd = T.make_weights_dir(tmp / "w")
    describer = load_model("ames-dist", weights_dir=wd, device=str(device))
    rs = np.random.RandomState(0)
    import cv2

    paths = []
    for i in range(args.images):
        im = cv2.resize(T.make_images()[i % 2], (args.side, args.side * 3 // 4), interpolation=cv2.INTER_LINEAR)
        im = np.clip(im.astype(np.int16) + rs.randint(-5, 6, im.shape), 0, 255).astype(np.uint8)
        p = tmp / f"im{i}.jpg"
        cv2.imwrite(str(p), im)
        paths.append(p)

    def one_pass():
        for p in paths:
            describer.extract([load_rgb(p)])

    def two_passes():
        for p in paths:  # as the prototype: a global run, then a separate local run, each decoding the file
            describer.global_model.extract([load_rgb(p)])
        for p in paths:
            loc = describer.describe_local([load_rgb(p)])[0]
            describer.ames.encode(loc["descriptors"][None], loc["mask"][None], database=True)

    one_pass()  # warm-up
    t1 = _timed(one_pass, device, 1)
    t2 = _timed(two_passes, device, 1)
    return {"images": args.images, "size": f"{args.side}x{args.side * 3 // 4}",
            "one_pass_images_per_s": round(args.images / t1, 2), "two_passes_images_per_s": round(args.images / t2, 2)}


def bytes_per_image(topk: int) -> dict:
    """Stored local bytes per image (payload) and the 8,000-image projection; the reference stored float32 rows."""
    out = {}
    for variant, per_local in (("dist", 16), ("float", 256)):
        b = topk * per_local + topk  # tokens + bool mask
        out[variant] = {"bytes_per_image": b, "mb_for_8000_images": round(b * 8000 / 1e6, 1)}
    ref = topk * (1024 + 5) * 4
    out["reference_float32"] = {"bytes_per_image": ref, "gb_for_8000_images": round(ref * 8000 / 1e9, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--query-len", type=int, default=600)
    ap.add_argument("--db-len", type=int, default=50)
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--full-sample", type=int, default=400, help="pairs timed to extrapolate to 8,000 images")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--topk", type=int, default=700)
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    res = {"machine": platform.processor() or platform.machine(), "device": str(device), "threads": args.threads,
           "load_average": os.getloadavg()[0], "torch": torch.__version__,
           "bytes": bytes_per_image(args.topk), "rerank": bench_rerank(args, device)}
    if not args.skip_extract:
        res["extract"] = bench_extract(args, device)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
