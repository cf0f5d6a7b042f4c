"""Step `query`: a Searcher holds a dataset, its store, the model, the reranker and the detector, loaded once, and
answers query images with typed results (QueryResult.as_dict() is the documented JSON object)."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError, StoreError
from ..index import ExactIndex
from ..workspace import Workspace
from .detect import choose_detector
from .extract import open_store_for

log = logging.getLogger(__name__)
OFFLINE_DEFAULT = "lite"
OFFLINE_DEFAULT_SV = "lite-sv"  # lite + spatial verification: the default for query once its store exists


def default_query_model(dataset: str, data_dir: str | Path | None = None) -> str:
    """`lite-sv` when the dataset has a lite-sv store (extracted with `extract --model lite-sv`), else `lite`."""
    from ..store import store_path

    ddir = Workspace.resolve(data_dir).data_dir
    return OFFLINE_DEFAULT_SV if (store_path(ddir, dataset, OFFLINE_DEFAULT_SV) / "manifest.json").is_file() \
        else OFFLINE_DEFAULT


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
                 describer=None, *, workspace: Workspace | None = None, prompt: str | None = None,
                 exact: bool = False, index_candidates: int = 1000):
        """`detector` None is automatic, as in the CLI (pipeline.detect.choose_detector): `none` for plain queries;
        for a query with a prompt (`prompt` here is the default of `search`) `gdino` when its weights are present,
        else `tiles` (`gdino-cloud` when the options carry a token file or an endpoint)."""
        from ..data import load_dataset
        from ..device import resolve_device
        from ..registry import load_detector, load_model, load_reranker

        ws = workspace or Workspace.resolve(data_dir, weights_dir, device)
        self.workspace = ws
        self.data_dir = ws.data_dir
        self.dataset = load_dataset(self.data_dir, dataset)
        wdir = ws.weights_dir
        if describer is None:  # a missing or damaged store fails now, before seconds of model loading
            from ..config import load_model_config
            from ..store import Store, store_path

            Store.open(store_path(self.data_dir, dataset, load_model_config(model)["name"])).close()
        self.describer = describer or load_model(model, weights=weights, weights_dir=wdir, device=ws.device)
        self.model = self.describer.name
        self.device = resolve_device(ws.device)
        self.store = open_store_for(self.describer, self.data_dir, dataset)
        # rows searched: live, and their image still in the dataset (a convert after the last extract may have
        # removed images; their rows stay in the store until the next extract, but must never be returned)
        rows = self.store.rows_of(self.dataset.imlist)  # live rows only: a binary search, no dict over the store
        self.live = np.zeros(len(self.store), bool)
        self.live[rows[rows >= 0]] = True
        stale = self.store.num_live() - int(self.live.sum())
        if stale:
            log.warning("%d stored images of %r are no longer in the dataset and are left out (run `visearch extract "
                        "%s --model %s` to update the store)", stale, dataset, dataset, self.model)
        if not self.live.any():
            raise StoreError(f"the {self.model} store of dataset {dataset!r} is empty",
                             f"add images and run `visearch extract {dataset} --model {self.model}`")
        from ..index import open_index

        # the first stage: the store's FAISS index when it has one (refused when stale), else the exact scan
        self.index = (None if exact else open_index(self.store)) or ExactIndex(self.store, self.device, live=self.live)
        self.index_candidates = index_candidates
        self.reranker = load_reranker(self.describer.config, wdir, ws.device) if rerank else None
        self.prompt = prompt
        self._detector_options = dict(detector_options or {})
        self._auto_detector = detector is None
        self.detector_name = choose_detector(detector, prompt, wdir, self._detector_options)
        self.detector = load_detector(self.detector_name, weights_dir=wdir, device=ws.device,
                                      **self._detector_options)

    def _detector_for(self, prompt: str | None):
        """This Searcher's detector for a query with `prompt`: an automatic choice made without a prompt is made
        again (once) when a prompt comes, so a prompt is never silently dropped."""
        if self._auto_detector and prompt and self.detector_name == "none":
            from ..registry import load_detector

            self.detector_name = choose_detector(None, prompt, self.workspace.weights_dir, self._detector_options)
            log.info("detector: %s", self.detector_name)
            self.detector = load_detector(self.detector_name, weights_dir=self.workspace.weights_dir,
                                          device=self.workspace.device, **self._detector_options)
        return self.detector

    def describe_queries(self, images: list[np.ndarray]):
        """Features of query crops; a model may describe queries differently from database images (AMES float keeps
        query tokens in float32 while the database side is rounded through float16, as the reference does)."""
        return self.describer.extract_query(images)

    def search_features(self, feats, k: int, rerank: bool = True, timings: dict[str, float] | None = None):
        """Global search (and rerank) for already described crops: returns rows, scores `[nq, k']`.

        `timings`, when given, receives `search` and `rerank` seconds (both stages end with a copy to host numpy, so
        the wall times include all device work)."""
        shortlist_k = k
        use_rerank = rerank and self.reranker is not None
        if use_rerank:
            shortlist_k = max(k, self.reranker.shortlist_size)
        t0 = time.perf_counter()
        rows, sims = self.global_search(feats.global_, shortlist_k)
        t1 = time.perf_counter()
        if use_rerank:
            rows, sims = self.rerank_shortlist(feats, rows, sims)
        if timings is not None:
            timings.update(search=t1 - t0, rerank=time.perf_counter() - t1)
        return rows[:, :k], sims[:, :k]

    def global_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by exact cosine: the exact scan, or an approximate index's `index_candidates` (at least k) rescored
        exactly from the stored descriptors. A k beyond the candidates (eval's full ranking) continues with the exact
        ranking of the remaining rows."""
        from ..index import rescore
        from ..search import search_store

        if self.index.exact:
            return self.index.search(q, k)
        n_live = int(self.live.sum())
        m = min(n_live, max(k if k < n_live else 0, self.index_candidates))
        cand, _ = self.index.search(q, m)
        cand = np.where((cand >= 0) & self.live[np.clip(cand, 0, None)], cand, -1)  # only images in the dataset now
        rows, sims = rescore(q, self.store, cand, min(k, m))
        if rows.shape[1] < min(k, m):  # the index returned fewer than asked (e.g. sparse IVF lists): scan
            return search_store(q, self.store, k, device=self.device, live=self.live)
        if k > rows.shape[1]:
            er, es = search_store(q, self.store, k, device=self.device, live=self.live)
            tails = [~np.isin(er[i], rows[i]) for i in range(len(q))]
            rows = np.stack([np.concatenate([rows[i], er[i][t]]) for i, t in enumerate(tails)])
            sims = np.stack([np.concatenate([sims[i], es[i][t]]) for i, t in enumerate(tails)])
        return rows, sims

    def rerank_shortlist(self, feats, rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rerank global candidates `[nq, m]` (best first). A reranker reorders the head of the list (SuperGlobal:
        the first M, AMES: the first `shortlist`); the tail keeps its global order."""
        from ..rerankers.base import Shortlist

        sl = self.reranker.rerank(feats.global_, feats.local, Shortlist(rows, sims), self.store)
        m = sl.rows.shape[1]
        return np.concatenate([sl.rows, rows[:, m:]], 1), np.concatenate([sl.ranking_scores, sims[:, m:]], 1)

    def search(self, image: str | Path | np.ndarray, prompt: str | None = None, top_k: int = 5,
               max_boxes: int = 5, timings: dict[str, float] | None = None, *, detector=None,
               box: Sequence[float] | None = None, rerank: bool = True) -> QueryResult:
        """One query image -> its crops with their results, and a merged ranking.

        `detector` replaces this Searcher's detector for this query (the server keeps one per name); `box`
        `[x0, y0, x1, y1]` (pixels) searches only that region, as one crop labelled "region"; `rerank=False` keeps
        the global ranking."""
        from ..detectors.base import Box, clip_box, crop, select_crops
        from ..images import aspect_problem, check_aspect, load_rgb

        t = time.perf_counter
        t0 = t()
        img = load_rgb(image)
        name = str(image) if not isinstance(image, np.ndarray) else "<array>"
        check_aspect(img.shape[1], img.shape[0], name)  # bounded work: a 2000x1 strip is refused in one line
        if box is not None:
            b = clip_box(Box(*(float(v) for v in box), None, "region"), img.shape[1], img.shape[0])
            if b.width < 1 or b.height < 1:
                raise ImageError(f"region {list(box)} is empty inside the {img.shape[1]}x{img.shape[0]} image",
                                 "draw a box inside the photo")
            crops = [b]
        else:
            prompt = prompt if prompt is not None else self.prompt
            det = self._detector_for(prompt) if detector is None else detector
            boxes = det.detect(img, prompt)
            crops = select_crops(boxes, (img.shape[1], img.shape[0]), max_boxes=max_boxes)
        crops = [b for b in crops if aspect_problem(round(b.width), round(b.height)) is None]
        if not crops:
            raise ImageError(f"{name}: every crop is too elongated to describe", "draw a less extreme box")
        t1 = t()
        feats = self.describe_queries([crop(img, b) for b in crops])
        t2 = t()
        stages: dict[str, float] = {}
        rows, sims = self.search_features(feats, top_k, rerank=rerank, timings=stages)
        t3 = t()
        if timings is not None:
            timings.update(detect=t1 - t0, describe=t2 - t1, total=t3 - t0, **stages)
        out_crops, best = [], {}
        for b, r, s in zip(crops, rows, sims):
            results = []
            for rank, (iid, score) in enumerate(zip(self.store.id_list(r), s), 1):  # reads only these rows' ids
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
