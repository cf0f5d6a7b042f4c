"""Detector protocol, boxes, prompts and the crop selection that turns boxes into query crops.

Boxes are pixel coordinates `xyxy` in the original image (x right, y down; `x1`/`y1` exclusive, as in slicing).
Images are RGB uint8 numpy arrays `[H, W, 3]`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ImageError, UsageError

# The prototype's prompt: generic phrases so that "find this" works with no user prompt.
DEFAULT_PROMPT = "main object . key object . logo"
WHOLE_IMAGE_LABEL = "whole image"


@dataclass
class Box:
    """One region: pixel xyxy, detector score (None for weight-free proposals such as tiles) and a label."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float | None
    label: str

    def as_list(self) -> list[float]:
        """`[x0, y0, x1, y1]` as plain floats (JSON-ready)."""
        return [float(self.x0), float(self.y0), float(self.x1), float(self.y1)]

    def to_dict(self) -> dict[str, Any]:
        """`{"box": [x0, y0, x1, y1], "score": float | None, "label": str}` as in `detect --json`."""
        return {"box": self.as_list(), "score": None if self.score is None else float(self.score),
                "label": self.label}

    @property
    def width(self) -> float:
        return max(0.0, float(self.x1) - float(self.x0))

    @property
    def height(self) -> float:
        return max(0.0, float(self.y1) - float(self.y0))

    @property
    def area(self) -> float:
        return self.width * self.height


@runtime_checkable
class DetectorProtocol(Protocol):
    """What the pipeline needs from a detector: `detect(image, prompt)` returns boxes in the image's pixel
    coordinates, best first (the whole-image detector returns the whole image; select_crops always adds it)."""

    name: str

    def detect(self, image: np.ndarray, prompt: str | None = None) -> list[Box]:
        """Boxes for one RGB uint8 image `[H, W, 3]`; `prompt` is free text (see `normalize_prompt`)."""
        ...


class Detector(DetectorProtocol):
    """Base class of the detectors here: subclasses set `name` and implement `detect`."""

    name: str = "detector"

    def detect(self, image: np.ndarray, prompt: str | None = None) -> list[Box]:
        raise NotImplementedError


def check_image(image: np.ndarray) -> tuple[int, int]:
    """Validate an RGB uint8 `[H, W, 3]` array; returns `(H, W)`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ImageError(f"detector input must be an RGB uint8 array [H, W, 3], got {type(image).__name__} "
                         f"{shape}", "load images with visearch.images.load_rgb")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ImageError(f"empty image of shape {image.shape}")
    return int(h), int(w)


def check_options(detector: str, options: dict[str, Any]) -> None:
    """Reject options that do not apply to `detector`. None values are ignored so the CLI can pass every flag."""
    extra = sorted(k for k, v in options.items() if v is not None)
    if extra:
        raise UsageError(f"option(s) {', '.join(extra)} do not apply to detector {detector!r}")


_SPLIT = re.compile(r"[.;,\n]+")


def _phrases(text: str | None) -> list[str]:
    if not text:
        return []
    return [" ".join(p.split()).lower() for p in _SPLIT.split(text) if p.strip()]


def normalize_prompt(user: str | None, default: str | None = DEFAULT_PROMPT) -> str:
    """Grounding DINO prompt: lowercase phrases, user phrases first then the default ones, duplicates dropped,
    joined by " . " and ending with " ." (e.g. "red jacket . main object ."). Phrases in the input may be separated
    by ".", ",", ";" or newlines. Returns "" when both are empty (then only the whole image is meaningful)."""
    seen: dict[str, None] = {}
    for p in _phrases(user) + _phrases(default):
        seen.setdefault(p, None)
    return " . ".join(seen) + " ." if seen else ""


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    iw = min(a.x1, b.x1) - max(a.x0, b.x0)
    ih = min(a.y1, b.y1) - max(a.y0, b.y0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def nms(boxes: Sequence[Box], iou: float = 0.5) -> list[Box]:
    """Class-agnostic greedy non-maximum suppression over scored boxes, best score first.

    Boxes without a score (weight-free proposals such as tiles) are not detections: they are kept as they are,
    in their order, after the scored ones."""
    scored = sorted((b for b in boxes if b.score is not None), key=lambda b: -float(b.score))  # type: ignore[arg-type]
    unscored = [b for b in boxes if b.score is None]
    kept: list[Box] = []
    for b in scored:
        if all(box_iou(b, k) <= iou for k in kept):
            kept.append(b)
    return kept + unscored


def clip_box(box: Box, width: int, height: int) -> Box:
    """The box clipped to the image `[0, width] x [0, height]`."""
    return Box(min(max(box.x0, 0), width), min(max(box.y0, 0), height),
               min(max(box.x1, 0), width), min(max(box.y1, 0), height), box.score, box.label)


def whole_image_box(width: int, height: int) -> Box:
    return Box(0, 0, width, height, None, WHOLE_IMAGE_LABEL)


def select_crops(boxes: Iterable[Box], image_size: tuple[int, int], max_boxes: int | None = 5,
                 min_size: float = 16, pad_frac: float = 0.05, iou: float = 0.5,
                 dup_iou: float = 0.95) -> list[Box]:
    """The query crops of one image: boxes after NMS, at most `max_boxes` scored ones (unscored proposals such as
    tiles are all kept; None = no limit), each padded by `pad_frac` of its width/height on every side, rounded
    outwards to whole pixels and clipped; boxes shorter than `min_size` px on either side (before padding) are
    dropped, and so are boxes that nearly equal the whole image (IoU >= `dup_iou`). The whole image is always the
    last crop (label "whole image", score None).

    `image_size` is `(width, height)` (PIL order; for an array use `(a.shape[1], a.shape[0])`)."""
    width, height = int(image_size[0]), int(image_size[1])
    if width < 1 or height < 1:
        raise ImageError(f"image size must be positive, got {image_size}")
    whole = whole_image_box(width, height)
    kept: list[Box] = []
    n_scored = 0
    for b in nms([clip_box(b, width, height) for b in boxes], iou):
        if b.width < min_size or b.height < min_size:
            continue
        if b.score is not None and max_boxes is not None and n_scored >= max_boxes:
            continue
        px, py = pad_frac * b.width, pad_frac * b.height
        padded = clip_box(Box(math.floor(b.x0 - px), math.floor(b.y0 - py), math.ceil(b.x1 + px),
                              math.ceil(b.y1 + py), b.score, b.label), width, height)
        if box_iou(padded, whole) >= dup_iou:
            continue
        n_scored += b.score is not None
        kept.append(Box(int(padded.x0), int(padded.y0), int(padded.x1), int(padded.y1), padded.score, padded.label))
    return kept + [whole]


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of `box` (rounded outwards, clipped) as a contiguous RGB uint8 array `[h, w, 3]`."""
    h, w = check_image(image)
    x0, y0 = max(0, math.floor(box.x0)), max(0, math.floor(box.y0))
    x1, y1 = min(w, math.ceil(box.x1)), min(h, math.ceil(box.y1))
    if x1 <= x0 or y1 <= y0:
        raise ImageError(f"crop box {box.as_list()} is empty inside a {w}x{h} image")
    return np.ascontiguousarray(image[y0:y1, x0:x1])
