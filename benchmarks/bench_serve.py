"""`visearch serve` under load: p50/p95 latency and throughput for 1, 4 and 16 concurrent clients, and the warm
server's per-query time against a cold `visearch query` process (model load included: the ratio is the point).

    python benchmarks/bench_serve.py --data-dir demo/data --dataset demo --model lite
    python benchmarks/bench_serve.py --data-dir demo/data --dataset demo --requests 48 --clients 1,4,16 --json out.json

Query photos: --queries FOLDER (default: the dataset's query images, else its database images). The server runs as
a real subprocess (`python -m visearch.cli serve`) on a free loopback port; clients are threads posting multipart
uploads with requests. Latency is client-side wall time per request; throughput is requests / wall time of a level.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_images(args) -> list[Path]:
    if args.queries:
        files = sorted(p for p in Path(args.queries).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    else:
        from visearch.data import load_dataset

        ds = load_dataset(args.data_dir, args.dataset)
        ids = ds.qimlist or ds.imlist
        files = [ds.images_dir / f"{i}.jpg" for i in ids]
    if not files:
        sys.exit("no query images found")
    return files


def base_cmd(args) -> list[str]:
    cmd = [sys.executable, "-m", "visearch.cli", "-q"]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    return cmd


def run_level(url: str, photos: list[bytes], clients: int, n: int, top_k: int) -> dict:
    lat: list[float] = []
    server: list[float] = []
    overhead: list[float] = []
    lock = threading.Lock()
    session_local = threading.local()

    def one(i: int) -> int:
        s = getattr(session_local, "s", None) or requests.Session()
        session_local.s = s
        t0 = time.perf_counter()
        r = s.post(url + "/api/query", files={"image": (f"q{i}.jpg", photos[i % len(photos)], "image/jpeg")},
                   data={"top_k": str(top_k)}, timeout=600)
        dt = time.perf_counter() - t0
        with lock:
            lat.append(dt)
            if r.status_code == 200:  # what the server spent on the query itself (queue wait + decode ... search)
                tm = r.json()["timings_ms"]
                server.append(tm["total"] / 1000)
                overhead.append(dt - (tm["total"] + tm.get("queue", 0.0)) / 1000)
        return r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        codes = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": n, "ok": codes.count(200), "p50_ms": 1000 * pct(lat, 50),
            "p95_ms": 1000 * pct(lat, 95), "mean_ms": 1000 * statistics.fmean(lat), "throughput_qps": n / wall,
            "wall_s": wall, "server_total_p50_ms": 1000 * pct(server, 50) if server else None,
            "http_overhead_p50_ms": 1000 * pct(overhead, 50) if overhead else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("VISEARCH_DATA_DIR", "data"))
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--model", default="lite")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", help="folder of query photos")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--warmup", type=int, default=6, help="untimed requests first (torch warms up)")
    ap.add_argument("--cold-runs", type=int, default=3, help="cold `visearch query` processes to time")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="server --workers")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()

    files = query_images(args)
    photos = [f.read_bytes() for f in files]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    t_start = time.perf_counter()
    server = subprocess.Popen(base_cmd(args) + ["serve", "--dataset", args.dataset, "--model", args.model,
                                                "--device", args.device, "--port", str(port),
                                                "--workers", str(args.workers), "--max-pending", "256"],
                              stdout=subprocess.DEVNULL, stderr=log)
    try:
        while True:
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"server exited: {log.read().decode(errors='replace')}")
            try:
                if requests.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        startup_s = time.perf_counter() - t_start
        run_level(url, photos, 1, args.warmup, args.top_k)
        levels = [run_level(url, photos, int(c), args.requests, args.top_k) for c in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(60)
    cold = []
    for i in range(args.cold_runs):
        q = files[i % len(files)]
        t0 = time.perf_counter()
        subprocess.run(base_cmd(args) + ["query", str(q), "--dataset", args.dataset, "--model", args.model,
                                         "--device", args.device, "--top-k", str(args.top_k), "--json"],
                       check=True, stdout=subprocess.DEVNULL)
        cold.append(time.perf_counter() - t0)
    cold_ms = 1000 * statistics.median(cold)
    warm_ms = levels[0]["p50_ms"]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "load_avg_1m": load},
           "dataset": args.dataset, "model": args.model, "device": args.device, "workers": args.workers,
           "query_images": len(files), "server_startup_s": startup_s, "levels": levels,
           "warm_query_ms_p50": warm_ms, "warm_server_total_ms_p50": levels[0]["server_total_p50_ms"],
           "http_overhead_ms_p50": levels[0]["http_overhead_p50_ms"],
           "cold_query_process_ms_median": cold_ms, "cold_over_warm": cold_ms / warm_ms}
    print(f"{args.dataset} [{args.model}] on {args.device}, server --workers {args.workers}, "
          f"{len(files)} query photos, top-k {args.top_k}; server start-up {startup_s:.1f} s")
    print(f"{'clients':>7} {'requests':>8} {'ok':>4} {'p50 ms':>9} {'p95 ms':>9} {'queries/s':>10} {'server p50':>11}")
    for lv in levels:
        print(f"{lv['clients']:>7} {lv['requests']:>8} {lv['ok']:>4} {lv['p50_ms']:>9.1f} {lv['p95_ms']:>9.1f} "
              f"{lv['throughput_qps']:>10.2f} {lv['server_total_p50_ms']:>11.1f}")
    one = levels[0]
    print(f"warm query (1 client, p50, HTTP included): {warm_ms:.1f} ms; server-side total p50 "
          f"{one['server_total_p50_ms']:.1f} ms; HTTP + multipart + JSON p50 {one['http_overhead_p50_ms']:.1f} ms")
    print(f"cold `visearch query` process (median of {len(cold)}, model load included): {cold_ms:.0f} ms")
    print(f"cold / warm: {cold_ms / warm_ms:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
