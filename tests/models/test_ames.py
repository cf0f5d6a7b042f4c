"""AMES describer (visearch/models/ames.py): local-feature parity with the reference extraction, stored fields,
one-pass extraction, strict weights.

tests/data/ames_local.npz was produced by running the reference extraction (github.com/pavelsuma/ames @ c6af26e,
extract/extract_cvnet.py extract_local_feature with its DataSet, ResNet and SpatialAttention2d; `.cuda()` shimmed to
a no-op, CPU) outside this repository on the two seeded images and random official-format checkpoints built below.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visearch.errors import WeightsError
from visearch.models.nets.ames_transformer import random_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers_ckpt import make_cvnet_checkpoint  # noqa: E402
from ties import align_within_ties  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"
BACKBONE_SEED, DETECTOR_SEED = 5, 6
TOPK = 700
WEIGHT_TOL = 1e-5  # detector weights: parity tolerance, and the width of a tie between consecutive features
N_DESC = 48  # descriptor rows kept in the golden file (all rows are checked through a projection)


def make_images() -> list[np.ndarray]:
    """Two small seeded BGR uint8 images (smooth blobs + noise, so features differ across positions)."""
    rs = np.random.RandomState(3)
    out = []
    for h, w in [(120, 160), (200, 96)]:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        im = np.zeros((h, w, 3))
        for _ in range(6):
            cy, cx, r = rs.uniform(0, h), rs.uniform(0, w), rs.uniform(8, 40)
            im += rs.uniform(-120, 120, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        im += 128 + rs.normal(0, 12, (h, w, 3))
        out.append(np.clip(np.round(im), 0, 255).astype(np.uint8))
    return out


def detector_state(seed: int) -> dict[str, torch.Tensor]:
    """A random AMES CVNet detector state_dict (official keys), deterministic in `seed`."""
    rs = np.random.RandomState(seed)
    c = 1024

    def f(*shape: int, scale: float = 1.0, loc: float = 0.0) -> torch.Tensor:
        return torch.from_numpy((loc + scale * rs.standard_normal(shape)).astype(np.float32))

    return {"conv1.weight": f(c, c, 1, 1, scale=1 / 32), "conv1.bias": f(c, scale=0.1),
            "bn.weight": f(c, scale=0.1, loc=1.0), "bn.bias": f(c, scale=0.1), "bn.running_mean": f(c, scale=0.1),
            "bn.running_var": torch.from_numpy((1 + 0.2 * np.abs(rs.standard_normal(c))).astype(np.float32)),
            "bn.num_batches_tracked": torch.tensor(100), "conv2.weight": f(1, c, 1, 1, scale=1 / 32),
            "conv2.bias": f(1, scale=0.1)}


def make_weights_dir(path: Path, depth: int = 101) -> Path:
    """A weights folder with random files under the official names (backbone R`depth`, detector, both AMES, and the
    ITQ projection a user downloads with them: loading must not trip over it)."""
    path.mkdir(parents=True, exist_ok=True)
    make_cvnet_checkpoint(path / "CVPR2022_CVNet_R101.pyth", depth, BACKBONE_SEED, reranker_keys=False)
    torch.save({"state": detector_state(DETECTOR_SEED)}, path / "cvnet_detector.pt")
    torch.save({"state": random_state("float", 21)}, path / "r101_cvnet_ames.pt")
    dist = random_state("dist", 22)
    torch.save({"state": dist}, path / "cvnet_ames_dist.pt")
    np.savez(path / "itq_r101_cvnet_D128.npz", proj=dist["remap_local.0.W"].numpy())
    return path


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_weights_dir(tmp_path_factory.mktemp("ames_weights"))


@pytest.fixture(scope="module")
def describer(weights_dir: Path):
    from visearch.registry import load_model

    torch.set_num_threads(2)
    return load_model("ames-dist", weights_dir=weights_dir, device="cpu")


@pytest.fixture(scope="module")
def small_rgb() -> np.ndarray:
    return np.ascontiguousarray(make_images()[1][40:104, 10:58, ::-1])  # 64 x 48 crop, RGB


def test_local_features_match_reference(describer) -> None:
    with np.load(DATA / "ames_local.npz") as z:
        g = dict(z)
    images = make_images()
    np.testing.assert_array_equal(images[0][:2, :3, 0], g["probe"])
    locs = describer.describe_local([im[:, :, ::-1] for im in images])  # our API takes RGB
    proj = np.random.RandomState(9).standard_normal((1024, 8)).astype(np.float32)
    for i, loc in enumerate(locs):
        assert loc["descriptors"].shape == (TOPK, 1024) and loc["mask"].dtype == bool
        np.testing.assert_array_equal(loc["mask"], g[f"mask{i}"])
        valid = ~loc["mask"]
        assert 0 < valid.sum() < TOPK  # small images: some padding, so no tie straddles the top-k cut
        # sorted weights compare elementwise whatever the order of tied features
        np.testing.assert_allclose(loc["weights"], g[f"weights{i}"], rtol=0, atol=WEIGHT_TOL)
        assert np.all(np.diff(loc["weights"][valid]) <= 0)  # sorted by weight
        # features whose weights tie within the tolerance may come in either order (CPU-dependent rounding): align
        # ours to the reference inside each tied group, by identity (scale, position), then compare row by row
        nv = int(valid.sum())
        perm = align_within_ties(_keys(g[f"scales{i}"], g[f"positions{i}"], nv),
                                 _keys(loc["scales"], loc["positions"], nv), g[f"weights{i}"][:nv], WEIGHT_TOL)
        perm = np.concatenate([perm, np.arange(nv, TOPK)])  # padding rows stay where they are
        np.testing.assert_array_equal(loc["scales"][perm][valid], g[f"scales{i}"][valid])
        np.testing.assert_array_equal(loc["positions"][perm], g[f"positions{i}"])
        np.testing.assert_allclose(loc["descriptors"][perm][:N_DESC], g[f"desc{i}"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(loc["descriptors"][perm] @ proj, g[f"descproj{i}"], rtol=0, atol=1e-4)
        assert np.all(loc["descriptors"][~valid] == 0)


def _keys(scales: np.ndarray, positions: np.ndarray, n: int) -> list[tuple[int, float, float]]:
    """Identity of each of the first n local features: (scale index, y, x)."""
    return [(int(a), float(b[0]), float(b[1])) for a, b in zip(scales[:n], positions[:n])]


def test_tied_local_features_may_come_in_either_order() -> None:
    """The AVX-512 failure of issue 10: two features whose weights tie to ~1e-7 swapped. The comparison above
    accepts exactly that swap, and still refuses a swap of features whose weights differ by more than the tolerance."""
    with np.load(DATA / "ames_local.npz") as z:
        w, sc, pos = z["weights0"], z["scales0"], z["positions0"]
        n = int((~z["mask0"]).sum())
    keys = _keys(sc, pos, n)
    gaps = np.diff(w[:n])
    j = int(np.argmin(np.abs(gaps)))  # the closest pair of the golden: make it a tie of 1e-7 and swap it
    tied = w[:n].copy()
    tied[j + 1] = tied[j] - 1e-7
    swapped = keys[:j] + [keys[j + 1], keys[j]] + keys[j + 2:]
    perm = align_within_ties(keys, swapped, tied, WEIGHT_TOL)
    assert [swapped[p] for p in perm] == keys
    far = int(np.argmax(np.abs(gaps)))  # a pair far apart: a swap there is a real difference
    swapped = keys[:far] + [keys[far + 1], keys[far]] + keys[far + 2:]
    with pytest.raises(AssertionError, match="differ"):
        align_within_ties(keys, swapped, w[:n], WEIGHT_TOL)


def test_extract_fields_and_one_pass(describer, small_rgb: np.ndarray) -> None:
    feats = describer.extract([small_rgb])
    assert feats.global_.shape == (1, 2048) and feats.global_.dtype == np.float32
    assert abs(float(np.linalg.norm(feats.global_[0])) - 1.0) < 1e-5
    assert set(feats.local) == set(describer.local_fields) == {"tokens", "mask"}
    for name, spec in describer.local_fields.items():
        assert feats.local[name].shape == (1, *spec.shape) and feats.local[name].dtype == np.dtype(spec.dtype)
    assert describer.local_fields["tokens"].shape == (TOPK, 16)
    loc = describer.describe_local([small_rgb])[0]
    np.testing.assert_array_equal(feats.local["mask"][0], loc["mask"])
    np.testing.assert_array_equal(feats.local["tokens"],
                                  describer.ames.encode(loc["descriptors"][None], loc["mask"][None], database=True))
    # one set of weights, two activations: the plain-ReLU local path differs from the ReLU+ global one
    net_l, net_g = describer.local_net, describer.global_model.net
    assert net_l.s3.b23.f.c.weight.data_ptr() == net_g.s3.b23.f.c.weight.data_ptr()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert not torch.allclose(net_l.forward_s3_preact(x), net_g.forward_s3_preact(x))


def test_float_variant_fields(describer, weights_dir: Path, small_rgb: np.ndarray) -> None:
    import dataclasses

    from visearch.models.nets.ames_transformer import AMES

    ames = AMES.from_checkpoint(weights_dir / "r101_cvnet_ames.pt", "float")
    d = dataclasses.replace(describer, ames=ames)
    db = d.extract([small_rgb]).local["tokens"]
    q = d.extract_query([small_rgb]).local["tokens"]
    assert db.dtype == np.float16 and db.shape == (1, TOPK, 128) and q.dtype == np.float32
    np.testing.assert_array_equal(q.astype(np.float16), db)


def test_weights_errors(tmp_path: Path, weights_dir: Path) -> None:
    from visearch.registry import load_model

    with pytest.raises(WeightsError, match="visearch weights download ames-dist"):
        load_model("ames", weights_dir=tmp_path, device="cpu")
    r50 = make_cvnet_checkpoint(tmp_path / "r50.pyth", 50, 0, reranker_keys=False)
    with pytest.raises(WeightsError, match="R50"):
        load_model("ames", weights=r50, weights_dir=weights_dir, device="cpu")
