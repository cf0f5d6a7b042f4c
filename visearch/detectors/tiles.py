"""Weight-free region proposals: multi-scale overlapping windows (`tiles`; the whole image only: whole_image.py).

Tile geometry (exact). For each level `n` in `levels` (default (2, 3)) the image is cut into `n x n` windows that
overlap by half: along an axis of length `L`, window `i` (0 <= i < n) spans
`[round(i * L / (n + 1)), round((i + 2) * L / (n + 1)))`, so each window is `2 / (n + 1)` of the side and
neighbours share half a window. Level 2 gives 4 windows of 2/3 of each side, level 3 gives 9 windows of 1/2, level 4
16 windows of 2/5. Windows keep the image's aspect ratio. Order: level by level, rows top to bottom, then columns
left to right. Boxes carry score None (they are proposals, not detections) and labels "tile <n>x<n> r<row> c<col>".
The whole image is not among the tiles; `select_crops` adds it as the last crop.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from .base import Box, Detector, check_image, check_options

DEFAULT_LEVELS = (2, 3)


def tile_boxes(width: int, height: int, levels: Sequence[int] = DEFAULT_LEVELS) -> list[Box]:
    """The tile windows of a `width x height` image (see the module docstring for the geometry)."""
    out: list[Box] = []
    for n in levels:
        for r in range(n):
            y0, y1 = round(r * height / (n + 1)), round((r + 2) * height / (n + 1))
            for c in range(n):
                x0, x1 = round(c * width / (n + 1)), round((c + 2) * width / (n + 1))
                if x1 > x0 and y1 > y0:
                    out.append(Box(x0, y0, x1, y1, None, f"tile {n}x{n} r{r} c{c}"))
    return out


class TilesDetector(Detector):
    """Multi-scale overlapping windows; the prompt is ignored."""

    name = "tiles"

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS):
        levels = tuple(int(n) for n in levels)
        if not levels or any(n < 1 or n > 16 for n in levels):
            raise UsageError(f"tile levels must be integers in 1..16, got {list(levels)}", "e.g. levels=(2, 3)")
        self.levels = levels

    def detect(self, image: np.ndarray, prompt: str | None = None) -> list[Box]:
        h, w = check_image(image)
        return tile_boxes(w, h, self.levels)


def build_tiles(levels: Sequence[int] | None = None, device: Any = None, weights_dir: Any = None,
                **options: Any) -> TilesDetector:
    """Options: `levels` (grid sizes, default (2, 3)). `device` / `weights_dir` are accepted and ignored; other
    options must be None."""
    check_options("tiles", options)
    return TilesDetector(DEFAULT_LEVELS if levels is None else levels)
