"""Where the learner and the world model run: the one rule for ``device`` names.

``"auto"`` is cuda when torch sees a CUDA device here, else cpu; ``"cpu"``, ``"cuda"`` and
``"cuda:1"`` name a device. :mod:`policies` imports this module too (policies sit above
worldmodel), so the learner and the world model read ``device: auto`` the same way.
"""

from __future__ import annotations

import torch

AUTO = "auto"
DEVICE_TYPES = ("cpu", "cuda")  # what the learners and world models run on


def check_device_name(name: str, key: str = "device") -> None:
    """Refuse a name that is neither ``"auto"`` nor a cpu or cuda device torch can parse; says which ``key``.
    Whether the device is present is asked only when it is resolved (:func:`resolve_device`). Other device types
    (``mps``, ``xpu``, ``meta``) parse too, but the learners are built and tested on cpu and CUDA only: ``mps``
    once passed this check and failed inside torch ("PyTorch is not linked with support for mps devices")."""
    if name == AUTO:
        return
    wanted = f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {name!r}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(wanted) from exc
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{wanted}: the learners and world models run on cpu or CUDA only (use {key}=cpu)")


def resolve_device(name: str = AUTO) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; any other name must be a device torch can use here."""
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but {_no_cuda_reason()}; use device=auto (cuda when there is one, else cpu) or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s): use device=auto, cuda, or cuda:<0..{torch.cuda.device_count() - 1}>")
    return device


def _no_cuda_reason() -> str:
    """Why torch sees no CUDA device in this process, for error messages."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build of torch"
    return "torch sees no CUDA device here (check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)"


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run faster than float32 ones here: a CPU with AVX512-BF16 or AMX (about 2x
    on one core). False on GPUs, where the learners' small networks are bound by kernel launches, not
    arithmetic (an H100 ran SAC 2x256 slower in bfloat16: 192 vs 209 steps/s, docs/benchmarks.md)."""
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def set_cpu_threads(num_threads: int | None) -> None:
    """Set torch's intra-op CPU threads when a number is given (None leaves torch's default: one per core)."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
