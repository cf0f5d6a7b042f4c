"""`spatial`: weight-free spatial verification of a global shortlist with RootSIFT (visearch.models.sift).

For each query crop and each of its first k global candidates:
0. k, the depth verified, follows a fixed matching budget: a crop with the full `keypoints` (the [local]
   max_keypoints, 900) verifies `shortlist` candidates (100), a crop with n < keypoints verifies
   k = min(max_shortlist, shortlist * keypoints / n), since matching costs n x (candidates' keypoints). Small object
   crops, whose positives the global stage ranks lowest, are searched deeper at no more cost than a full crop;
1. tentative matches: each query keypoint's nearest database keypoint by RootSIFT (cosine on the unit vectors), kept
   when it passes Lowe's ratio test (distance to the nearest < `ratio` x distance to the second nearest) and, with
   `mutual`, when the query keypoint is also the database keypoint's nearest;
2. geometric verification: OpenCV USAC with MAGSAC++ scoring (`model` "affine" or "homography"; reprojection
   `threshold` in pixels of the capped images, a fixed `seed`, `max_iters`, `confidence`), giving the inlier count;
3. fused score (documented in README and configs/models/lite-sv.toml):
       score = g + weight * min(n, cap) / cap,  n = inliers if inliers >= min_inliers else 0,
   g the global cosine similarity. Each inlier adds weight / cap (0.04 by default: 25 inliers add 1.0); among
   candidates without `min_inliers` inliers (and among those past `cap`) the global order decides.
Deterministic: each pair's RANSAC starts from the same seed, whatever the order or the number of threads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config.schema import SpatialRerank
from ..errors import ModelError, UsageError
from ..models.sift import unpack_rootsift
from .base import Reranker, Shortlist

# the defaults live in the config schema (one place); `name` is not a setting of the reranker itself
DEFAULTS: dict[str, Any] = {k: v for k, v in dataclasses.asdict(SpatialRerank()).items() if k != "name"}
MODELS = ("affine", "homography")
PAD = -np.full(128, 1 / np.sqrt(128), np.float32)  # stands in for padding keypoints: negative cosine with any RootSIFT


def fused_scores(global_sims: np.ndarray, inliers: np.ndarray, weight: float, cap: int, min_inliers: int) -> np.ndarray:
    """`g + weight * min(n, cap) / cap` with `n = inliers` where `inliers >= min_inliers`, else 0 (float64)."""
    n = np.asarray(inliers, np.float64)
    n = np.where(n >= min_inliers, np.minimum(n, cap), 0.0)
    return np.asarray(global_sims, np.float64) + weight * n / float(cap)


def unpack_local(kp_desc: np.ndarray, kp_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image's stored fields -> (RootSIFT `[n, 128]` float32, xy `[n, 2]` float32) without the padding rows."""
    xy = np.asarray(kp_xy, np.float32)
    valid = ~np.isnan(xy[:, 0])
    return unpack_rootsift(np.asarray(kp_desc)[valid]), xy[valid]


@dataclass(kw_only=True)
class SpatialReranker(Reranker):
    """RootSIFT matching + USAC MAGSAC++ verification of the first `shortlist_size` candidates (see module doc)."""

    name = "spatial"

    # no defaults here: from_config fills every field from the schema's SpatialRerank (one place for the numbers)
    shortlist: int
    max_shortlist: int
    keypoints: int
    ratio: float
    mutual: bool
    model: str
    threshold: float
    confidence: float
    max_iters: int
    seed: int
    min_matches: int
    min_inliers: int
    cap: int
    weight: float
    batch: int

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise UsageError(f"unknown spatial model {self.model!r}", f"use one of {', '.join(MODELS)}")
        if not (0 < self.ratio <= 1) or self.cap < 1 or self.threshold <= 0 or self.shortlist < 0 or self.keypoints < 1:
            raise UsageError("bad [rerank] settings for spatial",
                             "need 0 < ratio <= 1, cap >= 1, threshold > 0, shortlist >= 0")
        self.max_shortlist = max(self.max_shortlist, self.shortlist)
        self.shortlist_size = self.max_shortlist  # the most it reorders (RerankerProtocol)
        self.min_matches = max(int(self.min_matches), 3 if self.model == "affine" else 4)

    # ---- matching ---------------------------------------------------------------------------------------------------
    def matches(self, q_desc: np.ndarray, db_desc: np.ndarray, db_valid: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tentative matches of one query `[nq, 128]` against B database images `[B, K, 128]` (valid `[B, K]`):
        per image (query indices, database indices)."""
        import torch

        B, K = db_desc.shape[:2]
        nq = len(q_desc)
        if nq == 0 or K == 0 or B == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(B)]
        q = torch.from_numpy(np.ascontiguousarray(q_desc, np.float32))
        d = torch.from_numpy(np.ascontiguousarray(db_desc, np.float32)).reshape(B * K, -1)
        pad = ~torch.from_numpy(np.ascontiguousarray(db_valid, bool)).reshape(-1)
        if pad.any():
            d = d.clone()
            d[pad] = torch.from_numpy(PAD)
        # one [nq, B*K] product: on CPU a single GEMM runs about twice as fast as B batched ones. RootSIFT vectors are
        # non-negative, so real similarities are >= 0 and padding rows (PAD) score < 0: never a nearest neighbour.
        sim = torch.mm(q, d.T).view(nq, B, K)
        s1, nn1 = sim.max(dim=2)  # [nq, B]: each query keypoint's nearest database keypoint per image
        ok = (s1 >= 0.0) & (q.abs().sum(dim=1) > 0)[:, None]  # an all-zero query row ties with padding: no match
        if self.mutual:  # the query keypoint is its nearest neighbour's nearest too (value-only reductions are fast)
            best_back = sim.amax(dim=0)  # [B, K]
            ok &= best_back.gather(1, nn1.T).T == s1
        if K >= 2 and self.ratio < 1:
            # Lowe's ratio test on distances (unit vectors: squared distance 2 - 2 cos), only where still needed
            qi, bi = ok.nonzero(as_tuple=True)
            rest = sim[qi, bi]  # [n, K] copies of the surviving rows
            rest.scatter_(1, nn1[qi, bi][:, None], -4.0)
            d1 = (2.0 - 2.0 * s1[qi, bi]).clamp_min(0)
            d2 = (2.0 - 2.0 * rest.amax(dim=1)).clamp_min(0)
            fail = d1 >= (self.ratio ** 2) * d2
            ok[qi[fail], bi[fail]] = False
        ok_np, nn_np = ok.T.numpy(), nn1.T.numpy()
        out = []
        for b in range(B):
            qi = np.nonzero(ok_np[b])[0]
            out.append((qi, nn_np[b, qi].astype(np.int64)))
        return out

    # ---- verification -----------------------------------------------------------------------------------------------
    def _params(self):
        import cv2

        p = cv2.UsacParams()
        p.confidence = float(self.confidence)
        p.maxIterations = int(self.max_iters)
        p.threshold = float(self.threshold)
        p.randomGeneratorState = int(self.seed)
        p.isParallel = False
        p.sampler = cv2.SAMPLING_UNIFORM
        p.score = cv2.SCORE_METHOD_MAGSAC
        p.loMethod = cv2.LOCAL_OPTIM_SIGMA
        p.loIterations = 10
        p.loSampleSize = 14 if self.model == "affine" else 28
        p.final_polisher = cv2.MAGSAC
        p.final_polisher_iterations = 10
        return p

    def inliers(self, src: np.ndarray, dst: np.ndarray) -> int:
        """Inlier count of the robust model fitted to matched points `[n, 2]` (0 when too few matches or no model)."""
        import cv2

        if len(src) < self.min_matches:
            return 0
        src = np.ascontiguousarray(src, np.float32).reshape(-1, 1, 2)
        dst = np.ascontiguousarray(dst, np.float32).reshape(-1, 1, 2)
        try:
            if self.model == "affine":
                model, mask = cv2.estimateAffine2D(src, dst, params=self._params())
            else:
                model, mask = cv2.findHomography(src, dst, params=self._params())
        except cv2.error:
            return 0
        if model is None or mask is None:
            return 0
        return int(np.count_nonzero(mask))

    def verify(self, q_desc: np.ndarray, q_xy: np.ndarray, kp_desc: np.ndarray, kp_xy: np.ndarray) -> np.ndarray:
        """Inlier counts `[B]` of one query (RootSIFT `[nq, 128]`, xy `[nq, 2]`) against B stored images
        (`kp_desc` `[B, K, 64]` packed, `kp_xy` `[B, K, 2]` float16 with NaN padding)."""
        import cv2

        cv2.setNumThreads(1)  # USAC runs single-threaded per pair (isParallel = False) and gives the same answer
        B = len(kp_desc)
        out = np.zeros(B, np.int64)
        for a in range(0, B, max(1, self.batch)):
            b = min(B, a + max(1, self.batch))
            xy = np.asarray(kp_xy[a:b], np.float32)
            valid = ~np.isnan(xy[..., 0])
            desc = unpack_rootsift(kp_desc[a:b])
            for j, (qi, di) in enumerate(self.matches(q_desc, desc, valid)):
                if len(qi) >= self.min_matches:
                    out[a + j] = self.inliers(q_xy[qi], xy[j, di])
        return out

    def depth(self, n_keypoints: int) -> int:
        """Candidates verified for a query crop with `n_keypoints` keypoints (the matching budget, module doc)."""
        if n_keypoints >= self.keypoints:
            return self.shortlist
        if n_keypoints == 0:  # nothing to match: the global order stands
            return 0
        return min(self.max_shortlist, self.shortlist * self.keypoints // n_keypoints)

    # ---- reranking --------------------------------------------------------------------------------------------------
    def rerank(self, query_global: np.ndarray, query_local: dict[str, np.ndarray] | None,
               shortlist: Shortlist, store: Any) -> Shortlist:
        """Shortlist reordered: first k by the fused score (in `scores`; `sims` keep the global cosines of the
        reordered rows), the rest as given."""
        rows = np.asarray(shortlist.rows)
        sims = np.asarray(shortlist.sims, np.float32)
        new_rows, new_sims, new_scores = rows.copy(), sims.copy(), sims.copy()
        if min(self.max_shortlist, rows.shape[1]) == 0:
            return Shortlist(rows=new_rows, sims=new_sims, scores=new_scores)
        if query_local is None or "kp_desc" not in query_local or "kp_xy" not in query_local:
            raise ModelError("spatial reranking needs the query's RootSIFT fields 'kp_desc' and 'kp_xy'",
                             "use a model whose config has [local] kind = \"rootsift\" (e.g. lite-sv)")
        if not {"kp_desc", "kp_xy"} <= set(store.local_fields):
            raise ModelError("the store has no RootSIFT local fields",
                             "extract the collection with a model whose config has [local] kind = \"rootsift\"")
        for i in range(rows.shape[0]):
            q_desc, q_xy = unpack_local(query_local["kp_desc"][i], query_local["kp_xy"][i])
            k = min(self.depth(len(q_desc)), rows.shape[1])
            if k == 0:
                continue
            local = store.read_local(rows[i, :k])
            inl = self.verify(q_desc, q_xy, local["kp_desc"], local["kp_xy"])
            s = fused_scores(sims[i, :k], inl, self.weight, self.cap, self.min_inliers)
            order = np.argsort(-s, kind="stable")
            new_rows[i, :k] = rows[i, :k][order]
            new_sims[i, :k] = sims[i, :k][order]
            new_scores[i, :k] = s[order].astype(np.float32)
        return Shortlist(rows=new_rows, sims=new_sims, scores=new_scores)


def from_config(rr: dict[str, Any], keypoints: int | None = None) -> SpatialReranker:
    """`rr`: the [rerank] table; `keypoints`: the [local] max_keypoints of the model (the full query size)."""
    c = {**DEFAULTS, **{k: v for k, v in rr.items() if k != "name"}}
    unknown = sorted(set(c) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"unknown [rerank] keys for spatial: {', '.join(unknown)}", f"known: {', '.join(DEFAULTS)}")
    from ..config.schema import SiftLocal

    return SpatialReranker(shortlist=int(c["shortlist"]), max_shortlist=int(c["max_shortlist"]),
                           keypoints=int(keypoints or SiftLocal().max_keypoints), ratio=float(c["ratio"]),
                           mutual=bool(c["mutual"]), model=str(c["model"]), threshold=float(c["threshold"]),
                           confidence=float(c["confidence"]), max_iters=int(c["max_iters"]), seed=int(c["seed"]),
                           min_matches=int(c["min_matches"]), min_inliers=int(c["min_inliers"]), cap=int(c["cap"]),
                           weight=float(c["weight"]), batch=int(c["batch"]))


def build(config: dict[str, Any], weights_dir: Any, device: Any) -> SpatialReranker:
    """Registry factory: SpatialReranker from config `[rerank]` (weight-free; weights_dir and device unused)."""
    if config.get("local", {}).get("kind") != "rootsift":
        raise UsageError(f"model {config.get('name')!r} uses the spatial reranker without RootSIFT local features",
                         "add [local] kind = \"rootsift\" to its config")
    return from_config(config.get("rerank", {}), config["local"].get("max_keypoints"))
