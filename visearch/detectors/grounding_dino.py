"""Local Grounding DINO (Liu et al., "Grounding DINO: Marrying DINO with Grounded Pre-Training for Open-Set Object
Detection", ECCV 2024) through Hugging Face transformers, from a folder in the weights dir, with no network access.

The folder is what `save_pretrained` / `huggingface_hub.snapshot_download("IDEA-Research/grounding-dino-tiny")`
writes (config.json, model.safetensors, tokenizer and processor files): `<weights_dir>/grounding-dino-tiny` by default,
`<weights_dir>/grounding-dino-base` for `variant="base"`, or any folder given as `path`.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DetectorError, UsageError, WeightsError, first_line
from .base import DEFAULT_PROMPT, Box, Detector, check_image, check_options, normalize_prompt

log = logging.getLogger(__name__)

VARIANTS = {"tiny": "grounding-dino-tiny", "base": "grounding-dino-base"}
BOX_THRESHOLD = 0.35  # IDEA-Research's demo defaults
TEXT_THRESHOLD = 0.25
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_SPECIAL = re.compile(r"\[(CLS|SEP|PAD|UNK|MASK)\]")


def model_dir(weights_dir: str | Path, variant: str = "tiny") -> Path:
    """`<weights_dir>/grounding-dino-<variant>`."""
    if variant not in VARIANTS:
        raise UsageError(f"unknown Grounding DINO variant {variant!r}", f"known: {', '.join(VARIANTS)}")
    return Path(weights_dir) / VARIANTS[variant]


def _missing(folder: Path) -> str | None:
    """What is wrong with a model folder, or None when it looks complete."""
    if not folder.is_dir():
        return "folder not found"
    if not (folder / "config.json").is_file():
        return "config.json missing"
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        return "no model.safetensors / pytorch_model.bin"
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        return "tokenizer files missing"
    return None


def available(weights_dir: str | Path, variant: str = "tiny") -> bool:
    """Whether the local model folder exists and looks complete (no import of transformers, no loading)."""
    return _missing(model_dir(weights_dir, variant)) is None


def _clean_label(text: str) -> str:
    """Decoded phrase -> label: special tokens and separators dropped ("main object. [SEP]" -> "main object")."""
    words = _SPECIAL.sub(" ", text).replace(" .", " ").replace(".", " ").split()
    return " ".join(words) or "object"


class GroundingDinoDetector(Detector):
    """Open-vocabulary boxes for a text prompt. Thresholds: a box is kept when its best token probability exceeds
    `box_threshold`; its label is the prompt tokens above `text_threshold`."""

    name = "gdino"

    def __init__(self, folder: str | Path, box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD, default_prompt: str | None = DEFAULT_PROMPT,
                 device: Any = "cpu"):
        if not 0.0 <= box_threshold <= 1.0 or not 0.0 <= text_threshold <= 1.0:
            raise UsageError(f"thresholds must be in [0, 1], got box {box_threshold}, text {text_threshold}")
        folder = Path(folder)
        what = _missing(folder)
        if what:
            # Checked first: transformers would otherwise fail with a confusing "Repo id must be in the form" error.
            raise WeightsError(f"Grounding DINO model not found at {folder} ({what})",
                               f"run `visearch weights download {folder.name}` on a networked machine")
        try:
            import torch
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
        except ImportError as e:
            raise DetectorError(f"the local Grounding DINO detector needs transformers ({e.name or e} missing)",
                                "pip install 'visearch[gdino]', or use --detector tiles") from None
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.default_prompt = default_prompt
        self.folder = folder
        self.device = torch.device(device) if isinstance(device, str) else device
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local load takes seconds; its progress bar is noise on stderr
        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - safetensors, json, torch and HF errors all mean "bad folder"
            first = first_line(e, 200)
            raise WeightsError(f"cannot load Grounding DINO from {folder}: {first}",
                               f"download it again: `visearch weights download {folder.name}`") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def detect(self, image: np.ndarray, prompt: str | None = None) -> list[Box]:
        """Boxes (xyxy pixels of `image`), best score first; `prompt` is combined with the default prompt."""
        return self.detect_batch([image], prompt)[0]

    def detect_batch(self, images: list[np.ndarray], prompt: str | None = None) -> list[list[Box]]:
        """One forward for several images with the same prompt; returns one box list per image."""
        import torch
        from PIL import Image

        sizes = [check_image(im) for im in images]
        if not images:
            return []
        text = normalize_prompt(prompt, self.default_prompt)
        if not text:
            return [[] for _ in images]  # nothing to look for: the caller keeps the whole image
        n_tokens = len(self.processor.tokenizer.tokenize(text)) + 2
        if n_tokens > self.max_text_len:
            raise UsageError(f"prompt too long for Grounding DINO: {n_tokens} tokens, the model takes "
                             f"{self.max_text_len}", "use fewer or shorter phrases")
        inputs = self.processor(images=[Image.fromarray(im) for im in images], text=[text] * len(images),
                                return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        try:
            with torch.inference_mode():
                outputs = self.model(**inputs)
        except RuntimeError as e:
            first = first_line(e, 200)
            raise DetectorError(f"Grounding DINO forward failed: {first}") from None
        results = self._post_process(outputs, inputs["input_ids"], sizes)
        out: list[list[Box]] = []
        for res, (h, w) in zip(results, sizes):
            labels = res.get("text_labels")
            if labels is None:  # transformers < 4.51: "labels" holds the strings
                labels = res.get("labels")
            boxes = res["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
            scores = res["scores"].detach().float().cpu().numpy().reshape(-1)
            found = []
            for (x0, y0, x1, y1), s, lab in zip(boxes, scores, labels):
                x0, x1 = float(np.clip(x0, 0, w)), float(np.clip(x1, 0, w))
                y0, y1 = float(np.clip(y0, 0, h)), float(np.clip(y1, 0, h))
                if x1 > x0 and y1 > y0:
                    found.append(Box(x0, y0, x1, y1, float(s), _clean_label(str(lab))))
            found.sort(key=lambda b: -float(b.score or 0.0))
            out.append(found)
        return out

    def _post_process(self, outputs: Any, input_ids: Any, sizes: list[tuple[int, int]]) -> list[dict]:
        """`post_process_grounded_object_detection` across versions: `threshold` (>= 4.51) or `box_threshold`
        (older; removed in 4.57+ / 5.x, where passing it raises TypeError)."""
        post = self.processor.post_process_grounded_object_detection
        try:
            return post(outputs, input_ids, threshold=self.box_threshold, text_threshold=self.text_threshold,
                        target_sizes=sizes)
        except TypeError as e:
            if "threshold" not in str(e):
                raise
            return post(outputs, input_ids, box_threshold=self.box_threshold, text_threshold=self.text_threshold,
                        target_sizes=sizes)


def build(weights_dir: str | Path | None = None, variant: str | None = None, path: str | Path | None = None,
          box_threshold: float | None = None, text_threshold: float | None = None,
          default_prompt: str | None = None, device: Any = None, **options: Any) -> GroundingDinoDetector:
    """Options: `weights_dir` (default VISEARCH_WEIGHTS_DIR or ./weights), `variant` "tiny" | "base",
    `path` (a model folder; overrides weights_dir/variant), `box_threshold` (0.35), `text_threshold` (0.25),
    `default_prompt` (combined with every user prompt; None = DEFAULT_PROMPT, "" = user prompt only), `device` ("auto")."""
    check_options("gdino", options)
    from ..config import default_weights_dir
    from ..device import resolve_device

    folder = Path(path) if path is not None else model_dir(
        weights_dir if weights_dir is not None else default_weights_dir(), variant or "tiny")
    dev = device if device is not None and not isinstance(device, str) else resolve_device(device or "auto")
    log.debug("loading Grounding DINO from %s on %s", folder, dev)
    return GroundingDinoDetector(folder, BOX_THRESHOLD if box_threshold is None else box_threshold,
                                 TEXT_THRESHOLD if text_threshold is None else text_threshold,
                                 DEFAULT_PROMPT if default_prompt is None else default_prompt, dev)
