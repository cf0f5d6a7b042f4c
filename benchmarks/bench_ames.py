"""AMES figures: rerank time per query crop, extraction throughput (one pass vs two), bytes per image, and the
precision study (fp32 vs bf16 autocast: time, GFLOPS against a matrix-product ceiling measured in the same run, drift).

Random weights in the official formats (timings do not depend on the values). Usage:
    python benchmarks/bench_ames.py [--device cpu] [--threads 2] [--query-len 600] [--db-len 50] [--shortlist 100]
    python benchmarks/bench_ames.py --precision-only [--local-dim 768] [--db-len 600]   # fp32 vs bf16 only
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


def pair_gflop(lq: int, lt: int, dim: int = 128, ffn: int = 1024, layers: int = 5) -> float:
    """FLOP of one (query, database) pair as our implementation computes it (block attention: only allowed blocks;
    first-layer query self-attention shared across pairs and left out; last layer: cross-attention and FFN for the
    match token only). Multiply-add = 2 FLOP."""
    n = lq + lt + 1
    proj = 2 * dim * 3 * dim + 2 * dim * dim       # in_proj + out_proj per token, per attention
    ff = 2 * 2 * dim * ffn                         # linear1 + linear2 per token
    att = 2 * 2 * dim                              # QK^T and AV per (query row, key) pair
    total = 0.0
    for i in range(layers):
        sa_rows = n - (lq if i == 0 else 0)
        sa = sa_rows * proj + att * ((0 if i == 0 else lq * (lq + 1)) + lt * (lt + 1) + n)
        if i == layers - 1:
            ca = n * 2 * dim * 2 * dim + 2 * dim * dim + att * n + ff  # K, V of all rows; m's query, output, FFN
        else:
            ca = n * proj + att * (lq * (lt + 1) + lt * (lq + 1) + n) + n * ff
        total += sa + ca
    return total / 1e9


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    """Ceiling: best of `repeat` n x n x n matrix products in `dtype`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def bench_precision(args, device) -> dict:
    """fp32 vs bf16 autocast for one query crop against the shortlist: seconds, GFLOPS (vs the ceilings), and drift
    of bf16 from fp32 (max |d logit|, agreement of the reranked top-100, on synthetic descriptors)."""
    from visearch.device import cpu_has_bf16
    from visearch.rerankers.ames import combined_scores

    out: dict = {"cpu_bf16": cpu_has_bf16(), "ceiling_gflops": {"fp32": round(matmul_gflops(torch.float32), 1),
                                                                 "bf16": round(matmul_gflops(torch.bfloat16), 1)}}
    rs = np.random.RandomState(1)
    flop = pair_gflop(args.query_len, args.db_len) * args.shortlist
    out["gflop_per_crop"] = round(flop, 1)
    for variant in ("dist", "float"):
        model = AMES(variant, args.local_dim)
        model.load_state_dict(random_state(variant, 1, local_dim=args.local_dim))
        model.to(device)
        q = rs.standard_normal((1, args.query_len, args.local_dim)).astype(np.float32)
        qm = np.zeros((1, args.query_len), bool)
        d = rs.standard_normal((args.shortlist, args.db_len, args.local_dim)).astype(np.float32)
        # a few shorter sets (small database images): padding as in real stores
        dm = np.zeros((args.shortlist, args.db_len), bool)
        for i in range(0, args.shortlist, 7):
            dm[i, rs.randint(1, args.db_len):] = True
        q_tok = model.encode(q, qm, database=False)[0]
        d_tok = model.encode(d, dm, database=True)
        res = {}
        logits = {}
        for prec in ("fp32", "bf16"):
            model.set_precision(prec)
            model.score_tokens(q_tok, qm[0], d_tok[:2], dm[:2], args.batch_size)  # warm-up (kernels, caches)
            t = float("inf")
            for _ in range(args.repeat):  # best of `repeat` runs; the logits of the last one are compared
                synchronize(device)
                t0 = time.perf_counter()
                logits[prec] = model.score_tokens(q_tok, qm[0], d_tok, dm, args.batch_size)
                synchronize(device)
                t = min(t, time.perf_counter() - t0)
            res[prec] = {"seconds_per_crop": round(t, 3), "gflops": round(flop / t, 1),
                         "of_ceiling": round(flop / t / out["ceiling_gflops"][prec], 3)}
        res["speedup_bf16"] = round(res["fp32"]["seconds_per_crop"] / res["bf16"]["seconds_per_crop"], 2)
        dl = np.abs(logits["bf16"] - logits["fp32"])
        g = np.sort(rs.uniform(0.3, 0.8, args.shortlist))[::-1]
        lam, gamma = {"dist": (0.35, 0.10), "float": (0.50, 0.20)}[variant]
        order = {p: np.argsort(-combined_scores(g, logits[p], lam, gamma), kind="stable") for p in logits}
        res["drift"] = {"max_abs_logit": float(dl.max()), "median_abs_logit": float(np.median(dl)),
                        "logit_spread_fp32": float(logits["fp32"].std()),
                        "top100_same_order": bool((order["fp32"] == order["bf16"]).all()),
                        "top10_same_set": bool(set(order["fp32"][:10]) == set(order["bf16"][:10])),
                        "positions_changed": int((order["fp32"] != order["bf16"]).sum())}
        out[variant] = res
    model.set_precision("auto")
    out["auto_chooses"] = model.precision
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
    ap.add_argument("--local-dim", type=int, default=1024, help="1024 (CVNet AMES) or 768 (DINOv2 AMES)")
    ap.add_argument("--precision-only", action="store_true", help="only the fp32 vs bf16 study")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per precision (best is reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.precision_only:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                          "load_average": os.getloadavg()[0], "torch": torch.__version__,
                          "query_len": args.query_len, "db_len": args.db_len, "shortlist": args.shortlist,
                          "local_dim": args.local_dim, "precision": bench_precision(args, device)}, indent=1))
        return
    res = {"machine": platform.processor() or platform.machine(), "device": str(device), "threads": args.threads,
           "load_average": os.getloadavg()[0], "torch": torch.__version__,
           "bytes": bytes_per_image(args.topk), "rerank": bench_rerank(args, device)}
    if not args.skip_extract:
        res["extract"] = bench_extract(args, device)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
