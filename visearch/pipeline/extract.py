"""Step `extract`: describe a dataset's database images into its store, incrementally and crash-safely.

Three parts: `plan` compares the dataset with the store (what to tombstone, which images to describe, in which
batches), an `Engine` describes the planned batches, and the loop in `extract` commits the results shard by shard.
The engine is the part another backend (e.g. a Ray cluster) replaces: it must yield one result per planned batch,
in plan order, which is what makes a resumed run end with the same store, bit for bit, as an uninterrupted one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ImageError, StoreError
from ..fsutil import refused_writes
from ..workspace import Workspace


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


def store_identity(describer) -> dict[str, Any]:
    """What must match between a store and the model that reads it (config.schema.identity): the family and the
    settings that change descriptors; search and rerank settings and batch sizes may change without re-extracting."""
    from ..config.schema import identity

    return identity(describer.config)


def check_store(store, describer) -> None:
    """Refuse a store built by another model, configuration or weights file. A store whose recorded identity
    normalises to this model's (an older store that also recorded batch sizes, or left defaults out) is accepted."""
    from ..config.schema import identity

    ident = store_identity(describer)
    recorded = store.manifest.get("config")
    same = isinstance(recorded, dict) and identity(recorded) == ident
    store.check_compatible(describer.name, recorded if same else ident, describer.weights_sha256)


def open_store_for(describer, data_dir: Path, dataset: str):
    """The dataset's store for this describer, refused when it was built by another model, config or weights."""
    from ..store import Store, store_path

    store = Store.open(store_path(data_dir, dataset, describer.name))
    check_store(store, describer)
    return store


# ---- plan -----------------------------------------------------------------------------------------------------------
def fingerprint(path: Path) -> str | None:
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


@dataclass
class ExtractPlan:
    """What one extract run does: tombstone `dead_rows`, describe `batches` (ids), record `fingerprints`."""

    dead_rows: list[int]
    batches: list[list[str]]
    fingerprints: dict[str, str]
    changed: set[str] = field(default_factory=set)  # ids whose stored row died because the image changed

    @property
    def n_images(self) -> int:
        return sum(len(b) for b in self.batches)


def plan(ds, store, batch_size: int, report: ExtractReport) -> ExtractPlan:
    """Compare dataset `ds` with `store` (read under the writer's lock): rows of deleted or changed images die,
    new and changed images are batched. Counts and unreadable files go into `report`."""
    from ..images import check_aspect, image_size

    fingerprints = {i: fp for i in ds.imlist if (fp := fingerprint(ds.image_path(i))) is not None}
    # the store side in numpy (its ids are never a Python list): the live row of each image on disk, and whether
    # it was described from the same version of the file
    have = list(fingerprints)
    rows = store.rows_of(have)
    found = np.nonzero(rows >= 0)[0]
    same = np.zeros(len(have), bool)
    if len(found):
        now = np.array([fingerprints[have[j]].encode() for j in found], dtype=bytes)
        same[found] = store.fingerprints()[rows[found]] == now
    gone = np.setdiff1d(np.nonzero(store.live)[0], rows)  # live rows of images deleted or left out of the dataset
    report.removed += len(gone)
    redo = np.nonzero((rows >= 0) & ~same)[0]  # changed images: their old row dies, they are described again
    dead = np.union1d(gone, rows[redo]).tolist()
    changed = {have[j] for j in redo}
    todo = [i for i, ok in zip(have, same) if not ok]
    report.failed += [(i, "image file missing") for i in ds.imlist if i not in fingerprints]
    keys = []
    for i in todo:
        try:  # header only: batches group images of equal decoded size
            w, h = image_size(ds.image_path(i), apply_exif=ds.load_options()["apply_exif"])
            check_aspect(w, h, str(ds.image_path(i)))  # bounded work per image: refused with its reason
            keys.append((h, w, i))
        except ImageError as e:  # unreadable file: reported, never fatal
            report.failed.append((i, e.message))
    # added / updated are counted from what gets described (see count), so they never go negative
    return ExtractPlan(dead, plan_batches(keys, batch_size), fingerprints, changed)


def count(report: ExtractReport, p: ExtractPlan, described: Sequence[str]) -> None:
    """Final counts: `updated` = changed images described again, `added` = the other described ones, `removed` +=
    changed images that no longer decode (their old row is gone and nothing replaced it; they are in `failed`)."""
    report.updated = sum(1 for i in described if i in p.changed)
    report.added = len(described) - report.updated
    report.removed += len(p.changed) - report.updated


# ---- run: engines ---------------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """One planned batch, described: `ids` as planned, `features` for the `ok_ids` that decoded (None when none
    did), `errors` (id, reason) for the others."""

    ids: list[str]
    ok_ids: list[str]
    features: Any  # visearch.models.base.Features | None
    errors: list[tuple[str, str]]


@dataclass(frozen=True)
class ModelSpec:
    """How to build the run's describer again in another process (a Ray actor): picklable plain data. `config` is
    the resolved configuration (load_model_config's result, hooks applied); `batch_size` as extract's --batch-size."""

    config: dict[str, Any]
    weights: str | None
    weights_dir: str
    device: str
    batch_size: int | None = None

    def load(self):
        import copy

        from ..registry import build_model

        describer = build_model(copy.deepcopy(self.config), self.weights, self.weights_dir, self.device)
        if self.batch_size is not None:
            describer.batch_size = self.batch_size
        return describer


class Engine(Protocol):
    """Describes planned batches. `run` yields exactly one BatchResult per batch, in plan order. `describer` is the
    run's model in this process; `spec` rebuilds it elsewhere (None when the caller passed its own describer)."""

    def run(self, ds, batches: list[list[str]], describer, spec: ModelSpec | None = None) -> Iterator[BatchResult]:
        ...


@dataclass
class LocalEngine:
    """This process describes; images are decoded in `workers` processes (None: 0 below 32 images, else up to 4)."""

    workers: int | None = None

    def run(self, ds, batches: list[list[str]], describer, spec: ModelSpec | None = None) -> Iterator[BatchResult]:
        for ids, arrays, errors in _decoded_batches(ds, batches, self.workers):
            ok_ids = [i for i, a in zip(ids, arrays) if a is not None]
            ok = [a for a in arrays if a is not None]
            yield BatchResult(ids, ok_ids, describer.extract(ok) if ok else None, errors)


def _decoded_batches(ds, batches: list[list[str]], workers: int | None):
    """Yield (ids, arrays or None, errors) per planned batch, decoding in worker processes when worthwhile."""
    from ..images import ImageFileDataset, collate_list

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

        from ..workers import worker_init

        # workers die with this process (a SIGKILLed extract leaves no orphan); forked children never hold the store
        # lock (store.py drops it at fork)
        decoded = tud.DataLoader(items, batch_sampler=index_batches, num_workers=workers, collate_fn=collate_list,
                                 worker_init_fn=worker_init())
    for b, got in zip(batches, decoded):
        arrays = [a if isinstance(a, np.ndarray) else None for _, a in got]
        errors = [(i, a) for i, (_, a) in zip(b, got) if isinstance(a, str)]
        yield b, arrays, errors


# ---- commit ---------------------------------------------------------------------------------------------------------
def commit(writer, ids: list[str], parts: list[Any], fingerprints: dict[str, str]) -> None:
    """Append described rows (several batches' Features) to the store as one shard."""
    from ..models.base import Features

    g = np.concatenate([p.global_ for p in parts])
    local = None
    if parts[0].local:
        local = {k: np.concatenate([p.local[k] for p in parts]) for k in parts[0].local}
    writer.append(ids, Features(g, local), fingerprints=[fingerprints[i] for i in ids])
    writer.compact_if_due()  # keeps a long run at few shards, so each commit's manifest stays short


def extract(dataset: str, model: str = "lite", data_dir: str | Path | None = None, weights: str | Path | None = None,
            weights_dir: str | Path | None = None, device: str = "auto", batch_size: int = 8,
            workers: int | None = None, rebuild: bool = False, shard_rows: int | None = None,
            quiet: bool = True, describer=None, *, workspace: Workspace | None = None,
            engine: Engine | None = None) -> ExtractReport:
    """Describe the dataset's database images into its store, incrementally and crash-safely.

    New images are described, deleted ones tombstoned, changed ones (new size or mtime) tombstoned and re-described.
    Work is committed in shards of about `shard_rows` images, so a killed run resumes where it stopped. `workspace`,
    when given, supplies data_dir, weights_dir, device and quiet; `engine` describes the batches (default:
    LocalEngine(workers)). A store that cannot be written (read-only folder or file system) is a StoreError naming
    the path; a damaged shard (checksums are verified when the store is opened) is a StoreError naming the shard."""
    ws = workspace or Workspace.resolve(data_dir, weights_dir, device, quiet)
    with refused_writes(f"the store folder under {ws.data_dir / dataset}", StoreError):
        return _extract(dataset, model, weights, batch_size, workers, rebuild, shard_rows, describer, ws, engine)


def _extract(dataset, model, weights, batch_size, workers, rebuild, shard_rows, describer, ws: Workspace,
             engine) -> ExtractReport:
    from .. import progress
    from ..config import load_model_config
    from ..data import load_dataset
    from ..store import Store, StoreWriter, remove_store, store_path

    t0 = time.perf_counter()
    shard_rows = shard_rows or int(os.environ.get("VISEARCH_SHARD_ROWS", "512"))
    ds = load_dataset(ws.data_dir, dataset)
    spec = None
    if describer is None:
        spec = ModelSpec(load_model_config(model), str(weights) if weights else None, str(ws.weights_dir),
                         ws.device, batch_size)
        describer = spec.load()
    describer.batch_size = batch_size  # images per forward pass: the planned batches are not split again
    engine = engine or LocalEngine(workers)
    spath = store_path(ws.data_dir, dataset, describer.name)
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
                             dtype=describer.config["store"]["dtype"], dataset=dataset)
    check_store(store, describer)
    store.verify()  # every chunk's checksum: a damaged shard is named now, not met later by a query
    report = ExtractReport(dataset, describer.name, spath, total=len(ds.imlist))

    with StoreWriter(store) as writer:
        p = plan(ds, writer.store, batch_size, report)  # what is already stored, and is it still current?
        writer.tombstone(p.dead_rows)
        with progress.task(f"extract {dataset} [{describer.name}]", p.n_images, ws.quiet) as advance:
            pending_ids: list[str] = []
            pending: list[Any] = []
            described: list[str] = []
            for res in engine.run(ds, p.batches, describer, spec):
                report.failed += res.errors
                if res.features is not None:
                    described += res.ok_ids
                    pending_ids += res.ok_ids
                    pending.append(res.features)
                advance(len(res.ids))
                if len(pending_ids) >= shard_rows:
                    commit(writer, pending_ids, pending, p.fingerprints)
                    pending_ids, pending = [], []
            if pending_ids:
                commit(writer, pending_ids, pending, p.fingerprints)
        count(report, p, described)
        writer.compact()
        from ..index import update_index

        report.index = update_index(writer.store)  # under the writer lock; None when the store has no index
    report.seconds = time.perf_counter() - t0
    return report
