"""SuperGlobal global descriptors on CVNet's ResNet-50/101 (Shao et al., "Global Features are All You Need for Image
Retrieval and Reranking", ICCV 2023, arXiv 2308.06954).

Per scale s in `scales`: resize the normalised image to (int(H*s), int(W*s)), take the s4 map of the ReLU+ backbone,
Regional-GeM (p 2.5, 5x5 window), GeM+ (fixed p 4.6), L2, `head.fc`, L2; then the element-wise max over scales
(Scale-GeM with p = inf) and a final L2. Matches the reference implementation to float32 noise (see
tests/models/test_superglobal.py). Weights: CVNet's published checkpoints (SuperGlobal has none of its own).
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

from ..errors import ModelError, WeightsError
from ..images import check_aspect, work_scale
from .base import Describer, Features
from .nets.cvnet_resnet import CVNetResNet, load_cvnet_state

log = logging.getLogger(__name__)

# ImageNet statistics in BGR order: the reference reads images with OpenCV and feeds the network BGR.
MEAN_BGR = (0.406, 0.456, 0.485)
STD_BGR = (0.225, 0.224, 0.229)
# Smallest input side whose s4 map is 3 px (the least ReflectionPad2d(2) accepts): 65 -> 33 -> 17 -> 9 -> 5 -> 3.
MIN_NET_SIDE = 65

def min_image_side(scales: Sequence[float]) -> int:
    """Smallest image side t such that int(t * s) >= MIN_NET_SIDE for every scale (92 for the default scales)."""
    s = min(scales)
    t = int(np.ceil(MIN_NET_SIDE / s))
    while int(t * s) < MIN_NET_SIDE:  # same truncation as the resize below
        t += 1
    while t > 1 and int((t - 1) * s) >= MIN_NET_SIDE:
        t -= 1
    return t


def regional_gem(x: torch.Tensor, p: float = 2.5, size: int = 5) -> torch.Tensor:
    """Regional-GeM `[B, C, h, w] -> [B, C, h, w]`: 0.5 * LP-pool(p, size x size, stride 1) over a reflection-padded
    map of x / (size^2)^(1/p), plus 0.5 * x. Needs h, w >= size // 2 + 1."""
    pad = (size - 1) // 2
    pooled = F.lp_pool2d(F.pad(x / float((size * size) ** (1.0 / p)), (pad, pad, pad, pad), mode="reflect"),
                         p, size, stride=1)
    return 0.5 * pooled + 0.5 * x


def gem_plus(x: torch.Tensor, p: float = 4.6, eps: float = 1e-8) -> torch.Tensor:
    """GeM with a fixed exponent: `[B, C, h, w] -> [B, C]`, (mean of clamp(x, eps)^p)^(1/p)."""
    return x.flatten(2).clamp(min=eps).pow(p).mean(-1).pow(1.0 / p)


@dataclass
class SuperGlobal(Describer):
    """Describer for `superglobal-r50` / `superglobal-r101`; `extract` gives `[N, 2048]` float32, L2-normalised."""

    net: Any = None

    def __post_init__(self) -> None:
        d = self.config["describe"]
        self.scales = [float(s) for s in d["scales"]]
        self.min_side = min_image_side(self.scales)
        self.mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD_BGR, device=self.device).view(1, 3, 1, 1)
        prec = str(d["precision"]).lower()
        if prec not in ("fp32", "fp16", "bf16"):
            raise ModelError(f"unknown precision {prec!r} in the superglobal config", "use fp32, fp16 or bf16")
        if prec != "fp32" and self.device.type != "cuda":
            log.info("precision %s applies on CUDA only; running fp32 on %s", prec, self.device)
            prec = "fp32"
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)

    # --- preprocessing -------------------------------------------------------------------------------------------
    def _prepare(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 `[H, W, 3]` -> BGR uint8, downscaled to `max_side` when configured (OpenCV INTER_AREA, as the
        reference's own downscaling)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ModelError(f"superglobal expects RGB uint8 [H, W, 3] arrays, got {rgb.dtype} {rgb.shape}",
                             "load images with visearch.images.load_rgb")
        h, w = rgb.shape[:2]
        check_aspect(w, h, "image")  # bounded work: the short side may be upsampled to min_side below
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        max_side = int(self.config["describe"]["max_side"] or 0)
        f = max_side / max(h, w) if max_side and max(h, w) > max_side else 1.0
        f = min(f, work_scale(w, h))  # native resolution, but never above MAX_DESCRIBE_PIXELS
        if f < 1.0:
            import cv2

            bgr = cv2.resize(bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        return bgr

    def _normalise(self, batch: np.ndarray) -> torch.Tensor:
        """BGR uint8 `[B, H, W, 3]` -> `[B, 3, H', W']` float32 as the reference: x / 255, minus mean, over std.
        Images too small for the smallest scale are upsampled (bilinear) so that the short side is `min_side`."""
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        x = (x / 255.0 - self.mean) / self.std
        h, w = x.shape[-2:]
        if min(h, w) < self.min_side:
            f = self.min_side / min(h, w)
            size = (max(self.min_side, int(np.ceil(h * f))), max(self.min_side, int(np.ceil(w * f))))
            log.info("image of %dx%d px is below SuperGlobal's minimum (short side %d at scales %s): "
                     "upsampled to %dx%d", w, h, self.min_side, self.scales, size[1], size[0])
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    # --- network -------------------------------------------------------------------------------------------------
    def _single_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images `[B, 3, H, W]` -> per-scale descriptor `[B, 2048]` (L2 -> fc, not yet re-normalised)."""
        d = self.config["describe"]
        if self.autocast_dtype is not None:
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                x4 = self.net.forward_s4(x)
            x4 = x4.float()  # pooling powers (p = 4.6) overflow in half precision
        else:
            x4 = self.net.forward_s4(x)
        if d["rgem"]:
            x4 = regional_gem(x4, float(d["rgem_p"]), int(d["rgem_size"]))
        g = F.normalize(gem_plus(x4, float(d["gem_p"])), p=2, dim=-1)
        return self.net.head.fc(g)

    @torch.inference_mode()
    def _describe_batch(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, 2048]`: per-scale L2, max over scales, final L2."""
        h, w = x.shape[-2:]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        best = None
        for s in self.scales:
            # Quirk kept on purpose: the 2023 reference resized with torchvision's old default antialias=False
            # (torchvision >= 0.17 defaults to True); truncation int(H*s) as in the reference.
            size = (int(h * s), int(w * s))
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                                        antialias=False)
            f = F.normalize(self._single_scale(xs), p=2, dim=-1)
            best = f if best is None else torch.maximum(best, f)
        return F.normalize(best, p=2, dim=-1)

    def extract(self, images: Sequence[np.ndarray]) -> Features:
        """RGB uint8 arrays -> Features(global_=[N, 2048] float32). Images of equal size are batched."""
        prepared = [self._prepare(im) for im in images]
        out = np.zeros((len(prepared), self.dim), np.float32)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(prepared):
            groups.setdefault(im.shape[:2], []).append(i)
        bs = max(1, int(self.batch_size or self.config["describe"]["batch_size"]))
        for idx in groups.values():
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                x = self._normalise(np.stack([prepared[i] for i in chunk]))
                out[chunk] = self._describe_batch(x).float().cpu().numpy()
        return Features(global_=out)


def build(config: dict[str, Any], weights: Path | None, weights_dir: Path, device: torch.device) -> SuperGlobal:
    """Factory (see registry.MODEL_FAMILIES): CVNet ResNet with ReLU+, loaded strictly from `weights` or from the
    config's default file name in `weights_dir`."""
    from ..config.schema import resolve

    config = resolve({"family": "superglobal", **config}, config.get("name", "superglobal"))  # defaults: schema.py
    depth = int(config["describe"]["depth"])
    name = config.get("name", f"superglobal-r{depth}")
    if weights is None:
        weights = Path(weights_dir) / config["weights"]["file"]
        if not weights.is_file():
            raise WeightsError(f"weights for {name} not found: {weights}",
                               f"run `visearch weights download {name}` or pass --weights PATH")
    net = CVNetResNet(depth, relup=bool(config["describe"]["relup"]))
    sha = load_cvnet_state(net, weights)
    net.fuse_batchnorm()  # ~30% less CPU time; descriptors move by ~3e-8
    net.eval().to(device)
    if device.type == "cuda":  # NHWC helps cuDNN (tensor cores under autocast); no gain measured on CPU
        net = net.to(memory_format=torch.channels_last)
    return SuperGlobal(name=name, dim=2048, config=config, device=device, weights_sha256=sha, net=net)
