"""Which device to run on, and whether the work fits in its memory: checks that fail early with
the option to change, before anything is built."""
from __future__ import annotations

from typing import Optional

import torch


def pick_device(device: Optional[str] = None, what: str = "--device") -> torch.device:
    """None or "auto" -> cuda when available, else cpu; otherwise the named device, checked to exist
    (ValueError naming the option and the fix, never a traceback from deep inside torch)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{what} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device}: CUDA is not available on this machine; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        try:
            torch.empty(0, device=dev)
        except Exception:
            raise ValueError(f"{what} {device}: this device is not available here; use cpu or cuda") from None
    return dev


def check_memory(nbytes: float, what: str, fix: str, device: Optional[torch.device] = None) -> None:
    """ValueError before allocating when `nbytes` could not fit in the device's free memory."""
    free = None
    try:
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, RuntimeError):
        return
    if nbytes > free:
        raise ValueError(f"{what} needs about {nbytes / 2**30:,.1f} GiB of memory, more than the "
                         f"{free / 2**30:,.1f} GiB free; {fix}")
