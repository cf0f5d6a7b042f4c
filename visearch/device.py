"""Device selection in one place: `auto | cpu | cuda[:N]`."""
from __future__ import annotations

from .errors import DeviceError


def resolve_device(name: str = "auto"):
    """Return a torch.device; `auto` picks CUDA when available. Raises DeviceError for an impossible request."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but this machine has no usable CUDA device",
                              "use --device cpu or --device auto")
        return torch.device(name)
    raise DeviceError(f"unknown device {name!r}", "use auto, cpu or cuda")


def synchronize(device) -> None:
    """Wait for queued kernels so timings are honest."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)
