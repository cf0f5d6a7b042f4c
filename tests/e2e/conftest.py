"""End-to-end fixtures: a small collection of real photos, converted and described once per session with the real
CLI in subprocesses."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.clitools import run  # noqa: E402
from tests.photos import cropped_copy, rescaled_copy, write_photos  # noqa: E402


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """Photos in two sub-folders (with one file name used twice) and query copies (rescaled / cropped)."""
    base = tmp_path_factory.mktemp("e2e")
    photos = base / "photos"
    a = write_photos(photos / "set a", ["chelsea", "astronaut", "coffee", "rocket"])
    b = write_photos(photos / "set-b", ["hubble_deep_field", "immunohistochemistry", "coins", "camera"])
    # the same file name in another folder, other content: ids must stay unique
    (photos / "set-b" / "chelsea.jpg").write_bytes((photos / "set-b" / "clock.jpg").read_bytes()
                                                  if (photos / "set-b" / "clock.jpg").exists()
                                                  else write_photos(base / "tmp", ["clock"])["clock"].read_bytes())
    sources = {**a, **b}
    queries = base / "queries"
    queries.mkdir()
    qpaths = {}
    for name in ("chelsea", "coffee", "rocket", "coins"):
        qpaths[f"{name}-small"] = rescaled_copy(sources[name], queries / f"{name} small.jpg", 0.6)
        qpaths[f"{name}-crop"] = cropped_copy(sources[name], queries / f"{name}-crop.png", (0.1, 0.1, 0.85, 0.9))
    data = base / "data"
    run("convert", photos, "--name", "shop", data_dir=data)
    run("extract", "shop", "--model", "lite", "--device", "cpu", data_dir=data)
    return {"base": base, "photos": photos, "sources": sources, "queries": qpaths, "data": data}
