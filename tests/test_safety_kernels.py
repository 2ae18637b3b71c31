"""Non-finite semantics where the C++ CPU kernels differ from the reference, pinned
as docs/backends.md states them ("Non-finite input"). Each difference is confined to the ray or the input
that is already non-finite; the values and every other gradient agree."""
import pytest
import torch

import g3dr_kernels as K
from g3dr_kernels import _backend

needs_cpu = pytest.mark.skipif(_backend._unavailable("render", "cpu", torch.device("cpu")) is not None,
                               reason="the C++ CPU extension is not built")


def _grads(out, inputs):
    loss = out.rgb.sum() + out.depth.sum() + out.opacity.sum()
    return torch.autograd.grad(loss, inputs)


@needs_cpu
def test_composite_nan_colour_makes_the_whole_rays_density_gradient_nan_on_cpu():
    """Reference: a NaN colour at sample s gives NaN density gradients at samples 0..s+1 of its ray only
    (the intervals behind it do not depend on it). cpu: at every sample of that ray (its backward forms
    the sum over the intervals behind i as total - prefix, and the total is NaN). Everything else equal."""
    g = torch.Generator().manual_seed(0)
    B, R, S, D, s = 1, 3, 7, 3, 2
    sigma = torch.randn(B, R, S, generator=g, dtype=torch.float64)
    rgb = torch.rand(B, R, S, D, generator=g, dtype=torch.float64)
    rgb[0, 0, s, 1] = float("nan")
    depths = torch.linspace(4, 6, S, dtype=torch.float64).expand(B, R, S).contiguous()
    res = {}
    for backend in ("torch", "cpu"):
        sg, cg = sigma.clone().requires_grad_(), rgb.clone().requires_grad_()
        out = K.composite(sg, cg, depths, backend=backend)
        res[backend] = (out, *_grads(out, [sg, cg]))
    (o_ref, gs_ref, gc_ref), (o_cpu, gs_cpu, gc_cpu) = res["torch"], res["cpu"]
    for name in ("rgb", "depth", "opacity", "weights"):
        torch.testing.assert_close(getattr(o_cpu, name), getattr(o_ref, name), equal_nan=True)
    torch.testing.assert_close(gc_cpu, gc_ref, equal_nan=True)  # colour gradients agree
    assert gs_ref[0, 0, :s + 2].isnan().all() and torch.isfinite(gs_ref[0, 0, s + 2:]).all()
    assert gs_cpu[0, 0].isnan().all()
    torch.testing.assert_close(gs_cpu[0, 1:], gs_ref[0, 1:])  # other rays untouched


@needs_cpu
def test_render_non_finite_ray_leaves_cpu_plane_gradients_finite():
    """A ray with an inf direction renders NaN on every backend and its NaN reaches the decoder
    gradients on every backend. Plane gradients: the reference (torch.grid_sample's backward) writes
    NaN into some cells; cpu skips the ray's points (no taps), so its plane gradients equal the
    reference's without that ray."""
    g = torch.Generator().manual_seed(1)
    C = 4
    planes = torch.randn(1, 3, C, 8, 8, generator=g, dtype=torch.float64)
    w1, b1 = torch.randn(8, C, generator=g, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    w2, b2 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    o = torch.tensor([[[0, 0, 5.0], [0.1, 0, 5.0], [0, 0, 5.0]]], dtype=torch.float64)
    d = torch.tensor([[[0, 0, -1.0], [0, 0.1, -1.0], [0, float("inf"), -1.0]]], dtype=torch.float64)
    depths = torch.linspace(4, 6, 6, dtype=torch.float64).expand(1, 3, 6).contiguous()

    def run(backend, rays):
        ps = [t.clone().requires_grad_() for t in (planes, w1, b1, w2, b2)]
        out = K.render_triplanes(ps[0], o[:, rays], d[:, rays], depths[:, rays], *ps[1:], levels=2, backend=backend)
        return out, _grads(out, ps)
    out_ref, g_ref = run("torch", slice(None))
    out_cpu, g_cpu = run("cpu", slice(None))
    _, g_ref_finite_rays = run("torch", slice(0, 2))
    torch.testing.assert_close(out_cpu.rgb, out_ref.rgb, equal_nan=True)
    assert out_cpu.rgb[0, 2].isnan().all()
    assert g_ref[0].isnan().any()  # the reference: NaN in the planes' gradient
    assert torch.isfinite(g_cpu[0]).all()  # cpu: none
    torch.testing.assert_close(g_cpu[0], g_ref_finite_rays[0])
    for a, b in zip(g_cpu[1:], g_ref[1:]):  # decoder gradients: NaN on both
        assert a.isnan().any() and b.isnan().any()


@needs_cpu
def test_cpu_fused_render_takes_at_most_8_levels():
    """The reference (and sample_triplanes on cpu) take any number of levels the planes allow; the
    fused cpu render takes at most 8 (planes up to 128x128 -> 1x1) and says so."""
    planes = torch.randn(1, 3, 2, 256, 256)
    o, d = torch.tensor([[[0, 0, 5.0]]]), torch.tensor([[[0, 0, -1.0]]])
    depths = torch.linspace(4, 6, 4).expand(1, 1, 4).contiguous()
    w1, b1, w2, b2 = torch.randn(4, 2), torch.zeros(4), torch.randn(4, 4), torch.zeros(4)
    ref = K.render_triplanes(planes, o, d, depths, w1, b1, w2, b2, levels=9, backend="torch")
    assert torch.isfinite(ref.rgb).all()
    assert K.sample_triplanes(planes, torch.zeros(1, 2, 3), levels=9, backend="cpu").shape == (1, 2, 2)
    with pytest.raises(RuntimeError, match="expected 1..8 pyramid levels, got 9"):
        K.render_triplanes(planes, o, d, depths, w1, b1, w2, b2, levels=9, backend="cpu")
    out8 = K.render_triplanes(planes, o, d, depths, w1, b1, w2, b2, levels=8, backend="cpu")
    torch.testing.assert_close(out8.rgb, K.render_triplanes(planes, o, d, depths, w1, b1, w2, b2, levels=8,
                                                            backend="torch").rgb, rtol=1e-5, atol=1e-6)
