"""Volume compositing with the depth-kernel gradient scaling: the official G3DR/EG3D MipRayMarcher
(baseline, layout [B,R,S,1]) vs the reference ("torch") vs each compiled backend, forward and
forward+backward (gradients to sigma and rgb), time and peak memory.

Configs ("target": with a target depth, so the scaling runs):
  CPU:   B=4, R=16,384, S=64, D=3, every output differentiated (rgb, depth, opacity, weights)
  CPU:   the same without the weights (the backends' fast path return_weights=False; the baseline
         still computes its weights, they just get no upstream gradient)
  G3DR (only with a GPU): B=8, R=65,536 (256x256 rays), S=96, D=3, every output.
fwd+bwd is the harness's: backward from fixed upstream gradients on every differentiable output.

Run: PYTHONPATH=$PWD python -m pytest benchmarks/bench_composite.py --benchmark-only -q
"""
from __future__ import annotations

import pytest
import torch

import g3dr_kernels
from benchmarks import official
from benchmarks._harness import fwd_bwd, run_case
from g3dr_kernels import _backend

CONFIGS = [pytest.param(dict(B=4, R=16384, S=64, D=3, weights=True, device="cpu"), id="cpu"),
           pytest.param(dict(B=4, R=16384, S=64, D=3, weights=False, device="cpu"), id="cpu-noweights")]
if torch.cuda.is_available():
    CONFIGS.append(pytest.param(dict(B=8, R=65536, S=96, D=3, weights=True, device="cuda"), id="g3dr"))

IMPLS = ("baseline", "torch", "cpu", "triton", "cuda")


def _label(cfg) -> str:
    return f"B{cfg['B']} R{cfg['R']} S{cfg['S']} D{cfg['D']} target" + ("" if cfg["weights"] else " no-weights")


def _skip_reason(impl: str, device: str):
    if impl in ("baseline", "torch"):
        return None
    if impl == "cpu" and device != "cpu" or impl in ("triton", "cuda") and device != "cuda":
        return f"{impl} does not run on {device} tensors"
    return _backend._unavailable("composite", impl, torch.device(device))


def _inputs(cfg):
    """Raw densities around a surface in EG3D's FFHQ depth range [2.25, 3.3], random colours."""
    g = torch.Generator().manual_seed(0)
    B, R, S, D = cfg["B"], cfg["R"], cfg["S"], cfg["D"]
    depths = torch.sort(2.25 + 1.05 * torch.rand(B, R, S, generator=g), dim=-1).values
    target = 2.5 + 0.5 * torch.rand(B, R, generator=g)
    sigma = 2 * torch.randn(B, R, S, generator=g) + 10 * torch.exp(-(depths - target.unsqueeze(-1)) ** 2 / 0.01)
    rgb = torch.rand(B, R, S, D, generator=g)
    dev = cfg["device"]
    return sigma.to(dev), rgb.to(dev), depths.to(dev), target.to(dev)


def _fn(impl, sigma, rgb, depths, target, weights: bool):
    if impl == "baseline":
        s4, d4 = sigma.unsqueeze(-1), depths.unsqueeze(-1)  # the official layout [B,R,S,1]

        def run():
            out = official.mip_ray_marcher(rgb, s4, d4, target)
            return out if weights else out[:3]
        return run
    return lambda: g3dr_kernels.composite(sigma, rgb, depths, target_depth=target, return_weights=weights,
                                          backend=impl)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_composite(benchmark, cfg, impl, mode):
    why = _skip_reason(impl, cfg["device"])
    if why:
        pytest.skip(why)
    sigma, rgb, depths, target = _inputs(cfg)
    if mode == "fwd":
        fwd = _fn(impl, sigma, rgb, depths, target, cfg["weights"])

        def fn():
            with torch.no_grad():
                return fwd()
    else:
        sigma.requires_grad_(True)
        rgb.requires_grad_(True)
        fn = fwd_bwd(_fn(impl, sigma, rgb, depths, target, cfg["weights"]), [sigma, rgb])
    row = run_case(benchmark, op="composite", impl=impl, mode=mode, config=_label(cfg), device=cfg["device"], fn=fn,
                   rounds=5)  # 5: the CPU runners are shared, medians of 3 were noisy
    assert row["median_s"] > 0
