"""nn layer, cameras and the demo scene."""
import math

import pytest
import torch

import g3dr_kernels as K
from g3dr_kernels import reference
from g3dr_kernels.cameras import camera_rays, fov_to_intrinsics, look_at, orbit_cameras
from g3dr_kernels.nn import TriplaneDecoder, TriplaneRenderer
from _util import backend_params


def test_decoder_eg3d_conventions():
    dec = TriplaneDecoder(8, 16, 3, lr_multiplier=0.5)
    w1, b1, w2, b2 = dec.effective_params()
    torch.testing.assert_close(w1, dec.weight1 * 0.5 / math.sqrt(8))
    torch.testing.assert_close(w2, dec.weight2 * 0.5 / math.sqrt(16))
    f = torch.randn(5, 8)
    sigma, rgb = dec(f)
    o = torch.nn.functional.softplus(f @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(sigma, o[:, 0])
    torch.testing.assert_close(rgb, torch.sigmoid(o[:, 1:]) * 1.002 - 0.001)
    with pytest.raises(ValueError, match="sizes"):
        TriplaneDecoder(0)


def test_camera_rays_geometry():
    cams = look_at(torch.tensor([[0.0, 0.0, -3.0]]))
    rays_o, rays_d = camera_rays(cams, fov_to_intrinsics(60.0), 5)
    assert rays_o.shape == rays_d.shape == (1, 25, 3)
    torch.testing.assert_close(rays_d[0, 12], torch.tensor([0.0, 0.0, 1.0]))  # centre pixel looks at the origin
    torch.testing.assert_close(rays_d.norm(dim=-1), torch.ones(1, 25))
    # Row 0 is the image top: with +y up in the image, the top-left ray points up (+y) and left (-x seen
    # from -z looking at +z means camera x = world -x... check against the frame directly).
    c2w = cams[0]
    top_left = rays_d[0, 0] @ c2w[:3, :3]  # back to camera frame
    assert top_left[0] < 0 and top_left[1] < 0  # OpenCV: x right, y down -> top-left is (-, -)
    assert (c2w[:3, 1] @ torch.tensor([0.0, 1.0, 0.0])) < 0  # camera y (down) points to world -y
    # The edge of the field of view: the half-angle of the centre row's outermost pixel centre.
    _, d = camera_rays(cams, fov_to_intrinsics(90.0), 2)
    ang = torch.rad2deg(torch.atan2(d[0, 0, 0].abs(), d[0, 0, 2]))
    assert abs(ang.item() - math.degrees(math.atan(0.5))) < 1e-4
    with pytest.raises(ValueError, match="cam2world"):
        camera_rays(torch.eye(4), fov_to_intrinsics(30.0), 4)
    with pytest.raises(ValueError, match="fov"):
        fov_to_intrinsics(0.0)


def test_orbit_cameras_look_at_origin():
    cams = orbit_cameras(6, radius=2.0, elevation_deg=30.0)
    eye = cams[:, :3, 3]
    torch.testing.assert_close(eye.norm(dim=-1), torch.full((6,), 2.0))
    torch.testing.assert_close(cams[:, :3, 2], -eye / 2.0)  # z axis towards the origin
    assert (eye[:, 1] > 0).all()


def _renderer_inputs(B=2, res=6, C=4):
    planes = torch.randn(B, 3, C, 16, 16) * 0.5
    cams = orbit_cameras(B, radius=2.5)
    rays_o, rays_d = camera_rays(cams, fov_to_intrinsics(40.0), res)
    # the outermost corner rays miss the box at this fov/distance
    return planes, rays_o, rays_d


def test_renderer_end_to_end_reference():
    torch.manual_seed(0)
    dec = TriplaneDecoder(4, 16, 3)
    r = TriplaneRenderer(dec, n_coarse=8, n_fine=8, n_target=4, target_prob=1.0, backend="torch")
    planes, rays_o, rays_d = _renderer_inputs()
    planes.requires_grad_()
    target = torch.full(rays_o.shape[:2], 2.5)
    out = r(planes, rays_o, rays_d, target_depth=target, return_weights=True, generator=torch.Generator().manual_seed(1))
    assert out.rgb.shape == (2, 36, 3) and out.weights.shape == (2, 36, 8 + 8 + 4 - 1)
    out.rgb.sum().backward()
    assert planes.grad is not None and dec.weight1.grad is not None and dec.bias2.grad is not None
    # same seed -> same samples and outputs
    out2 = r(planes, rays_o, rays_d, target_depth=target, return_weights=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.rgb, out2.rgb)
    # rays that miss the box composite to nothing
    near, far, hit = reference.ray_box_bounds(rays_o, rays_d, 2.0)
    d = r.sample_depths(planes, rays_o, rays_d)
    assert (d[~hit] == 0).all()
    away = rays_o / rays_o.norm(dim=-1, keepdim=True)  # from outside the box, pointing away from it
    miss = r(planes.detach(), rays_o, away)
    assert miss.opacity.abs().max() == 0


@pytest.mark.parametrize("backend_dev", backend_params("render"))
def test_renderer_backends_match_reference(backend_dev):
    backend, dev = backend_dev
    dec = TriplaneDecoder(4, 16, 3).to(dev)
    planes, rays_o, rays_d = (t.to(dev) for t in _renderer_inputs(B=1, res=4))
    kw = dict(n_coarse=6, n_fine=6, n_target=2, target_prob=1.0)
    target = torch.full(rays_o.shape[:2], 2.4, device=dev)
    want = TriplaneRenderer(dec, backend="torch", **kw).eval()(planes, rays_o, rays_d, target_depth=target)
    got = TriplaneRenderer(dec, backend=backend, **kw).eval()(planes, rays_o, rays_d, target_depth=target)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_renderer_validates():
    dec = TriplaneDecoder(4)
    with pytest.raises(ValueError, match="n_coarse"):
        TriplaneRenderer(dec, n_coarse=1)
    with pytest.raises(ValueError, match="ray_start"):
        TriplaneRenderer(dec, ray_start=2.0)
    r = TriplaneRenderer(dec, ray_start=2.0, ray_end=3.0, n_fine=0, backend="torch")
    planes, rays_o, rays_d = _renderer_inputs(B=1, res=2)
    near, far = r.bounds(rays_o, rays_d)
    assert (near == 2).all() and (far == 3).all()


def test_demo_scene_renders_planet():
    from g3dr.scene import demo_decoder, demo_planes
    r = TriplaneRenderer(demo_decoder(), n_coarse=24, n_fine=24, backend="torch").eval()
    rays_o = torch.tensor([[[0.0, 0.0, -3.0], [0.0, 0.9, -3.0]]])
    rays_d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    out = r(demo_planes(), rays_o, rays_d)
    assert out.opacity[0, 0] > 0.99 and out.opacity[0, 1] < 0.01  # the sphere is hit; above it nothing
    # near the radius-0.42 surface (the pyramid's blur and the finite density ramp move it by a few hundredths)
    assert abs(out.depth[0, 0].item() - (3.0 - 0.42)) < 0.1


def test_renderer_rejects_bad_arguments():
    dec = TriplaneDecoder(4)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        TriplaneRenderer(dec, backend="gpu")
    with pytest.raises(TypeError, match="n_coarse must be an int"):
        TriplaneRenderer(dec, n_coarse=32.0)
    with pytest.raises(TypeError, match="n_fine must be an int"):
        TriplaneRenderer(dec, n_fine=16.5)
    with pytest.raises(ValueError, match="sampling"):
        TriplaneRenderer(dec, sampling="nerf")
    with pytest.raises(ValueError, match="target_mode"):
        TriplaneRenderer(dec, target_mode="mix")
    with pytest.raises(ValueError, match="n_target must be 0"):
        TriplaneRenderer(dec, target_mode="replace", n_target=4)
    with pytest.raises(ValueError, match="target_prob"):
        TriplaneRenderer(dec, target_prob=1.5)
    with pytest.raises(ValueError, match="density_noise"):
        TriplaneRenderer(dec, density_noise=-0.1)
    with pytest.raises(ValueError, match="ray_start > 0"):
        TriplaneRenderer(dec, ray_start=0.0, ray_end=1.0, disparity_space_sampling=True)
    with pytest.raises(TypeError, match="effective_params"):
        TriplaneRenderer(torch.nn.Linear(4, 4))


def test_renderer_target_depth_errors_name_the_problem():
    r = TriplaneRenderer(TriplaneDecoder(4, 8), n_coarse=4, n_fine=4, n_target=2, target_prob=1.0, backend="torch")
    planes, rays_o, rays_d = _renderer_inputs(B=1, res=2)
    with pytest.raises(ValueError, match=r"target_depth must be \[B,R\] = \[1, 4\].*got \[1, 4, 1\]"):
        r(planes, rays_o, rays_d, target_depth=torch.full((1, 4, 1), 2.5))
    with pytest.raises(ValueError, match=r"got \[4\]"):
        r(planes, rays_o, rays_d, target_depth=torch.full((4,), 2.5))
    bad = torch.full((1, 4), 2.5)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="target_depth .* contains NaN") as e:
        r(planes, rays_o, rays_d, target_depth=bad)
    assert "depths [" not in str(e.value)
    with pytest.raises(ValueError, match="rays_o"):
        r(planes, rays_o[0], rays_d[0])
    with pytest.raises(TypeError, match="target_depth has dtype torch.float64"):
        r(planes, rays_o, rays_d, target_depth=torch.full((1, 4), 2.5, dtype=torch.float64))


@pytest.mark.parametrize("sampling", ["uniform", "eg3d"])
def test_renderer_replace_mode_and_disparity(sampling):
    dec = TriplaneDecoder(4, 8)
    planes, rays_o, rays_d = _renderer_inputs(B=1, res=3)
    target = torch.full(rays_o.shape[:2], 2.6)
    r = TriplaneRenderer(dec, n_coarse=6, n_fine=4, target_mode="replace", target_prob=1.0, sampling=sampling,
                         disparity_space_sampling=True, backend="torch")
    d = r.sample_depths(planes, rays_o, rays_d, target, generator=torch.Generator().manual_seed(0))
    assert d.shape == (1, 9, 10)
    offs = target.unsqueeze(-1) + torch.linspace(-0.05, 0.05, 4)
    hit = reference.ray_box_bounds(rays_o, rays_d)[2]
    # every target sample is present exactly (not clamped, no jitter)
    assert torch.isclose(d[hit].unsqueeze(-1), offs[hit].unsqueeze(-2), rtol=0, atol=0).any(-2).all()
    # coarse samples are linear in inverse depth: check one ray against the formula with the same draws
    near, far = r.bounds(rays_o, rays_d)
    g = torch.Generator().manual_seed(0)
    if sampling == "eg3d":
        coarse = reference.eg3d_stratified_depths(near, far, 6, generator=g, disparity=True)
    else:
        coarse = reference.stratified_depths(near, far, 6, perturb=True, generator=g, disparity=True)
    torch.testing.assert_close(torch.sort(torch.cat([coarse, offs], -1), -1).values[hit], d[hit])


def test_renderer_density_noise():
    dec = TriplaneDecoder(4, 8)
    planes, rays_o, rays_d = _renderer_inputs(B=1, res=2)
    kw = dict(n_coarse=5, n_fine=3, sampling="eg3d", backend="torch")
    clean = TriplaneRenderer(dec, **kw)(planes, rays_o, rays_d, generator=torch.Generator().manual_seed(0))
    r = TriplaneRenderer(dec, density_noise=0.5, **kw)
    a = r(planes, rays_o, rays_d, generator=torch.Generator().manual_seed(0))
    b = r(planes, rays_o, rays_d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.rgb, b.rgb)  # the noise comes from the generator
    assert (a.opacity - clean.opacity).abs().max() > 1e-3
    # the final render adds the same noise as the sampler drew, permuted with the sorted depths
    depths, noise = r.render_depths(planes, rays_o, rays_d, generator=torch.Generator().manual_seed(0))
    xyz = (rays_o.unsqueeze(2) + depths.unsqueeze(-1) * rays_d.unsqueeze(2)).reshape(1, -1, 3)
    sigma, rgb = reference.decode(reference.sample_triplanes(planes, xyz), *dec.effective_params())
    want = reference.composite(sigma.reshape(depths.shape) + noise, rgb.reshape(*depths.shape, 3), depths)
    torch.testing.assert_close(a.rgb, want.rgb)
    # each sample keeps its own noise through the sort: the coarse samples carry the coarse draws
    g = torch.Generator().manual_seed(0)
    near, far = r.bounds(rays_o, rays_d)
    coarse = reference.eg3d_stratified_depths(near, far, 5, generator=g, samples_first=True)
    n_coarse = torch.randn(1, 4 * 5, 1, generator=g).reshape(1, 4, 5) * 0.5
    eq = (depths.unsqueeze(-1) == coarse.unsqueeze(-2)).to(noise.dtype)  # [B,R,S,5]
    torch.testing.assert_close((eq * noise.unsqueeze(-1)).sum(-2), n_coarse)


def test_renderer_options_are_one_block():
    from g3dr_kernels.nn import RendererOptions
    dec = TriplaneDecoder(4)
    opts = RendererOptions(n_coarse=8, n_fine=4, sampling="eg3d", target_mode="replace", backend="torch")
    r = TriplaneRenderer(dec, opts, n_fine=6)  # a keyword replaces one field of the block
    assert r.options == RendererOptions(n_coarse=8, n_fine=6, sampling="eg3d", target_mode="replace", backend="torch")
    still = r.with_options(sampling="uniform").eval()
    assert still.decoder is dec and still.kernel is r.kernel and r.sampling == "eg3d"
    assert still.options == RendererOptions(**{**vars(r.options), "sampling": "uniform"})
    with pytest.raises(TypeError, match=r"unknown renderer option\(s\) \['n_corase'\]"):
        TriplaneRenderer(dec, n_corase=8)
    with pytest.raises(ValueError, match=r"^render\.n_coarse must be >= 4, got 2"):
        RendererOptions.build(opts, prefix="render.", n_coarse=2)
