"""`visearch index build` through the real CLI: query and eval use the index, extract keeps it current, a stale or
bad index is one line."""
import json
import shutil

import pytest

from tests.clitools import run
from tests.photos import write_photos

pytest.importorskip("faiss")


def _one_line_error(p, *words):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_index_build_query_extract_update_and_stale(collection, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(collection["data"], data)  # the session store stays index-free for the other tests
    photos = tmp_path / "photos"
    shutil.copytree(collection["photos"], photos)
    run("convert", photos, "--name", "shop", "--replace", data_dir=data)
    run("extract", "shop", data_dir=data)
    p = run("index", "build", "shop", "--model", "lite", "--factory", "SQfp16", "--json", data_dir=data)
    r = json.loads(p.stdout)
    assert r["factory"] == "SQfp16" and r["vectors"] == 9 and r["code_bytes_per_vector"] > 0
    q = [str(x) for x in collection["queries"].values()][:4]
    via_index = run("query", *q, "--dataset", "shop", "--json", "--top-k", "9", data_dir=data).stdout
    exact = run("query", *q, "--dataset", "shop", "--json", "--top-k", "9", "--exact", data_dir=data).stdout
    # a flat index's shortlist rescored exactly: the same results, the same scores (to float32 rounding)
    for a, b in zip(map(json.loads, via_index.splitlines()), map(json.loads, exact.splitlines()), strict=True):
        ra, rb = a["crops"][0]["results"], b["crops"][0]["results"]
        assert [x["id"] for x in ra] == [x["id"] for x in rb]
        assert [x["score"] for x in ra] == pytest.approx([x["score"] for x in rb], abs=2e-6)
    # a new photo: extract adds it to the index, and it is found through the index
    write_photos(photos / "set a", ["clock"])
    run("convert", photos, "--name", "shop", data_dir=data)
    p = run("extract", "shop", data_dir=data)
    assert "index updated: 1 added, 0 removed, 10 vectors" in p.stderr
    # set-b/chelsea.jpg holds the same clock photo (conftest): the two tie, so either may come first
    p = run("query", str(photos / "set a" / "clock.jpg"), "--dataset", "shop", "--paths", "--top-k", "2",
            data_dir=data)
    assert str(photos / "set a" / "clock.jpg") in p.stdout.splitlines()
    # a store changed behind the index's back (its update skipped): refused in one line with the way out
    meta = data / "shop" / "features" / "lite" / "index" / "index.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(m, store_state="0" * 64)))
    _one_line_error(run("query", q[0], "--dataset", "shop", data_dir=data, check=False), "older state", "--exact")
    assert run("query", q[0], "--dataset", "shop", "--exact", data_dir=data).returncode == 0
    _one_line_error(run("index", "build", "shop", "--factory", "Bogus9", data_dir=data, check=False),
                    "FAISS cannot build")
    _one_line_error(run("index", "build", "shop", "--memory-budget", "lots", data_dir=data, check=False), "size")
    p = run("index", "build", "shop", "--memory-budget", "1GB", data_dir=data)
    assert "SQfp16 over 10 vectors" in p.stdout
