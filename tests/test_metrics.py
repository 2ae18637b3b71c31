"""g3dr.metrics on cases with known answers, plus the Table S1 density-scaling helpers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from g3dr import metrics as M


# ------------------------------------------------------------------ images


def test_psnr_identical_is_inf_and_known_value():
    a = torch.rand(3, 3, 8, 8)
    r = M.psnr(a, a.clone())
    assert r.per_image.shape == (3,) and torch.isinf(r.per_image).all() and math.isinf(r.mean)
    b = torch.zeros(2, 3, 4, 4)
    r = M.psnr(b, b + 0.1)  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(r.per_image, torch.full((2,), 20.0))
    assert abs(M.psnr(b, b + 0.1, data_range=2.0).mean - 20 * math.log10(2 / 0.1)) < 1e-4
    assert M.psnr(b[0], b[0] + 0.1).per_image.shape == (1,)  # [C,H,W] is one image


def test_psnr_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
    with pytest.raises(TypeError, match="floating"):
        M.psnr(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N,C,H,W\]"):
        M.psnr(torch.rand(4, 4), torch.rand(4, 4))


def test_ssim_identical_is_one_and_matches_skimage():
    a = torch.rand(2, 3, 24, 24)
    torch.testing.assert_close(M.ssim(a, a).per_image, torch.ones(2))
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    got = M.ssim(a, b)
    assert got.mean < 0.95
    skm = pytest.importorskip("skimage.metrics")
    for i in range(2):
        want = skm.structural_similarity(a[i].double().numpy(), b[i].double().numpy(), gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0)
        assert float(got.per_image[i]) == pytest.approx(want, abs=1e-6)  # float64 inside; fp32 result
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


@pytest.fixture(scope="module")
def lpips_net():
    lpips = pytest.importorskip("lpips")
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError(f"LPIPS construction tried to download weights: {a}")

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.hub, "load_state_dict_from_url", no_download)
    try:  # torchvision's weight enums fetch through their own import of it
        import torchvision.models._api as tv_api
        mp.setattr(tv_api, "load_state_dict_from_url", no_download, raising=False)
    except ImportError:
        pass
    try:  # these flags must build VGG with random weights and no file or network access
        net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    finally:
        mp.undo()
    with torch.no_grad():  # pretrained=False leaves the linear heads random; non-negative heads keep LPIPS >= 0
        for lin in net.lins:
            lin.model[-1].weight.abs_()
    return net.eval()


def test_lpips_identical_is_zero(lpips_net):
    a = torch.rand(2, 3, 32, 32)
    r = M.lpips_distance(a, a.clone(), lpips_net)
    assert r.per_image.shape == (2,)
    torch.testing.assert_close(r.per_image, torch.zeros(2), atol=1e-6, rtol=0)
    d = M.lpips_distance(a, torch.rand(2, 3, 32, 32), lpips_net, batch_size=1)
    assert (d.per_image > 1e-4).all()
    with pytest.raises(TypeError, match="lpips.LPIPS"):
        M.lpips_distance(a, a, "vgg")


# ------------------------------------------------------------------ FID / KID / IS


class TinyFeatures(nn.Module):
    """A tiny random feature extractor: images [B,3,H,W] -> [B,6]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.num_features = 6

    def forward(self, x):
        return F.adaptive_avg_pool2d(torch.tanh(self.conv(x.float())), 1).flatten(1)


def test_fid_identical_sets_near_zero_and_different_sets_not():
    ext = TinyFeatures()
    real = torch.rand(40, 3, 16, 16)
    assert abs(M.fid(real, real.clone(), ext, batch_size=16)) < 1e-4
    fake = (real * 0.5 + 0.4).clamp(0, 1)
    assert M.fid(real, fake, ext) > 1e-3
    assert M.fid([real[:20], real[20:]], real, ext) == pytest.approx(0.0, abs=1e-4)  # iterables of batches work
    plain = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # float-only, no num_features
    assert abs(M.fid(real, real, plain)) < 1e-4 and M.fid(real, fake, plain) > 1e-4


def test_kid_identical_near_zero():
    ext = TinyFeatures()
    real = torch.rand(24, 3, 16, 16)
    mean, _ = M.kid(real, real.clone(), ext, subsets=5, subset_size=1000)  # subset_size capped at 24
    assert abs(mean) < 1e-3
    mean2, _ = M.kid(real, (real * 0.3).clamp(0, 1), ext, subsets=5)
    assert mean2 > 10 * abs(mean) + 1e-4


class OneHotLogits(nn.Module):
    """Logits read from the first row of the red channel: images with a one-hot first row give
    confident, known class predictions."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, 0, 0, :self.k] * 100.0


def test_inception_score_known_answers():
    k = 4
    imgs = torch.zeros(16, 3, 8, 8)
    imgs[torch.arange(16), 0, 0, torch.arange(16) % k] = 1.0  # each class 4 times, predicted with certainty
    mean, _ = M.inception_score(imgs, OneHotLogits(k), splits=1)
    assert mean == pytest.approx(k, rel=1e-3)
    same = torch.zeros(16, 3, 8, 8)
    same[:, 0, 0, 0] = 1.0  # every image the same class -> IS 1
    assert M.inception_score(same, OneHotLogits(k), splits=1)[0] == pytest.approx(1.0, abs=1e-3)


def test_inception_extractor_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope" / M.INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as e:
        M.inception_extractor(missing)
    assert str(missing) in str(e.value) and M.INCEPTION_WEIGHTS_URL in str(e.value)
    with pytest.raises(TypeError, match="nn.Module"):
        M.fid(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), "inception")


@pytest.mark.slow  # ~10 s on 2 shared cores: builds InceptionV3 twice and writes its 100 MB weights
def test_inception_extractor_loads_a_local_file(tmp_path, monkeypatch):
    """The real loading path: a weights file (random here, same layout as the real one) from disk."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    rnd = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # random init, nothing fetched
    path = tmp_path / M.INCEPTION_WEIGHTS_FILE
    torch.save(rnd.state_dict(), path)
    monkeypatch.undo()
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    ext = M.inception_extractor(path, "2048")
    torch.testing.assert_close(ext.net.state_dict()["Conv2d_1a_3x3.conv.weight"],
                               rnd.state_dict()["Conv2d_1a_3x3.conv.weight"])
    out = ext(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()


# ------------------------------------------------------------------ depth


def test_nfs_constant_is_one_and_uniform_ramp_is_bins():
    assert M.nfs(torch.full((2, 8, 8), 5.0), 4.0, 6.0) == pytest.approx(1.0)
    B, k = 64, 4
    ramp = 4.0 + (torch.arange(B * k, dtype=torch.float64) + 0.5) / (B * k) * 2.0  # k per bin
    assert M.nfs(ramp.reshape(1, 16, 16).float(), 4.0, 6.0, bins=B) == pytest.approx(B, rel=1e-6)
    # half the pixels in one bin, half in another -> exp(log 2) = 2; out-of-range values clamp to the end bins
    two = torch.tensor([[3.0, 3.5], [7.0, 9.0]])
    assert M.nfs(two, 4.0, 6.0) == pytest.approx(2.0)
    per = M.nfs(torch.stack([torch.full((4, 4), 5.0), two.repeat(2, 2)]), 4.0, 6.0, reduction="none")
    torch.testing.assert_close(per, torch.tensor([1.0, 2.0]))


def test_nfs_bad_input():
    with pytest.raises(ValueError, match="min_depth < max_depth"):
        M.nfs(torch.rand(1, 4, 4), 6.0, 4.0)
    with pytest.raises(ValueError, match="NaN"):
        M.nfs(torch.tensor([[float("nan"), 1.0]]), 0.0, 2.0)


def test_depth_accuracy_affine_invariant():
    ref = torch.rand(3, 8, 8) + 4
    assert M.depth_accuracy(3.0 * ref + 2.0, ref) == pytest.approx(0.0, abs=1e-10)
    assert M.depth_accuracy(-ref, ref) == pytest.approx(4.0, rel=1e-6)  # n -> -n: mean (2n)^2 = 4
    assert M.depth_accuracy(torch.rand(3, 8, 8), ref) > 0.5


def test_depth_errors_known_and_masked():
    t = torch.rand(2, 4, 4) + 4
    p = t + 0.1
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    p[~mask] += 5.0  # excluded pixels carry a large error
    e = M.depth_errors(p, t, mask)
    assert e["abs_mean"] == pytest.approx(0.1, abs=1e-6) and e["abs_median"] == pytest.approx(0.1, abs=1e-6)
    assert e["count"] == 16
    assert M.depth_errors(p, t)["abs_mean"] == pytest.approx(2.6, abs=1e-6)
    with pytest.raises(ValueError, match="no pixel"):
        M.depth_errors(p, t, torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        M.depth_errors(p, t, mask.float())


# ------------------------------------------------------------------ geometry


def test_iou_two_known_boxes():
    a = torch.zeros(8, 8, 8, dtype=torch.bool)
    b = torch.zeros(8, 8, 8, dtype=torch.bool)
    a[0:4, 0:4, 0:4] = True
    b[2:6, 2:6, 2:6] = True
    assert M.iou(a, b) == pytest.approx(8 / 120)
    assert M.iou(a, a) == 1.0 and M.iou(a, ~a) == 0.0
    with pytest.raises(TypeError, match="bool"):
        M.iou(a.float(), b)


def test_chamfer_and_fscore_known_shift():
    g = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij"), -1).reshape(-1, 3)  # spacing 1
    shifted = g + torch.tensor([0.0, 0.0, 0.1])
    for method in ("torch", "kdtree"):
        if method == "kdtree":
            pytest.importorskip("scipy")
        assert M.chamfer(g, shifted, chunk=7, method=method) == pytest.approx(0.1, abs=1e-6)  # fp32 0.1
    assert M.fscore(g, shifted, 0.05)["fscore"] == 0.0
    f = M.fscore(g, shifted, 0.2)
    assert f["fscore"] == 1.0 and f["precision"] == 1.0 and f["recall"] == 1.0
    n = len(g) // 2
    half = M.fscore(g[:n], g, 0.05)  # the prediction is exact but covers n of the 125 true points
    assert half["precision"] == 1.0 and half["recall"] == pytest.approx(n / len(g))
    assert half["fscore"] == pytest.approx(2 * (n / len(g)) / (1 + n / len(g)))


def test_nearest_distances_chunked_matches_dense():
    a, b = torch.randn(300, 3), torch.randn(200, 3)
    dense = torch.cdist(a.double(), b.double()).amin(1)
    torch.testing.assert_close(M.nearest_distances(a, b, chunk=17, method="torch"), dense)
    pytest.importorskip("scipy")
    torch.testing.assert_close(M.nearest_distances(a, b, method="kdtree"), dense)


def _sphere_samples(n, r, gen):
    return F.normalize(torch.randn(n, 3, generator=gen, dtype=torch.float64), dim=1) * r


def test_chamfer_sphere_mesh_vs_analytic_surface():
    trimesh = pytest.importorskip("trimesh")
    gen = torch.Generator().manual_seed(1)
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    on_mesh = torch.from_numpy(trimesh.sample.sample_surface(mesh, 20000, seed=1)[0])
    truth = _sphere_samples(20000, 1.0, gen)
    # icosphere(4): chord sag <= 1 - cos(edge/2) ~ 1e-3, far below the sampling term (mean nearest
    # neighbour ~ 0.5 sqrt(4 pi / n) ~ 0.0125), so the mesh scores like a second sample of the true sphere
    c = M.chamfer(on_mesh, truth)
    c_ref = M.chamfer(_sphere_samples(20000, 1.0, gen), truth)
    assert c == pytest.approx(c_ref, rel=0.05) and 0.008 < c < 0.016
    d = M.nearest_distances(on_mesh, truth)
    assert (d >= (on_mesh.norm(dim=1) - 1).abs() - 1e-12).all()  # never closer than the surface itself
    assert M.chamfer(on_mesh * 1.05, truth) == pytest.approx(0.05, abs=0.006)  # a 5% too large mesh is seen
    assert M.fscore(on_mesh, truth, 0.05)["fscore"] > 0.99
    assert M.fscore(on_mesh * 1.05, truth, 0.03)["fscore"] < 0.01


def test_chamfer_bad_input():
    with pytest.raises(ValueError, match=r"\[N,3\]"):
        M.chamfer(torch.rand(4, 2), torch.rand(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        M.chamfer(torch.tensor([[float("nan"), 0, 0]]), torch.rand(4, 3))


# ------------------------------------------------------------------ Table S1 density scaling


def test_scale_density_exact():
    sigma = torch.linspace(-30, 30, 201, dtype=torch.float64)
    for s in (1.0, 5.0, 10.0, 50.0):
        got = F.softplus(M.scale_density(sigma, s, density_bias=-1.0) - 1.0)
        torch.testing.assert_close(got, s * F.softplus(sigma - 1.0), rtol=1e-10, atol=1e-300)
    with pytest.raises(ValueError, match="> 0"):
        M.scale_density(sigma, 0.0)


def test_sigma_scaled_params_scale_raw_sigma_only():
    from g3dr_kernels import reference
    from g3dr_kernels.nn import TriplaneDecoder
    dec = TriplaneDecoder(8, 16, 3)
    f = torch.randn(50, 8)
    sigma, rgb = reference.decode(f, *dec.effective_params())
    s_sigma, s_rgb = reference.decode(f, *M.sigma_scaled_params(dec, 10.0))
    torch.testing.assert_close(s_sigma, 10 * sigma)
    torch.testing.assert_close(s_rgb, rgb)
    w = dec.effective_params()[2].detach().clone()
    M.sigma_scaled_params(dec, 10.0)
    torch.testing.assert_close(dec.effective_params()[2], w)  # the decoder is untouched


def test_density_scaled_rays_render_the_scaled_density_field():
    """Fused render with (d/s, s t) == unfused compositing of density s * softplus(sigma + bias)."""
    import g3dr_kernels
    from g3dr_kernels import reference
    torch.manual_seed(3)
    B, R, S, C = 1, 24, 16, 4
    planes = torch.randn(B, 3, C, 8, 8, dtype=torch.float64)
    params = [torch.randn(8, C, dtype=torch.float64), torch.randn(8, dtype=torch.float64),
              torch.randn(4, 8, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    rays_o = torch.randn(B, R, 3, dtype=torch.float64) * 0.1 - torch.tensor([0, 0, 2.0], dtype=torch.float64)
    rays_d = F.normalize(torch.randn(B, R, 3, dtype=torch.float64) * 0.2 + torch.tensor([0, 0, 1.0],
                                                                                           dtype=torch.float64), dim=-1)
    depths = torch.linspace(1.0, 3.0, S, dtype=torch.float64).expand(B, R, S).contiguous()
    pts = rays_o.unsqueeze(2) + depths.unsqueeze(-1) * rays_d.unsqueeze(2)
    sigma, rgb = reference.decode(reference.sample_triplanes(planes, pts.reshape(B, -1, 3), levels=2),
                                  *params)
    sigma, rgb = sigma.reshape(B, R, S), rgb.reshape(B, R, S, 3)
    # MipRayMarcher: the density of interval i is softplus(mid sigma + bias), mid sigma = mean of its ends
    mid = lambda x: 0.5 * (x[:, :, 1:] + x[:, :, :-1])  # noqa: E731
    sigma_mid, rgb_mid, t_mid, delta = mid(sigma), mid(rgb), mid(depths), depths[..., 1:] - depths[..., :-1]
    for s in (1.0, 5.0, 50.0):
        want = reference.composite_intervals(M.scale_density(sigma_mid, s), rgb_mid, t_mid, delta)
        d2, t2 = M.density_scaled_rays(rays_d, s, depths)
        got = g3dr_kernels.render_triplanes(planes, rays_o, d2, t2, *params, levels=2, backend="torch")
        torch.testing.assert_close(got.rgb, want.rgb)
        torch.testing.assert_close(got.opacity, want.opacity)
        torch.testing.assert_close(got.depth / s, want.depth)
        if s > 1:
            assert (got.opacity > base.opacity).all()  # denser field, more opaque rays
        else:
            base = got


def test_view_metrics_bundle():
    rgb = torch.rand(2, 3, 12, 12)
    depth = torch.rand(2, 12, 12) + 4
    out = M.view_metrics(rgb, rgb, depth + 0.25, depth)
    assert math.isinf(out["psnr"]) and out["ssim"] == pytest.approx(1.0)
    assert out["depth_abs_mean"] == pytest.approx(0.25, abs=1e-6)
    assert out["depth_abs_median"] == pytest.approx(0.25, abs=1e-6)
    assert "lpips" not in out
    small = M.view_metrics(rgb[..., :8, :8], (rgb[..., :8, :8] + 0.1).clamp(0, 1))
    assert set(small) == {"psnr"} and small["psnr"] < 30
    with pytest.raises(ValueError, match="both"):
        M.view_metrics(rgb, rgb, pred_depth=depth)
