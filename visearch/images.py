"""Robust image decoding, crops and the decode dataset used by `extract`.

Every image in the library is an RGB uint8 numpy array `[H, W, 3]`. `load_rgb` turns a path, a file object, a PIL
image or an array into one: EXIF orientation applied, alpha flattened on white, every Pillow mode converted (16-bit
scaled, not clipped), the first frame of animations, Pillow's decompression-bomb limit enforced *before* any pixel
is decoded. Anything that cannot be decoded raises `ImageError` with a one-line reason naming the file.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, first_line

log = logging.getLogger(__name__)

#: File extensions (lower case, with dot) that `convert` treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".heic", ".heif"}
)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_HEIF_LOCK = threading.Lock()
_heif_ready = False


def _heif_opener(name: str) -> None:
    """Register pillow-heif's HEIC/HEIF decoder with Pillow once (imported only when such a file is met)."""
    global _heif_ready
    if _heif_ready:
        return
    with _HEIF_LOCK:
        if _heif_ready:
            return
        try:
            import pillow_heif
        except ImportError:
            raise ImageError(f"{name}: HEIC/HEIF image, unsupported without the pillow-heif package",
                             "pip install pillow-heif, or convert the photo to JPEG") from None
        pillow_heif.register_heif_opener()
        _heif_ready = True

ImageLike = str | os.PathLike | IO[bytes] | Image.Image | np.ndarray

#: Work bounds per described image, for every model. An image longer than MAX_ASPECT times its short side is refused
#: (a 2000x1 strip would otherwise be upsampled to the network minimum on its short side: 184000x92 px for
#: SuperGlobal, minutes of CPU and gigabytes of RAM). Models at native resolution shrink an image above
#: MAX_DESCRIBE_PIXELS to that many pixels (a 24 Mpx camera photo stays native, a 89 Mpx scan does not).
MAX_ASPECT = 100
MAX_DESCRIBE_PIXELS = 24_000_000

# Pillow reads "load truncated images" from a module global; we only flip it for one load at a time.
_TRUNCATED_LOCK = threading.Lock()


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (case-insensitive); content is not checked."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _describe_bytes(head: bytes) -> str:
    """A short guess of what a non-image file is, from its first bytes (for error messages)."""
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "looks like an HTML page (a saved web page, not the image itself)"
    if stripped.startswith((b"<?xml", b"<svg")):
        return "looks like XML/SVG text (vector images are not supported)"
    if stripped.startswith((b"{", b"[")):
        return "looks like JSON text"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head[:512]):
        return "looks like a text file"
    return "unknown or unsupported file format"


def _check_bomb(img: Image.Image, name: str) -> None:
    """Refuse images above Pillow's MAX_IMAGE_PIXELS before decoding (Pillow itself only warns up to 2x)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit is not None and w * h > limit:
        raise ImageError(
            f"{name}: image is {w}x{h} = {w * h / 1e6:.0f} Mpixels, above the decompression-bomb limit of "
            f"{limit / 1e6:.0f} Mpixels",
            "downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file",
        )
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has an empty size {w}x{h}", "the file is corrupt")


def aspect_problem(width: int, height: int) -> str | None:
    """Why a `width` x `height` image is too elongated to describe (see MAX_ASPECT), or None."""
    lo, hi = min(width, height), max(width, height)
    if lo < 1 or hi > MAX_ASPECT * lo:
        ratio = f"{hi / lo:.0f}:1" if lo >= 1 else "infinite"
        return (f"image is {width}x{height} px, aspect ratio {ratio} above the limit of {MAX_ASPECT}:1 "
                "(too elongated to describe)")
    return None


def check_aspect(width: int, height: int, name: str) -> None:
    """ImageError (one line naming `name`) when the image is too elongated to describe (see MAX_ASPECT)."""
    why = aspect_problem(width, height)
    if why:
        raise ImageError(f"{name}: {why}", "crop it to the object, or pad it to a less extreme shape")


def work_scale(width: int, height: int, max_pixels: int = MAX_DESCRIBE_PIXELS) -> float:
    """Factor (<= 1) that brings a `width` x `height` image within `max_pixels` (1.0 when it already is)."""
    n = width * height
    return 1.0 if n <= max_pixels else (max_pixels / n) ** 0.5


def _open_pil(src: str | os.PathLike | IO[bytes], name: str) -> Image.Image:
    """Image.open with every failure mapped to ImageError; pixels are not decoded yet."""
    head = b""
    try:
        if isinstance(src, (str, os.PathLike)):
            p = Path(src)
            st = p.stat()  # follows symlinks: a loop raises OSError(ELOOP)
            if not p.is_file():
                raise ImageError(f"{name}: not a regular file", "pass an image file")
            if st.st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)", "the copy or download was interrupted; get it again")
            with open(p, "rb") as f:
                head = f.read(512)
            fp: Any = p
        else:
            fp = src
            pos = fp.tell() if hasattr(fp, "tell") else None
            head = fp.read(512)
            if pos is not None:
                fp.seek(pos)
            if not head:
                raise ImageError(f"{name}: empty input (0 bytes)", "pass image data")
        if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
            _heif_opener(name)
        with warnings.catch_warnings():
            # our own check below replaces Pillow's DecompressionBombWarning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found", "check the path") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied", "make the file readable (chmod +r)") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory", "pass an image file") from None
    except Image.DecompressionBombError as e:
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        limit = Image.MAX_IMAGE_PIXELS or 0
        what = (f"{int(m.group(1)) / 1e6:.0f} Mpixels, above the decompression-bomb limit of "
                f"{limit / 1e6:.0f} Mpixels" if m else first_line(e))
        raise ImageError(f"{name}: image too large to decode safely ({what})",
                         "downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image: {_describe_bytes(head)}",
                         "supported: JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror or e})", "check the file and its permissions") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise SyntaxError, struct.error, ... on garbage
        raise ImageError(f"{name}: corrupt image header ({type(e).__name__}: {first_line(e)})",
                         "re-export or re-download the image") from None
    _check_bomb(img, name)
    return img


def _decode(img: Image.Image, name: str, allow_truncated: bool) -> None:
    """Decode the pixels now (Pillow is lazy) so truncation errors surface here as ImageError."""
    try:
        if allow_truncated:
            with _TRUNCATED_LOCK:
                old = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = True
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = old
        else:
            img.load()
    except OSError as e:
        msg = first_line(e)
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
            raise ImageError(f"{name}: truncated image data ({msg})",
                             "the file is incomplete; copy or download it again") from None
        raise ImageError(f"{name}: cannot decode image ({msg})", "re-export or re-download the image") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image", "downscale it first") from None
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {first_line(e)})",
                         "re-export or re-download the image") from None


def _flatten_alpha(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite `[H, W, 3]` uint8 over white with `[H, W]` uint8 alpha."""
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale_to_uint8(arr: np.ndarray, bits16: bool) -> np.ndarray:
    """High-bit-depth single channel -> uint8 by scaling (never clipping away the range)."""
    if bits16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = arr.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    a = np.nan_to_num(a, nan=0.0, posinf=hi, neginf=lo)
    if lo >= 0.0 and hi <= 1.0 and arr.dtype.kind == "f":
        scaled = a * 255.0  # float images in [0, 1]
    elif lo >= 0.0 and hi <= 255.0:
        scaled = a  # already 8-bit range
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = a * (255.0 / 65535.0)  # 16-bit data stored in a 32-bit mode
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # arbitrary range: stretch
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Any Pillow mode -> `[H, W, 3]` uint8."""
    mode = img.mode
    try:
        if mode == "RGB":
            return np.asarray(img, dtype=np.uint8)
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img)
            g = _scale_to_uint8(arr, bits16=mode.startswith("I;16"))
            return np.repeat(g[..., None], 3, axis=2)
        if mode == "P":
            has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
            img = img.convert("RGBA" if has_alpha else "RGB")
            mode = img.mode
            if mode == "RGB":
                return np.asarray(img, dtype=np.uint8)
        if mode in ("L", "1"):
            g = np.asarray(img.convert("L"), dtype=np.uint8)
            if "transparency" in img.info and mode == "L":
                t = img.info["transparency"]
                if isinstance(t, int):
                    alpha = np.where(g == t, 0, 255).astype(np.uint8)
                    return _flatten_alpha(np.repeat(g[..., None], 3, axis=2), alpha)
            return np.repeat(g[..., None], 3, axis=2)
        if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
            return _flatten_alpha(rgba[..., :3], rgba[..., 3])
        if mode == "RGB" or mode == "RGBX":
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        # CMYK, YCbCr, LAB, HSV, ...: Pillow knows the conversion
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"{name}: cannot convert image mode {mode} to RGB ({first_line(e)})",
                         "re-export the image as 8-bit RGB") from None


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """Accept `[H, W]`, `[H, W, 1|3|4]` arrays of uint8 / uint16 / bool / float ([0, 1] or [0, 255])."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: array of shape {tuple(arr.shape)} is not an image",
                         "pass an [H, W, 3] uint8 RGB array")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{name}: empty image array {tuple(arr.shape)}", "pass a non-empty image")
    if arr.dtype == np.uint8:
        a8 = arr
    elif arr.dtype == np.bool_:
        a8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        a8 = _scale_to_uint8(arr, bits16=True)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: float image array holds NaN or infinite values", "pass finite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"{name}: float image values span [{lo:g}, {hi:g}], expected [0, 1] or [0, 255]",
                             "pass an [H, W, 3] uint8 RGB array")
        a8 = np.clip(np.rint(arr * 255.0 if hi <= 1.0 else arr), 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported array dtype {arr.dtype}", "pass an [H, W, 3] uint8 RGB array")
    if a8.ndim == 2:
        return np.repeat(a8[..., None], 3, axis=2)
    if a8.shape[2] == 4:
        return _flatten_alpha(a8[..., :3], a8[..., 3])
    return np.ascontiguousarray(a8)


def _name_of(x: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if isinstance(x, Image.Image):
        return getattr(x, "filename", None) or "<PIL image>"
    return getattr(x, "name", None) or f"<{type(x).__name__}>"


def load_rgb(
    x: ImageLike,
    *,
    apply_exif: bool = True,
    allow_truncated: bool = False,
    name: str | None = None,
) -> np.ndarray:
    """Decode `x` (path, binary file object, PIL image or array) into RGB uint8 `[H, W, 3]`.

    apply_exif: rotate/flip by the EXIF orientation tag (off for revisitop datasets, whose reference loader ignores
    it). allow_truncated: decode what is there of a truncated file (the revisitop reference loader does this);
    off by default so a broken file is reported. name: used in error messages instead of the path.
    Raises ImageError (one line naming the file) for anything that is not a usable image.
    """
    label = _name_of(x, name)
    if isinstance(x, np.ndarray):
        return _array_to_rgb(x, label)
    if isinstance(x, Image.Image):
        opened = x
        _check_bomb(opened, label)
    elif isinstance(x, (str, os.PathLike)) or hasattr(x, "read"):
        opened = _open_pil(x, label)
    else:
        raise ImageError(f"{label}: cannot read an image from a {type(x).__name__}",
                         "pass a file path, a PIL image or an [H, W, 3] uint8 array")
    img = opened
    try:
        # animations: Image.open starts at frame 0, so the first frame is what we decode
        _decode(opened, label, allow_truncated)
        if apply_exif:
            img = _exif_transpose(opened, label)
        out = _pil_to_rgb(img, label)
    finally:
        if img is not opened:
            img.close()
        if opened is not x:
            opened.close()
    if out.ndim != 3 or out.shape[2] != 3:
        raise ImageError(f"{label}: decoded to an unexpected shape {out.shape}", "re-export the image as RGB")
    return np.ascontiguousarray(out)


def _exif_transpose(img: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored (logged), never fatal."""
    try:
        out = ImageOps.exif_transpose(img)
        return img if out is None else out
    except Exception as e:  # noqa: BLE001
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, first_line(e))
        return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) of an open PIL image; 1 when absent or unreadable."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001
        return 1


def image_size(path: str | os.PathLike, *, apply_exif: bool = True) -> tuple[int, int]:
    """(width, height) from the file header only (no pixel decode), as `load_rgb` would return it."""
    name = str(path)
    img = _open_pil(path, name)
    try:
        w, h = img.size
        if apply_exif and exif_orientation(img) in (5, 6, 7, 8):  # 90-degree rotations swap the sides
            w, h = h, w
        return w, h
    finally:
        img.close()


def load_rgb_bytes(data: bytes, name: str, **kwargs: Any) -> np.ndarray:
    """`load_rgb` on bytes already in memory (used by convert, which hashes and decodes one read)."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)", "the copy or download was interrupted; get it again")
    return load_rgb(io.BytesIO(data), name=name, **kwargs)


def crop_box(img: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Crop `[H, W, 3]` to box [x1, y1, x2, y2] by the revisitop rule `im[int(y1):int(y2), int(x1):int(x2)]`.

    int() truncates (as the reference does; PIL's crop rounds instead and gives other numbers). The box is clipped
    to the image; a box with no area inside the image raises ImageError.
    """
    if len(box) != 4:
        raise ImageError(f"box {list(box)} must have 4 numbers [x1, y1, x2, y2]", "fix the box")
    vals = [float(v) for v in box]
    if not all(np.isfinite(vals)):
        raise ImageError(f"box {vals} holds NaN or infinite values", "fix the box")
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in vals)
    cx1, cx2 = min(max(x1, 0), w), min(max(x2, 0), w)
    cy1, cy2 = min(max(y1, 0), h), min(max(y2, 0), h)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ImageError(
            f"box [{vals[0]:g}, {vals[1]:g}, {vals[2]:g}, {vals[3]:g}] has no area inside the {w}x{h} image",
            "boxes are [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2",
        )
    return np.ascontiguousarray(img[cy1:cy2, cx1:cx2])


class ImageFileDataset:
    """Map-style dataset for torch's DataLoader: item i -> (i, RGB uint8 `[H, W, 3]`) or (i, error message).

    Decoding errors are returned, not raised, so one bad file never kills a worker or the whole extraction. Needs no
    torch import (DataLoader accepts any object with __len__ and __getitem__); use `collate_list` as collate_fn.
    `boxes[i]` (optional, [x1, y1, x2, y2] or None) crops item i with `crop_box` after decoding.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        apply_exif: bool = True,
        allow_truncated: bool = False,
        boxes: Sequence[Sequence[float] | None] | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.apply_exif = apply_exif
        self.allow_truncated = allow_truncated
        if boxes is not None and len(boxes) != len(self.paths):
            raise ValueError("boxes must have one entry per path")
        self.boxes = list(boxes) if boxes is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        try:
            arr = load_rgb(self.paths[i], apply_exif=self.apply_exif, allow_truncated=self.allow_truncated)
            if self.boxes is not None and self.boxes[i] is not None:
                arr = crop_box(arr, self.boxes[i])
            return i, arr
        except ImageError as e:
            return i, str(e)
        except Exception as e:  # noqa: BLE001 - never let a worker die on one file
            return i, f"{self.paths[i]}: unexpected error ({type(e).__name__}: {first_line(e)})"


def collate_list(batch: list[Any]) -> list[Any]:
    """DataLoader collate_fn that keeps items as a list (images differ in size)."""
    return batch
