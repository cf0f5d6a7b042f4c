"""The `lite` model's resize policy measured on benchmarks/photos (revisitop protocol, mAP Easy / Medium / Hard).

    python benchmarks/bench_lite_resize.py                         # builds the set in a temp dir, all policies
    python benchmarks/bench_lite_resize.py --set /tmp/photos_set --policies fixed320,cap640 --json out.json

Each policy is a [describe] override of visearch/config/models/lite.toml (same network, GeM, scales unless said): the
database images and the query crops (cropped to their bbx as `visearch eval` does) are described, the database is
ranked by cosine similarity for each query, and mAP is computed with visearch's revisitop evaluation. Each scale's
GeM term is cached by its input size, so policies that share sizes compute them once (spot-checked against
`describe`). Also printed: seconds spent on the new database terms of each policy (its extraction cost beyond the
earlier policies').
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


CACHE: dict[tuple[str, int, tuple[int, int]], object] = {}  # (db|q, image index, network input size) -> [1280]
IMAGES: dict[str, list] = {}  # "db" / "q" -> decoded arrays (inherited by forked workers)
_WORKER: dict[str, object] = {}


def _init_worker() -> None:
    import torch

    from visearch import load_model

    torch.set_num_threads(1)
    _WORKER["model"] = load_model("lite", device="cpu")  # describe_at depends on the input size only


def _term(key: tuple[str, int, tuple[int, int]]):
    import torch

    tag, i, size = key
    m = _WORKER["model"]
    with torch.inference_mode():
        return key, m.describe_at(m._to_tensor([IMAGES[tag][i]]), size)[0].numpy()


def describe_cached(model, tag: str, workers: int = 1) -> tuple[object, float]:
    """LiteDescriber.extract's computation (sum of the per-scale L2-normalised GeM terms, then L2-normalised), each
    scale's term cached by its input size so policies sharing a size compute it once; new terms computed in
    `workers` processes of one thread each when > 1. Returns (descriptors [N, 1280], seconds spent on new terms)."""
    import multiprocessing as mp

    import numpy as np

    images = IMAGES[tag]
    sizes = [model.scale_sizes(*im.shape[:2]) for im in images]
    todo = [(tag, i, sz) for i, ss in enumerate(sizes) for sz in ss if (tag, i, sz) not in CACHE]
    t0 = time.perf_counter()
    if todo and workers > 1:
        todo.sort(key=lambda k: -k[2][0] * k[2][1])  # largest first: even finish
        with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            for key, v in pool.imap_unordered(_term, todo, chunksize=1):
                CACHE[key] = v
    elif todo:
        _WORKER["model"] = model
        for key in todo:
            CACHE[key] = _term(key)[1]
    spent = time.perf_counter() - t0
    out = np.zeros((len(images), model.dim), np.float32)
    for i, ss in enumerate(sizes):
        d = np.sum([CACHE[(tag, i, sz)] for sz in ss], axis=0, dtype=np.float32)
        out[i] = d / np.linalg.norm(d)
    return out, spent


def measure(name: str, ds, db: list, queries: list, threads: int, workers: int = 1) -> dict:
    import numpy as np
    import torch

    from visearch import load_model
    from visearch.metrics import evaluate_protocols

    torch.set_num_threads(threads)
    model = load_model("lite", device="cpu", overrides={"describe": POLICIES[name]})
    IMAGES.update(db=db, q=queries)
    X, db_s = describe_cached(model, "db", workers)
    Q, _ = describe_cached(model, "q", workers)
    # the cached path is the model's own: spot-check it against describe() (the code extract and eval run)
    for i in (0, len(db) // 2, len(db) - 1):
        assert np.abs(model.describe([db[i]]) - X[i]).max() < 1e-4, f"{name}: cached descriptor differs"
    ranks = np.argsort(-(X @ Q.T), axis=0, kind="stable")
    res = evaluate_protocols(ranks, ds.gnd)
    return {"policy": POLICIES[name], "map": {p: res[p]["map"] for p in ("easy", "medium", "hard")},
            "mp@1": {p: res[p]["mp@1"] for p in ("easy", "medium", "hard")},
            "db_new_terms_s": round(db_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, help="a folder written by benchmarks/photos/build.py [built in a temp dir]")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of: {', '.join(POLICIES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes (one thread each) computing the new terms; > 1 beats threads on a loaded machine")
    ap.add_argument("--json", dest="json_path", help="also write the results as JSON")
    ap.add_argument("--cache", type=Path, help="a .pkl of computed terms, read at start and written after each policy "
                    "(only for the same --set; lets a cut run resume)")
    a = ap.parse_args()
    names = [p for p in a.policies.split(",") if p]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise SystemExit(f"error: unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
    results = {}
    with tempfile.TemporaryDirectory(prefix="visearch-photos-") as tmp:
        ds, db, queries = prepare(a.set, Path(tmp))
        print(f"benchmarks/photos: {len(db)} database images, {len(queries)} queries", file=sys.stderr)
        print(f"{'policy':<16} {'E':>6} {'M':>6} {'H':>6}   {'mP@1 E/M/H':<20} new db terms s")
        if a.cache and a.cache.is_file():
            import pickle

            CACHE.update(pickle.loads(a.cache.read_bytes()))  # our own file, written below
        for n in names:
            r = results[n] = measure(n, ds, db, queries, a.threads, a.workers)
            if a.cache:
                import pickle

                a.cache.write_bytes(pickle.dumps(CACHE))
            m, p1 = r["map"], r["mp@1"]
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{n:<16} {fmt(m['easy']):>6} {fmt(m['medium']):>6} {fmt(m['hard']):>6}   "
                  f"{'/'.join(fmt(p1[p]) for p in ('easy', 'medium', 'hard')):<20} {r['db_new_terms_s']}", flush=True)
            if a.json_path:  # after each policy, so a run cut short keeps what it measured
                Path(a.json_path).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
