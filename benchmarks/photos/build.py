"""Build `benchmarks/photos`: a real-photo retrieval set with revisitop ground truth, offline and deterministic.

    python benchmarks/photos/build.py OUT        # writes OUT/photos/{db,queries}/..., OUT/gt.json, OUT/manifest.json
    visearch convert OUT/photos --name photos --ground-truth OUT/gt.json
    visearch extract photos --model lite && visearch eval photos --model lite

Images come from packages only (see benchmarks/photos/SOURCES.md): the scikit-image wheel and the Debian packages
`opencv-doc` (OpenCV's sample images and videos) and `visp-images-data` (ViSP's real camera sequences):
    apt-get install opencv-doc visp-images-data
Three kinds of query (labels: revisitop's easy / hard / junk, rules in SOURCES.md):
- sequences: frames of one real camera sequence (an object or scene filmed while the camera or the object moves);
- pairs: two real photos of one scene (stereo pairs, viewpoint / lighting changes, an object and a cluttered scene);
- pasted: a crop of a photo (the query's bbox) pasted into a cluttered real photo, seeded perspective, scale and
  lighting change; each object gets an easy, a hard and a junk scene.
plus distractors (photos of nothing queried) and clutter scenes (the backgrounds alone).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20261202
MAX_SIDE = 1024  # every written image has its long side <= this (a few sources are larger); JPEG quality 92
OPENCV_DIR = Path(os.environ.get("VISEARCH_PHOTOS_OPENCV", "/usr/share/doc/opencv-doc/examples"))
VISP_DIR = Path(os.environ.get("VISEARCH_PHOTOS_VISP", "/usr/share/visp-images-data/ViSP-images"))
DEBIAN_PACKAGES = ("opencv-doc", "visp-images-data")


class SourceMissing(RuntimeError):
    """A source package is not installed (message says which and how to install it)."""


def skimage_dir() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise SourceMissing("scikit-image is not installed: pip install scikit-image") from None
    return Path(skimage.data.__file__).parent


def check_sources() -> None:
    """Raise SourceMissing naming the Debian packages to install when their files are absent."""
    missing = [pkg for pkg, probe in (("opencv-doc", OPENCV_DIR / "data" / "graf1.png"),
                                      ("visp-images-data", VISP_DIR / "cube" / "image.0000.pgm")) if not probe.is_file()]
    if missing:
        raise SourceMissing(f"benchmarks/photos needs the Debian package(s) {', '.join(missing)}: "
                            f"apt-get install {' '.join(missing)} (or set VISEARCH_PHOTOS_OPENCV / VISEARCH_PHOTOS_VISP)")
    skimage_dir()
    absent = [str(src(k, r)) for k, r in all_sources() if not src(k, r).is_file()]
    if absent:
        raise SourceMissing(f"{len(absent)} source file(s) missing, e.g. {absent[0]} (another package version?)")


def all_sources() -> list[tuple[str, str]]:
    """(kind, relative path) of every source file the set uses."""
    out = [(k, p.format(f)) for _, k, p, dbf, qf, _ in SEQUENCES for f in (*dbf, *qf)]
    out += [("ocvdata", f"{cam}{p:02d}.jpg") for p in CHESS_POSES for cam in ("left", "right")]
    out += [s for _, q, d, _ in PAIRS for s in (q, d)] + [o for _, o, _ in OBJECTS] + BACKGROUND_FILES + DISTRACTORS
    return out + [("ocvdata", v) for v, _ in BACKGROUND_VIDEOS]


def src(kind: str, rel: str) -> Path:
    root = {"opencv": OPENCV_DIR, "ocvdata": OPENCV_DIR / "data", "visp": VISP_DIR}.get(kind)
    return (root if root is not None else skimage_dir()) / rel


# ---- the set's definition ---------------------------------------------------------------------------------------
# Sequences: (group, source kind, frame path pattern, database frames, query frames, easy if |frame delta| <= this).
SEQUENCES = [
    ("dice", "visp", "cube/image.{:04d}.pgm", range(0, 80, 8), (4, 76), 24),
    ("cube_on_table", "visp", "mbt/cube/image{:04d}.pgm", range(0, 217, 20), (10, 210), 60),
    ("target_card", "visp", "mire-2/image.{:04d}.pgm", range(1, 502, 50), (25, 475), 100),
    ("castle_model", "visp", "mbt-depth/castel/castel/image_{:04d}.pgm", range(0, 30, 6), (3, 29), 30),
]
# The calibration chessboard of OpenCV's stereo samples: 13 poses x (left, right) camera; the query's stereo partner
# (same pose) is easy, the other poses hard.
CHESS_POSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)
CHESS_QUERIES = (1, 12)
# Pairs: (group, query source, database source, label).
PAIRS = [
    ("aloe", ("ocvdata", "aloeL.jpg"), ("ocvdata", "aloeR.jpg"), "easy"),              # Middlebury stereo
    ("aerial", ("ocvdata", "aero1.jpg"), ("ocvdata", "aero3.jpg"), "easy"),            # two aerial views
    ("basketball", ("ocvdata", "basketball1.png"), ("ocvdata", "basketball2.png"), "easy"),  # video frames
    ("rubberwhale", ("ocvdata", "rubberwhale1.png"), ("ocvdata", "rubberwhale2.png"), "easy"),  # Middlebury flow
    ("shelf", ("ocvdata", "left.jpg"), ("ocvdata", "right.jpg"), "easy"),              # stereo pair
    ("motorcycle", ("skimage", "motorcycle_left.png"), ("skimage", "motorcycle_right.png"), "easy"),  # stereo
    ("leuven", ("ocvdata", "leuvenA.jpg"), ("ocvdata", "leuvenB.jpg"), "easy"),        # lighting change
    ("graffiti", ("ocvdata", "graf1.png"), ("ocvdata", "graf3.png"), "hard"),          # ~40 degree viewpoint change
    ("cereal_box", ("ocvdata", "box.png"), ("ocvdata", "box_in_scene.png"), "hard"),   # object vs cluttered scene
]
# Pasted objects: (name, source, object box as fractions x0, y0, x1, y1 of the source photo = the query's bbox).
OBJECTS = [
    ("coffee", ("skimage", "coffee.png"), (0.08, 0.0, 0.8, 0.98)),
    ("rocket", ("skimage", "rocket.jpg"), (0.3, 0.05, 0.7, 0.95)),
    ("cat", ("skimage", "chelsea.png"), (0.2, 0.0, 0.9, 1.0)),
    ("astronaut", ("skimage", "astronaut.png"), (0.2, 0.0, 0.75, 1.0)),
    ("cameraman", ("skimage", "camera.png"), (0.1, 0.0, 0.75, 1.0)),
    ("coins", ("skimage", "coins.png"), (0.05, 0.05, 0.95, 0.95)),
    ("apple", ("ocvdata", "apple.jpg"), (0.1, 0.05, 0.9, 0.95)),
    ("orange", ("ocvdata", "orange.jpg"), (0.05, 0.05, 0.95, 0.95)),
    ("butterfly", ("ocvdata", "butterfly.jpg"), (0.0, 0.2, 1.0, 0.85)),
    ("baboon", ("ocvdata", "baboon.jpg"), (0.1, 0.0, 0.9, 1.0)),
    ("fish_drawing", ("ocvdata", "HappyFish.jpg"), (0.1, 0.05, 1.0, 0.95)),
    ("dog", ("ocvdata", "chicky_512.png"), (0.05, 0.05, 0.95, 0.95)),
    ("squirrel", ("ocvdata", "squirrel_cls.jpg"), (0.3, 0.2, 0.75, 0.9)),
    ("footballer", ("ocvdata", "messi5.jpg"), (0.35, 0.2, 0.85, 0.8)),
    ("car", ("ocvdata", "licenseplate_motion.jpg"), (0.0, 0.05, 1.0, 0.95)),
    ("robin", ("opencv", "hfs/data/000.jpg"), (0.1, 0.05, 0.75, 1.0)),
    ("potted_plant", ("opencv", "alphamat/input_images/plant.jpg"), (0.1, 0.0, 0.9, 0.95)),
    ("brick_house", ("opencv", "reg/home.png"), (0.0, 0.1, 1.0, 1.0)),
    ("office_building", ("ocvdata", "building.jpg"), (0.15, 0.0, 1.0, 0.85)),
    ("klimt_painting", ("visp", "Klimt/Klimt.png"), (0.0, 0.0, 1.0, 1.0)),
    ("starry_night", ("ocvdata", "starry_night.jpg"), (0.03, 0.03, 0.97, 0.97)),
    ("solvay_photo", ("visp", "Solvay/Solvay_conference_1927_Version2_1024x705.jpg"), (0.0, 0.0, 1.0, 1.0)),
    ("linux_logo", ("ocvdata", "LinuxLogo.jpg"), (0.0, 0.0, 1.0, 1.0)),
    ("windows_logo", ("ocvdata", "WindowsLogo.jpg"), (0.0, 0.0, 1.0, 1.0)),
    ("opencv_logo", ("ocvdata", "opencv-logo.png"), (0.0, 0.0, 1.0, 1.0)),
    ("anime_portrait", ("opencv", "fuzzy/input.png"), (0.1, 0.05, 0.9, 1.0)),
]
# Cluttered real photos the objects are pasted into (each also appears once alone as a clutter scene).
BACKGROUND_FILES = [
    ("ocvdata", "fruits.jpg"), ("ocvdata", "sudoku.png"), ("ocvdata", "board.jpg"),
    ("ocvdata", "smarties.png"), ("ocvdata", "stuff.jpg"), ("ocvdata", "home.jpg"),
    ("opencv", "text/scenetext01.jpg"), ("opencv", "text/scenetext02.jpg"), ("opencv", "text/scenetext03.jpg"),
    ("opencv", "text/scenetext04.jpg"), ("opencv", "text/scenetext05.jpg"), ("opencv", "text/scenetext06.jpg"),
    ("skimage", "gravel.png"), ("skimage", "grass.png"), ("skimage", "brick.png"),
    ("skimage", "hubble_deep_field.jpg"),
]
# Frames of OpenCV's sample videos (a static street camera; a walk under a tree).
BACKGROUND_VIDEOS = [("vtest.avi", (0, 100, 200, 300, 400, 500, 600, 700)), ("tree.avi", (0, 60))]
# Photos nobody queries (database only).
DISTRACTORS = [
    ("ocvdata", "Blender_Suzanne1.jpg"), ("ocvdata", "Blender_Suzanne2.jpg"), ("ocvdata", "ela_original.jpg"),
    ("ocvdata", "text_defocus.jpg"), ("ocvdata", "pic2.png"), ("ocvdata", "pic5.png"), ("ocvdata", "pic6.png"),
    ("ocvdata", "cards.png"), ("ocvdata", "blox.jpg"), ("ocvdata", "notes.png"),
    ("opencv", "hfs/data/001.jpg"), ("opencv", "hfs/data/002.jpg"), ("opencv", "dnn_superres/butterfly.png"),
    ("skimage", "moon.png"), ("skimage", "page.png"), ("skimage", "text.png"), ("skimage", "cell.png"),
    ("skimage", "horse.png"), ("skimage", "clock_motion.png"), ("skimage", "retina.jpg"), ("skimage", "logo.png"),
    ("skimage", "ihc.png"), ("skimage", "color.png"),
    ("visp", "AprilTag/AprilTag.pgm"), ("visp", "mbt-depth/castel/chateau.ppm"), ("visp", "ellipse-1/image.0001.pgm"),
]
# Pasted scene levels: object long side as a fraction of the scene's short side, corner jitter (fraction of the
# object's size), lighting spread, visible fraction of the object's area.
LEVELS = {
    "easy": dict(size=(0.45, 0.6), persp=0.05, gain=0.1, gamma=0.1, visible=1.0, blur=0.0, quality=92),
    "hard": dict(size=(0.2, 0.28), persp=0.16, gain=0.3, gamma=0.35, visible=1.0, blur=0.8, quality=80),
    "junk": dict(size=(0.3, 0.4), persp=0.08, gain=0.15, gamma=0.15, visible=0.3, blur=0.0, quality=88),
}


# ---- image helpers ----------------------------------------------------------------------------------------------
def load(kind: str, rel: str) -> np.ndarray:
    """RGB uint8 of a source image (grayscale and alpha converted), long side capped at MAX_SIDE."""
    path = src(kind, rel)
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        arr = np.asarray(im.convert("RGB"))
    return cap(arr)


def cap(arr: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    h, w = arr.shape[:2]
    if max(h, w) <= side:
        return arr
    s = side / max(h, w)
    return np.asarray(Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.LANCZOS))


def video_frame(name: str, index: int) -> np.ndarray:
    import cv2

    cap_ = cv2.VideoCapture(str(OPENCV_DIR / "data" / name))
    try:
        frame = None
        for _ in range(index + 1):  # decode sequentially: seeking is not frame-exact in every backend
            ok, frame = cap_.read()
            if not ok:
                raise SourceMissing(f"{name}: cannot decode frame {index}")
    finally:
        cap_.release()
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32("/".join(map(str, key)).encode())])


def frac_box(arr: np.ndarray, box: tuple[float, float, float, float]) -> list[int]:
    h, w = arr.shape[:2]
    return [round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)]


def paste(bg: np.ndarray, obj: np.ndarray, level: dict, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Paste `obj` into a copy of `bg` with a seeded perspective warp, scale and lighting change.

    Returns (scene, box of the pasted object clipped to the scene [x0, y0, x1, y1])."""
    import cv2

    H, W = bg.shape[:2]
    oh, ow = obj.shape[:2]
    long_px = rng.uniform(*level["size"]) * min(H, W)
    s = long_px / max(oh, ow)
    w, h = ow * s, oh * s
    j = level["persp"] * max(w, h)
    quad = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) + rng.uniform(-j, j, (4, 2))
    quad -= quad.min(axis=0)
    qw, qh = quad.max(axis=0)
    if level["visible"] >= 1.0:
        x0, y0 = rng.uniform(0, max(W - qw, 1)), rng.uniform(0, max(H - qh, 1))
    else:  # shifted across a border so only `visible` of its width (or height) lies inside the scene
        side = int(rng.integers(4))
        cut = 1.0 - level["visible"]
        x0 = rng.uniform(0, max(W - qw, 1))
        y0 = rng.uniform(0, max(H - qh, 1))
        if side == 0:
            x0 = -cut * qw
        elif side == 1:
            x0 = W - level["visible"] * qw
        elif side == 2:
            y0 = -cut * qh
        else:
            y0 = H - level["visible"] * qh
    dst = (quad + [x0, y0]).astype(np.float32)
    srcq = np.array([[0, 0], [ow, 0], [ow, oh], [0, oh]], np.float32)
    M = cv2.getPerspectiveTransform(srcq, dst)
    o = obj.astype(np.float32) / 255.0
    gain = 1.0 + rng.uniform(-level["gain"], level["gain"], 3)
    gamma = float(np.exp(rng.uniform(-level["gamma"], level["gamma"])))
    o = np.clip(np.power(o, gamma) * gain, 0, 1)
    warped = cv2.warpPerspective(o, M, (W, H), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones((oh, ow), np.float32), M, (W, H), flags=cv2.INTER_LINEAR)
    mask = cv2.GaussianBlur(mask, (3, 3), 0.7)[..., None]
    scene = bg.astype(np.float32) / 255.0 * (1 - mask) + warped * mask
    if level["blur"]:
        scene = cv2.GaussianBlur(scene, (0, 0), level["blur"])
    box = [max(0, int(dst[:, 0].min())), max(0, int(dst[:, 1].min())),
           min(W, int(np.ceil(dst[:, 0].max()))), min(H, int(np.ceil(dst[:, 1].max())))]
    return np.round(scene * 255).astype(np.uint8), box


def background_crop(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded window of 65-100% of each side of a background photo, resized so its long side is 640-1024 px."""
    H, W = bg.shape[:2]
    fw, fh = rng.uniform(0.65, 1.0, 2)
    cw, ch = max(32, round(W * fw)), max(32, round(H * fh))
    x, y = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    crop = bg[y:y + ch, x:x + cw]
    side = int(rng.choice([640, 800, 1024]))
    s = side / max(cw, ch)
    return np.asarray(Image.fromarray(crop).resize((round(cw * s), round(ch * s)), Image.BICUBIC))


# ---- the builder ------------------------------------------------------------------------------------------------
@dataclass
class Written:
    rel: str          # path relative to OUT/photos
    kind: str         # sequence | pair | pasted | clutter | distractor | query
    group: str
    source: str       # where the pixels come from
    size: tuple[int, int]


def build(out: str | Path) -> dict:
    """Write the set into `out`; returns the manifest (also written as out/manifest.json)."""
    check_sources()
    t0 = time.perf_counter()
    out = Path(out)
    root = out / "photos"
    written: dict[str, Written] = {}

    def save(arr: np.ndarray, rel: str, kind: str, group: str, source: str, quality: int = 92) -> str:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=quality)  # baseline JPEG, no EXIF: byte-identical across runs
        written[rel] = Written(rel, kind, group, source, (arr.shape[1], arr.shape[0]))
        return rel

    queries: list[dict] = []

    # sequences
    for group, kind, pattern, db_frames, q_frames, easy_delta in SEQUENCES:
        db = {f: save(load(kind, pattern.format(f)), f"db/sequences/{group}/frame{f:04d}.jpg", "sequence", group,
                      f"{kind}:{pattern.format(f)}") for f in db_frames if f not in q_frames}
        for qf in q_frames:
            q = load(kind, pattern.format(qf))
            rel = save(q, f"queries/{group}_frame{qf:04d}.jpg", "query", group, f"{kind}:{pattern.format(qf)}")
            queries.append({"image": rel, "bbox": [0, 0, q.shape[1], q.shape[0]],
                            "positives": [r for f, r in db.items() if abs(f - qf) <= easy_delta],
                            "hard": [r for f, r in db.items() if abs(f - qf) > easy_delta], "junk": [],
                            "kind": "sequence"})
    # chessboard
    chess = {}
    for p in CHESS_POSES:
        for cam in ("left", "right"):
            name = f"{cam}{p:02d}.jpg"
            if cam == "left" and p in CHESS_QUERIES:
                continue
            chess[(cam, p)] = save(load("ocvdata", name), f"db/sequences/chessboard/{name}", "sequence", "chessboard",
                                   f"ocvdata:{name}")
    for p in CHESS_QUERIES:
        q = load("ocvdata", f"left{p:02d}.jpg")
        rel = save(q, f"queries/chessboard_left{p:02d}.jpg", "query", "chessboard", f"ocvdata:left{p:02d}.jpg")
        queries.append({"image": rel, "bbox": [0, 0, q.shape[1], q.shape[0]], "positives": [chess[("right", p)]],
                        "hard": [r for (c, pp), r in chess.items() if pp != p], "junk": [], "kind": "sequence"})
    # pairs
    for group, qsrc, dsrc, label in PAIRS:
        d = save(load(*dsrc), f"db/pairs/{group}/{Path(dsrc[1]).stem}.jpg", "pair", group, ":".join(dsrc))
        q = load(*qsrc)
        rel = save(q, f"queries/{group}_{Path(qsrc[1]).stem}.jpg", "query", group, ":".join(qsrc))
        queries.append({"image": rel, "bbox": [0, 0, q.shape[1], q.shape[0]],
                        "positives": [d] if label == "easy" else [], "hard": [d] if label == "hard" else [],
                        "junk": [], "kind": "pair"})
    # backgrounds (each also written alone as a clutter scene)
    backgrounds: list[tuple[str, np.ndarray]] = [(":".join(b), load(*b)) for b in BACKGROUND_FILES]
    for video, frames in BACKGROUND_VIDEOS:
        backgrounds += [(f"ocvdata:{video}#frame{f}", video_frame(video, f)) for f in frames]
    for i, (name, bg) in enumerate(backgrounds):
        save(background_crop(bg, rng_for("clutter", name)), f"db/clutter/scene{i:02d}.jpg", "clutter", "clutter", name)
    # pasted objects: one easy, one hard and one junk scene each, on three different backgrounds
    order = rng_for("backgrounds").permutation(len(OBJECTS) * 3) % len(backgrounds)
    boxes: dict[str, list[int]] = {}
    for k, (name, osrc, box) in enumerate(OBJECTS):
        photo = load(*osrc)
        qbox = frac_box(photo, box)
        obj = photo[qbox[1]:qbox[3], qbox[0]:qbox[2]]
        q = {"image": save(photo, f"queries/{name}.jpg", "query", name, ":".join(osrc)), "bbox": qbox,
             "positives": [], "hard": [], "junk": [], "kind": "pasted"}
        for li, level in enumerate(("easy", "hard", "junk")):
            bname, bg = backgrounds[order[3 * k + li]]
            rng = rng_for("paste", name, level)
            scene, sbox = paste(background_crop(bg, rng), obj, LEVELS[level], rng)
            rel = save(scene, f"db/pasted/{name}_{level}.jpg", "pasted", name, f"{':'.join(osrc)} into {bname}",
                       LEVELS[level]["quality"])
            boxes[rel] = sbox
            q["positives" if level == "easy" else level].append(rel)
        queries.append(q)
    # distractors
    for kind, rel in DISTRACTORS:
        save(load(kind, rel), f"db/distractors/{Path(rel).stem.replace('.', '_')}.jpg", "distractor", "distractor",
             f"{kind}:{rel}")

    gt = {"queries": [{k: v for k, v in q.items() if k != "kind"} for q in queries]}
    (out / "gt.json").write_text(json.dumps(gt, indent=1) + "\n")
    n_db = sum(1 for w in written.values() if w.kind != "query")
    manifest = {
        "seed": SEED, "database_images": n_db, "queries": len(queries),
        "queries_by_kind": {k: sum(q["kind"] == k for q in queries) for k in ("sequence", "pair", "pasted")},
        "images": {r: {"kind": w.kind, "group": w.group, "source": w.source, "size": list(w.size),
                       **({"object_box": boxes[r]} if r in boxes else {})} for r, w in sorted(written.items())},
        "query_kinds": {q["image"]: q["kind"] for q in queries},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (photos/, gt.json, manifest.json are written in it)")
    a = ap.parse_args()
    try:
        m = build(a.out)
    except SourceMissing as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{m['database_images']} database images, {m['queries']} queries ({m['queries_by_kind']}) in "
          f"{a.out / 'photos'}, ground truth {a.out / 'gt.json'} ({m['seconds']} s)")


if __name__ == "__main__":
    main()
