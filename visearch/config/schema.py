"""The typed schema of model configs: every key a model family reads, its type and its default, in one place.

A config file states the values it uses (with where they come from); what it leaves out takes the default here.
Unknown tables and keys are refused with the list of known ones, so a mistyped key never goes silently unused.
Fields marked `identity=False` do not change descriptors (batch sizes), so they are left out of a store's identity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

SCALES = [0.7071, 1.0, 1.4142]  # 1/sqrt(2), 1, sqrt(2): CVNet / SuperGlobal TEST.SCALE_LIST, used by every family


def _scales() -> list[float]:
    return list(SCALES)


def _not_identity(default: Any) -> Any:
    return field(default=default, metadata={"identity": False})


# ---- [describe] ------------------------------------------------------------------------------------------------------
@dataclass
class LiteDescribe:
    scales: list[float] = field(default_factory=_scales)
    gem_p: float = 3.0
    max_side: int = 320
    # absent from a stored config = the behaviour before these keys existed (every image resized to max_side), so an
    # old store's identity stays what it was built with; lite.toml sets the measured policy (no upscale, cap 640)
    upscale: bool = True
    min_side: int = 0


@dataclass
class SuperGlobalDescribe:
    depth: int = 101
    relup: bool = True
    scales: list[float] = field(default_factory=_scales)
    rgem: bool = True
    rgem_p: float = 2.5
    rgem_size: int = 5
    gem_p: float = 4.6
    max_side: int = 0
    batch_size: int = _not_identity(8)
    precision: str = "fp32"


@dataclass
class DinoV2Describe:
    """visearch/models/dinov2.py (`dinov2`): CLS token or GeM over the patch tokens."""

    pooling: str = "cls"
    gem_p: float = 3.0
    imsize: int = 0
    batch_size: int = _not_identity(8)


@dataclass
class AMESDinoV2Describe(SuperGlobalDescribe):
    """visearch/models/ames_dinov2.py: the global stage ("superglobal" on CVNet R101, or "cls") + SuperGlobal's keys."""

    global_stage: str = "superglobal"


# ---- [local] (models with local features) ----------------------------------------------------------------------------
@dataclass
class AMESLocal:
    scales: list[float] = field(default_factory=_scales)
    topk: int = 700
    max_side: int = 0


@dataclass
class AMESDinoV2Local:
    topk: int = 700
    imsize: int = 0


@dataclass
class SiftLocal:
    """RootSIFT keypoints for the `spatial` reranker (visearch/models/sift.py); optional for lite and superglobal."""

    kind: str = "rootsift"
    max_keypoints: int = 900
    max_side: int = 1024
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6


# ---- [weights] -------------------------------------------------------------------------------------------------------
@dataclass
class NoWeights:
    pass


@dataclass
class SuperGlobalWeights:
    file: str = "CVPR2022_CVNet_R101.pyth"


@dataclass
class AMESWeights:
    backbone: str = "CVPR2022_CVNet_R101.pyth"
    detector: str = "cvnet_detector.pt"
    itq: str = "itq_r101_cvnet_D128.npz"


@dataclass
class DinoV2Weights:
    backbone: str = "dinov2_vitb14_reg4_pretrain.pth"


@dataclass
class AMESDinoV2Weights:
    backbone: str = "dinov2_vitb14_reg4_pretrain.pth"
    detector: str = "dinov2_detector.pt"
    global_backbone: str = "CVPR2022_CVNet_R101.pyth"
    itq: str = "itq_dinov2_D128.npz"


# ---- [rerank] --------------------------------------------------------------------------------------------------------
@dataclass
class NoRerank:
    name: str = "none"


@dataclass
class SuperGlobalRerank:
    name: str = "superglobal"
    M: int = 400
    K: int = 9
    beta: float = 0.15
    batch_size: int = 8


@dataclass
class AMESRerank:
    name: str = "ames"
    variant: str = "dist"
    checkpoint: str = "cvnet_ames_dist.pt"
    shortlist: int = 100
    query_len: int = 600
    db_len: int = 50
    lam: float = 0.65
    gamma: float = 0.20
    batch_size: int = 50
    local_dim: int = 1024       # 768 for the DINOv2 checkpoints
    precision: str = "auto"     # auto (bf16 where the CPU/GPU has it) | fp32 | bf16 | fp16


@dataclass
class SpatialRerank:
    """visearch/rerankers/spatial.py: RootSIFT matching + USAC MAGSAC++ verification of the global top `shortlist`."""

    name: str = "spatial"
    shortlist: int = 100        # verified for a query crop with the full [local] max_keypoints
    max_shortlist: int = 300    # verified at most, for crops with fewer keypoints (same matching budget)
    ratio: float = 0.8
    mutual: bool = True
    model: str = "affine"
    threshold: float = 8.0
    confidence: float = 0.999
    max_iters: int = 1000
    seed: int = 0
    min_matches: int = 6
    min_inliers: int = 6
    cap: int = 50
    weight: float = 2.0
    batch: int = 16


# ---- shared tables ---------------------------------------------------------------------------------------------------
@dataclass
class Search:
    top_k: int = 5


@dataclass
class Store:
    dtype: str = "float16"


@dataclass(frozen=True)
class Family:
    """The tables a family's config may hold (None: the table is not allowed) and its rerankers by name."""

    describe: type
    weights: type
    rerank: dict[str, type]
    local: type | None = None
    optional_local: type | None = None  # a [local] table allowed only when the config has one (RootSIFT)


FAMILIES: dict[str, Family] = {
    "lite": Family(LiteDescribe, NoWeights, {"none": NoRerank, "spatial": SpatialRerank}, optional_local=SiftLocal),
    "superglobal": Family(SuperGlobalDescribe, SuperGlobalWeights, {"superglobal": SuperGlobalRerank,
                                                                    "none": NoRerank, "spatial": SpatialRerank},
                          optional_local=SiftLocal),
    "ames": Family(SuperGlobalDescribe, AMESWeights, {"ames": AMESRerank, "none": NoRerank}, local=AMESLocal),
    "dinov2": Family(DinoV2Describe, DinoV2Weights, {"none": NoRerank}),
    "ames-dinov2": Family(AMESDinoV2Describe, AMESDinoV2Weights, {"ames": AMESRerank, "none": NoRerank},
                          local=AMESDinoV2Local),
}
FILE_KEYS = ("family", "alias_of", "extends")  # keys of a config file outside its tables


def _table(cls: type, values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UsageError(f"{where} must be a table, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown key {where}.{unknown[0]}", f"known keys in {where}: {', '.join(known) or 'none'}")
    return dataclasses.asdict(cls(**values))


def resolve(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """A config as read (after `extends` and overrides) -> the complete config: every table of its family with
    every key, defaults filled in. Raises UsageError naming the first unknown family, table or key."""
    family = cfg.get("family")
    if family not in FAMILIES:
        raise UsageError(f"model config {name!r}: unknown family {family!r}", f"known: {', '.join(sorted(FAMILIES))}")
    fam = FAMILIES[family]
    tables: dict[str, Any] = {"describe": fam.describe, "weights": fam.weights, "search": Search, "store": Store}
    if fam.local is not None:
        tables["local"] = fam.local
    elif fam.optional_local is not None and "local" in cfg:
        tables["local"] = fam.optional_local
    known = [*FILE_KEYS, "name", *tables, "rerank"]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise UsageError(f"model config {name!r}: unknown table or key {unknown[0]!r}", f"known: {', '.join(known)}")
    out: dict[str, Any] = {"family": family}
    if "name" in cfg:
        out["name"] = cfg["name"]
    for key, cls in tables.items():
        out[key] = _table(cls, cfg.get(key, {}), f"{name} [{key}]")
    rr = cfg.get("rerank", {})
    rname = rr.get("name", next(iter(fam.rerank))) if isinstance(rr, dict) else None
    if rname not in fam.rerank:
        raise UsageError(f"{name} [rerank]: unknown reranker {rname!r} for family {family}",
                         f"known: {', '.join(fam.rerank)}")
    out["rerank"] = _table(fam.rerank[rname], {**rr, "name": rname}, f"{name} [rerank]")
    return out


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """What must match between a store and the model that reads it: the family and the settings that change the
    stored descriptors ([describe] without batch sizes, [store], and [local] for models with local features), with
    defaults filled in. Search and rerank settings may change at query time without re-extracting.

    Also normalises the identity recorded by an older store (which may hold batch sizes or leave defaults out), so
    that the two compare equal exactly when the descriptors would be the same. Keys the schema does not know are
    kept, so they still count as a difference; a family it does not know is returned as given."""
    fam = FAMILIES.get(cfg.get("family"))
    if fam is None:
        out = {"family": cfg.get("family"), "describe": cfg.get("describe", {}), "store": cfg.get("store", {})}
        if "local" in cfg:
            out["local"] = cfg["local"]
        return out
    out = {"family": cfg["family"]}
    local = fam.local or (fam.optional_local if "local" in cfg else None)
    for key, cls in (("describe", fam.describe), ("store", Store), ("local", local)):
        if cls is None:
            continue
        vals = cfg.get(key) or {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        full = {**dataclasses.asdict(cls(**{k: v for k, v in vals.items() if k in fields})),
                **{k: v for k, v in vals.items() if k not in fields}}
        out[key] = {k: v for k, v in full.items() if k not in fields or fields[k].metadata.get("identity", True)}
    return out
