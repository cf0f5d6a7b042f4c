"""Random CVNet checkpoints in the official format (`{"model_state": {"encoder_q.…": tensor, "conv2ds.…", …}}`).

The weights come from numpy's PCG64 generator seeded with `seed`, drawn in a fixed key order, so the same
(depth, seed) gives the same file on every machine; golden arrays computed by the reference code on these
checkpoints can therefore be committed without the (100-200 MB) checkpoints themselves.

Scales are chosen so activations stay well-conditioned through 33/50 blocks: He-normal convs, BN with near-unit
statistics and a small gamma on the last BN of each block (as trained ResNets have).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visearch.models.nets.cvnet_resnet import CVNetResNet


def _draw(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    n = rng.standard_normal(shape, dtype=np.float32)
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.int64)
    if key.endswith(".p"):  # head.pool.p: CVNet's learned GeM exponent
        return torch.full((1,), 3.0)
    if key == "head.fc.weight":
        return torch.from_numpy(n / np.float32(np.sqrt(shape[1])))
    if key == "head.fc.bias":
        return torch.from_numpy(n * np.float32(0.01))
    if key.endswith(".weight") and len(shape) == 4:  # conv: He-normal on fan-in
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.from_numpy(n * np.float32(np.sqrt(2.0 / fan_in)))
    # batch norm
    final = "c_bn" in key or key.split(".")[-2] == "bn" and "stem" not in key
    if key.endswith(".weight"):
        return torch.from_numpy((np.float32(0.3) if final else np.float32(1.0)) + np.float32(0.1) * n)
    if key.endswith(".bias"):
        return torch.from_numpy(np.float32(0.05) * n)
    if key.endswith("running_mean"):
        return torch.from_numpy(np.float32(0.05) * n)
    if key.endswith("running_var"):
        return torch.from_numpy(np.float32(1.0) + np.float32(0.2) * np.abs(n))
    raise KeyError(key)


def cvnet_state(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """The backbone state_dict (no prefix) of a random CVNet R`depth`, deterministic in `seed`."""
    keys = CVNetResNet(depth).state_dict()
    rng = np.random.default_rng(seed)
    return {k: _draw(rng, k, tuple(v.shape)) for k, v in keys.items()}


def make_cvnet_checkpoint(path: str | Path, depth: int, seed: int = 0, reranker_keys: bool = True) -> Path:
    """Write a random official-format CVNet checkpoint to `path` and return it.

    Like the published files: a dict with `model_state` holding `encoder_q.`-prefixed backbone keys, plus (with
    `reranker_keys`) some of CVNet's own reranker tensors (`conv2ds.*`, `cv_learner.*`) which loaders must ignore."""
    path = Path(path)
    state = {f"encoder_q.{k}": v for k, v in cvnet_state(depth, seed).items()}
    if reranker_keys:
        g = torch.Generator().manual_seed(seed)
        for i in range(3):
            state[f"conv2ds.{i}.weight"] = torch.randn(256, 1024, 3, 3, generator=g) * 0.01
        state["cv_learner.encoder_layer4.0.conv1.weight"] = torch.randn(16, 9, 3, 3, 3, 3, generator=g)
        state["cv_learner.classification.0.weight"] = torch.randn(2, 64, generator=g)
    torch.save({"epoch": 10, "model_state": state, "cfg": f"MODEL:\n  DEPTH: {depth}\n"}, path)
    return path
