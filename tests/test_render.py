"""g3dr_kernels.render_triplanes (the fused renderer): every compiled/Triton backend against the unfused
reference composition (reference.render_triplanes = points -> sample_pyramid -> decode -> composite),
values and every gradient (each pyramid level, or the finest plane through the pyramid, and w1, b1,
w2, b2); float64 gradcheck, opcheck and torch.compile on the CPU kernel; the memory property that
the fused backward saves no per-sample tensor (and that the reference does, so the check can fail).

Tolerances (see `_check`): a backend at precision p may differ from the float64 reference by at most
twice the error of the reference itself computed at p (FlashAttention's rule), plus a floor of 64
ulps of p times the size of the values: the fused kernels sum the planes' gradients and the decoder's
weight gradients over every sample in another order than PyTorch's matmuls and grid_sample backward,
and the float CPU kernel evaluates softplus with its own polynomial (a few ulps).
"""
from __future__ import annotations

import math

import pytest
import torch

import g3dr_kernels as gk
from g3dr_kernels import DepthKernel, reference
from _util import HAS_CUDA, backend_params, grads

BACKENDS = backend_params("render")
cpu_only = pytest.mark.skipif(not gk._backend.has_kernel("render", "cpu"),
                              reason="the C++ extension with the render kernel is not built")
OUTPUTS = ("rgb", "depth", "opacity", "weights")
PARAMS = ("w1", "b1", "w2", "b2")


def _inputs(B, R, S, C, hidden, D, *, sizes=((9, 7), (4, 3), (2, 1)), target=True, miss=0.25, seed=0):
    """float64 CPU inputs: a finest-first pyramid of planes [B,3,C,H_l,W_l] (sizes per level), rays from
    cameras outside the box (a fraction `miss` aimed away from it: they composite to nothing), depths
    spread past both ends of the ray's span in the box (samples outside the box read zeros), a target
    depth inside the span, and an nn.Linear-like decoder."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    planes = [torch.randn(B, 3, C, h, w, **f64) for h, w in sizes]
    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3, **f64), dim=-1) * 2.5
    rays_o = (cam + 0.1 * torch.randn(B, R, 3, **f64)).contiguous()
    aim = 1.6 * (torch.rand(B, R, 3, **f64) - 0.5)
    rays_d = torch.nn.functional.normalize(aim - rays_o, dim=-1)
    away = torch.rand(B, R, 1, **f64) < miss
    rays_d = torch.where(away, -rays_d, rays_d)
    near, far, hit = reference.ray_box_bounds(rays_o, rays_d, 2.0)
    span = far - near
    depths = reference.stratified_depths(near - 0.2 * span, far + 0.2 * span, S, perturb=True, generator=g)
    depths = torch.where(hit.unsqueeze(-1), depths, torch.zeros_like(depths))
    tgt = near + span * (0.3 + 0.4 * torch.rand(B, R, **f64)) if target else None
    dec = dict(w1=torch.randn(hidden, C, **f64) / math.sqrt(C), b1=0.5 * torch.randn(hidden, **f64),
               w2=torch.randn(1 + D, hidden, **f64) / math.sqrt(hidden), b2=0.5 * torch.randn(1 + D, **f64))
    return dict(planes=planes, rays_o=rays_o, rays_d=rays_d, depths=depths, target=tgt, **dec)


def _run(backend, inp, dtype, device, *, pyramid=True, levels=None, white=False, return_weights=True,
         kernel=DepthKernel(), seed=1):
    """Outputs and gradients of a fixed random linear loss on every output. pyramid=False passes the
    finest level only (the pyramid is then built from it, and its gradient flows through)."""
    cast = lambda t: None if t is None else t.detach().to(device=device, dtype=dtype)  # noqa: E731
    planes = [cast(p).requires_grad_(True) for p in inp["planes"]]
    if not pyramid:
        planes = planes[:1]
    dec = {k: cast(inp[k]).requires_grad_(True) for k in PARAMS}
    L = levels or len(inp["planes"])
    out = gk.render_triplanes(planes if pyramid else planes[0], cast(inp["rays_o"]), cast(inp["rays_d"]),
                              cast(inp["depths"]), **dec, target_depth=cast(inp["target"]), kernel=kernel, levels=L,
                              white_background=white, return_weights=return_weights, backend=backend)
    wrt = {f"planes{i}": p for i, p in enumerate(planes)}
    wrt.update(dec)
    g = grads(list(out), wrt, seed=seed) if any(o is not None and o.numel() for o in out) else \
        {k: torch.zeros_like(v) for k, v in wrt.items()}
    res = dict(zip(OUTPUTS, out))
    res.update({f"grad_{k}": v for k, v in g.items()})
    return res


def _check(got: dict, lo: dict, ref: dict, dtype) -> None:
    """got: backend at `dtype`; lo: reference at `dtype`; ref: reference in float64 (same inputs)."""
    eps = torch.finfo(dtype).eps
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for name, want in ref.items():
        if want is None:
            assert got[name] is None, name
            continue
        assert got[name].shape == want.shape, f"{name}: {tuple(got[name].shape)} != {tuple(want.shape)}"
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype} != {dtype}"
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite values"
        if want.numel() == 0:
            continue
        err_ref = (lo[name].double().cpu() - want).abs().max().item()
        tol = 2 * err_ref + 64 * eps * (1 + want.abs().max().item())
        err = (got[name].double().cpu() - want).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (reference's own error {err_ref:.3g})"


def _compare(backend, device, dtype, inp, **kw):
    ref = _run("torch", inp, torch.float64, "cpu", **kw)
    lo = _run("torch", inp, dtype, "cpu", **kw)
    got = _run(backend, inp, dtype, device, **kw)
    _check(got, lo, ref, dtype)
    return got, ref


# (id, _inputs kwargs, _run kwargs): levels 1..3, D in {3, 32}, hidden in {16, 64}, B = 1 and > 1,
# with and without a target, white background, rays that miss, pyramid list or finest plane only.
CASES = [
    ("L3-list-target", dict(B=2, R=13, S=7, C=5, hidden=16, D=3), dict()),
    ("L3-finest-white", dict(B=1, R=11, S=6, C=4, hidden=64, D=3, target=False), dict(pyramid=False, white=True)),
    ("L2-D32", dict(B=2, R=7, S=5, C=3, hidden=16, D=32, sizes=((6, 8), (3, 4))), dict(white=True)),
    ("L1-hidden64", dict(B=1, R=9, S=9, C=6, hidden=64, D=3, sizes=((5, 5),)), dict()),
    ("L2-finest-noweights", dict(B=2, R=8, S=4, C=4, hidden=16, D=3, sizes=((8, 6), (4, 3))),
     dict(pyramid=False, return_weights=False)),
    ("all-miss", dict(B=1, R=5, S=4, C=3, hidden=16, D=3, miss=1.0), dict()),
    ("R0", dict(B=2, R=0, S=5, C=3, hidden=16, D=3), dict()),
]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(backend_device, dtype, case):
    backend, device = backend_device
    if dtype == torch.float64 and backend != "cpu":
        pytest.skip("float64 is a CPU-kernel (gradcheck) precision")
    _, make, run = case
    inp = _inputs(**make)
    got, ref = _compare(backend, device, dtype, inp, **run)
    if make["R"] > 0 and make.get("miss", 0.25) < 1:
        assert ref["opacity"].abs().max() > 0.05, "the case should put some density on the rays"
    if make.get("miss") == 1.0:  # missed rays: nothing composited, no gradient
        assert torch.all(got["opacity"] == 0) and all(torch.all(got[f"grad_{k}"] == 0) for k in PARAMS)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_many_rays_per_batch(backend_device):
    """Enough rays that the CPU backward splits a batch element over several chunks (each with its own
    plane-gradient buffer); S large enough for saturated intervals."""
    backend, device = backend_device
    slow = device == "cpu" and backend == "triton"  # the Triton interpreter: fewer rays, same saturation
    inp = _inputs(B=1, R=32 if slow else 300, S=24, C=4, hidden=16, D=3, sizes=((8, 8), (4, 4)), seed=3)
    inp["b2"][0] += 4.0  # dense: alpha -> 1 on many intervals
    _compare(backend, device, torch.float32, inp)


@cpu_only
def test_depth_kernel_scales_gradients():
    """With a target, only the gradients change (forward values are the same) and they match the
    reference's scaling; a kernel that is 1 everywhere gives the unscaled gradients."""
    inp = _inputs(B=1, R=6, S=6, C=3, hidden=16, D=3)
    scaled = _run("cpu", inp, torch.float64, "cpu")
    flat = _run("cpu", inp, torch.float64, "cpu", kernel=DepthKernel(s1=1.0, s2=1.0, c_min=1.0, c_max=1.0))
    no_t = _run("cpu", dict(inp, target=None), torch.float64, "cpu")
    for k in OUTPUTS:
        torch.testing.assert_close(scaled[k], no_t[k], rtol=0, atol=0)
    for k in ("grad_w1", "grad_planes0"):
        torch.testing.assert_close(flat[k], no_t[k], rtol=1e-12, atol=1e-12)
        assert (scaled[k] - no_t[k]).abs().max() > 1e-3


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_nan_in_planes_reaches_the_same_rays(backend_device):
    """A NaN texel makes exactly the rays that read it NaN, as in the reference."""
    backend, device = backend_device
    inp = _inputs(B=1, R=24, S=6, C=3, hidden=16, D=3, sizes=((6, 6),), miss=0.0)
    inp["planes"][0][0, 1, 2, 3, 2] = float("nan")
    ref = _run("torch", inp, torch.float32, "cpu", return_weights=False)
    got = _run(backend, inp, torch.float32, device, return_weights=False)
    for k in ("rgb", "depth", "opacity"):
        assert torch.equal(torch.isnan(got[k]).cpu(), torch.isnan(ref[k])), k
    assert torch.isnan(ref["depth"]).any() and not torch.isnan(ref["depth"]).all()


@cpu_only
def test_deterministic():
    inp = _inputs(B=1, R=200, S=8, C=4, hidden=16, D=3, sizes=((8, 8),))
    a = _run("cpu", inp, torch.float32, "cpu")
    b = _run("cpu", inp, torch.float32, "cpu")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@cpu_only
def test_deterministic_mode_ignores_thread_count():
    """The backward splits rays into per-thread chunks whose plane gradients are summed in a fixed order:
    reproducible for one thread count, but rounding differs between counts (docs/backends.md). Under
    torch.use_deterministic_algorithms(True) the split no longer depends on the thread count."""
    inp = _inputs(B=1, R=256, S=6, C=4, hidden=8, D=3, sizes=((8, 8),), seed=3)
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    runs = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run("cpu", inp, torch.float32, "cpu"))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
    for other in runs[1:]:
        for k in runs[0]:
            assert torch.equal(runs[0][k], other[k]), k


@cpu_only
def test_gradcheck_float64():
    inp = _inputs(B=1, R=3, S=4, C=2, hidden=4, D=2, sizes=((4, 3), (2, 2)), target=False, miss=0.0)
    planes = [p.clone().requires_grad_(True) for p in inp["planes"]]
    dec = [inp[k].clone().requires_grad_(True) for k in PARAMS]

    def f(p0, p1, w1, b1, w2, b2):
        out = gk.render_triplanes([p0, p1], inp["rays_o"], inp["rays_d"], inp["depths"], w1, b1, w2, b2, levels=2,
                                  backend="cpu")
        return tuple(out)

    assert torch.autograd.gradcheck(f, (*planes, *dec), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(dtype=torch.float32, target=True, need_weights=True):
    inp = _inputs(B=2, R=5, S=4, C=3, hidden=8, D=3, sizes=((6, 5), (3, 2)), target=target)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    levels = [c(p).requires_grad_(True) for p in inp["planes"]]
    dec = [c(inp[k]).requires_grad_(True) for k in PARAMS]
    k = DepthKernel()
    return (levels, c(inp["rays_o"]), c(inp["rays_d"]), c(inp["depths"]), *dec, c(inp["target"]), 1.0, 0, k.s1, k.s2,
            k.c_min, k.c_max, -1.0, 1e-3, False, need_weights, "cpu")


@cpu_only
@pytest.mark.parametrize("target", [True, False])
def test_opcheck(target):
    from g3dr_kernels.ops import render as ops
    args = _op_args(target=target)
    torch.library.opcheck(ops.render_fwd, args)
    out = ops.render_fwd(*args)
    levels, ro, rd, dz, w1, b1, w2, b2, tg, *rest = args
    params = rest[:-2]  # scale .. white_bg (without need_weights and backend)
    grads_in = [torch.randn_like(o) for o in out]
    bwd_args = (*grads_in[:3], grads_in[3], [lv.detach() for lv in levels], ro, rd, dz, w1.detach(), b1.detach(),
                w2.detach(), b2.detach(), tg, *(o.detach() for o in out[:3]), *params, "cpu")
    torch.library.opcheck(ops.render_bwd, bwd_args)


@cpu_only
def test_torch_compile_fullgraph():
    inp = _inputs(B=1, R=6, S=5, C=3, hidden=8, D=3, sizes=((6, 6), (3, 3)))
    dec = {k: inp[k].float().requires_grad_(True) for k in PARAMS}
    planes = inp["planes"][0].float().requires_grad_(True)
    args = [inp[k].float() for k in ("rays_o", "rays_d", "depths")]
    tgt = inp["target"].float()

    def f(planes, w1, b1, w2, b2):
        out = gk.render_triplanes(planes, *args, w1, b1, w2, b2, target_depth=tgt, levels=2, backend="cpu")
        return out.rgb.sum() + out.depth.sum() + out.opacity.sum() + out.weights.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(planes, *dec.values())
    gw = torch.autograd.grad(want, [planes, *dec.values()])
    got = compiled(planes, *dec.values())
    gg = torch.autograd.grad(got, [planes, *dec.values()])
    torch.testing.assert_close(got, want)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def _saved_per_sample(backend, B=1, R=64, S=32):
    """Saved-for-backward tensors with >= R*S elements that are not inputs (their storage is new)."""
    inp = _inputs(B=B, R=R, S=S, C=4, hidden=8, D=3, sizes=((8, 8), (4, 4)))
    planes = inp["planes"][0].float().requires_grad_(True)
    dec = {k: inp[k].float().requires_grad_(True) for k in PARAMS}
    rays = [inp[k].float() for k in ("rays_o", "rays_d", "depths", "target")]
    inputs = [planes, *dec.values(), *rays]
    assert planes.numel() < B * R * S  # so a plane-sized saved tensor cannot trip the check
    own = {t.untyped_storage().data_ptr() for t in inputs}
    big = []

    def pack(t):
        if t.numel() >= B * R * S and t.untyped_storage().data_ptr() not in own:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gk.render_triplanes(planes, rays[0], rays[1], rays[2], **dec, target_depth=rays[3], levels=2,
                                  backend=backend)
    sum(o.sum() for o in out).backward()
    assert planes.grad is not None and dec["w1"].grad.abs().sum() > 0
    return big


@cpu_only
def test_fused_backward_saves_no_per_sample_tensor():
    assert _saved_per_sample("cpu") == []


def test_reference_saves_per_sample_tensors():
    """The same check on the unfused path finds the per-sample intermediates: it can fail."""
    assert len(_saved_per_sample("torch")) > 0


@cpu_only
def test_bad_arguments_raise_with_shapes():
    args = list(_op_args())
    args[3] = args[3][:, :, :1]  # S = 1
    with pytest.raises(RuntimeError, match=r"S >= 2"):
        torch.ops.g3dr_C.render_fwd(*args[:-1])
    args = list(_op_args())
    args[4] = args[4][:, :2]  # w1 with the wrong C
    with pytest.raises(RuntimeError, match=r"w1 \[8, 2\]"):
        torch.ops.g3dr_C.render_fwd(*args[:-1])
    args = list(_op_args())
    args[1] = args[1].double()
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.g3dr_C.render_fwd(*args[:-1])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu_kernel_large():
    """A larger case on the GPU backends against the CPU kernel (both float32)."""
    inp = _inputs(B=2, R=2000, S=48, C=32, hidden=64, D=3, sizes=((64, 64), (32, 32), (16, 16)))
    cpu = _run("cpu", inp, torch.float32, "cpu")
    for b in ("cuda", "triton"):
        if gk.backends()[b]["available"] and "render" in gk.backends()[b]["ops"]:
            got = _run(b, inp, torch.float32, "cuda")
            for k, v in cpu.items():
                if v is not None:
                    torch.testing.assert_close(got[k].cpu(), v, rtol=1e-3, atol=1e-3 * (1 + v.abs().max().item()))
