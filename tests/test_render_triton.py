"""The fused Triton renderer (g3dr_kernels/triton/render.py) against the reference composition
(points -> sample_pyramid -> decode -> composite): values and every gradient (each plane level,
w1, b1, w2, b2), with and without a target depth, 1-3 levels, D in {3, 32}, hidden in {16, 64},
white background, rays missing the box, R = 0, B = 1 and 2, weights on/off.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), which is
slow per Triton op: shapes stay small (B*R*S in the hundreds).
"""
from __future__ import annotations

import pytest
import torch

from g3dr_kernels import DepthKernel, reference, render_triplanes
from g3dr_kernels import _backend
from _util import assert_close, grads

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_why = _backend._unavailable("render", "triton", DEV)
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))

if _why is None:
    from g3dr_kernels.triton import render as tr

# float64 runs the kernel's math in float64, so it must agree with the float64 oracle to rounding:
# only the order of the sums differs (tl.dot, per-level sums, the O(S) suffix sums of the backward).
TOL64 = dict(rtol=1e-9, atol=1e-11)
F32_EPS = torch.finfo(torch.float32).eps


def make_case(B=2, R=8, S=6, C=8, HW=(8, 8), hidden=16, D=3, levels=2, dtype=torch.float64, miss=False,
              seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    H, W = HW
    pyr = [rnd(B, 3, C, max(H >> lv, 1), max(W >> lv, 1)) for lv in range(levels)]
    rays_o = rnd(B, R, 3) * 0.3
    rays_d = torch.nn.functional.normalize(rnd(B, R, 3), dim=-1)
    near, far, hit = reference.ray_box_bounds(rays_o, rays_d)
    u = torch.rand(B, R, S, generator=g, dtype=torch.float64)
    depths = torch.sort(near.unsqueeze(-1) + u * (far - near).unsqueeze(-1), dim=-1).values
    if miss:
        # a third of the rays start outside the box and point away: every sample reads zeros
        k = max(R // 3, 1)
        rays_o[:, :k] = torch.tensor([3.0, -3.5, 2.5], dtype=torch.float64)
        rays_d[:, :k] = torch.nn.functional.normalize(rays_o[:, :k], dim=-1)
        depths[:, :k] = torch.sort(torch.rand(B, k, S, generator=g, dtype=torch.float64) * 4, dim=-1).values
        # and one ray has all its samples at the same depth (what ray_box_bounds gives missed rays)
        depths[:, -1] = 0.0
    target = near + torch.rand(B, R, generator=g, dtype=torch.float64) * (far - near)
    dec = dict(w1=rnd(hidden, C) * 0.5, b1=rnd(hidden) * 0.1, w2=rnd(1 + D, hidden) * 0.5, b2=rnd(1 + D) * 0.1)
    dec["b2"][0] += 3.0  # dense enough that rays saturate (alpha ~ 0.5 per interval of ~0.4)
    case = dict(pyr=pyr, rays_o=rays_o, rays_d=rays_d, depths=depths, target=target, **dec)
    return {k: ([p.to(DEV, dtype) for p in v] if k == "pyr" else v.to(DEV, dtype)) for k, v in case.items()}


def run(case, backend, *, use_target, white=False, weights=True, weights_in_loss=True, plane_axes="eg3d",
        kernel=DepthKernel(s2=0.1), box_warp=2.4, seed=1):
    """Render, then gradients of a fixed random projection of the outputs (and of the weights when
    `weights_in_loss`) with respect to every level and the decoder. box_warp 2.4 and s2 0.1 are not
    float32 numbers, so float64 runs also check that float arguments reach the kernel in float64."""
    pyr = [p.detach().clone().requires_grad_() for p in case["pyr"]]
    dec = {k: case[k].detach().clone().requires_grad_() for k in ("w1", "b1", "w2", "b2")}
    out = render_triplanes(pyr, case["rays_o"], case["rays_d"], case["depths"], dec["w1"], dec["b1"], dec["w2"],
                           dec["b2"], target_depth=case["target"] if use_target else None, kernel=kernel,
                           levels=len(pyr), box_warp=box_warp, plane_axes=plane_axes, white_background=white,
                           return_weights=weights, backend=backend)
    outs = [out.rgb, out.depth, out.opacity] + ([out.weights] if weights and weights_in_loss else [])
    inputs = {f"planes[{i}]": p for i, p in enumerate(pyr)}
    inputs.update(dec)
    return out, grads(outs, inputs, seed=seed)


def check_parity(case, tol=TOL64, **kw):
    out, g = run(case, "triton", **kw)
    want, g_want = run(case, "torch", **kw)
    for name in ("rgb", "depth", "opacity"):
        assert_close(name, getattr(out, name), getattr(want, name), **tol)
    if kw.get("weights", True):
        assert_close("weights", out.weights, want.weights, **tol)
    else:
        assert out.weights is None
    for name in g_want:
        assert_close(f"grad {name}", g[name], g_want[name], **tol)
    return out, g


# Each row covers a different mix of the options; together: levels 1..3, D 3/32, hidden 16/64,
# target on/off, white background, weights on/off (and returned-but-unused), B 1/2, both plane
# conventions, C padded up (5 -> 16) and C = 64.
SWEEP = [
    # B, R, S, C, hidden, D, levels, target, white, weights, weights_in_loss, axes
    (1, 7, 5, 8, 16, 3, 1, False, False, True, True, "eg3d"),
    (2, 6, 6, 5, 64, 3, 2, True, True, False, False, "eg3d"),
    (2, 5, 5, 16, 16, 32, 3, True, False, True, True, "xyz"),
    (1, 9, 4, 64, 64, 32, 3, False, True, True, False, "eg3d"),
    (2, 4, 7, 8, 16, 3, 2, True, False, True, True, "eg3d"),
]


@pytest.mark.parametrize("B,R,S,C,hidden,D,levels,target,white,weights,in_loss,axes", SWEEP)
def test_parity_float64(B, R, S, C, hidden, D, levels, target, white, weights, in_loss, axes):
    case = make_case(B=B, R=R, S=S, C=C, hidden=hidden, D=D, levels=levels, seed=B * 100 + R)
    out, g = check_parity(case, use_target=target, white=white, weights=weights, weights_in_loss=in_loss,
                          plane_axes=axes)
    # the case is not degenerate: rays see density and every parameter gets a gradient
    assert out.opacity.max() > 0.05
    assert all(v.abs().max() > 0 for v in g.values())


def test_target_scales_gradients_not_values():
    """The depth kernel changes the gradients (so the test above can see a wrong k) but no value."""
    case = make_case(B=1, R=6, S=6, levels=1, seed=3)
    (o1, g1), (o2, g2) = run(case, "triton", use_target=False), run(case, "triton", use_target=True)
    assert torch.equal(o1.rgb, o2.rgb) and torch.equal(o1.weights, o2.weights)
    assert not torch.allclose(g1["w1"], g2["w1"])


def test_rays_missing_the_box():
    """Samples outside the box read zeros (the decoder biases still give density); rays whose samples
    coincide (delta = 0) composite to nothing."""
    case = make_case(B=2, R=6, S=5, levels=2, miss=True, seed=5)
    out, g = check_parity(case, use_target=True, white=True)
    assert torch.all(out.opacity[:, -1] == 0) and torch.all(out.weights[:, -1] == 0)
    assert torch.allclose(out.rgb[:, -1], torch.ones_like(out.rgb[:, -1]))  # white background shows


def test_far_points_stay_finite():
    """Points very far out (|u| ~ 1e30) must not overflow the corner index conversion."""
    case = make_case(B=1, R=4, S=4, levels=1, dtype=torch.float32, seed=6)
    case["depths"] = case["depths"] * 0 + torch.tensor([0.0, 1.0, 1e30, 2e30], device=DEV)
    out, g = run(case, "triton", use_target=False)
    want, g_want = run(case, "torch", use_target=False)
    for name in ("rgb", "depth", "opacity", "weights"):
        assert torch.isfinite(getattr(out, name)).all()
        assert_close(name, getattr(out, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    for name in g_want:
        assert torch.isfinite(g[name]).all(), name


@pytest.mark.parametrize("B,R", [(1, 0), (2, 0)])
def test_no_rays(B, R):
    case = make_case(B=B, R=R, S=4, levels=2)
    out, g = run(case, "triton", use_target=True)
    assert out.rgb.shape == (B, 0, 3) and out.depth.shape == (B, 0) and out.weights.shape == (B, 0, 3)
    assert all(v.abs().sum() == 0 and v.shape == case_v.shape
               for v, case_v in zip(g.values(), case["pyr"] + [case[k] for k in ("w1", "b1", "w2", "b2")]))


def test_tiny_dims_are_padded_for_tl_dot():
    """tl.dot needs every tile dim >= 16 (the interpreter too): C=2, hidden=3, D=1 and a single ray
    are padded up (masked loads), and the padding contributes nothing."""
    assert [tr._pad(n) for n in (1, 2, 3, 16, 17, 33, 64)] == [16, 16, 16, 16, 32, 64, 64]
    assert min(tr.BLOCK_R_FWD, tr.BLOCK_R_BWD, tr._block_r(16, 1, DEV)) >= 16
    case = make_case(B=1, R=1, S=3, C=2, hidden=3, D=1, levels=1, seed=7)
    check_parity(case, use_target=True)


def test_many_programs_and_persistent_loop(monkeypatch):
    """Several ray blocks (16 rays each, the last one partial) and fewer backward programs than blocks,
    so a program walks several blocks and the per-program decoder partial sums are reduced."""
    if DEV.type == "cuda":
        pytest.skip("block sizes are the GPU ones there; the CPU run covers the loop")
    monkeypatch.setattr(tr, "BLOCK_R_INTERPRET", 16)
    monkeypatch.setattr(tr, "_device_programs", lambda device, n_blocks: 2)
    case = make_case(B=2, R=17, S=3, levels=2, seed=8)  # 34 rays -> 3 blocks, batch change mid-block
    check_parity(case, use_target=True, white=True)


@pytest.mark.parametrize("channels_last,hoist", [(False, False), (True, True)], ids=["cf-reread", "cl-hoist"])
def test_plane_layouts_and_weight_reads(monkeypatch, channels_last, hoist):
    """The kernel reads planes channels-first as given, or channels-last ([B,3,H,W,C], the GPU
    default), and holds the decoder weights for the whole kernel or re-reads them per step (the
    fallback when holding them does not fit); all agree with the reference."""
    monkeypatch.setattr(tr, "_channels_last", lambda device: channels_last)
    monkeypatch.setattr(tr, "HOIST_WEIGHTS", hoist)
    case = make_case(B=2, R=5, S=4, C=8, hidden=16, D=3, levels=2, HW=(8, 6), seed=11)
    check_parity(case, use_target=True)


def test_out_of_resources_falls_back_to_per_step_weight_reads(monkeypatch):
    """A launch that holds the weights and runs out of shared memory is retried without holding
    them, and that choice is remembered for the configuration."""
    from triton.runtime.errors import OutOfResources
    calls = []

    class FakeKernel:
        fn = test_out_of_resources_falls_back_to_per_step_weight_reads

        def __getitem__(self, grid):
            def run(*args, HOIST_W, **kw):
                calls.append(HOIST_W)
                if HOIST_W:
                    raise OutOfResources(300000, 232448, "shared memory")
            return run

    monkeypatch.setattr(tr, "_NO_HOIST", set())
    tr._launch(FakeKernel(), (1,), DEV, dict(CP=64, HP=128, DP=64), "arg")
    tr._launch(FakeKernel(), (1,), DEV, dict(CP=64, HP=128, DP=64), "arg")
    tr._launch(FakeKernel(), (1,), DEV, dict(CP=16, HP=16, DP=16), "arg")
    assert calls == [True, False, False, True, False]


def test_float32_within_twice_torch_error():
    """float32 against the float64 oracle: the kernel's error at most 2x the error of the float32
    PyTorch reference (different summation order, same precision), plus a floor of 64 float32 ulps
    of the tensor's scale for entries where PyTorch happens to round exactly."""
    case64 = make_case(B=2, R=12, S=10, C=16, hidden=32, D=3, levels=3, seed=9)
    case32 = {k: ([p.float() for p in v] if k == "pyr" else v.float()) for k, v in case64.items()}
    kw = dict(use_target=True, white=False)
    (o_k, g_k), (o_t, g_t), (o_64, g_64) = (run(case32, "triton", **kw), run(case32, "torch", **kw),
                                            run(case64, "torch", **kw))
    pairs = [(n, getattr(o_k, n), getattr(o_t, n), getattr(o_64, n)) for n in ("rgb", "depth", "opacity", "weights")]
    pairs += [(f"grad {n}", g_k[n], g_t[n], g_64[n]) for n in g_64]
    for name, k, t, ref in pairs:
        err_k = (k.double() - ref).abs().max().item()
        err_t = (t.double() - ref).abs().max().item()
        bound = 2 * err_t + 64 * F32_EPS * ref.abs().max().item()
        assert err_k <= bound, f"{name}: kernel error {err_k:.3e} > {bound:.3e} (torch float32 error {err_t:.3e})"


def test_float16_inputs():
    """Half inputs are loaded as half and computed in float32; compare with the float32 reference on
    the same (half-rounded) inputs. Tolerance: the outputs and plane gradients are rounded to half
    (2^-11 relative), a few roundings deep."""
    case = make_case(B=1, R=6, S=5, C=8, hidden=16, D=3, levels=2, dtype=torch.float16, seed=10)
    case32 = {k: ([p.float() for p in v] if k == "pyr" else v.float()) for k, v in case.items()}
    out, g = run(case, "triton", use_target=True)
    want, g_want = run(case32, "torch", use_target=True)
    assert out.rgb.dtype == torch.float16 and g["planes[0]"].dtype == torch.float16
    for name in ("rgb", "depth", "opacity", "weights"):
        assert_close(name, getattr(out, name).float(), getattr(want, name), rtol=4e-3, atol=2e-3)
    for name in g_want:
        scale = g_want[name].abs().max().item()
        assert_close(f"grad {name}", g[name].float(), g_want[name], rtol=4e-3, atol=4e-3 * scale)


def test_opcheck():
    """torch.library.opcheck on g3dr::render_fwd with the triton backend: schema, fake (meta) kernel,
    autograd registration, and AOT dispatch (what torch.compile relies on)."""
    from g3dr_kernels.ops.render import render_fwd
    case = make_case(B=1, R=3, S=3, C=4, hidden=8, D=3, levels=2, dtype=torch.float32, seed=12)
    pyr = [p.requires_grad_() for p in case["pyr"]]
    dec = [case[k].requires_grad_() for k in ("w1", "b1", "w2", "b2")]
    args = (pyr, case["rays_o"], case["rays_d"], case["depths"], *dec, case["target"], 2 / 2.4, 0, 1.25, 0.1,
            0.05, 1.0, -1.0, 1e-3, True, True, "triton")
    torch.library.opcheck(render_fwd, args)


def test_bad_inputs_raise():
    case = make_case(B=1, R=2, S=3, C=8, hidden=16, D=3, levels=1)
    args = [case["pyr"], case["rays_o"], case["rays_d"], case["depths"], case["w1"], case["b1"], case["w2"],
            case["b2"], None, 1.0, 0, 1.25, 0.03, 0.05, 1.0, -1.0, 1e-3, False, True]
    wide = torch.zeros(300, 8, dtype=case["w1"].dtype, device=DEV)
    with pytest.raises(ValueError, match="up to"):
        tr.render_fwd(*args[:4], wide, torch.zeros(300, dtype=wide.dtype, device=DEV),
                      torch.zeros(4, 300, dtype=wide.dtype, device=DEV), *args[7:])
    with pytest.raises(ValueError, match="contiguous"):
        tr.render_fwd(*args[:3], torch.cat([case["depths"]] * 2, dim=-1)[..., ::2], *args[4:])
