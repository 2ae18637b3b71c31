"""g3dr_kernels.compat: EG3D/G3DR call- and return-compatible renderers and decoders.

The official code is not imported (EG3D's licence): its random calls are written out here from
renderer.py / train.py, and the renderers are compared with TriplaneRenderer(sampling="eg3d")."""
import math
import random

import pytest
import torch

from g3dr_kernels import reference as ref
from g3dr_kernels.compat import (EG3DImportanceRenderer, FullyConnectedLayer, G3DRImportanceRenderer, OSGDecoder,
                                 load_osg_state_dict, parse_rendering_options)
from g3dr_kernels.nn import TriplaneRenderer
from _util import backend_params

OPTS = dict(ray_start="auto", ray_end="auto", box_warp=2, depth_resolution=6, depth_resolution_importance=4,
            disparity_space_sampling=False, clamp_mode="softplus")
DEC_OPTS = {"decoder_lr_mul": 1, "decoder_output_dim": 3}


def _scene(B=2, res=3, C=4):
    """Planes, and G3DR-like rays from (-5, 0, 0) towards the box; with res=3 the 5 rays of the first
    row and column miss it."""
    g = torch.Generator().manual_seed(0)
    planes = 0.5 * torch.randn(B, 3, C, 8, 8, generator=g)
    yz = torch.tensor([-0.3, 0.0, 0.2]) if res == 3 else torch.linspace(-0.2, 0.2, res)
    d = torch.stack([torch.ones(res, res), *torch.meshgrid(yz, yz, indexing="ij")], -1).reshape(1, -1, 3)
    d = torch.nn.functional.normalize(d, dim=-1).expand(B, -1, 3).contiguous()
    o = torch.tensor([-5.0, 0.0, 0.0]).expand(B, res * res, 3).contiguous()
    return planes, o, d


def _grads(outs, params):
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_eg3d_renderer_equals_triplane_renderer(noise, dtype):
    planes, o, d = (t.to(dtype) for t in _scene())
    planes.requires_grad_()
    dec = OSGDecoder(4, DEC_OPTS).to(dtype)
    opts = dict(OPTS, density_noise=noise)
    torch.manual_seed(7)
    rgb, depth, wt = EG3DImportanceRenderer(backend="torch")(planes, dec, o, d, opts)
    assert rgb.shape == (2, 9, 3) and depth.shape == wt.shape == (2, 9, 1)
    g_compat = _grads([rgb, depth, wt], [planes, *dec.parameters()])
    r = TriplaneRenderer(dec, n_coarse=6, n_fine=4, sampling="eg3d", levels=1, density_noise=noise, backend="torch")
    torch.manual_seed(7)
    depths, nz = r.render_depths(planes, o, d)
    out = r.render_at(planes, o, d, depths, noise=nz)
    torch.testing.assert_close(rgb, out.rgb * 2 - 1)
    torch.testing.assert_close(wt[..., 0], out.opacity)
    # EG3D's depth: sum(w t) / sum(w) clamped to the batch's depth range (no eps)
    want_depth = torch.where(out.opacity > 0, out.depth * (out.opacity + 1e-3) / out.opacity, math.inf)
    want_depth = want_depth.clamp(depths.min(), depths.max())
    torch.testing.assert_close(depth[..., 0], want_depth)
    assert (depth >= depths.min()).all() and (depth <= depths.max()).all()
    g_ref = _grads([out.rgb * 2 - 1, want_depth.unsqueeze(-1), out.opacity.unsqueeze(-1)], [planes, *dec.parameters()])
    for a, b in zip(g_compat, g_ref):
        torch.testing.assert_close(a, b)
    assert rgb.min() >= -1.01 and rgb.max() <= 1.01 and wt.min() >= 0 and wt.max() <= 1


def test_g3dr_renderer_same_random_calls_as_official():
    """G3DR's draw sequence, written out: coarse u = rand_like of the permuted [S,B,R] linspace, then
    Python's random() > 0.6 for the target branch, then (importance branch) torch.rand(B*R, n)."""
    planes, o, d = _scene()
    dec = OSGDecoder(4, DEC_OPTS)
    depth_img = 5.0 + 0.2 * torch.rand(2, 1, 3, 3)
    target = depth_img.permute(0, 2, 3, 1).reshape(2, 9)
    r = G3DRImportanceRenderer(backend="torch")
    near, far, _ = ref.eg3d_ray_bounds(o, d)
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        random.seed(seed)
        rgb, depth, wt, mid = r(planes, dec, o, d, OPTS, importance_depth=depth_img)
        assert mid.shape == (2, 9, 9, 1) and depth.shape == wt.shape == (2, 9, 1) and rgb.shape == (2, 9, 3)
        torch.manual_seed(seed)
        random.seed(seed)
        coarse = ref.eg3d_stratified_depths(near, far, 6, u=torch.rand(6, 2, 9).permute(1, 2, 0))
        if random.random() > 0.6:
            fine = target.unsqueeze(-1) + torch.linspace(-0.05, 0.05, 4)
        else:
            w = TriplaneRenderer(dec, n_coarse=6, n_fine=4, sampling="eg3d", backend="torch").render_at(
                planes, o, d, coarse, return_weights=True).weights
            fine = ref.eg3d_importance_depths(coarse, w, 4, u=torch.rand(18, 4).reshape(2, 9, 4))
        seen.add(fine.shape[-1] == 4 and torch.equal(fine, target.unsqueeze(-1) + torch.linspace(-0.05, 0.05, 4)))
        depths = torch.sort(torch.cat([coarse, fine], -1), -1).values
        torch.testing.assert_close(mid[..., 0], 0.5 * (depths[..., 1:] + depths[..., :-1]), rtol=0, atol=0)
        # G3DR's depth: sum(w t) / (sum(w) + 1e-3)
        out = TriplaneRenderer(dec, n_coarse=6, n_fine=4, backend="torch").render_at(planes, o, d, depths, target)
        torch.testing.assert_close(depth[..., 0], out.depth)
        torch.testing.assert_close(rgb, out.rgb * 2 - 1)
    assert seen == {True, False}  # both branches ran


def test_g3dr_renderer_gradients_match_triplane_renderer():
    planes, o, d = _scene()
    planes.requires_grad_()
    dec = OSGDecoder(4, DEC_OPTS)
    depth_img = 5.0 + 0.2 * torch.rand(2, 1, 3, 3)
    torch.manual_seed(0)
    random.seed(0)  # random() = 0.84 > 0.6: the target branch
    outs = G3DRImportanceRenderer(backend="torch")(planes, dec, o, d, OPTS, importance_depth=depth_img)
    g1 = _grads(outs[:3], [planes, *dec.parameters()])
    r = TriplaneRenderer(dec, n_coarse=6, n_fine=4, sampling="eg3d", target_mode="replace", target_prob=0.4,
                         backend="torch")
    target = depth_img.permute(0, 2, 3, 1).reshape(2, 9)
    torch.manual_seed(0)
    random.seed(0)
    out = r(planes, o, d, target_depth=target)
    g2 = _grads([out.rgb * 2 - 1, out.depth.unsqueeze(-1), out.opacity.unsqueeze(-1)], [planes, *dec.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"importance_depth must be an image \[B,1,H,W\]"):
        G3DRImportanceRenderer(backend="torch")(planes, dec, o, d, OPTS, importance_depth=target)


@pytest.mark.parametrize("backend_dev", backend_params("render"))
def test_compat_backends_match_torch(backend_dev):
    backend, dev = backend_dev
    planes, o, d = (t.to(dev) for t in _scene(B=1))
    dec = OSGDecoder(4, DEC_OPTS).to(dev)
    img = torch.full((1, 1, 3, 3), 5.1, device=dev)
    outs = []
    for b in ("torch", backend):
        torch.manual_seed(3)
        random.seed(3)
        outs.append(G3DRImportanceRenderer(backend=b)(planes, dec, o, d, OPTS, importance_depth=img))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_rendering_options_validated():
    parse_rendering_options(dict(OPTS, image_resolution=128, avg_camera_pivot=[0, 0, 0], white_back=True))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth_res'\]"):
        parse_rendering_options(dict(OPTS, depth_res=3))
    with pytest.raises(ValueError, match="missing required key"):
        parse_rendering_options({k: v for k, v in OPTS.items() if k != "box_warp"})
    with pytest.raises(ValueError, match="clamp_mode"):
        parse_rendering_options(dict(OPTS, clamp_mode="relu"))
    with pytest.raises(TypeError, match="depth_resolution"):
        parse_rendering_options(dict(OPTS, depth_resolution=48.0))
    with pytest.raises(ValueError, match="ray_start/ray_end"):
        parse_rendering_options(dict(OPTS, ray_end=3.3))
    with pytest.raises(ValueError, match="density_noise"):
        parse_rendering_options(dict(OPTS, density_noise=-1))
    fixed = parse_rendering_options(dict(OPTS, ray_start=2.25, ray_end=3.3))
    assert (fixed["ray_start"], fixed["ray_end"], fixed["n_coarse"], fixed["n_fine"]) == (2.25, 3.3, 6, 4)
    planes, o, d = _scene(B=1)
    with pytest.raises(ValueError, match="unknown key"):
        EG3DImportanceRenderer()(planes, OSGDecoder(4, DEC_OPTS), o, d, dict(OPTS, foo=1))
    with pytest.raises(ValueError, match="backend"):
        EG3DImportanceRenderer(backend="gpu")


class _OfficialLikeDecoder(torch.nn.Module):
    """Shaped like EG3D's OSGDecoder (no effective_params): net = FC, Softplus, FC; forward per the
    official formula on features [N, P, M, C]."""

    def __init__(self, C, lr_mul):
        super().__init__()
        self.net = torch.nn.Sequential(FullyConnectedLayer(C, 64, lr_multiplier=lr_mul), torch.nn.Softplus(),
                                       FullyConnectedLayer(64, 4, lr_multiplier=lr_mul))

    def forward(self, feats, dirs):
        x = self.net(feats.mean(1))
        return {"rgb": torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001, "sigma": x[..., 0:1]}


def test_osg_state_dict_and_official_decoder_instances():
    off = _OfficialLikeDecoder(4, lr_mul=0.5)
    with torch.no_grad():
        for p in off.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero biases
    sd = off.state_dict()
    assert set(sd) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    osg = OSGDecoder(4, {"decoder_lr_mul": 0.5, "decoder_output_dim": 3})
    osg.load_state_dict(sd)
    feats = torch.randn(2, 3, 5, 4)
    want = off(feats, None)
    got = osg(feats, None)
    torch.testing.assert_close(got["rgb"], want["rgb"])
    torch.testing.assert_close(got["sigma"], want["sigma"])
    # as a TriplaneDecoder, from a G3DR U-Net state dict (prefix found automatically)
    tri = load_osg_state_dict({"eg3d_decoder." + k: v for k, v in sd.items()}, lr_multiplier=0.5)
    sigma, rgb = tri(feats.mean(1))
    torch.testing.assert_close(sigma, want["sigma"][..., 0])
    torch.testing.assert_close(osg.to_triplane_decoder()(feats.mean(1))[1], want["rgb"])
    with pytest.raises(ValueError, match="net.0.weight"):
        load_osg_state_dict({"a.net.0.weight": sd["net.0.weight"], "b.net.0.weight": sd["net.0.weight"]})
    with pytest.raises(ValueError, match="unknown key"):
        OSGDecoder(4, {"decoder_output_dim": 3, "hidden": 32})
    # the official instance itself drives the fused renderer, and its parameters get gradients
    planes, o, d = _scene(B=1)
    torch.manual_seed(1)
    a = EG3DImportanceRenderer(backend="torch")(planes, off, o, d, OPTS)
    torch.manual_seed(1)
    b = EG3DImportanceRenderer(backend="torch")(planes, osg, o, d, OPTS)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    a[0].sum().backward()
    assert off.net[0].weight.grad is not None and off.net[2].bias.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="OSGDecoder"):
        EG3DImportanceRenderer()(planes, torch.nn.Linear(4, 4), o, d, OPTS)


def test_run_model_and_samplers():
    planes, o, d = _scene(B=1)
    dec = OSGDecoder(4, DEC_OPTS)
    r = EG3DImportanceRenderer(backend="torch")
    pts = torch.rand(1, 7, 3) * 2 - 1
    out = r.run_model(planes, dec, pts, torch.zeros_like(pts), OPTS)
    sigma, rgb = ref.decode(ref.sample_triplanes(planes, pts, levels=1), *dec.effective_params())
    torch.testing.assert_close(out["sigma"][..., 0], sigma)
    assert out["rgb"].shape == (1, 7, 3)
    torch.manual_seed(0)
    z = r.sample_stratified(o, 2.0, 3.0, 5)
    assert z.shape == (1, 9, 5, 1) and (z[..., 0, 0] >= 2.0).all() and (z[..., -1, 0] >= 3.0).all()
    fine = r.sample_importance(z, torch.rand(1, 9, 4, 1), 3)
    assert fine.shape == (1, 9, 3, 1)


def test_all_rays_miss_gives_empty_not_nan():
    planes, o, d = _scene(B=1)
    above = o + torch.tensor([0.0, 3.0, 0.0])  # parallel rays above the box (EG3D counts a box *behind*
    # the camera as hit: its slab test has no t >= 0 clamp, and neither has ours in "eg3d" mode)
    rgb, depth, wt = EG3DImportanceRenderer(backend="torch")(planes, OSGDecoder(4, DEC_OPTS), above, d, OPTS)
    assert torch.isfinite(depth).all() and (wt == 0).all() and torch.allclose(rgb, torch.full_like(rgb, -1.0))
    assert math.isclose(depth.max().item(), 0.0)


def test_eg3d_depth_of_an_empty_ray_is_the_far_clamp():
    from g3dr_kernels import Composite
    depths = torch.tensor([[[4.0, 5.0, 6.0], [4.5, 5.0, 5.5]]])
    out = Composite(torch.zeros(1, 2, 3), torch.tensor([[5.0, 0.0]]), torch.tensor([[0.5, 0.0]]), None)
    _, depth, wt = EG3DImportanceRenderer()._finish(out, depths)
    # sum(w t) / sum(w) for the first ray; NaN -> inf -> clamped to the batch's largest depth for the second
    torch.testing.assert_close(depth[..., 0], torch.tensor([[5.0 * 0.501 / 0.5, 6.0]]))
