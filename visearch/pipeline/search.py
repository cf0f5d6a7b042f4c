"""Step `query`: a Searcher holds a dataset, its store, the model, the reranker and the detector, loaded once, and
answers query images with typed results (QueryResult.as_dict() is the documented JSON object)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError, StoreError
from ..workspace import Workspace
from .extract import open_store_for


@dataclass(frozen=True)
class Hit:
    """One database image in a ranking: `path` is the user's original file (the dataset copy when unknown)."""

    rank: int
    id: str
    path: str
    score: float


@dataclass(frozen=True)
class CropResult:
    """One searched crop: `box` [x0, y0, x1, y1] in query pixels, detector `label` / `score` (None: whole image)."""

    box: list[float]
    label: str
    score: float | None
    results: list[Hit]


@dataclass(frozen=True)
class QueryResult:
    """All crops of one query image and the merged ranking (best score per database image over the crops)."""

    query: str
    model: str
    crops: list[CropResult]
    merged: list[Hit]

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of `visearch query --json` (README), key order included."""
        return asdict(self)


class Searcher:
    """Holds a dataset, its store, the model, the reranker and the detector, loaded once for many queries."""

    def __init__(self, dataset: str, model: str = "lite", data_dir: str | Path | None = None,
                 weights: str | Path | None = None, weights_dir: str | Path | None = None, device: str = "auto",
                 rerank: bool = True, detector: str | None = None, detector_options: dict[str, Any] | None = None,
                 describer=None, *, workspace: Workspace | None = None):
        from ..data import load_dataset
        from ..device import resolve_device
        from ..registry import load_detector, load_model, load_reranker

        ws = workspace or Workspace.resolve(data_dir, weights_dir, device)
        self.workspace = ws
        self.data_dir = ws.data_dir
        self.dataset = load_dataset(self.data_dir, dataset)
        wdir = ws.weights_dir
        self.describer = describer or load_model(model, weights=weights, weights_dir=wdir, device=ws.device)
        self.model = self.describer.name
        self.device = resolve_device(ws.device)
        self.store = open_store_for(self.describer, self.data_dir, dataset)
        if self.store.num_live() == 0:
            raise StoreError(f"the {self.model} store of dataset {dataset!r} is empty",
                             f"add images and run `visearch extract {dataset} --model {self.model}`")
        self.reranker = load_reranker(self.describer.config, wdir, ws.device) if rerank else None
        self.detector_name = detector or "none"
        self.detector = load_detector(self.detector_name, weights_dir=wdir, device=ws.device,
                                      **(detector_options or {}))

    def describe_queries(self, images: list[np.ndarray]):
        """Features of query crops; a model may describe queries differently from database images (AMES float keeps
        query tokens in float32 while the database side is rounded through float16, as the reference does)."""
        return getattr(self.describer, "extract_query", self.describer.extract)(images)

    def search_features(self, feats, k: int, rerank: bool = True, timings: dict[str, float] | None = None):
        """Global search (and rerank) for already described crops: returns rows, scores `[nq, k']`.

        `timings`, when given, receives `search` and `rerank` seconds (both stages end with a copy to host numpy, so
        the wall times include all device work)."""
        from ..search import search_store

        shortlist_k = k
        use_rerank = rerank and self.reranker is not None
        if use_rerank:
            shortlist_k = max(k, self.reranker.shortlist_size)
        t0 = time.perf_counter()
        rows, sims = search_store(feats.global_, self.store, shortlist_k, device=self.device)
        t1 = time.perf_counter()
        if use_rerank:
            rows, sims = self.rerank_shortlist(feats, rows, sims)
        if timings is not None:
            timings.update(search=t1 - t0, rerank=time.perf_counter() - t1)
        return rows[:, :k], sims[:, :k]

    def rerank_shortlist(self, feats, rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rerank global candidates `[nq, m]` (best first). A reranker reorders the head of the list (SuperGlobal:
        the first M, AMES: the first `shortlist`); the tail keeps its global order."""
        from ..rerankers.base import Shortlist

        sl = self.reranker.rerank(feats.global_, feats.local, Shortlist(rows, sims), self.store)
        m = sl.rows.shape[1]
        return np.concatenate([sl.rows, rows[:, m:]], 1), np.concatenate([sl.sims, sims[:, m:]], 1)

    def search(self, image: str | Path | np.ndarray, prompt: str | None = None, top_k: int = 5,
               max_boxes: int = 5, timings: dict[str, float] | None = None, *, detector=None,
               box: Sequence[float] | None = None, rerank: bool = True) -> QueryResult:
        """One query image -> its crops with their results, and a merged ranking.

        `detector` replaces this Searcher's detector for this query (the server keeps one per name); `box`
        `[x0, y0, x1, y1]` (pixels) searches only that region, as one crop labelled "region"; `rerank=False` keeps
        the global ranking."""
        from ..detectors.base import Box, clip_box, crop, select_crops
        from ..images import load_rgb

        t = time.perf_counter
        t0 = t()
        img = load_rgb(image)
        if box is not None:
            b = clip_box(Box(*(float(v) for v in box), None, "region"), img.shape[1], img.shape[0])
            if b.width < 1 or b.height < 1:
                raise ImageError(f"region {list(box)} is empty inside the {img.shape[1]}x{img.shape[0]} image",
                                 "draw a box inside the photo")
            crops = [b]
        else:
            det = self.detector if detector is None else detector
            boxes = det.detect(img, prompt) if (detector is not None or self.detector_name != "none") else []
            crops = select_crops(boxes, (img.shape[1], img.shape[0]), max_boxes=max_boxes)
        t1 = t()
        feats = self.describe_queries([crop(img, b) for b in crops])
        t2 = t()
        stages: dict[str, float] = {}
        rows, sims = self.search_features(feats, top_k, rerank=rerank, timings=stages)
        t3 = t()
        if timings is not None:
            timings.update(detect=t1 - t0, describe=t2 - t1, total=t3 - t0, **stages)
        ids = self.store.ids
        out_crops, best = [], {}
        for b, r, s in zip(crops, rows, sims):
            results = []
            for rank, (row, score) in enumerate(zip(r, s), 1):
                iid = ids[int(row)]
                hit = Hit(rank, iid, self.dataset.source_path(iid), round(float(score), 6))
                results.append(hit)
                if iid not in best or hit.score > best[iid].score:
                    best[iid] = hit
            out_crops.append(CropResult([round(float(v), 1) for v in b.as_list()], b.label,
                                        None if b.score is None else round(float(b.score), 4), results))
        merged = sorted(best.values(), key=lambda x: -x.score)[:top_k]
        merged = [Hit(rank, m.id, m.path, m.score) for rank, m in enumerate(merged, 1)]
        return QueryResult(str(image) if not isinstance(image, np.ndarray) else "<array>", self.model, out_crops,
                           merged)

    def query(self, image: str | Path | np.ndarray, prompt: str | None = None, top_k: int = 5,
              max_boxes: int = 5, timings: dict[str, float] | None = None, *, detector=None,
              box: Sequence[float] | None = None, rerank: bool = True) -> dict[str, Any]:
        """One query image -> the documented JSON object (crops with their results, and a merged ranking); the
        arguments are search()'s."""
        return self.search(image, prompt, top_k, max_boxes, timings, detector=detector, box=box,
                           rerank=rerank).as_dict()
