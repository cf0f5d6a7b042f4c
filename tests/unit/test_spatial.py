"""RootSIFT local fields and the `spatial` reranker (lite-sv): packing, determinism, size, the fused score, and a
planar object pasted with a random homography into clutter found at rank 1 where lite's global stage misses it, through
the real CLI (`extract --model lite-sv`, then `query`, whose default model it becomes) and the library."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.clitools import run  # noqa: E402
from tests.spatial_scenes import clutter, paste, photo  # noqa: E402


def test_rootsift_packing_is_rootsift_to_4_bits():
    from visearch.models.sift import pack_rootsift, unpack_rootsift

    rs = np.random.default_rng(0)
    d = rs.integers(0, 256, (50, 128)).astype(np.float32)
    d[:, ::3] = 0  # SIFT descriptors are sparse
    packed = pack_rootsift(d)
    assert packed.shape == (50, 64) and packed.dtype == np.uint8
    u = unpack_rootsift(packed)
    ref = np.sqrt(d / d.sum(1, keepdims=True))  # RootSIFT: L1-normalise, square root (unit L2 norm)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-6)
    assert (u * ref).sum(1).min() > 0.995
    assert np.abs(u - ref).max() < 0.03


def test_describe_is_bounded_deterministic_and_small():
    from visearch.models.sift import RootSIFT

    sift = RootSIFT(max_keypoints=300, max_side=400)
    img = photo("astronaut", 512)
    a, b = sift.describe(img), sift.describe(img.copy())
    for k in ("kp_desc", "kp_xy"):
        np.testing.assert_array_equal(a[k], b[k])
    xy = a["kp_xy"].astype(np.float32)
    n = int((~np.isnan(xy[:, 0])).sum())
    assert n == 300  # a textured photo has many more keypoints; the strongest 300 are kept
    assert np.nanmax(xy) <= 400  # positions in the capped image
    assert not a["kp_desc"][n:].any()
    few = sift.describe(np.full((64, 64, 3), 128, np.uint8))  # flat image: no keypoint, all padding
    assert np.isnan(few["kp_xy"].astype(np.float32)).all()


def test_lite_sv_config_extends_lite_and_fits_64k():
    from visearch.config import load_model_config
    from visearch.models.sift import local_fields

    lite, sv = load_model_config("lite"), load_model_config("lite-sv")
    assert sv["describe"] == lite["describe"] and sv["family"] == "lite"  # follows lite's resize policy
    assert sv["rerank"]["name"] == "spatial" and sv["local"]["kind"] == "rootsift"
    fields = local_fields(sv["local"]["max_keypoints"])
    row = 1280 * 2 + sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in fields.values())
    assert row <= 64 * 1024


def test_fused_score_formula():
    from visearch.rerankers.spatial import fused_scores

    g = np.array([0.9, 0.5, 0.4, 0.3])
    inl = np.array([5, 6, 200, 25])
    s = fused_scores(g, inl, weight=1.0, cap=50, min_inliers=6)
    np.testing.assert_allclose(s, [0.9, 0.5 + 6 / 50, 0.4 + 1.0, 0.3 + 0.5])


def test_bad_rerank_settings_are_one_line_errors():
    from visearch.errors import UsageError
    from visearch.rerankers.spatial import from_config

    with pytest.raises(UsageError, match="unknown spatial model"):
        from_config({"model": "fundamental"})
    with pytest.raises(UsageError, match="unknown \\[rerank\\] keys"):
        from_config({"ratoi": 0.8})


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A cluttered collection: the coffee cup pasted small under a random homography (`target`), a mirror image of
    the cup pasted large (looks the same to a global descriptor, is another instance), and clutter-only scenes."""
    base = tmp_path_factory.mktemp("spatial")
    photos = base / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    cup = photo("coffee", 320)
    Image.fromarray(cup).save(base / "query.jpg", quality=92)
    img, _ = paste(clutter(rng, (360, 480)), cup, rng, 0.32)
    Image.fromarray(img).save(photos / "target.jpg", quality=92)
    for k in range(2):
        img, _ = paste(clutter(rng, (360, 480)), np.ascontiguousarray(cup[:, ::-1]), rng, 0.6)
        Image.fromarray(img).save(photos / f"mirrored_{k}.jpg", quality=92)
    for k in range(3):
        Image.fromarray(clutter(rng, (360, 480))).save(photos / f"clutter_{k}.jpg", quality=92)
    data = base / "data"
    run("convert", photos, "--name", "shop", data_dir=data)
    run("extract", "shop", "--model", "lite-sv", "--device", "cpu", data_dir=data)
    return {"base": base, "data": data, "query": base / "query.jpg"}


def test_pasted_planar_object_found_at_rank_1_where_global_misses_it(scene):
    p = run("query", scene["query"], "--dataset", "shop", "--top-k", "6", "--json", data_dir=scene["data"])
    assert "model: lite-sv" in p.stderr  # the default once the dataset has a lite-sv store
    out = json.loads(p.stdout)
    assert out["model"] == "lite-sv"
    ranked = [r["id"] for r in out["crops"][0]["results"]]
    p = run("query", scene["query"], "--dataset", "shop", "--model", "lite-sv", "--top-k", "6", "--json",
            "--no-rerank", data_dir=scene["data"])
    global_only = [r["id"] for r in json.loads(p.stdout)["crops"][0]["results"]]
    assert not global_only[0].startswith("target")  # the mirrored cup looks closer to the global stage
    assert ranked[0].startswith("target")
    assert sorted(ranked) == sorted(global_only)


def test_spatial_rerank_is_deterministic_and_scores_inliers(scene):
    from visearch import api
    from visearch.images import load_rgb

    s = api.Searcher("shop", "lite-sv", scene["data"], device="cpu")
    feats = s.describe_queries([load_rgb(scene["query"])])
    rows, sims = s.search_features(feats, 6, rerank=False)
    a = s.rerank_shortlist(feats, rows, sims)
    b = s.rerank_shortlist(feats, rows[:, ::-1].copy(), sims[:, ::-1].copy())  # other order, same answer
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    local = s.store.read_local(rows[0])
    from visearch.rerankers.spatial import unpack_local

    qd, qxy = unpack_local(feats.local["kp_desc"][0], feats.local["kp_xy"][0])
    inl = s.reranker.verify(qd, qxy, local["kp_desc"], local["kp_xy"])
    ids = s.store.id_list(rows[0])
    target = [i.startswith("target") for i in ids].index(True)
    assert inl[target] >= 15 and inl[target] > 2 * np.delete(inl, target).max()
    # the reranked Shortlist keeps each row's global cosine in `sims` and orders by the fused score in `scores`
    from visearch.rerankers.base import Shortlist

    sl = s.reranker.rerank(feats.global_, feats.local, Shortlist(rows, sims), s.store)
    by_row = dict(zip(rows[0].tolist(), sims[0].tolist()))
    assert sl.sims[0].tolist() == [by_row[r] for r in sl.rows[0].tolist()]
    assert np.all(np.diff(sl.scores[0]) <= 0) and np.all(sl.scores[0] >= sl.sims[0] - 1e-6)


def test_any_model_uses_spatial_through_its_config():
    from visearch.errors import UsageError
    from visearch.registry import load_model, load_reranker

    m = load_model("lite", device="cpu", overrides={"local": {"kind": "rootsift", "max_keypoints": 50},
                                                    "rerank": {"name": "spatial", "shortlist": 20}})
    assert set(m.local_fields) == {"kp_desc", "kp_xy"} and m.local_fields["kp_desc"].shape == (50, 64)
    f = m.extract([photo("rocket", 256)])
    assert f.global_.shape == (1, 1280) and f.local["kp_desc"].shape == (1, 50, 64)
    rr = load_reranker(m.config, device="cpu")
    # the matching budget: 20 candidates at the full 50 keypoints, deeper for smaller crops, at most max_shortlist
    assert (rr.depth(50), rr.depth(10), rr.depth(1), rr.shortlist_size) == (20, 100, 300, 300)
    assert rr.depth(0) == 0  # a crop without keypoints keeps its global order: nothing is read
    with pytest.raises(UsageError, match="without RootSIFT"):
        load_reranker({"name": "superglobal-r50", "rerank": {"name": "spatial"}}, device="cpu")
