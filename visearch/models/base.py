"""The describer protocol every model implements.

Images travel through the library as RGB uint8 numpy arrays `[H, W, 3]` (see images.load_rgb); each model does its
own colour order, normalisation and resizing so that it matches its reference implementation exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, Union, runtime_checkable

import numpy as np

ImageInput = Union[str, Path, "PIL.Image.Image", np.ndarray]  # noqa: F821


@dataclass(frozen=True)
class LocalField:
    """One per-image array of local features as stored: fixed shape per image (e.g. (700, 16)) and dtype."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class Features:
    """Output of one extraction batch: global `[N, D]` float32 (L2-normalised) and optional local fields,
    each `[N, *LocalField.shape]`."""

    global_: np.ndarray
    local: dict[str, np.ndarray] | None = None


@runtime_checkable
class DescriberProtocol(Protocol):
    """What the pipeline needs from a model: `name` (its store folder), `dim`, the resolved `config`, `device`,
    `weights_sha256` and `local_fields` (recorded in the store), and the methods below."""

    name: str
    dim: int
    config: dict[str, Any]
    device: Any
    weights_sha256: str | None
    local_fields: dict[str, LocalField]

    def extract(self, images: Sequence[np.ndarray]) -> Features:
        """Describe a batch of database images (RGB uint8 arrays)."""
        ...

    def extract_query(self, images: Sequence[np.ndarray]) -> Features:
        """Describe query crops. Default: as database images; a model may differ (AMES float keeps query tokens in
        float32 while the database side is rounded through float16, as the reference does)."""
        return self.extract(images)

    def describe(self, images: Sequence[ImageInput]) -> np.ndarray:
        """L2-normalised float32 global descriptors `[N, D]` for file paths, PIL images or RGB uint8 arrays."""
        ...


@dataclass
class Describer(DescriberProtocol):
    """Base class of the models here. Subclasses set `name`, `dim`, `config` and implement `extract`.

    `config` is the resolved model configuration (recorded in the store; a store built with another config is refused).
    `weights_sha256` identifies the weights (recorded in the store).
    `local_fields` is empty for global-only models.
    `batch_size`, when set (extract's --batch-size), is the most images per forward pass at run time, instead of the
    configured `describe.batch_size`; it is not part of the store identity (descriptors do not depend on it).
    """

    name: str
    dim: int
    config: dict[str, Any]
    device: Any = None
    weights_sha256: str | None = None
    local_fields: dict[str, LocalField] = field(default_factory=dict)
    batch_size: int | None = None

    def extract(self, images: Sequence[np.ndarray]) -> Features:
        """Describe a batch of RGB uint8 arrays. Must be implemented by every model."""
        raise NotImplementedError

    def describe(self, images: Sequence[ImageInput]) -> np.ndarray:
        """L2-normalised float32 global descriptors `[N, D]` for file paths, PIL images or RGB uint8 arrays."""
        from ..images import load_rgb

        arrays = [load_rgb(im) for im in images]
        if not arrays:
            return np.zeros((0, self.dim), np.float32)
        return self.extract(arrays).global_

