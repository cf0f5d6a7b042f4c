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


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 matrix products natively (AVX-512-BF16 or AMX-BF16 in /proc/cpuinfo):
    only there does bf16 autocast beat fp32 on CPU. False when the flags cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device) -> "object | None":
    """The autocast dtype for a `precision` setting (`auto | fp32 | bf16 | fp16`) on `device`, None for fp32.

    `auto`: bf16 on a CPU with native bf16 (cpu_has_bf16) or a CUDA device that supports it, fp32 elsewhere.
    fp16 is CUDA only (on CPU it falls back to fp32). Raises DeviceError for an unknown setting."""
    import torch

    p = str(precision or "fp32").lower()
    if p not in ("auto", "fp32", "bf16", "fp16"):
        raise DeviceError(f"unknown precision {precision!r}", "use auto, fp32, bf16 or fp16")
    kind = getattr(device, "type", str(device))
    if p == "auto":
        ok = cpu_has_bf16() if kind == "cpu" else kind == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    if p == "fp16":
        return torch.float16 if kind == "cuda" else None
    return torch.bfloat16 if p == "bf16" else None
