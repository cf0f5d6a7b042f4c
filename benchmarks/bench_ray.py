"""`extract` throughput on one machine: the local engine against the ray engine (issue 14.3), same collection, model.

    python benchmarks/bench_ray.py                              # benchmarks/photos (built in a temp dir), lite
    python benchmarks/bench_ray.py --set /tmp/photos --model lite --threads 1,2 --workers 1,2 --json out.json

For each torch thread count: one `extract --rebuild` with the local engine, then with the ray engine for each actor
count, on a Ray instance started once beforehand (its start-up is timed and printed apart, as it would be paid once
per CLI run). images/s = images described / seconds of the whole extract call (model loading, and for ray the actors'
start-up and model loading, included). Each ray store is checked against the local one (ids and descriptor bytes).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _machine() -> str:
    from visearch.bench import machine_info

    m = machine_info()
    return f"{m['cpu']}, {m['cores_logical']} CPUs, load average {os.getloadavg()[0]:.2f} at start"


def _snapshot(path: Path) -> tuple[list[str], bytes]:
    import numpy as np

    from visearch.store import Store

    with Store.open(path) as s:
        return list(s.ids), s.read_global(np.arange(len(s))).tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", type=Path, help="a built benchmarks/photos folder (default: build one in a temp dir)")
    ap.add_argument("--model", default="lite")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure (comma separated)")
    ap.add_argument("--workers", default="1,2", help="ray actor counts to measure (comma separated)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import ray
    import torch

    from visearch import api
    from visearch.pipeline.extract import LocalEngine

    work = Path(tempfile.mkdtemp(prefix="bench_ray."))
    try:
        set_dir = args.set
        if set_dir is None:
            sys.path.insert(0, str(ROOT / "benchmarks" / "photos"))
            from build import build

            set_dir = work / "set"
            build(set_dir)
        local, remote = work / "local", work / "ray"
        api.convert(set_dir / "photos", "photos", local, ground_truth=set_dir / "gt.json")
        shutil.copytree(local, remote)
        print(f"machine: {_machine()}; model {args.model}, batch size {args.batch_size}")
        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR)
        print(f"ray.init (local instance, {os.cpu_count()} CPUs): {time.perf_counter() - t:.1f} s")
        rows = []
        for threads in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(threads)
            ws = api.Workspace.resolve(local, ROOT / "weights", "cpu")
            r = api.extract("photos", args.model, batch_size=args.batch_size, rebuild=True, workspace=ws,
                            engine=LocalEngine())
            reference = _snapshot(r.store)
            rows.append({"engine": "local", "threads": threads, "actors": None, "images": r.added,
                         "seconds": round(r.seconds, 2), "images_per_s": round(r.images_per_s, 2)})
            print(f"local  threads {threads}          : {r.added} images in {r.seconds:6.1f} s = "
                  f"{r.images_per_s:5.1f} img/s")
            for actors in [int(x) for x in args.workers.split(",")]:
                r = api.extract("photos", args.model, batch_size=args.batch_size, rebuild=True,
                                workspace=ws.with_(data_dir=remote), engine=api.RayEngine(num_workers=actors))
                same = _snapshot(r.store) == reference
                rows.append({"engine": "ray", "threads": threads, "actors": actors, "images": r.added,
                             "seconds": round(r.seconds, 2), "images_per_s": round(r.images_per_s, 2),
                             "identical_to_local": same})
                print(f"ray    threads {threads}, {actors} actor(s): {r.added} images in {r.seconds:6.1f} s = "
                      f"{r.images_per_s:5.1f} img/s (store identical to local: {same})")
        ray.shutdown()
        if args.json:
            args.json.write_text(json.dumps({"machine": _machine(), "model": args.model, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
