"""The whole renderer (points -> multi-resolution triplane sampling -> decoder -> composite): the
official G3DR/EG3D path (baseline, benchmarks/official.render) vs the reference ("torch") vs each
fused backend, forward and forward+backward (gradients to the planes through the pyramid, w1, b1,
w2, b2), time and peak memory.

Configs (all with a target depth, so the depth-kernel scaling runs; decoder hidden 64, D=3,
3 levels built from one finest plane, box_warp 2, cameras on a sphere of radius 2.7 looking at the box):
  cpu:          B=2, C=32, 64x64 planes, R=4,096 rays, S=48 samples; every output in the loss
  cpu-noweights the same; the fused backends skip the weights (return_weights=False), the baseline
                still computes them but leaves them out of the loss
  g3dr-mem      the G3DR training configuration, B=8, C=64, 128x128, R=16,384, S=64: peak memory on the
                CPU, fwd+bwd, one round. The baseline and the reference would need far more than 8 GB at
                B=8 (a [B*3, C, N] grid_sample output alone is 6.4 GB per level), so they run this
                configuration at B=2 ("g3dr-mem B2") next to the fused kernels at B=8 and at B=2.
  g3dr (GPU)    B=8, the G3DR configuration, time and memory, only when CUDA is available.
fwd+bwd is the harness's: backward from fixed random upstream gradients on every output returned
(with the weights in the "cpu" config, so the kernels' weights-gradient path runs).

Run: PYTHONPATH=$PWD python -m pytest benchmarks/bench_render.py --benchmark-only -q
     (-k "cpu and not g3dr" for the quick CPU cases; the g3dr-mem cases take minutes)
"""
from __future__ import annotations

import math

import pytest
import torch

import g3dr_kernels
from benchmarks import official
from benchmarks._harness import fwd_bwd, run_case
from g3dr_kernels import _backend, sampling

_SMALL = dict(B=2, C=32, H=64, R=4096, S=48, hidden=64, D=3, levels=3)
_G3DR = dict(B=8, C=64, H=128, R=16384, S=64, hidden=64, D=3, levels=3)
CONFIGS = [pytest.param(dict(_SMALL, weights=True, device="cpu", rounds=3), id="cpu"),
           pytest.param(dict(_SMALL, weights=False, device="cpu", rounds=3), id="cpu-noweights"),
           pytest.param(dict(_G3DR, weights=False, device="cpu", rounds=1, fused_only=True), id="g3dr-mem"),
           pytest.param(dict(_G3DR, B=2, weights=False, device="cpu", rounds=1), id="g3dr-mem-B2")]
if torch.cuda.is_available():
    CONFIGS.append(pytest.param(dict(_G3DR, weights=True, device="cuda", rounds=3), id="g3dr"))

IMPLS = ("baseline", "torch", "cpu", "triton", "cuda")


def _label(cfg) -> str:
    return (f"B{cfg['B']} C{cfg['C']} {cfg['H']}x{cfg['H']} L{cfg['levels']} R{cfg['R']} S{cfg['S']} "
            f"hid{cfg['hidden']} D{cfg['D']} target" + ("" if cfg["weights"] else " no-weights"))


def _skip_reason(impl: str, cfg):
    device = cfg["device"]
    if impl in ("baseline", "torch"):
        if cfg.get("fused_only"):
            return "the unfused paths do not fit at B=8 (see the module docstring)"
        if impl == "torch" and cfg["rounds"] == 1:
            return "the G3DR-size CPU case compares with the baseline only (the reference is as big)"
        return None
    if impl == "cpu" and device != "cpu" or impl in ("triton", "cuda") and device != "cuda":
        return f"{impl} does not run on {device} tensors"
    return _backend._unavailable("render", impl, torch.device(device))


def _inputs(cfg):
    """Triplanes, rays from cameras on a sphere of radius 2.7 aimed at points inside the box, depths
    spread evenly over the ray's span inside the box, a target depth near the middle of it."""
    g = torch.Generator().manual_seed(0)
    B, C, H, R, S, Hd, D = (cfg[k] for k in ("B", "C", "H", "R", "S", "hidden", "D"))
    planes = 0.5 * torch.randn(B, 3, C, H, H, generator=g)
    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3, generator=g), dim=-1) * 2.7
    aim = 0.6 * (torch.rand(B, R, 3, generator=g) - 0.5)
    rays_o = cam.expand(B, R, 3).contiguous()
    rays_d = torch.nn.functional.normalize(aim - rays_o, dim=-1)
    near, far, _ = sampling.ray_box_bounds(rays_o, rays_d, 2.0)
    depths = sampling.stratified_depths(near, far, S, perturb=True, generator=g)
    target = near + (far - near) * (0.4 + 0.2 * torch.rand(B, R, generator=g))
    w1 = torch.randn(Hd, C, generator=g) / math.sqrt(C)
    b1 = 0.1 * torch.randn(Hd, generator=g)
    w2 = torch.randn(1 + D, Hd, generator=g) / math.sqrt(Hd)
    b2 = 0.1 * torch.randn(1 + D, generator=g)
    dev = cfg["device"]
    return [t.to(dev) for t in (planes, rays_o, rays_d, depths, target, w1, b1, w2, b2)]


def _fn(impl, cfg, planes, rays_o, rays_d, depths, target, w1, b1, w2, b2):
    L = cfg["levels"]
    if impl == "baseline":
        def run():
            out = official.render(planes, rays_o, rays_d, depths, w1, b1, w2, b2, target_depth=target, levels=L)
            return out if cfg["weights"] else out[:3]
        return run

    def run():
        out = g3dr_kernels.render_triplanes(planes, rays_o, rays_d, depths, w1, b1, w2, b2, target_depth=target,
                                            levels=L, return_weights=cfg["weights"], backend=impl)
        return tuple(o for o in out if o is not None)
    return run


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_render(benchmark, cfg, impl, mode):
    why = _skip_reason(impl, cfg)
    if why:
        pytest.skip(why)
    big = cfg["rounds"] == 1
    if big and mode == "fwd":
        pytest.skip("the G3DR-size CPU cases measure fwd+bwd only")
    planes, rays_o, rays_d, depths, target, w1, b1, w2, b2 = _inputs(cfg)
    params = [planes, w1, b1, w2, b2]
    if mode == "fwd":
        fwd = _fn(impl, cfg, planes, rays_o, rays_d, depths, target, w1, b1, w2, b2)

        def fn():
            with torch.no_grad():
                return fwd()
    else:
        for p in params:
            p.requires_grad_(True)
        fn = fwd_bwd(_fn(impl, cfg, planes, rays_o, rays_d, depths, target, w1, b1, w2, b2), params)
    row = run_case(benchmark, op="render", impl=impl, mode=mode, config=_label(cfg), device=cfg["device"], fn=fn,
                   rounds=cfg["rounds"], warmup=0 if big else 1)
    assert row["median_s"] > 0
