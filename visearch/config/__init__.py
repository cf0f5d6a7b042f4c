"""Named model configurations, shipped as package data in visearch/config/models/<name>.toml.

A config file holds `family` (which code builds it), optional `alias_of` (the file is another name for that model)
or `extends` (start from that model's file and state only what differs), and tables such as `[describe]`,
`[search]` and `[rerank]`; their keys, types and defaults are the typed schema of schema.py. Overrides merge onto the
file's values; unknown model names, tables and keys raise with the list of known ones.
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
    try:
        return tomllib.loads(item.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"model config {name}.toml is not valid TOML ({e})") from None


def _read_extended(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The file of `name` merged onto the file it `extends` (recursively), without the `extends` key."""
    if name in chain:
        raise UsageError(f"`extends` loop in model configs: {' -> '.join([*chain, name])}")
    cfg = _read(name)
    base = cfg.pop("extends", None)
    if base is None:
        return cfg
    parent = _read_extended(str(base), (*chain, name))
    if "alias_of" in parent:
        raise UsageError(f"model config {name!r} extends {base!r}, which is an alias", "extend the model it names")
    return merge(parent, cfg)


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
    """The resolved configuration of model `name` (aliases followed, `extends` applied, overrides merged, every key
    of the typed schema present with its default); `name` in the result is the canonical one. Unknown tables and
    keys raise UsageError with the known ones."""
    from .schema import resolve

    cfg = _read_extended(name)
    seen = {name}
    while "alias_of" in cfg:
        name = cfg["alias_of"]
        if name in seen:
            raise UsageError(f"alias loop in model configs at {name!r}")
        seen.add(name)
        cfg = _read_extended(name)
    cfg = resolve(merge(cfg, overrides or {}), name)
    cfg["name"] = name
    for hook in _HOOKS:
        cfg = hook(cfg)
    return cfg
