"""CVNet's pycls ResNet-50/101 backbone, with the state_dict layout of the published CVNet checkpoints.

Used by SuperGlobal (ReLU+, Shao et al., ICCV 2023, arXiv 2308.06954) and by AMES (plain ReLU, local features from
the last block of stage 3). Our own implementation of the pycls layout (Radosavovic et al., "Designing Network Design
Spaces") as used by CVNet (Lee et al., CVPR 2022):

    stem.conv 7x7/2, stem.bn, ReLU, maxpool 3x3/2
    s1..s4, blocks b1..bN with bottleneck f.a 1x1 / f.b 3x3 (stride here) / f.c 1x1 (+ BN after each), `proj`+`bn`
    shortcut in the first block of every stage; head.pool.p (learned GeM p) and head.fc (2048 -> 2048).

The state_dict keys are exactly the checkpoint's `encoder_q.` keys with the prefix removed.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ...errors import WeightsError

log = logging.getLogger(__name__)

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS = (256, 512, 1024, 2048)  # block output channels per stage
BN_EPS = 1e-5
# ReLU+ (SuperGlobal): activations clamp at this floor instead of 0 (value from the reference code).
RELUP_ALPHA = 0.014
CHECKPOINT_PREFIX = "encoder_q."


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with BN after each conv; keys f.a, f.a_bn, f.b, f.b_bn, f.c, f.c_bn."""

    def __init__(self, w_in: int, w_b: int, w_out: int, stride: int, inner_alpha: float):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, stride=1, padding=0, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b, eps=BN_EPS)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b, eps=BN_EPS)
        self.c = nn.Conv2d(w_b, w_out, 1, stride=1, padding=0, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out, eps=BN_EPS)
        self.inner_alpha = inner_alpha  # floor of the two inner activations (0 = ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_bn(self.a(x)).clamp_(min=self.inner_alpha)
        x = self.b_bn(self.b(x)).clamp_(min=self.inner_alpha)
        return self.c_bn(self.c(x))


class _Block(nn.Module):
    """Residual block x + f(x) (projected shortcut when the shape changes), then the block's activation."""

    def __init__(self, w_in: int, w_b: int, w_out: int, stride: int, inner_alpha: float, out_alpha: float):
        super().__init__()
        if w_in != w_out or stride != 1:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, padding=0, bias=False)
            self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS)
        else:
            self.proj = None
            self.bn = None
        self.f = _Bottleneck(w_in, w_b, w_out, stride, inner_alpha)
        self.out_alpha = out_alpha

    def forward(self, x: torch.Tensor, activate: bool = True) -> torch.Tensor:
        shortcut = self.bn(self.proj(x)) if self.proj is not None else x
        x = shortcut + self.f(x)
        return x.clamp_(min=self.out_alpha) if activate else x


class _Stage(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, depth: int, inner_alpha: float, out_alpha: float):
        super().__init__()
        w_b = w_out // 4
        for i in range(depth):
            self.add_module(f"b{i + 1}", _Block(w_in if i == 0 else w_out, w_b, w_out, stride if i == 0 else 1,
                                                inner_alpha, out_alpha))

    def forward(self, x: torch.Tensor, activate_last: bool = True) -> torch.Tensor:
        blocks = list(self.children())
        for block in blocks[:-1]:
            x = block(x)
        return blocks[-1](x, activate=activate_last)


class _Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64, eps=BN_EPS)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu_(self.bn(self.conv(x))))  # the stem uses plain ReLU even with ReLU+


class _GeMP(nn.Module):
    """Holds CVNet's learned GeM exponent `head.pool.p` (shape (1,)); SuperGlobal uses a fixed p instead."""

    def __init__(self, p: float = 3.0):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), p))


class _Head(nn.Module):
    def __init__(self, dim: int = 2048):
        super().__init__()
        self.pool = _GeMP()
        self.fc = nn.Linear(2048, dim, bias=True)


class CVNetResNet(nn.Module):
    """CVNet/pycls ResNet. `relup=True`: SuperGlobal's ReLU+; `relup=False`: plain ReLU everywhere (CVNet, AMES).

    ReLU+ as the SuperGlobal reference computes it (each quirk reproduced on purpose):
      - after the residual add, blocks of s1..s3 clamp at 0.014; s4 blocks use plain ReLU;
      - inside every s1 block the two inner activations (after f.a_bn and f.b_bn) also clamp at 0.014. The reference
        meant this to depend on its flag, but passes its activation class (always truthy) instead of the flag, so the
        published numbers were computed with it; the other stages' inner activations are plain ReLU;
      - the stem uses plain ReLU.
    Input: normalised BGR images `[B, 3, H, W]` float32. Eval mode only (BN uses running statistics).
    """

    def __init__(self, depth: int, relup: bool = True):
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"CVNet ResNet depth must be 50 or 101, got {depth}")
        self.depth = depth
        self.relup = relup
        self.stem = _Stem()
        w_in = 64
        for i, (d, w_out) in enumerate(zip(STAGE_DEPTHS[depth], STAGE_WIDTHS)):
            up = relup and i < 3
            inner = RELUP_ALPHA if (relup and i == 0) else 0.0
            self.add_module(f"s{i + 1}", _Stage(w_in, w_out, 1 if i == 0 else 2, d, inner, RELUP_ALPHA if up else 0.0))
            w_in = w_out
        self.head = _Head(2048)
        self.eval()

    def forward_s3_preact(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last s3 block after its residual add, before its activation: `[B, 1024, H/16, W/16]`.

        This is the map CVNet's reranker (and AMES) take local features from; s4 is not computed."""
        x = self.s2(self.s1(self.stem(x)))
        return self.s3(x, activate_last=False)

    def forward_s4(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-4 feature map `[B, 2048, H/32, W/32]` (after the last activation)."""
        return self.s4(self.s3(self.s2(self.s1(self.stem(x)))))

    forward = forward_s4

    def fuse_batchnorm(self) -> CVNetResNet:
        """Fold every BatchNorm into the conv before it (inference only; call after loading weights).

        Same function, fewer passes over memory: about 10-20% faster on CPU; descriptors move by float32 rounding
        (~1e-7). The state_dict no longer matches the checkpoint layout afterwards."""
        from torch.nn.utils import fuse_conv_bn_eval

        self.eval()
        pairs = [(self.stem, "conv", "bn")]
        for m in self.modules():
            if isinstance(m, _Bottleneck):
                pairs += [(m, "a", "a_bn"), (m, "b", "b_bn"), (m, "c", "c_bn")]
            elif isinstance(m, _Block) and m.proj is not None:
                pairs.append((m, "proj", "bn"))
        for mod, conv, bn in pairs:
            if isinstance(getattr(mod, bn), nn.BatchNorm2d):
                setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
                setattr(mod, bn, nn.Identity())
        return self


def _blocks_in(keys: set[str], stage: int) -> int:
    """Number of blocks of stage `stage` present in a set of (prefix-free) keys."""
    idx = [int(m.group(1)) for k in keys if (m := re.match(rf"s{stage}\.b(\d+)\.", k))]
    return max(idx, default=0)


def extract_backbone_state(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors from a loaded CVNet checkpoint: `model_state` (or the whole dict), `encoder_q.` stripped.

    A bare backbone state_dict without the prefix is accepted too. Reranker keys (`conv2ds.*`, `cv_learner.*`),
    optimizer state and anything else are ignored."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} is not a CVNet checkpoint: it holds a {type(obj).__name__}, not a dict",
                           "expected a file such as CVPR2022_CVNet_R50.pyth")
    state = obj.get("model_state", obj)
    if not isinstance(state, dict):
        raise WeightsError(f"{path} is not a CVNet checkpoint: 'model_state' is a {type(state).__name__}",
                           "expected a file such as CVPR2022_CVNet_R50.pyth")
    out = {k[len(CHECKPOINT_PREFIX):]: v for k, v in state.items()
           if isinstance(k, str) and k.startswith(CHECKPOINT_PREFIX)}
    if not out:  # fallback: an un-prefixed backbone state_dict
        out = {k: v for k, v in state.items() if isinstance(k, str) and k.split(".")[0] in
               ("stem", "s1", "s2", "s3", "s4", "head")}
    if not out:
        raise WeightsError(f"{path} has no CVNet backbone weights (no 'encoder_q.' keys)",
                           "expected a file such as CVPR2022_CVNet_R50.pyth")
    return out


def load_cvnet_state(model: CVNetResNet, path: str | Path, require_head: bool = True) -> str:
    """Load a CVNet checkpoint into `model` strictly; return the file's sha256.

    Every tensor the backbone needs (BN `num_batches_tracked` excepted) must be present with the right shape;
    `require_head=False` lets a local-feature user skip `head.*`. Raises WeightsError naming the file otherwise."""
    from ...fsutil import sha256_file
    from ...weight_files import safe_torch_load

    path = Path(path)
    state = extract_backbone_state(safe_torch_load(path), path)
    keys = set(state)
    want = STAGE_DEPTHS[model.depth]
    for stage, n_want in enumerate(want, start=1):
        n_have = _blocks_in(keys, stage)
        if n_have and n_have != n_want:
            guess = {v: k for k, v in STAGE_DEPTHS.items()}.get(
                tuple(_blocks_in(keys, s) for s in range(1, 5)))
            hint = f": this looks like an R{guess} checkpoint" if guess else ""
            raise WeightsError(f"{path} has {n_have} blocks in s{stage}, expected {n_want} for "
                               f"ResNet-{model.depth}{hint}",
                               f"use a CVNet R{model.depth} checkpoint (CVPR2022_CVNet_R{model.depth}.pyth) "
                               f"or the superglobal-r{guess or '50'} model")
    own = model.state_dict()
    needed = {k for k in own if not k.endswith("num_batches_tracked") and (require_head or not k.startswith("head."))}
    missing = sorted(needed - keys)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{path} lacks {len(missing)} backbone tensors ({', '.join(missing[:3])}{more})",
                           "the file is not a complete CVNet checkpoint; download it again")
    for k in sorted(needed):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: {CHECKPOINT_PREFIX}{k} is a {type(v).__name__}, not a tensor",
                               "the file is not a CVNet checkpoint")
        if tuple(v.shape) != tuple(own[k].shape):
            raise WeightsError(f"{path}: {CHECKPOINT_PREFIX}{k} has shape {tuple(v.shape)}, expected "
                               f"{tuple(own[k].shape)}", f"use a CVNet R{model.depth} checkpoint")
        if not v.is_floating_point():
            raise WeightsError(f"{path}: {CHECKPOINT_PREFIX}{k} has dtype {v.dtype}, expected floating point",
                               "the file is not a CVNet checkpoint")
    with torch.no_grad():
        for k in needed:
            own[k].copy_(state[k])  # state_dict tensors share storage with the parameters
    ignored = len(keys - set(own))
    if ignored:
        log.debug("%s: ignored %d backbone keys not used here", path, ignored)
    return sha256_file(path)
