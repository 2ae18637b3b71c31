"""g3dr_kernels.composite: every compiled/Triton backend against the reference (values and gradients),
the depth-kernel gradient scaling, gradcheck/opcheck/torch.compile, bad input, hand-computed values and
numerical corner cases (alpha -> 1, delta = 0).

Tolerances (see `_check`): a backend at precision p may differ from the float64 reference by at most
twice the error of the reference itself computed at p (FlashAttention's rule), plus a floor of a few
ulps of p times the size of the values, which covers summation-order differences over the S-1 intervals
when the reference happens to be exact.
"""
from __future__ import annotations

import math

import pytest
import torch

import g3dr_kernels as gk
from g3dr_kernels import DepthKernel, reference
from _util import HAS_CUDA, backend_params, grads

BACKENDS = backend_params("composite")
KERNEL = DepthKernel()
OUTPUTS = ("rgb", "depth", "opacity", "weights")


def _inputs(B, R, S, D, dtype, device, *, target=True, seed=0, sigma_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.randn(B, R, S, generator=g, dtype=torch.float64) * sigma_scale
    rgb = torch.rand(B, R, S, D, generator=g, dtype=torch.float64)
    depths = torch.sort(1 + 2 * torch.rand(B, R, S, generator=g, dtype=torch.float64), dim=-1).values
    # Targets near the samples, so the kernel takes values between c_min and c_max.
    tgt = (1 + 2 * torch.rand(B, R, generator=g, dtype=torch.float64)) if target else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(sigma), cast(rgb), cast(depths), cast(tgt)


def _run(backend, sigma, rgb, depths, target, *, white=False, kernel=KERNEL, return_weights=True, seed=1):
    """Outputs and gradients (to sigma and rgb) of a random linear loss on every output."""
    sigma = sigma.detach().clone().requires_grad_(True)
    rgb = rgb.detach().clone().requires_grad_(True)
    out = gk.composite(sigma, rgb, depths, target_depth=target, kernel=kernel, white_background=white,
                       return_weights=return_weights, backend=backend)
    g = grads(list(out), {"sigma": sigma, "rgb": rgb}, seed=seed)
    return dict(zip(OUTPUTS, out), grad_sigma=g["sigma"], grad_rgb=g["rgb"])


def _check(got: dict, lo: dict, ref: dict, dtype) -> None:
    """got: backend at `dtype`; lo: reference at `dtype`; ref: reference in float64 (same inputs)."""
    eps = torch.finfo(dtype).eps
    for name, want in ref.items():
        if want is None:
            assert got[name] is None, name
            continue
        assert got[name].shape == want.shape, f"{name}: {tuple(got[name].shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        if want.numel() == 0:
            continue
        err_ref = (lo[name].double().cpu() - want).abs().max().item()
        tol = 2 * err_ref + 16 * eps * (1 + want.abs().max().item())
        err = (got[name].double().cpu() - want).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (reference's own error {err_ref:.3g})"


def _compare(backend, device, dtype, B, R, S, D, *, target, white, return_weights=True, kernel=KERNEL, seed=0,
             make=None):
    sigma, rgb, depths, tgt = (make or _inputs)(B, R, S, D, torch.float64, "cpu", target=target, seed=seed)
    ref = _run("torch", sigma, rgb, depths, tgt, white=white, kernel=kernel, return_weights=return_weights)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    lo = _run("torch", cast(sigma), cast(rgb), cast(depths), cast(tgt), white=white, kernel=kernel,
              return_weights=return_weights)
    dev = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    got = _run(backend, dev(sigma), dev(rgb), dev(depths), dev(tgt), white=white, kernel=kernel,
               return_weights=return_weights)
    _check(got, lo, ref, dtype)
    return got, ref


SHAPES = [(2, 3, 2, 3), (1, 0, 9, 3), (2, 5, 9, 1), (1, 4, 33, 32), (2, 6, 64, 3), (1, 3, 200, 3)]


def _dtypes(backend):
    return (torch.float32, torch.float64) if backend == "cpu" else (torch.float32,)


@pytest.mark.parametrize("backend_dev", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}R{}S{}D{}".format(*s))
@pytest.mark.parametrize("target", [False, True], ids=["no_target", "target"])
@pytest.mark.parametrize("white", [False, True], ids=["black", "white"])
def test_matches_reference(backend_dev, shape, target, white):
    backend, device = backend_dev
    for dtype in _dtypes(backend):
        _compare(backend, device, dtype, *shape, target=target, white=white)


@pytest.mark.parametrize("backend_dev", BACKENDS)
@pytest.mark.parametrize("target", [False, True], ids=["no_target", "target"])
def test_without_weights(backend_dev, target):
    """return_weights=False: weights is None, the other outputs and all gradients still match."""
    backend, device = backend_dev
    got, _ = _compare(backend, device, torch.float32, 2, 4, 17, 3, target=target, white=True, return_weights=False)
    assert got["weights"] is None


@pytest.mark.parametrize("backend_dev", BACKENDS)
def test_non_contiguous(backend_dev):
    backend, device = backend_dev
    B, R, S, D = 2, 5, 12, 3

    def make(B, R, S, D, dtype, device, target, seed):
        s, c, d, t = _inputs(B, R, S, D, dtype, device, target=target, seed=seed)
        # Same values, laid out as views: transposed storage and a strided colour channel.
        s = s.transpose(1, 2).contiguous().transpose(1, 2)
        c = torch.cat([c, torch.zeros_like(c)], dim=-1)[..., :D]
        d = d.transpose(0, 1).contiguous().transpose(0, 1)
        t = t.t().contiguous().t()
        assert not (s.is_contiguous() or c.is_contiguous() or d.is_contiguous() or t.is_contiguous())
        return s, c, d, t

    # (_compare's .to() casts keep these layouts where it can; the direct call below certainly does)
    for dtype in _dtypes(backend):
        _compare(backend, device, dtype, B, R, S, D, target=True, white=False, make=make)
    s, c, d, t = make(B, R, S, D, torch.float32, device, True, 0)
    out = gk.composite(s, c, d, target_depth=t, backend=backend)
    want = reference.composite(s.cpu().contiguous(), c.cpu().contiguous(), d.cpu().contiguous(),
                               target_depth=t.cpu().contiguous())
    for name, a, b in zip(OUTPUTS, out, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# The depth-kernel gradient scaling
# --------------------------------------------------------------------------------------------------

def _k(kernel, target, t_mid):
    return torch.clamp(kernel.s1 * torch.exp(-(target.unsqueeze(-1) - t_mid) ** 2 / kernel.s2), kernel.c_min,
                       kernel.c_max)


CUSTOM = DepthKernel(s1=2.0, s2=0.05, c_min=0.2, c_max=0.9)


@pytest.mark.parametrize("kernel", [KERNEL, CUSTOM], ids=["default", "custom"])
def test_scaling_reference(kernel):
    """On the intervals: grads with a target == k(target, t_i) * grads without, per interval; the
    clamp bounds hold and are reached; forward values are unchanged."""
    B, R, I, D = 2, 6, 24, 3
    g = torch.Generator().manual_seed(3)
    sm = torch.randn(B, R, I, generator=g, dtype=torch.float64)
    cm = torch.rand(B, R, I, D, generator=g, dtype=torch.float64)
    t_mid = torch.linspace(1, 3, I, dtype=torch.float64).expand(B, R, I).contiguous()
    delta = torch.full((B, R, I), 2 / I, dtype=torch.float64)
    target = 1.5 + torch.rand(B, R, generator=g, dtype=torch.float64)
    res = {}
    for name, tgt in (("plain", None), ("scaled", target)):
        s, c = sm.clone().requires_grad_(), cm.clone().requires_grad_()
        out = reference.composite_intervals(s, c, t_mid, delta, target_depth=tgt, kernel=kernel)
        gr = grads(list(out), {"s": s, "c": c})
        res[name] = (out, gr)
    for a, b in zip(res["plain"][0], res["scaled"][0]):
        assert torch.equal(a, b), "the target must not change forward values"
    k = _k(kernel, target, t_mid)
    assert k.min().item() == pytest.approx(kernel.c_min) and k.max().item() == pytest.approx(kernel.c_max), \
        "the test data must reach both clamp bounds"
    torch.testing.assert_close(res["scaled"][1]["s"], k * res["plain"][1]["s"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res["scaled"][1]["c"], k.unsqueeze(-1) * res["plain"][1]["c"], rtol=1e-12, atol=1e-15)
    ratio = res["scaled"][1]["s"] / res["plain"][1]["s"]
    assert (ratio >= kernel.c_min - 1e-12).all() and (ratio <= kernel.c_max + 1e-12).all()


@pytest.mark.parametrize("backend_dev", BACKENDS)
@pytest.mark.parametrize("kernel", [KERNEL, CUSTOM], ids=["default", "custom"])
def test_scaling_backend(backend_dev, kernel):
    """With S = 2 a ray is one interval, so every sample's gradient is that interval's: grads with a
    target == k * grads without, ray by ray; kernel parameters honoured; forward unchanged; and longer
    rays match the reference with the same kernel."""
    backend, device = backend_dev
    B, R, D = 1, 64, 3
    g = torch.Generator().manual_seed(4)
    sigma = torch.randn(B, R, 2, generator=g).to(device)
    rgb = torch.rand(B, R, 2, D, generator=g).to(device)
    depths = torch.tensor([1.0, 1.1]).expand(B, R, 2).contiguous().to(device)
    target = torch.linspace(0.6, 1.5, R).reshape(B, R).to(device)  # sweeps the kernel from c_min to c_max
    plain = _run(backend, sigma, rgb, depths, None, kernel=kernel)
    scaled = _run(backend, sigma, rgb, depths, target, kernel=kernel)
    for name in OUTPUTS:
        assert torch.equal(plain[name], scaled[name]), f"{name}: the target must not change forward values"
    k = _k(kernel, target.cpu().double(), torch.full((B, R, 1), 1.05, dtype=torch.float64)).float()
    assert k.min().item() == pytest.approx(kernel.c_min) and k.max().item() == pytest.approx(kernel.c_max)
    # float32: the scaled gradient is one more rounding of the same product
    torch.testing.assert_close(scaled["grad_sigma"].cpu(), k * plain["grad_sigma"].cpu(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scaled["grad_rgb"].cpu(), k.unsqueeze(-1) * plain["grad_rgb"].cpu(), rtol=1e-5,
                               atol=1e-7)
    for dtype in _dtypes(backend):
        _compare(backend, device, dtype, 2, 3, 20, 3, target=True, white=True, kernel=kernel)


# --------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile (CPU)
# --------------------------------------------------------------------------------------------------

cpu_only = pytest.mark.skipif(not gk._backend.has_kernel("composite", "cpu"),
                              reason="the C++ extension with the composite kernel is not built")


@cpu_only
@pytest.mark.parametrize("white", [False, True], ids=["black", "white"])
def test_gradcheck_cpu(white):
    sigma, rgb, depths, _ = _inputs(1, 3, 6, 2, torch.float64, "cpu", target=False, sigma_scale=1.0)
    sigma.requires_grad_()
    rgb.requires_grad_()
    fn = lambda s, c: tuple(gk.composite(s, c, depths, white_background=white, backend="cpu"))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (sigma, rgb), eps=1e-6, atol=1e-8)


@cpu_only
@pytest.mark.parametrize("target", [False, True], ids=["no_target", "target"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_opcheck_cpu(target, need_weights):
    from g3dr_kernels.ops import composite as op  # noqa: F401  (registers torch.ops.g3dr.composite_fwd)
    sigma, rgb, depths, tgt = _inputs(2, 3, 7, 3, torch.float32, "cpu", target=target)
    args = (sigma.requires_grad_(), rgb.requires_grad_(), depths, tgt, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, True,
            need_weights, "cpu")
    torch.library.opcheck(torch.ops.g3dr.composite_fwd.default, args)


@cpu_only
def test_torch_compile_cpu():
    sigma, rgb, depths, tgt = _inputs(2, 4, 9, 3, torch.float32, "cpu")

    def loss(s, c):
        out = gk.composite(s, c, depths, target_depth=tgt, white_background=True, backend="cpu")
        return out.rgb.square().sum() + out.depth.sum() + out.weights.sum()

    s1, c1 = sigma.clone().requires_grad_(), rgb.clone().requires_grad_()
    s2, c2 = sigma.clone().requires_grad_(), rgb.clone().requires_grad_()
    eager = loss(s1, c1)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(s2, c2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(s2.grad, s1.grad)
    torch.testing.assert_close(c2.grad, c1.grad)


# --------------------------------------------------------------------------------------------------
# Bad input; a hand-computed ray; numerics
# --------------------------------------------------------------------------------------------------

ALL_BACKENDS = [pytest.param(("torch", "cpu"), id="torch")] + BACKENDS


@pytest.mark.parametrize("backend_dev", ALL_BACKENDS)
def test_bad_input(backend_dev):
    backend, device = backend_dev
    sigma, rgb, depths, tgt = _inputs(2, 3, 5, 3, torch.float32, device)
    with pytest.raises(ValueError, match=r"S >= 2.*2x3x1"):
        gk.composite(sigma[..., :1], rgb[..., :1, :], depths[..., :1], backend=backend)
    with pytest.raises(ValueError, match=r"2x3x5.*ascending"):
        gk.composite(sigma, rgb, depths.flip(-1), backend=backend)
    with pytest.raises(ValueError, match=r"target_depth.*2x3.*3x2"):
        gk.composite(sigma, rgb, depths, target_depth=tgt.t().contiguous(), backend=backend)
    nan_depths = depths.clone()
    nan_depths[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"2x3x5.*NaN"):
        gk.composite(sigma, rgb, nan_depths, backend=backend)
    with pytest.raises(ValueError, match=r"rgb \[2x3x4x3\]"):
        gk.composite(sigma, rgb[:, :, :4], depths, backend=backend)


@cpu_only
def test_op_boundary_checks_cpu():
    """The C++ op checks shapes itself (for callers that skip the Python wrapper)."""
    sigma, rgb, depths, tgt = _inputs(2, 3, 5, 3, torch.float32, "cpu")
    fwd = torch.ops.g3dr_C.composite_fwd
    with pytest.raises(RuntimeError, match=r"\[2, 3, 5\].*\[2, 3, 4, 3\]"):
        fwd(sigma, rgb[:, :, :4], depths, None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
    with pytest.raises(RuntimeError, match=r"target must be \[B,R\].*\[3, 2\]"):
        fwd(sigma, rgb, depths, tgt.t(), 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
    with pytest.raises(RuntimeError, match=r"S >= 2"):
        fwd(sigma[..., :1], rgb[..., :1, :], depths[..., :1], None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
    with pytest.raises(RuntimeError, match=r"float32 and float64 only"):
        fwd(sigma.half(), rgb.half(), depths.half(), None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True)
    out = fwd(sigma, rgb, depths, None, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, False)
    assert out[3].numel() == 0, "need_weights=False must not write weights"


@pytest.mark.parametrize("backend_dev", ALL_BACKENDS)
@pytest.mark.parametrize("white", [False, True], ids=["black", "white"])
def test_hand_computed(backend_dev, white):
    """Two intervals of length 1 with softplus(sigma_mid + 0) = ln 2, so alpha = 1/2 on each:
    w = [1/2, 1/4 (1 + 2e-10)], opacity 3/4, rgb = w0 c0 + w1 c1, depth = (w0 0.5 + w1 1.5) / (3/4 + eps).
    d opacity / d sigma_mid_i = (1 - alpha_other) * exp(-x) * delta * sigmoid(0) = 1/8 for both intervals,
    so d opacity / d sigma = [1/16, 1/8, 1/16]."""
    backend, device = backend_dev
    f64 = backend in ("torch", "cpu")
    dt = torch.float64 if f64 else torch.float32
    sigma = torch.zeros(1, 1, 3, dtype=dt, device=device, requires_grad=True)
    rgb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=dt, device=device).reshape(1, 1, 3, 2)
    depths = torch.tensor([0.0, 1.0, 2.0], dtype=dt, device=device).reshape(1, 1, 3)
    eps = 1e-3
    out = gk.composite(sigma, rgb, depths, density_bias=0.0, eps=eps, white_background=white, backend=backend)
    w1 = 0.25 * (1 + 2e-10)
    bg = (1 - 0.5 - w1) if white else 0.0
    want_rgb = torch.tensor([0.5 * 1 + w1 * 0.5 + bg, w1 * 0.5 + bg], dtype=torch.float64)
    tol = dict(rtol=1e-12, atol=1e-12) if f64 else dict(rtol=1e-6, atol=1e-7)  # a few ulps of the precision
    torch.testing.assert_close(out.weights.double().cpu().reshape(2), torch.tensor([0.5, w1], dtype=torch.float64), **tol)
    torch.testing.assert_close(out.opacity.double().cpu().reshape(()), torch.tensor(0.5 + w1, dtype=torch.float64), **tol)
    torch.testing.assert_close(out.rgb.double().cpu().reshape(2), want_rgb, **tol)
    want_depth = (0.5 * 0.5 + w1 * 1.5) / (0.5 + w1 + eps)
    torch.testing.assert_close(out.depth.double().cpu().reshape(()), torch.tensor(want_depth, dtype=torch.float64),
                               **tol)
    (gs,) = torch.autograd.grad(out.opacity.sum(), sigma)
    # (the 1e-10 of the transmittance shifts these by ~1e-11)
    torch.testing.assert_close(gs.double().cpu().reshape(3), torch.tensor([1 / 16, 1 / 8, 1 / 16], dtype=torch.float64),
                               rtol=1e-9 if f64 else 1e-6, atol=1e-9 if f64 else 1e-7)


def _tricky(B, R, S, D, dtype, device, target=True, seed=0):
    """Rays with saturated intervals (alpha -> 1), zero-length intervals and all-equal depths."""
    sigma, rgb, depths, tgt = _inputs(B, R, S, D, dtype, device, target=target, seed=seed)
    sigma = sigma.clone()
    depths = depths.clone()
    sigma[:, 0, S // 3:S // 2] = 1e4        # alpha = 1 exactly at any precision
    sigma[:, 1, :] = 60.0                   # every interval nearly opaque, transmittance underflows
    sigma[:, 2, 1] = 1e30                   # one enormous density (softplus above its threshold)
    depths[:, 3, :] = 2.0                   # identical depths: delta = 0 everywhere, nothing rendered
    depths[:, 4, 2:5] = depths[:, 4, 2:3]   # repeated depths: zero-length intervals inside a ray
    sigma[:, 4, 2:5] = 1e4
    return sigma, rgb, depths, tgt


@pytest.mark.parametrize("backend_dev", BACKENDS)
@pytest.mark.parametrize("target", [False, True], ids=["no_target", "target"])
@pytest.mark.parametrize("white", [False, True], ids=["black", "white"])
def test_numerics(backend_dev, target, white):
    backend, device = backend_dev
    for dtype in _dtypes(backend):
        got, ref = _compare(backend, device, dtype, 2, 6, 16, 3, target=target, white=white, make=_tricky)
        for name, v in ref.items():
            assert v is None or torch.isfinite(v).all(), f"reference {name} is not finite: the test data is wrong"
        assert (got["opacity"][:, 3] == 0).all() and (got["depth"][:, 3] == 0).all()
        assert (got["grad_sigma"][:, 3] == 0).all()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_half(dtype):
    if not gk._backend.has_kernel("composite", "cuda"):
        pytest.skip("the extension was built without the CUDA composite kernel")
    # Inputs rounded to `dtype` first, so the reference sees the same values the kernel does.
    sigma, rgb, depths, tgt = (t.to(dtype) for t in _inputs(2, 8, 33, 3, torch.float64, "cpu"))
    up = lambda t: t.double()  # noqa: E731
    ref = _run("torch", up(sigma), up(rgb), up(depths), up(tgt), white=True)
    got = _run("cuda", sigma.cuda(), rgb.cuda(), depths.cuda(), tgt.cuda(), white=True)
    # fp32 accumulation: what is left is rounding the inputs' sums and the outputs to `dtype`, a few ulps
    # of values of size ~1 (rgb, weights, gradients) or ~3 (depth), growing with the S-1 = 32 terms.
    ulp = torch.finfo(dtype).eps
    for name, want in ref.items():
        err = (got[name].double().cpu() - want).abs().max().item()
        assert err <= 8 * ulp * (1 + want.abs().max().item()) * math.sqrt(32), f"{name}: {err:.3g}"
