"""Named model configurations, kept as data in configs/models/<name>.toml.

A config file holds `family` (which code builds it), optional `alias_of`, and tables such as `[describe]`,
`[search]` and `[rerank]`. Overrides merge onto the file's values; unknown names raise with the list of known ones.
"""
from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def default_data_dir() -> Path:
    return Path(os.environ.get("VISEARCH_DATA_DIR") or "data")


def default_weights_dir() -> Path:
    return Path(os.environ.get("VISEARCH_WEIGHTS_DIR") or "weights")


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.toml"))


def _read(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / "models" / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown model {name!r}", f"known models: {', '.join(model_names())}")
    with open(path, "rb") as f:
        return tomllib.load(f)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `overrides` wins. Returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_model_config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved configuration of model `name` (aliases followed); `name` in the result is the canonical one."""
    cfg = _read(name)
    seen = {name}
    while "alias_of" in cfg:
        name = cfg["alias_of"]
        if name in seen:
            raise UsageError(f"alias loop in model configs at {name!r}")
        seen.add(name)
        cfg = _read(name)
    parents = []
    while "extends" in cfg:  # `extends = "lite"`: the parent's tables, with this file's values on top
        parent = cfg.pop("extends")
        if parent in seen:
            raise UsageError(f"extends loop in model configs at {parent!r}")
        seen.add(parent)
        parents.append(cfg)
        cfg = _read(parent)
    for child in reversed(parents):
        cfg = merge(cfg, child)
    cfg = merge(cfg, overrides or {})
    cfg["name"] = name
    return cfg
