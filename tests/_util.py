"""Helpers for comparing backends with the reference."""
from __future__ import annotations

import importlib.util
from typing import Dict, Sequence

import pytest
import torch

import g3dr_kernels
from g3dr_kernels import _backend

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def backend_params(op: str, include_cuda: bool = True) -> list:
    """pytest params for the compiled/Triton backends of `op`, each skipped (visibly) when it cannot
    run here. The device is the one that backend runs on: cpu -> CPU; cuda -> CUDA; triton -> CUDA
    when present, else CPU under TRITON_INTERPRET=1."""
    params = []
    for b in ("cpu", "triton") + (("cuda",) if include_cuda else ()):
        dev = "cpu" if b == "cpu" else ("cuda" if (b == "cuda" or HAS_CUDA) else "cpu")
        why = None
        if b == "cuda" and not HAS_CUDA:
            why = "needs a CUDA GPU"
        else:
            why = _backend._unavailable(op, b, torch.device(dev))
        params.append(pytest.param((b, dev), id=b, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.to(want.dtype), want, msg=lambda m: f"{name}: {m}", **tol)


def grads(outputs: Sequence[torch.Tensor], inputs: Dict[str, torch.Tensor], seed: int = 1) -> Dict[str, torch.Tensor]:
    """Gradients of sum(out * fixed random weights) for every output with respect to `inputs`."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        if o is None:
            continue
        w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
        loss = loss + (o * w).sum()
    names = list(inputs)
    gs = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(inputs[n]) if gi is None else gi) for n, gi in zip(names, gs)}
