"""Device selection and synchronisation (so timings include queued GPU work)."""

from __future__ import annotations

import torch

from bench.errors import BenchError


def select_device(spec: str = "auto") -> torch.device:
    """Resolve ``auto|cpu|cuda|cuda:N|mps``; auto prefers cuda, then mps, then cpu."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        device = None
    # torch also knows 'meta' (no data), 'xla', 'ipu'...: bench runs on real compute devices only.
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise BenchError(f"bad --device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {spec} asked for CUDA but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BenchError("--device mps asked for but MPS is not available; use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for all queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
