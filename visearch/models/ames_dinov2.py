"""AMES with DINOv2 local features: `ames-dinov2` (float) and `ames-dinov2-dist` (binarized), the strongest
published AMES models (Suma et al., ECCV 2024, arXiv 2408.03282; github.com/pavelsuma/ames extract/extract_dino.py).

Local features: the last block's normalised patch tokens of DINOv2 ViT-B/14 with 4 registers (CLS and registers
dropped) at native resolution rounded per side to multiples of 14 (visearch.models.dinov2), through the DINOv2
detector (`dinov2_detector.pt`: 1x1 conv -> BN -> descriptor normalize(BN(conv1(x))); ReLU -> 1x1 conv -> Softplus
weight); the top 700 by weight, sorted by weight. Per record as the reference: position (row, col) of the patch
centre normalised by the prepared image size ((i * 14 + 7) / H, (j * 14 + 7) / W), scale index 0, mask, weight,
768-d descriptor. Stored: AMES tokens (dist: ITQ sign bits, 16 B per local; float: remapped float16 tokens, 256 B)
and the mask, as for the CVNet AMES models.

Global stage (the shortlist AMES reranks), `describe.global_stage`:
  "superglobal": SuperGlobal on CVNet R101 (ReLU+), as in the published evaluation (nn_superglobal.pkl): needs
                 CVPR2022_CVNet_R101.pyth too and a second backbone pass per image; 2048-d.
  "cls":         the DINOv2 CLS token (L2-normalised; ELViS's nn_dinov2.pkl): no CVNet, no second pass, 768-d,
                 a weaker shortlist for landmarks.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError, WeightsError
from ..fsutil import sha256_file
from .ames import AMESDescriber
from .base import Features, LocalField
from .dinov2 import DIM, PATCH, DinoV2Backbone, as_bgr, backbone_path
from .nets.ames_detector import load_detector
from .nets.ames_transformer import MODEL_DIM, PACKED_BYTES, load_ames
from .nets.vit_dinov2 import load_dinov2

FILES = {"backbone": "dinov2_vitb14_reg4_pretrain.pth", "detector": "dinov2_detector.pt",
         "global_backbone": "CVPR2022_CVNet_R101.pyth", "itq": "itq_dinov2_D128.npz",
         "ames_float": "dinov2_ames.pt", "ames_dist": "dinov2_ames_dist.pt"}
DEFAULT_LOCAL: dict[str, Any] = {"topk": 700, "imsize": 0}
GLOBALS = ("superglobal", "cls")


def largest_divisor(n: int) -> int:
    """The largest divisor of n that is <= sqrt(n): the reference lays the tokens out as (d, n / d) for its
    1x1 detector (harmless: flattening restores the row-major order)."""
    d = np.arange(1, int(np.sqrt(n)) + 1)
    return int(d[n % d == 0][-1])


def patch_positions(h: int, w: int) -> torch.Tensor:
    """float32 `[h*w, 2]` (row, col) patch centres over the prepared size, row-major: ((i*14+7)/H, (j*14+7)/W),
    with the reference's float32 arithmetic."""
    size = torch.tensor([h * PATCH, w * PATCH])
    loc = torch.arange(max(h, w)) * PATCH + (PATCH / 2)
    rows = loc[None, :h].repeat_interleave(w, dim=1)
    cols = loc[None, :w].tile(h)
    return (torch.stack([rows, cols], dim=-1) / size)[0]


@dataclass
class AMESDinoV2Describer(AMESDescriber):
    """Describer for `ames-dinov2` / `ames-dinov2-dist`: global (SuperGlobal [N, 2048] or CLS [N, 768]) + local
    `tokens` / `mask` in stored form."""

    backbone: Any = None  # DinoV2Backbone

    def __post_init__(self) -> None:
        loc = self.config["local"]
        self.topk = int(loc["topk"])
        self.global_kind = str(self.config["describe"]["global_stage"])

    def _local_from_tokens(self, patches: torch.Tensor, hw: tuple[int, int]) -> dict[str, np.ndarray]:
        """Patch tokens [n, 768] of one image (an (h, w) grid) -> its top-k local records, as the reference."""
        n = patches.shape[0]
        d = largest_divisor(n)
        fmap = patches[None].permute(0, 2, 1).reshape(1, DIM, d, n // d)
        desc, wgt = self.detector(fmap)
        desc = desc.flatten(2).permute(0, 2, 1)[0]  # [n, 768], row-major
        wgt = wgt.flatten(1)[0]
        k = self.topk
        m = min(n, k)
        top_w, top_i = torch.topk(wgt, m)  # sorted, descending
        out = {"descriptors": np.zeros((k, DIM), np.float32), "positions": np.zeros((k, 2), np.float32),
               "scales": np.zeros(k, np.int64), "weights": np.zeros(k, np.float32), "mask": np.ones(k, bool)}
        out["descriptors"][:m] = desc[top_i].float().cpu().numpy()
        out["positions"][:m] = patch_positions(*hw)[top_i.cpu()].numpy()
        out["weights"][:m] = top_w.float().cpu().numpy()
        out["mask"][:m] = False
        return out

    @torch.inference_mode()
    def _forward(self, images: Sequence[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
        """RGB arrays -> (local records per image, L2-normalised CLS tokens [N, 768])."""
        bgrs = [as_bgr(im, self.name) for im in images]
        records, cls_rows = [], []
        for cls, patches, hw in self.backbone.forward_batch(bgrs):
            records.append(self._local_from_tokens(patches, hw))
            cls_rows.append(F.normalize(cls.float(), p=2, dim=-1).cpu().numpy())
        cls_arr = np.stack(cls_rows).astype(np.float32) if cls_rows else np.zeros((0, DIM), np.float32)
        return records, cls_arr

    def describe_local(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Per image: `descriptors` [k, 768] float32 (normalize(BN(conv1(token)))), `positions` [k, 2] float32
        (row, col of the patch centre over the prepared image, in [0, 1]), `scales` [k] (0: one scale), `weights`
        [k] float32 (detector), `mask` [k] bool (True = padding); sorted by weight, padding rows zero."""
        from ..images import load_rgb

        return self._forward([load_rgb(im) for im in images])[0]

    def _extract(self, images: Sequence[np.ndarray], database: bool) -> Features:
        k = self.topk
        records, cls = self._forward(images)
        glob = cls if self.global_kind == "cls" else self.global_model.extract(images).global_
        if not records:
            shape = (0, k, PACKED_BYTES) if self.ames.variant == "dist" else (0, k, MODEL_DIM)
            return Features(global_=glob, local={"tokens": np.zeros(shape, self.local_fields["tokens"].dtype),
                                                 "mask": np.zeros((0, k), bool)})
        desc = np.stack([r["descriptors"] for r in records])
        mask = np.stack([r["mask"] for r in records])
        return Features(global_=glob, local={"tokens": self.ames.encode(desc, mask, database=database),
                                             "mask": mask})


def _require(path: Path, model: str) -> Path:
    if not path.is_file():
        raise WeightsError(f"weights for {model} not found: {path}", f"run `visearch weights download {model}`")
    return path


def build(config: dict[str, Any], weights: Path | None, weights_dir: Path, device: torch.device
          ) -> AMESDinoV2Describer:
    """Factory (registry family `ames-dinov2`): DINOv2 ViT-B/14-reg4 (strict; `weights` overrides its file),
    the DINOv2 detector, the AMES checkpoint of the configured variant (768-d) and, for the SuperGlobal global
    stage, CVNet R101 (strict)."""
    from .superglobal import SuperGlobal

    config = dict(config)
    name = config.get("name", "ames-dinov2")
    describe = {"global_stage": "superglobal", **config.get("describe", {})}
    if describe["global_stage"] not in GLOBALS:
        raise UsageError(f"unknown global stage {describe['global']!r} for {name}", "use \"superglobal\" or \"cls\"")
    config["describe"] = describe  # complete: the config schema fills SuperGlobal's defaults
    config["local"] = {**DEFAULT_LOCAL, **config.get("local", {})}
    wdir = Path(weights_dir)
    wfiles = {**FILES, **config.get("weights", {})}
    rr = {"local_dim": DIM, **config.get("rerank", {})}
    config["rerank"] = rr
    if int(rr["local_dim"]) != DIM:
        raise UsageError(f"{name}: rerank.local_dim must be {DIM} (DINOv2 ViT-B tokens)")
    variant = rr.get("variant", "float")
    bb_path = backbone_path({"weights": {"backbone": wfiles["backbone"]}}, weights, wdir, name)
    det_path = _require(wdir / wfiles["detector"], name)
    ames_path = _require(wdir / rr.get("checkpoint", FILES[f"ames_{variant}"]), name)
    sg = None
    parts = []
    if describe["global_stage"] == "superglobal":
        from .nets.cvnet_resnet import CVNetResNet, load_cvnet_state

        if int(describe["depth"]) != 101 or not describe["relup"]:
            raise UsageError(f"{name}: the SuperGlobal shortlist is R101 with ReLU+",
                             "set describe.depth = 101, relup = true")
        net_g = CVNetResNet(101, relup=True)
        parts.append(load_cvnet_state(net_g, _require(wdir / wfiles["global_backbone"], name)))
        net_g.to(device).eval()
        sg = SuperGlobal(name=name, dim=2048, config=config, device=device, weights_sha256=parts[-1], net=net_g)
    net = load_dinov2(bb_path, device=device)
    det = load_detector(det_path, channels=DIM).to(device)
    ames = load_ames(config, wdir, device)
    sha = hashlib.sha256()
    for part in (*parts, sha256_file(bb_path), sha256_file(det_path), sha256_file(ames_path)):
        sha.update(part.encode())
    k = int(config["local"]["topk"])
    fields = {"tokens": LocalField((k, PACKED_BYTES), "uint8") if ames.variant == "dist"
              else LocalField((k, MODEL_DIM), "float16"), "mask": LocalField((k,), "bool")}
    bb = DinoV2Backbone(net=net, device=device, imsize=int(config["local"]["imsize"] or 0))
    return AMESDinoV2Describer(name=name, dim=2048 if sg is not None else DIM, config=config, device=device,
                               weights_sha256=sha.hexdigest(), local_fields=fields, global_model=sg,
                               detector=det, ames=ames, backbone=bb)
