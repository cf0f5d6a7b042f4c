"""Issue 10 item 7 (code review), each with a test that fails on the old code: lite's store name comes from its
config, extract --batch-size reaches SuperGlobal's forward pass, eval refuses rows of images that left the dataset,
thumbnails fall back to the dataset copy, Searcher(prompt=...) picks the detector as the CLI does, the AMES hint
names a downloadable item, shard names past 99,999, and a reader past its open-file cap survives a compaction."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.photos import write_photos
from visearch import api, render
from visearch.errors import StoreError, WeightsError
from visearch.models.base import Features
from visearch.store import Store, StoreWriter

FAST_LITE = {"describe": {"scales": [1.0], "max_side": 64}}
NAMES = ["chelsea", "astronaut", "coffee", "rocket", "coins", "camera"]


@pytest.fixture(scope="module")
def lite():
    from visearch.registry import load_model

    return load_model("lite", device="cpu", overrides=FAST_LITE)


@pytest.fixture(scope="module")
def six(tmp_path_factory, lite):
    """Six photos with ground truth (one query: a crop of coffee), converted and extracted with a 64 px lite."""
    root = tmp_path_factory.mktemp("hardening")
    src = write_photos(root / "photos", NAMES, max_side=128)
    (root / "q").mkdir()
    Image.open(src["coffee"]).crop((10, 10, 100, 80)).save(root / "q" / "coffee-q.jpg")
    gt = root / "gt.json"
    gt.write_text(json.dumps({"queries": [{"image": str(root / "q" / "coffee-q.jpg"), "positives": ["coffee.jpg"]}]}))
    shutil.copy(root / "q" / "coffee-q.jpg", root / "photos" / "coffee-q.jpg")
    gt.write_text(json.dumps({"queries": [{"image": "coffee-q.jpg", "positives": ["coffee.jpg"]}]}))
    api.convert(root / "photos", "six", root / "data", ground_truth=gt)
    api.extract("six", data_dir=root / "data", describer=lite)
    return {"root": root, "data": root / "data", "src": src}


def _copy_data(six, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(six["data"], data)
    return data


# ---- lite's name --------------------------------------------------------------------------------------------------
def test_a_second_lite_config_gets_its_own_store_name():
    from visearch.config import load_model_config
    from visearch.models.lite import build

    cfg = dict(load_model_config("lite", FAST_LITE), name="lite-native")
    d = build(cfg, None, Path("no-weights-dir"), __import__("torch").device("cpu"))
    assert d.name == "lite-native"  # was always "lite": both configs wrote into features/lite


# ---- --batch-size --------------------------------------------------------------------------------------------------
def test_extract_batch_size_reaches_the_superglobal_forward_pass(tmp_path):
    import torch

    from visearch.config import load_model_config
    from visearch.models.nets.cvnet_resnet import CVNetResNet
    from visearch.models.superglobal import SuperGlobal

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):  # twelve distinct images of one size: one planned batch of 12
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).resize((96, 96)).save(folder / f"{i}.png")
    api.convert(folder, "twelve", tmp_path / "data")
    cfg = load_model_config("superglobal-r50", {"describe": {"scales": [1.0]}})
    torch.manual_seed(0)
    sg = SuperGlobal(name="superglobal-r50", dim=2048, config=cfg, device=torch.device("cpu"), weights_sha256=None,
                     net=CVNetResNet(50, relup=True).eval())
    seen = []
    forward = sg._describe_batch
    sg._describe_batch = lambda x: seen.append(x.shape[0]) or forward(x)
    r = api.extract("twelve", data_dir=tmp_path / "data", describer=sg, batch_size=12, workers=0)
    assert r.added == 12 and seen == [12]  # was [8, 4]: the config's batch_size = 8 capped every batch


# ---- eval ----------------------------------------------------------------------------------------------------------
def test_eval_refuses_store_rows_of_images_that_left_the_dataset(six, lite, tmp_path):
    data = _copy_data(six, tmp_path)
    assert api.evaluate("six", data_dir=data, searcher=api.Searcher("six", data_dir=data, describer=lite))
    # an image removed from the dataset (convert again after deleting it) while the store was not re-extracted
    gone = next(p for p in (data / "six" / "jpg").iterdir() if p.name.startswith("rocket"))
    store = Store.open(data / "six" / "features" / "lite")
    ids = set(store.id_list())
    store.close()
    from visearch.data.revisitop import read_gnd, write_gnd

    gnd_path = next((data / "six").glob("gnd_*.pkl"))
    cfg = read_gnd(gnd_path)
    pos = cfg["imlist"].index(gone.stem)
    assert gone.stem in ids
    keep = [i for i in range(len(cfg["imlist"])) if i != pos]
    remap = {old: new for new, old in enumerate(keep)}
    cfg["imlist"] = [cfg["imlist"][i] for i in keep]
    for g in cfg["gnd"]:
        for k in ("easy", "hard", "junk"):
            g[k] = [remap[i] for i in g.get(k, []) if i in remap]
    write_gnd(gnd_path, cfg["imlist"], cfg["qimlist"], cfg["gnd"])
    with pytest.raises(StoreError, match="no longer in the dataset"):
        api.evaluate("six", data_dir=data, searcher=api.Searcher("six", data_dir=data, describer=lite))


# ---- thumbnails ----------------------------------------------------------------------------------------------------
def test_thumbnails_fall_back_to_the_dataset_copy_when_the_original_moved(six, lite, tmp_path):
    s = api.Searcher("six", data_dir=six["data"], describer=lite)
    query = shutil.copy(six["src"]["chelsea"], tmp_path / "query.jpg")  # stays where it is
    res = s.query(query, top_k=3)
    paths = [r["path"] for r in res["crops"][0]["results"]]
    assert all(Path(p).is_file() for p in paths)
    before_png, before_html = tmp_path / "before.png", tmp_path / "before.html"
    render.contact_sheet(res, before_png, s.dataset)
    render.html_report([res], before_html, s.dataset)
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in paths:
        shutil.move(p, moved / Path(p).name)
    try:
        after_png, after_html = tmp_path / "after.png", tmp_path / "after.html"
        render.contact_sheet(res, after_png, s.dataset)
        render.html_report([res], after_html, s.dataset)
    finally:
        for p in paths:
            shutil.move(moved / Path(p).name, p)
    # the dataset's JPEG copies: the same thumbnails up to JPEG re-encoding, never the "missing" placeholder
    a = np.asarray(Image.open(before_png).convert("RGB"), np.float32)
    b = np.asarray(Image.open(after_png).convert("RGB"), np.float32)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3.0, np.abs(a - b).mean()
    n_img = before_html.read_text().count("data:image/")
    assert after_html.read_text().count("data:image/") == n_img and "missing" not in after_html.read_text()


# ---- automatic detector ---------------------------------------------------------------------------------------------
def test_searcher_with_a_prompt_and_no_detector_uses_the_automatic_choice(six, lite, tmp_path):
    wdir = tmp_path / "no-gdino"
    wdir.mkdir()
    s = api.Searcher("six", data_dir=six["data"], weights_dir=wdir, describer=lite, prompt="cat")
    assert s.detector_name == "tiles"  # gdino's weights are absent; was "none": the prompt was dropped
    res = s.query(six["src"]["chelsea"], top_k=2)
    assert len(res["crops"]) > 1 and res["crops"][1]["label"] != "whole image"
    plain = api.Searcher("six", data_dir=six["data"], weights_dir=wdir, describer=lite)
    assert plain.detector_name == "none" and len(plain.query(six["src"]["chelsea"], top_k=2)["crops"]) == 1
    assert len(plain.query(six["src"]["chelsea"], prompt="cat", top_k=2)["crops"]) > 1  # a prompt per query too
    assert plain.detector_name == "tiles"
    assert api.choose_detector(None, "cat", wdir, {"endpoint": "https://x"}) == "gdino-cloud"
    assert api.choose_detector("none", "cat", wdir) == "none"


# ---- AMES hint -----------------------------------------------------------------------------------------------------
def test_missing_ames_checkpoint_hint_names_an_item_weights_download_accepts(tmp_path):
    from visearch import weight_files as weights
    from visearch.config import load_model_config
    from visearch.rerankers.ames import load_ames

    for model in ("ames-dist", "ames-float"):
        with pytest.raises(WeightsError) as e:
            load_ames(load_model_config(model), tmp_path, "cpu")
        name = re.search(r"weights download (\S+?)`", e.value.hint).group(1)
        items = weights.items_for(name)  # raised "unknown weights item 'cvnet_ames_dist.pt'" on the old hint
        assert load_model_config(model)["rerank"]["checkpoint"] in {s.file for s in items}


# ---- shard names ---------------------------------------------------------------------------------------------------
def _rows(n: int, start: int) -> tuple[list[str], Features]:
    g = np.zeros((n, 4), np.float32)
    g[:, 0] = np.arange(start, start + n)
    return [f"img{i}" for i in range(start, start + n)], Features(g / np.maximum(1, g[:, :1]), None)


def test_shard_numbers_past_99999_never_collide(tmp_path):
    path = tmp_path / "store"
    Store.create(path, model="m", config={}, dim=4, weights_sha256=None)
    with StoreWriter(Store.open(path)) as w:
        w.append(*_rows(2, 0))
        w.append(*_rows(2, 2))
    # a store that has come past shard 99,999: rename its two shards as 99999 and 100000
    m = json.loads((path / "manifest.json").read_text())
    for s, new in zip(m["shards"], ("shard-99999.h5", "shard-100000.h5")):
        (path / s["file"]).rename(path / new)
        s["file"] = new
    (path / "manifest.json").write_text(json.dumps(m))
    with StoreWriter(Store.open(path)) as w:
        w.append(*_rows(2, 4))
    with Store.open(path) as st:
        assert [s.file for s in st.shards] == ["shard-99999.h5", "shard-100000.h5", "shard-100001.h5"]
        assert st.id_list() == [f"img{i}" for i in range(6)]  # the old code wrote shard-100000.h5 again: img2, img3 lost


# ---- a long-lived reader past its open-file cap --------------------------------------------------------------------
def test_reader_past_its_open_file_cap_survives_a_compaction(tmp_path, monkeypatch):
    import visearch.store

    monkeypatch.setattr(visearch.store, "_max_open_files", lambda: 4)  # a server whose store has more shards than
    # half its open-file limit
    path = tmp_path / "store"
    Store.create(path, model="m", config={}, dim=4, weights_sha256=None)
    with StoreWriter(Store.open(path)) as w:
        for k in range(12):
            w.append(*_rows(3, 3 * k), fingerprints=[f"fp{k}"] * 3)
        w.tombstone([4])  # one dead row: compaction drops it
    reader = Store.open(path)
    assert len(reader._files) == 4
    want = reader.read_global(np.arange(len(reader)))
    ids = reader.id_list()
    with StoreWriter(Store.open(path)) as w:
        assert w.compact() == 12  # all small: merged into one, the twelve old files deleted
    assert sorted(p.name for p in path.glob("shard-*.h5")) == ["shard-00012.h5"]
    # the reader still answers from its own view, the closed shards now read through the new manifest
    got = np.concatenate([b for _, b in reader.iter_global(chunk_rows=5)]).astype(np.float32)
    live = reader.live
    assert np.array_equal(got[live], want[live]) and reader.id_list() == ids
    assert np.array_equal(reader.read_global(np.array([35, 0, 17])), want[[35, 0, 17]])
    reader.close()
