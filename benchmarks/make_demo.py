"""Build the demo collection from real photos that ship with scikit-image (no network needed).

    python benchmarks/make_demo.py demo
writes demo/photos/<group>/<name>.jpg (the collection), demo/photos/queries/*.jpg (rescaled and cropped copies of some
photos; `convert` takes the ground truth's query images out of the database, as revisitop does) and
demo/ground_truth.json (each query's source image as its positive), for `make demo` and the benchmarks.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.photos import cropped_copy, rescaled_copy, write_photos  # noqa: E402

GROUPS = {
    "animals and people": ["chelsea", "astronaut"],
    "objects": ["coffee", "rocket", "coins", "clock", "camera"],
    "science": ["hubble_deep_field", "immunohistochemistry", "moon"],
    "textures": ["brick", "grass", "gravel", "page"],
}
QUERIES = ["chelsea", "coffee", "rocket", "coins", "hubble_deep_field", "astronaut"]


def build(root: Path) -> dict[str, Path]:
    photos: dict[str, Path] = {}
    for group, names in GROUPS.items():
        photos.update(write_photos(root / "photos" / group, names))
    qdir = root / "photos" / "queries"
    qdir.mkdir(parents=True, exist_ok=True)
    gt = []
    for n in QUERIES:
        small = rescaled_copy(photos[n], qdir / f"{n}-small.jpg", 0.6)
        crop = cropped_copy(photos[n], qdir / f"{n}-crop.jpg", (0.15, 0.1, 0.85, 0.9))
        for q in (small, crop):
            gt.append({"image": str(q.relative_to(root / "photos")),
                       "positives": [str(photos[n].relative_to(root / "photos"))]})
    (root / "ground_truth.json").write_text(json.dumps({"queries": gt}, indent=1))
    return photos


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo")
    ps = build(out)
    print(f"{len(ps)} photos in {out / 'photos'}, {2 * len(QUERIES)} queries in {out / 'photos' / 'queries'}")
