"""DINOv2 ViT-B/14 with 4 registers (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
TMLR 2024, arXiv 2304.07193; registers: Darcet et al., "Vision Transformers Need Registers", ICLR 2024,
arXiv 2309.16588). Our own implementation of the published network; parameter names and shapes are those of the
official `dinov2_vitb14_reg4_pretrain.pth` (a flat state_dict, no prefix), which is loaded strictly.

Network (facebookresearch/dinov2, hub entry `dinov2_vitb14_reg`): Conv2d(3, 768, 14, stride 14) patch embedding
(H and W must be multiples of 14), [CLS, patches] + positional embedding (the 37x37 grid of the 518 px training size,
resized bicubically with antialias to (H/14, W/14) unless the input is exactly 518x518), then the 4 register tokens
inserted after CLS without positional embedding: sequence [CLS, reg x 4, patches]. 12 pre-norm blocks
`x = x + ls1 * attn(norm1(x))`, `x = x + ls2 * mlp(norm2(x))` (12 heads of 64, qkv with bias, GELU MLP of 3072,
LayerNorm eps 1e-6, LayerScale), then the final `norm`. Outputs: normalised CLS `[B, 768]` and patch tokens
`[B, H/14 * W/14, 768]` in row-major order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import WeightsError

PATCH = 14
TRAIN_SIZE = 518  # the grid of the published positional embedding: 518 / 14 = 37
FILE = "dinov2_vitb14_reg4_pretrain.pth"
URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
# embed dim -> name, for telling which DINOv2 a foreign checkpoint is
_ARCH_BY_DIM = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14", 1536: "ViT-g/14"}


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; fused qkv ordered q | k | v, heads contiguous in each; scale head_dim^-0.5."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class DinoV2ViT(nn.Module):
    """DINOv2 ViT (defaults: ViT-B/14 with 4 registers). `depth` may be reduced for tests; everything else is the
    published structure. Eval only."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: int = 4, registers: int = 4,
                 patch: int = PATCH, train_size: int = TRAIN_SIZE):
        super().__init__()
        self.dim, self.depth, self.heads, self.patch, self.registers = dim, depth, heads, patch, registers
        self.grid = train_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used only in training; present in the checkpoint
        self.patch_embed = _PatchEmbed(dim, patch)
        self.blocks = nn.ModuleList([_Block(dim, heads, dim * mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.eval()

    def _pos_embed(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Positional embedding `[1, 1 + h*w, C]` for an (h, w) patch grid: the published grid unless the input is
        the square training size, else bicubic with antialias to size (h, w) (interpolate_offset 0 of the reg model)."""
        if h * w == self.grid * self.grid and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        g = self.grid
        patch_pos = F.interpolate(pos[:, 1:].reshape(1, g, g, self.dim).permute(0, 3, 1, 2), size=(h, w),
                                  mode="bicubic", antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, self.dim)
        return torch.cat([pos[:, :1], patch_pos], 1).to(dtype)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, 3, H, W]` (RGB, ImageNet-normalised; H, W multiples of 14) -> (CLS `[B, C]`, patch tokens
        `[B, H/14 * W/14, C]`), both after the final LayerNorm; patches in row-major order."""
        b, _, hh, ww = x.shape
        if hh % self.patch or ww % self.patch:
            raise ValueError(f"DINOv2 input {hh}x{ww} is not a multiple of {self.patch} per side")
        h, w = hh // self.patch, ww // self.patch
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], 1)
        t = t + self._pos_embed(h, w, t.dtype)
        if self.registers:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], 1)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return t[:, 0], t[:, 1 + self.registers:]


def _describe_foreign(state: dict[str, Any]) -> str:
    """A few words on what a checkpoint that is not DINOv2 ViT-B/14-reg4 looks like it is."""
    if any(k.startswith(("encoder_q.", "model_state")) for k in state) or any(".s3.b" in k or k.startswith("s3.")
                                                                               for k in state):
        return "a CVNet ResNet checkpoint"
    pe = state.get("pos_embed")
    if isinstance(pe, torch.Tensor) and pe.dim() == 3:
        arch = _ARCH_BY_DIM.get(int(pe.shape[-1]), f"a ViT with embedding dim {int(pe.shape[-1])}")
        regs = state.get("register_tokens")
        reg = f"with {int(regs.shape[1])} registers" if isinstance(regs, torch.Tensor) else "without registers"
        return f"a DINOv2 {arch} {reg}"
    return "not a DINOv2 checkpoint"


def check_state(model: DinoV2ViT, state: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Exactly the model's keys with its shapes and floating dtypes, or a WeightsError naming the file and what it
    looks like instead (a CVNet R101 file, a ViT-S/14, a model without registers, ...)."""
    path = Path(path)
    want = f"DINOv2 ViT-B/14 with {model.registers} registers ({FILE})"
    if isinstance(state, dict) and "model_state" in state and isinstance(state["model_state"], dict):
        raise WeightsError(f"{path} is a CVNet ResNet checkpoint, not {want}", f"put {FILE} there ({URL})")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a DINOv2 state_dict (expected a flat dict of tensors)",
                           f"use {FILE} from {URL}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        what = _describe_foreign(state)
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"{bad[0]} has shape {tuple(state[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        raise WeightsError(f"{path} does not match {want}: it looks like {what} ({detail})",
                           f"use {FILE} from {URL}")
    for k, v in state.items():
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise WeightsError(f"{path}: {k} is not a finite floating-point tensor", "download the file again")
    return state


def load_dinov2(path: str | Path, depth: int = 12, device: Any = "cpu") -> DinoV2ViT:
    """The official `dinov2_vitb14_reg4_pretrain.pth` loaded strictly (weights_only); WeightsError otherwise."""
    from ...weight_files import safe_torch_load

    with torch.device("meta"):  # built without memory or init; the checkpoint's tensors are assigned
        model = DinoV2ViT(depth=depth)
    state = check_state(model, safe_torch_load(path), path)
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


def random_state(seed: int = 0, depth: int = 12, dim: int = 768, registers: int = 4) -> dict[str, torch.Tensor]:
    """A random state_dict in the official layout (tests and benchmarks; no real weights are shipped). numpy's
    PCG64 in float32, drawn in key order, so the same on every platform; LayerScale 0.1 keeps the residual stream
    O(1) through the blocks."""
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    with torch.device("meta"):  # shapes only: no memory, no init
        keys = DinoV2ViT(dim=dim, depth=depth, heads=dim // 64, registers=registers).state_dict()
    for key, ref in keys.items():
        shape = tuple(ref.shape)
        if key.endswith(".gamma"):
            val = 0.1 + 0.02 * rng.standard_normal(shape, dtype=np.float32)
        elif "norm" in key:
            val = (1.0 if key.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif key.endswith("bias"):
            val = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        elif key == "patch_embed.proj.weight":
            val = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(3 * PATCH * PATCH)
        elif key in ("pos_embed", "cls_token", "register_tokens", "mask_token"):
            val = 0.5 * rng.standard_normal(shape, dtype=np.float32)
        else:
            val = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])
        out[key] = torch.from_numpy(np.asarray(val, np.float32).reshape(shape))
    return out
