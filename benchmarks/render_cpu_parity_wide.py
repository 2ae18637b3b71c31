"""cpu fused render vs the reference at channel / hidden widths that reach the CPU kernel's vector paths
(csrc/cpu/taps.h gathers channels in blocks of 32 floats / 16 doubles, csrc/cpu/tile_gemm.h's register
blocks need 32 / 16 columns): tests/test_render.py's cases use C <= 6, which only run the scalar tails.
Same tolerance as tests/test_render.py::_check (2x the reference's own error at the dtype + 64 eps),
values and every gradient, float32 and float64; exits 1 on a mismatch. Breaking the vector gather (one
block read twice) makes every case fail here (checked once, 2026-11-30), while tests/test_render.py passes.

Run: PYTHONPATH=$PWD python benchmarks/render_cpu_parity_wide.py   (about 10 s)
"""
import math
import sys

import torch

import g3dr_kernels as K
from g3dr_kernels import reference
torch.manual_seed(0)
failed = False
def run(backend, dtype, C, Hd, B=2, R=37, S=19, H=16, D=3):
    g = torch.Generator().manual_seed(1)
    planes = (0.5 * torch.randn(B, 3, C, H, H, generator=g)).to(dtype).requires_grad_(True)
    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3, generator=g), dim=-1) * 2.7
    ro = cam.expand(B, R, 3).contiguous().to(dtype)
    rd = torch.nn.functional.normalize(0.6 * (torch.rand(B, R, 3, generator=g) - 0.5) - cam, dim=-1).to(dtype)
    near, far, _ = reference.ray_box_bounds(ro, rd, 2.0)
    dz = reference.stratified_depths(near, far, S)
    tgt = near + 0.5 * (far - near)
    dec = [(torch.randn(Hd, C, generator=g) / math.sqrt(C)).to(dtype), (0.1 * torch.randn(Hd, generator=g)).to(dtype),
           (torch.randn(1 + D, Hd, generator=g) / math.sqrt(Hd)).to(dtype), (0.1 * torch.randn(1 + D, generator=g) + 1).to(dtype)]
    for d in dec: d.requires_grad_(True)
    out = K.render_triplanes(planes, ro, rd, dz, *dec, target_depth=tgt, levels=3, backend=backend)
    gg = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=gg, dtype=torch.float64).to(dtype)).sum() for o in out)
    grads = torch.autograd.grad(loss, [planes, *dec])
    return list(out) + list(grads)
names = ["rgb", "depth", "opacity", "weights", "gplanes", "gw1", "gb1", "gw2", "gb2"]
for dtype in (torch.float32, torch.float64):
    for C, Hd in ((32, 64), (64, 64), (48, 40), (33, 17)):
        ref = run("torch", torch.float64, C, Hd)
        lo = run("torch", dtype, C, Hd)
        got = run("cpu", dtype, C, Hd)
        eps = torch.finfo(dtype).eps
        bad = []
        for n, r, l, g in zip(names, ref, lo, got):
            er = (l.double() - r).abs().max().item(); e = (g.double() - r).abs().max().item()
            tol = 2 * er + 64 * eps * (1 + r.abs().max().item())
            if not e <= tol: bad.append(f"{n}: {e:.3g} > {tol:.3g}")
        failed = failed or bool(bad)
        print(dtype, C, Hd, "OK" if not bad else bad, "opacity max", round(ref[2].max().item(), 3))
sys.exit(1 if failed else 0)
