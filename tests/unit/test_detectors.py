"""Detector basics: prompts, NMS, crop selection, crops, and the exact geometry of the weight-free detectors."""
from __future__ import annotations

import numpy as np
import pytest

from visearch.detectors import Box, crop, nms, normalize_prompt, select_crops
from visearch.detectors.base import DEFAULT_PROMPT, box_iou
from visearch.detectors.tiles import TilesDetector, build_tiles, tile_boxes
from visearch.detectors.whole_image import build as build_none
from visearch.errors import ImageError, UsageError
from visearch.registry import load_detector


def _img(h: int = 240, w: int = 320) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- prompts ------------------------------------------------------------------------------------------------------
def test_normalize_prompt_combines_user_and_default():
    assert normalize_prompt("Red Jacket, bag", DEFAULT_PROMPT) == "red jacket . bag . main object . key object . logo ."
    assert normalize_prompt("clothes . bag", "") == "clothes . bag ."
    assert normalize_prompt(None, "main object . logo") == "main object . logo ."
    assert normalize_prompt("  Logo .  ", "logo . car") == "logo . car ."  # duplicate dropped, order kept
    assert normalize_prompt("", None) == ""
    assert normalize_prompt(" . , ;", "") == ""
    assert normalize_prompt("a\nb;c", "") == "a . b . c ."


# --- boxes, NMS, crops --------------------------------------------------------------------------------------------
def test_box_helpers():
    b = Box(10, 20, 50, 60, 0.5, "x")
    assert b.as_list() == [10.0, 20.0, 50.0, 60.0]
    assert b.to_dict() == {"box": [10.0, 20.0, 50.0, 60.0], "score": 0.5, "label": "x"}
    assert (b.width, b.height, b.area) == (40, 40, 1600)
    assert box_iou(b, Box(30, 20, 70, 60, None, "")) == pytest.approx(800 / 2400)
    assert box_iou(b, Box(60, 60, 70, 70, None, "")) == 0.0


def test_nms_keeps_best_of_overlapping_and_passes_unscored():
    a = Box(0, 0, 100, 100, 0.6, "a")
    b = Box(5, 5, 105, 105, 0.9, "b")  # IoU with a ~0.82
    c = Box(200, 200, 260, 260, 0.3, "c")
    t = Box(0, 0, 100, 100, None, "tile")
    out = nms([a, b, c, t], iou=0.5)
    assert [x.label for x in out] == ["b", "c", "tile"]
    assert [x.label for x in nms([a, b, c], iou=0.9)] == ["b", "a", "c"]


def test_select_crops_geometry():
    boxes = [
        Box(100, 50, 200, 150, 0.9, "jacket"),
        Box(102, 52, 198, 148, 0.8, "dup"),  # suppressed by NMS
        Box(10, 10, 20, 20, 0.95, "tiny"),  # below min_size
        Box(250, 180, 330, 260, 0.5, "edge"),  # clipped to the image
        Box(0, 0, 320, 240, 0.7, "everything"),  # equals the whole image: dropped as duplicate
    ]
    crops = select_crops(boxes, (320, 240), max_boxes=5, min_size=16, pad_frac=0.05)
    assert [c.label for c in crops] == ["jacket", "edge", "whole image"]
    # 100x100 box padded by 5 px per side; the edge box (clipped to 250..320 x 180..240) padded by 3.5/3 px
    assert crops[0].as_list() == [95, 45, 205, 155]
    assert crops[1].as_list() == [246, 177, 320, 240]
    assert crops[-1].as_list() == [0, 0, 320, 240] and crops[-1].score is None
    assert all(isinstance(v, int) for c in crops for v in (c.x0, c.y0, c.x1, c.y1))
    assert [c.label for c in select_crops(boxes, (320, 240), max_boxes=1)] == ["jacket", "whole image"]
    assert [c.label for c in select_crops([], (320, 240))] == ["whole image"]


def test_select_crops_keeps_all_tiles():
    tiles = tile_boxes(320, 240)
    crops = select_crops(tiles, (320, 240), max_boxes=2, pad_frac=0.0)
    assert len(crops) == len(tiles) + 1
    assert [c.as_list() for c in crops[:-1]] == [t.as_list() for t in tiles]


def test_crop_pixels_and_errors():
    img = _img()
    c = crop(img, Box(10.4, 20.6, 30.2, 40.0, None, ""))
    assert c.shape == (20, 21, 3) and c.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(c, img[20:40, 10:31])
    np.testing.assert_array_equal(crop(img, Box(-5, -5, 400, 400, None, "")), img)
    with pytest.raises(ImageError):
        crop(img, Box(400, 10, 500, 20, None, ""))
    with pytest.raises(ImageError):
        crop(img.astype(np.float32), Box(0, 0, 5, 5, None, ""))


# --- tiles / none -------------------------------------------------------------------------------------------------
def test_tiles_exact_geometry():
    boxes = TilesDetector().detect(_img(240, 320), "ignored")
    assert len(boxes) == 4 + 9
    # level 2: windows of 2/3 of each side at 0 and 1/3
    assert [b.as_list() for b in boxes[:4]] == [[0, 0, 213, 160], [107, 0, 320, 160],
                                                [0, 80, 213, 240], [107, 80, 320, 240]]
    # level 3: windows of half of each side, step a quarter
    assert [b.as_list() for b in boxes[4:7]] == [[0, 0, 160, 120], [80, 0, 240, 120], [160, 0, 320, 120]]
    assert boxes[-1].as_list() == [160, 120, 320, 240]
    assert boxes[5].label == "tile 3x3 r0 c1"
    assert all(b.score is None for b in boxes)


def test_tiles_levels_and_odd_sizes():
    boxes = build_tiles(levels=[1, 4]).detect(_img(101, 37))
    assert len(boxes) == 1 + 16
    assert boxes[0].as_list() == [0, 0, 37, 101]  # level 1 = one window of 2/2: the whole image
    # level 4 on 37 px: edges round(i * 37 / 5)
    assert sorted({(b.x0, b.x1) for b in boxes[1:]}) == [(0, 15), (7, 22), (15, 30), (22, 37)]
    assert all(0 <= b.x0 < b.x1 <= 37 and 0 <= b.y0 < b.y1 <= 101 for b in boxes)
    with pytest.raises(UsageError):
        build_tiles(levels=[0])


def test_none_is_whole_image_and_select_crops_does_not_duplicate():
    det = build_none()
    boxes = det.detect(_img(50, 70))
    assert [b.to_dict() for b in boxes] == [{"box": [0.0, 0.0, 70.0, 50.0], "score": None, "label": "whole image"}]
    crops = select_crops(boxes, (70, 50))
    assert [c.as_list() for c in crops] == [[0, 0, 70, 50]]


def test_registry_and_option_checks():
    assert isinstance(load_detector("tiles", weights_dir="w", device="cpu", box_threshold=None), TilesDetector)
    assert load_detector("none").detect(_img(8, 8))[0].label == "whole image"
    with pytest.raises(UsageError, match="box_threshold"):
        load_detector("tiles", box_threshold=0.3)
    with pytest.raises(UsageError, match="token_file"):
        build_none(token_file="t")
    with pytest.raises(ImageError):
        TilesDetector().detect(np.zeros((10, 10), np.uint8))
