"""Triton sampling kernels (g3dr_kernels/triton/sample.py) against the reference, values and gradients.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py), which is slow:
shapes stay small (N * levels in the low thousands). tests/test_sample.py covers every backend with
the shared sweep; this file covers what is specific to the Triton kernels.

Tolerances (float32 / half): a kernel value may be off from the float64 truth by at most twice what
the reference at the kernel's precision is off by, plus a floor of a few units in the last place of
the result's magnitude (the reference can be exact by chance where the kernel, summing in another
order, is one rounding away). FlashAttention's rule, so the bound follows the precision.
"""
from __future__ import annotations

import pytest
import torch

import g3dr_kernels
from g3dr_kernels import _backend, reference
from g3dr_kernels._types import PLANE_AXES
from g3dr_kernels.ops import sample as _sample_op  # noqa: F401  (registers torch.ops.g3dr.sample_*)

from _util import HAS_CUDA, grads

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
_WHY = _backend._unavailable("sample", "triton", DEV)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton sample backend unavailable: {_WHY}")

if _WHY is None:
    from g3dr_kernels.triton import sample as ts

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _pyramid(B, C, sizes, dtype=torch.float32, requires_grad=True):
    return [torch.randn(B, 3, C, h, w, device=DEV, dtype=dtype).requires_grad_(requires_grad) for h, w in sizes]


def _points(B, N, box_warp, dtype=torch.float32, spill=1.25):
    """Uniform in a cube `spill` times the box, so about half the points have a coordinate outside."""
    return (torch.rand(B, N, 3, device=DEV, dtype=dtype) * 2 - 1) * (spill * box_warp / 2)


def _sizes(h, w, levels):
    return [(max(1, h >> l), max(1, w >> l)) for l in range(levels)]


def _within(name, got, same, exact, dtype):
    """|got - exact| <= 2 |same - exact| + 4 ulp(dtype) * max|exact| (see the module docstring)."""
    exact = exact.double()
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    ref_err = (same.double() - exact).abs().max().item() if exact.numel() else 0.0
    floor = 4 * EPS[dtype] * max(1.0, exact.abs().max().item() if exact.numel() else 0.0)
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 * reference error {ref_err:.3g} + {floor:.3g}"


def _compare(pyr, xyz, box_warp, axes, xyz_grad, dtype=torch.float32):
    """Triton (public function, backend="triton") vs the reference at the same precision and in
    float64: output and the gradient of every level (and of xyz when xyz_grad)."""
    L = len(pyr)
    xyz = xyz.detach().requires_grad_(xyz_grad)
    got = g3dr_kernels.sample_triplanes(pyr, xyz, levels=L, box_warp=box_warp, plane_axes=axes, backend="triton")
    same = reference.sample_pyramid(pyr, xyz, box_warp, axes)
    pyr64 = [p.detach().double().requires_grad_() for p in pyr]
    xyz64 = xyz.detach().double().requires_grad_(xyz_grad)
    exact = reference.sample_pyramid(pyr64, xyz64, box_warp, axes)
    assert got.dtype == pyr[0].dtype
    _within("out", got, same, exact, dtype)
    names = {f"level{i}": p for i, p in enumerate(pyr)}
    names64 = {f"level{i}": p for i, p in enumerate(pyr64)}
    if xyz_grad:
        names["xyz"], names64["xyz"] = xyz, xyz64
    g_got, g_same, g_exact = grads([got], names), grads([same], names), grads([exact], names64)
    for k in names:
        assert g_got[k].dtype == names[k].dtype, k
        _within(f"grad {k}", g_got[k], g_same[k], g_exact[k], dtype)
    return got


# B in {1,3}; C in {1,3,5,64}; levels 1..4; both conventions; non-square, non-power-of-two planes
# down to 1x1; box_warp != 2; with and without the xyz gradient.
CASES = [
    (1, 1, 1, "eg3d", 2.0, (9, 13), True),
    (3, 3, 2, "xyz", 2.0, (11, 7), True),
    (1, 5, 3, "eg3d", 3.0, (12, 10), False),
    (3, 64, 1, "eg3d", 2.0, (7, 9), True),
    (1, 64, 4, "xyz", 2.5, (17, 15), True),
    (3, 5, 4, "eg3d", 2.0, (16, 16), True),
    (1, 3, 4, "xyz", 1.0, (5, 6), False),
]


@pytest.mark.parametrize("B,C,L,axes,box_warp,hw,xyz_grad", CASES,
                         ids=[f"B{c[0]}-C{c[1]}-L{c[2]}-{c[3]}-{'xyzgrad' if c[6] else 'planegrad'}" for c in CASES])
def test_matches_reference(B, C, L, axes, box_warp, hw, xyz_grad):
    N = 96 if C == 64 else 257
    _compare(_pyramid(B, C, _sizes(*hw, L)), _points(B, N, box_warp), box_warp, axes, xyz_grad)


def test_conventions_differ_in_third_plane():
    """eg3d's third plane reads (z, x), xyz's (y, z): the two must give different samples, each
    equal to its own reference (guards a kernel that ignores plane_axes)."""
    pyr = _pyramid(1, 3, [(6, 5)], requires_grad=False)
    xyz = _points(1, 64, 2.0, spill=0.9)
    a = ts.sample_fwd(pyr, xyz, 1.0, PLANE_AXES["eg3d"])
    b = ts.sample_fwd(pyr, xyz, 1.0, PLANE_AXES["xyz"])
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, reference.sample_pyramid(pyr, xyz, 2.0, "eg3d"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, reference.sample_pyramid(pyr, xyz, 2.0, "xyz"), rtol=1e-5, atol=1e-5)


def test_more_levels_than_one_launch():
    """6 levels: split into launches of ts.LEVELS_PER_LAUNCH whose partial results are summed."""
    assert ts.LEVELS_PER_LAUNCH < 6
    _compare(_pyramid(3, 2, _sizes(40, 24, 6)), _points(3, 64, 2.0), 2.0, "eg3d", True)


def test_single_tensor_builds_pyramid():
    """planes as one [B,3,C,H,W] tensor: the pyramid is built in PyTorch and the gradient reaches
    the finest level through it, as in the reference."""
    planes = torch.randn(3, 3, 4, 12, 10, device=DEV, requires_grad=True)
    xyz = _points(3, 128, 2.0).requires_grad_()
    got = g3dr_kernels.sample_triplanes(planes, xyz, levels=3, backend="triton")
    want = reference.sample_triplanes(planes, xyz, levels=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got, g_want = grads([got], {"planes": planes, "xyz": xyz}), grads([want], {"planes": planes, "xyz": xyz})
    torch.testing.assert_close(g_got["planes"], g_want["planes"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_got["xyz"], g_want["xyz"], rtol=1e-4, atol=1e-4)


def test_empty_points():
    pyr = _pyramid(2, 3, [(4, 5), (2, 2)])
    xyz = torch.zeros(2, 0, 3, device=DEV, requires_grad=True)
    out = g3dr_kernels.sample_triplanes(pyr, xyz, levels=2, backend="triton")
    assert out.shape == (2, 0, 3)
    out.sum().backward()
    for p in pyr:
        assert p.grad.shape == p.shape and not p.grad.any()
    assert xyz.grad.shape == xyz.shape
    grads_ = ts.sample_bwd(out.detach(), [p.detach() for p in pyr], xyz.detach(), 1.0, 0, True)
    assert [g.shape for g in grads_] == [p.shape for p in pyr] + [xyz.shape]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN points
def test_points_outside_and_on_edges():
    """Outside every plane by more than half a coarse pixel (eg3d reads x on all three) -> exactly 0
    and no gradient; non-finite -> NaN as in the reference; points on the box faces and on pixel
    edges/centres match the reference."""
    pyr = _pyramid(1, 2, [(4, 6), (2, 3)])
    far = torch.tensor([[[1e30, 0.0, 0.0], [0.1, -1e30, 1e30], [3.0, 3.0, 3.0], [-1.9, -1.5, 1.01]]], device=DEV)
    out = ts.sample_fwd([p.detach() for p in pyr], far, 1.0, 0)
    assert torch.equal(out, torch.zeros_like(out))
    g = ts.sample_bwd(torch.ones_like(out), [p.detach() for p in pyr], far, 1.0, 0, True)
    assert all(not t.any() for t in g)
    bad = torch.tensor([[[float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0], [0.1, 0.2, 0.3]]], device=DEV)
    out = ts.sample_fwd([p.detach() for p in pyr], bad, 1.0, 0)
    assert out[0, :2].isnan().all() and out[0, 2].isfinite().all()
    # the box faces (u = +-1), pixel edges (u = k * 2/W - 1) and pixel centres of the finest level
    ticks = torch.tensor([-1.0, -2 / 3, -0.5, 0.0, 1 / 3, 0.75, 1.0])
    grid = torch.cartesian_prod(ticks, ticks, ticks).unsqueeze(0).to(DEV)
    _compare(pyr, grid, 2.0, "eg3d", True)


def test_noncontiguous_inputs():
    """Non-contiguous levels and points through the public function (made contiguous there)."""
    big = torch.randn(2, 3, 7, 10, 9, device=DEV)
    lv0 = big[:, :, ::2].transpose(-1, -2).detach().requires_grad_()   # [2,3,4,9,10], strided
    lv1 = torch.randn(2, 3, 4, 5, 4, device=DEV)[..., :3].detach().requires_grad_()   # sliced
    xyz_big = _points(2, 150, 2.0)
    xyz = xyz_big.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2].detach().requires_grad_()
    assert not lv0.is_contiguous() and not lv1.is_contiguous() and not xyz.is_contiguous()
    _compare([lv0, lv1], xyz, 2.0, "xyz", True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("xyz_dtype", ["float32", "same"])
def test_half_planes(dtype, xyz_dtype):
    """fp16/bf16 planes (float32 accumulation), points in float32 or in the plane dtype; the
    reference at that precision also computes in float32 and rounds its result, so the 2x bound
    compares like with like."""
    xd = torch.float32 if xyz_dtype == "float32" else dtype
    pyr = _pyramid(3, 5, _sizes(11, 8, 3), dtype=dtype)
    xyz = _points(3, 200, 2.0, dtype=xd)
    _compare(pyr, xyz, 2.0, "eg3d", True, dtype=dtype)


def test_float64_gradcheck():
    """Float64 planes run the kernels in float64 (scale passed as a float32 pair to keep ~48 bits):
    tight agreement with the reference and a finite-difference gradcheck on tiny inputs."""
    pyr = [torch.randn(1, 3, 2, h, w, device=DEV, dtype=torch.float64, requires_grad=True) for h, w in ((3, 4), (2, 1))]
    xyz = _points(1, 5, 3.0, dtype=torch.float64).requires_grad_()
    got = g3dr_kernels.sample_triplanes(pyr, xyz, levels=2, box_warp=3.0, backend="triton")
    torch.testing.assert_close(got, reference.sample_pyramid(pyr, xyz, 3.0, "eg3d"), rtol=1e-12, atol=1e-12)

    def f(a, b, p):
        return g3dr_kernels.sample_triplanes([a, b], p, levels=2, box_warp=3.0, plane_axes="xyz", backend="triton")

    # fast_mode checks random projections of the Jacobian: a few kernel calls instead of one per input
    # element (each interpreted call costs ~0.1 s here)
    assert torch.autograd.gradcheck(f, (*pyr, xyz), eps=1e-6, atol=1e-7, fast_mode=True)


def test_kernel_contract():
    """Direct calls: return types, shapes, dtypes; grad_xyz empty without need_xyz_grad; errors."""
    pyr = [p.detach() for p in _pyramid(1, 3, [(5, 4), (3, 2)], dtype=torch.bfloat16)]
    xyz = _points(1, 20, 2.0)
    out = ts.sample_fwd(pyr, xyz, 1.0, 0)
    assert out.shape == (1, 20, 3) and out.dtype == torch.bfloat16
    g = ts.sample_bwd(torch.ones_like(out), pyr, xyz, 1.0, 0, False)
    assert isinstance(g, list) and len(g) == 3
    assert [t.shape for t in g[:2]] == [p.shape for p in pyr] and all(t.dtype == torch.bfloat16 for t in g[:2])
    assert g[2].numel() == 0
    g2 = ts.sample_bwd(torch.ones_like(out), pyr, xyz, 1.0, 0, True)
    assert g2[2].shape == xyz.shape and g2[2].dtype == torch.float32
    for a, b in zip(g[:2], g2[:2]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="plane_axes"):
        ts.sample_fwd(pyr, xyz, 1.0, 2)
    with pytest.raises(TypeError, match="dtype"):
        ts.sample_fwd(pyr, xyz.double(), 1.0, 0)
    with pytest.raises(ValueError, match=r"\[1x3x3x5x4\]"):
        ts.sample_fwd([pyr[0], pyr[1][:, :, :2]], xyz, 1.0, 0)


def test_opcheck():
    """torch.library.opcheck of g3dr::sample_fwd with backend "triton" (schema, autograd
    registration, fake kernel, AOT dispatch with dynamic shapes)."""
    pyr = _pyramid(2, 3, [(5, 6), (3, 3)])
    xyz = _points(2, 17, 2.0).requires_grad_()
    torch.library.opcheck(torch.ops.g3dr.sample_fwd.default, ([p for p in pyr], xyz, 1.0, 0, "triton"))


def test_torch_compile_fullgraph():
    """The custom op with the triton backend traces without graph breaks, forward and backward
    (aot_eager: no Inductor codegen). It calls torch.ops.g3dr.sample_fwd directly: the public
    function's backend lookup (_backend.resolve) does not trace under fullgraph yet."""
    pyr = _pyramid(1, 3, [(5, 6), (3, 2)])
    xyz = _points(1, 33, 2.0).requires_grad_()

    def f(p0, p1, x):
        return torch.ops.g3dr.sample_fwd([p0, p1], x, 1.0, 0, "triton").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*pyr, xyz)
    g_got = torch.autograd.grad(got, (*pyr, xyz))
    want = f(*pyr, xyz)
    g_want = torch.autograd.grad(want, (*pyr, xyz))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_autotune_configs_fit_channels():
    """The GPU launch path (not run without a GPU): pruned configs never have a channel block wider
    than next_pow2(C), stay within the per-thread tile budget, and are never empty."""
    for C in (1, 3, 5, 16, 64, 96, 512):
        kept = ts._prune(ts._CONFIGS, {"C": C})
        assert kept
        for cfg in kept:
            bn, bc = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_C"]
            assert bc <= max(1, 1 << (C - 1).bit_length())
            assert bn * bc <= ts._MAX_ELEMS_PER_THREAD * 32 * cfg.num_warps


_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from g3dr_kernels.triton import sample as ts

def signature(kernel, meta, dtype):
    sig = {}
    for name in kernel.arg_names:
        if name in meta:
            sig[name] = "constexpr"
        elif name in ("xyz_ptr", "gxyz_ptr") or name[0] == "G" and name[1:].isdigit():
            sig[name] = "*fp32"
        elif name.endswith("_ptr") or name[0] == "L" and name[1:].isdigit():
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if name.startswith("scale") else "i32"
    return sig

(pa0, pb0), (pa1, pb1), (pa2, pb2) = ts.PLANE_COORDS[0]
base = dict(PA0=pa0, PB0=pb0, PA1=pa1, PB1=pb1, PA2=pa2, PB2=pb2, ACC=tl.float32, BLOCK_N=64, BLOCK_C=16)
for dtype in ("fp32", "bf16"):
    for kernel, meta in ((ts._sample_fwd_kernel, base), (ts._sample_bwd_kernel, dict(base, NEED_XYZ=True))):
        src = triton.compiler.ASTSource(kernel, signature(kernel, meta, dtype), constexprs=meta)
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["cubin"]
print("compiled")
"""


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the other tests compile and run the kernels")
@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend to compile with")
def test_kernels_compile_for_sm90():
    """Without a GPU the interpreter runs the kernels as Python; this compiles them ahead of time to
    sm_90 cubins (fp32 and bf16 planes; Triton's own ptxas, no driver), so code the compiler rejects
    fails here. A subprocess, because under TRITON_INTERPRET=1 @triton.jit gives uncompilable objects."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


def test_plane_offsets_are_int64_past_2_31_texels():
    """Planes of 2^31 texels or more: H * W (both int32 kernel arguments) must be formed in int64, or
    the offsets wrap (65536 x 65536 texels give 0 in int32). Checked on the offset helper itself, since
    such planes (16 GiB in float32) cannot be allocated in a test."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, H, W, C, p):
        off, chan = ts._plane_offsets(tl.program_id(0), p, C, tl.arange(0, 2), H, W)
        tl.store(out_ptr + tl.arange(0, 2), off + chan)

    out = torch.zeros(2, dtype=torch.int64, device=DEV)
    _probe[(1,)](out, 65536, 65536, 3, 1)  # batch 0, plane 1, channels 0 and 1
    hw = 65536 * 65536
    assert out.tolist() == [3 * hw, 4 * hw]
