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


def choose_detector(detector: str | None, prompt: str | None, weights_dir: str | Path | None = None,
                    options: dict[str, Any] | None = None) -> str:
    """The detector a query uses: `detector` when given; else with cloud options (a token file or an endpoint)
    `gdino-cloud`; else with a prompt `gdino` when its weights are present, else `tiles`; else `none`. The CLI and
    Searcher both choose here, so the library never drops a prompt the CLI would have used."""
    if detector:
        return detector
    options = options or {}
    if options.get("token_file") is not None or options.get("endpoint") is not None:
        return "gdino-cloud"
    return default_detector(weights_dir) if prompt else "none"


def detect(image: str | Path, prompt: str | None = None, detector: str | None = None,
           weights_dir: str | Path | None = None, **options: Any) -> tuple[str, list[Any]]:
    """Boxes for one image: (detector name used, list of Box)."""
    from ..images import load_rgb
    from ..registry import load_detector

    name = detector or default_detector(weights_dir)
    det = load_detector(name, weights_dir=Workspace.resolve(weights_dir=weights_dir).weights_dir, **options)
    return name, det.detect(load_rgb(image), prompt)
