"""Cluttered scenes with planar objects pasted under random homographies, from scikit-image's bundled real photos
(no network). Used by the spatial-reranker tests and by benchmarks/bench_spatial.py (`--synthetic`).

    from tests.spatial_scenes import clutter, paste, random_homography, write_scene_set
    bg = clutter(rng, (480, 640))                       # a mosaic of random pieces of real photos
    img, quad = paste(bg, obj, rng, frac=0.3)           # obj warped by a random homography, ~30% of bg's width
    write_scene_set(folder, seed=0)                     # a folder + ground-truth JSON for `visearch convert`
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# objects (planar-ish, textured) and the photos clutter is cut from
# (clutter never contains an object, so the ground truth is exact)
OBJECTS = ("astronaut", "coffee", "rocket", "chelsea", "camera", "clock", "coins", "hubble_deep_field",
           "immunohistochemistry", "retina", "page")
CLUTTER = ("text", "moon", "horse", "cat", "logo", "brick", "grass", "gravel", "cell", "binary_blobs", "colorwheel",
           "shepp_logan_phantom", "checkerboard")


def photo(name: str, max_side: int = 512) -> np.ndarray:
    """RGB uint8 of a bundled scikit-image photo (long side <= max_side)."""
    import skimage.data

    if name == "motorcycle_left" or name == "motorcycle_right":
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        arr = getattr(skimage.data, name)()
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:  # logo: flatten alpha on white
        a = arr[..., 3:4].astype(np.float32) / 255
        arr = (arr[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    s = max_side / max(img.size)
    if s < 1:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    return np.asarray(img)


def clutter(rng: np.random.Generator, size: tuple[int, int], sources: tuple[str, ...] = CLUTTER,
            pieces: int = 6, exclude: tuple[str, ...] = ()) -> np.ndarray:
    """`[H, W, 3]` mosaic of `pieces` random rectangles cut from random photos (not those in `exclude`)."""
    h, w = size
    out = np.zeros((h, w, 3), np.uint8)
    names = [n for n in sources if n not in exclude]
    for i in range(pieces):
        src = photo(names[rng.integers(len(names))], 512)
        sh, sw = src.shape[:2]
        ph, pw = (h, w) if i == 0 else (int(rng.integers(h // 4, h // 2 + 1)), int(rng.integers(w // 4, w // 2 + 1)))
        piece = np.asarray(Image.fromarray(src).resize((pw, ph), Image.BILINEAR)) if (sh < ph or sw < pw) else \
            src[(y := int(rng.integers(0, sh - ph + 1))):y + ph, (x := int(rng.integers(0, sw - pw + 1))):x + pw]
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out[y0:y0 + ph, x0:x0 + pw] = piece
    return out


def random_homography(rng: np.random.Generator, wh: tuple[int, int], target_w: float, at: tuple[float, float],
                      jitter: float = 0.15, angle: float = 25.0) -> np.ndarray:
    """3x3 homography taking an object of size wh to about `target_w` pixels wide, rotated by up to `angle` degrees,
    corners moved by up to `jitter` of the size (perspective), its centre at `at`."""
    import cv2

    w, h = wh
    s = target_w / w
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    c = corners - [w / 2, h / 2]
    th = np.deg2rad(rng.uniform(-angle, angle))
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    dst = (c * s) @ rot.T + rng.uniform(-jitter, jitter, (4, 2)) * [w * s, h * s] + at
    return cv2.getPerspectiveTransform(corners, dst.astype(np.float32))


def paste(bg: np.ndarray, obj: np.ndarray, rng: np.random.Generator, frac: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """`obj` warped by a random homography to ~frac of bg's width, pasted at a random place inside bg.
    Returns (image, H)."""
    import cv2

    bh, bw = bg.shape[:2]
    oh, ow = obj.shape[:2]
    tw = frac * bw
    th = tw * oh / ow
    at = (rng.uniform(0.6 * tw, bw - 0.6 * tw), rng.uniform(0.6 * th, bh - 0.6 * th))
    H = random_homography(rng, (ow, oh), tw, at)
    warped = cv2.warpPerspective(obj, H, (bw, bh), flags=cv2.INTER_AREA if frac < 0.5 else cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.full((oh, ow), 255, np.uint8), H, (bw, bh)) > 127
    out = bg.copy()
    out[mask] = warped[mask]
    return out, H


def write_scene_set(folder: str | Path, seed: int = 0, objects: tuple[str, ...] = OBJECTS, per_object: int = 3,
                    distractors: int = 40, size: tuple[int, int] = (600, 800), quality: int = 90) -> Path:
    """A folder for `visearch convert --ground-truth`: `queries/<obj>.jpg` (the object photo alone), `db/` scenes with
    each object pasted `per_object` times (fractions 0.45 / 0.3 / 0.2 of the width: the last one is "hard"), real
    multi-view (the stereo motorcycle's right view, whole and pasted), and `distractors` scenes of clutter only.
    Returns the ground-truth JSON path."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "queries").mkdir(parents=True, exist_ok=True)
    (folder / "db").mkdir(parents=True, exist_ok=True)
    fracs = [0.45, 0.3, 0.2, 0.35, 0.25][:per_object]
    gt = []

    def save(arr: np.ndarray, rel: str) -> str:
        Image.fromarray(arr).save(folder / rel, quality=quality)
        return rel

    for name in objects:
        obj = photo(name, 512)
        q = save(obj, f"queries/{name}.jpg")
        pos, hard = [], []
        for j, f in enumerate(fracs):
            img, _ = paste(clutter(rng, size, exclude=(name,)), obj, rng, f)
            rel = save(img, f"db/{name}_{j}.jpg")
            (hard if f < 0.25 else pos).append(rel)
        gt.append({"image": q, "positives": pos, "hard": hard, "junk": []})
    left, right = photo("motorcycle_left", 640), photo("motorcycle_right", 640)
    q = save(left, "queries/motorcycle.jpg")
    whole = save(right, "db/motorcycle_right.jpg")
    img, _ = paste(clutter(rng, size), right, rng, 0.4)
    gt.append({"image": q, "positives": [whole], "hard": [save(img, "db/motorcycle_pasted.jpg")], "junk": []})
    for k in range(distractors):
        save(clutter(rng, size, pieces=int(rng.integers(4, 9))), f"db/clutter_{k:03d}.jpg")
    path = folder / "ground_truth.json"
    path.write_text(json.dumps({"queries": gt}, indent=1))
    return path
