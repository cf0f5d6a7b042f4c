"""Small REAL photos for tests (scikit-image's bundled data, no network) and edited copies of them.

    from tests.photos import write_photos, rescaled_copy, cropped_copy
    paths = write_photos(tmp_path / "photos")            # {name: Path} of JPEGs, longest side <= 320 px
    rescaled_copy(paths["chelsea"], tmp_path / "q.jpg", 0.6)
    cropped_copy(paths["coffee"], tmp_path / "c.jpg", (0.1, 0.1, 0.8, 0.9))   # fractions of width/height
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photos first; grayscale ones are stored as RGB JPEGs. All ship inside the scikit-image wheel.
PHOTO_NAMES: tuple[str, ...] = (
    "chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "colorwheel", "coins", "camera", "clock", "moon", "brick", "grass", "gravel", "page", "text",
)


def photo_array(name: str, max_side: int = 320) -> np.ndarray:
    """RGB uint8 `[H, W, 3]` of a bundled scikit-image photo, downscaled (LANCZOS) so the longest side <= max_side."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3].astype(np.uint8)
    img = Image.fromarray(arr)
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return np.asarray(img)


def write_photos(folder: str | Path, names: Iterable[str] = PHOTO_NAMES[:6], max_side: int = 320,
                 quality: int = 92) -> dict[str, Path]:
    """Write the named photos as `<folder>/<name>.jpg`; returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        p = folder / f"{n}.jpg"
        Image.fromarray(photo_array(n, max_side)).save(p, quality=quality)
        out[n] = p
    return out


def rescaled_copy(src: str | Path, dst: str | Path, scale: float, quality: int = 90) -> Path:
    """Save `src` resized by `scale` (bicubic) to `dst` (format from the suffix)."""
    img = Image.open(src).convert("RGB")
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    dst = Path(dst)
    img.resize((w, h), Image.BICUBIC).save(dst, **({"quality": quality} if dst.suffix.lower() in (".jpg", ".jpeg") else {}))
    return dst


def cropped_copy(src: str | Path, dst: str | Path, frac_box: Sequence[float], quality: int = 90) -> Path:
    """Save the crop of `src` given as fractions (fx1, fy1, fx2, fy2) of width/height to `dst`."""
    img = Image.open(src).convert("RGB")
    fx1, fy1, fx2, fy2 = frac_box
    box = (round(fx1 * img.width), round(fy1 * img.height), round(fx2 * img.width), round(fy2 * img.height))
    dst = Path(dst)
    img.crop(box).save(dst, **({"quality": quality} if dst.suffix.lower() in (".jpg", ".jpeg") else {}))
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Bad-input corpus (issue 5): each builder writes one file and returns its path.

def write_bomb_png(path: str | Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 1-bit grayscale PNG of one colour: 400 Mpixels in ~50 kB, written without allocating the image."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 500
    parts = [comp.compress(block) for _ in range(height // 500)]
    parts.append(comp.compress(row * (height % 500)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def write_exif_rotated_jpeg(path: str | Path, rgb: np.ndarray, orientation: int = 6) -> Path:
    """Store `rgb` as is, tagged with an EXIF orientation (6: the viewer must rotate 90 degrees clockwise)."""
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = Path(path)
    img.save(path, quality=95, exif=exif.tobytes())
    return path


def write_bad_corpus(folder: str | Path) -> dict[str, Path]:
    """Write the image-level bad-input corpus into `folder`; returns {case: path}. Cheap (< 1 s)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo_array("chelsea", 160)
    good = folder / "good_source.jpg"
    Image.fromarray(rgb).save(good, quality=92)
    data = good.read_bytes()
    c: dict[str, Path] = {}
    c["truncated_jpeg"] = folder / "truncated.jpg"
    c["truncated_jpeg"].write_bytes(data[: len(data) // 2])
    c["zero_byte"] = folder / "empty.jpg"
    c["zero_byte"].write_bytes(b"")
    c["text_as_jpg"] = folder / "notes.jpg"
    c["text_as_jpg"].write_text("shopping list: milk, eggs\n")
    c["html_as_png"] = folder / "saved_page.png"
    c["html_as_png"].write_text("<!DOCTYPE html>\n<html><head><title>photo</title></head><body><img src=x></body></html>\n")
    c["one_by_one"] = folder / "pixel.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(c["one_by_one"])
    c["bomb_png"] = write_bomb_png(folder / "bomb.png")
    c["cmyk_jpeg"] = folder / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(c["cmyk_jpeg"], quality=95)
    c["png16_gray"] = folder / "gray16.png"
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (8, 1))).save(c["png16_gray"])
    c["palette_png_transparency"] = folder / "palette_transparent.png"
    pal = Image.new("P", (16, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    pal.paste(1, (8, 0, 16, 8))  # right half: index 1 (blue) declared transparent
    pal.save(c["palette_png_transparency"], transparency=1)
    c["animated_gif"] = folder / "animated.gif"
    frames = [Image.new("RGB", (20, 10), col) for col in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(c["animated_gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    c["exif_rotated_jpeg"] = write_exif_rotated_jpeg(folder / "rotated.jpg", rgb, 6)
    for case, fname in (("name_spaces", "my holiday photo.jpg"), ("name_unicode", "ünïcødé 写真.jpg"),
                        ("name_leading_dash", "-rf --help.jpg")):
        c[case] = folder / fname
        c[case].write_bytes(data)
    good.unlink()
    return c
