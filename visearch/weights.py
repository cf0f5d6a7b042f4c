"""Weight files: safe loading (and, below, the manifest and downloads)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import WeightsError


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True on CPU; every failure becomes a one-line WeightsError naming the file."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}", "run `visearch weights list` to see where files go")
    if path.stat().st_size == 0:
        raise WeightsError(f"weight file is empty: {path}", "download it again (`visearch weights download`)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickle content"
        raise WeightsError(f"refusing to load {path}: it holds objects other than tensors ({first[:160]})",
                           "only plain checkpoints (tensors, dicts, numbers) are accepted") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({msg[:160]})",
                           "download it again and check it with `visearch weights verify`") from None
