"""The one device resolver: `auto` is a CUDA GPU, then Apple's MPS, then the CPU.

Training (per torchrun rank), the engine factory, evaluation, compare, probe and the demo all ask
here, so a report names the device its figures were measured on.
"""

from __future__ import annotations

import torch

from gptkit.errors import GptkitError

DEVICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device | None = "auto", index: int | None = None) -> torch.device:
    """The device to run on. `index` picks the CUDA GPU (a torchrun rank's local rank)."""
    name = "auto" if name is None else str(name)
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise GptkitError(f"device {name!r}: expected one of {', '.join(DEVICES)}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    elif kind == "cuda" and not torch.cuda.is_available():
        raise GptkitError(f"device {name!r}: this torch build sees no CUDA GPU; use auto or cpu")
    elif kind == "mps" and not _mps_available():
        raise GptkitError(f"device {name!r}: Apple's MPS is not available here; use auto or cpu")
    if kind == "cuda" and (index is not None or ":" in name):
        return torch.device("cuda", index if index is not None else int(name.split(":")[1]))
    return torch.device(kind)


def device_name(device: torch.device | str) -> str:
    """How reports and logs name a device: `cuda (NVIDIA H200)`, `mps (Apple GPU)`, `cpu (2 threads)`."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a wall-clock time measures it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
