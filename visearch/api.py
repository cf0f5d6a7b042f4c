"""The public library API: a stable import surface over the pipeline steps (visearch/pipeline/). The CLI only
parses arguments, calls these and renders results."""
from __future__ import annotations

from .metrics import compute_map, evaluate_protocols
from .pipeline.convert import convert
from .pipeline.detect import choose_detector, default_detector, detect
from .pipeline.evaluate import evaluate
from .pipeline.extract import Engine, ExtractReport, LocalEngine, extract, open_store_for, plan_batches, store_identity
from .pipeline.index import build_index
from .pipeline.ray_engine import RayEngine  # ray itself is imported only when a RayEngine is made
from .pipeline.search import CropResult, Hit, QueryResult, Searcher, default_query_model
from .registry import load_model
from .workspace import Workspace

__all__ = ["CropResult", "Engine", "ExtractReport", "Hit", "LocalEngine", "QueryResult", "RayEngine", "Searcher",
           "Workspace", "build_index", "choose_detector", "compute_map", "convert", "default_detector",
           "default_query_model", "detect", "evaluate", "evaluate_protocols", "extract", "load_model", "open_store_for",
           "plan_batches", "store_identity"]
