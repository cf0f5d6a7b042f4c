"""Benchmarks: time, memory, storage and accuracy per model and per query stage, comparable across runs and machines.

    from visearch import bench
    result = bench.run("demo", ["lite"], device="cpu", queries=20)     # the documented JSON object (a dict)
    ratios = bench.compare(result, json.load(open("old.json")))          # new / old for every shared figure
    scale = bench.scale(sizes=(10_000, 100_000, 1_000_000))              # exact search cost against N

How the figures are taken (so that they can be trusted):
- every time is wall-clock `time.perf_counter`, after `device.synchronize` on CUDA; warm-up runs are excluded;
- extraction speed is model throughput on a sample of database images already decoded in memory (decoding and store
  writes excluded, `decode_images_per_s` reports decoding alone), batched as `visearch extract` batches them;
- query latency runs `Searcher.query` on decoded query images (the dataset's queries, else database images), so
  `detect` is the detector alone; `total` is detect + crop + describe + search + rerank;
- peak RAM is the process's peak resident set (Linux `VmHWM`, reset per model through /proc/self/clear_refs, so each
  model's figure is its own; elsewhere the process-lifetime `ru_maxrss`, flagged by `ram_peak_scope: "process"`);
- bytes per image come from the store's HDF5 datasets (`Store.nbytes()`), divided by the rows stored.
"""
from __future__ import annotations

import functools
import gc
import logging
import math
import os
import platform
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import StoreError, UsageError, VisearchError
from .workspace import Workspace

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STAGES = ("detect", "describe", "search", "rerank", "total")
PROTOCOLS = ("easy", "medium", "hard")
MP_KS = ("mp@1", "mp@5", "mp@10")
# Figures where a larger value is better (for the arrows of --compare); all others: smaller is better.
HIGHER_IS_BETTER = ("extract_images_per_s", "decode_images_per_s", "map.", "mp.")


# ---- small measuring tools -----------------------------------------------------------------------------------------
def stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median and 95th percentile (linear interpolation) of durations in seconds, as milliseconds."""
    if len(seconds) == 0:
        raise UsageError("no timings to summarise", "run at least one query after the warm-up")
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"median": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3)}


def _read_status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak RAM (and GPU memory on CUDA) over a `with` block.

    On Linux the kernel's high-water mark VmHWM is reset on entry (write "5" to /proc/self/clear_refs) and read on
    exit: exact and free (no sampling thread). Elsewhere the lifetime peak `ru_maxrss` is reported (scope "process")."""

    def __init__(self, device: Any = None):
        self.device = device
        self.scope = "process"
        self.ram_mb = 0.0
        self.gpu_mb: float | None = None
        self.start_ram_mb = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _read_status_kb("VmHWM") is not None:
                self.scope = "block"
        except OSError:
            self.scope = "process"
        self.start_ram_mb = (_read_status_kb("VmRSS") or 0) / 1024
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _cuda(self) -> bool:
        return getattr(self.device, "type", None) == "cuda"

    def __exit__(self, *exc: object) -> None:
        if self.scope == "block":
            self.ram_mb = (_read_status_kb("VmHWM") or 0) / 1024
        else:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.ram_mb = peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes vs kB
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20


def machine_info(device: Any = None) -> dict[str, Any]:
    """What the figures were measured on: CPU model and cores, RAM, GPU, OS, Python, torch/CUDA versions, threads."""
    import torch

    from .device import cpu_has_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        ram_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is a dependency; keep machine_info usable without it anyway
        physical, ram_gb = None, None
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": physical,
        "ram_gb": ram_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),  # AVX-512-BF16 / AMX: where AMES reranks in bf16 (precision = "auto")
        "device": str(device) if device is not None else "cpu",
        "gpu": None,
        "gpu_memory_gb": None,
        "visearch": __version__,
    }
    if getattr(device, "type", None) == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _sync(device: Any) -> None:
    from .device import synchronize

    synchronize(device)


# ---- per-model benchmark -------------------------------------------------------------------------------------------
def _sample_ids(imlist: Sequence[str], n: int) -> list[str]:
    """n ids spread evenly over the database (deterministic), all of them when n >= len."""
    if n >= len(imlist):
        return list(imlist)
    idx = np.linspace(0, len(imlist) - 1, n).round().astype(int)
    return [imlist[i] for i in dict.fromkeys(idx.tolist())]


def _extract_throughput(describer, ds, sample: int, batch_size: int, warmup: int) -> dict[str, Any]:
    """Decode `sample` database images, warm the model up on `warmup` batches, then time describing all of them."""
    from .images import load_rgb
    from .pipeline.extract import plan_batches

    ids = _sample_ids(ds.imlist, sample)
    arrays: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for i in ids:
        try:
            arrays[i] = load_rgb(ds.image_path(i), **ds.load_options())
        except VisearchError as e:
            log.warning("bench: skipping %s: %s", i, e)
    decode_s = time.perf_counter() - t0
    if not arrays:
        raise StoreError(f"none of the {len(ids)} sampled images of {ds.name!r} could be decoded")
    batches = plan_batches([(a.shape[0], a.shape[1], i) for i, a in arrays.items()], batch_size)
    dev = describer.device
    for b in (batches * warmup)[:warmup]:  # warm-up: first calls allocate, pick kernels, fill caches
        describer.extract([arrays[i] for i in b])
    _sync(dev)
    t0 = time.perf_counter()
    for b in batches:
        describer.extract([arrays[i] for i in b])
    _sync(dev)
    secs = time.perf_counter() - t0
    return {"images": len(arrays), "seconds": secs, "images_per_s": len(arrays) / secs,
            "decode_images_per_s": len(arrays) / decode_s if decode_s > 0 else None}


def _query_images(ds, n: int) -> tuple[list[np.ndarray], str]:
    """Up to n distinct decoded query images: the dataset's queries when it has some, else database images."""
    from .images import load_rgb

    if ds.qimlist:
        paths, kind = [ds.query_path(i) for i in range(len(ds.qimlist))], "dataset queries"
    else:
        paths, kind = [ds.image_path(i) for i in _sample_ids(ds.imlist, n)], "database images"
    out = []
    for p in paths[:n]:
        try:
            out.append(load_rgb(p, **ds.load_options()))
        except VisearchError as e:
            log.warning("bench: skipping query %s: %s", p, e)
    if not out:
        raise StoreError(f"no usable query image in dataset {ds.name!r}")
    return out, kind


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _accuracy(ev: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """api.evaluate's result -> ({"global": {easy: mAP, ..}, "reranked": ..}, same for mP@k)."""
    maps: dict[str, Any] = {}
    mps: dict[str, Any] = {}
    for kind in ("global", "reranked"):
        res = ev.get(kind)
        if res is None:
            maps[kind] = mps[kind] = None
            continue
        # None where a protocol has no query with positives (e.g. Hard when no image is marked hard)
        maps[kind] = {p: _round(res[p]["map"]) for p in PROTOCOLS}
        mps[kind] = {p: {k: _round(res[p][k]) for k in MP_KS} for p in PROTOCOLS}
    return maps, mps


def bench_model(dataset: str, model: str, *, data_dir: str | Path | None = None, weights: str | Path | None = None,
                weights_dir: str | Path | None = None, device: str = "auto", queries: int = 20, warmup: int = 2,
                sample: int = 32, batch_size: int = 8, detector: str | None = None, prompt: str | None = None,
                max_boxes: int = 5, top_k: int = 5, evaluate: bool = True, extract: bool = True,
                quiet: bool = True) -> dict[str, Any]:
    """All figures of one model on one dataset (one entry of `run()`'s "models")."""
    from . import api
    from .data import load_dataset
    from .device import resolve_device
    from .registry import load_model

    if queries < 1:
        raise UsageError("--queries must be at least 1")
    dev = resolve_device(device)
    ws = Workspace.resolve(data_dir, weights_dir, device)
    ddir, wdir = ws.data_dir, ws.weights_dir
    ds = load_dataset(ddir, dataset)
    out: dict[str, Any] = {}
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        describer = load_model(model, weights=weights, weights_dir=wdir, device=device)
        _sync(dev)
        model_load_s = time.perf_counter() - t0

        thr = _extract_throughput(describer, ds, sample, batch_size, warmup)

        # the store must hold the whole dataset for search and mAP; extract is incremental (a no-op when complete)
        fill: dict[str, Any] | None = None
        if extract:
            rep = api.extract(dataset, data_dir=ddir, weights_dir=wdir, batch_size=batch_size, quiet=quiet,
                              describer=describer)
            fill = {"added": rep.added + rep.updated, "seconds": round(rep.seconds, 3),
                    "images_per_s": round(rep.images_per_s, 3) if rep.added + rep.updated else None}

        t0 = time.perf_counter()
        searcher = api.Searcher(dataset, model, ddir, weights, wdir, device, rerank=True, detector=detector,
                                describer=describer)
        _sync(dev)
        searcher_load_s = time.perf_counter() - t0

        qimgs, qkind = _query_images(ds, queries)
        per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        crops = []
        for n in range(warmup + queries):
            timings: dict[str, float] = {}
            res = searcher.query(qimgs[n % len(qimgs)], prompt=prompt, top_k=top_k, max_boxes=max_boxes,
                                 timings=timings)
            if n >= warmup:
                for s in STAGES:
                    per_stage[s].append(timings[s])
                crops.append(len(res["crops"]))

        maps = mps = None
        eval_s = None
        if evaluate and ds.qimlist and ds.gnd:
            t0 = time.perf_counter()
            ev = api.evaluate(dataset, searcher=searcher, rerank=True, quiet=quiet)
            eval_s = time.perf_counter() - t0
            maps, mps = _accuracy(ev)

        store = searcher.store
        nb = store.nbytes()
        rows = len(store)
        reranker = searcher.reranker.name if searcher.reranker is not None else None
        rerank_precision = searcher.reranker.precision if searcher.reranker is not None else None
    bpi = {"global": nb["global"] / rows, "local": nb["local"] / rows, "total_on_disk": nb["total_on_disk"] / rows}
    out.update(
        load_s=round(model_load_s + searcher_load_s, 4),
        load_breakdown_s={"model": round(model_load_s, 4), "store_reranker_detector": round(searcher_load_s, 4)},
        extract_images_per_s=round(thr["images_per_s"], 3),
        extract_sample={"images": thr["images"], "batch_size": batch_size, "warmup_batches": warmup,
                        "seconds": round(thr["seconds"], 4)},
        decode_images_per_s=None if thr["decode_images_per_s"] is None else round(thr["decode_images_per_s"], 3),
        store_fill=fill,
        query_ms={s: stats_ms(v) for s, v in per_stage.items()},
        queries={"n": queries, "warmup": warmup, "images": qkind, "distinct": len(qimgs),
                 "crops_per_query": round(float(np.mean(crops)), 3), "detector": searcher.detector_name,
                 "reranker": reranker, "rerank_precision": rerank_precision, "top_k": top_k},
        peak_ram_mb=round(mem.ram_mb, 1),
        ram_at_start_mb=round(mem.start_ram_mb, 1),
        ram_peak_scope=mem.scope,
        peak_gpu_mb=None if mem.gpu_mb is None else round(mem.gpu_mb, 1),
        bytes_per_image={k: round(v, 1) for k, v in bpi.items()},
        store={"rows": rows, "live": store.num_live(), "dim": store.dim, "dtype": store.dtype.name,
               "bytes": nb, "path": str(store.path)},
        projected_1m_gb={k: round(v * 1e6 / 1e9, 3) for k, v in bpi.items()},
        map=maps,
        mp=mps,
        eval_s=None if eval_s is None else round(eval_s, 3),
    )
    searcher.store.close()
    del searcher, describer
    gc.collect()
    if dev.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    return out


def run(dataset: str, models: Sequence[str] = ("lite",), *, data_dir: str | Path | None = None,
        weights_dir: str | Path | None = None, weights: str | Path | None = None, device: str = "auto",
        queries: int = 20, warmup: int = 2, sample: int = 32, batch_size: int = 8, detector: str | None = None,
        prompt: str | None = None, max_boxes: int = 5, top_k: int = 5, evaluate: bool = True,
        extract: bool = True, threads: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Benchmark each model on `dataset`; returns the documented JSON object (see README, "bench").

    A model that cannot be loaded (missing or bad weights, a model error, its code not installed) is reported as
    `{"skipped": reason}` and the others still run. Unknown model names raise UsageError before anything runs.
    `threads` sets torch's CPU threads (recorded in machine.torch_threads)."""
    from .config import load_model_config
    from .data import load_dataset
    from .device import resolve_device

    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not models:
        raise UsageError("no model to benchmark", "pass --models lite[,superglobal,...]")
    if weights is not None and len(models) > 1:
        raise UsageError("--weights names one checkpoint, so it needs exactly one model in --models")
    for m in models:
        load_model_config(m)  # unknown names fail here, listing the known ones
    dev = resolve_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    ds = load_dataset(Workspace.resolve(data_dir).data_dir, dataset)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(dev),
        "dataset": dataset,
        "dataset_info": {"images": len(ds.imlist), "queries": len(ds.qimlist), "ground_truth": bool(ds.gnd)},
        "settings": {"device": str(dev), "queries": queries, "warmup": warmup, "sample": sample,
                     "batch_size": batch_size, "detector": detector or "none", "prompt": prompt,
                     "max_boxes": max_boxes, "top_k": top_k},
        "models": {},
    }
    for m in models:
        try:
            result["models"][m] = bench_model(
                dataset, m, data_dir=data_dir, weights=weights, weights_dir=weights_dir, device=device,
                queries=queries, warmup=warmup, sample=sample, batch_size=batch_size, detector=detector,
                prompt=prompt, max_boxes=max_boxes, top_k=top_k, evaluate=evaluate, extract=extract, quiet=quiet)
        except UsageError:
            raise
        except VisearchError as e:  # missing weights, a model that cannot run: report and go on
            log.info("bench: %s skipped: %s", m, e)
            result["models"][m] = {"skipped": f"{type(e).__name__}: {e}"}
        except ImportError as e:  # the model's module (or an optional dependency of it) is not installed
            log.info("bench: %s skipped: %s", m, e)
            result["models"][m] = {"skipped": f"not available in this install ({e})"}
    return result


# ---- comparing two runs -------------------------------------------------------------------------------------------
COMPARED = ("load_s", "extract_images_per_s", "decode_images_per_s", "query_ms", "peak_ram_mb", "peak_gpu_mb",
            "bytes_per_image", "map", "mp")


def _flatten(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d):
        out[prefix] = float(d)
    return out


def check_result(r: Any, what: str) -> None:
    """UsageError unless `r` has the shape of a `visearch bench --json` result (checked before a --compare run)."""
    if not isinstance(r, dict) or not isinstance(r.get("models"), dict):
        raise UsageError(f"{what} is not a `visearch bench --json` result (no \"models\" object)",
                         "pass a file written by `visearch bench --json FILE`")
    bad = [m for m, v in r["models"].items() if not isinstance(v, dict)]
    if bad or not isinstance(r.get("machine", {}), dict):
        raise UsageError(f"{what} is not a `visearch bench --json` result "
                         f"({'model ' + repr(bad[0])[:40] if bad else 'machine'} is not an object)",
                         "pass a file written by `visearch bench --json FILE`")


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Ratios new / old for every figure both runs have, per model (ratio None when old is 0).

    Returns {"machine_differs": {field: [old, new]}, "models": {model: {figure: {"old", "new", "ratio",
    "better"}}}}; `better` is True when the new figure is the better one (faster, smaller, more accurate)."""
    check_result(new, "the new bench result")
    check_result(old, "the old bench result")
    mnew, mold = new.get("machine", {}), old.get("machine", {})
    differs = {k: [mold.get(k), mnew.get(k)] for k in ("cpu", "cores_logical", "gpu", "device", "torch", "cuda",
                                                         "torch_threads") if mold.get(k) != mnew.get(k)}
    out: dict[str, Any] = {"machine_differs": differs, "dataset": [old.get("dataset"), new.get("dataset")],
                           "models": {}}
    for m, fig_new in new["models"].items():
        fig_old = old["models"].get(m)
        if not isinstance(fig_old, dict) or "skipped" in fig_new or "skipped" in fig_old:
            continue
        a = _flatten({k: fig_new.get(k) for k in COMPARED})
        b = _flatten({k: fig_old.get(k) for k in COMPARED})
        rows = {}
        for key in a:
            if key not in b:
                continue
            ratio = a[key] / b[key] if b[key] != 0 else None
            higher = key.startswith(HIGHER_IS_BETTER)
            better = None if a[key] == b[key] else ((a[key] > b[key]) == higher)
            rows[key] = {"old": b[key], "new": a[key], "ratio": ratio,
                         "better": better}
        out["models"][m] = rows
    return out


# ---- search cost against collection size --------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    """"10k,100k,1M" -> [10000, 100000, 1000000] (plain integers and k/M suffixes)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower().replace("_", "")
        if not p:
            continue
        mult = {"k": 1_000, "m": 1_000_000}.get(p[-1], 1)
        try:
            n = int(float(p[:-1] if mult > 1 else p) * mult)
        except (ValueError, OverflowError):  # OverflowError: inf
            raise UsageError(f"bad size {part.strip()!r}", "sizes look like 10k,100k,1M or 5000") from None
        if n < 1:
            raise UsageError(f"bench scale size must be positive, got {part.strip()!r}")
        if n > MAX_SCALE_N:
            raise UsageError(f"bench scale size {part.strip()!r} is above the largest supported, {MAX_SCALE_N:,}")
        out.append(n)
    if not out:
        raise UsageError("no sizes given", "e.g. --sizes 10k,100k,1M")
    return out


MAX_SCALE_N = 10_000_000_000  # beyond any store this tool writes; above it the streamed timing loop runs for days
MAX_SCALE_DIM = 65_536


def _memory_available() -> int | None:
    """Bytes of memory available now (Linux /proc/meminfo MemAvailable), None when unknown."""
    kb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kb = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None if kb is None else kb * 1024


def check_scale_args(sizes: Sequence[int], dim: int, nq: int, k: int, chunk_rows: int, in_memory_max: int) -> None:
    """Refuse (UsageError, one line) a bench scale run whose arrays cannot fit: dimension above MAX_SCALE_DIM, or
    the rows held at once (float16 data, a float32 chunk, the queries and top-k) above the memory available."""
    if not 1 <= dim <= MAX_SCALE_DIM:
        raise UsageError(f"--dim {dim} is out of range (1 to {MAX_SCALE_DIM})")
    n = max(sizes)
    held = min(n, in_memory_max) * dim * (2 + 4) + min(n, chunk_rows) * (dim * 4 + nq * 8) + nq * dim * 4
    avail = _memory_available()
    if avail is not None and held > avail * 0.8:
        raise UsageError(f"bench scale with --dim {dim} and N up to {n:,} needs about {held / 2**30:.1f} GiB of "
                         f"memory, {avail / 2**30:.1f} GiB is available", "use a smaller --dim or --sizes")


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """`[n, dim]` float16 rows of unit length (random directions, like real L2-normalised descriptors)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def _median_time(fn, reps: int, device: Any, warmup=None) -> float:
    """Median seconds of `reps` calls of fn after one warm-up call (of `warmup` when given: a cheaper stand-in)."""
    (warmup or fn)()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def scale(sizes: Iterable[int] = (10_000, 100_000, 1_000_000), dim: int = 2048, nq: int = 6, k: int = 100,
          chunk_rows: int = 65536, reps: int = 3, device: str = "cpu", in_memory_max: int = 200_000,
          store_max: int = 100_000, faiss: bool = True, faiss_max_gb: float = 2.0, tmp_dir: str | Path | None = None,
          threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Exact top-k cost against the number of stored descriptors N (D = `dim`, float16), for `nq` query crops.

    Per N, median of `reps` warm runs of visearch.search.topk_stream:
    - `exact_ms`: over N distinct random unit rows held in memory when N <= in_memory_max; above that, one
      `chunk_rows` block of random rows streamed N / chunk_rows times (the same arithmetic and memory traffic per
      row as distinct data, without holding N x D in RAM; `data` says which);
    - `store_ms`: through a real sharded HDF5 Store written to `tmp_dir` (N <= store_max; file in the page cache);
    - `faiss_ms`: faiss.IndexFlatIP (float32, exact) when faiss is importable and the index fits `faiss_max_gb`;
    - `faiss_sq_ms`: faiss.IndexScalarQuantizer(QT_fp16) over the same float16 rows (in-memory sizes), with
      `exact_vs_faiss_sq` (time ratio, <= 1 = visearch faster) and `same_top_k_as_faiss_sq` (share of queries whose
      top-k rows are identical, in order);
    - `copy_gb_per_s`: a plain memory copy of the same blocks in the same run, and `exact_vs_copy` the share of that
      bandwidth the exact search reaches; `exact_float32_ms`: the path that converts chunks to float32 (in-memory
      sizes, CPU); `exact_chunks_rescored` / `exact_chunks_float32`: chunks that took the float16 candidate +
      exact rescoring path or fell back to float32 (near-ties).
    """
    sizes = list(sizes)
    check_scale_args(sizes, dim, nq, k, chunk_rows, in_memory_max)
    import tempfile

    import torch

    from .device import resolve_device
    from .search import search_store, topk_stream

    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    try:
        import faiss as faiss_mod
    except ImportError:
        faiss_mod = None
    if faiss_mod is not None and threads:
        faiss_mod.omp_set_num_threads(threads)
    q = _unit_rows(rng, nq, dim).astype(np.float32)
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "machine": machine_info(dev),
                           "settings": {"dim": dim, "dtype": "float16", "queries": nq, "k": k,
                                        "chunk_rows": chunk_rows, "reps": reps, "device": str(dev)},
                           "faiss": None if faiss_mod is None else getattr(faiss_mod, "__version__", "?"),
                           "sizes": {}}
    tmp_ctx = tempfile.TemporaryDirectory(prefix="visearch-scale-", dir=tmp_dir)
    with tmp_ctx as tmp:
        for n in sizes:
            n = int(n)
            if n < 1:
                raise UsageError(f"bench scale size must be positive, got {n}")
            row: dict[str, Any] = {"bytes_fp16": n * dim * 2}
            if n <= in_memory_max:
                data = _unit_rows(rng, n, dim)
                blocks = [(a, data[a:a + chunk_rows]) for a in range(0, n, chunk_rows)]
                row["data"], row["data_kind"] = "distinct rows in memory", "in RAM"
            else:
                data = None
                block = _unit_rows(rng, min(chunk_rows, n), dim)
                blocks = [(a, block[:min(chunk_rows, n - a)]) for a in range(0, n, chunk_rows)]
                row["data"] = f"one {len(block)}-row block streamed {len(blocks)} times"
                row["data_kind"] = "streamed"
            kk = min(k, n)
            # warm-up on the first block only: it allocates and picks kernels like a full pass, at 1/16 the cost
            secs = _median_time(functools.partial(topk_stream, q, blocks, kk, device=dev), reps, dev,
                                warmup=functools.partial(topk_stream, q, blocks[:1], kk, device=dev))
            row["exact_ms"] = round(secs * 1000, 3)
            row["exact_ms_per_query"] = round(secs * 1000 / nq, 3)
            row["exact_gb_per_s"] = round(n * dim * 2 / secs / 1e9, 3)
            stats: dict[str, int] = {}
            exact_rows = topk_stream(q, blocks, kk, device=dev, stats=stats)[0]
            row["exact_chunks_rescored"] = stats.get("fast", 0)
            row["exact_chunks_float32"] = stats.get("float32", 0)
            copy_secs = _median_time(functools.partial(_copy_blocks, blocks), reps, None)
            row["copy_gb_per_s"] = round(n * dim * 2 / copy_secs / 1e9, 3)
            row["exact_vs_copy"] = round(row["exact_gb_per_s"] / row["copy_gb_per_s"], 3)
            if data is not None and dev.type == "cpu":  # the earlier float32-conversion path, same data, same run
                f32 = functools.partial(topk_stream, q, blocks, kk, device=dev, unit_rows=False)
                row["exact_float32_ms"] = round(_median_time(f32, reps, dev) * 1000, 3)
            del blocks
            if data is not None and n <= store_max:
                row.update(_store_search(Path(tmp), data, q, kk, chunk_rows, reps, dev, search_store))
            else:
                row["store_ms"] = None
            row["faiss_ms"] = row["faiss_sq_ms"] = None
            if faiss and faiss_mod is not None:
                need_gb = n * dim * 4 / 1e9
                if need_gb > faiss_max_gb:
                    row["faiss_skipped"] = f"an exact float32 index needs {need_gb:.1f} GB (> faiss_max_gb " \
                                           f"{faiss_max_gb:g})"
                else:
                    row.update(_faiss_search(faiss_mod, data, n, dim, q, kk, reps, rng, chunk_rows))
                if data is None:
                    row["faiss_sq_skipped"] = "the rows are not held in memory at this size"
                elif n * dim * 2 / 1e9 > faiss_max_gb:
                    row["faiss_sq_skipped"] = f"needs {n * dim * 2 / 1e9:.1f} GB (> faiss_max_gb {faiss_max_gb:g})"
                else:
                    sq_ms, sq_rows = _faiss_sq_search(faiss_mod, data, q, kk, reps, chunk_rows)
                    row["faiss_sq_ms"] = sq_ms
                    row["exact_vs_faiss_sq"] = round(row["exact_ms"] / sq_ms, 3)
                    # identical top-k rows, in order, per query (random rows: no ties at the k-th place)
                    row["same_top_k_as_faiss_sq"] = float(np.mean([np.array_equal(a, b)
                                                                    for a, b in zip(exact_rows, sq_rows)]))
            elif faiss:
                row["faiss_skipped"] = "faiss is not installed (pip install faiss-cpu)"
            out["sizes"][str(n)] = row
            del data
            gc.collect()
    return out


def _store_search(tmp: Path, data: np.ndarray, q: np.ndarray, k: int, chunk_rows: int, reps: int, dev: Any,
                  search_store) -> dict[str, Any]:
    """Write `data` into a real Store (shards of chunk_rows) and time search_store over it."""
    import shutil

    from .models.base import Features
    from .store import Store, StoreWriter

    path = tmp / f"store-{len(data)}"
    store = Store.create(path, model="synthetic", config={}, dim=data.shape[1], weights_sha256=None)
    with StoreWriter(store) as w:
        for a in range(0, len(data), chunk_rows):
            b = data[a:a + chunk_rows]
            w.append([f"r{i}" for i in range(a, a + len(b))], Features(b))
    st = Store.open(path)
    try:
        secs = _median_time(lambda: search_store(q, st, k, device=dev, chunk_rows=chunk_rows), reps, dev)
        nb = st.nbytes()
    finally:
        st.close()
        shutil.rmtree(path, ignore_errors=True)
    return {"store_ms": round(secs * 1000, 3), "store_bytes_per_image": round(nb["total_on_disk"] / len(data), 1)}


def _copy_blocks(blocks: list[tuple[int, np.ndarray]]) -> None:
    """A plain memory copy of every block into one reused chunk buffer: the streaming bandwidth to compare with."""
    dst = np.empty_like(blocks[0][1])
    for _, b in blocks:
        np.copyto(dst[:len(b)], b)


def _faiss_sq_search(faiss_mod, data: np.ndarray, q: np.ndarray, k: int, reps: int,
                     chunk_rows: int) -> tuple[float, np.ndarray]:
    """faiss.IndexScalarQuantizer(QT_fp16, inner product) over the same float16 rows: FAISS's exact-on-fp16 scan.
    Returns (median ms, top-k rows)."""
    index = faiss_mod.IndexScalarQuantizer(data.shape[1], faiss_mod.ScalarQuantizer.QT_fp16,
                                           faiss_mod.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(data[:min(len(data), 1024)], dtype=np.float32))
    for a in range(0, len(data), chunk_rows):
        index.add(np.ascontiguousarray(data[a:a + chunk_rows], dtype=np.float32))
    secs = _median_time(functools.partial(index.search, q, k), reps, None)
    return round(secs * 1000, 3), index.search(q, k)[1]


def _faiss_search(faiss_mod, data: np.ndarray | None, n: int, dim: int, q: np.ndarray, k: int, reps: int,
                  rng: np.random.Generator, chunk_rows: int) -> dict[str, Any]:
    """IndexFlatIP over the same rows (float32 copy; or freshly drawn rows when they were not kept in memory)."""
    index = faiss_mod.IndexFlatIP(dim)
    t0 = time.perf_counter()
    for a in range(0, n, chunk_rows):
        b = data[a:a + chunk_rows] if data is not None else _unit_rows(rng, min(chunk_rows, n - a), dim)
        index.add(np.ascontiguousarray(b, dtype=np.float32))
    add_s = time.perf_counter() - t0
    secs = _median_time(functools.partial(index.search, q, k), reps, None)
    return {"faiss_ms": round(secs * 1000, 3), "faiss_add_s": round(add_s, 3)}


# ---- rendering (rich, imported lazily) ----------------------------------------------------------------------------
def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine, for table titles and RESULTS files."""
    gpu = f", {m['gpu']} ({m.get('gpu_memory_gb')} GB)" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores_logical']} cores{gpu}; torch {m['torch']}, CUDA {m['cuda'] or '-'}, "
            f"{m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}; device {m['device']}")


def tables(result: dict[str, Any]) -> list[Any]:
    """For people: a machine line, then tables of speed/memory/storage, latency per stage and accuracy per model."""
    from rich.table import Table

    d = result["dataset_info"]
    head = (f"bench {result['dataset']}: {d['images']} images, {d['queries']} queries; "
            f"{machine_line(result['machine'])}")
    t = Table(title="per model (query: median and p95 over the timed queries; B/img: global, local; GB for 1M "
                    "images' descriptors)", title_justify="left")
    for c in ("model", "load s", "img/s", "query ms", "p95 ms", "RAM MB", "GPU MB", "B/img G", "B/img L", "GB/1M"):
        t.add_column(c, justify="left" if c == "model" else "right")
    stage_t = Table(title="query latency per stage, ms", title_justify="left")
    for c in ("model", "stat") + STAGES + ("crops", "rerank in"):
        stage_t.add_column(c, justify="left" if c in ("model", "stat") else "right")
    acc_t = Table(title="accuracy, % (revisitop); mP@k for Medium", title_justify="left")
    for c in ("model", "search", "mAP E", "mAP M", "mAP H", "mP@1", "mP@5", "mP@10"):
        acc_t.add_column(c, justify="left" if c in ("model", "search") else "right")
    skipped, any_acc = [], False
    for name, r in result["models"].items():
        if "skipped" in r:
            skipped.append(f"{name} skipped: {r['skipped']}")
            continue
        q = r["query_ms"]
        proj = r["projected_1m_gb"]
        t.add_row(name, _f(r["load_s"], 2), _f(r["extract_images_per_s"], 2),
                  _f(q["total"]["median"], 1), _f(q["total"]["p95"], 1), _f(r["peak_ram_mb"], 0),
                  _f(r["peak_gpu_mb"], 0), _f(r["bytes_per_image"]["global"], 0),
                  _f(r["bytes_per_image"]["local"], 0), _f(proj["global"] + proj["local"], 2))
        for stat in ("median", "p95"):
            stage_t.add_row(name if stat == "median" else "", stat, *[f"{q[s][stat]:.2f}" for s in STAGES],
                            _f(r["queries"]["crops_per_query"], 1) if stat == "median" else "",
                            (r["queries"].get("rerank_precision") or "-") if stat == "median" else "")
        for kind in ("global", "reranked"):
            if r.get("map") and r["map"].get(kind):
                any_acc = True
                mp = r["mp"][kind]["medium"]
                acc_t.add_row(name, kind, *[_f(r["map"][kind][p], 2) for p in PROTOCOLS],
                              *[_f(mp[k], 2) for k in MP_KS])
    out: list[Any] = [head]
    if len(skipped) < len(result["models"]):
        out += [t, stage_t] + ([acc_t] if any_acc else [])
    return out + skipped


def compare_table(cmp: dict[str, Any]) -> Any:
    """Rich table of `compare()`: old, new, ratio and whether the change is for the better."""
    from rich.table import Table

    t = Table(title="bench compared with the earlier run (ratio = new / old)", title_justify="left")
    for c in ("model", "figure", "old", "new", "ratio", ""):
        t.add_column(c, justify="right" if c in ("old", "new", "ratio") else "left")
    for m, rows in cmp["models"].items():
        for key, r in rows.items():
            # the table keeps the headline figures; every figure is in the JSON ("compare")
            if key.startswith(("mp.", "decode_")) or (key.startswith("query_ms.") and key.endswith(".p95")
                                                       and key != "query_ms.total.p95"):
                continue
            if max(abs(r["old"]), abs(r["new"])) < 0.01:  # e.g. 0.001 ms of an absent stage: noise
                continue
            mark = "" if r["better"] is None else ("better" if r["better"] else "worse")
            t.add_row(m, key, f"{r['old']:,.3f}", f"{r['new']:,.3f}",
                      "-" if r["ratio"] is None else f"{r['ratio']:.3f}", mark)
    if cmp["machine_differs"]:
        diff = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in cmp["machine_differs"].items())
        t.caption = f"the machines differ ({diff}): ratios mix hardware and code changes"
    return t


def scale_table(res: dict[str, Any]) -> Any:
    """Rich table of `scale()`."""
    from rich.table import Table

    s = res["settings"]
    t = Table(title=f"exact top-{s['k']} for {s['queries']} query crops, D={s['dim']} float16, median of "
                    f"{s['reps']} (ms); {machine_line(res['machine'])}", title_justify="left")
    for c in ("N", "GB fp16", "exact", "per crop", "GB/s", "copy GB/s", "float32 path", "via Store", "FAISS flat",
              "FAISS SQfp16", "ratio", "same top-k", "rows"):
        t.add_column(c, justify="left" if c == "rows" else "right")
    for n, r in res["sizes"].items():
        faiss_cell = _f(r["faiss_ms"], 1) if r["faiss_ms"] is not None else ("skipped" if r.get("faiss_skipped")
                                                                            else "-")
        sq_cell = _f(r.get("faiss_sq_ms"), 1) if r.get("faiss_sq_ms") is not None else (
            "skipped" if r.get("faiss_sq_skipped") else "-")
        same = r.get("same_top_k_as_faiss_sq")
        t.add_row(f"{int(n):,}", f"{r['bytes_fp16'] / 1e9:.3f}", _f(r["exact_ms"], 1),
                  _f(r["exact_ms_per_query"], 2), _f(r["exact_gb_per_s"], 2), _f(r.get("copy_gb_per_s"), 2),
                  _f(r.get("exact_float32_ms"), 1), _f(r.get("store_ms"), 1), faiss_cell, sq_cell,
                  _f(r.get("exact_vs_faiss_sq"), 2), "-" if same is None else f"{same:.0%}",
                  r.get("data_kind", r["data"]))
    t.caption = ("ratio = exact / FAISS SQfp16 (<= 1: visearch is faster); same top-k = queries whose top-k rows "
                 "equal FAISS SQfp16's, in order; copy = a plain memory copy of the same blocks")
    return t


# ---- bench scale --index: an approximate first stage against exact search -------------------------------------------
def clustered_rows(rng: np.random.Generator, n: int, dim: int, groups: int = 100, chunk: int = 65536) -> np.ndarray:
    """`[n, dim]` float16 unit rows with realistic two-level structure: n / 1000 random "scene" directions, 10
    "object" directions within each, and groups of about `groups` rows per object (views of one object: cosine about
    0.9 to each other, 0.7 to the scene's other objects, about 0 to other scenes). Generated in chunks."""
    scenes = max(1, n // (10 * groups))
    c = rng.standard_normal((scenes, dim), dtype=np.float32) / np.sqrt(dim)
    sub = 0.5 * rng.standard_normal((scenes * 10, dim), dtype=np.float32) / np.sqrt(dim)
    out = np.empty((n, dim), np.float16)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        o = rng.integers(0, scenes * 10, b - a)
        x = c[o // 10] + sub[o] + (0.35 / np.sqrt(dim)) * rng.standard_normal((b - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def scale_index(factory: str, n: int = 1_000_000, dim: int = 2048, nq: int = 100, k: int = 100,
                candidates: int = 1000, nprobe: int | None = None, train_size: int | None = None, reps: int = 1,
                threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """recall@k of a FAISS first stage (its `candidates` rescored exactly, as query does) against exact search,
    ms/query, bytes/vector and build time, on `n` clustered synthetic rows (clustered_rows; queries are database
    rows plus noise, like a photo of an indexed object)."""
    import torch

    from .index.faiss import FaissIndex
    from .search import topk_stream

    if threads:
        torch.set_num_threads(threads)
        import faiss as faiss_mod

        faiss_mod.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    data = clustered_rows(rng, n, dim)
    gen_s = time.perf_counter() - t0
    pick = rng.choice(n, nq, replace=False)
    q = data[pick].astype(np.float32) + (0.5 / np.sqrt(dim)) * rng.standard_normal((nq, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    chunk = 65536
    blocks = [(a, data[a:a + chunk]) for a in range(0, n, chunk)]
    t0 = time.perf_counter()
    ex_rows, _ = topk_stream(q, blocks, k)
    exact_s = time.perf_counter() - t0
    idx = FaissIndex.create(factory, dim)
    t0 = time.perf_counter()
    if not idx.is_trained():
        ivf = idx.ivf()
        n_train = min(n, train_size or max(39 * (ivf.nlist if ivf is not None else 1), 50_000))
        idx.train(data[np.sort(rng.choice(n, n_train, replace=False))])
    train_s = time.perf_counter() - t0
    if nprobe:
        idx.set_nprobe(nprobe)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        r = np.arange(a, b, dtype=np.int64)
        idx.add(r, data[a:b], r)
    build_s = time.perf_counter() - t0

    def first_stage():
        return idx.search(q, candidates)[0]

    def full():  # the query path: index shortlist, then exact rescoring from the stored rows
        cand = first_stage()
        out = np.empty((nq, k), np.int64)
        for i in range(nq):
            c = np.unique(cand[i][cand[i] >= 0])
            s = data[c].astype(np.float32) @ q[i]
            out[i] = c[np.argsort(-s, kind="stable")[:k]]
        return out

    stage_s = _median_time(first_stage, reps, None)
    full_s = _median_time(full, reps, None)
    got = full()
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, ex_rows)]))
    cand = first_stage()
    recall_first = float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(cand, ex_rows)]))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="visearch-index-") as tmp:
        idx.save(Path(tmp))
        file_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"schema_version": SCHEMA_VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(torch.device("cpu")),
            "settings": {"factory": factory, "n": n, "dim": dim, "queries": nq, "k": k, "candidates": candidates,
                         "nprobe": idx.nprobe, "train_size": idx.train_size, "data": "clustered_rows"},
            f"recall@{k}": round(recall, 4), f"recall@{k}_first_stage_only": round(recall_first, 4),
            "ms_per_query": round(full_s * 1000 / nq, 3), "first_stage_ms_per_query": round(stage_s * 1000 / nq, 3),
            "exact_ms_per_query": round(exact_s * 1000 / nq, 3), "code_bytes_per_vector": idx.code_bytes(),
            "file_bytes_per_vector": round(file_bytes / n, 1), "train_s": round(train_s, 2),
            "build_s": round(build_s, 2), "generate_s": round(gen_s, 2)}
