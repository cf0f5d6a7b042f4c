"""Step `eval`: the revisitop protocol over a dataset's store (queries cropped to their bbx, the full database
ranked, Easy/Medium/Hard), with each reranker's reference evaluation. The metrics themselves: visearch.metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError, StoreError
from ..workspace import Workspace
from .search import Searcher


def evaluate(dataset: str, model: str = "lite", data_dir: str | Path | None = None,
             weights: str | Path | None = None, weights_dir: str | Path | None = None, device: str = "auto",
             rerank: bool = True, quiet: bool = True, searcher: Searcher | None = None, *,
             workspace: Workspace | None = None, exact: bool = False) -> dict[str, Any]:
    """Revisitop protocol: queries cropped to their bbx, full ranking of the database, Easy/Medium/Hard mAP and mP@k.

    Returns {"dataset", "model", "global": {...}, "reranked": {...} or None} with per-protocol
    {"map", "mp@1", "mp@5", "mp@10"} in percent."""
    from .. import progress
    from ..images import crop_box, load_rgb
    from ..metrics import evaluate_protocols

    ws = workspace or Workspace.resolve(data_dir, weights_dir, device, quiet)
    s = searcher or Searcher(dataset, model, weights=weights, rerank=rerank, workspace=ws, exact=exact)
    ds = s.dataset
    if not ds.gnd:
        raise DatasetError(f"dataset {dataset!r} has no ground truth",
                           "convert it with --ground-truth FILE, or use a revisitop dataset with gnd_*.pkl")
    rows = s.store.rows_of(ds.imlist)  # the live row of each database image, -1 for none
    missing = np.nonzero(rows < 0)[0]
    if len(missing):
        raise StoreError(f"{len(missing)} database images of {dataset!r} have no descriptors (e.g. "
                         f"{ds.imlist[missing[0]]})", f"run `visearch extract {dataset} --model {s.model}`")
    stale = np.setdiff1d(np.nonzero(s.store.live)[0], rows)
    if len(stale):  # they would be ranked as images the ground truth knows nothing of
        raise StoreError(f"{len(stale)} descriptors in the {s.model} store of {dataset!r} are of images no longer in "
                         f"the dataset (e.g. {s.store.id_list(stale[:1])[0]})",
                         f"run `visearch extract {dataset} --model {s.model}`")
    # store rows -> imlist positions, so rankings index imlist as the ground truth does
    row_to_pos = np.full(len(s.store), -1, np.int64)
    row_to_pos[rows] = np.arange(len(rows))
    n = len(ds.imlist)
    use_rerank = s.reranker is not None and rerank
    # AMES's reference evaluation moves each protocol's ignored images behind the shortlist before reranking
    # (Medium: junk; Hard: junk + easy), so the shortlist holds only images that can count; SuperGlobal's does not.
    per_protocol = use_rerank and s.reranker.junk_behind_shortlist
    global_ranks: list[np.ndarray] = []
    reranked: dict[str, list[np.ndarray]] = {"all": [], "medium": [], "hard": []}
    with progress.task(f"eval {dataset} [{s.model}]", len(ds.qimlist), ws.quiet, unit="query") as advance:
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
