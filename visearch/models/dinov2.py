"""DINOv2 ViT-B/14 (4 registers) as a describer: the image preparation of the AMES reference extraction
(github.com/pavelsuma/ames, extract/image_dataset.py and extract/extract_dino.py) and the `dinov2` global-only model.

Preparation, as the reference: the image (BGR uint8) is resized so that each side becomes the nearest multiple of 14
(per side independently: q = max(round(side * scale / 14), 1), factor q * 14 / side, Python round: halves to even),
with OpenCV `cv2.resize(img, (0, 0), fx, fy)`: INTER_AREA when either factor is below 1, else INTER_LINEAR when
either is above 1, else no resize; scale = 1 at native resolution (the reference default) or imsize / max(H, W, 3)
when an imsize is set. Then float32 / 255, per channel (B, G, R) `(x - mean) / std` with mean (0.406, 0.456, 0.485),
std (0.225, 0.224, 0.229), and the channels flipped to RGB for the network (i.e. ImageNet normalisation in RGB).

`dinov2` model: the L2-normalised CLS token (`pooling = "cls"`, what AMES stores as `dinov2_cls`), or GeM over the
normalised patch tokens (`pooling = "gem"`, ours: clamp at eps, mean of x^p, ^(1/p), L2).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError, UsageError, WeightsError
from ..fsutil import sha256_file
from .base import Describer, Features
from .nets.vit_dinov2 import FILE, PATCH, load_dinov2

log = logging.getLogger(__name__)

MEAN_BGR = (0.406, 0.456, 0.485)
STD_BGR = (0.225, 0.224, 0.229)
DIM = 768
DEFAULT_DESCRIBE: dict[str, Any] = {"pooling": "cls", "gem_p": 3.0, "imsize": 0, "batch_size": 8}


def patch_factor(side: int, scale: float, patch: int = PATCH) -> float:
    """The reference's per-side factor (DataSet.quantization_factor, same float operations): side * factor rounds
    to the nearest multiple of `patch`, at least one patch."""
    new_side = scale * side
    q = max(round(new_side / patch), 1.0)
    return scale / ((new_side / patch) / q)


def image_scale(shape: tuple[int, ...], imsize: int = 0) -> float:
    """1 at native resolution; imsize / max(img.shape) when an imsize is set (the reference takes the max over the
    whole shape, channels included)."""
    return 1.0 if not imsize else float(imsize) / max(shape)


def resize_to_patches(bgr: np.ndarray, scale: float = 1.0, patch: int = PATCH) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[14 q_h, 14 q_w, 3]` exactly as the reference (see the module docstring)."""
    import cv2

    h, w = bgr.shape[:2]
    fx, fy = patch_factor(w, scale, patch), patch_factor(h, scale, patch)
    if fx < 1.0 or fy < 1.0:
        out = cv2.resize(bgr, (0, 0), fx=fx, fy=fy, interpolation=cv2.INTER_AREA)
    elif fx > 1.0 or fy > 1.0:
        out = cv2.resize(bgr, (0, 0), fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
    else:
        out = bgr
    want = (max(round(scale * h / patch), 1) * patch, max(round(scale * w / patch), 1) * patch)
    if out.shape[:2] != want:  # OpenCV rounds side * factor; never seen off the multiple, but never feed a bad size
        out = cv2.resize(bgr, (want[1], want[0]),
                         interpolation=cv2.INTER_AREA if fx < 1.0 or fy < 1.0 else cv2.INTER_LINEAR)
    return out


def to_network(bgr: np.ndarray, device: Any = "cpu") -> torch.Tensor:
    """uint8 BGR `[H, W, 3]` -> float32 RGB `[1, 3, H, W]`, normalised as the reference (per channel, scalar ops)."""
    x = torch.from_numpy(np.ascontiguousarray(bgr)).to(device).permute(2, 0, 1).float() / 255.0
    x = torch.stack([(x[c] - MEAN_BGR[c]) / STD_BGR[c] for c in range(3)])
    return x[[2, 1, 0]][None]


def as_bgr(rgb: np.ndarray, model: str) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ModelError(f"{model} expects RGB uint8 [H, W, 3] arrays, got {rgb.dtype} {rgb.shape}",
                         "load images with visearch.images.load_rgb")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def gem_tokens(tokens: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM over tokens `[B, N, C] -> [B, C]`: (mean of clamp(x, eps)^p)^(1/p)."""
    return tokens.clamp(min=eps).pow(p).mean(1).pow(1.0 / p)


@dataclass
class DinoV2Backbone:
    """The ViT plus the reference's preparation: `forward(bgr)` -> (CLS [C], patches [h*w, C], (h, w))."""

    net: Any
    device: Any
    imsize: int = 0

    @torch.inference_mode()
    def forward_batch(self, bgrs: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Each BGR image prepared as the reference; images whose prepared sizes match run as one batch."""
        prepared = [resize_to_patches(b, image_scale(b.shape, self.imsize)) for b in bgrs]
        out: list[Any] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(prepared):
            groups.setdefault(im.shape[:2], []).append(i)
        for (hh, ww), idx in groups.items():
            x = torch.cat([to_network(prepared[i], self.device) for i in idx])
            cls, patches = self.net.forward_features(x)
            for j, i in enumerate(idx):
                out[i] = (cls[j], patches[j], (hh // PATCH, ww // PATCH))
        return out


@dataclass
class DinoV2Global(Describer):
    """Describer for `dinov2`: `[N, 768]` float32, L2-normalised CLS token or GeM of the patch tokens."""

    backbone: Any = None

    def __post_init__(self) -> None:
        d = self.config["describe"]
        self.pooling = str(d["pooling"]).lower()
        if self.pooling not in ("cls", "gem"):
            raise UsageError(f"unknown dinov2 pooling {self.pooling!r}", "use pooling = \"cls\" or \"gem\"")
        self.gem_p = float(d["gem_p"])
        self.batch_size = max(1, int(d.get("batch_size", 8)))

    def extract(self, images: Sequence[np.ndarray]) -> Features:
        bgrs = [as_bgr(im, self.name) for im in images]
        rows = []
        for s in range(0, len(bgrs), self.batch_size):
            for cls, patches, _ in self.backbone.forward_batch(bgrs[s:s + self.batch_size]):
                g = cls[None] if self.pooling == "cls" else gem_tokens(patches[None], self.gem_p)
                rows.append(F.normalize(g.float(), p=2, dim=-1)[0].cpu().numpy())
        glob = np.stack(rows).astype(np.float32) if rows else np.zeros((0, DIM), np.float32)
        return Features(global_=glob)


def backbone_path(config: dict[str, Any], weights: Path | None, weights_dir: Path, model: str) -> Path:
    path = Path(weights) if weights else Path(weights_dir) / config.get("weights", {}).get("backbone", FILE)
    if not path.is_file():
        raise WeightsError(f"weights for {model} not found: {path}", f"run `visearch weights download {model}`")
    return path


def build(config: dict[str, Any], weights: Path | None, weights_dir: Path, device: torch.device) -> DinoV2Global:
    """Factory (registry family `dinov2`): dinov2_vitb14_reg4_pretrain.pth loaded strictly (a CVNet or ViT-S file
    is refused naming the file); `weights` overrides the file in `weights_dir`."""
    config = dict(config)
    name = config.get("name", "dinov2")
    config["describe"] = {**DEFAULT_DESCRIBE, **config.get("describe", {})}
    path = backbone_path(config, weights, weights_dir, name)
    net = load_dinov2(path, device=device)
    bb = DinoV2Backbone(net=net, device=device, imsize=int(config["describe"]["imsize"] or 0))
    return DinoV2Global(name=name, dim=DIM, config=config, device=device, weights_sha256=sha256_file(path),
                        backbone=bb)
