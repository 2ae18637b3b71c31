"""g3dr_kernels.sample_triplanes: every compiled/Triton backend against the reference (values and the
gradients to every pyramid level and to xyz), NaN/inf and outside points, gradcheck/opcheck/torch.compile
on "cpu", bad input through each backend and at the C++ op boundary, determinism of the CPU backward, and
a hand-computed bilinear sample.

Shapes stay small: the Triton backend runs here under the (slow) interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import g3dr_kernels as gk
from g3dr_kernels import reference
from _util import HAS_CUDA, assert_close, backend_params, grads

BACKENDS = backend_params("sample")
# Backends that take float64 and float16/bfloat16 planes (the Triton kernel is tested in float32).
WIDE_DTYPE_BACKENDS = [p for p in BACKENDS if p.id in ("cpu", "cuda")]
cpu_only = pytest.mark.skipif(not gk._backend.has_kernel("sample", "cpu"),
                              reason="the C++ extension with the sample kernel is not built")

# Tolerances. A backend sums the same products w * P as the reference, in another order (levels and
# planes fused, the 1/3 of the plane mean folded into the weights), so it differs by a few rounding
# errors of the accumulation type (eps: float32 1.2e-7, float64 2.2e-16).
#   features: <= 12 * levels products of size <= ~4 (randn planes)   -> 1e-5 in float32
#   plane gradients: sums over up to ~200 points of w * g / 3, |g| ~ 1 -> N * eps ~ 3e-5, so 1e-4
#   xyz gradients: differences of corner values times W/2 * 2/box_warp (<= ~12 here) -> 5e-4
# float16/bfloat16: both sides compute in float32 and round the result once, so one unit in the
# last place of the stored dtype (eps 9.8e-4 / 7.8e-3) on values of size ~4.
TOL = {
    torch.float32: dict(val=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-4, atol=1e-4), xyz=dict(rtol=1e-4, atol=5e-4)),
    torch.float64: dict(val=dict(rtol=1e-10, atol=1e-12), grad=dict(rtol=1e-10, atol=1e-11),
                        xyz=dict(rtol=1e-10, atol=1e-10)),
    torch.float16: dict(val=dict(rtol=2e-3, atol=4e-3), grad=dict(rtol=2e-3, atol=4e-3), xyz=dict(rtol=1e-3, atol=2e-2)),
    torch.bfloat16: dict(val=dict(rtol=1.6e-2, atol=3e-2), grad=dict(rtol=1.6e-2, atol=3e-2),
                         xyz=dict(rtol=1e-2, atol=1e-1)),
}

# (id, B, C, H, W, levels, N, plane_axes, box_warp): odd, non-square and non-power-of-two planes,
# batch 1 and 3, C in {1, 3, 5, 64}, 1..4 levels, N = 0.
CASES = [
    ("b1-c1-8x8-l1-eg3d", 1, 1, 8, 8, 1, 37, "eg3d", 2.0),
    ("b3-c3-12x10-l2-xyz", 3, 3, 12, 10, 2, 40, "xyz", 2.0),
    ("b1-c5-13x7-l3-eg3d", 1, 5, 13, 7, 3, 64, "eg3d", 3.0),
    ("b3-c64-16x24-l4-xyz", 3, 64, 16, 24, 4, 16, "xyz", 2.0),
    ("b1-c3-5x3-l2-eg3d", 1, 3, 5, 3, 2, 50, "eg3d", 1.5),
    ("b2-c3-9x11-l1-n0", 2, 3, 9, 11, 1, 0, "eg3d", 2.0),
]


def _inputs(B, C, H, W, levels, N, box_warp, dtype, device, form, xyz_dtype=None, seed=0):
    """Planes (finest [B,3,C,H,W] leaf, or a list of leaf levels) and xyz [B,N,3] with ~1/4 of the
    coordinates outside the box, all requiring grad. Returns (planes, {name: leaf})."""
    g = torch.Generator().manual_seed(seed)
    finest = torch.randn(B, 3, C, H, W, generator=g, dtype=torch.float64)
    xyz = (torch.rand(B, N, 3, generator=g, dtype=torch.float64) * 2.6 - 1.3) * (box_warp / 2)
    xyz = xyz.to(device, xyz_dtype or dtype).requires_grad_()
    if form == "list":
        planes = [p.to(device, dtype).requires_grad_() for p in reference.build_pyramid(finest, levels)]
        leaves = {f"level{i}": p for i, p in enumerate(planes)}
    else:
        planes = finest.to(device, dtype).requires_grad_()
        leaves = {"planes": planes}
    return planes, dict(leaves, xyz=xyz)


def _check_against_reference(backend, planes, leaves, levels, box_warp, plane_axes, dtype):
    kw = dict(levels=levels, box_warp=box_warp, plane_axes=plane_axes)
    got = gk.sample_triplanes(planes, leaves["xyz"], backend=backend, **kw)
    want = gk.sample_triplanes(planes, leaves["xyz"], backend="torch", **kw)
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    tol = TOL[dtype]
    assert_close("features", got, want, **tol["val"])
    g_got, g_want = grads([got], leaves), grads([want], leaves)
    for name in leaves:
        assert_close(f"grad {name}", g_got[name], g_want[name], **tol["xyz" if name == "xyz" else "grad"])


@pytest.mark.parametrize("form", ["tensor", "list"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bd", BACKENDS)
def test_matches_reference(bd, case, form):
    backend, device = bd
    _, B, C, H, W, levels, N, axes, bw = case
    planes, leaves = _inputs(B, C, H, W, levels, N, bw, torch.float32, device, form)
    _check_against_reference(backend, planes, leaves, levels, bw, axes, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["f64", "f16", "bf16"])
@pytest.mark.parametrize("bd", WIDE_DTYPE_BACKENDS)
def test_matches_reference_dtypes(bd, dtype):
    backend, device = bd
    xyz_dtype = torch.float32 if dtype != torch.float64 else None  # half planes take float32 points
    # Half planes as a list: F.interpolate(antialias=True) has no float16 CPU kernel to build a pyramid.
    forms = (("tensor", "eg3d"), ("list", "xyz")) if dtype == torch.float64 else (("list", "eg3d"), ("list", "xyz"))
    for form, axes in forms:
        planes, leaves = _inputs(2, 5, 10, 6, 2, 40, 2.0, dtype, device, form, xyz_dtype=xyz_dtype)
        _check_against_reference(backend, planes, leaves, 2, 2.0, axes, dtype)


@pytest.mark.parametrize("bd", BACKENDS)
def test_non_contiguous_inputs(bd):
    backend, device = bd
    g = torch.Generator().manual_seed(3)
    # channels-last planes viewed as [B,3,C,H,W], every other column of a wider level, transposed xyz
    finest = torch.randn(2, 3, 12, 10, 4, generator=g).permute(0, 1, 4, 2, 3).to(device).requires_grad_()
    wide = torch.randn(2, 3, 4, 6, 10, generator=g).to(device).requires_grad_()
    coarse = wide[..., ::2]
    xyz = (torch.rand(2, 3, 30, generator=g) * 2.4 - 1.2).to(device).requires_grad_()
    pts = xyz.transpose(1, 2)
    assert not (finest.is_contiguous() or coarse.is_contiguous() or pts.is_contiguous())
    for planes, leaves in ((finest, {"finest": finest, "xyz": xyz}),
                           ([finest, coarse], {"finest": finest, "wide": wide, "xyz": xyz})):
        got = gk.sample_triplanes(planes, pts, levels=2, backend=backend)
        want = gk.sample_triplanes(planes, pts, levels=2, backend="torch")
        assert_close("features", got, want, **TOL[torch.float32]["val"])
        g_got, g_want = grads([got], leaves), grads([want], leaves)
        for name in leaves:
            assert_close(f"grad {name}", g_got[name], g_want[name], **TOL[torch.float32]["xyz"])


def _check_points(backend, device, plane_axes, pts):
    """Points given as a list of [x, y, z]; non-finite coordinates are expected to act like ones far
    outside (1e3): the planes that read them contribute nothing, the others sample as usual."""
    g = torch.Generator().manual_seed(5)
    planes = torch.randn(1, 3, 4, 6, 5, generator=g).to(device).requires_grad_()
    xyz = torch.tensor([pts], device=device).requires_grad_()
    far = torch.where(torch.isfinite(xyz), xyz, torch.full_like(xyz, 1e3)).detach().requires_grad_()
    got = gk.sample_triplanes(planes, xyz, levels=2, plane_axes=plane_axes, backend=backend)
    want = gk.sample_triplanes(planes, far, levels=2, plane_axes=plane_axes, backend="torch")
    assert torch.isfinite(got).all()
    assert_close("features", got, want, **TOL[torch.float32]["val"])
    g_got = grads([got], {"planes": planes, "xyz": xyz})
    g_want = grads([want], {"planes": planes, "xyz": far})
    assert torch.isfinite(g_got["planes"]).all() and torch.isfinite(g_got["xyz"]).all()
    for name in ("planes", "xyz"):
        assert_close(f"grad {name}", g_got[name], g_want[name], **TOL[torch.float32]["xyz"])
    return got


@pytest.mark.parametrize("plane_axes", ["eg3d", "xyz"])
@pytest.mark.parametrize("bd", BACKENDS)
def test_points_outside(bd, plane_axes):
    """Far outside (also huge values, whose texel index would overflow an int) reads zeros; the box
    edges +-1 and points just outside sample the border texels with zeros beyond."""
    backend, device = bd
    pts = [[5.0, 5.0, 5.0], [1.5, -1.5, 1.2], [1e30, -1e30, 0.1], [-1e35, 2e35, 3e35], [1.0, -1.0, 0.5],
           [1.05, -1.05, 0.99], [0.3, -0.2, 0.7]]
    got = _check_points(backend, device, plane_axes, pts)
    assert got[0, :4].abs().max() == 0


# Non-finite points: NaN features, as the reference (grid_sample) gives, on every backend; on "cpu" and
# "cuda" the planes get no gradient from such points (the reference's gradient there is NaN/undefined).
@pytest.mark.parametrize("plane_axes", ["eg3d", "xyz"])
@pytest.mark.parametrize("bd", BACKENDS)
def test_non_finite_points(bd, plane_axes):
    backend, device = bd
    inf, nan = float("inf"), float("nan")
    pts = [[nan, 0.2, -0.3], [0.2, nan, -0.3], [0.1, 0.4, inf], [-inf, 0.0, 0.0], [nan, nan, nan],
           [inf, -inf, nan], [0.3, -0.2, 0.7]]
    g = torch.Generator().manual_seed(5)
    planes = torch.randn(1, 3, 4, 6, 5, generator=g).to(device)
    xyz = torch.tensor([pts], device=device)
    got = gk.sample_triplanes(planes, xyz, levels=2, plane_axes=plane_axes, backend=backend)
    want = gk.sample_triplanes(planes, xyz, levels=2, plane_axes=plane_axes, backend="torch")
    assert torch.isnan(want[0, :6]).all() and torch.isfinite(want[0, 6]).all()
    assert torch.isnan(got[0, :6]).all(), "non-finite points must give NaN features"
    assert_close("finite point", got[0, 6], want[0, 6], **TOL[torch.float32]["val"])
    if backend in ("cpu", "cuda"):
        planes.requires_grad_()
        out = gk.sample_triplanes(planes, xyz, levels=2, plane_axes=plane_axes, backend=backend)
        gp, = torch.autograd.grad(out[0, 6].sum() + out[0, :6].nan_to_num(0).sum(), planes)
        assert torch.isfinite(gp).all()


# Plane p reads coordinates (a, b) of u (DESIGN.md): written out here, not taken from the package.
READS = {"eg3d": [(0, 1), (0, 2), (2, 0)], "xyz": [(0, 1), (0, 2), (1, 2)]}


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("plane_axes", ["eg3d", "xyz"])
@pytest.mark.parametrize("bd", [pytest.param(("torch", "cpu"), id="torch")] + BACKENDS)
def test_hand_computed_bilinear(bd, plane_axes, p):
    """One level, one non-zero 3x4 plane holding 1..12, two points with hand-computed weights."""
    backend, device = bd
    H, W = 3, 4
    P = torch.arange(1.0, 13.0).reshape(H, W)
    planes = torch.zeros(1, 3, 1, H, W)
    planes[0, p, 0] = P
    # ix = ((a + 1) W - 1) / 2, iy = ((b + 1) H - 1) / 2  <=>  a = (2 ix + 1) / W - 1, b = (2 iy + 1) / H - 1
    # point 0: ix = 1.25, iy = 0.5 -> tx = 0.25, ty = 0.5, corners (0,1), (0,2), (1,1), (1,2)
    # point 1: ix = -0.25, iy = 0.5 -> column -1 is outside (reads 0); column 0 has weight 0.75
    want = torch.tensor([(0.375 * P[0, 1] + 0.125 * P[0, 2] + 0.375 * P[1, 1] + 0.125 * P[1, 2]) / 3,
                         (0.375 * P[0, 0] + 0.375 * P[1, 0]) / 3])
    ia, ib = READS[plane_axes][p]
    xyz = torch.full((1, 2, 3), 0.3)
    xyz[0, :, ia] = torch.tensor([(2 * 1.25 + 1) / W - 1, (2 * -0.25 + 1) / W - 1])
    xyz[0, :, ib] = (2 * 0.5 + 1) / H - 1
    got = gk.sample_triplanes(planes.to(device), xyz.to(device), levels=1, plane_axes=plane_axes, backend=backend)
    torch.testing.assert_close(got.cpu().reshape(2), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism (CPU)
# --------------------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("plane_axes", ["eg3d", "xyz"])
def test_gradcheck_cpu(plane_axes):
    g = torch.Generator().manual_seed(7)
    l0 = torch.randn(1, 3, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    l1 = torch.randn(1, 3, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    xyz = (torch.rand(1, 6, 3, generator=g, dtype=torch.float64) * 2.2 - 1.1).requires_grad_()
    fn = lambda a, b, x: gk.sample_triplanes([a, b], x, levels=2, plane_axes=plane_axes, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (l0, l1, xyz), eps=1e-6, atol=1e-8)


@cpu_only
@pytest.mark.parametrize("need_xyz_grad", [False, True])
def test_opcheck_cpu(need_xyz_grad):
    from g3dr_kernels.ops import sample as op  # noqa: F401  (registers torch.ops.g3dr.sample_fwd)
    g = torch.Generator().manual_seed(8)
    levels = [torch.randn(2, 3, 3, 6, 5, generator=g).requires_grad_(),
              torch.randn(2, 3, 3, 3, 2, generator=g).requires_grad_()]
    xyz = (torch.rand(2, 11, 3, generator=g) * 2.4 - 1.2).requires_grad_(need_xyz_grad)
    torch.library.opcheck(torch.ops.g3dr.sample_fwd.default, (levels, xyz, 1.0, 1, "cpu"))


@cpu_only
def test_torch_compile_cpu():
    g = torch.Generator().manual_seed(9)
    planes = torch.randn(2, 3, 4, 8, 6, generator=g)
    xyz = torch.rand(2, 20, 3, generator=g) * 2 - 1

    def loss(p, x):
        return gk.sample_triplanes(p, x, levels=2, backend="cpu").square().sum()

    p1, x1 = planes.clone().requires_grad_(), xyz.clone().requires_grad_()
    p2, x2 = planes.clone().requires_grad_(), xyz.clone().requires_grad_()
    eager = loss(p1, x1)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(p2, x2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(p2.grad, p1.grad)
    torch.testing.assert_close(x2.grad, x1.grad)


@cpu_only
def test_cpu_backward_is_deterministic():
    """Plane gradients are accumulated per (batch, plane, level) task in point order: bitwise equal
    across runs and thread counts."""
    g = torch.Generator().manual_seed(10)
    planes = torch.randn(2, 3, 8, 9, 7, generator=g, requires_grad=True)
    xyz = (torch.rand(2, 500, 3, generator=g) * 2 - 1).requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out = gk.sample_triplanes(planes, xyz, levels=3, backend="cpu")
            results.append(torch.autograd.grad(out.square().sum(), [planes, xyz]))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1])


@cpu_only
def test_cpu_baseline_isa_path():
    """The channel loops also have a baseline (non-AVX2) build, picked with ATEN_CPU_CAPABILITY=default."""
    script = textwrap.dedent("""
        import torch, g3dr_kernels as gk
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        g = torch.Generator().manual_seed(0)
        planes = torch.randn(2, 3, 9, 7, 6, generator=g, requires_grad=True)
        xyz = (torch.rand(2, 60, 3, generator=g) * 2.4 - 1.2).requires_grad_()
        errs = []
        for b in ("cpu", "torch"):
            out = gk.sample_triplanes(planes, xyz, levels=2, backend=b)
            errs.append([out] + list(torch.autograd.grad(out.square().sum(), [planes, xyz])))
        print(max((a - b).abs().max().item() for a, b in zip(*errs)))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(gk.__file__)))  # the g3dr_kernels this run imports
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 5e-4  # the float32 xyz-gradient tolerance above


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

BAD = [
    ("planes-rank", lambda d: (torch.randn(2, 3, 4, 8, device=d), torch.rand(2, 5, 3, device=d), {}),
     r"planes must have 5 dims, got shape \[2x3x4x8\]"),
    ("planes-not-3", lambda d: (torch.randn(2, 2, 4, 8, 8, device=d), torch.rand(2, 5, 3, device=d), {}),
     r"\[B,3,C,H,W\], got \[2x2x4x8x8\]"),
    ("xyz-rank", lambda d: (torch.randn(2, 3, 4, 8, 8, device=d), torch.rand(5, 3, device=d), {}),
     r"xyz must have 3 dims, got shape \[5x3\]"),
    ("xyz-last", lambda d: (torch.randn(2, 3, 4, 8, 8, device=d), torch.rand(2, 5, 2, device=d), {}),
     r"xyz must have last dim 3, got shape \[2x5x2\]"),
    ("batch", lambda d: (torch.randn(2, 3, 4, 8, 8, device=d), torch.rand(3, 5, 3, device=d), {}),
     r"xyz \[3x5x3\] and planes \[2x3x4x8x8\] disagree on batch size"),
    ("backend", lambda d: (torch.randn(2, 3, 4, 8, 8, device=d), torch.rand(2, 5, 3, device=d), {"backend": "gpu"}),
     r"unknown backend 'gpu'"),
    ("plane-axes", lambda d: (torch.randn(2, 3, 4, 8, 8, device=d), torch.rand(2, 5, 3, device=d),
                              {"plane_axes": "zyx"}), r"unknown plane_axes 'zyx'"),
    ("levels-0", lambda d: (torch.randn(2, 3, 4, 8, 8, device=d), torch.rand(2, 5, 3, device=d), {"levels": 0}),
     r"levels must be an int >= 1, got 0"),
    ("too-small", lambda d: (torch.randn(2, 3, 4, 4, 8, device=d), torch.rand(2, 5, 3, device=d), {"levels": 4}),
     r"planes of size 4x8 are too small for 4 levels"),
    ("pyramid-C", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d), torch.randn(2, 3, 5, 4, 4, device=d)],
                             torch.rand(2, 5, 3, device=d), {"levels": 2}), r"\[2x3x4x8x8\].*\[2x3x5x4x4\]"),
    ("pyramid-len", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d)], torch.rand(2, 5, 3, device=d), {"levels": 2}),
     r"a pyramid of 1 levels was passed with levels=2"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("bd", [pytest.param(("torch", "cpu"), id="torch")] + BACKENDS)
def test_bad_input_raises(bd, case):
    backend, device = bd
    _, make, pattern = case
    planes, xyz, kw = make(device)
    kw = dict(dict(levels=1, backend=backend), **kw)
    with pytest.raises(ValueError, match=pattern):
        gk.sample_triplanes(planes, xyz, **kw)


OP_BAD = [
    ("empty", lambda d: ([], torch.rand(2, 5, 3, device=d), 1.0, 0), r"non-empty list"),
    ("level-rank", lambda d: ([torch.randn(2, 3, 4, 8, device=d)], torch.rand(2, 5, 3, device=d), 1.0, 0),
     r"levels\[0\] must be \[B,3,C,H,W\], got \[2, 3, 4, 8\]"),
    ("level-C", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d), torch.randn(2, 3, 5, 4, 4, device=d)],
                           torch.rand(2, 5, 3, device=d), 1.0, 0), r"levels\[1\] is \[2, 3, 5, 4, 4\]"),
    ("xyz-shape", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d)], torch.rand(2, 5, 2, device=d), 1.0, 0),
     r"xyz must be \[B,N,3\].*got \[2, 5, 2\]"),
    ("xyz-dtype", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d)], torch.rand(2, 5, 3, device=d).double(), 1.0, 0),
     r"xyz has dtype Double but the planes have Float"),
    ("plane-axes", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d)], torch.rand(2, 5, 3, device=d), 1.0, 2),
     r"plane_axes must be 0 \(eg3d\) or 1 \(xyz\), got 2"),
    ("scale", lambda d: ([torch.randn(2, 3, 4, 8, 8, device=d)], torch.rand(2, 5, 3, device=d), float("nan"), 0),
     r"scale .* must be finite and > 0"),
]
OP_DEVICES = [pytest.param("cpu", marks=cpu_only),
              pytest.param("cuda", marks=pytest.mark.skipif(
                  not (HAS_CUDA and gk._backend.has_kernel("sample", "cuda")), reason="needs a GPU and the CUDA build"))]


@pytest.mark.parametrize("case", OP_BAD, ids=[c[0] for c in OP_BAD])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_op_boundary_checks(device, case):
    gk._backend.extension()
    _, make, pattern = case
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.g3dr_C.sample_fwd(*make(device))
    levels, xyz, scale, axes = make(device)
    grad = torch.randn(xyz.shape[0], xyz.shape[1], 4, device=device)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.g3dr_C.sample_bwd(grad, levels, xyz, scale, axes, True)


@pytest.mark.parametrize("device", OP_DEVICES)
def test_op_boundary_grad_shape(device):
    gk._backend.extension()
    levels, xyz = [torch.randn(2, 3, 4, 8, 8, device=device)], torch.rand(2, 5, 3, device=device)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B,N,C\] = \[2, 5, 4\], got \[2, 5, 3\]"):
        torch.ops.g3dr_C.sample_bwd(torch.randn(2, 5, 3, device=device), levels, xyz, 1.0, 0, False)


@pytest.mark.skipif(not (HAS_CUDA and gk._backend.has_kernel("sample", "cuda")), reason="needs a GPU and the CUDA build")
def test_cuda_level_limit():
    levels = [torch.randn(1, 3, 2, 1, 1, device="cuda") for _ in range(17)]
    with pytest.raises(RuntimeError, match=r"at most 16 levels"):
        torch.ops.g3dr_C.sample_fwd(levels, torch.rand(1, 4, 3, device="cuda"), 1.0, 0)
