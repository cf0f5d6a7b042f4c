"""The published-model pipelines end to end through the real CLI (subprocesses), on random weights saved in the
official formats (tests/published_weights.py): superglobal-r50 (convert -> extract -> query with and without
SuperGlobal reranking -> eval, tiles crops, refused weights) and AMES (dist: packed 16 B local tokens, global search +
AMES rerank, a crop below the network minimum; float: float16 tokens).

Random weights cannot retrieve by content; assertions are about the pipeline: shapes and bytes in the store, the
same candidates with and without reranking, the documented JSON, one-line errors. The one content assertion is that
a rescaled copy of a database photo finds that photo first (true for any smooth network, random or not).
Images are tiny (<= 128 px) and the AMES collection has two images: R101 on two CPU cores is slow.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.fast_cli import cli_env  # noqa: E402
from tests.helpers_ckpt import make_cvnet_checkpoint  # noqa: E402
from tests.photos import cropped_copy, rescaled_copy, write_photos  # noqa: E402
from tests.published_weights import FILES, write_weights_dir  # noqa: E402

SG = "superglobal-r50"
DB_NAMES = ["chelsea", "astronaut", "coffee", "rocket", "coins", "camera"]


def visearch(*args, data: Path, weights: Path | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; weights dir through VISEARCH_WEIGHTS_DIR (or --weights-dir in `args`)."""
    cmd = [sys.executable, "-m", "visearch.cli", "--data-dir", str(data), *[str(a) for a in args]]
    env = cli_env({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                   **({"VISEARCH_WEIGHTS_DIR": str(weights)} if weights else {})})
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def json_lines(p: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """The stderr of a failed run: exactly one line, `error: ...`, no traceback."""
    assert p.returncode != 0, p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and "unexpected" not in lines[0], p.stderr
    return lines[0]


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """Random official-format files for superglobal-r50/r101 and both AMES variants, written once per session (and
    removed after it: 370 MB that pytest would otherwise keep for its last three runs)."""
    path = write_weights_dir(tmp_path_factory.mktemp("published_weights"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_weights_dir_holds_every_file_a_user_has(weights_dir):
    """The test folder is the folder a user has after `weights download` of every model and of the default detector
    (and the files the seed prototype fetched, e.g. the ITQ npz that once crashed `load_model("ames")`)."""
    from visearch import weight_files as weights

    needed = {n for names in weights.requirements().values() for n in names}
    status = {st.spec.name: st for st in weights.status(weights_dir)}
    assert needed - {"grounding-dino-base"} <= {n for n, st in status.items() if st.present}, \
        {n: st.present for n, st in status.items()}
    prototype = {"CVPR2022_CVNet_R50.pyth", "cvnet_detector.pt", "itq_r101_cvnet_D128.npz", "r101_cvnet_ames.pt"}
    assert prototype <= {p.name for p in weights_dir.iterdir()}
    assert set(FILES.values()) == {p.name for p in weights_dir.iterdir()}


# ---- superglobal-r50 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sg(tmp_path_factory, weights_dir) -> dict:
    """Six photos (<= 128 px) and two ground-truth queries as dataset `mini`, extracted with superglobal-r50."""
    base = tmp_path_factory.mktemp("sg")
    src = base / "photos"
    db = write_photos(src / "db", DB_NAMES, max_side=128)
    (src / "queries").mkdir()
    # 102 x 68 px: below the network minimum (short side 92 at the smallest scale), upsampled by the model
    q_small = rescaled_copy(db["chelsea"], src / "queries" / "chelsea small.jpg", 0.8)
    q_crop = cropped_copy(db["coffee"], src / "queries" / "coffee-crop.png", (0.05, 0.05, 0.95, 0.95))
    gt = base / "gt.json"
    gt.write_text(json.dumps({"queries": [
        {"image": "queries/chelsea small.jpg", "positives": ["db/chelsea.jpg"], "junk": ["db/astronaut.jpg"]},
        {"image": "queries/coffee-crop.png", "bbox": [4, 4, 100, 70], "positives": ["db/coffee.jpg"],
         "hard": ["db/camera.jpg"]}]}))
    data = base / "data"
    conv = json.loads(visearch("convert", src, "--name", "mini", "--ground-truth", gt, "--json", data=data).stdout)
    assert conv["n_images"] == 6 and conv["n_queries"] == 2, conv
    # the weights dir through the global option here, through the environment everywhere else
    ext = visearch("-q", "--weights-dir", weights_dir, "extract", "mini", "--model", SG, "--device", "cpu", "--json",
                   data=data)
    return {"data": data, "src": src, "db": db, "queries": [q_small, q_crop], "extract": json.loads(ext.stdout)}


def test_superglobal_extract_store(sg, weights_dir):
    from visearch.fsutil import sha256_file
    from visearch.store import Store

    rep = sg["extract"]
    assert (rep["model"], rep["added"], rep["failed"], rep["total"]) == (SG, 6, [], 6)
    store = Store.open(rep["store"])
    assert store.model == SG and len(store) == 6 and store.local_fields == {}
    assert store.manifest["weights_sha256"] == sha256_file(weights_dir / FILES["r50"])
    g = store.read_global(np.arange(6))
    assert g.shape == (6, 2048) and np.allclose(np.linalg.norm(g, axis=1), 1, atol=2e-3)
    assert np.abs(g @ g.T - np.eye(6)).max() > 1e-3  # six different descriptors


def test_superglobal_query_rerank_and_no_rerank(sg, weights_dir):
    args = ["query", *sg["queries"], "--dataset", "mini", "--model", SG, "--top-k", "6", "--device", "cpu", "--json"]
    reranked = json_lines(visearch(*args, data=sg["data"], weights=weights_dir))
    plain = json_lines(visearch(*args, "--no-rerank", data=sg["data"], weights=weights_dir))
    assert [r["query"] for r in reranked] == [str(q) for q in sg["queries"]] == [r["query"] for r in plain]
    assert {r["model"] for r in reranked + plain} == {SG}
    differs = False
    for rr, pl in zip(reranked, plain):
        assert len(rr["crops"]) == 1 and rr["crops"][0]["label"] == "whole image"
        a, b = rr["crops"][0]["results"], pl["crops"][0]["results"]
        assert [x["rank"] for x in a] == [1, 2, 3, 4, 5, 6]
        # top-k = the whole collection: reranking may only reorder and rescore
        assert {x["id"] for x in a} == {x["id"] for x in b} and len({x["id"] for x in a}) == 6
        assert all(x["score"] >= y["score"] for x, y in zip(a, a[1:]))
        assert all(x["score"] >= y["score"] for x, y in zip(b, b[1:]))
        assert {x["path"] for x in a} == {str(p) for p in sg["db"].values()}
        assert rr["merged"] == a and pl["merged"] == b
        differs |= [x["id"] for x in a] != [x["id"] for x in b] or any(
            abs(x["score"] - y["score"]) > 1e-5 for x, y in zip(a, b))
    assert differs, "--no-rerank gave the reranked results"
    # a rescaled copy finds its original first by cosine
    assert plain[0]["merged"][0]["path"] == str(sg["db"]["chelsea"])


def test_superglobal_eval_json(sg, weights_dir):
    out = json.loads(visearch("eval", "mini", "--model", SG, "--device", "cpu", "--json", data=sg["data"],
                              weights=weights_dir).stdout)
    assert (out["dataset"], out["model"], out["reranked"]) == ("mini", SG, True)
    assert set(out) == {"dataset", "model", "reranked", "easy", "medium", "hard"}
    for proto in ("easy", "medium", "hard"):
        assert set(out[proto]) == {"map", "mp@1", "mp@5", "mp@10"}
        assert all(0.0 <= v <= 100.0 for v in out[proto].values()), out
    # each query has one easy positive among the 5 or 6 scored images, so its AP is 1/rank: the mean of two
    easy_aps = {100 * (1 / a + 1 / b) / 2 for a in range(1, 7) for b in range(1, 7)}
    assert any(abs(out["easy"]["map"] - v) < 0.01 for v in easy_aps), out["easy"]


def test_superglobal_refuses_other_weights(sg, weights_dir, tmp_path):
    r101 = weights_dir / FILES["r101"]
    p = visearch("extract", "mini", "--model", SG, "--weights", r101, "--device", "cpu", data=sg["data"],
                 weights=weights_dir, check=False)
    msg = one_line_error(p)
    assert str(r101) in msg and "R101" in msg, msg
    # a valid R50 checkpoint, but not the one the store was extracted with
    other = make_cvnet_checkpoint(tmp_path / "other_r50.pyth", 50, seed=9, reranker_keys=False)
    p = visearch("query", sg["queries"][0], "--dataset", "mini", "--model", SG, "--weights", other, "--device", "cpu",
                 data=sg["data"], weights=weights_dir, check=False)
    other.unlink()
    msg = one_line_error(p)
    assert "other" in msg and "weights" in msg and SG in msg, msg
    assert p.stdout == ""


def test_superglobal_query_tiles(sg, weights_dir):
    q = sg["db"]["astronaut"]
    res = json_lines(visearch("query", q, "--dataset", "mini", "--model", SG, "--detector", "tiles", "--top-k", "3",
                              "--device", "cpu", "--json", data=sg["data"], weights=weights_dir))
    assert len(res) == 1
    crops = res[0]["crops"]
    w, h = 128, 128  # astronaut is square
    assert len(crops) >= 10 and crops[-1]["label"] == "whole image" and crops[-1]["box"] == [0, 0, w, h]
    for c in crops:
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert [r["rank"] for r in c["results"]] == [1, 2, 3]
    # a database image as its own query: among the whole-image crop's top 3 (not always first: on a tiny collection
    # of random-weight descriptors, all within ~0.003 cosine, SuperGlobal's neighbour averaging reshuffles the top)
    assert str(q) in [r["path"] for r in crops[-1]["results"]]
    merged = res[0]["merged"]
    assert len(merged) == 3 and all(a["score"] >= b["score"] for a, b in zip(merged, merged[1:]))
    assert merged[0]["score"] == max(r["score"] for c in crops for r in c["results"])


# ---- AMES -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ames(tmp_path_factory, weights_dir) -> dict:
    """Two photos (96 px) as dataset `pair` extracted with `ames` (the dist alias); one as `single` with ames-float."""
    base = tmp_path_factory.mktemp("ames")
    db = write_photos(base / "photos", ["chelsea", "coffee"], max_side=96)
    one = write_photos(base / "one", ["rocket"], max_side=96)
    q = rescaled_copy(db["chelsea"], base / "q.jpg", 0.9)
    tiny = cropped_copy(db["coffee"], base / "tiny.png", (0.3, 0.3, 0.6, 0.65))  # ~29 x 22 px
    data = base / "data"
    visearch("convert", base / "photos", "--name", "pair", data=data)
    visearch("convert", base / "one", "--name", "single", data=data)
    dist = json.loads(visearch("-q", "extract", "pair", "--model", "ames", "--device", "cpu", "--json", data=data,
                               weights=weights_dir).stdout)
    return {"data": data, "db": db, "one": one, "q": q, "tiny": tiny, "dist": dist}


def _check_local_store(store_path: str, n: int, token_shape: tuple[int, int], dtype: str) -> None:
    from visearch.store import Store

    store = Store.open(store_path)
    k, width = token_shape
    assert store.manifest["local_fields"] == {"tokens": {"shape": [k, width], "dtype": dtype},
                                              "mask": {"shape": [k], "dtype": "bool"}}
    per_local = width * np.dtype(dtype).itemsize
    assert per_local == {"uint8": 16, "float16": 256}[dtype]
    # every local descriptor costs its token bytes plus one mask byte (and each image's chunks a 4 B checksum)
    assert n * k * (per_local + 1) <= store.nbytes()["local"] <= n * k * (per_local + 1) + 16 * n
    loc = store.read_local(np.arange(n))
    assert loc["tokens"].shape == (n, k, width) and loc["tokens"].dtype == np.dtype(dtype)
    assert loc["mask"].shape == (n, k) and loc["mask"].dtype == bool
    real = ~loc["mask"]
    assert (real.sum(1) > 0).all() and real.sum() < n * k  # small images: some tokens, then padding
    assert not loc["tokens"][loc["mask"]].any()  # padding rows are zero
    assert store.read_global(np.arange(n)).shape == (n, 2048)
    # the local-feature settings are part of the store's identity (another topk or scales is refused)
    assert store.manifest["config"]["local"] == {"scales": [0.7071, 1.0, 1.4142], "topk": k, "max_side": 0}


def test_ames_dist_extract_store(ames):
    rep = ames["dist"]
    assert (rep["model"], rep["added"], rep["failed"]) == ("ames-dist", 2, [])
    _check_local_store(rep["store"], 2, (700, 16), "uint8")


def test_ames_query_rerank_small_crop_and_no_rerank(ames, weights_dir):
    from visearch.config import load_model_config

    common = ["--dataset", "pair", "--model", "ames", "--device", "cpu", "--json", "--top-k", "2"]
    p = visearch("-v", "query", ames["q"], ames["tiny"], *common, data=ames["data"], weights=weights_dir)
    reranked = json_lines(p)
    assert "upsampled" in p.stderr  # the tiny crop went through the model's upsampling, not an error
    plain = json_lines(visearch("query", ames["q"], *common, "--no-rerank", data=ames["data"], weights=weights_dir))
    assert len(reranked) == 2 and len(plain) == 1 and {r["model"] for r in reranked + plain} == {"ames-dist"}
    for r in reranked:
        res = r["crops"][0]["results"]
        assert len(res) == 2 and {x["path"] for x in res} == {str(p) for p in ames["db"].values()}
        assert all(math.isfinite(x["score"]) for x in res)
    g = {x["id"]: x["score"] for x in plain[0]["crops"][0]["results"]}
    rr = {x["id"]: x["score"] for x in reranked[0]["crops"][0]["results"]}
    assert set(g) == set(rr)
    # reranked score = lam * global + (1 - lam) * sigmoid(gamma * logit): the AMES part lies strictly in (0, 1)
    lam = load_model_config("ames-dist")["rerank"]["lam"]
    for i in g:
        part = (rr[i] - lam * g[i]) / (1 - lam)
        assert 1e-4 < part < 1 - 1e-4, (i, rr[i], g[i])
    assert plain[0]["merged"][0]["path"] == str(ames["db"]["chelsea"])  # global search finds the original


def test_ames_float_extract(ames, weights_dir):
    rep = json.loads(visearch("-q", "extract", "single", "--model", "ames-float", "--device", "cpu", "--json",
                              data=ames["data"], weights=weights_dir).stdout)
    assert (rep["model"], rep["added"], rep["failed"]) == ("ames-float", 1, [])
    _check_local_store(rep["store"], 1, (700, 128), "float16")
