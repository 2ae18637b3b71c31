"""The shared Triton device helpers (g3dr_kernels/triton/_common.py), each on its own through a small
probe kernel: the plane table the render kernels select on in-device against PLANE_COORDS (the host
table the sample kernels get theirs from), the two index widths of the bilinear taps, and the two
roundings of one compositing interval. Without a GPU the probes run under TRITON_INTERPRET=1
(conftest.py)."""
from __future__ import annotations

import pytest
import torch

from g3dr_kernels import _backend
from g3dr_kernels._types import PLANE_COORDS

from _util import HAS_CUDA

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
_WHY = _backend._unavailable("sample", "triton", DEV)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable: {_WHY}")

if _WHY is None:
    import triton
    import triton.language as tl

    from g3dr_kernels.triton import _common as tc

    @triton.jit
    def _plane_probe(out_ptr, PLANE_AXES: tl.constexpr):
        # u = (1, 2, 3): each coordinate names its axis
        ux = tl.full([1], 1.0, tl.float32)
        uy = tl.full([1], 2.0, tl.float32)
        uz = tl.full([1], 3.0, tl.float32)
        for p in range(3):
            a, b = tc._plane_coords(ux, uy, uz, p, PLANE_AXES)
            tl.store(out_ptr + 2 * p + tl.arange(0, 1), a)
            tl.store(out_ptr + 2 * p + 1 + tl.arange(0, 1), b)

    @triton.jit
    def _taps_probe(a_ptr, b_ptr, out_ptr, H, W, n, IDX: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        a = tl.load(a_ptr + i, mask=m, other=0.0)
        b = tl.load(b_ptr + i, mask=m, other=0.0)
        taps = tc._bilinear(a, b, H, W, IDX)  # x0, y0, x1, y1, wx0, wy0, wx1, wy1, vx0, vy0, vx1, vy1
        for k in tl.static_range(12):
            tl.store(out_ptr + i * 12 + k, taps[k].to(tl.float64), mask=m)

    @triton.jit
    def _interval_probe(s_ptr, d_ptr, out_ptr, bias, n, REF_ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < n
        s0 = tl.load(s_ptr + 2 * i, mask=m, other=0.0)
        s1 = tl.load(s_ptr + 2 * i + 1, mask=m, other=0.0)
        d0 = tl.load(d_ptr + 2 * i, mask=m, other=0.0)
        d1 = tl.load(d_ptr + 2 * i + 1, mask=m, other=1.0)
        vals = tc._interval(s0, s1, d0, d1, bias, REF_ROUNDING, True)  # alpha, e, keep, t, delta, dsp
        for k in tl.static_range(6):
            tl.store(out_ptr + i * 6 + k, vals[k], mask=m)


@pytest.mark.parametrize("plane_axes", sorted(PLANE_COORDS))
def test_plane_coords_follow_plane_coords_table(plane_axes):
    out = torch.zeros(6, device=DEV)
    _plane_probe[(1,)](out, PLANE_AXES=plane_axes)
    want = [float(k + 1) for pair in PLANE_COORDS[plane_axes] for k in pair]
    assert out.tolist() == want


def test_bilinear_taps_same_at_both_index_widths():
    """render.py takes the taps as int32, sample.py as int64: same corners, weights and masks, far
    outside points included (the clamp keeps them from overflowing int32)."""
    n = 64
    a = torch.cat([torch.linspace(-1.3, 1.3, n - 4), torch.tensor([-1e30, 1e30, -1.0, 1.0])]).to(DEV)
    b = torch.cat([torch.linspace(1.2, -1.2, n - 4), torch.tensor([1e30, -1e30, 1.0, -1.0])]).to(DEV)
    outs = []
    for idx in (tl.int32, tl.int64):
        out = torch.full((n, 12), float("nan"), dtype=torch.float64, device=DEV)
        _taps_probe[(1,)](a, b, out, 5, 7, n, IDX=idx, BLOCK=n)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # corners: x1 = x0 + 1 and y1 = y0 + 1, weights sum to 1 per axis
    o = outs[0]
    assert torch.equal(o[:, 2], o[:, 0] + 1) and torch.equal(o[:, 3], o[:, 1] + 1)
    torch.testing.assert_close(o[:, 4] + o[:, 6], torch.ones(n, dtype=torch.float64, device=DEV))


def test_interval_roundings_agree():
    """The two roundings of _interval (render's, as the reference rounds; composite's exact forms) are
    one formula: they agree to float32 rounding where the interval is not opaque."""
    n = 256
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2 * n, generator=g) * 4).to(DEV)
    d = torch.sort(torch.rand(2 * n, generator=g) * 2, dim=0).values.to(DEV)
    outs = []
    for ref in (True, False):
        out = torch.zeros(n, 6, device=DEV)
        _interval_probe[(1,)](s, d, out, -1.0, n, REF_ROUNDING=ref, BLOCK=n)
        outs.append(out)
    ref, exact = outs
    torch.testing.assert_close(ref[:, [0, 1, 3, 4, 5]], exact[:, [0, 1, 3, 4, 5]], rtol=1e-5, atol=1e-6)
    live = exact[:, 1] > 1e-3  # the transmittance factor differs by design only where e is tiny
    torch.testing.assert_close(ref[live, 2], exact[live, 2], rtol=1e-5, atol=1e-6)
