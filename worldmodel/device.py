"""Where the world model runs: "cuda" when there is one, else "cpu" (or what the config names)."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; any other name must be a device torch can use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use device='auto' or 'cpu'")
    return device


def set_cpu_threads(num_threads: int | None) -> None:
    """Set torch's intra-op CPU threads when a number is given (None leaves torch's default: one per core)."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
