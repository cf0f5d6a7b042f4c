"""A weights folder holding random checkpoints under the published file names and in the published formats, for
end-to-end runs of the superglobal-r50 / superglobal-r101 / ames-dist / ames-float pipelines without real weights.

    from tests.published_weights import write_weights_dir
    wdir = write_weights_dir(tmp_path / "weights")    # every file below, deterministic in the seeds

  CVPR2022_CVNet_R50.pyth, CVPR2022_CVNet_R101.pyth   {"epoch", "model_state": {"encoder_q.<key>": ..., CVNet's
                                                      own reranker tensors}, "cfg"} (tests/helpers_ckpt.py)
  cvnet_detector.pt                                   {"state": AMES CVNet detector (conv1, bn, conv2)}
  r101_cvnet_ames.pt, cvnet_ames_dist.pt              {"state": AMES transformer (visearch.rerankers.ames)}
  itq_r101_cvnet_D128.npz                             {"proj": [1024, 128]}, the ITQ projection the dist checkpoint
                                                      carries as remap_local.0.W (the prototype downloads it too)
  grounding-dino-tiny/                                a ~1 MB random Grounding DINO folder (tests/gdino_tiny.py)

That is every item of the weights manifest a model or the default detector needs (`weights download` for each model
in the README, and the files the seed prototype fetched), so loaders meet the folder a user really has; a test checks
this list against the manifest. grounding-dino-base, an optional larger detector, is left out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.helpers_ckpt import make_cvnet_checkpoint
from visearch.config import load_model_config
from visearch.models.nets.ames_transformer import random_state

SEEDS = {"r50": 0, "r101": 1, "detector": 2, "float": 3, "dist": 4}
FILES = {"r50": "CVPR2022_CVNet_R50.pyth", "r101": "CVPR2022_CVNet_R101.pyth", "detector": "cvnet_detector.pt",
         **{v: load_model_config(f"ames-{v}")["rerank"]["checkpoint"] for v in ("float", "dist")},
         "itq": "itq_r101_cvnet_D128.npz", "gdino": "grounding-dino-tiny"}


def detector_state(seed: int, channels: int = 1024) -> dict[str, torch.Tensor]:
    """A random AMES CVNet detector state_dict with the official keys: 1x1 convs scaled so weights stay O(1)."""
    rs = np.random.RandomState(seed)

    def f(*shape: int, scale: float = 1.0, loc: float = 0.0) -> torch.Tensor:
        return torch.from_numpy((loc + scale * rs.standard_normal(shape)).astype(np.float32))

    c = channels
    return {"conv1.weight": f(c, c, 1, 1, scale=c ** -0.5), "conv1.bias": f(c, scale=0.1),
            "bn.weight": f(c, scale=0.1, loc=1.0), "bn.bias": f(c, scale=0.1), "bn.running_mean": f(c, scale=0.1),
            "bn.running_var": torch.from_numpy((1 + 0.2 * np.abs(rs.standard_normal(c))).astype(np.float32)),
            "bn.num_batches_tracked": torch.tensor(100), "conv2.weight": f(1, c, 1, 1, scale=c ** -0.5),
            "conv2.bias": f(1, scale=0.1)}


def write_weights_dir(path: str | Path, which: tuple[str, ...] = tuple(FILES)) -> Path:
    """Write the random official-format files named by `which` (keys of FILES) into `path`; returns `path`.
    Files already there are kept (the content depends only on the seeds)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for key in which:
        dst = path / FILES[key]
        if dst.exists():
            continue
        tmp = dst.with_name(dst.name + ".tmp")
        if key == "gdino":
            from tests.gdino_tiny import build_tiny_gdino

            build_tiny_gdino(tmp)
        elif key == "itq":
            with open(tmp, "wb") as f:  # the file object keeps np.savez from appending .npz to the temp name
                np.savez(f, proj=random_state("dist", SEEDS["dist"])["remap_local.0.W"].numpy())
        elif key in ("r50", "r101"):
            make_cvnet_checkpoint(tmp, 50 if key == "r50" else 101, SEEDS[key])
        elif key == "detector":
            torch.save({"state": detector_state(SEEDS[key])}, tmp)
        else:
            torch.save({"state": random_state(key, SEEDS[key])}, tmp)
        tmp.replace(dst)
    return path
