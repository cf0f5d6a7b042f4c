"""Step `index build`: a FAISS first-stage index over a dataset's store (see visearch.index)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..workspace import Workspace


def build_index(dataset: str, model: str = "lite", data_dir: str | Path | None = None, factory: str | None = None,
                memory_budget: str | int | None = None, train_size: int | None = None, nprobe: int | None = None, *,
                workspace: Workspace | None = None):
    """Build (or rebuild) the FAISS index of a dataset's store; returns its visearch.index.IndexReport.
    memory_budget: bytes, or text like "4GB"; without factory and budget the rule of index.choose_factory picks."""
    from ..config import load_model_config
    from ..index import build_index as _build
    from ..index import parse_bytes
    from ..store import Store, store_path

    if factory and memory_budget:
        raise UsageError("--factory and --memory-budget cannot be combined", "the budget only picks a factory")
    ws = workspace or Workspace.resolve(data_dir)
    budget = parse_bytes(memory_budget) if isinstance(memory_budget, str) else memory_budget
    name = load_model_config(model)["name"]
    with Store.open(store_path(ws.data_dir, dataset, name)) as st:
        return _build(st, factory=factory, memory_budget=budget, train_size=train_size, nprobe=nprobe)[1]
