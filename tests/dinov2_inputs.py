"""Seeded inputs shared by the DINOv2 / AMES-DINOv2 parity tests and the script that made their goldens (run outside
the repository against facebookresearch/dinov2 @ b8931f7 and pavelsuma/ames @ c6af26e; see
tests/models/test_ames_dinov2.py for what each golden holds)."""
from __future__ import annotations

import numpy as np

BACKBONE_SEED, DETECTOR_SEED = 31, 32
AMES_SEED = {"float": 33, "dist": 34}
# odd sizes (H, W): below, at and above multiples of 14, a tiny one (-> 14 x 14) and one with > 700 patches (top-k)
SIZES = [(61, 89), (100, 45), (7, 5), (33, 250), (97, 141), (400, 430)]
LOCAL_IMAGES = (0, 1, 5)  # images whose local records are compared (the last has 29 x 31 = 899 patches > 700)
IMSIZES = (0, 224, 100)   # 0 = native resolution (the reference default, --imsize absent)


def make_images() -> list[np.ndarray]:
    """BGR uint8 images of SIZES: smooth colour blobs plus noise, so tokens differ across positions."""
    rs = np.random.RandomState(17)
    out = []
    for h, w in SIZES:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        im = np.zeros((h, w, 3))
        for _ in range(6):
            cy, cx, r = rs.uniform(0, h), rs.uniform(0, w), rs.uniform(4, 0.4 * max(h, w))
            im += rs.uniform(-120, 120, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        im += 128 + rs.normal(0, 12, (h, w, 3))
        out.append(np.clip(np.round(im), 0, 255).astype(np.uint8))
    return out


def projection(dim: int = 768, k: int = 8) -> np.ndarray:
    """A fixed random projection: every descriptor row is compared through it (the goldens stay small)."""
    return np.random.RandomState(9).standard_normal((dim, k)).astype(np.float32)
