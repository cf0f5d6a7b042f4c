"""Per-detector `detect` time for one 640x480 image (median of N runs after a warm-up), model load timed apart.

    python benchmarks/bench_detect.py [--repeats 20] [--threads 2] [--device cpu] [--weights-dir weights]

Detectors: `none`, `tiles`, `gdino` and, when a token is configured (VISEARCH_GDINO_TOKEN), `gdino-cloud`.
When `<weights_dir>/grounding-dino-tiny` is absent, `gdino` runs on the tiny RANDOM model of tests/gdino_tiny.py
(a few hundred thousand parameters, 128-192 px input): its time shows the pipeline overhead only and is NOT
representative of the real 172 M-parameter model (12-17 s per 800x1200 image on two CPU cores).
Prints one JSON object per detector.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _image() -> np.ndarray:
    """A deterministic 640x480 test image: smooth background with a few coloured rectangles."""
    rng = np.random.default_rng(0)
    img = np.zeros((480, 640, 3), np.uint8)
    img[..., 0] = np.linspace(30, 200, 640, dtype=np.uint8)[None]
    img[..., 1] = np.linspace(60, 160, 480, dtype=np.uint8)[:, None]
    for _ in range(6):
        x, y = rng.integers(0, 560), rng.integers(0, 400)
        img[y:y + 80, x:x + 80] = rng.integers(0, 256, 3)
    return img


def _time(det, img: np.ndarray, prompt: str | None, repeats: int) -> list[float]:
    det.detect(img, prompt)  # warm-up: first-call allocations, lazy imports
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        det.detect(img, prompt)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default=os.environ.get("VISEARCH_WEIGHTS_DIR", "weights"))
    ap.add_argument("--prompt", default="clothes . bag")
    ap.add_argument("--only", nargs="*", help="detector names to run")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from visearch.detectors.grounding_dino import available
    from visearch.registry import load_detector

    img = _image()
    names = args.only or ["none", "tiles", "gdino"] + (["gdino-cloud"] if os.environ.get("VISEARCH_GDINO_TOKEN")
                                                       else [])
    tmp = tempfile.TemporaryDirectory()
    for name in names:
        options: dict = {}
        note = ""
        if name == "gdino":
            options["device"] = args.device
            if available(args.weights_dir):
                options["weights_dir"] = args.weights_dir
                note = "real grounding-dino-tiny weights"
            else:
                from tests.gdino_tiny import build_tiny_gdino

                options["path"] = build_tiny_gdino(Path(tmp.name) / "grounding-dino-tiny")
                note = "TINY RANDOM model (no weights found): pipeline overhead only, not representative"
        t = time.perf_counter()
        det = load_detector(name, **options)
        load_s = time.perf_counter() - t
        times = _time(det, img, args.prompt, args.repeats if name != "gdino-cloud" else min(args.repeats, 5))
        boxes = det.detect(img, args.prompt)
        print(json.dumps({"detector": name, "image": "640x480", "device": args.device if name == "gdino" else "cpu",
                          "threads": args.threads, "load_s": round(load_s, 3),
                          "detect_median_ms": round(1000 * statistics.median(times), 2),
                          "detect_min_ms": round(1000 * min(times), 2), "repeats": len(times),
                          "boxes": len(boxes), "note": note}), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
