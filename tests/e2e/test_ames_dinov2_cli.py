"""ames-dinov2-dist and ames-dinov2 end to end through the real CLI (subprocesses) on random weights in the official
formats (tests/published_weights.py: DINOv2 ViT-B/14-reg4, the DINOv2 detector, both 768-d AMES checkpoints and the
CVNet R101 of the SuperGlobal shortlist): convert -> extract -> query -> eval (dist: also --no-rerank) -> bench
(both models: its figures include each one's reranked mAP), and the `dinov2` global-only model. ames-dinov2-dist
keeps the published SuperGlobal shortlist; ames-dinov2 (float) runs with its `global_stage = "cls"` option (through
tests/e2e/dinov2_cli.py), so both global stages are covered. The ~570 MB of random weights are written once per
module and removed after.

Random weights cannot retrieve by content: assertions are about the pipeline (stored bytes and shapes, the AMES
score formula, the documented JSON, the bench figures and the precision it reports).
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
from tests.e2e.test_published_models import json_lines, one_line_error  # noqa: E402
from tests.photos import rescaled_copy, write_photos  # noqa: E402
from tests.published_weights import DINOV2, FILES, write_weights_dir  # noqa: E402

WRAPPER = ROOT / "tests" / "e2e" / "dinov2_cli.py"  # the real CLI; ames-dinov2 (float) with the CLS global stage


def visearch(*args, data: Path, weights: Path | None = None, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WRAPPER), "--data-dir", str(data), *[str(a) for a in args]]
    env = cli_env({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                   **({"VISEARCH_WEIGHTS_DIR": str(weights)} if weights else {})})
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def wdir(tmp_path_factory) -> Path:
    path = write_weights_dir(tmp_path_factory.mktemp("dinov2_weights"), DINOV2)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def coll(tmp_path_factory, wdir) -> dict:
    """Three photos (<= 112 px) and one ground-truth query as dataset `trio`."""
    base = tmp_path_factory.mktemp("dinov2")
    src = base / "photos"
    db = write_photos(src / "db", ["chelsea", "coffee", "rocket"], max_side=112)
    (src / "queries").mkdir()
    q = rescaled_copy(db["chelsea"], src / "queries" / "chelsea.jpg", 0.8)
    gt = base / "gt.json"
    gt.write_text(json.dumps({"queries": [{"image": "queries/chelsea.jpg", "positives": ["db/chelsea.jpg"],
                                           "junk": ["db/rocket.jpg"]}]}))
    data = base / "data"
    visearch("convert", src, "--name", "trio", "--ground-truth", gt, data=data)
    return {"data": data, "db": db, "q": q}


def _extract(coll, wdir, model: str, width: int, dtype: str, dim: int) -> None:
    from visearch.store import Store

    rep = json.loads(visearch("-q", "extract", "trio", "--model", model, "--device", "cpu", "--json",
                              data=coll["data"], weights=wdir).stdout)
    assert (rep["model"], rep["added"], rep["failed"], rep["total"]) == (model, 3, [], 3)
    store = Store.open(rep["store"])
    assert store.manifest["local_fields"] == {"tokens": {"shape": [700, width], "dtype": dtype},
                                              "mask": {"shape": [700], "dtype": "bool"}}
    loc = store.read_local(np.arange(3))
    n_valid = (~loc["mask"]).sum(1)
    # <= 112 px photos at native size: at most 8 x 8 patches, all kept, the rest padding (zero tokens)
    assert (n_valid > 0).all() and (n_valid <= 64).all() and not loc["tokens"][loc["mask"]].any()
    assert store.read_global(np.arange(3)).shape == (3, dim)  # 2048: SuperGlobal shortlist; 768: DINOv2 CLS
    assert store.manifest["config"]["local"] == {"topk": 700, "imsize": 0}
    store.close()


def test_dist_extract_query_eval(coll, wdir):
    from visearch.config import load_model_config

    model = "ames-dinov2-dist"
    _extract(coll, wdir, model, 16, "uint8", 2048)
    common = ["--dataset", "trio", "--model", model, "--device", "cpu", "--json", "--top-k", "3"]
    rr = json_lines(visearch("query", coll["q"], *common, data=coll["data"], weights=wdir))[0]
    plain = json_lines(visearch("query", coll["q"], *common, "--no-rerank", data=coll["data"], weights=wdir))[0]
    assert rr["model"] == plain["model"] == model
    g = {x["id"]: x["score"] for x in plain["crops"][0]["results"]}
    r = {x["id"]: x["score"] for x in rr["crops"][0]["results"]}
    assert set(g) == set(r) and len(g) == 3
    lam = load_model_config(model)["rerank"]["lam"]
    for i in g:  # lam * global + (1 - lam) * sigmoid(gamma * logit): the AMES part lies in (0, 1)
        part = (r[i] - lam * g[i]) / (1 - lam)
        assert math.isfinite(r[i]) and 1e-4 < part < 1 - 1e-4, (i, r[i], g[i])
    assert plain["merged"][0]["path"] == str(coll["db"]["chelsea"])  # a rescaled copy: found first by SuperGlobal

    ev = json.loads(visearch("eval", "trio", "--model", model, "--device", "cpu", "--json", data=coll["data"],
                             weights=wdir).stdout)
    assert (ev["model"], ev["reranked"]) == (model, True)
    # one query, one positive among two scored images (junk ignored): AP is 100 or 50
    assert ev["medium"]["map"] in (100.0, 50.0) and ev["hard"]["map"] is None


def test_float_cls_global_extract_query(coll, wdir):
    """ames-dinov2 with `[describe] global = "cls"` (through tests/e2e/dinov2_cli.py): no CVNet pass, 768-d."""
    model = "ames-dinov2"
    _extract(coll, wdir, model, 128, "float16", 768)
    res = json_lines(visearch("query", coll["q"], "--dataset", "trio", "--model", model, "--device", "cpu", "--json",
                              "--top-k", "3", data=coll["data"], weights=wdir))[0]
    scores = [x["score"] for x in res["crops"][0]["results"]]
    assert res["model"] == model and len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)


def test_bench_reports_precision(coll, wdir, tmp_path):
    """bench loads both models, fills their stores if needed (a no-op after the tests above), times one query,
    reranks and evaluates."""
    out = tmp_path / "bench.json"
    visearch("-q", "bench", "--dataset", "trio", "--models", "ames-dinov2-dist,ames-dinov2", "--queries", "1",
             "--warmup", "0", "--sample", "1", "--device", "cpu", "--json", out, data=coll["data"],
             weights=wdir, timeout=600)
    res = json.loads(out.read_text())
    from visearch.device import cpu_has_bf16

    assert res["machine"]["cpu_bf16"] == cpu_has_bf16()
    for name, width in (("ames-dinov2-dist", 16), ("ames-dinov2", 256)):
        m = res["models"][name]
        assert m["queries"]["reranker"] == "ames"
        assert m["queries"]["rerank_precision"] == ("bf16" if cpu_has_bf16() else "fp32")
        assert m["query_ms"]["rerank"]["median"] > 0 and m["extract_images_per_s"] > 0
        assert m["bytes_per_image"]["local"] >= 700 * (width + 1)
        assert set(m["map"]) == {"global", "reranked"}


def test_dinov2_global_and_refusals(coll, wdir):
    rep = json.loads(visearch("-q", "extract", "trio", "--model", "dinov2", "--device", "cpu", "--json",
                              data=coll["data"], weights=wdir).stdout)
    assert (rep["model"], rep["added"], rep["failed"]) == ("dinov2", 3, [])
    res = json_lines(visearch("query", coll["q"], "--dataset", "trio", "--model", "dinov2", "--device", "cpu",
                              "--json", "--top-k", "3", data=coll["data"], weights=wdir))[0]
    scores = [x["score"] for x in res["merged"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    # the CVNet R101 file given as the DINOv2 backbone: refused in one line naming the file
    r101 = wdir / FILES["r101"]
    p = visearch("extract", "trio", "--model", "dinov2", "--weights", r101, "--device", "cpu", data=coll["data"],
                 weights=wdir, check=False)
    msg = one_line_error(p)
    assert str(r101) in msg and "CVNet" in msg, msg
