"""The `lite` model's resize policy measured on benchmarks/photos (revisitop protocol, mAP Easy / Medium / Hard).

    python benchmarks/bench_lite_resize.py                         # builds the set in a temp dir, all policies
    python benchmarks/bench_lite_resize.py --set /tmp/photos_set --policies fixed320,cap640 --json out.json

Each policy is a [describe] override of visearch/config/models/lite.toml (same network, GeM, scales unless said): the
database images and the query crops (cropped to their bbx as `visearch eval` does) are described, the database is
ranked by cosine similarity for each query, and mAP is computed with visearch's revisitop evaluation. Also printed:
images/s of the database description (the machine's load shows in it; compare within one run).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES3 = [0.7071, 1.0, 1.4142]
POLICIES: dict[str, dict] = {
    # the policy before issue 10: every image and crop resized so its long side is 320 px (up or down)
    "fixed320": {"max_side": 320, "upscale": True, "scales": SCALES3},
    "fixed640": {"max_side": 640, "upscale": True, "scales": SCALES3},
    # native resolution, never upscaled, long side capped
    "cap320": {"max_side": 320, "upscale": False, "scales": SCALES3},
    "cap480": {"max_side": 480, "upscale": False, "scales": SCALES3},
    "cap640": {"max_side": 640, "upscale": False, "scales": SCALES3},
    "cap800": {"max_side": 800, "upscale": False, "scales": SCALES3},
    "cap1024": {"max_side": 1024, "upscale": False, "scales": SCALES3},
    "cap640-1scale": {"max_side": 640, "upscale": False, "scales": [1.0]},
    "cap640-down": {"max_side": 640, "upscale": False, "scales": [0.5, 0.7071, 1.0]},  # never above native
    "cap640-min224": {"max_side": 640, "upscale": False, "min_side": 224, "scales": SCALES3},
}


def prepare(set_dir: Path | None, work: Path) -> tuple[object, list, list]:
    """Build (if needed) and convert the set; returns (dataset, database arrays, query crop arrays)."""
    from visearch import api
    from visearch.data import load_dataset
    from visearch.images import crop_box, load_rgb

    if set_dir is None:
        sys.path.insert(0, str(ROOT / "benchmarks" / "photos"))
        from build import build

        set_dir = work / "set"
        build(set_dir)
    data = work / "data"
    api.convert(set_dir / "photos", "photos", data, ground_truth=set_dir / "gt.json")
    ds = load_dataset(data, "photos")
    opts = ds.load_options()
    db = [load_rgb(ds.image_path(i), **opts) for i in ds.imlist]
    queries = []
    for qi in range(len(ds.qimlist)):
        img = load_rgb(ds.query_path(qi), **opts)
        bbx = ds.gnd[qi].get("bbx")
        queries.append(crop_box(img, bbx) if bbx is not None else img)
    return ds, db, queries


def describe_sorted(model, images: list, batch: int = 8):
    """Describe images batched by equal size (as extract does); rows in the input order."""
    import numpy as np

    order = sorted(range(len(images)), key=lambda i: images[i].shape)
    out = np.zeros((len(images), model.dim), np.float32)
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        out[idx] = model.describe([images[i] for i in idx])
    return out


def measure(name: str, ds, db: list, queries: list, threads: int) -> dict:
    import numpy as np
    import torch

    from visearch import load_model
    from visearch.metrics import evaluate_protocols

    torch.set_num_threads(threads)
    model = load_model("lite", device="cpu", overrides={"describe": POLICIES[name]})
    t0 = time.perf_counter()
    X = describe_sorted(model, db)
    db_s = time.perf_counter() - t0
    Q = np.concatenate([model.describe([q]) for q in queries])
    ranks = np.argsort(-(X @ Q.T), axis=0, kind="stable")
    res = evaluate_protocols(ranks, ds.gnd)
    return {"policy": POLICIES[name], "map": {p: res[p]["map"] for p in ("easy", "medium", "hard")},
            "mp@1": {p: res[p]["mp@1"] for p in ("easy", "medium", "hard")},
            "db_images_per_s": round(len(db) / db_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, help="a folder written by benchmarks/photos/build.py [built in a temp dir]")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of: {', '.join(POLICIES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_path", help="also write the results as JSON")
    a = ap.parse_args()
    names = [p for p in a.policies.split(",") if p]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise SystemExit(f"error: unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
    results = {}
    with tempfile.TemporaryDirectory(prefix="visearch-photos-") as tmp:
        ds, db, queries = prepare(a.set, Path(tmp))
        print(f"benchmarks/photos: {len(db)} database images, {len(queries)} queries", file=sys.stderr)
        print(f"{'policy':<16} {'E':>6} {'M':>6} {'H':>6}   {'mP@1 E/M/H':<20} db img/s")
        for n in names:
            r = results[n] = measure(n, ds, db, queries, a.threads)
            m, p1 = r["map"], r["mp@1"]
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{n:<16} {fmt(m['easy']):>6} {fmt(m['medium']):>6} {fmt(m['hard']):>6}   "
                  f"{'/'.join(fmt(p1[p]) for p in ('easy', 'medium', 'hard')):<20} {r['db_images_per_s']}", flush=True)
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
