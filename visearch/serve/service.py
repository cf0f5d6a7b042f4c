"""The warm search service behind `visearch serve`: Searchers loaded once, a bounded worker pool, thumbnails by id.

No web framework here: `app.py` turns HTTP requests into calls of `SearchService`, and its errors into status codes.
Every lookup goes through in-memory tables (dataset name, model name, image id): nothing a client sends is ever joined
into a file-system path.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import StoreError, UsageError, VisearchError
from ..workspace import Workspace

log = logging.getLogger(__name__)

#: detectors every server offers: they need no weights
WEIGHT_FREE_DETECTORS = ("none", "tiles")
MAX_TOP_K = 100
THUMB_SIZES = (16, 1024)


class NotFound(VisearchError):
    """An unknown dataset, model, detector or image id (HTTP 404)."""


class Busy(VisearchError):
    """Too many queries waiting for the worker pool (HTTP 503)."""


@dataclass
class ServeOptions:
    """What one server process serves and how. `workers` is the number of queries that run at once (model
    forwards happen inside them: 1 = one forward at a time on the device); `max_pending` bounds running + waiting
    queries (more get `Busy`)."""

    datasets: Sequence[str]
    models: Sequence[str] = ("lite",)
    detectors: Sequence[str] = ()
    data_dir: str | Path | None = None
    weights_dir: str | Path | None = None
    device: str = "auto"
    workers: int = 1
    max_pending: int = 64
    max_upload_bytes: int = 20 * 1024 * 1024
    max_boxes: int = 5
    thumb_cache: int = 2048


@dataclass
class QueryRequest:
    """One search, from an upload (`image_bytes`) or a stored image (`image_id`)."""

    dataset: str
    model: str
    image_bytes: bytes | None = None
    image_name: str = "upload"
    image_id: str | None = None
    prompt: str | None = None
    detector: str | None = None
    top_k: int = 5
    box: tuple[float, float, float, float] | None = None
    rerank: bool = True


@dataclass
class _Stats:
    running: int = 0
    waiting: int = 0
    served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def parse_box(text: str | Sequence[Any] | None) -> tuple[float, float, float, float] | None:
    """"x0,y0,x1,y1" (or a list of 4 numbers) -> a float tuple with x1 > x0 and y1 > y0; None / "" -> None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"box must be four numbers x0,y0,x1,y1, got {text!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise UsageError(f"box must be four finite numbers x0,y0,x1,y1, got {text!r}")
    if vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise UsageError(f"box {list(vals)} is empty: it needs x1 > x0 and y1 > y0")
    return vals  # type: ignore[return-value]


def parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{name} must be true or false, got {value!r}")


def parse_top_k(value: Any) -> int:
    try:
        k = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        k = None
    if k is None or not 1 <= k <= MAX_TOP_K:
        raise UsageError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {value!r}")
    return k


class SearchService:
    """Loads each (dataset, model) Searcher once (one model instance shared by all datasets) and answers queries
    in a bounded thread pool."""

    def __init__(self, options: ServeOptions):
        from .. import api
        from ..registry import load_model

        if not options.datasets:
            raise UsageError("no dataset to serve", "pass --dataset NAME (repeat it for more)")
        if options.workers < 1 or options.max_pending < 1:
            raise UsageError("--workers and --max-pending must be at least 1")
        self.options = options
        self.weights_dir = Workspace.resolve(weights_dir=options.weights_dir).weights_dir
        self.searchers: dict[tuple[str, str], Any] = {}
        self.unavailable: dict[tuple[str, str], str] = {}
        self.datasets: dict[str, Any] = {}
        self._ids: dict[str, frozenset[str]] = {}
        describers: dict[str, Any] = {}
        for model in dict.fromkeys(options.models):
            describers[model] = load_model(model, weights_dir=self.weights_dir, device=options.device)
        for ds in dict.fromkeys(options.datasets):
            for model, describer in describers.items():
                try:
                    s = api.Searcher(ds, model, options.data_dir, weights_dir=self.weights_dir, device=options.device,
                                     describer=describer)
                except StoreError as e:  # e.g. this model was never extracted for this dataset: serve the others
                    log.warning("not serving %s [%s]: %s", ds, model, e)
                    self.unavailable[(ds, describer.name)] = str(e)
                    self.unavailable[(ds, model)] = str(e)
                    continue
                self.searchers[(ds, model)] = s
                if s.model != model:  # an alias (superglobal -> superglobal-r101): both names work
                    self.searchers[(ds, s.model)] = s
                self.datasets.setdefault(ds, s.dataset)
        if not self.searchers:
            first = next(iter(self.unavailable.values()), "nothing to serve")
            raise VisearchError(f"no dataset/model pair can be served: {first}")
        for name, d in self.datasets.items():
            self._ids[name] = frozenset(d.imlist) | frozenset(d.qimlist)
        self.default_detector = options.detectors[0] if options.detectors else api.default_detector(self.weights_dir)
        self._detector_names = list(dict.fromkeys([*WEIGHT_FREE_DETECTORS, *options.detectors]))
        self._detectors: dict[str, Any] = {}
        self._detector_lock = threading.Lock()
        for name in options.detectors:  # warm: loaded before the first request
            self.detector(name)
        self._pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="visearch-query")
        self._stats = _Stats()
        self._thumbs: OrderedDict[tuple[str, str, int], tuple[bytes, tuple[int, int]]] = OrderedDict()
        self._thumb_lock = threading.Lock()

    # ---- lookups (never a path from the client) --------------------------------------------------------------------
    def searcher(self, dataset: str, model: str):
        s = self.searchers.get((dataset, model))
        if s is not None:
            return s
        if dataset not in self.datasets and not any(d == dataset for d, _ in self.unavailable):
            raise NotFound(f"unknown dataset {dataset!r}", f"served: {', '.join(sorted(self.datasets))}")
        why = self.unavailable.get((dataset, model))
        if why:
            raise NotFound(f"dataset {dataset!r} has no usable {model} store: {why}")
        served = sorted({m for d, m in self.searchers if d == dataset})
        raise NotFound(f"model {model!r} is not served for dataset {dataset!r}", f"served: {', '.join(served)}")

    def detector(self, name: str):
        if name not in self._detector_names:
            raise NotFound(f"detector {name!r} is not served", f"served: {', '.join(self._detector_names)}")
        with self._detector_lock:
            if name not in self._detectors:
                from ..registry import load_detector

                self._detectors[name] = load_detector(name, weights_dir=self.weights_dir, device=self.options.device)
            return self._detectors[name]

    def image_file(self, dataset: str, image_id: str) -> Path:
        """The dataset's JPEG of a known id (the id must be in the dataset's tables)."""
        if dataset not in self.datasets:
            raise NotFound(f"unknown dataset {dataset!r}", f"served: {', '.join(sorted(self.datasets))}")
        if image_id not in self._ids[dataset]:
            raise NotFound(f"no image with id {image_id!r} in dataset {dataset!r}")
        return self.datasets[dataset].images_dir / f"{image_id}.jpg"

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (ds, model), s in self.searchers.items():
            entry = out.setdefault(ds, {"models": [], "images": len(s.dataset.imlist)})
            if model not in entry["models"]:
                entry["models"].append(model)
        missing: dict[str, dict[str, str]] = {}
        for (ds, model), why in self.unavailable.items():
            if (ds, model) not in self.searchers:
                missing.setdefault(ds, {})[model] = why
        st = self._stats
        return {"status": "ok", "datasets": out, "unavailable": missing, "detectors": self._detector_names,
                "default_detector": self.default_detector, "max_upload_bytes": self.options.max_upload_bytes,
                "max_top_k": MAX_TOP_K,
                "queries": {"running": st.running, "waiting": st.waiting, "served": st.served,
                            "workers": self.options.workers, "max_pending": self.options.max_pending}}

    # ---- queries ---------------------------------------------------------------------------------------------------
    def submit(self, req: QueryRequest) -> Future:
        """Validate the request's names now (cheap), then queue the search; `Busy` when the queue is full."""
        searcher = self.searcher(req.dataset, req.model)
        det_name = req.detector or (self.default_detector if req.prompt else "none")
        detector = self.detector(det_name)
        path = self.image_file(req.dataset, req.image_id) if req.image_id is not None else None
        st = self._stats
        with st.lock:
            if st.running + st.waiting >= self.options.max_pending:
                raise Busy(f"server busy: {st.running + st.waiting} queries in progress", "try again in a moment")
            st.waiting += 1
        queued = time.perf_counter()

        def work() -> dict[str, Any]:
            with st.lock:
                st.waiting -= 1
                st.running += 1
            try:
                return self._run(searcher, detector, det_name, req, path, queued)
            finally:
                with st.lock:
                    st.running -= 1
                    st.served += 1

        try:
            return self._pool.submit(work)
        except RuntimeError:  # shutting down
            with st.lock:
                st.waiting -= 1
            raise Busy("server is shutting down") from None

    def query(self, req: QueryRequest) -> dict[str, Any]:
        """Blocking form of submit (for scripts and tests)."""
        return self.submit(req).result()

    def _run(self, searcher, detector, det_name: str, req: QueryRequest, path: Path | None,
             queued: float) -> dict[str, Any]:
        from ..images import load_rgb, load_rgb_bytes

        t0 = time.perf_counter()
        if path is not None:
            img = load_rgb(path, name=req.image_id, **searcher.dataset.load_options())
            label = req.image_id
        else:
            img = load_rgb_bytes(req.image_bytes or b"", req.image_name)
            label = req.image_name
        decode = time.perf_counter() - t0
        timings: dict[str, float] = {}
        res = searcher.query(img, prompt=req.prompt, top_k=req.top_k, max_boxes=self.options.max_boxes,
                             timings=timings, detector=detector if det_name != "none" else None, box=req.box,
                             rerank=req.rerank)
        res["query"] = label
        ms = {k: round(1000 * timings.get(k, 0.0), 2) for k in ("detect", "describe", "search", "rerank")}
        ms["total"] = round(1000 * (timings.get("total", 0.0) + decode), 2)
        ms["queue"] = round(1000 * (t0 - queued), 2)
        res["timings_ms"] = ms
        return res

    # ---- thumbnails ------------------------------------------------------------------------------------------------
    def thumbnail(self, dataset: str, image_id: str, size: int) -> tuple[bytes, tuple[int, int]]:
        """A JPEG of at most size x size px of a dataset image, and the image's full (width, height)."""
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise UsageError(f"size must be from {THUMB_SIZES[0]} to {THUMB_SIZES[1]}, got {size}")
        path = self.image_file(dataset, image_id)
        key = (dataset, image_id, size)
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        from PIL import Image

        from ..images import load_rgb

        opts = self.datasets[dataset].load_options()
        try:
            with Image.open(path) as im:
                full = _exif_size(im) if opts.get("apply_exif", True) else im.size
                im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly
                rgb = load_rgb(im, name=image_id, **opts)
        except OSError:
            raise NotFound(f"image {image_id!r} of dataset {dataset!r} is missing on disk") from None
        pil = Image.fromarray(rgb)
        pil.thumbnail((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=85)
        out = (buf.getvalue(), full)
        with self._thumb_lock:
            self._thumbs[key] = out
            while len(self._thumbs) > self.options.thumb_cache:
                self._thumbs.popitem(last=False)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _exif_size(im) -> tuple[int, int]:
    from ..images import exif_orientation

    w, h = im.size
    return (h, w) if exif_orientation(im) in (5, 6, 7, 8) else (w, h)
