"""The `whole-image` detector (also called `none`): the whole image as the only region, so a query without a
detector goes through the same path as one with a detector (select_crops keeps the whole image once)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Box, Detector, check_image, check_options, whole_image_box


class WholeImageDetector(Detector):
    """The whole image as the only box (label "whole image", score None)."""

    name = "whole-image"

    def detect(self, image: np.ndarray, prompt: str | None = None) -> list[Box]:
        h, w = check_image(image)
        return [whole_image_box(w, h)]


def build(device: Any = None, weights_dir: Any = None, **options: Any) -> WholeImageDetector:
    """No options: `device` / `weights_dir` are accepted and ignored; other options must be None."""
    check_options("whole-image", options)
    return WholeImageDetector()
