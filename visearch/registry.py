"""Explicit registries: name -> factory, imported lazily so the CLI starts without torch."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from .config import default_weights_dir, load_model_config, model_names
from .errors import UsageError

# model family -> "module:function"; the function is build(config, weights, weights_dir, device) -> Describer
MODEL_FAMILIES = {
    "lite": "visearch.models.lite:build",
    "superglobal": "visearch.models.superglobal:build",
    "ames": "visearch.models.ames:build",
    "dinov2": "visearch.models.dinov2:build",
    "ames-dinov2": "visearch.models.ames_dinov2:build",
}

# reranker name -> "module:function"; build(config, weights_dir, device) -> Reranker
RERANKERS = {
    "superglobal": "visearch.rerankers.superglobal:build",
    "ames": "visearch.rerankers.ames:build",
    "spatial": "visearch.rerankers.spatial:build",
}

# detector name -> "module:function"; build(**options) -> Detector
DETECTORS = {
    "gdino": "visearch.detectors.grounding_dino:build",
    "gdino-cloud": "visearch.detectors.gdino_cloud:build",
    "tiles": "visearch.detectors.tiles:build_tiles",
    "whole-image": "visearch.detectors.whole_image:build",
    "none": "visearch.detectors.whole_image:build",  # the CLI's name for whole-image

}

# extract engine name -> "module:class"; Engine(**options) (see visearch.pipeline.extract.Engine)
ENGINES = {
    "local": "visearch.pipeline.extract:LocalEngine",
    "ray": "visearch.pipeline.ray_engine:RayEngine",
}


def _resolve(table: dict[str, str], kind: str, name: str) -> Callable[..., Any]:
    if name not in table:
        raise UsageError(f"unknown {kind} {name!r}", f"known: {', '.join(sorted(table))}")
    module, func = table[name].split(":")
    return getattr(importlib.import_module(module), func)


def available(kind: str) -> list[str]:
    return {"models": model_names(), "rerankers": sorted(RERANKERS), "detectors": sorted(DETECTORS)}[kind]


def load_model(name: str, weights: str | Path | None = None, weights_dir: str | Path | None = None,
               device: str = "auto", overrides: dict[str, Any] | None = None):
    """Build describer `name` (see `available("models")`). `weights` is a specific checkpoint file (else the
    default file name in `weights_dir`). Returns a Describer whose `describe(images)` gives `[N, D]` float32."""
    return build_model(load_model_config(name, overrides), weights, weights_dir, device)


def build_model(config: dict[str, Any], weights: str | Path | None = None, weights_dir: str | Path | None = None,
                device: str = "auto"):
    """Build the describer of an already resolved `config` (load_model_config's result). Another process (a Ray
    actor) rebuilds the driver's describer from the same dict, so config hooks run once, on the driver."""
    from .device import resolve_device

    build = _resolve(MODEL_FAMILIES, "model family", config["family"])
    wdir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    describer = build(config, Path(weights) if weights else None, wdir, resolve_device(device))
    if config.get("local", {}).get("kind") == "rootsift":  # any global model + weight-free RootSIFT local fields
        from .models.sift import with_local_sift

        describer = with_local_sift(describer, config)
    return describer


def load_reranker(config: dict[str, Any], weights_dir: str | Path | None = None, device: str = "auto"):
    """The reranker named in config["rerank"]["name"], or None when it is "none" or absent."""
    from .device import resolve_device

    name = config.get("rerank", {}).get("name", "none")
    if name == "none":
        return None
    wdir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    return _resolve(RERANKERS, "reranker", name)(config, wdir, resolve_device(device))


def load_engine(name: str, **options: Any):
    """The extract engine `name` ("local" or "ray") built with its options (EngineError when ray is missing)."""
    return _resolve(ENGINES, "engine", name)(**options)


def load_detector(name: str, **options: Any):
    return _resolve(DETECTORS, "detector", name)(**options)
