"""Step `detect`: regions of interest in one image, and which detector to use when none is named."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..workspace import Workspace


def default_detector(weights_dir: str | Path | None = None) -> str:
    """`gdino` when its weights are present, else the weight-free `tiles`."""
    try:
        from ..detectors.grounding_dino import available
    except ImportError:
        return "tiles"
    return "gdino" if available(Workspace.resolve(weights_dir=weights_dir).weights_dir) else "tiles"


def detect(image: str | Path, prompt: str | None = None, detector: str | None = None,
           weights_dir: str | Path | None = None, **options: Any) -> tuple[str, list[Any]]:
    """Boxes for one image: (detector name used, list of Box)."""
    from ..images import load_rgb
    from ..registry import load_detector

    name = detector or default_detector(weights_dir)
    det = load_detector(name, weights_dir=Workspace.resolve(weights_dir=weights_dir).weights_dir, **options)
    return name, det.detect(load_rgb(image), prompt)
