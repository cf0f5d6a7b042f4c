"""AMES describer: SuperGlobal global descriptors + AMES local tokens from one CVNet ResNet-101 (Suma et al.,
"AMES: Asymmetric and Memory-Efficient Similarity Estimation for Instance-level Retrieval", ECCV 2024,
arXiv 2408.03282).

Each image is decoded once and goes through the backbone twice with the same weights: with ReLU+ for the SuperGlobal
global descriptor (visearch.models.superglobal) and with plain ReLU for the local features, as the reference does.
Local features: the map after the last s3 block's residual add (before its ReLU), 1024-d at stride 16, at three
scales resized on the uint8 BGR image with OpenCV (INTER_AREA below 1, INTER_LINEAR above, none at 1); the published
detector gives each position a weight and its descriptor `normalize(BN(conv1(x)))`; the top-k by weight over all
scales are kept, sorted by weight. Stored per image (what the AMES transformer needs, nothing more):
  dist:  `tokens` uint8 [k, 16] (ITQ sign bits, 16 B per local), `mask` bool [k] (True = padding);
  float: `tokens` float16 [k, 128] (remapped tokens, 256 B per local), `mask` bool [k].
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ModelError, WeightsError
from ..fsutil import sha256_file
from ..images import check_aspect, work_scale
from .base import Describer, Features, LocalField
from .nets.ames_detector import load_detector
from .nets.ames_transformer import ITQ_BITS, LOCAL_DIM, MODEL_DIM, PACKED_BYTES, load_ames
from .nets.cvnet_resnet import CVNetResNet, load_cvnet_state
from .superglobal import MEAN_BGR, STD_BGR, SuperGlobal

log = logging.getLogger(__name__)

# Geometry of the s3 map (CVNet / AMES reference): stride 16, receptive field 291, padding 145. A position's centre
# is the middle of its receptive-field box, i.e. 16 * index / scale.
STRIDE = 16.0
RF_PADDING = 145.0
RF = 291.0



def resize_bgr(bgr: np.ndarray, s: float) -> np.ndarray:
    """Reference resizing of a uint8 BGR image by factor s: OpenCV INTER_AREA for s < 1, INTER_LINEAR for s > 1,
    untouched at 1 (output size by OpenCV's own rounding of fx, fy)."""
    import cv2

    if s < 1.0:
        return cv2.resize(bgr, (0, 0), fx=s, fy=s, interpolation=cv2.INTER_AREA)
    if s > 1.0:
        return cv2.resize(bgr, (0, 0), fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    return bgr


@dataclass
class AMESDescriber(Describer):
    """Describer for `ames-dist` / `ames-float`: `extract` gives SuperGlobal `[N, 2048]` + local `tokens`/`mask`."""

    global_model: Any = None  # SuperGlobal on the ReLU+ backbone
    local_net: Any = None  # the same weights, plain ReLU
    detector: Any = None
    ames: Any = None  # AMES transformer (its remap_local encodes the stored tokens)

    def __post_init__(self) -> None:
        loc = self.config["local"]
        self.scales = [float(s) for s in loc["scales"]]
        self.topk = int(loc["topk"])
        self.max_side = int(loc["max_side"] or 0)
        self.mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD_BGR, device=self.device).view(1, 3, 1, 1)

    # ---- local features -----------------------------------------------------------------------------------------
    def _scales_for(self, h: int, w: int) -> list[float]:
        """Reference: scales * imsize / long side when a size is set; we apply it only to shrink large images (and
        images above MAX_DESCRIBE_PIXELS, so the work per image stays bounded)."""
        check_aspect(w, h, "image")
        f = self.max_side / max(h, w) if self.max_side and max(h, w) > self.max_side else 1.0
        f = min(f, work_scale(w, h))
        if f < 1.0:
            return [s * f for s in self.scales]
        return list(self.scales)

    @torch.inference_mode()
    def _local_one(self, bgr: np.ndarray) -> dict[str, np.ndarray]:
        """One BGR uint8 image -> top-k local features (see describe_local)."""
        descs, weights, rows, cols, scale_of = [], [], [], [], []
        scales = self._scales_for(*bgr.shape[:2])
        for si, s in enumerate(scales):
            im = resize_bgr(bgr, s)
            x = torch.from_numpy(np.ascontiguousarray(im)).to(self.device).permute(2, 0, 1)[None].float()
            x = (x / 255.0 - self.mean) / self.std
            d, wgt = self.detector(self.local_net.forward_s3_preact(x))
            h, w = d.shape[-2:]
            descs.append(d[0].flatten(1).T)  # [h*w, 1024], row-major
            weights.append(wgt[0, 0].flatten())
            idx = np.arange(h * w)
            rows.append(idx // w)
            cols.append(idx % w)
            scale_of.append(np.full(h * w, si))
        allw = torch.cat(weights)
        n = min(self.topk, allw.numel())
        top_w, top_i = torch.topk(allw, n)  # sorted, descending
        ids = top_i.cpu().numpy()
        sidx = np.concatenate(scale_of)[ids]
        svals = np.asarray(scales, np.float64)[sidx]
        r = np.concatenate(rows)[ids].astype(np.float64)
        c = np.concatenate(cols)[ids].astype(np.float64)
        # receptive-field box centre, computed as the reference does (float64, then stored as float32)
        y = ((STRIDE * r - RF_PADDING) / svals + (STRIDE * r - RF_PADDING + RF - 1) / svals) / 2.0
        x = ((STRIDE * c - RF_PADDING) / svals + (STRIDE * c - RF_PADDING + RF - 1) / svals) / 2.0
        k = self.topk
        out = {"descriptors": np.zeros((k, LOCAL_DIM), np.float32), "positions": np.zeros((k, 2), np.float32),
               "scales": np.zeros(k, np.int64), "weights": np.zeros(k, np.float32), "mask": np.ones(k, bool)}
        out["descriptors"][:n] = torch.cat(descs)[top_i].float().cpu().numpy()
        out["positions"][:n, 0], out["positions"][:n, 1] = y, x
        out["scales"][:n] = sidx
        out["weights"][:n] = top_w.float().cpu().numpy()
        out["mask"][:n] = False
        return out

    def describe_local(self, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Per image: `descriptors` [k, 1024] float32 (normalised BN(conv1(x))), `positions` [k, 2] float32 (y, x in
        pixels of the input image), `scales` [k] int (index into the configured scales), `weights` [k] float32
        (detector), `mask` [k] bool (True = padding); rows sorted by weight, padding rows zero. k = config topk."""
        from ..images import load_rgb

        return [self._local_one(self._bgr(load_rgb(im))) for im in images]

    @staticmethod
    def _bgr(rgb: np.ndarray) -> np.ndarray:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ModelError(f"ames expects RGB uint8 [H, W, 3] arrays, got {rgb.dtype} {rgb.shape}",
                             "load images with visearch.images.load_rgb")
        return np.ascontiguousarray(rgb[:, :, ::-1])

    # ---- extraction ---------------------------------------------------------------------------------------------
    def _extract(self, images: Sequence[np.ndarray], database: bool) -> Features:
        self.global_model.batch_size = self.batch_size  # extract's --batch-size reaches the global path too
        glob = self.global_model.extract(images).global_  # decodes nothing: arrays are shared
        loc = [self._local_one(self._bgr(im)) for im in images]
        k = self.topk
        if not loc:
            shape = (0, k, PACKED_BYTES) if self.ames.variant == "dist" else (0, k, MODEL_DIM)
            return Features(global_=glob, local={"tokens": np.zeros(shape, self.local_fields["tokens"].dtype),
                                                 "mask": np.zeros((0, k), bool)})
        desc = np.stack([d["descriptors"] for d in loc])
        mask = np.stack([d["mask"] for d in loc])
        tokens = self.ames.encode(desc, mask, database=database)
        return Features(global_=glob, local={"tokens": tokens, "mask": mask})

    def extract(self, images: Sequence[np.ndarray]) -> Features:
        """RGB uint8 arrays -> Features(global_ [N, 2048] float32, local {"tokens", "mask"} in stored form)."""
        return self._extract(images, database=True)

    def extract_query(self, images: Sequence[np.ndarray]) -> Features:
        """Like extract, for query crops: float-variant tokens stay float32 (the reference rounds only the database
        side through fp16); dist tokens are identical to extract's."""
        return self._extract(images, database=False)


def _require(path: Path, model: str) -> Path:
    if not path.is_file():
        raise WeightsError(f"weights for {model} not found: {path}", f"run `visearch weights download {model}`")
    return path


def build(config: dict[str, Any], weights: Path | None, weights_dir: Path, device: torch.device) -> AMESDescriber:
    """Factory (registry family `ames`): CVNet R101 (strict; an R50 file is refused), detector, AMES checkpoint of the
    configured variant. `weights` overrides the backbone file; the others come from `weights_dir`."""
    from ..config.schema import resolve

    config = resolve({"family": "ames", **config}, config.get("name", "ames"))  # defaults: config/schema.py
    name = config.get("name", "ames")
    if int(config["describe"]["depth"]) != 101 or not config["describe"]["relup"]:
        raise ModelError("AMES needs the SuperGlobal R101 (ReLU+) global path", "set describe.depth = 101, relup = true")
    wdir = Path(weights_dir)
    wfiles = config["weights"]
    backbone = Path(weights) if weights else _require(wdir / wfiles["backbone"], name)
    detector_path = _require(wdir / wfiles["detector"], name)
    checkpoint = _require(wdir / config["rerank"]["checkpoint"], name)

    net_g = CVNetResNet(101, relup=True)
    sha_backbone = load_cvnet_state(net_g, backbone)  # strict: R50 or partial files raise WeightsError
    net_l = CVNetResNet(101, relup=False)
    net_l.load_state_dict(net_g.state_dict(), assign=True)  # same tensors, other activations: no second copy
    net_g.to(device).eval()
    net_l.to(device).eval()
    det = load_detector(detector_path).to(device)
    ames = load_ames(config, wdir, device)
    itq = wdir / wfiles["itq"]
    if ames.variant == "dist" and itq.is_file():  # informative only: the checkpoint's W is what the model uses
        try:
            with np.load(itq) as z:
                proj = z["proj"]
            same = proj.shape == (LOCAL_DIM, ITQ_BITS) and np.allclose(proj, ames.remap_local[0].W.detach().cpu().numpy())
            log.debug("%s %s the checkpoint's ITQ projection (the checkpoint's is used)", itq,
                      "matches" if same else "differs from")
        except Exception as e:  # noqa: BLE001 - any garbage (BadZipFile, EOFError, ...): informative file only
            log.warning("ignoring unreadable %s (%s); the AMES checkpoint carries the projection", itq, e)

    sha = hashlib.sha256()
    for part in (sha_backbone, sha256_file(detector_path), sha256_file(checkpoint)):
        sha.update(part.encode())
    k = int(config["local"]["topk"])
    fields = {"tokens": LocalField((k, PACKED_BYTES), "uint8") if ames.variant == "dist"
              else LocalField((k, MODEL_DIM), "float16"), "mask": LocalField((k,), "bool")}
    sg = SuperGlobal(name=name, dim=2048, config=config, device=device, weights_sha256=sha_backbone, net=net_g)
    return AMESDescriber(name=name, dim=2048, config=config, device=device, weights_sha256=sha.hexdigest(),
                         local_fields=fields, global_model=sg, local_net=net_l, detector=det, ames=ames)
