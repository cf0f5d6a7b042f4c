"""AMES transformer, storage encodings and reranking (visearch/rerankers/ames.py).

Goldens in tests/data/ames_transformer.npz and ames_rerank.npz were produced by running the reference code
(github.com/pavelsuma/ames @ c6af26e, src/models/matcher.py AMES(...) in eval mode, and src/utils/metrics.py rerank
with stub loaders) outside this repository on exactly the inputs built below (seeded numpy, random official-format
checkpoints from `random_state(variant, seed)`). Inputs are drawn away from ITQ sign and fp16 rounding edges, where
float32 noise could flip a bit (see shared/reference/ames.md).
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ties import assert_order_up_to_ties
from visearch.errors import WeightsError
from visearch.models.nets.ames_transformer import AMES, PACKED_BYTES, pack_signs, random_state, unpack_signs
from visearch.rerankers.ames import AMESReranker, combined_scores, rerank
from visearch.rerankers.base import Shortlist

DATA = Path(__file__).resolve().parent.parent / "data"
WEIGHT_SEED = {"float": 11, "dist": 12}
B, LQ, LD = 8, 40, 24
# valid tokens per pair (query, database): full, 1-3 valid tokens, and random counts
VALID = [(LQ, LD), (1, LD), (LQ, 2), (3, 1), (17, 9), (29, 24), (2, 3), (40, 13)]


def _away_from_edges(variant: str, state: dict[str, torch.Tensor], rows: np.ndarray, database: bool) -> np.ndarray:
    """Bool [n]: rows whose stored encoding is not within float32 noise of a sign / fp16 rounding boundary."""
    x = rows.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if variant == "dist":
        proj = x @ state["remap_local.0.W"].double().numpy()
        return np.abs(proj).min(1) > 1e-3
    if not database:  # float queries are not rounded
        return np.ones(len(rows), bool)
    h = x @ state["remap_local.0.weight"].double().numpy().T + state["remap_local.0.bias"].double().numpy()
    h = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
    t = h * state["remap_local.1.weight"].double().numpy() + state["remap_local.1.bias"].double().numpy()
    lo = t.astype(np.float16).astype(np.float64)
    ulp = np.spacing(np.abs(t.astype(np.float16))).astype(np.float64)
    frac = np.abs(t - lo) / ulp  # 0.5 = exactly between two fp16 values
    return np.abs(frac - 0.5).min(1) > 2e-3


def make_descriptors(variant: str, state: dict[str, torch.Tensor], n: int, length: int, rs: np.random.RandomState,
                     database: bool) -> np.ndarray:
    """float32 [n, length, 1024] random descriptors, each row away from encoding edges."""
    out = rs.standard_normal((n, length, 1024)).astype(np.float32)
    flat = out.reshape(-1, 1024)
    for _ in range(50):
        bad = ~_away_from_edges(variant, state, flat, database)
        if not bad.any():
            return out
        flat[bad] = rs.standard_normal((int(bad.sum()), 1024)).astype(np.float32)
    raise AssertionError("could not draw descriptors away from edges")


@functools.lru_cache(maxsize=None)
def make_pairs(variant: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Random weights and B pairs with padding; padding rows hold large finite garbage."""
    state = random_state(variant, WEIGHT_SEED[variant])
    rs = np.random.RandomState(100 + WEIGHT_SEED[variant])
    q = make_descriptors(variant, state, B, LQ, rs, database=False)
    d = make_descriptors(variant, state, B, LD, rs, database=True)
    qm = np.ones((B, LQ), bool)
    dm = np.ones((B, LD), bool)
    for i, (nq, nd) in enumerate(VALID):
        qm[i, :nq] = False
        dm[i, :nd] = False
    qm[5] = rs.rand(LQ) < 0.3  # scattered padding, not only a suffix
    qm[5, 0] = False
    q[qm] = 1e3 * rs.standard_normal((int(qm.sum()), 1024)).astype(np.float32)
    d[dm] = 1e3 * rs.standard_normal((int(dm.sum()), 1024)).astype(np.float32)
    return state, {"q": q, "qm": qm, "d": d, "dm": dm}


@functools.lru_cache(maxsize=None)
def _cached_model(variant: str) -> AMES:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"ames_{variant}.pt"
        torch.save({"state": random_state(variant, WEIGHT_SEED[variant])}, path)
        return AMES.from_checkpoint(path, variant)


def _model(variant: str, tmp_path: Path) -> AMES:
    """The model loaded through from_checkpoint from an official-format file (built once per variant)."""
    return _cached_model(variant)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA / "ames_transformer.npz") as z:
        return dict(z)


@pytest.mark.parametrize("variant", ["float", "dist"])
def test_logits_match_reference(variant: str, tmp_path: Path, golden: dict[str, np.ndarray]) -> None:
    model = _model(variant, tmp_path)
    _, p = make_pairs(variant)
    np.testing.assert_allclose(p["q"][0, :2, :4], golden[f"{variant}_q_probe"], rtol=0, atol=0)
    logits = model.score(p["q"], p["qm"], p["d"], p["dm"])
    assert logits.dtype == np.float32 and logits.shape == (B,)
    ref = golden[f"{variant}_logits"]
    assert np.ptp(ref) > 0.5  # the random weights give a real spread of logits
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["float", "dist"])
def test_padding_content_is_ignored(variant: str, tmp_path: Path) -> None:
    model = _model(variant, tmp_path)
    _, p = make_pairs(variant)
    base = model.score(p["q"], p["qm"], p["d"], p["dm"])
    q, d = p["q"].copy(), p["d"].copy()
    q[p["qm"]] = np.nan
    d[p["dm"]] = np.inf
    nan_pad = model.score(torch.from_numpy(q), torch.from_numpy(p["qm"]), d, p["dm"])
    assert np.isfinite(nan_pad).all()
    np.testing.assert_allclose(nan_pad, base, rtol=0, atol=1e-5)
    # an all-padding database set still gives a finite logit (the match token is never masked)
    dm = p["dm"].copy()
    dm[0] = True
    assert np.isfinite(model.score(p["q"], p["qm"], p["d"], dm)).all()


@pytest.mark.parametrize("variant", ["float", "dist"])
def test_stored_tokens_give_same_logits(variant: str, tmp_path: Path) -> None:
    """Scoring from stored encodings (one query vs many, batched) equals scoring the descriptors pairwise."""
    model = _model(variant, tmp_path)
    _, p = make_pairs(variant)
    qi = 0
    q = np.repeat(p["q"][qi:qi + 1], B, 0)
    qm = np.repeat(p["qm"][qi:qi + 1], B, 0)
    pairwise = model.score(q, qm, p["d"], p["dm"])
    q_tok = model.encode(p["q"][qi:qi + 1], p["qm"][qi:qi + 1], database=False)[0]
    d_tok = model.encode(p["d"], p["dm"], database=True)
    if variant == "dist":
        assert d_tok.dtype == np.uint8 and d_tok.shape == (B, LD, PACKED_BYTES)
    else:
        assert d_tok.dtype == np.float16 and d_tok.shape == (B, LD, 128)
        assert q_tok.dtype == np.float32
    stored = model.score_tokens(q_tok, p["qm"][qi], d_tok, p["dm"], batch_size=3)
    np.testing.assert_allclose(stored, pairwise, rtol=0, atol=2e-5)


def test_sign_bits_roundtrip() -> None:
    x = torch.tensor([[0.5, -0.1, 0.0, -2.0] * 32])
    packed = pack_signs(x)
    assert packed.shape == (1, 16) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_signs(torch.from_numpy(packed)).numpy(), np.where(x.numpy() >= 0, 1.0, -1.0))


def test_checkpoint_errors(tmp_path: Path) -> None:
    state = random_state("dist", 0)
    good = tmp_path / "cvnet_ames_dist.pt"
    torch.save({"state": state}, good)
    with pytest.raises(WeightsError, match="dist checkpoint, but the float variant"):
        AMES.from_checkpoint(good, "float")
    bad = dict(state)
    bad["classifier.weight"] = torch.zeros(2, 128)
    torch.save({"state": bad}, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match=r"shape\.pt: classifier\.weight has shape \(2, 128\)"):
        AMES.from_checkpoint(tmp_path / "shape.pt", "dist")
    del bad["mtc_token"]
    bad["extra.weight"] = torch.zeros(1)
    torch.save({"state": bad}, tmp_path / "keys.pt")
    with pytest.raises(WeightsError, match="missing mtc_token; unexpected extra.weight"):
        AMES.from_checkpoint(tmp_path / "keys.pt", "dist")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        AMES.from_checkpoint(tmp_path / "junk.pt", "dist")


def test_rerank_matches_reference() -> None:
    with np.load(DATA / "ames_rerank.npz") as z:
        g = dict(z)
    for lam, gamma, key in [(0.85, 0.8, "float"), (0.65, 0.2, "dist")]:
        out = rerank(g["sims"], g["ids"], g["logits"], lam, gamma, int(g["k"]))
        k = int(g["k"])
        # the head's order is compared where the combined scores differ by more than float noise (numpy's exp is
        # vectorised differently per CPU); near-equal scores are a tied group, compared as a set
        score_of = [dict(zip(g["ids"][qi, :k], combined_scores(g["sims"][qi, :k], g["logits"][qi, :k], lam, gamma)))
                    for qi in range(len(out))]
        for qi in range(len(out)):
            ref = g[f"ranks_{key}"][qi]
            assert_order_up_to_ties(list(out[qi, :k]), list(ref[:k]), [score_of[qi][i] for i in ref[:k]], 1e-9)
        np.testing.assert_array_equal(out[:, k:], g[f"ranks_{key}"][:, k:])
        np.testing.assert_array_equal(out[:, k:], g["ids"][:, k:])  # the tail keeps the global order
        assert not np.array_equal(out[:, :k], g["ids"][:, :k])  # and the head really moved


def test_rerank_ties_are_stable() -> None:
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    ids = np.array([[7, 5, 3, 1]])
    logits = np.array([[0.0, 0.0, 0.0]])
    out = rerank(sims, ids, logits, lam=0.0, gamma=1.0, k=3)  # every combined score is 0.5
    np.testing.assert_array_equal(out, ids)
    out = rerank(sims, ids, np.array([[-5.0, 5.0, 5.0]]), lam=0.0, gamma=1.0, k=3)
    np.testing.assert_array_equal(out, [[5, 3, 7, 1]])


class _FakeStore:
    """In-memory stand-in for visearch.store.Store.read_local (the real store is tested by its own module)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray):
        self.tokens, self.mask = tokens, mask
        self.reads: list[np.ndarray] = []

    def read_local(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        self.reads.append(np.asarray(rows))
        return {"tokens": self.tokens[rows], "mask": self.mask[rows]}


def test_reranker_on_shortlist(tmp_path: Path) -> None:
    model = _model("dist", tmp_path)
    _, p = make_pairs("dist")
    store = _FakeStore(model.encode(p["d"], p["dm"], database=True), p["dm"])
    q_tok = model.encode(p["q"][:2], p["qm"][:2], database=False)
    rows = np.array([[3, 1, 0, 7, 2, 5], [6, 4, 2, 0, 1, 3]])
    sims = np.tile(np.linspace(0.9, 0.5, 6, dtype=np.float32), (2, 1))
    rr = AMESReranker(model, shortlist_size=4, query_len=600, db_len=50, lam=0.65, gamma=0.2, batch_size=3)
    out = rr.rerank(np.zeros((2, 4), np.float32), {"tokens": q_tok, "mask": p["qm"][:2]},
                    Shortlist(rows=rows, sims=sims), store)
    assert [len(r) for r in store.reads] == [4, 4]
    for i in range(2):
        q = np.repeat(p["q"][i:i + 1], 4, 0)
        qm = np.repeat(p["qm"][i:i + 1], 4, 0)
        lg = model.score(q, qm, p["d"][rows[i, :4]], p["dm"][rows[i, :4]])
        expect = rerank(sims[i:i + 1], rows[i:i + 1], lg[None], 0.65, 0.2, 4)[0]
        np.testing.assert_array_equal(out.rows[i], expect)
        s = combined_scores(sims[i, :4], lg, 0.65, 0.2)
        np.testing.assert_allclose(out.scores[i, :4], np.sort(s)[::-1], atol=1e-5)
        np.testing.assert_array_equal(out.scores[i, 4:], sims[i, 4:])
        # sims stay the global cosines, moved with their rows
        np.testing.assert_array_equal(out.sims[i], [sims[i][list(rows[i]).index(r)] for r in out.rows[i]])
