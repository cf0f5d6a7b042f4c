"""Foundation figures on the demo collection: extraction images/s, per-query latency (median over >= 20 warm
queries, per stage) and CLI start-up time (`visearch --help`, median of 10 runs).

    python benchmarks/bench_foundation.py                  # builds the demo in a temp dir unless demo/data has it
    python benchmarks/bench_foundation.py --data-dir demo/data --json foundation.json

The demo collection is benchmarks/make_demo.py's (`make demo`): 14 of scikit-image's bundled photos and 12 rescaled
or cropped query copies, each query's source as its positive.

Then mAP Easy / Medium / Hard (revisitop protocol, global and reranked) of every model on benchmarks/photos (the
real-photo set of benchmarks/photos/build.py, built in a temp dir; needs `apt-get install opencv-doc
visp-images-data`); a model whose weights are not in the weights dir is listed as skipped.

    python benchmarks/bench_foundation.py --photos-models lite,superglobal-r101 --photos-set /tmp/photos_set
    python benchmarks/bench_foundation.py --no-photos
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_demo(root: Path) -> Path:
    """Write the demo collection (benchmarks/make_demo.py) under root and convert it to dataset `demo`; returns the
    data dir."""
    from make_demo import build

    from visearch import api

    build(root)
    data = root / "data"
    api.convert(root / "photos", "demo", data, ground_truth=root / "ground_truth.json")
    return data


def cli_startup_s(runs: int = 10) -> tuple[float, list[float]]:
    """Median wall time of `visearch --help` (the console script beside this Python, else `python -m`)."""
    script = Path(sys.executable).parent / "visearch"
    cmd = [str(script), "--help"] if script.exists() else [sys.executable, "-m", "visearch.cli", "--help"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up: page cache, .pyc files
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, help="a data dir holding dataset `demo` [demo/data if present]")
    ap.add_argument("--queries", type=int, default=24, help="timed queries (>= 20), after 2 warm-up queries")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (this machine: 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", dest="json_path", help="also write the full bench result as JSON")
    ap.add_argument("--photos-models", default=",".join(PHOTOS_MODELS),
                    help="models evaluated on benchmarks/photos [%(default)s]")
    ap.add_argument("--photos-set", type=Path, help="a folder written by benchmarks/photos/build.py [built here]")
    ap.add_argument("--no-photos", action="store_true", help="skip the benchmarks/photos evaluation")
    a = ap.parse_args()

    from rich.console import Console

    from visearch import bench

    console = Console(width=140)
    with tempfile.TemporaryDirectory(prefix="visearch-demo-") as tmp:
        data = a.data_dir
        if data is None and (ROOT / "demo" / "data" / "demo" / "gnd_demo.pkl").is_file():
            data = ROOT / "demo" / "data"
        if data is None:
            data = build_demo(Path(tmp))
        os.environ.setdefault("VISEARCH_DATA_DIR", str(data))
        res = bench.run("demo", ["lite"], data_dir=data, device=a.device, queries=max(20, a.queries), warmup=2,
                        sample=64, threads=a.threads)
    startup, runs = cli_startup_s(10)
    res["cli_startup_s"] = {"median": round(startup, 4), "runs": [round(t, 4) for t in runs]}
    lite = res["models"]["lite"]
    q = lite["query_ms"]
    for t in bench.tables(res):
        console.print(t)
    console.print(f"extraction: {lite['extract_images_per_s']:.2f} images/s "
                  f"({lite['extract_sample']['images']} images, warm-up excluded)")
    console.print(f"query latency: median {q['total']['median']:.1f} ms, p95 {q['total']['p95']:.1f} ms over "
                  f"{lite['queries']['n']} warm queries ({lite['queries']['crops_per_query']:.0f} crop each)")
    console.print(f"CLI start-up (`visearch --help`): median {startup * 1000:.0f} ms over 10 runs")
    if not a.no_photos:
        res["photos"] = photos_maps([m for m in a.photos_models.split(",") if m], a.photos_set, a.device, a.threads,
                                    console)
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(res, indent=1) + "\n")


PHOTOS_MODELS = ("lite", "superglobal-r50", "superglobal-r101", "ames-dist", "ames-float")


def photos_maps(models: list[str], set_dir: Path | None, device: str, threads: int, console) -> dict:
    """Build and convert benchmarks/photos, then bench.run each model on it (extract + eval; per-query latency over
    a few queries only). Returns bench.run's result, or {"skipped": reason} when the set's sources are missing."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "photos"))
    import build as photos_build

    from visearch import api, bench

    with tempfile.TemporaryDirectory(prefix="visearch-photos-") as tmp:
        try:
            if set_dir is None:
                set_dir = Path(tmp) / "set"
                photos_build.build(set_dir)
            else:
                photos_build.check_sources()
        except photos_build.SourceMissing as e:
            console.print(f"benchmarks/photos skipped: {e}")
            return {"skipped": str(e)}
        data = Path(tmp) / "data"
        api.convert(set_dir / "photos", "photos", data, ground_truth=set_dir / "gt.json")
        res = bench.run("photos", models, data_dir=data, device=device, queries=4, warmup=1, sample=16,
                        threads=threads)
    console.print(f"benchmarks/photos: {res['dataset_info']['images']} database images, "
                  f"{res['dataset_info']['queries']} queries; mAP (%) per model, revisitop protocol")
    for name, r in res["models"].items():
        if "skipped" in r:
            console.print(f"  {name}: skipped ({r['skipped']})")
            continue
        for kind in ("global", "reranked"):
            m = (r.get("map") or {}).get(kind)
            if m:
                console.print(f"  {name} [{kind}]: " + "  ".join(
                    f"{p} {'-' if m[p] is None else format(m[p], '.2f')}" for p in ("easy", "medium", "hard")))
    return res


if __name__ == "__main__":
    main()
