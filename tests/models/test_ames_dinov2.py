"""DINOv2 ViT-B/14-reg4 backbone, the AMES DINOv2 extraction and the AMES transformer on 768-d inputs, against the
reference code.

tests/data/ames_dinov2.npz was produced outside this repository by running facebookresearch/dinov2 @ b8931f7
(hub `_make_dinov2_model(vit_base, num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)`,
xFormers disabled, CPU) and pavelsuma/ames @ c6af26e (extract/image_dataset.py DataSet, extract/extract_dino.py
extract_features with FeatureStorage and SpatialAttention2d(768), `.cuda()` shimmed to a no-op; src/models/matcher.py
AMES and the scoring lines of src/utils/metrics.py) on the seeded images of tests/dinov2_inputs.py and random
official-format weights (visearch.models.nets.vit_dinov2.random_state, tests/published_weights.detector_state,
visearch.rerankers.ames.random_state). It holds: the prepared network input (shape, scale, sha256 and sum) of six
odd-sized images at native size and two imsize settings; CLS and patch tokens (full for small images, first rows and
an 8-d projection for large ones) and a 518 x 518 input; the 773-float records of three images (columns 0-4 in full,
the first 48 descriptors and a projection of all 700); AMES logits for 768-d pairs and reranked orders.
"""
from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dinov2_inputs import (  # noqa: E402
    AMES_SEED,
    BACKBONE_SEED,
    DETECTOR_SEED,
    IMSIZES,
    LOCAL_IMAGES,
    SIZES,
    make_images,
    projection,
)
from tests.published_weights import detector_state  # noqa: E402
from tests.unit.test_rerank_ames import _away_from_edges  # noqa: E402
from visearch.errors import WeightsError  # noqa: E402
from visearch.models.nets.ames_transformer import AMES, random_state  # noqa: E402
from visearch.rerankers.ames import rerank  # noqa: E402

DATA = ROOT / "tests" / "data"
B, LQ, LD, DIM = 8, 40, 24, 768
VALID = [(LQ, LD), (1, LD), (LQ, 2), (3, 1), (17, 9), (29, 24), (2, 3), (40, 13)]
LAM_GAMMA = {"float": (0.50, 0.20), "dist": (0.35, 0.10)}  # visearch/config/models/ames-dinov2*.toml


# ---- inputs shared with the golden script ---------------------------------------------------------------------------
def make_descriptors(variant: str, state: dict[str, torch.Tensor], n: int, length: int, rs: np.random.RandomState,
                     database: bool) -> np.ndarray:
    """float32 [n, length, 768] random descriptors, each row away from ITQ-sign / fp16 rounding edges."""
    out = rs.standard_normal((n, length, DIM)).astype(np.float32)
    flat = out.reshape(-1, DIM)
    for _ in range(50):
        bad = ~_away_from_edges(variant, state, flat, database)
        if not bad.any():
            return out
        flat[bad] = rs.standard_normal((int(bad.sum()), DIM)).astype(np.float32)
    raise AssertionError("could not draw descriptors away from edges")


@functools.lru_cache(maxsize=None)
def make_pairs(variant: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    state = random_state(variant, AMES_SEED[variant], local_dim=DIM)
    rs = np.random.RandomState(200 + AMES_SEED[variant])
    q = make_descriptors(variant, state, B, LQ, rs, database=False)
    d = make_descriptors(variant, state, B, LD, rs, database=True)
    qm, dm = np.ones((B, LQ), bool), np.ones((B, LD), bool)
    for i, (nq, nd) in enumerate(VALID):
        qm[i, :nq] = False
        dm[i, :nd] = False
    return state, {"q": q, "qm": qm, "d": d, "dm": dm}


def make_rerank_case() -> tuple[np.ndarray, np.ndarray]:
    """Global similarities [3, 12] (descending, distinct) and database ids in that order."""
    rs = np.random.RandomState(41)
    sims = -np.sort(-rs.uniform(0.2, 0.9, (3, 12))).astype(np.float32)
    ids = np.stack([rs.permutation(12) for _ in range(3)]).astype(np.int64)
    return sims, ids


# ---- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "ames_dinov2.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> Path:
    """The real ViT-B/14-reg4 structure with random weights, saved as the official flat state_dict."""
    from visearch.models.nets.vit_dinov2 import random_state as vit_state

    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitb14_reg4_pretrain.pth"
    torch.save(vit_state(BACKBONE_SEED), path)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def describer(vit_file: Path, tmp_path_factory):
    """ames-dinov2-dist with the CLS global stage (no CVNet needed for the local-feature checks)."""
    from visearch.registry import load_model

    torch.set_num_threads(2)
    wdir = vit_file.parent
    torch.save({"state": detector_state(DETECTOR_SEED, channels=DIM)}, wdir / "dinov2_detector.pt")
    torch.save({"state": random_state("dist", AMES_SEED["dist"], local_dim=DIM)}, wdir / "dinov2_ames_dist.pt")
    return load_model("ames-dinov2-dist", weights_dir=wdir, device="cpu",
                      overrides={"describe": {"global_stage": "cls"}, "rerank": {"precision": "fp32"}})


# ---- preparation ----------------------------------------------------------------------------------------------------
def test_resize_matches_reference(golden) -> None:
    from visearch.models.dinov2 import image_scale, resize_to_patches, to_network

    for imsize in IMSIZES:
        for i, bgr in enumerate(make_images()):
            key = f"resize_{imsize}_{i}"
            s = image_scale(bgr.shape, imsize)
            prepared = resize_to_patches(bgr, s)
            assert prepared.shape[:2] == tuple(golden[key + "_shape"]), key
            assert prepared.shape[0] % 14 == 0 and prepared.shape[1] % 14 == 0
            x = to_network(prepared)[0][[2, 1, 0]].numpy()  # back to the reference's BGR order
            assert hashlib.sha256(x.tobytes()).hexdigest() == str(golden[key + "_sha"]), (key, SIZES[i])
    np.testing.assert_array_equal(to_network(resize_to_patches(make_images()[0]))[0].numpy(), golden["input0"])


# ---- backbone -------------------------------------------------------------------------------------------------------
def test_backbone_tokens_match_reference(vit_file: Path, golden) -> None:
    from visearch.models.dinov2 import resize_to_patches, to_network
    from visearch.models.nets.vit_dinov2 import DinoV2ViT, load_dinov2
    from visearch.models.nets.vit_dinov2 import random_state as vit_state

    torch.set_num_threads(2)
    net = load_dinov2(vit_file)
    proj = torch.from_numpy(projection())
    with torch.inference_mode():
        for i, bgr in enumerate(make_images()):
            if i == LOCAL_IMAGES[-1]:  # 899 patches: checked through its local records (saves a large forward)
                continue
            cls, patches = net.forward_features(to_network(resize_to_patches(bgr)))
            np.testing.assert_allclose(cls[0].numpy(), golden[f"cls{i}"], rtol=0, atol=1e-5)
            if f"patch{i}" in golden:
                assert np.abs(patches[0].numpy() - golden[f"patch{i}"]).max() <= 1e-5
            else:
                assert np.abs(patches[0, :16].numpy() - golden[f"patch{i}_head"]).max() <= 1e-5
            # projections reach |100|: float32 sums of that size differ by ~1e-4 between CPUs (AVX2 / AVX-512)
            np.testing.assert_allclose((patches[0] @ proj).numpy(), golden[f"patch{i}_proj"], rtol=1e-5, atol=1e-4)
        # the training size 518 x 518: positional embedding used as is (one block: the same code, a cheaper test)
        one = DinoV2ViT(depth=1)
        one.load_state_dict(vit_state(BACKBONE_SEED + 1, depth=1), strict=True)
        x = torch.from_numpy(np.random.RandomState(5).standard_normal((1, 3, 518, 518)).astype(np.float32))
        cls, patches = one.forward_features(x)
        np.testing.assert_allclose(cls[0].numpy(), golden["x518_cls"], rtol=0, atol=1e-5)
        np.testing.assert_allclose((patches[0] @ proj).numpy(), golden["x518_proj"], rtol=1e-5, atol=1e-4)


def test_strict_loading_refuses_other_files(vit_file: Path, tmp_path: Path) -> None:
    from tests.helpers_ckpt import make_cvnet_checkpoint
    from visearch.models.nets.vit_dinov2 import DinoV2ViT, load_dinov2
    from visearch.models.nets.vit_dinov2 import random_state as vit_state

    with torch.device("meta"):
        keys = DinoV2ViT().state_dict()
    state = torch.load(vit_file, weights_only=True)
    assert list(state) == list(keys) and len(state) == 176  # the official key set and order, no prefix
    assert tuple(state["pos_embed"].shape) == (1, 1370, 768) and tuple(state["register_tokens"].shape) == (1, 4, 768)
    assert sum(v.numel() for v in state.values()) == 86_583_552
    r101 = make_cvnet_checkpoint(tmp_path / "CVPR2022_CVNet_R101.pyth", 101, 0, reranker_keys=False)
    with pytest.raises(WeightsError, match=f"{r101}.*CVNet"):
        load_dinov2(r101)
    r101.unlink()
    vits = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(vit_state(0, depth=1, dim=384), vits)  # ViT-S/14 width (one block keeps the file small)
    with pytest.raises(WeightsError, match=f"{vits}.*ViT-S/14"):
        load_dinov2(vits)
    noreg = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save({k: v for k, v in state.items() if k != "register_tokens"}, noreg)
    with pytest.raises(WeightsError, match=f"{noreg}.*without registers"):
        load_dinov2(noreg)
    noreg.unlink()


# ---- local records --------------------------------------------------------------------------------------------------
def _same_up_to_ties(ours: np.ndarray, ref: np.ndarray, weights: np.ndarray, atol: float) -> None:
    """Rows equal within atol, where rows of tied weights may come in any order (compared as sets)."""
    i = 0
    while i < len(weights):
        j = i + 1
        while j < len(weights) and abs(weights[j] - weights[i]) <= 1e-6:
            j += 1
        a, b = ours[i:j], ref[i:j]
        if j - i == 1:
            np.testing.assert_allclose(a, b, rtol=0, atol=atol)
        else:
            a, b = a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]
            np.testing.assert_allclose(a, b, rtol=0, atol=atol)
        i = j


def test_local_records_match_reference(describer, golden) -> None:
    images = make_images()
    recs = describer.describe_local([images[i][:, :, ::-1] for i in LOCAL_IMAGES])  # our API takes RGB
    proj = projection()
    for rec, i in zip(recs, LOCAL_IMAGES):
        meta = golden[f"local{i}_meta"]
        ref_mask = meta[:, 3] == 1
        np.testing.assert_array_equal(rec["mask"], ref_mask)
        valid = ~rec["mask"]
        n = int(valid.sum())
        assert n == min(700, int(np.prod([round(s / 14) for s in SIZES[i]]))), (i, n)
        np.testing.assert_allclose(rec["weights"], meta[:, 4], rtol=0, atol=1e-5)
        assert np.all(np.diff(rec["weights"][valid]) <= 0)
        assert np.all(rec["scales"] == 0) and np.all(meta[:, 2] == 0)
        ours = np.concatenate([rec["positions"], rec["descriptors"] @ proj], 1)[valid]
        ref = np.concatenate([meta[:, :2], golden[f"local{i}_desc_proj"]], 1)[valid]
        _same_up_to_ties(ours, ref, meta[valid, 4], 1e-4)
        _same_up_to_ties(rec["descriptors"][:48], golden[f"local{i}_desc_head"], meta[:48, 4], 1e-4)
        assert not rec["descriptors"][~valid].any() and not rec["positions"][~valid].any()
    feats = describer.extract([images[i][:, :, ::-1].copy() for i in LOCAL_IMAGES])
    for j, i in enumerate(LOCAL_IMAGES):  # the CLS global stage is the reference's `dinov2_cls`
        np.testing.assert_allclose(feats.global_[j], golden[f"local{i}_cls"], rtol=0, atol=1e-5)
    assert feats.local["tokens"].shape == (3, 700, 16) and feats.local["tokens"].dtype == np.uint8


# ---- AMES transformer on 768-d descriptors --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["float", "dist"])
def test_ames_768_logits_and_rerank_match_reference(variant: str, tmp_path: Path, golden) -> None:
    state, p = make_pairs(variant)
    path = tmp_path / f"dinov2_ames_{variant}.pt"
    torch.save({"state": state}, path)
    model = AMES.from_checkpoint(path, variant, local_dim=DIM)
    assert model.precision == "fp32"
    logits = model.score(p["q"], p["qm"], p["d"], p["dm"])
    np.testing.assert_allclose(logits, golden[f"{variant}_logits"], rtol=0, atol=1e-4)
    sims, ids = make_rerank_case()
    lam, gamma = LAM_GAMMA[variant]
    ranks = rerank(sims, ids, np.tile(logits[None], (3, 1)), lam, gamma, B)
    np.testing.assert_array_equal(ranks, golden[f"{variant}_ranks"])
    # a CVNet (1024-d) checkpoint is refused by the 768-d model, with what it is
    cv = tmp_path / "cvnet_ames.pt"
    torch.save({"state": random_state(variant, 1)}, cv)
    with pytest.raises(WeightsError, match="CVNet"):
        AMES.from_checkpoint(cv, variant, local_dim=DIM)


def test_configs_hold_published_values() -> None:
    from visearch.config import load_model_config

    for name, variant in (("ames-dinov2", "float"), ("ames-dinov2-dist", "dist")):
        cfg = load_model_config(name)
        rr = cfg["rerank"]
        assert (rr["lam"], rr["gamma"]) == LAM_GAMMA[variant] and rr["variant"] == variant
        assert (rr["local_dim"], rr["query_len"], cfg["local"]["topk"]) == (768, 600, 700)
        assert cfg["describe"]["global_stage"] == "superglobal" and cfg["weights"]["global_backbone"].endswith("R101.pyth")


def test_dinov2_global_pooling() -> None:
    """`dinov2`: the normalised CLS token, or GeM over the patch tokens then L2 (one block keeps it cheap)."""
    import torch.nn.functional as F

    from visearch.models.dinov2 import DEFAULT_DESCRIBE, DinoV2Backbone, DinoV2Global, resize_to_patches, to_network
    from visearch.models.nets.vit_dinov2 import DinoV2ViT
    from visearch.models.nets.vit_dinov2 import random_state as vit_state

    net = DinoV2ViT(depth=1)
    net.load_state_dict(vit_state(3, depth=1), strict=True)
    bb = DinoV2Backbone(net=net, device=torch.device("cpu"))
    images = make_images()[:2]
    rgb = [im[:, :, ::-1].copy() for im in images]
    with torch.inference_mode():
        ref = [net.forward_features(to_network(resize_to_patches(im))) for im in images]
    for pooling in ("cls", "gem"):
        cfg = {"describe": {**DEFAULT_DESCRIBE, "pooling": pooling}}
        g = DinoV2Global(name="dinov2", dim=768, config=cfg, device=torch.device("cpu"), backbone=bb).extract(rgb)
        assert g.global_.shape == (2, 768) and g.global_.dtype == np.float32 and g.local is None
        for j, (cls, patches) in enumerate(ref):
            want = cls[0] if pooling == "cls" else patches[0].clamp(min=1e-6).pow(3.0).mean(0).pow(1 / 3.0)
            np.testing.assert_allclose(g.global_[j], F.normalize(want, dim=0).numpy(), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="pooling"):
        DinoV2Global(name="dinov2", dim=768, config={"describe": {**DEFAULT_DESCRIBE, "pooling": "mean"}},
                     backbone=bb)
