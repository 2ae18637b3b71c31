"""Triton compositing kernels (g3dr_kernels/triton/composite.py) against the reference.

Runs on a GPU when there is one, else under TRITON_INTERPRET=1 on CPU tensors (set by conftest), where
the interpreter is slow: shapes stay small (R*S in the low thousands).

Tolerances. fp32 kernel results are compared with the float64 reference (the exact answer for these
inputs) and must be within 2x the error of the float32 reference, plus a floor of a few fp32 ulps of
the output's scale (some outputs are exact in the float32 reference, which leaves no error to double);
fp16/bf16 the same way against the reference at fp16/bf16. float64 kernel results: rtol 1e-9, with
kernel constants that fp32 holds exactly (KERNEL64, EPS64), because Triton passes float scalars as fp32
(0.03 -> 0.03 +- 1e-9 would move k by up to ~2e-7 relative).
"""
from __future__ import annotations

import pytest
import torch

import g3dr_kernels as gk
from g3dr_kernels import DepthKernel, reference
from g3dr_kernels.triton import composite as tc

from _util import backend_params

KERNEL64 = DepthKernel(s1=1.25, s2=0.03125, c_min=0.0625, c_max=1.0)  # exact in fp32
EPS64 = 2.0 ** -10
PARAMS = [p for p in backend_params("composite", include_cuda=False) if p.id == "triton"]


@pytest.fixture(params=PARAMS)
def dev(request):
    return request.param[1]


def make(B, R, S, D, dev, dtype=torch.float32, sigma_scale=3.0, target=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.randn(B, R, S, generator=g, dtype=torch.float64) * sigma_scale
    rgb = torch.rand(B, R, S, D, generator=g, dtype=torch.float64)
    depths = 1 + torch.sort(torch.rand(B, R, S, generator=g, dtype=torch.float64) * 2, -1).values
    tgt = 1 + 2 * torch.rand(B, R, generator=g, dtype=torch.float64) if target else None
    cast = lambda t: None if t is None else t.to(dev, dtype)  # noqa: E731
    return cast(sigma), cast(rgb), cast(depths), cast(tgt)


def run(fn, sigma, rgb, depths, target, loss_w=None, **kw):
    """Outputs and gradients of sum(out * loss_w) w.r.t. sigma and rgb (loss_w: fixed random weights)."""
    s, c = sigma.detach().clone().requires_grad_(), rgb.detach().clone().requires_grad_()
    out = fn(s, c, depths, target_depth=target, **kw)
    outs = [o for o in out if o is not None]
    if loss_w is None:
        g = torch.Generator().manual_seed(1)
        loss_w = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, loss_w))
    gs, gc = torch.autograd.grad(loss, [s, c])
    return [o.detach() for o in outs] + [gs, gc], loss_w


def triton_fn(*a, **kw):
    return gk.composite(*a, backend="triton", **kw)


def reference_fn(*a, return_weights=True, **kw):
    out = reference.composite(*a, **kw)
    return out if return_weights else out._replace(weights=None)


def check_against_reference(sigma, rgb, depths, target, **kw):
    """Triton at sigma.dtype vs the float64 reference: error at most 2x that of the reference at
    sigma.dtype, plus a floor of 8 ulps of the output's scale (a GPU's tl.exp is ex2.approx: ~2 ulps)."""
    low = sigma.dtype
    got, w = run(triton_fn, sigma, rgb, depths, target, **kw)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    exact, _ = run(reference_fn, d(sigma), d(rgb), d(depths), d(target), loss_w=w, **kw)
    lo = lambda t: None if t is None else t.to(low)  # noqa: E731
    approx, _ = run(reference_fn, lo(sigma), lo(rgb), lo(depths), lo(target), loss_w=w, **kw)
    names = ["rgb", "depth", "opacity", "weights"][:len(got) - 2] + ["grad_sigma", "grad_rgb"]
    assert len(got) == len(exact)
    ulp = torch.finfo(low).eps
    for name, g_, e, a in zip(names, got, exact, approx):
        assert g_.shape == e.shape and g_.dtype == sigma.dtype, (name, g_.shape, e.shape, g_.dtype)
        assert torch.isfinite(g_).all(), name
        err = (g_.double() - e).abs().max().item() if e.numel() else 0.0
        ref_err = (a.double() - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        assert err <= 2 * ref_err + 8 * ulp * max(scale, 1.0), f"{name}: error {err:.3g}, reference {ref_err:.3g}"
    return got


FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (target, white_bg)


# S = 200 with two of the four flag pairs only: the interpreter takes ~3 s per S = 200 case
@pytest.mark.parametrize("S,target,white_bg", [(S, *f) for S in (2, 9, 33, 64) for f in FLAGS]
                         + [(200, False, True), (200, True, False)])
def test_values_and_grads_vs_reference(dev, S, target, white_bg):
    """rgb, depth, opacity, weights and the gradients to sigma and rgb (through every output)."""
    sigma, rgb, depths, tgt = make(2, 3, S, 3, dev, target=target)
    check_against_reference(sigma, rgb, depths, tgt, white_background=white_bg)


@pytest.mark.parametrize("D", [1, 3, 32])
@pytest.mark.parametrize("S", [9, 64])
def test_channels(dev, D, S):
    sigma, rgb, depths, tgt = make(1, 5, S, D, dev)
    check_against_reference(sigma, rgb, depths, tgt, white_background=D == 3)


def test_many_rays_several_programs(dev):
    """More rays than one program's block (BLOCK_R <= 128), with a partial last block."""
    sigma, rgb, depths, tgt = make(3, 50, 5, 3, dev)
    assert tc._launch_config(150, 3)[0] < 150
    check_against_reference(sigma, rgb, depths, tgt, white_background=True)


def test_large_S(dev):
    sigma, rgb, depths, tgt = make(1, 2, 512, 3, dev, sigma_scale=1.0)
    check_against_reference(sigma, rgb, depths, tgt)


@pytest.mark.parametrize("target", [False, True])
def test_float64(dev, target):
    sigma, rgb, depths, tgt = make(2, 3, 17, 4, dev, dtype=torch.float64, target=target)
    kw = dict(kernel=KERNEL64, eps=EPS64, white_background=True)
    got, w = run(triton_fn, sigma, rgb, depths, tgt, **kw)
    want, _ = run(reference.composite, sigma, rgb, depths, tgt, loss_w=w, **kw)
    for g_, e in zip(got, want):
        torch.testing.assert_close(g_, e, rtol=1e-9, atol=1e-12)  # fp64 sums of 16 terms: ~1e-15


@pytest.mark.parametrize("dtype,weights", [(torch.float16, True), (torch.bfloat16, True), (torch.float16, False)])
def test_low_precision(dev, dtype, weights):
    """fp16/bf16 take the full first scan for the total (the saved outputs are rounded copies)."""
    sigma, rgb, depths, tgt = make(2, 3, 33, 3, dev, dtype=dtype)
    check_against_reference(sigma, rgb, depths, tgt, white_background=True, return_weights=weights)


def test_gradcheck_float64(dev):
    """Without a target the backward is the true gradient, including through the weights output."""
    sigma, rgb, depths, _ = make(1, 3, 6, 2, dev, dtype=torch.float64, target=False)
    sigma.requires_grad_()
    rgb.requires_grad_()

    def f(s, c):
        return tuple(triton_fn(s, c, depths, white_background=True))

    # fast mode (random directional derivatives): a few kernel calls, the interpreter is slow
    assert torch.autograd.gradcheck(f, (sigma, rgb), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("which", ["weights", "depth", "rgb"])
def test_single_output_grads(dev, which):
    """Gradient through one output alone (the other incoming gradients are None)."""
    sigma, rgb, depths, tgt = make(2, 3, 9, 3, dev)
    grads = []
    for fn in (triton_fn, reference.composite):
        s, c = sigma.clone().requires_grad_(), rgb.clone().requires_grad_()
        out = getattr(fn(s, c, depths, target_depth=tgt), which)
        w = torch.linspace(-1, 1, out.numel(), device=dev, dtype=out.dtype).reshape(out.shape)
        gs = torch.autograd.grad((out * w).sum(), [s, c], allow_unused=True)
        grads.append([torch.zeros_like(x) if g_ is None else g_ for g_, x in zip(gs, (s, c))])
    for g_, e in zip(*grads):
        torch.testing.assert_close(g_, e, rtol=1e-4, atol=1e-6)  # fp32 vs fp32 reference, S=9: ~1e-7


def test_no_weights(dev):
    sigma, rgb, depths, tgt = make(2, 3, 9, 3, dev)
    out = triton_fn(sigma, rgb, depths, return_weights=False)
    assert out.weights is None
    raw = tc.composite_fwd(sigma, rgb, depths, None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, False)
    assert raw[3].numel() == 0
    check_against_reference(sigma, rgb, depths, tgt, return_weights=False)


def interval_grads(g_samples):
    """Undo the sample split: g_sample_j = (g_int_{j-1} + g_int_j) / 2 along dim 2."""
    out, prev = [], torch.zeros_like(g_samples[:, :, 0])
    for j in range(g_samples.shape[2] - 1):
        prev = 2 * g_samples[:, :, j] - prev
        out.append(prev)
    return torch.stack(out, 2)


@pytest.mark.parametrize("white_bg", [False, True])
def test_scaling_is_k_times_unscaled(dev, white_bg):
    """Interval by interval: the mid-density and mid-colour gradients with a target are k(target, t_i)
    times those without, and the forward values do not change."""
    kern = KERNEL64
    sigma, rgb, depths, tgt = make(2, 3, 12, 3, dev, dtype=torch.float64)
    tgt = depths[:, :, 5] + 0.01  # k spans c_min..c_max along each ray
    plain, w = run(triton_fn, sigma, rgb, depths, None, kernel=kern, white_background=white_bg)
    scaled, _ = run(triton_fn, sigma, rgb, depths, tgt, loss_w=w, kernel=kern, white_background=white_bg)
    for a, b in zip(plain[:4], scaled[:4]):
        assert torch.equal(a, b)
    k = kern(tgt.unsqueeze(-1), 0.5 * (depths[..., 1:] + depths[..., :-1]))
    assert k.min() == kern.c_min and k.max() == kern.c_max and ((k > kern.c_min) & (k < kern.c_max)).any()
    gs_plain, gs_scaled = interval_grads(plain[4]), interval_grads(scaled[4])
    gc_plain, gc_scaled = interval_grads(plain[5]), interval_grads(scaled[5])
    assert gs_plain.abs().max() > 1e-3 and gc_plain.abs().max() > 1e-3
    # float64 throughout, k's constants exact in fp32: rounding only (the undoing of the sample split
    # adds up to 11 terms)
    torch.testing.assert_close(gs_scaled, k * gs_plain, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gc_scaled, k.unsqueeze(-1) * gc_plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("B,R", [(2, 0), (0, 3)])
def test_empty(dev, B, R):
    sigma, rgb, depths, tgt = make(B, R, 7, 3, dev)
    s, c = sigma.clone().requires_grad_(), rgb.clone().requires_grad_()
    out = triton_fn(s, c, depths, target_depth=tgt)
    assert out.rgb.shape == (B, R, 3) and out.depth.shape == (B, R) and out.weights.shape == (B, R, 6)
    (out.rgb.sum() + out.depth.sum() + out.weights.sum()).backward()
    assert s.grad.shape == s.shape and c.grad.shape == c.shape


def test_non_contiguous(dev):
    sigma, rgb, depths, tgt = make(3, 2, 9, 6, dev)
    sigma_nc = sigma.transpose(0, 1).contiguous().transpose(0, 1)
    rgb_nc = rgb[..., ::2]
    depths_nc = depths.transpose(0, 1).contiguous().transpose(0, 1)
    tgt_nc = tgt.t().contiguous().t()
    assert not (sigma_nc.is_contiguous() or rgb_nc.is_contiguous() or depths_nc.is_contiguous()
                or tgt_nc.is_contiguous())
    check_against_reference(sigma_nc, rgb_nc, depths_nc, tgt_nc, white_background=True)


def test_numerics_extremes(dev):
    """Huge densities (alpha == 1 exactly, e underflows), zero-length intervals (delta = 0), very
    negative densities (alpha ~ 0), alpha within 2^-24 of 1: everything finite, and as close to the float64 answer as the
    float32 reference is."""
    sigma, rgb, depths, tgt = make(1, 8, 16, 3, dev, sigma_scale=1.0)
    sigma[0, 0, 3:6] = 1e4                  # opaque surface early on the ray
    sigma[0, 1, :] = 60.0                   # every interval nearly opaque
    sigma[0, 2, :] = -80.0                  # empty ray: softplus ~ exp(-81)
    depths[0, 3, 4:8] = depths[0, 3, 4]     # delta = 0 for three intervals
    depths[0, 4, :] = depths[0, 4, 0]       # all intervals empty
    sigma[0, 5, 2] = 3e4                    # alpha -> 1 with delta = 0 beside it
    depths[0, 5, 2:4] = depths[0, 5, 2]
    # e = exp(-sp delta) just below fp32's 2^-24, where fl(1 - fl(1 - e)) = 0: 1 - alpha + 1e-10 is
    # then only right when formed from e
    depths[0, 6:] = 1 + 0.1 * torch.arange(16, device=dev)
    sigma[0, 6, 3:5] = 181.0                # sp delta = 18: e = 1.5e-8
    sigma[0, 7, 3:5] = 151.0                # sp delta = 15: e = 3e-7
    got = check_against_reference(sigma, rgb, depths, tgt, white_background=True)
    rgb_o, depth_o, opacity, weights, gs, gc = got
    assert opacity[0, 0] > 0.999 and opacity[0, 2] < 1e-6 and opacity[0, 4] == 0
    # behind the opaque surface of ray 0 nothing reaches the samples
    assert gs[0, 0, 8:].abs().max() < 1e-6 and gc[0, 0, 8:].abs().max() < 1e-6


def test_dtype_errors(dev):
    sigma, rgb, depths, _ = make(1, 2, 5, 3, dev)
    with pytest.raises(TypeError):
        tc.composite_fwd(sigma.int(), rgb.int(), depths.int(), None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
    with pytest.raises(TypeError):
        tc.composite_fwd(sigma, rgb.double(), depths, None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
    with pytest.raises(ValueError):
        tc.composite_fwd(sigma, torch.zeros(1, 2, 5, 65, device=dev), depths, None, 1.25, 0.03, 0.05, 1.0, -1.0,
                         1e-3, False, True)


def test_opcheck(dev):
    """The custom op with this backend: schema, fake kernel, autograd registration."""
    from g3dr_kernels.ops import composite as op
    sigma, rgb, depths, tgt = make(1, 2, 4, 3, dev)
    args = (sigma.requires_grad_(), rgb.requires_grad_(), depths, tgt, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, True,
            True, "triton")
    torch.library.opcheck(op.composite_fwd, args)


_AOT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from g3dr_kernels.triton import composite as tc

def build(jf, cst, elem, num_warps):
    sig = {n: ("*" + elem if n.endswith("_ptr") else "i32" if n in ("n_rays", "S", "D") else "fp32")
           for n in jf.arg_names}
    sig.update({n: "constexpr" for n in cst})
    src = ASTSource(jf, sig, constexprs={(jf.arg_names.index(n),): v for n, v in cst.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    assert k.asm["cubin"], "no cubin"

for elem, acc, d in (("fp32", tl.float32, 3), ("bf16", tl.float32, 32), ("fp64", tl.float64, 64)):
    br, bd, nw = tc._launch_config(10 ** 5, d)
    build(tc._composite_fwd_kernel, dict(WHITE_BG=True, NEED_WEIGHTS=True, ACC=acc, BLOCK_R=br, BLOCK_D=bd), elem, nw)
    build(tc._composite_bwd_kernel, dict(HAS_TARGET=True, WHITE_BG=True, HAS_GRAD_WEIGHTS=True,
                                         FIRST_PASS_FULL=elem == "bf16", ACC=acc, BLOCK_R=br, BLOCK_D=bd), elem, nw)
print("compiled")
"""


def test_compiles_for_sm90_without_gpu():
    """The interpreter accepts code the Triton compiler rejects (e.g. None in a returned tuple): compile
    both kernels for sm_90 (Triton's frontend, LLVM, ptxas), no GPU needed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no nvidia backend")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
