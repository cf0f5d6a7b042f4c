"""Weight-free RootSIFT local features (Lowe, IJCV 2004; RootSIFT: Arandjelovic & Zisserman, CVPR 2012) for the
`spatial` reranker, added to any global model through its config (`[local] kind = "rootsift"`).

Per image: the grayscale image (long side capped at `max_side`, INTER_AREA), OpenCV SIFT keypoints, the strongest
`max_keypoints` by detector response kept (ties broken by position, size, angle so the choice is deterministic).
Stored per image (fixed shapes, so the store keeps one chunk per row and field):
  `kp_desc` uint8 [K, 64]: RootSIFT, 4 bits per dimension, two dimensions per byte (low nibble first). A SIFT
      descriptor d (OpenCV: integers 0..255) becomes q = round(sqrt(d) * 15 / 16), so q / |q| is RootSIFT
      sqrt(d / sum(d)) up to the 4-bit rounding (RootSIFT is proportional to sqrt(d)).
  `kp_xy` float16 [K, 2]: keypoint x, y in pixels of the capped image; NaN rows are padding.
With K = 900: 61.2 KB of local data per image (+ 2.5 KB for lite's 1280-d float16 global descriptor) <= 64 KiB.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ImageError, ModelError
from .base import Describer, Features, LocalField

DEFAULT_LOCAL: dict[str, Any] = {"kind": "rootsift", "max_keypoints": 900, "max_side": 1024,
                                 "contrast_threshold": 0.04, "edge_threshold": 10.0, "sigma": 1.6}
DESC_BYTES = 64  # 128 dimensions x 4 bits
FIELDS = ("kp_desc", "kp_xy")


def local_fields(max_keypoints: int) -> dict[str, LocalField]:
    return {"kp_desc": LocalField((max_keypoints, DESC_BYTES), "uint8"), "kp_xy": LocalField((max_keypoints, 2), "float16")}


def pack_rootsift(sift: np.ndarray) -> np.ndarray:
    """OpenCV SIFT descriptors `[n, 128]` (values 0..255) -> packed 4-bit RootSIFT `[n, 64]` uint8."""
    q = np.clip(np.rint(np.sqrt(np.maximum(sift, 0).astype(np.float32)) * (15.0 / 16.0)), 0, 15).astype(np.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_rootsift(packed: np.ndarray) -> np.ndarray:
    """Packed `[..., 64]` uint8 -> L2-normalised RootSIFT `[..., 128]` float32 (all-zero rows stay zero)."""
    p = np.asarray(packed, np.uint8)
    q = _NIBBLES[p].reshape(p.shape[:-1] + (2 * p.shape[-1],))
    norm = np.sqrt(np.einsum("...i,...i->...", q, q))[..., None]
    return q / np.maximum(norm, 1e-12)


_NIBBLES = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=1).astype(np.float32)  # byte -> (low, high)


@dataclass
class RootSIFT:
    """RootSIFT extractor. `describe(rgb)` -> {"kp_desc": [K, 64] uint8, "kp_xy": [K, 2] float16} (NaN padding)."""

    max_keypoints: int = 900
    max_side: int = 1024
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6

    def __post_init__(self) -> None:
        if self.max_keypoints < 1 or self.max_side < 32:
            raise ModelError("bad [local] settings for rootsift", "need max_keypoints >= 1 and max_side >= 32")
        self._sift = None

    @classmethod
    def from_config(cls, local: dict[str, Any]) -> "RootSIFT":
        c = {**DEFAULT_LOCAL, **local}
        if c["kind"] != "rootsift":
            raise ModelError(f"unknown [local] kind {c['kind']!r}", "use kind = \"rootsift\"")
        return cls(int(c["max_keypoints"]), int(c["max_side"]), float(c["contrast_threshold"]),
                   float(c["edge_threshold"]), float(c["sigma"]))

    @property
    def fields(self) -> dict[str, LocalField]:
        return local_fields(self.max_keypoints)

    def keypoints(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 `[H, W, 3]` -> (xy float32 `[n, 2]` in the capped image, SIFT descriptors float32 `[n, 128]`),
        n <= max_keypoints, strongest first."""
        import cv2

        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise ImageError(f"rootsift expects RGB uint8 arrays [H, W, 3], got {getattr(rgb, 'shape', type(rgb))}",
                             "use visearch.images.load_rgb")
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        if max(h, w) > self.max_side:
            s = self.max_side / max(h, w)
            gray = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        if self._sift is None:
            self._sift = cv2.SIFT_create(0, 3, self.contrast_threshold, self.edge_threshold, self.sigma)
        kps = self._sift.detect(gray, None)
        if not kps:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
        a = np.array([(k.pt[0], k.pt[1], k.size, k.angle, k.response) for k in kps], np.float64)
        order = np.lexsort((a[:, 3], a[:, 2], a[:, 1], a[:, 0], -a[:, 4]))[:self.max_keypoints]
        kps = [kps[i] for i in order]
        kps, desc = self._sift.compute(gray, kps)
        if desc is None or not kps:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
        xy = np.array([k.pt for k in kps], np.float32)
        return xy, desc.astype(np.float32)

    def describe(self, rgb: np.ndarray) -> dict[str, np.ndarray]:
        xy, desc = self.keypoints(rgb)
        k, n = self.max_keypoints, len(xy)
        out = {"kp_desc": np.zeros((k, DESC_BYTES), np.uint8), "kp_xy": np.full((k, 2), np.nan, np.float16)}
        out["kp_desc"][:n] = pack_rootsift(desc)
        out["kp_xy"][:n] = xy.astype(np.float16)
        return out

    def describe_batch(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Stacked fields `{"kp_desc": [N, K, 64], "kp_xy": [N, K, 2]}`."""
        per = [self.describe(im) for im in images]
        if not per:
            return {k: np.zeros((0,) + f.shape, f.dtype) for k, f in self.fields.items()}
        return {k: np.stack([p[k] for p in per]) for k in FIELDS}


@dataclass
class WithLocalSIFT(Describer):
    """A global describer plus RootSIFT local fields: `extract` gives the inner model's global descriptors and
    `kp_desc` / `kp_xy` for each image (the native decoded image, capped at [local] max_side)."""

    inner: Any = None
    sift: RootSIFT | None = None

    def extract(self, images: Sequence[np.ndarray]) -> Features:
        g = self.inner.extract(images).global_
        return Features(global_=g, local=self.sift.describe_batch(images))

    def describe(self, images):
        """Global descriptors only (no keypoints computed), as the inner model gives them."""
        return self.inner.describe(images)

    def extract_query(self, images: Sequence[np.ndarray]) -> Features:
        g = getattr(self.inner, "extract_query", self.inner.extract)(images).global_
        return Features(global_=g, local=self.sift.describe_batch(images))


def with_local_sift(inner: Describer, config: dict[str, Any]) -> WithLocalSIFT:
    """Wrap `inner` (built from `config`) so that it also extracts RootSIFT; `config["local"]` gets its defaults
    filled in, so the store identity records every local setting."""
    config = dict(config)
    config["local"] = {**DEFAULT_LOCAL, **config.get("local", {})}
    sift = RootSIFT.from_config(config["local"])
    inner_cfg = dict(inner.config)
    config["describe"] = inner_cfg.get("describe", config.get("describe", {}))
    return WithLocalSIFT(name=config.get("name", inner.name), dim=inner.dim, config=config, device=inner.device,
                         weights_sha256=inner.weights_sha256, local_fields=sift.fields, inner=inner, sift=sift)
