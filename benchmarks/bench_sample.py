"""Multi-resolution triplane sampling: the official G3DR path (baseline) vs the reference ("torch")
vs each compiled backend, forward and forward+backward (gradient to the finest planes, through the
pyramid), time and peak memory.

Every impl gets the finest planes and builds its pyramid with F.interpolate (the fused backends
through g3dr_kernels.sample_triplanes), so the comparison is like with like.

  CPU config:  B=2, C=32, 64x64 finest, 3 levels, 65,536 points per batch element.
  G3DR config (only with a GPU): B=8, C=64, 128x128, 3 levels, 1M points per image.

Modes: "fwd" (no grad) and "fwd+bwd" (the shared harness's fwd_bwd: backward from a fixed upstream
gradient allocated before the measurement, so the peak is the op's own: forward output, saved
tensors, backward buffers).

Run: PYTHONPATH=$PWD python -m pytest benchmarks/bench_sample.py --benchmark-only -q
"""
from __future__ import annotations

import pytest
import torch

import g3dr_kernels
from benchmarks import official
from benchmarks._harness import fwd_bwd, run_case
from g3dr_kernels import _backend

CONFIGS = [pytest.param(dict(B=2, C=32, H=64, W=64, levels=3, N=65536, device="cpu"), id="cpu")]
if torch.cuda.is_available():
    CONFIGS.append(pytest.param(dict(B=8, C=64, H=128, W=128, levels=3, N=1 << 20, device="cuda"), id="g3dr"))

IMPLS = ("baseline", "torch", "cpu", "triton", "cuda")


def _label(cfg) -> str:
    return f"B{cfg['B']} C{cfg['C']} {cfg['H']}x{cfg['W']} L{cfg['levels']} N{cfg['N']}"


def _skip_reason(impl: str, device: str):
    if impl in ("baseline", "torch"):
        return None
    if impl == "cpu" and device != "cpu" or impl in ("triton", "cuda") and device != "cuda":
        return f"{impl} does not run on {device} tensors"
    return _backend._unavailable("sample", impl, torch.device(device))


def _fn(impl: str, planes: torch.Tensor, xyz: torch.Tensor, levels: int):
    if impl == "baseline":
        return lambda: official.sample_triplanes(planes, xyz, levels)
    return lambda: g3dr_kernels.sample_triplanes(planes, xyz, levels=levels, backend=impl)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_sample(benchmark, cfg, impl, mode):
    why = _skip_reason(impl, cfg["device"])
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    dev = cfg["device"]
    planes = torch.randn(cfg["B"], 3, cfg["C"], cfg["H"], cfg["W"], generator=g).to(dev)
    xyz = (torch.rand(cfg["B"], cfg["N"], 3, generator=g) * 2 - 1).to(dev)
    if mode == "fwd":
        fwd = _fn(impl, planes, xyz, cfg["levels"])

        def fn():
            with torch.no_grad():
                return fwd()
    else:
        planes.requires_grad_(True)
        fn = fwd_bwd(_fn(impl, planes, xyz, cfg["levels"]), [planes])
    row = run_case(benchmark, op="sample", impl=impl, mode=mode, config=_label(cfg), device=dev, fn=fn)
    assert row["median_s"] > 0
