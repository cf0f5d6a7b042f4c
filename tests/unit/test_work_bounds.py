"""Bounded work per image in every model (issue 12 item 5), and checkpoint loading that survives fuzzed files.

The CLI side (extract skips strips with a reason, query refuses a 2000x1 image) is in tests/e2e/test_hostile_corpus.py;
here the models themselves, so library callers get the same bound: SuperGlobal used to upsample a 2000x1 image to
184000x92 px (164 s, 8.4 GB), AMES's local path inherits it."""
from __future__ import annotations

import functools
import io
import random
import time

import numpy as np
import pytest
import torch

from visearch.errors import ImageError, WeightsError
from visearch.images import MAX_ASPECT, MAX_DESCRIBE_PIXELS, aspect_problem, work_scale


@functools.lru_cache(maxsize=1)
def _superglobal():
    from visearch.config import load_model_config
    from visearch.models.nets.cvnet_resnet import CVNetResNet
    from visearch.models.superglobal import SuperGlobal

    cfg = load_model_config("superglobal-r50")
    return SuperGlobal(name="superglobal-r50", dim=2048, config=cfg, device=torch.device("cpu"),
                       net=CVNetResNet(50).eval())


def test_aspect_limit_and_pixel_budget():
    assert aspect_problem(MAX_ASPECT, 1) is None and aspect_problem(1, MAX_ASPECT) is None
    assert "2000:1" in aspect_problem(2000, 1) and aspect_problem(0, 5)
    assert work_scale(4000, 3000) == 1.0  # a 12 Mpx photo stays native
    f = work_scale(9000, 9000)
    assert round(9000 * f) ** 2 <= MAX_DESCRIBE_PIXELS * 1.001


@pytest.mark.parametrize("shape", [(1, 2000), (2000, 1), (3, 4000)])
def test_superglobal_refuses_strips_at_once(shape):
    model = _superglobal()
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="aspect ratio"):
        model.extract([np.zeros((*shape, 3), np.uint8)])
    assert time.monotonic() - t0 < 1.0


def test_superglobal_shrinks_above_the_pixel_budget():
    model = _superglobal()
    big = np.zeros((6000, 5000, 3), np.uint8)  # 30 Mpx
    h, w = model._prepare(big).shape[:2]
    assert h * w <= MAX_DESCRIBE_PIXELS * 1.001 and abs(h / w - 1.2) < 0.01  # rounding to whole pixels
    assert model._prepare(np.zeros((300, 400, 3), np.uint8)).shape == (300, 400, 3)  # native below it


def test_ames_local_scales_are_bounded():
    from visearch.config import load_model_config
    from visearch.models.ames import AMESDescriber

    d = AMESDescriber(name="ames-dist", dim=2048, config=load_model_config("ames-dist"), device=torch.device("cpu"))
    with pytest.raises(ImageError, match="aspect ratio"):
        d._scales_for(1, 2000)
    assert d._scales_for(600, 800) == d.scales
    s = d._scales_for(6000, 5000)
    assert max(s) < max(d.scales) and 6000 * 5000 * (s[1] ** 2) <= MAX_DESCRIBE_PIXELS * 1.001


def test_lite_refuses_strips():
    from visearch.registry import load_model

    with pytest.raises(ImageError, match="aspect ratio"):
        load_model("lite", device="cpu").extract([np.zeros((1, 500, 3), np.uint8)])


def test_safe_torch_load_on_300_fuzzed_files(tmp_path):
    """Random bytes, random text, truncated and byte-flipped checkpoints, pickle-protocol headers: each one is a
    WeightsError or a loaded dict, never IndexError / KeyError / struct.error (19 of 300 were before)."""
    from visearch.weight_files import safe_torch_load

    rng = random.Random(0)
    buf = io.BytesIO()
    torch.save({"model_state": {"w": torch.zeros(3)}}, buf)
    good = buf.getvalue()
    for i in range(300):
        kind = i % 5
        if kind == 0:
            data = rng.randbytes(rng.randint(1, 400))
        elif kind == 1:
            data = "".join(rng.choice("abcdefghij{}[]()'\"\n 0123456789.KqXxN") for _ in range(rng.randint(1, 200)))
            data = data.encode()
        elif kind == 2:
            data = good[: rng.randint(1, len(good) - 1)]
        elif kind == 3:
            b = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            data = bytes(b)
        else:
            data = bytes([0x80, rng.choice([2, 3, 4, 5])]) + rng.randbytes(rng.randint(0, 100))
        p = tmp_path / f"f{i}.pt"
        p.write_bytes(data)
        try:
            safe_torch_load(p)
        except WeightsError as e:
            assert str(p) in e.message and "\n" not in e.message
