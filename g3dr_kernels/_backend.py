"""Backend discovery and choice. Loads lazily, loudly, once: importing g3dr_kernels never
compiles or loads the extension; asking for an unavailable backend raises BackendUnavailableError
with what to do about it; `backends()` reports what is usable here."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Dict

import torch

from ._validate import BACKENDS, check_backend

BUILD_HINT = ("build it with `make setup` (or `pip install --no-build-isolation -e .`); "
              "set G3DR_CUDA=0 for a CPU-only build, G3DR_CUDA=1 to require the CUDA kernels")


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run here."""


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("g3dr_kernels._C"), None
    except ImportError as e:  # not built, or built against another torch
        return None, str(e)


def extension():
    """The compiled extension module (registers torch.ops.g3dr_C.*), or BackendUnavailableError."""
    mod, err = _load_extension()
    if mod is None:
        raise BackendUnavailableError(f"the compiled extension g3dr_kernels._C is not available ({err}); {BUILD_HINT}")
    return mod


def extension_info() -> str:
    """'cpu' or 'cpu,cuda': what the built extension holds ('' when not built)."""
    mod, _ = _load_extension()
    return torch.ops.g3dr_C.build_info() if mod is not None else ""


def _has_ext_kernel(op: str, key: str) -> bool:
    if _load_extension()[0] is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"g3dr_C::{op}_fwd", key)
    except RuntimeError:  # op not registered at all
        return False


def _triton_module(op: str):
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    name = f"g3dr_kernels.triton.{op}"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_kernel(op: str, backend: str) -> bool:
    """Whether `backend` implements `op` ('sample', 'composite' or 'render') in this build."""
    if backend == "torch":
        return True
    if backend == "cpu":
        return _has_ext_kernel(op, "CPU")
    if backend == "cuda":
        return _has_ext_kernel(op, "CUDA")
    if backend == "triton":
        return _triton_module(op) is not None
    return False


def kernels(op: str, backend: str):
    """The object holding `{op}_fwd` / `{op}_bwd` for a compiled backend."""
    if backend in ("cpu", "cuda"):
        extension()
        return torch.ops.g3dr_C
    if backend == "triton":
        mod = _triton_module(op)
        if mod is None:
            raise BackendUnavailableError(f"the triton backend has no '{op}' kernel (is triton installed?)")
        return mod
    raise AssertionError(backend)


def _unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `op` on tensors on `device`, or None if it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got {device}"
        if _load_extension()[0] is None:
            return f"the compiled extension is not built ({_load_extension()[1]}); {BUILD_HINT}"
        return None if has_kernel(op, "cpu") else f"this build of the extension has no CPU '{op}' kernel; {BUILD_HINT}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device}"
        if _load_extension()[0] is None:
            return f"the compiled extension is not built ({_load_extension()[1]}); {BUILD_HINT}"
        if "cuda" not in extension_info():
            return f"the extension was built without CUDA (no toolkit or G3DR_CUDA=0); {BUILD_HINT} with a CUDA toolkit"
        return None if has_kernel(op, "cuda") else f"this build has no CUDA '{op}' kernel"
    if backend == "triton":
        if _triton_module(op) is None:
            return f"triton is not installed or has no '{op}' kernel (pip install triton)"
        if device.type != "cuda" and not triton_interpreting():
            return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
        return None
    raise AssertionError(backend)


_warned = set()


@torch.compiler.assume_constant_result  # a plain string under torch.compile, no graph break
def resolve(backend: str, op: str, device: torch.device) -> str:
    """Turn a requested backend into the one that runs. 'auto' (or G3DR_BACKEND when set):
    CUDA tensors -> triton, else cuda, else torch; CPU tensors -> cpu, else torch. A backend
    asked for by name that cannot run raises BackendUnavailableError; it never falls back."""
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get("G3DR_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"G3DR_BACKEND={env!r} is not one of {BACKENDS}")
            backend = env
    if backend != "auto":
        why = _unavailable(op, backend, device)
        if why is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op}: {why}")
        return backend
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for b in order:
        if _unavailable(op, b, device) is None:
            return b
    if (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(f"g3dr_kernels: no compiled '{op}' kernel for {device.type} tensors; using the "
                      f"pure-PyTorch reference ({BUILD_HINT})", RuntimeWarning, stacklevel=3)
    return "torch"


def backends() -> Dict[str, Dict[str, object]]:
    """What is usable here: {backend: {"available": bool, "ops": [...], "note": str}}."""
    cuda_dev = torch.device("cuda") if torch.cuda.is_available() else None
    out: Dict[str, Dict[str, object]] = {}
    for b in BACKENDS[1:]:
        ops, notes = [], set()
        for op in ("sample", "composite", "render"):
            dev = cuda_dev if b == "cuda" else (cuda_dev or torch.device("cpu")) if b == "triton" else torch.device("cpu")
            why = "no CUDA device" if dev is None else _unavailable(op, b, dev)
            if why is None:
                ops.append(op)
            else:
                notes.add(why)
        out[b] = {"available": bool(ops), "ops": ops, "note": "; ".join(sorted(notes))}
    return out
