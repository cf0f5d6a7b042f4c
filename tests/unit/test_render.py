"""Rendering: the contact sheet is a valid PNG with one tile per result, the HTML report is valid, self-contained
and has the expected number of embedded images, boxes are drawn where they belong."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visearch import render
from visearch.detectors import Box

# thumbnail colours chosen away from the palette, black text and the grey placeholder
COLOURS = [(11, 222, 33), (44, 55, 201), (201, 17, 177), (99, 150, 12), (3, 90, 160), (250, 200, 5),
           (120, 20, 60), (20, 120, 110)]


def _write(path: Path, colour, size=(64, 48)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def query(tmp_path) -> dict:
    q = np.full((240, 320, 3), 235, np.uint8)
    Image.fromarray(q).save(tmp_path / "query.png")
    paths = [_write(tmp_path / f"db{i}.png", c) for i, c in enumerate(COLOURS)]
    crops = [
        {"box": [40, 30, 140, 130], "label": "red jacket", "score": 0.81,
         "results": [{"rank": r + 1, "id": f"db{i}", "path": paths[i], "score": 0.9 - 0.1 * r}
                     for r, i in enumerate([0, 1, 2])]},
        {"box": [150, 100, 300, 220], "label": "bag", "score": 0.42,
         "results": [{"rank": r + 1, "id": f"db{i}", "path": paths[i], "score": 0.7 - 0.1 * r}
                     for r, i in enumerate([3, 4])]},
        {"box": [0, 0, 320, 240], "label": "whole image", "score": None,
         "results": [{"rank": r + 1, "id": f"db{i}", "path": paths[i], "score": 0.5 - 0.1 * r}
                     for r, i in enumerate([5, 6, 7])]},
    ]
    merged = [{"rank": 1, "id": "db0", "path": paths[0], "score": 0.9},
              {"rank": 2, "id": "db3", "path": paths[3], "score": 0.7}]
    return {"query": str(tmp_path / "query.png"), "model": "lite", "crops": crops, "merged": merged}


def _count(img: np.ndarray, colour) -> int:
    return int(np.all(img == np.array(colour, np.uint8), axis=-1).sum())


def test_contact_sheet_tiles(tmp_path, query):
    out = render.contact_sheet(query, tmp_path / "sheet.png", thumb_size=96)
    with Image.open(out) as im:
        assert im.format == "PNG"
        sheet = np.asarray(im.convert("RGB"))
    # every result appears exactly once as a full 96x96 tile (64x48 scaled to 96x72, centred on white)
    for c in COLOURS:
        assert _count(sheet, c) == 96 * 72, c
    # rows: title + query (320x240 shown 320 px high, scale 4/3) + 3 crop rows
    cell_h = 96 + render.CAPTION_HEIGHT + render.MARGIN
    assert sheet.shape[0] == render.MARGIN + 20 + 320 + render.MARGIN + 3 * cell_h + render.MARGIN
    # each crop's left box edge is outlined in its palette colour at its place on the scaled query
    top, s = render.MARGIN + 20, 4 / 3
    for i, (x, y) in enumerate([(40, 80), (150, 160)]):
        row = sheet[top + round(y * s), render.MARGIN + round(x * s) - 2: render.MARGIN + round(x * s) + 3]
        assert any(tuple(p) == render.PALETTE[i] for p in row), i


def test_contact_sheet_missing_thumbs_and_loader(tmp_path, query):
    query["crops"][0]["results"][0]["path"] = str(tmp_path / "gone.jpg")
    out = render.contact_sheet(query, tmp_path / "s.png", thumb_size=64)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert _count(sheet, COLOURS[0]) == 0
    assert _count(sheet, render.PLACEHOLDER) >= 64 * 40  # the placeholder tile
    # a loader callable, and a dataset-like object with image_path(id)
    seen = []
    render.contact_sheet(query, tmp_path / "s2.png", lambda r: seen.append(r["id"]) or np.zeros((8, 8, 3), np.uint8))
    assert sorted(seen) == sorted(r["id"] for c in query["crops"] for r in c["results"])

    class DS:
        def image_path(self, i):
            return tmp_path / f"{i}.png"
    for c in query["crops"]:
        for r in c["results"]:
            r.pop("path")
    render.contact_sheet(query, tmp_path / "s3.png", DS(), query_image=np.zeros((50, 60, 3), np.uint8))
    assert Image.open(tmp_path / "s3.png").size[0] >= 480


class _Img(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_html_report_is_self_contained(tmp_path, query):
    q2 = dict(query, query=str(tmp_path / "missing-query.jpg"), crops=query["crops"][:1], merged=[])
    q2["crops"][0]["label"] = "<script>alert(1)</script>"
    out = render.html_report([query, q2], tmp_path / "r" / "report.html", thumb_size=64)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script>" not in text and "&lt;script&gt;" in text
    p = _Img()
    p.feed(text)
    # query 1: 1 query image + 3 + 2 + 3 results + 2 merged; query 2: 1 + 3
    assert len(p.srcs) == 11 + 4
    assert p.tags.count("section") == 2
    for src in p.srcs:
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert max(im.size) <= 480
    assert "http://" not in text and "src=\"/" not in text and "file:" not in text


def test_draw_boxes(tmp_path):
    img = np.full((100, 120, 3), 255, np.uint8)
    out = render.draw_boxes(img, [Box(10, 20, 60, 80, 0.5, "cup"), [70, 10, 110, 90]], tmp_path / "b.jpg")
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (120, 100)
    out = render.draw_boxes(img, [Box(10, 20, 60, 80, 0.5, "cup")], tmp_path / "b.png")
    a = np.asarray(Image.open(out).convert("RGB"))
    assert tuple(a[50, 10]) == render.PALETTE[0] and tuple(a[50, 35]) == (255, 255, 255)
