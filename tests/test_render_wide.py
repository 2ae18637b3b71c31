"""cpu fused render vs the reference at channel / hidden widths that reach the CPU kernel's vector paths
(csrc/cpu/taps.h gathers channels in blocks of 32 floats / 16 doubles; csrc/cpu/tile_gemm.h's register
blocks need 32 / 16 columns). tests/test_render.py uses C <= 6, which only runs the scalar tails.
Tolerance as in tests/test_render.py: 2x the reference's own error at the dtype, plus 64 eps. Breaking the
vector gather (one block read twice) fails every case here while tests/test_render.py passes."""
import math

import pytest
import torch

import g3dr_kernels as K
from g3dr_kernels import _backend, reference

pytestmark = pytest.mark.skipif(_backend._unavailable("render", "cpu", torch.device("cpu")) is not None,
                                reason="the cpu backend is not built")
NAMES = ["rgb", "depth", "opacity", "weights", "grad planes", "grad w1", "grad b1", "grad w2", "grad b2"]


def _run(backend, dtype, C, Hd, B=2, R=37, S=19, H=16, D=3):
    g = torch.Generator().manual_seed(1)
    planes = (0.5 * torch.randn(B, 3, C, H, H, generator=g)).to(dtype).requires_grad_(True)
    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3, generator=g), dim=-1) * 2.7
    ro = cam.expand(B, R, 3).contiguous().to(dtype)
    rd = torch.nn.functional.normalize(0.6 * (torch.rand(B, R, 3, generator=g) - 0.5) - cam, dim=-1).to(dtype)
    near, far, _ = reference.ray_box_bounds(ro, rd, 2.0)
    dz = reference.stratified_depths(near, far, S)
    tgt = near + 0.5 * (far - near)
    dec = [(torch.randn(Hd, C, generator=g) / math.sqrt(C)).to(dtype), (0.1 * torch.randn(Hd, generator=g)).to(dtype),
           (torch.randn(1 + D, Hd, generator=g) / math.sqrt(Hd)).to(dtype),
           (0.1 * torch.randn(1 + D, generator=g) + 1).to(dtype)]
    for d in dec:
        d.requires_grad_(True)
    out = K.render_triplanes(planes, ro, rd, dz, *dec, target_depth=tgt, levels=3, backend=backend)
    gg = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=gg, dtype=torch.float64).to(dtype)).sum() for o in out)
    return list(out) + list(torch.autograd.grad(loss, [planes, *dec]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("C,hidden", [(32, 64), (64, 64), (48, 40), (33, 17)])
def test_cpu_render_wide_matches_reference(dtype, C, hidden):
    ref = _run("torch", torch.float64, C, hidden)
    low = _run("torch", dtype, C, hidden)
    got = _run("cpu", dtype, C, hidden)
    eps = torch.finfo(dtype).eps
    for n, r, lo, g in zip(NAMES, ref, low, got):
        err_ref = (lo.double() - r).abs().max().item()
        err = (g.double() - r).abs().max().item()
        assert err <= 2 * err_ref + 64 * eps * (1 + r.abs().max().item()), (n, err, err_ref)
