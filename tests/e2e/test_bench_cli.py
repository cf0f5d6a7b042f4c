"""`visearch bench` and `visearch bench scale` through the real CLI, on a tiny collection of real photos."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.e2e.conftest import run  # noqa: E402  (absolute: tests/ is not a package)
from tests.photos import rescaled_copy, write_photos  # noqa: E402

LITE_DIM = 1280


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """5 database photos and 2 rescaled query copies with ground truth, converted (not yet extracted)."""
    base = tmp_path_factory.mktemp("bench")
    photos = base / "photos"
    db = write_photos(photos / "db", ["chelsea", "coffee", "rocket", "coins", "camera"], max_side=200)
    (photos / "queries").mkdir()
    gt = []
    for n in ("chelsea", "rocket"):
        rescaled_copy(db[n], photos / "queries" / f"{n}.jpg", 0.7)
        gt.append({"image": f"queries/{n}.jpg", "positives": [f"db/{n}.jpg"]})
    (base / "gt.json").write_text(json.dumps({"queries": gt}))
    data = base / "data"
    run("-q", "convert", photos, "--name", "mini", "--ground-truth", base / "gt.json", data_dir=data)
    return {"base": base, "data": data}


def test_bench_json_has_every_field_plausible_and_compare_ratios(mini):
    base, data = mini["base"], mini["data"]
    old = {"machine": {"cpu": "an older machine", "cores_logical": 2, "device": "cpu"}, "dataset": "mini",
           "models": {"lite": {"load_s": 0.5, "extract_images_per_s": 2.0, "peak_ram_mb": 100.0,
                               "query_ms": {"total": {"median": 1000.0, "p95": 2000.0}},
                               "bytes_per_image": {"global": 1280.0, "local": 0.0},
                               "map": {"global": {"easy": 50.0}}}}}
    (base / "old.json").write_text(json.dumps(old))
    out = base / "bench.json"
    p = run("-q", "bench", "--dataset", "mini", "--device", "cpu", "--queries", "3", "--warmup", "1",
            "--sample", "3", "--threads", "1", "--json", out, "--compare", base / "old.json", data_dir=data)
    assert "per model" in p.stdout and "ratio = new / old" in p.stdout  # the tables for people
    r = json.loads(out.read_text())

    m = r["machine"]
    assert m["cpu"] and m["cores_logical"] >= 1 and m["torch"] and m["python"] and m["torch_threads"] == 1
    assert m["device"] == "cpu" and m["gpu"] is None and "cuda" in m
    assert r["dataset"] == "mini" and r["dataset_info"] == {"images": 5, "queries": 2, "ground_truth": True}

    lite = r["models"]["lite"]
    assert lite["load_s"] > 0 and lite["extract_images_per_s"] > 0
    assert lite["extract_sample"]["images"] == 3
    q = lite["query_ms"]
    assert set(q) == {"detect", "describe", "search", "rerank", "total"}
    for stage, s in q.items():
        assert set(s) == {"median", "p95"} and 0 <= s["median"] <= s["p95"], (stage, s)
    assert q["describe"]["median"] > 0 and q["search"]["median"] > 0
    for stat in ("median", "p95"):  # total >= each stage query by query, so also for each order statistic
        assert q["total"][stat] >= max(q[st][stat] for st in ("detect", "describe", "search", "rerank"))
    assert lite["queries"]["n"] == 3 and lite["queries"]["images"] == "dataset queries"
    assert lite["peak_ram_mb"] > 50 and lite["peak_gpu_mb"] is None

    # bytes per image: the store's own numbers, checked against the files on disk
    store = lite["store"]
    assert store["rows"] == 5 and store["dim"] == LITE_DIM and store["dtype"] == "float16"
    bpi = lite["bytes_per_image"]
    # fp16 payload plus at most a few bytes of per-chunk checksum; a global-only model has no local bytes
    assert LITE_DIM * 2 <= bpi["global"] <= LITE_DIM * 2 + 8 and bpi["local"] == 0
    on_disk = sum(f.stat().st_size for f in (data / "mini" / "features" / "lite").iterdir() if f.is_file())
    assert bpi["total_on_disk"] * store["rows"] == pytest.approx(on_disk, abs=1)
    assert lite["projected_1m_gb"]["global"] == pytest.approx(bpi["global"] * 1e6 / 1e9, abs=1e-3)

    # accuracy: ground truth present, global only (lite has no reranker)
    mp = lite["map"]
    assert mp["reranked"] is None and lite["mp"]["reranked"] is None
    for proto in ("easy", "medium"):
        assert 0 <= mp["global"][proto] <= 100
        assert all(0 <= v <= 100 for v in lite["mp"]["global"][proto].values())
    assert mp["global"]["hard"] is None  # no image is marked hard

    # --compare: new / old for each figure present in both
    c = r["compare"]
    assert c["machine_differs"]["cpu"][0] == "an older machine"
    rows = c["models"]["lite"]
    assert rows["load_s"]["ratio"] == pytest.approx(lite["load_s"] / 0.5, rel=1e-3)
    assert rows["extract_images_per_s"]["ratio"] == pytest.approx(lite["extract_images_per_s"] / 2.0, rel=1e-3)
    assert rows["query_ms.total.p95"]["ratio"] == pytest.approx(q["total"]["p95"] / 2000.0, rel=1e-3)
    assert rows["bytes_per_image.global"]["ratio"] == pytest.approx(bpi["global"] / 1280.0, rel=1e-3)
    assert rows["bytes_per_image.global"]["better"] is False  # more bytes is worse
    assert rows["map.global.easy"]["ratio"] == pytest.approx(mp["global"]["easy"] / 50.0, rel=1e-3)
    assert rows["peak_ram_mb"]["ratio"] == pytest.approx(lite["peak_ram_mb"] / 100.0, rel=1e-3)


def test_model_without_weights_is_skipped_not_a_crash(mini, tmp_path):
    p = run("-q", "--weights-dir", tmp_path, "bench", "--dataset", "mini", "--models", "superglobal", "--device",
            "cpu", "--json", "-", data_dir=mini["data"])
    r = json.loads(p.stdout)
    reason = r["models"]["superglobal"]["skipped"]
    assert "Weights" in reason and "not found" in reason


def test_bench_usage_errors_are_one_line(mini, tmp_path):
    p = run("bench", data_dir=mini["data"], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "--dataset" in p.stderr
    bad = tmp_path / "old.json"
    bad.write_text("not json")
    p = run("bench", "--dataset", "mini", "--compare", bad, data_dir=mini["data"], check=False)
    assert p.returncode == 2 and "cannot read" in p.stderr and "Traceback" not in p.stderr
    p = run("bench", "--dataset", "mini", "--models", "nosuchmodel", data_dir=mini["data"], check=False)
    assert p.returncode == 2 and "unknown model" in p.stderr


def test_bench_scale_json(tmp_path):
    p = run("-q", "bench", "scale", "--sizes", "2k,5k", "--dim", "64", "--queries", "2", "--top-k", "10",
            "--reps", "1", "--threads", "1", "--json", "-", env={"TMPDIR": str(tmp_path)})
    r = json.loads(p.stdout)
    assert list(r["sizes"]) == ["2000", "5000"] and r["settings"]["dim"] == 64
    for row in r["sizes"].values():
        assert row["exact_ms"] > 0 and row["store_ms"] > 0
    assert os.listdir(tmp_path) == []  # the temporary stores are gone
