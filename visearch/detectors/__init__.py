"""Region proposals for query crops: Grounding DINO (local or cloud), weight-free tiles, or the whole image.

Light imports only: the Grounding DINO and cloud modules import transformers / requests when used.
"""
from .base import DEFAULT_PROMPT, WHOLE_IMAGE_LABEL, Box, Detector, crop, nms, normalize_prompt, select_crops

__all__ = ["DEFAULT_PROMPT", "WHOLE_IMAGE_LABEL", "Box", "Detector", "crop", "nms", "normalize_prompt",
           "select_crops"]
