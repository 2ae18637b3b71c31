"""Shared benchmark harness: time with pytest-benchmark, peak memory by the method for the device,
results appended to benchmarks/results/results.jsonl (machine, commit, date) by conftest.py.

Peak memory: CUDA -> torch.cuda.max_memory_allocated delta. CPU -> the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call, with glibc's
mmap threshold pinned at 64 KiB so large tensors are returned to the OS when freed (otherwise freed
memory is reused silently and peaks are under-counted).
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess
from typing import Callable, Dict, List

import torch

RESULTS: List[Dict] = []  # filled by record(), written by conftest at session end

try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, disables glibc's dynamic threshold
except OSError:  # not glibc
    _libc = None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak extra memory while fn() runs (its result is dropped before returning)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    if _libc is not None:
        _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM") - base
    del out
    return peak * 1024


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(benchmark, *, op: str, impl: str, mode: str, config: str, device: str, fn: Callable[[], object],
             rounds: int = 3, warmup: int = 1) -> Dict:
    """Time fn (pedantic: `rounds` rounds after `warmup` calls) and measure its peak memory; record it.
    mode: "fwd" or "fwd+bwd"; impl: "baseline" or a backend name; config: a short shape label."""
    def call():
        out = fn()
        sync(device)
        return out

    for _ in range(warmup):
        call()
    mem = peak_memory_bytes(call, device)
    benchmark.extra_info.update(op=op, impl=impl, mode=mode, config=config, peak_mem_bytes=mem)
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    stats = benchmark.stats.stats
    row = dict(op=op, impl=impl, mode=mode, config=config, device=device, machine=machine(),
               median_s=stats.median, min_s=stats.min, peak_mem_bytes=mem)
    RESULTS.append(row)
    return row


def fwd_bwd(fn: Callable[[], object], params: List[torch.Tensor]) -> Callable[[], object]:
    """Wrap a forward (returning a tensor or a tuple of tensors) into forward + backward from fixed
    upstream gradients, allocated here, before any measurement: what is timed and measured is the
    op's forward and backward, not the temporaries of a loss function. Every differentiable output
    gets a random gradient (so no output's backward path is skipped)."""
    def outputs():
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outputs()]
    for p in params:
        p.grad = None

    def run():
        for p in params:
            p.grad = None
        torch.autograd.backward(outputs(), grads)
        return None
    return run


def env_note() -> str:
    return os.environ.get("G3DR_BENCH_NOTE", "")
