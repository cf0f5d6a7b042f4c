"""Local Grounding DINO: the real transformers load + inference path on a tiny random model saved with
save_pretrained (tests/gdino_tiny.py), with the hub switched off. Outputs are random: wiring, shapes, ranges, errors."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.gdino_tiny import build_tiny_gdino
from visearch.detectors import Box, select_crops
from visearch.detectors.grounding_dino import GroundingDinoDetector, _clean_label, available, build, model_dir
from visearch.errors import UsageError, WeightsError
from visearch.registry import load_detector


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    wdir = tmp_path_factory.mktemp("weights")
    build_tiny_gdino(wdir / "grounding-dino-tiny")
    return wdir


@pytest.fixture(scope="module")
def detector(weights_dir) -> GroundingDinoDetector:
    import torch

    torch.set_num_threads(2)
    # box_threshold 0 keeps every query of the random model, so the box path is always exercised
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build(weights_dir=weights_dir, box_threshold=0.0, text_threshold=0.0, device="cpu")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_available_and_missing_folder(tmp_path, weights_dir):
    assert available(weights_dir)
    assert not available(tmp_path)
    assert not available(weights_dir, "base")
    with pytest.raises(WeightsError, match="visearch weights download grounding-dino-base") as e:
        build(weights_dir=weights_dir, variant="base", device="cpu")
    assert "not found" in str(e.value)
    with pytest.raises(UsageError):
        model_dir(weights_dir, "huge")


def test_incomplete_or_corrupt_folder(tmp_path, weights_dir):
    bad = tmp_path / "grounding-dino-tiny"
    shutil.copytree(weights_dir / "grounding-dino-tiny", bad)
    (bad / "model.safetensors").unlink()
    assert not available(tmp_path)
    with pytest.raises(WeightsError, match="no model.safetensors"):
        build(weights_dir=tmp_path, device="cpu")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot load Grounding DINO"):
        build(weights_dir=tmp_path, device="cpu")


def test_detect_boxes_in_image_coordinates(detector):
    h, w = 150, 260
    boxes = detector.detect(_img(h, w), "Red Jacket, bag")
    assert 1 <= len(boxes) <= 10  # num_queries of the tiny model
    for b in boxes:
        assert isinstance(b, Box)
        assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h
        assert 0.0 <= b.score <= 1.0
        assert b.label and "[SEP]" not in b.label and "." not in b.label
    scores = [b.score for b in boxes]
    assert scores == sorted(scores, reverse=True)
    crops = select_crops(boxes, (w, h), max_boxes=3, min_size=1)
    assert crops[-1].label == "whole image" and len(crops) <= 4


def test_batch_matches_single_and_thresholds(detector, weights_dir):
    a, b = _img(128, 160, 1), _img(128, 160, 2)
    single = detector.detect(a, "car")
    batch = detector.detect_batch([a, b], "car")
    assert len(batch) == 2
    np.testing.assert_allclose([x.as_list() for x in batch[0]], [x.as_list() for x in single], atol=1e-2)
    strict = load_detector("gdino", weights_dir=weights_dir, box_threshold=1.0, device="cpu")
    assert strict.detect(a, "car") == []
    assert detector.box_threshold == 0.0 and strict.text_threshold == 0.25  # default text threshold


def test_prompt_handling(detector, weights_dir):
    no_default = build(weights_dir=weights_dir, default_prompt="", box_threshold=0.0, device="cpu")
    assert no_default.detect(_img(128, 128), None) == []  # nothing to look for
    assert no_default.detect(_img(128, 128), "logo")  # a user prompt alone works
    with pytest.raises(UsageError, match="prompt too long"):
        detector.detect(_img(128, 128), " . ".join(f"thing{i}" for i in range(40)))
    with pytest.raises(UsageError, match="do not apply"):
        build(weights_dir=weights_dir, endpoint="http://x", device="cpu")


def test_clean_label():
    assert _clean_label("main object. logo. [SEP]") == "main object logo"
    assert _clean_label("[CLS] [SEP]") == "object"
