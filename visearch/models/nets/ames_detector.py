"""AMES's local-feature detector (Suma et al., ECCV 2024, arXiv 2408.03282; checkpoints `cvnet_detector.pt` for
CVNet's 1024-d features and `dinov2_detector.pt` for DINOv2's 768-d tokens, each a dict whose key `state` holds
conv1.*, bn.*, conv2.*). Our own implementation, loaded strictly. Used by visearch/models/ames.py and
visearch/models/ames_dinov2.py to pick and weight the local descriptors.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import WeightsError
from .ames_transformer import LOCAL_DIM


class Detector(nn.Module):
    """AMES's CVNet local-feature detector (keys conv1.*, bn.*, conv2.*): 1x1 conv -> BN -> ReLU -> 1x1 conv ->
    Softplus. Returns the descriptors normalize(BN(conv1(x))) `[B, C, h, w]` and weights `[B, 1, h, w]`."""

    def __init__(self, channels: int = LOCAL_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        self.conv2 = nn.Conv2d(channels, 1, 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bn(self.conv1(x))
        desc = F.normalize(x, p=2, dim=1, eps=1e-15)
        return desc, F.softplus(self.conv2(F.relu(x)), beta=1, threshold=20)


def load_detector(path: Path, channels: int = LOCAL_DIM) -> Detector:
    """An AMES detector checkpoint (dict key `state`) loaded strictly: cvnet_detector.pt (channels 1024) or
    dinov2_detector.pt (768, for DINOv2 ViT-B tokens); WeightsError naming the file otherwise."""
    from ...weight_files import safe_torch_load

    kind = {1024: "CVNet", 768: "DINOv2"}.get(channels, f"{channels}-d")
    expect = {1024: "cvnet_detector.pt", 768: "dinov2_detector.pt"}.get(channels, "the detector")
    obj = safe_torch_load(path)
    state = obj.get("state") if isinstance(obj, dict) else None
    det = Detector(channels)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} is not an AMES detector checkpoint (no `state` dict)",
                           f"expected {expect} from the AMES release")
    expected = det.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path} does not match the AMES {kind} detector (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})", f"expected {expect} from the AMES release")
    for k, v in expected.items():
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape):
            raise WeightsError(f"{path}: {k} has shape {tuple(getattr(state[k], 'shape', ()))}, expected "
                               f"{tuple(v.shape)}", f"this detector is not for {kind}'s {channels}-d features")
    det.load_state_dict(state, strict=True)
    return det
