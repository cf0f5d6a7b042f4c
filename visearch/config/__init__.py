"""Named model configurations, shipped as package data in visearch/config/models/<name>.toml.

A config file holds `family` (which code builds it), optional `alias_of`, and tables such as `[describe]`,
`[search]` and `[rerank]`. Overrides merge onto the file's values; unknown names raise with the list of known ones.
The files are found through importlib.resources, so a wheel install reads the same files as a source checkout.
"""
from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UsageError

# A function applied to every resolved config (after overrides), in registration order; tests use it to shrink a
# model's input size in a subprocess without patching the modules that imported load_model_config.
ConfigHook = Callable[[dict[str, Any]], dict[str, Any]]
_HOOKS: list[ConfigHook] = []


def models_dir():
    """The packaged folder of model configs (an importlib.resources Traversable)."""
    return resources.files(__package__).joinpath("models")


def default_data_dir() -> Path:
    return Path(os.environ.get("VISEARCH_DATA_DIR") or "data")


def default_weights_dir() -> Path:
    return Path(os.environ.get("VISEARCH_WEIGHTS_DIR") or "weights")


def model_names() -> list[str]:
    return sorted(p.name[:-len(".toml")] for p in models_dir().iterdir() if p.name.endswith(".toml"))


def _read(name: str) -> dict[str, Any]:
    item = models_dir().joinpath(f"{name}.toml")
    if "/" in name or "\\" in name or name.startswith(".") or not item.is_file():
        raise UsageError(f"unknown model {name!r}", f"known models: {', '.join(model_names())}")
    return tomllib.loads(item.read_text(encoding="utf-8"))


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `overrides` wins. Returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def add_hook(hook: ConfigHook) -> None:
    """Apply `hook(config) -> config` to every config load_model_config returns from now on (this process)."""
    _HOOKS.append(hook)


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
    cfg = merge(cfg, overrides or {})
    cfg["name"] = name
    for hook in _HOOKS:
        cfg = hook(cfg)
    return cfg
