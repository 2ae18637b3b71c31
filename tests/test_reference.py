"""The reference renderer against hand-computed cases and the contract's equations."""
import math

import pytest
import torch
import torch.nn.functional as F

import g3dr_kernels as K
from g3dr_kernels import reference as ref
from g3dr_kernels._types import DepthKernel

D64 = torch.float64


# ------------------------------------------------------------------------------------ sampling
def test_bilinear_one_point_hand_computed():
    # One plane pattern: only plane 0 (x,y) is non-zero; a 2x3 plane (H=2, W=3), C=1, box_warp=2 (u = xyz).
    planes = torch.zeros(1, 3, 1, 2, 3, dtype=D64)
    planes[0, 0, 0] = torch.tensor([[1., 2., 3.], [4., 5., 6.]], dtype=D64)
    x, y = 0.1, -0.2
    # align_corners=False: ix = ((x+1)*W - 1)/2, iy = ((y+1)*H - 1)/2
    ix, iy = ((x + 1) * 3 - 1) / 2, ((y + 1) * 2 - 1) / 2  # 1.15, 0.3
    fx, fy = ix - 1, iy - 0  # corners (1,0),(2,0),(1,1),(2,1)
    want = ((1 - fx) * (1 - fy) * 2 + fx * (1 - fy) * 3 + (1 - fx) * fy * 5 + fx * fy * 6) / 3  # mean over planes
    xyz = torch.tensor([[[x, y, 0.7]]], dtype=D64)
    got = ref.sample_triplanes(planes, xyz, levels=1)
    assert got.shape == (1, 1, 1)
    assert abs(got.item() - want) < 1e-12


def test_bilinear_zero_padding_and_box_warp():
    planes = torch.ones(1, 3, 2, 4, 4, dtype=D64)
    # Far outside the box: every corner is outside -> exactly 0.
    assert ref.sample_triplanes(planes, torch.full((1, 1, 3), 5.0, dtype=D64), levels=1).abs().max() == 0
    # At the very edge of the box only half the corners are in -> 0.5 along one axis on two planes.
    xyz = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=D64)
    got = ref.sample_triplanes(planes, xyz, levels=1)[0, 0, 0].item()
    # plane0 (x,y): x at edge -> ix = W - 0.5 -> half weight; plane1 (x,z) same; plane2 (z,x): x is the h coord.
    assert abs(got - (0.5 + 0.5 + 0.5) / 3) < 1e-12
    # box_warp scales the coordinates: xyz=0.5 with box_warp=1 equals xyz=1 with box_warp=2.
    p = torch.randn(1, 3, 3, 5, 7, dtype=D64)
    a = ref.sample_triplanes(p, torch.full((1, 1, 3), 0.3, dtype=D64), levels=1, box_warp=1.0)
    b = ref.sample_triplanes(p, torch.full((1, 1, 3), 0.6, dtype=D64), levels=1, box_warp=2.0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("plane_axes,pairs", [("eg3d", [(0, 1), (0, 2), (2, 0)]), ("xyz", [(0, 1), (0, 2), (1, 2)])])
def test_plane_conventions(plane_axes, pairs):
    # A plane whose value is its width coordinate in channel 0 and height coordinate in channel 1 reads
    # back the two coordinates of the point that convention assigns to it.
    H = W = 64
    ramp_w = ((torch.arange(W, dtype=D64) + 0.5) / W * 2 - 1).expand(H, W)
    ramp_h = ((torch.arange(H, dtype=D64) + 0.5) / H * 2 - 1).unsqueeze(1).expand(H, W)
    xyz = torch.tensor([[[0.31, -0.47, 0.13]]], dtype=D64)
    for p, (a, b) in enumerate(pairs):
        planes = torch.zeros(1, 3, 2, H, W, dtype=D64)
        planes[0, p, 0], planes[0, p, 1] = ramp_w, ramp_h
        got = ref.sample_triplanes(planes, xyz, levels=1, plane_axes=plane_axes)[0, 0] * 3
        torch.testing.assert_close(got, xyz[0, 0, [a, b]], atol=1e-12, rtol=0)


def test_pyramid_levels_sum():
    planes = torch.randn(2, 3, 4, 16, 8, dtype=D64)
    pyr = ref.build_pyramid(planes, 3)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(16, 8), (8, 4), (4, 2)]
    want = F.interpolate(planes.reshape(6, 4, 16, 8), scale_factor=0.25, mode="bilinear", antialias=True)
    torch.testing.assert_close(pyr[2], want.reshape(2, 3, 4, 4, 2))
    xyz = torch.rand(2, 20, 3, dtype=D64) * 2 - 1
    total = sum(ref.sample_triplanes(p, xyz, levels=1) for p in pyr)
    torch.testing.assert_close(ref.sample_triplanes(planes, xyz, levels=3), total)
    torch.testing.assert_close(ref.sample_triplanes(pyr, xyz, levels=3), total)


# ------------------------------------------------------------------------------------ compositing
def test_two_interval_ray_hand_computed():
    sigma = torch.tensor([[[0.0, 2.0, 4.0]]], dtype=D64)
    rgb = torch.tensor([[[[0.0], [1.0], [0.5]]]], dtype=D64)
    depths = torch.tensor([[[1.0, 1.5, 2.5]]], dtype=D64)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    a0 = 1 - math.exp(-sp(1.0 - 1.0) * 0.5)  # mid sigma 1, bias -1, delta 0.5
    a1 = 1 - math.exp(-sp(3.0 - 1.0) * 1.0)
    w0, w1 = a0, a1 * (1 - a0 + 1e-10)
    out = ref.composite(sigma, rgb, depths)
    torch.testing.assert_close(out.weights[0, 0], torch.tensor([w0, w1], dtype=D64))
    assert abs(out.opacity.item() - (w0 + w1)) < 1e-12
    assert abs(out.rgb.item() - (w0 * 0.5 + w1 * 0.75)) < 1e-12
    assert abs(out.depth.item() - (w0 * 1.25 + w1 * 2.0) / (w0 + w1 + 1e-3)) < 1e-12
    white = ref.composite(sigma, rgb, depths, white_background=True)
    assert abs(white.rgb.item() - (w0 * 0.5 + w1 * 0.75 + 1 - w0 - w1)) < 1e-12


def _rand_composite(B=2, R=5, S=7, D=3, dtype=D64):
    sigma = torch.randn(B, R, S, dtype=dtype) * 2
    rgb = torch.rand(B, R, S, D, dtype=dtype)
    depths = torch.sort(torch.rand(B, R, S, dtype=dtype) * 2 + 1, -1).values
    target = torch.rand(B, R, dtype=dtype) * 2 + 1
    return sigma, rgb, depths, target


@pytest.mark.parametrize("kernel", [DepthKernel(), DepthKernel(s1=2.0, s2=0.1, c_min=0.2, c_max=1.5)])
def test_depth_kernel_scales_mid_gradients_elementwise(kernel):
    sigma, rgb, depths, target = _rand_composite()
    t_mid = 0.5 * (depths[..., 1:] + depths[..., :-1])
    delta = depths[..., 1:] - depths[..., :-1]
    s_mid = (0.5 * (sigma[..., 1:] + sigma[..., :-1])).requires_grad_()
    c_mid = (0.5 * (rgb[..., 1:, :] + rgb[..., :-1, :])).requires_grad_()
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=gen, dtype=D64) for s in [(2, 5, 3), (2, 5), (2, 5), (2, 5, 6)]]

    def run(target_depth):
        out = ref.composite_intervals(s_mid, c_mid, t_mid, delta, target_depth=target_depth, kernel=kernel)
        loss = sum((o * w).sum() for o, w in zip(out, ws))
        return out, torch.autograd.grad(loss, [s_mid, c_mid])

    plain, (gs0, gc0) = run(None)
    scaled, (gs1, gc1) = run(target)
    raw = kernel.s1 * torch.exp(-(target.unsqueeze(-1) - t_mid) ** 2 / kernel.s2)
    # the inputs reach both clamps, so the comparison below checks them (an unclamped kernel fails it)
    assert (raw > kernel.c_max).any() and (raw < kernel.c_min).any()
    k = raw.clamp(kernel.c_min, kernel.c_max)
    torch.testing.assert_close(gs1, k * gs0)
    torch.testing.assert_close(gc1, k.unsqueeze(-1) * gc0)
    for a, b in zip(plain, scaled):  # forward values unchanged
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_depth_kernel_clamps():
    k = DepthKernel()
    t = torch.linspace(-3, 3, 101, dtype=D64)
    v = k(torch.zeros(()), t)
    assert v.max().item() == 1.0  # s1 = 1.25 near the target is clamped to c_max
    assert v.min().item() == 0.05  # far from the target: c_min
    assert DepthKernel.for_sampling(2.0, 3.0, 48).s2 == pytest.approx(0.5 / 48)
    with pytest.raises(ValueError, match="s2"):
        DepthKernel(s2=0.0)
    with pytest.raises(ValueError, match="c_min"):
        DepthKernel(c_min=2.0, c_max=1.0)


def test_depth_kernel_through_full_composite():
    # k applies per interval, so the gradient to each sample is the k-weighted mix of its two intervals.
    sigma, rgb, depths, target = _rand_composite()
    sigma.requires_grad_()
    g0 = torch.autograd.grad(ref.composite(sigma, rgb, depths).rgb.sum(), sigma)[0]
    g1 = torch.autograd.grad(ref.composite(sigma, rgb, depths, target_depth=target).rgb.sum(), sigma)[0]
    assert not torch.allclose(g0, g1)
    assert torch.isfinite(g1).all()


# ------------------------------------------------------------------------------------ gradcheck
def test_gradcheck_sample_triplanes():
    planes = torch.randn(1, 3, 2, 6, 5, dtype=D64, requires_grad=True)
    xyz = (torch.rand(1, 7, 3, dtype=D64) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, x: K.sample_triplanes(p, x, levels=2, backend="torch"), (planes, xyz))


def test_gradcheck_composite():
    sigma, rgb, depths, _ = _rand_composite(B=1, R=3, S=5, D=2)
    sigma.requires_grad_(), rgb.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, c: tuple(K.composite(s, c, depths, white_background=True, backend="torch")), (sigma, rgb))


def test_gradcheck_render_triplanes():
    B, R, S, C, Hd = 1, 3, 4, 3, 5
    planes = torch.randn(B, 3, C, 8, 8, dtype=D64, requires_grad=True)
    rays_o = torch.randn(B, R, 3, dtype=D64) * 0.2
    rays_d = F.normalize(torch.randn(B, R, 3, dtype=D64), dim=-1)
    depths = torch.sort(torch.rand(B, R, S, dtype=D64), -1).values
    w1 = torch.randn(Hd, C, dtype=D64, requires_grad=True)
    b1 = torch.randn(Hd, dtype=D64, requires_grad=True)
    w2 = torch.randn(4, Hd, dtype=D64, requires_grad=True)
    b2 = torch.randn(4, dtype=D64, requires_grad=True)
    fn = lambda *a: tuple(K.render_triplanes(a[0], rays_o, rays_d, depths, *a[1:], levels=2, backend="torch"))  # noqa
    assert torch.autograd.gradcheck(fn, (planes, w1, b1, w2, b2))


def test_render_equals_three_steps():
    B, R, S, C = 2, 4, 6, 5
    planes = torch.randn(B, 3, C, 8, 8, dtype=D64)
    rays_o, rays_d = torch.randn(B, R, 3, dtype=D64) * 0.3, torch.randn(B, R, 3, dtype=D64)
    depths = torch.sort(torch.rand(B, R, S, dtype=D64), -1).values
    w1, b1, w2, b2 = torch.randn(7, C, dtype=D64), torch.randn(7, dtype=D64), torch.randn(4, 7, dtype=D64), torch.randn(4, dtype=D64)
    xyz = (rays_o.unsqueeze(2) + depths.unsqueeze(-1) * rays_d.unsqueeze(2)).reshape(B, R * S, 3)
    f = K.sample_triplanes(planes, xyz, backend="torch")
    h = F.softplus(f @ w1.T + b1)
    o = h @ w2.T + b2
    want = K.composite(o[..., 0].reshape(B, R, S), (torch.sigmoid(o[..., 1:]) * 1.002 - 0.001).reshape(B, R, S, 3),
                       depths, backend="torch")
    got = K.render_triplanes(planes, rays_o, rays_d, depths, w1, b1, w2, b2, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------ ray utilities
def test_ray_box_bounds():
    rays_o = torch.tensor([[[0.0, 0.0, -3.0], [0.0, 5.0, -3.0], [0.2, 0.1, 0.0]]])
    rays_d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    near, far, hit = ref.ray_box_bounds(rays_o, rays_d, box_warp=2.0)
    assert hit.tolist() == [[True, False, True]]
    torch.testing.assert_close(near, torch.tensor([[2.0, 0.0, 0.0]]))
    torch.testing.assert_close(far, torch.tensor([[4.0, 0.0, 0.8]]))


def test_stratified_and_importance_sampling():
    near, far = torch.full((1, 2), 2.0), torch.full((1, 2), 3.0)
    d = ref.stratified_depths(near, far, 4)
    torch.testing.assert_close(d[0, 0], torch.tensor([2.125, 2.375, 2.625, 2.875]))
    g = torch.Generator().manual_seed(0)
    dp = ref.stratified_depths(near, far, 16, perturb=True, generator=g)
    assert (dp[..., 1:] >= dp[..., :-1]).all() and dp.min() >= 2 and dp.max() <= 3
    # All the weight on one interval -> importance samples concentrate there.
    coarse = ref.stratified_depths(near, far, 16)
    w = torch.zeros(1, 2, 15)
    w[..., 7] = 1.0
    fine = ref.importance_depths(coarse, w, 64, generator=g)
    inside = ((fine >= coarse[..., 6:7]) & (fine <= coarse[..., 9:10])).float().mean()
    assert inside > 0.8
    det = ref.importance_depths(coarse, w, 8, deterministic=True)
    assert det.min() >= 2 and det.max() <= 3


def test_depths_around_target_and_merge():
    target = torch.tensor([[2.5, 2.95]])
    near, far = torch.full((1, 2), 2.0), torch.full((1, 2), 3.0)
    d = ref.depths_around_target(target, 4, 0.2, near=near, far=far)
    torch.testing.assert_close(d[0, 0], torch.tensor([2.35, 2.45, 2.55, 2.65]))
    assert d[0, 1].max() <= 3.0
    m = ref.merge_depths(ref.stratified_depths(near, far, 5), d)
    assert m.shape == (1, 2, 9) and (m[..., 1:] >= m[..., :-1]).all()
