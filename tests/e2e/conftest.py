"""End-to-end fixtures: a small collection of real photos, converted and described once per session with the real
CLI in subprocesses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.photos import cropped_copy, rescaled_copy, write_photos  # noqa: E402

VISEARCH = [sys.executable, "-m", "visearch.cli"]


def run(*args, data_dir=None, input=None, env=None, check=True, timeout=300):
    """Run the real CLI; returns CompletedProcess with text stdout/stderr."""
    cmd = list(VISEARCH)
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += [str(a) for a in args]
    full_env = dict(os.environ, VISEARCH_WEIGHTS_DIR=str(ROOT / "weights"), **(env or {}))
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


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
