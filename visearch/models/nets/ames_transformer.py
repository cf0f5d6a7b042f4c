"""The AMES transformer: scores (query, database) pairs of local-descriptor sets.

Paper: Suma, Kordopatis-Zilos, Iscen, Tolias, "AMES: Asymmetric and Memory-Efficient Similarity Estimation for
Instance-level Retrieval", ECCV 2024 (arXiv 2408.03282). Our own implementation; the parameter names are the official
checkpoints' (`r101_cvnet_ames.pt`, `cvnet_ames_dist.pt`: a dict whose key `state` holds the state_dict).

Model: local descriptors `[L, 1024]` are L2-normalised and mapped to 128-d tokens by `remap_local`:
  float variant: Linear(1024, 128) -> LayerNorm; database tokens are rounded through float16 (what we store, 256 B each);
  dist variant:  ITQ (x @ W, sign) -> Linear(128, 128) -> LayerNorm; we store the sign bits packed (16 B each).
The sequence `[match token, Q tokens, T tokens]` runs through 5 post-norm layers (self-attention: Q sees Q, T sees T;
cross-attention: Q sees T, T sees Q; the match token sees and is seen by all; then a ReLU FFN of width 1024); the
logit is `classifier(match token)`. Attention is computed block by block (only the blocks the masks allow), which
gives the reference's numbers (to ~1e-6) at about half its attention cost.

Used by the AMES describer (visearch/models/ames.py: database tokens) and the AMES reranker
(visearch/rerankers/ames.py: pair scores).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelError, UsageError, WeightsError

log = logging.getLogger(__name__)

LOCAL_DIM = 1024  # CVNet s3 channels
MODEL_DIM = 128
NUM_HEADS = 2
NUM_LAYERS = 5
FFN_DIM = 1024
ITQ_BITS = 128
PACKED_BYTES = ITQ_BITS // 8  # 16 bytes per local descriptor in the dist variant
VARIANTS = ("float", "dist")
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # np.packbits order: most significant bit first


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype) if dtype is not None else t


def _expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-1 tensor to `batch` rows (no copy)."""
    return x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x


class _Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (packed in_proj), evaluated on row/key
    subsets so that the block masks of AMES never need a full [L, L] score matrix."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, D] -> q, k, v each [B, L, D]."""
        return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q [B, n, D] over keys k, v [B, m, D]; allowed [B, m] bool (False = padding). Returns [B, n, D]."""
        b, n, d = q.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=allowed[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _Layer(nn.Module):
    """One post-norm AMES layer: self-attention, cross-attention, FFN, each `x = norm(x + block(x))`."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = _Attention(dim, heads)
        self.cross_attn = _Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))

    def forward(self, m: torch.Tensor, xq: torch.Tensor, xt: torch.Tensor, aq: torch.Tensor, at: torch.Tensor,
                last: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """m [Bm, 1, D] match token, xq [Bq, Lq, D], xt [B, Lt, D]; aq [Bq, Lq], at [B, Lt] True = real token.

        Bm and Bq may be 1 (first layer, one query against many): the query's self-attention block depends only
        on the query and the initial match token, so it is computed once. In the last layer only the match token
        is carried to the output, so the other rows skip cross-attention and FFN."""
        b = xt.shape[0]
        ones = torch.ones(1, 1, dtype=torch.bool, device=xt.device)
        # self-attention: Q rows see [m, Q], T rows see [m, T], m sees everything
        qm, km, vm = self.self_attn.project(m)
        qq, kq, vq = self.self_attn.project(xq)
        qt, kt, vt = self.self_attn.project(xt)
        bq = max(xq.shape[0], m.shape[0])
        sq = self.self_attn.attend(_expand(qq, bq), torch.cat([_expand(km, bq), _expand(kq, bq)], 1),
                                   torch.cat([_expand(vm, bq), _expand(vq, bq)], 1),
                                   torch.cat([_expand(ones, bq), _expand(aq, bq)], 1))
        st = self.self_attn.attend(qt, torch.cat([_expand(km, b), kt], 1), torch.cat([_expand(vm, b), vt], 1),
                                   torch.cat([_expand(ones, b), at], 1))
        a_all = torch.cat([_expand(ones, b), _expand(aq, b), at], 1)
        sm = self.self_attn.attend(_expand(qm, b), torch.cat([_expand(km, b), _expand(kq, b), kt], 1),
                                   torch.cat([_expand(vm, b), _expand(vq, b), vt], 1), a_all)
        m = self.norm1(_expand(m, b) + sm)
        xq = self.norm1(_expand(xq, bq) + sq)
        xt = self.norm1(xt + st)
        # cross-attention: Q rows see [m, T], T rows see [m, Q], m sees everything
        qm, km, vm = self.cross_attn.project(m)
        qq, kq, vq = self.cross_attn.project(xq)
        qt, kt, vt = self.cross_attn.project(xt)
        kq, vq = _expand(kq, b), _expand(vq, b)
        cm = self.cross_attn.attend(qm, torch.cat([km, kq, kt], 1), torch.cat([vm, vq, vt], 1), a_all)
        m = self._ffn(self.norm2(m + cm))
        if last:
            return m, None, None
        a_mt = torch.cat([_expand(ones, b), at], 1)
        a_mq = torch.cat([_expand(ones, b), _expand(aq, b)], 1)
        cq = self.cross_attn.attend(_expand(qq, b), torch.cat([km, kt], 1), torch.cat([vm, vt], 1), a_mt)
        ct = self.cross_attn.attend(qt, torch.cat([km, kq], 1), torch.cat([vm, vq], 1), a_mq)
        xq = self._ffn(self.norm2(_expand(xq, b) + cq))
        xt = self._ffn(self.norm2(xt + ct))
        return m, xq, xt


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(MODEL_DIM, NUM_HEADS, FFN_DIM) for _ in range(NUM_LAYERS)])


class _Binarize(nn.Module):
    """ITQ: L2-normalise, project with W [1024, 128]; the sign is taken by the caller (stored as bits)."""

    def __init__(self, dim: int, bits: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(dim, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1) @ self.W


def pack_signs(proj: torch.Tensor) -> np.ndarray:
    """Projections [..., 128] -> packed sign bits uint8 [..., 16]; bit 1 = (value >= 0).

    The reference takes torch.sign at evaluation, where an exact 0 gives 0; two states cannot hold three, so 0
    counts as +1 (as in ITQ training). Exact zeros do not occur for real descriptors."""
    return np.packbits(proj.detach().cpu().numpy() >= 0, axis=-1)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """Packed bits uint8 [..., 16] -> float32 +-1 [..., 128] (on packed's device)."""
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8).float() * 2.0 - 1.0


class AMES(nn.Module):
    """The AMES transformer (state_dict keys = the official checkpoints'). Eval only."""

    def __init__(self, variant: str = "dist", local_dim: int = LOCAL_DIM):
        super().__init__()
        if variant not in VARIANTS:
            raise UsageError(f"unknown AMES variant {variant!r}", "use 'float' or 'dist'")
        self.variant = variant
        self.local_dim = local_dim
        self.mtc_token = nn.Parameter(torch.zeros(MODEL_DIM))
        if variant == "dist":
            self.remap_local = nn.Sequential(_Binarize(local_dim, ITQ_BITS), nn.Linear(ITQ_BITS, MODEL_DIM),
                                             nn.LayerNorm(MODEL_DIM))
        else:
            self.remap_local = nn.Sequential(nn.Linear(local_dim, MODEL_DIM), nn.LayerNorm(MODEL_DIM))
        self.decoder = _Decoder()
        self.classifier = nn.Linear(MODEL_DIM, 1)
        self.eval()

    # ---- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, variant: str = "dist", device: Any = "cpu") -> "AMES":
        """Load an official AMES checkpoint (dict key `state`) strictly. Wrong variant, keys or shapes -> WeightsError."""
        from ...weight_files import safe_torch_load

        path = Path(path)
        obj = safe_torch_load(path)
        state = obj.get("state", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{path} is not an AMES checkpoint (no `state` dict of tensors)",
                               "use r101_cvnet_ames.pt (float) or cvnet_ames_dist.pt (dist)")
        model = cls(variant)
        expected = model.state_dict()
        other = "float" if variant == "dist" else "dist"
        if set(state) == set(cls(other).state_dict()) and set(state) != set(expected):
            raise WeightsError(f"{path} is an AMES {other} checkpoint, but the {variant} variant was requested",
                               f"use the ames-{other} model or the {variant} checkpoint")
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
                    ([f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else "")]
                     if unexpected else [])
            raise WeightsError(f"{path} does not match the AMES {variant} model: {'; '.join(parts)}",
                               "the file is not an official AMES checkpoint for this variant")
        for key, ref in expected.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise WeightsError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}",
                                   "the file is not an official AMES checkpoint for this variant")
            if not state[key].is_floating_point() or not torch.isfinite(state[key]).all():
                raise WeightsError(f"{path}: {key} is not a finite floating-point tensor", "download the file again")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return self.mtc_token.device

    # ---- descriptors -> tokens -----------------------------------------------------------------------------------
    def _clean(self, desc: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptors [B, L, 1024] with padding rows zeroed (they may hold NaN or anything), mask [B, L] bool."""
        d = _as_tensor(desc).to(self.device, torch.float32)
        m = _as_tensor(mask).to(self.device).bool()
        if d.dim() != 3 or d.shape[-1] != self.local_dim or m.shape != d.shape[:2]:
            raise ModelError(f"AMES expects descriptors [B, L, {self.local_dim}] and mask [B, L], "
                             f"got {tuple(d.shape)} and {tuple(m.shape)}")
        return torch.where(m[..., None], torch.zeros((), device=d.device), d), m

    @torch.no_grad()
    def encode(self, desc: Any, mask: Any, database: bool) -> np.ndarray:
        """Descriptors [B, L, 1024] -> tokens in their stored form.

        dist: packed ITQ sign bits uint8 [B, L, 16] (same for queries and database);
        float: remapped tokens [B, L, 128], float16 for the database (the reference rounds database tokens through
        fp16), float32 for queries (the reference keeps them in full precision). Padding rows hold zeros."""
        d, m = self._clean(desc, mask)
        d = F.normalize(d, p=2, dim=-1)
        if self.variant == "dist":
            bits = pack_signs(self.remap_local[0](d))
            bits[m.cpu().numpy()] = 0  # a zeroed row would otherwise pack to all-ones (sign of 0 counts as +1)
            return bits
        tok = self.remap_local(d)
        tok = torch.where(m[..., None], torch.zeros((), device=tok.device), tok)
        return tok.half().cpu().numpy() if database else tok.cpu().numpy()

    def embed(self, tokens: Any, mask: Any) -> torch.Tensor:
        """Stored tokens (packed bits [B, L, 16] or float [B, L, 128]) -> transformer inputs float32 [B, L, 128]."""
        t = _as_tensor(tokens).to(self.device)
        m = _as_tensor(mask).to(self.device).bool()
        if self.variant == "dist":
            if t.dtype != torch.uint8 or t.shape[-1] != PACKED_BYTES:
                raise ModelError(f"AMES dist expects packed tokens uint8 [B, L, {PACKED_BYTES}], "
                                 f"got {t.dtype} {tuple(t.shape)}")
            x = self.remap_local[2](self.remap_local[1](unpack_signs(t)))
        else:
            if t.shape[-1] != MODEL_DIM:
                raise ModelError(f"AMES float expects tokens [B, L, {MODEL_DIM}], got {tuple(t.shape)}")
            x = t.float()
        if m.shape != x.shape[:2]:
            raise ModelError(f"mask {tuple(m.shape)} does not match tokens {tuple(x.shape)}")
        return torch.where(m[..., None], torch.zeros((), device=x.device), torch.nan_to_num(x))

    # ---- scoring -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_tokens(self, q: torch.Tensor, q_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor
                       ) -> torch.Tensor:
        """q [Bq, Lq, 128] (Bq = 1 shares one query across the batch), q_mask [Bq, Lq]; t [B, Lt, 128], t_mask
        [B, Lt]; masks True = padding. Returns logits [B]."""
        # Key positions that are padding in every pair never influence anything: drop them (exact, and much
        # faster for small query crops).
        keep_q = ~q_mask.all(0)
        keep_t = ~t_mask.all(0)
        if not bool(keep_q.all()):
            q, q_mask = q[:, keep_q], q_mask[:, keep_q]
        if not bool(keep_t.all()):
            t, t_mask = t[:, keep_t], t_mask[:, keep_t]
        m = self.mtc_token.view(1, 1, -1)
        xq, xt = q, t
        aq, at = ~q_mask, ~t_mask
        layers = self.decoder.layers
        for i, layer in enumerate(layers):
            m, xq, xt = layer(m, xq, xt, aq, at, last=i == len(layers) - 1)
        return self.classifier(m[:, 0]).view(-1)

    @torch.no_grad()
    def score(self, q_desc: Any, q_mask: Any, db_desc: Any, db_mask: Any) -> np.ndarray:
        """Logits [B] for pairs: q_desc [B, Lq, 1024], q_mask [B, Lq] bool (True = padding), db_desc [B, Ld, 1024],
        db_mask [B, Ld]; numpy or torch. Goes through the stored encodings (bits / fp16), as the reference does."""
        qt = self.embed(self.encode(q_desc, q_mask, database=False), q_mask)
        tt = self.embed(self.encode(db_desc, db_mask, database=True), db_mask)
        if qt.shape[0] != tt.shape[0]:
            raise ModelError(f"query batch {qt.shape[0]} != database batch {tt.shape[0]}")
        qm = _as_tensor(q_mask).to(self.device).bool()
        tm = _as_tensor(db_mask).to(self.device).bool()
        return self.forward_tokens(qt, qm, tt, tm).float().cpu().numpy()

    @torch.no_grad()
    def score_tokens(self, q_tokens: Any, q_mask: Any, db_tokens: Any, db_mask: Any, batch_size: int = 50
                     ) -> np.ndarray:
        """One query's stored tokens [Lq, ...] + mask [Lq] against database tokens [N, Ld, ...] + masks [N, Ld],
        in batches of `batch_size` pairs. Returns logits [N] float32."""
        qm = _as_tensor(q_mask).to(self.device).bool()[None]
        q = self.embed(_as_tensor(q_tokens)[None], qm)
        dm_all = _as_tensor(db_mask).bool()
        db_all = _as_tensor(db_tokens)
        out = []
        for s in range(0, db_all.shape[0], batch_size):
            dm = dm_all[s:s + batch_size].to(self.device)
            t = self.embed(db_all[s:s + batch_size], dm)
            out.append(self.forward_tokens(q, qm, t, dm).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def random_state(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random AMES state_dict in the official layout (for tests and benchmarks; no real weights are shipped).

    Drawn with numpy's legacy RandomState so the numbers are the same on every platform. Scales keep activations
    O(1) so that logits spread over a few units instead of collapsing onto the bias."""
    rs = np.random.RandomState(seed)
    out: dict[str, torch.Tensor] = {}
    for key, ref in AMES(variant).state_dict().items():
        shape = tuple(ref.shape)
        if key.endswith("remap_local.0.W"):
            val = rs.standard_normal(shape)  # x @ W ~ N(0, 1) for unit x
        elif key.startswith("mtc_token"):
            val = rs.standard_normal(shape)
        elif key == "classifier.weight":
            val = 0.5 * rs.standard_normal(shape)  # logits spread over a few units
        elif "norm" in key or (key in ("remap_local.1.weight", "remap_local.2.weight") and len(shape) == 1):
            val = (1.0 if key.endswith("weight") else 0.0) + 0.1 * rs.standard_normal(shape)
        elif key.endswith("bias"):
            val = 0.1 * rs.standard_normal(shape)
        else:
            val = rs.standard_normal(shape) / np.sqrt(shape[-1])
        out[key] = torch.from_numpy(np.asarray(val, np.float32).reshape(shape))
    return out


def load_ames(config: dict[str, Any], weights_dir: Path, device: Any) -> AMES:
    """The AMES transformer named by config `[rerank]` (variant, checkpoint) from weights_dir."""
    rr = config["rerank"]
    variant = rr["variant"]
    if variant not in VARIANTS:
        raise UsageError(f"unknown AMES variant {variant!r} in config", "use 'float' or 'dist'")
    path = Path(weights_dir) / rr["checkpoint"]
    if not path.is_file():
        from ...weight_files import download_hint

        raise WeightsError(f"AMES checkpoint not found: {path}", download_hint(path.name, config.get("name")))
    return AMES.from_checkpoint(path, variant, device)
