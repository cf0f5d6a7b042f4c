"""visearch: instance-level visual search.

    import visearch
    model = visearch.load_model("lite")            # or "superglobal-r50", weights="CVPR2022_CVNet_R50.pyth"
    desc = model.describe(["a.jpg", "b.jpg"])      # [N, D] float32, L2-normalised
"""
__version__ = "0.1.0"

from .registry import available, load_model  # noqa: E402  (light: no torch import until a model is built)

__all__ = ["__version__", "available", "load_model"]
