"""The typed library API behind every command. The CLI only parses arguments, calls these and renders results."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import default_data_dir, default_weights_dir
from .errors import DatasetError, ImageError, StoreError, UsageError

log = logging.getLogger(__name__)


def _data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


def _weights_dir(weights_dir: str | Path | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else default_weights_dir()


def store_identity(describer) -> dict[str, Any]:
    """What must match between a store and the model that reads it: family, describe settings and, for models with
    local features, the [local] settings (search and rerank settings may change at query time without re-extracting)."""
    cfg = describer.config
    out = {"family": cfg.get("family"), "describe": cfg.get("describe", {}), "store": cfg.get("store", {})}
    if "local" in cfg:  # only then: the identity (and so the stores) of global-only models stays as it was
        out["local"] = cfg["local"]
    return out


# ---- convert --------------------------------------------------------------------------------------------------------
def convert(source: str | Path, name: str, data_dir: str | Path | None = None,
            ground_truth: str | Path | None = None, replace: bool = False, quiet: bool = True):
    """Folder of images (or a revisitop dataset folder) -> `<data_dir>/<name>` in revisitop layout.

    `replace` allows converting a different source folder into an existing dataset name."""
    from . import dataset, progress

    with progress.task(f"convert {name}", None, quiet) as advance:
        return dataset.convert(source, _data_dir(data_dir), name, ground_truth=ground_truth, progress=advance,
                               on_total=advance.set_total, replace=replace)


# ---- extract --------------------------------------------------------------------------------------------------------
@dataclass
class ExtractReport:
    dataset: str
    model: str
    store: Path
    added: int = 0
    removed: int = 0
    updated: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    total: int = 0
    seconds: float = 0.0
    index: Any = None  # visearch.index.IndexReport when the store has an index that extract brought up to date

    @property
    def images_per_s(self) -> float:
        return (self.added + self.updated) / self.seconds if self.seconds > 0 else 0.0


def _fingerprint(path: Path) -> str | None:
    """Cheap change detector for a dataset image (None when it is missing): convert rewrites a changed source, so
    size and mtime change."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def plan_batches(keys: Sequence[tuple[int, int, str]], batch_size: int) -> list[list[str]]:
    """Group ids of equal (height, width) into batches, in a deterministic order (sorted by size, then id).

    Deterministic so that a resumed run (whose done batches are a prefix of this plan) forms exactly the batches an
    uninterrupted run would, which makes the resumed store bit-identical."""
    batches: list[list[str]] = []
    cur: list[str] = []
    cur_size = None
    for h, w, i in sorted(keys):
        if cur and ((h, w) != cur_size or len(cur) >= batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
        cur_size = (h, w)
    if cur:
        batches.append(cur)
    return batches


def open_store_for(describer, data_dir: Path, dataset: str):
    from .store import Store, store_path

    store = Store.open(store_path(data_dir, dataset, describer.name))
    store.check_compatible(describer.name, store_identity(describer), describer.weights_sha256)
    return store


def extract(dataset: str, model: str = "lite", data_dir: str | Path | None = None, weights: str | Path | None = None,
            weights_dir: str | Path | None = None, device: str = "auto", batch_size: int = 8,
            workers: int | None = None, rebuild: bool = False, shard_rows: int | None = None,
            quiet: bool = True, describer=None) -> ExtractReport:
    """Describe the dataset's database images into its store, incrementally and crash-safely.

    New images are described, deleted ones tombstoned, changed ones (new size or mtime) tombstoned and re-described.
    Work is committed in shards of about `shard_rows` images, so a killed run resumes where it stopped."""
    from . import progress
    from .dataset import load_dataset
    from .images import image_size
    from .registry import load_model
    from .store import Store, StoreWriter, remove_store, store_path

    t0 = time.perf_counter()
    shard_rows = shard_rows or int(os.environ.get("VISEARCH_SHARD_ROWS", "512"))
    ddir = _data_dir(data_dir)
    ds = load_dataset(ddir, dataset)
    describer = describer or load_model(model, weights=weights, weights_dir=_weights_dir(weights_dir), device=device)
    spath = store_path(ddir, dataset, describer.name)
    identity = store_identity(describer)
    if rebuild:
        remove_store(spath)  # refused while another extract writes there
    try:
        store = Store.open(spath)
    except StoreError:
        if (spath / "manifest.json").exists() and not rebuild:
            raise
        store = Store.create(spath, model=describer.name, config=identity, dim=describer.dim,
                             weights_sha256=describer.weights_sha256, local_fields=describer.local_fields,
                             dtype=describer.config.get("store", {}).get("dtype", "float16"), dataset=dataset)
    store.check_compatible(describer.name, identity, describer.weights_sha256)
    report = ExtractReport(dataset, describer.name, spath, total=len(ds.imlist))

    with StoreWriter(store) as writer:
        # what is already stored, and is it still current?
        fingerprints = {i: fp for i in ds.imlist if (fp := _fingerprint(ds.image_path(i))) is not None}
        stored = _stored_fingerprints(writer.store)
        dead = []
        for row, (i, fp) in stored.items():
            if i not in fingerprints:
                dead.append(row)
                report.removed += 1
            elif fp != fingerprints[i]:
                dead.append(row)
                report.updated += 1
        writer.tombstone(dead)
        dead_set = set(dead)
        current = {i for row, (i, fp) in stored.items() if row not in dead_set}
        todo = [i for i in ds.imlist if i in fingerprints and i not in current]
        missing = [i for i in ds.imlist if i not in fingerprints]
        report.failed += [(i, "image file missing") for i in missing]
        keys = []
        for i in todo:
            try:  # header only: batches group images of equal decoded size
                w, h = image_size(ds.image_path(i), apply_exif=ds.load_options()["apply_exif"])
                keys.append((h, w, i))
            except ImageError as e:  # unreadable file: reported, never fatal
                report.failed.append((i, e.message))
        batches = plan_batches(keys, batch_size)
        n_todo = sum(len(b) for b in batches)
        report.added = n_todo - report.updated
        with progress.task(f"extract {dataset} [{describer.name}]", n_todo, quiet) as advance:
            pending_ids: list[str] = []
            pending: list[Any] = []
            for batch_ids, arrays, errors in _decoded_batches(ds, batches, workers):
                report.failed += errors
                ok_ids = [i for i, a in zip(batch_ids, arrays) if a is not None]
                ok = [a for a in arrays if a is not None]
                if ok:
                    pending_ids += ok_ids
                    pending.append(describer.extract(ok))
                advance(len(batch_ids))
                if len(pending_ids) >= shard_rows:
                    _flush(writer, pending_ids, pending, fingerprints)
                    pending_ids, pending = [], []
            if pending_ids:
                _flush(writer, pending_ids, pending, fingerprints)
        writer.compact()
        from .index import update_index

        report.index = update_index(writer.store)  # under the writer lock; None when the store has no index
    report.seconds = time.perf_counter() - t0
    return report


def _stored_fingerprints(store) -> dict[int, tuple[str, str]]:
    """row -> (id, fingerprint) for live rows."""
    out = {}
    fps = store.fingerprints()
    for row, (i, ok) in enumerate(zip(store.ids, store.live)):
        if ok:
            out[row] = (i, fps[row])
    return out


def _flush(writer, ids: list[str], parts: list[Any], fingerprints: dict[str, str]) -> None:
    from .models.base import Features

    g = np.concatenate([p.global_ for p in parts])
    local = None
    if parts[0].local:
        local = {k: np.concatenate([p.local[k] for p in parts]) for k in parts[0].local}
    writer.append(ids, Features(g, local), fingerprints=[fingerprints[i] for i in ids])


def _decoded_batches(ds, batches: list[list[str]], workers: int | None):
    """Yield (ids, arrays or None, errors) per planned batch, decoding in worker processes when worthwhile."""
    from .images import ImageFileDataset, collate_list

    items = ImageFileDataset([ds.image_path(i) for b in batches for i in b], **ds.load_options())
    n = len(items)
    if workers is None:
        workers = 0 if n < 32 else min(4, max(1, (os.cpu_count() or 2) - 1))
    index_batches, k = [], 0
    for b in batches:
        index_batches.append(list(range(k, k + len(b))))
        k += len(b)
    if workers == 0:
        decoded = ([items[i] for i in ib] for ib in index_batches)
    else:
        import torch.utils.data as tud

        decoded = tud.DataLoader(items, batch_sampler=index_batches, num_workers=workers, collate_fn=collate_list)
    for b, got in zip(batches, decoded):
        arrays = [a if isinstance(a, np.ndarray) else None for _, a in got]
        errors = [(i, a) for i, (_, a) in zip(b, got) if isinstance(a, str)]
        yield b, arrays, errors


# ---- index ----------------------------------------------------------------------------------------------------------
def build_index(dataset: str, model: str = "lite", data_dir: str | Path | None = None, factory: str | None = None,
                memory_budget: str | int | None = None, train_size: int | None = None, nprobe: int | None = None):
    """Build the FAISS first-stage index of a dataset's store (see visearch.index); returns its IndexReport.
    memory_budget: bytes, or text like "4GB"; without factory and budget the rule of index.choose_factory picks."""
    from .config import load_model_config
    from .index import build_index as _build
    from .index import parse_bytes
    from .store import Store, store_path

    if factory and memory_budget:
        raise UsageError("--factory and --memory-budget cannot be combined", "the budget only picks a factory")
    budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
    name = load_model_config(model)["name"]
    with Store.open(store_path(_data_dir(data_dir), dataset, name)) as st:
        return _build(st, factory=factory, memory_budget=budget, train_size=train_size, nprobe=nprobe)[1]


# ---- query ----------------------------------------------------------------------------------------------------------
class Searcher:
    """Holds a dataset, its store, the model, the reranker and the detector, loaded once for many queries."""

    def __init__(self, dataset: str, model: str = "lite", data_dir: str | Path | None = None,
                 weights: str | Path | None = None, weights_dir: str | Path | None = None, device: str = "auto",
                 rerank: bool = True, detector: str | None = None, detector_options: dict[str, Any] | None = None,
                 describer=None, exact: bool = False, index_candidates: int = 1000):
        from .dataset import load_dataset
        from .device import resolve_device
        from .registry import load_detector, load_model, load_reranker

        self.data_dir = _data_dir(data_dir)
        self.dataset = load_dataset(self.data_dir, dataset)
        wdir = _weights_dir(weights_dir)
        self.describer = describer or load_model(model, weights=weights, weights_dir=wdir, device=device)
        self.model = self.describer.name
        self.device = resolve_device(device)
        self.store = open_store_for(self.describer, self.data_dir, dataset)
        if self.store.num_live() == 0:
            raise StoreError(f"the {self.model} store of dataset {dataset!r} is empty",
                             f"add images and run `visearch extract {dataset} --model {self.model}`")
        from .index import open_index

        # the first stage: the store's FAISS index when it has one (refused when stale), else the exact scan
        self.index = None if exact else open_index(self.store)
        self.index_candidates = index_candidates
        self.reranker = load_reranker(self.describer.config, wdir, device) if rerank else None
        self.detector_name = detector or "none"
        self.detector = load_detector(self.detector_name, weights_dir=wdir, device=device, **(detector_options or {}))

    def describe_queries(self, images: list[np.ndarray]):
        """Features of query crops; a model may describe queries differently from database images (AMES float keeps
        query tokens in float32 while the database side is rounded through float16, as the reference does)."""
        return getattr(self.describer, "extract_query", self.describer.extract)(images)

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
        """Top-k by exact cosine: the exact scan, or the index's `index_candidates` (at least k) rescored exactly
        from the stored descriptors. A k beyond the candidates (eval's full ranking) continues with the exact
        ranking of the remaining rows."""
        from .index import rescore
        from .search import search_store

        if self.index is None:
            return search_store(q, self.store, k, device=self.device)
        n_live = self.store.num_live()
        m = min(n_live, max(k if k < n_live else 0, self.index_candidates))
        cand, _ = self.index.search(q, m)
        rows, sims = rescore(q, self.store, cand, min(k, m))
        if rows.shape[1] < min(k, m):  # the index returned fewer than asked (e.g. sparse IVF lists): scan
            return search_store(q, self.store, k, device=self.device)
        if k > rows.shape[1]:
            er, es = search_store(q, self.store, k, device=self.device)
            tails = [~np.isin(er[i], rows[i]) for i in range(len(q))]
            rows = np.stack([np.concatenate([rows[i], er[i][t]]) for i, t in enumerate(tails)])
            sims = np.stack([np.concatenate([sims[i], es[i][t]]) for i, t in enumerate(tails)])
        return rows, sims

    def rerank_shortlist(self, feats, rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rerank global candidates `[nq, m]` (best first). A reranker reorders the head of the list (SuperGlobal:
        the first M, AMES: the first `shortlist`); the tail keeps its global order."""
        from .rerankers.base import Shortlist

        sl = self.reranker.rerank(feats.global_, feats.local, Shortlist(rows, sims), self.store)
        m = sl.rows.shape[1]
        return np.concatenate([sl.rows, rows[:, m:]], 1), np.concatenate([sl.sims, sims[:, m:]], 1)

    def query(self, image: str | Path | np.ndarray, prompt: str | None = None, top_k: int = 5,
              max_boxes: int = 5, timings: dict[str, float] | None = None) -> dict[str, Any]:
        """One query image -> the documented JSON object (crops with their results, and a merged ranking)."""
        from .detectors.base import crop, select_crops
        from .images import load_rgb

        t = time.perf_counter
        t0 = t()
        img = load_rgb(image)
        boxes = self.detector.detect(img, prompt) if self.detector_name != "none" else []
        crops = select_crops(boxes, (img.shape[1], img.shape[0]), max_boxes=max_boxes)
        t1 = t()
        feats = self.describe_queries([crop(img, b) for b in crops])
        t2 = t()
        stages: dict[str, float] = {}
        rows, sims = self.search_features(feats, top_k, timings=stages)
        t3 = t()
        if timings is not None:
            timings.update(detect=t1 - t0, describe=t2 - t1, total=t3 - t0, **stages)
        ids = self.store.ids
        out_crops, best = [], {}
        for b, r, s in zip(crops, rows, sims):
            results = []
            for rank, (row, score) in enumerate(zip(r, s), 1):
                iid = ids[int(row)]
                hit = {"id": iid, "path": self.dataset.source_path(iid), "score": round(float(score), 6)}
                results.append({"rank": rank, **hit})
                if iid not in best or hit["score"] > best[iid]["score"]:
                    best[iid] = hit
            out_crops.append({"box": [round(float(v), 1) for v in b.as_list()], "label": b.label,
                              "score": None if b.score is None else round(float(b.score), 4), "results": results})
        merged = sorted(best.values(), key=lambda x: -x["score"])[:top_k]
        merged = [{"rank": rank, **m} for rank, m in enumerate(merged, 1)]
        return {"query": str(image) if not isinstance(image, np.ndarray) else "<array>", "model": self.model,
                "crops": out_crops, "merged": merged}


# ---- evaluate -------------------------------------------------------------------------------------------------------
def evaluate(dataset: str, model: str = "lite", data_dir: str | Path | None = None,
             weights: str | Path | None = None, weights_dir: str | Path | None = None, device: str = "auto",
             rerank: bool = True, quiet: bool = True, searcher: Searcher | None = None,
             exact: bool = False) -> dict[str, Any]:
    """Revisitop protocol: queries cropped to their bbx, full ranking of the database, Easy/Medium/Hard mAP and mP@k.

    Returns {"dataset", "model", "global": {...}, "reranked": {...} or None} with per-protocol
    {"map", "mp@1", "mp@5", "mp@10"} in percent."""
    from . import progress
    from .evaluate import evaluate_protocols
    from .images import crop_box, load_rgb

    s = searcher or Searcher(dataset, model, data_dir, weights, weights_dir, device, rerank=rerank, exact=exact)
    ds = s.dataset
    if not ds.gnd:
        raise DatasetError(f"dataset {dataset!r} has no ground truth",
                           "convert it with --ground-truth FILE, or use a revisitop dataset with gnd_*.pkl")
    live_rows = s.store.live_rows_by_id()
    missing = [i for i in ds.imlist if i not in live_rows]
    if missing:
        raise StoreError(f"{len(missing)} database images of {dataset!r} have no descriptors (e.g. {missing[0]})",
                         f"run `visearch extract {dataset} --model {s.model}`")
    # store rows -> imlist positions, so rankings index imlist as the ground truth does
    row_to_pos = np.full(len(s.store), -1, np.int64)
    for pos, i in enumerate(ds.imlist):
        row_to_pos[live_rows[i]] = pos
    n = len(ds.imlist)
    use_rerank = s.reranker is not None and rerank
    # AMES's reference evaluation moves each protocol's ignored images behind the shortlist before reranking
    # (Medium: junk; Hard: junk + easy), so the shortlist holds only images that can count; SuperGlobal's does not.
    per_protocol = use_rerank and getattr(s.reranker, "junk_behind_shortlist", False)
    global_ranks: list[np.ndarray] = []
    reranked: dict[str, list[np.ndarray]] = {"all": [], "medium": [], "hard": []}
    with progress.task(f"eval {dataset} [{s.model}]", len(ds.qimlist), quiet, unit="query") as advance:
        for qi in range(len(ds.qimlist)):
            img = load_rgb(ds.query_path(qi), **ds.load_options())
            bbx = ds.gnd[qi].get("bbx")
            if bbx is not None:
                img = crop_box(img, bbx)
            feats = s.describe_queries([img])
            rows, sims = s.search_features(feats, n, rerank=False)  # the full global ranking
            global_ranks.append(row_to_pos[rows[0]])
            if per_protocol:
                g = ds.gnd[qi]
                junk = np.asarray(g.get("junk", []), np.int64)
                moved_sets = {"medium": junk, "hard": np.concatenate([junk, np.asarray(g.get("easy", []), np.int64)])}
                for key, moved in moved_sets.items():
                    back = np.isin(row_to_pos[rows[0]], moved)
                    order = np.concatenate([np.nonzero(~back)[0], np.nonzero(back)[0]])  # stable partition
                    rr, _ = s.rerank_shortlist(feats, rows[:, order], sims[:, order])
                    reranked[key].append(row_to_pos[rr[0]])
            elif use_rerank:
                rr, _ = s.rerank_shortlist(feats, rows, sims)
                reranked["all"].append(row_to_pos[rr[0]])
            advance(1)
    out = {"dataset": dataset, "model": s.model,
           "global": evaluate_protocols(np.stack(global_ranks, 1), ds.gnd), "reranked": None}
    if per_protocol:  # as the reference: Easy and Medium from the Medium pass, Hard from the Hard pass
        res = evaluate_protocols(np.stack(reranked["medium"], 1), ds.gnd)
        res["hard"] = evaluate_protocols(np.stack(reranked["hard"], 1), ds.gnd)["hard"]
        out["reranked"] = res
    elif use_rerank:
        out["reranked"] = evaluate_protocols(np.stack(reranked["all"], 1), ds.gnd)
    return out


# ---- detect ---------------------------------------------------------------------------------------------------------
def default_detector(weights_dir: str | Path | None = None) -> str:
    """`gdino` when its weights are present, else the weight-free `tiles`."""
    try:
        from .detectors.grounding_dino import available
    except ImportError:
        return "tiles"
    return "gdino" if available(_weights_dir(weights_dir)) else "tiles"


def detect(image: str | Path, prompt: str | None = None, detector: str | None = None,
           weights_dir: str | Path | None = None, **options: Any) -> tuple[str, list[Any]]:
    """Boxes for one image: (detector name used, list of Box)."""
    from .images import load_rgb
    from .registry import load_detector

    name = detector or default_detector(weights_dir)
    det = load_detector(name, weights_dir=_weights_dir(weights_dir), **options)
    return name, det.detect(load_rgb(image), prompt)


def read_query_list(args: Sequence[str], stdin_lines: Sequence[str] | None = None) -> list[str]:
    """Query arguments: image paths, `-` for stdin (one path per line), or a .txt/.lst file of paths."""
    out: list[str] = []
    for a in args:
        if a == "-":
            out += [ln.strip() for ln in (stdin_lines or []) if ln.strip()]
        elif a.lower().endswith((".txt", ".lst")) and Path(a).is_file():
            out += [ln.strip() for ln in Path(a).read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            out.append(a)
    if not out:
        raise UsageError("no query images given", "pass image paths, a .txt list, or - to read paths from stdin")
    return out
