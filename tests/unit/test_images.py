"""visearch.images: decoding of real photos and of the bad-input corpus, crops, the DataLoader dataset."""
from __future__ import annotations

import io
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.photos import photo_array, write_bad_corpus, write_exif_rotated_jpeg
from visearch.errors import ImageError
from visearch.images import (
    IMAGE_EXTENSIONS,
    ImageFileDataset,
    collate_list,
    crop_box,
    image_size,
    is_image_file,
    load_rgb,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_bad_corpus(tmp_path_factory.mktemp("corpus"))


def _err(x, **kw) -> str:
    with pytest.raises(ImageError) as ei:
        load_rgb(x, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ---- bad-input corpus: errors ------------------------------------------------------------------------------------
def test_truncated_jpeg_is_refused_naming_the_file(corpus):
    msg = _err(corpus["truncated_jpeg"])
    assert str(corpus["truncated_jpeg"]) in msg and "truncated" in msg


def test_truncated_jpeg_allowed_like_revisitop_reference(corpus):
    arr = load_rgb(corpus["truncated_jpeg"], allow_truncated=True)
    assert arr.shape == (106, 160, 3)
    # the switch is restored: the next strict load fails again
    _err(corpus["truncated_jpeg"])


def test_zero_byte_file(corpus):
    msg = _err(corpus["zero_byte"])
    assert "empty file" in msg and str(corpus["zero_byte"]) in msg


def test_text_named_jpg(corpus):
    msg = _err(corpus["text_as_jpg"])
    assert "not an image" in msg and "text" in msg and "notes.jpg" in msg


def test_html_saved_as_png(corpus):
    msg = _err(corpus["html_as_png"])
    assert "HTML" in msg and "saved_page.png" in msg


def test_decompression_bomb_refused_without_allocating(corpus):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    msg = _err(corpus["bomb_png"])
    assert time.perf_counter() - t0 < 1.0
    assert "decompression-bomb" in msg and "400 Mpixels" in msg
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mib < 100  # decoding would need >= 400 MB
    with pytest.raises(ImageError):
        image_size(corpus["bomb_png"])


def test_bomb_limit_is_pillows_setting(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("L", (300, 300), 7).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # below 2x: Pillow alone would only warn
    assert "decompression-bomb" in _err(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_rgb(p).shape == (300, 300, 3)


def test_missing_file_and_directory(tmp_path):
    assert "file not found" in _err(tmp_path / "nope.jpg")
    assert "not a regular file" in _err(tmp_path)


def test_symlink_loop_path(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to("loop.jpg")
    assert "loop.jpg" in _err(loop)


def test_unsupported_input_type():
    assert "cannot read an image" in _err(12345)


# ---- bad-input corpus: images that must decode correctly ----------------------------------------------------------
def test_one_by_one(corpus):
    arr = load_rgb(corpus["one_by_one"])
    assert arr.shape == (1, 1, 3) and arr.dtype == np.uint8
    assert arr[0, 0].tolist() == [10, 200, 30]


def test_cmyk_jpeg_converted_to_rgb(corpus):
    arr = load_rgb(corpus["cmyk_jpeg"])
    ref = photo_array("chelsea", 160)
    assert arr.shape == ref.shape
    assert np.abs(arr.astype(int) - ref).mean() < 8  # same picture, not inverted or channel-swapped


def test_16bit_gray_png_scaled_not_clipped(corpus):
    arr = load_rgb(corpus["png16_gray"])
    assert arr.shape == (8, 256, 3)
    assert np.array_equal(arr[0, :, 0], np.arange(256))  # v*257 -> v for the whole ramp (clipping gives 255s)
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_16bit_rgb_png(tmp_path):
    import cv2

    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0] = 0xFFFF
    rgb16[..., 1] = 0x8080
    p = tmp_path / "rgb16.png"
    cv2.imwrite(str(p), rgb16[..., ::-1])  # OpenCV writes BGR
    assert load_rgb(p)[0, 0].tolist() == [255, 128, 0]


def test_palette_png_transparency_flattened_on_white(corpus):
    arr = load_rgb(corpus["palette_png_transparency"])
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[0, 15].tolist() == [255, 255, 255]


def test_rgba_and_la_alpha_blended_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = [[255, 0], [128, 128]]
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    arr = load_rgb(p)
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[0, 1].tolist() == [255, 255, 255]
    assert arr[1, 0].tolist() == [255, 127, 127]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert load_rgb(la)[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_animated_gif_first_frame(corpus):
    arr = load_rgb(corpus["animated_gif"])
    assert arr.shape == (10, 20, 3)
    assert (arr == [255, 0, 0]).all()


def test_exif_rotated_jpeg_is_upright(corpus):
    raw = np.asarray(Image.open(corpus["exif_rotated_jpeg"]).convert("RGB"))  # stored pixels, no EXIF applied
    arr = load_rgb(corpus["exif_rotated_jpeg"])
    assert arr.shape == (raw.shape[1], raw.shape[0], 3)
    assert np.array_equal(arr, np.rot90(raw, k=-1))  # orientation 6: rotate 90 degrees clockwise
    assert np.array_equal(load_rgb(corpus["exif_rotated_jpeg"], apply_exif=False), raw)
    assert image_size(corpus["exif_rotated_jpeg"]) == (raw.shape[0], raw.shape[1])
    assert image_size(corpus["exif_rotated_jpeg"], apply_exif=False) == (raw.shape[1], raw.shape[0])


@pytest.mark.parametrize("orientation,k,flip", [(3, 2, False), (8, 1, False), (2, 0, True)])
def test_other_exif_orientations(tmp_path, orientation, k, flip):
    rgb = photo_array("astronaut", 64)
    p = write_exif_rotated_jpeg(tmp_path / f"o{orientation}.jpg", rgb, orientation)
    raw = load_rgb(p, apply_exif=False)
    want = np.rot90(raw, k=k)
    if flip:
        want = want[:, ::-1]
    assert np.array_equal(load_rgb(p), want)


def test_odd_file_names(corpus):
    for case in ("name_spaces", "name_unicode", "name_leading_dash"):
        assert load_rgb(corpus[case]).shape == (106, 160, 3)
        assert load_rgb(str(corpus[case])).shape == (106, 160, 3)


@pytest.mark.parametrize("mode", ["1", "L", "I", "F", "CMYK", "YCbCr", "P", "PA", "RGBX", "I;16"])
def test_every_pillow_mode_gives_rgb_uint8(mode):
    base = Image.fromarray(photo_array("coffee", 48))
    img = base.convert("L").convert(mode) if mode in ("I", "F", "I;16") else base.convert(mode)
    arr = load_rgb(img)
    assert arr.dtype == np.uint8 and arr.shape == (32, 48, 3)
    gray = np.asarray(base.convert("L"), dtype=int)
    if mode in ("L", "I", "F"):
        assert np.abs(arr[..., 0].astype(int) - gray).max() <= 1  # 8-bit values kept, not stretched
    if mode == "I;16":  # I;16 values are on the 16-bit scale
        assert np.array_equal(arr[..., 0], np.rint(gray * 255 / 65535).astype(np.uint8))


def test_float_tiff_in_unit_range(tmp_path):
    f = (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    p = tmp_path / "f.tif"
    Image.fromarray(f, "F").save(p)
    arr = load_rgb(p)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255


def test_formats_webp_bmp_tiff_gif(tmp_path):
    rgb = photo_array("rocket", 64)
    for ext in (".webp", ".bmp", ".tif", ".gif", ".png"):
        p = tmp_path / f"x{ext}"
        Image.fromarray(rgb).save(p, **({"lossless": True} if ext == ".webp" else {}))
        arr = load_rgb(p)
        assert arr.shape == rgb.shape
        if ext != ".gif":  # GIF is palettised
            assert np.array_equal(arr, rgb), ext
    assert is_image_file("A.JPG") and is_image_file("x.webp") and not is_image_file("x.txt")
    assert ".jpeg" in IMAGE_EXTENSIONS


def test_file_object_and_pil_inputs(corpus, tmp_path):
    p = corpus["name_spaces"]
    want = load_rgb(p)
    assert np.array_equal(load_rgb(io.BytesIO(p.read_bytes())), want)
    with open(p, "rb") as f:
        assert np.array_equal(load_rgb(f), want)
    assert np.array_equal(load_rgb(Image.open(p)), want)
    assert "empty input" in _err(io.BytesIO(b""))


# ---- arrays -------------------------------------------------------------------------------------------------------
def test_arrays():
    rgb = photo_array("chelsea", 40)
    assert load_rgb(rgb) is not None and np.array_equal(load_rgb(rgb), rgb)
    gray = rgb[..., 0]
    assert np.array_equal(load_rgb(gray), np.repeat(gray[..., None], 3, 2))
    assert np.array_equal(load_rgb(rgb.astype(np.float32) / 255.0), rgb)
    assert np.array_equal(load_rgb(rgb.astype(np.uint16) * 257), rgb)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], 2)
    assert np.array_equal(load_rgb(rgba), rgb)
    assert load_rgb(rgb[:, ::-1]).flags["C_CONTIGUOUS"]
    assert "shape" in _err(np.zeros((4, 4, 2), np.uint8))
    assert "empty" in _err(np.zeros((0, 4, 3), np.uint8))
    assert "[0, 1] or [0, 255]" in _err(np.full((2, 2, 3), 300.0))
    assert "NaN" in _err(np.full((2, 2, 3), np.nan))


# ---- crops --------------------------------------------------------------------------------------------------------
def test_crop_box_truncates_like_revisitop():
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    box = [1.9, 2.7, 7.99, 9.5]
    assert np.array_equal(crop_box(img, box), img[2:9, 1:7])  # int() truncates; PIL would round to [2:10, 2:8]


def test_crop_box_clipped_and_outside():
    img = np.zeros((10, 12, 3), np.uint8)
    assert crop_box(img, [-5.5, -3, 100, 100]).shape == (10, 12, 3)
    assert crop_box(img, [-1.5, 0, 4, 4]).shape == (4, 4, 3)  # int(-1.5) = -1 is clipped, never wraps around
    for box in ([20, 20, 30, 30], [-10, -10, -1, -1], [5, 5, 5, 9], [6, 2, 3, 8], [0, 0, np.nan, 3]):
        with pytest.raises(ImageError):
            crop_box(img, box)
    with pytest.raises(ImageError):
        crop_box(img, [1, 2, 3])


# ---- DataLoader dataset -------------------------------------------------------------------------------------------
def test_image_file_dataset_with_workers(corpus):
    import torch.utils.data as tud

    paths = [corpus["name_spaces"], corpus["truncated_jpeg"], corpus["one_by_one"], corpus["text_as_jpg"]]
    ds = ImageFileDataset(paths, boxes=[[0, 0, 50, 40], None, None, None])
    loader = tud.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_list)
    items = [it for batch in loader for it in batch]
    assert [i for i, _ in items] == [0, 1, 2, 3]
    assert items[0][1].shape == (40, 50, 3)
    assert isinstance(items[1][1], str) and "truncated" in items[1][1]
    assert items[2][1].shape == (1, 1, 3)
    assert isinstance(items[3][1], str) and "not an image" in items[3][1]
    lenient = ImageFileDataset([corpus["truncated_jpeg"]], allow_truncated=True)
    assert lenient[0][1].shape == (106, 160, 3)
