"""EG3D/G3DR sample placement ("eg3d" sampling), with pinned random numbers, against the formulas
written out here from EG3D's renderer.py / math_utils.py and G3DR's train.py."""
import random

import pytest
import torch

from g3dr_kernels import reference as ref
from g3dr_kernels.nn import TriplaneDecoder, TriplaneRenderer

D64 = torch.float64


def test_eg3d_coarse_formula_and_jitter_past_far():
    near = torch.tensor([[2.0, 4.0]], dtype=D64)
    far = torch.tensor([[3.0, 6.0]], dtype=D64)
    u = torch.rand(1, 2, 5, dtype=D64)
    got = ref.eg3d_stratified_depths(near, far, 5, u=u)
    for r in range(2):
        for i in range(5):
            n, f = near[0, r].item(), far[0, r].item()
            want = n + (i + u[0, r, i].item()) * (f - n) / (5 - 1)
            assert abs(got[0, r, i].item() - want) < 1e-12
    # always jittered over (far - near) / (N - 1): the last sample lies past the box exit
    assert (got[..., -1] > far).all()
    # drawn (not pinned) with per-ray bounds: EG3D's rand_like on a permuted [S,B,R] linspace
    torch.manual_seed(3)
    drawn = ref.eg3d_stratified_depths(near, far, 5, samples_first=True)
    torch.manual_seed(3)
    u2 = torch.rand(5, 1, 2, dtype=D64).permute(1, 2, 0)
    torch.testing.assert_close(drawn, ref.eg3d_stratified_depths(near, far, 5, u=u2), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="shape"):
        ref.eg3d_stratified_depths(near, far, 5, u=torch.rand(1, 2, 4))


def test_eg3d_coarse_disparity():
    near, far = torch.full((1, 1), 2.0, dtype=D64), torch.full((1, 1), 5.0, dtype=D64)
    u = torch.rand(1, 1, 4, dtype=D64)
    got = ref.eg3d_stratified_depths(near, far, 4, u=u, disparity=True)
    s = torch.arange(4, dtype=D64) / 3 + u[0, 0] / 3
    # the fractions i/(S-1) are float32 in EG3D (linspace/arange in the default dtype): float32 rounding
    torch.testing.assert_close(got[0, 0], 1 / (1 / 2.0 * (1 - s) + 1 / 5.0 * s), rtol=1e-6, atol=0)


def _official_importance(z, w, u, eps=1e-5):
    """EG3D's sample_importance + sample_pdf for one ray, as plain Python lists."""
    S = len(z)
    mp = [max(w[max(k - 1, 0)], w[min(k, S - 2)]) for k in range(S)]  # max_pool1d(2, 1, pad 1)
    sm = [(mp[k] + mp[k + 1]) / 2 + 0.01 for k in range(S - 1)]    # avg_pool1d(2, 1) + 0.01
    weights = [x + eps for x in sm[1:-1]]                           # bins j carry interval j+1
    bins = [(z[k] + z[k + 1]) / 2 for k in range(S - 1)]
    total = sum(weights)
    cdf = [0.0]
    for x in weights:
        cdf.append(cdf[-1] + x / total)
    out = []
    for v in u:
        j = sum(1 for c in cdf if c <= v)                           # searchsorted(right=True)
        lo, hi = max(j - 1, 0), min(j, len(weights))
        d = cdf[hi] - cdf[lo]
        d = 1.0 if d < eps else d
        out.append(bins[lo] + (v - cdf[lo]) / d * (bins[hi] - bins[lo]))
    return out


def test_eg3d_importance_matches_official_pdf_construction():
    g = torch.Generator().manual_seed(0)
    z = torch.sort(torch.rand(2, 3, 8, dtype=D64, generator=g) * 2 + 4, -1).values
    w = torch.rand(2, 3, 7, dtype=D64, generator=g) ** 3
    w[0, 0] = 0
    w[0, 1, 4] = 5.0  # a peak: its neighbours' bins get its weight through the max-pool
    u = torch.rand(2, 3, 6, dtype=torch.float32, generator=g)
    u[0, 0, 0] = 0.0
    got = ref.eg3d_importance_depths(z, w, 6, u=u)
    for b in range(2):
        for r in range(3):
            want = _official_importance(z[b, r].tolist(), w[b, r].float().double().tolist(), u[b, r].double().tolist())
            # the cdf is float32 in EG3D (and here): compare at float32 precision
            torch.testing.assert_close(got[b, r], torch.tensor(want, dtype=D64), rtol=0, atol=2e-6)
    mids = 0.5 * (z[..., 1:] + z[..., :-1])
    assert (got >= mids[..., :1] - 1e-9).all() and (got <= mids[..., -2:-1] + 1e-9).all()
    # drawn u: EG3D's torch.rand(B*R, n) in the default dtype
    torch.manual_seed(5)
    drawn = ref.eg3d_importance_depths(z, w, 6)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, ref.eg3d_importance_depths(z, w, 6, u=torch.rand(6, 6).reshape(2, 3, 6)))
    with pytest.raises(ValueError, match="4 coarse"):
        ref.eg3d_importance_depths(z[..., :3], w[..., :2], 4)


def test_eg3d_ray_bounds_miss_rule():
    o = torch.tensor([[[-5.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [-5.0, 3.0, 0.0]],
                      [[-5.0, 0.5, 0.0], [0.0, 0.0, 0.0], [-5.0, 0.0, 3.0]]])
    d = torch.tensor([[[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [1.0, 0.0, 0.0]],
                      [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    near, far, hit = ref.eg3d_ray_bounds(o, d, 2.0)
    assert hit.tolist() == [[True, False, False], [True, True, False]]
    # hit rays: slab entry/exit; a camera inside the box gets a negative near (no clamp at 0)
    torch.testing.assert_close(near[hit], torch.tensor([4.0, 4.0, -1.0]))
    torch.testing.assert_close(far[hit], torch.tensor([6.0, 6.0, 1.0]))
    # missed rays, over the whole batch: near = smallest hit near, far = largest hit *near*
    assert (near[~hit] == -1.0).all() and (far[~hit] == 4.0).all()
    # no ray hits: empty rays instead of EG3D's backwards march
    n0, f0, h0 = ref.eg3d_ray_bounds(o[:, 2:], d[:, 2:], 2.0)
    assert not h0.any() and (n0 == 0).all() and (f0 == 0).all()
    # the uniform rule empties missed rays instead
    un, uf, _ = ref.ray_box_bounds(o, d, 2.0)
    assert (un[~hit] == 0).all() and (uf[~hit] == 0).all()


def test_target_branch_and_linspace():
    assert ref.target_branch(0.4, u=0.61) and not ref.target_branch(0.4, u=0.59)  # G3DR: random() > 0.6
    assert ref.target_branch(0.4, u=0.39, rule="below") and not ref.target_branch(0.4, u=0.41, rule="below")
    assert ref.target_branch(1.0, u=0.0) and not ref.target_branch(0.0, u=0.99)
    random.seed(11)
    want = [random.random() > 0.6 for _ in range(20)]
    random.seed(11)
    assert [ref.target_branch(0.4) for _ in range(20)] == want  # Python's random, as G3DR
    with pytest.raises(ValueError, match="rule"):
        ref.target_branch(0.4, rule="above")
    t = torch.tensor([[5.0, 5.5]])
    got = ref.target_linspace_depths(t, 5, 0.05)
    torch.testing.assert_close(got[0, 1], torch.tensor([5.45, 5.475, 5.5, 5.525, 5.55]))  # endpoints included


def _scene(B=1, res=3, C=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(B, 3, C, 8, 8, generator=g, dtype=dtype)
    o = torch.tensor([-5.0, 0.0, 0.0], dtype=dtype).expand(B, res * res, 3)
    yz = torch.linspace(-0.3, 0.3, res, dtype=dtype)
    d = torch.stack([torch.ones(res, res, dtype=dtype), *torch.meshgrid(yz, yz, indexing="ij")], -1).reshape(1, -1, 3)
    d = torch.nn.functional.normalize(d, dim=-1).expand(B, -1, 3)
    return planes, o.contiguous(), d.contiguous()


def test_renderer_target_replacement():
    planes, o, d = _scene()
    dec = TriplaneDecoder(4, 8)
    target = torch.full(o.shape[:2], 5.2)
    kw = dict(n_coarse=6, n_fine=5, sampling="eg3d", target_mode="replace", backend="torch")
    r = TriplaneRenderer(dec, target_prob=1.0, **kw)
    g = torch.Generator().manual_seed(2)
    got = r.sample_depths(planes, o, d, target, generator=g)
    g = torch.Generator().manual_seed(2)
    near, far, _ = ref.eg3d_ray_bounds(o, d)
    coarse = ref.eg3d_stratified_depths(near, far, 6, generator=g, samples_first=True)
    want = torch.sort(torch.cat([coarse, target.unsqueeze(-1) + torch.linspace(-0.05, 0.05, 5)], -1), -1).values
    assert got.shape == (1, 9, 11)  # S stays n_coarse + n_fine
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # never drawn -> the importance samples
    r0 = TriplaneRenderer(dec, target_prob=0.0, **kw)
    g = torch.Generator().manual_seed(2)
    imp = r0.sample_depths(planes, o, d, target, generator=g)
    assert not torch.isclose(imp.unsqueeze(-1), want[..., 6:7].unsqueeze(-2)).any(-1).all()


def test_renderer_eg3d_uses_eg3d_samplers():
    planes, o, d = _scene()
    dec = TriplaneDecoder(4, 8)
    r = TriplaneRenderer(dec, n_coarse=6, n_fine=4, sampling="eg3d", backend="torch").eval()
    g = torch.Generator().manual_seed(4)
    got = r.sample_depths(planes, o, d, generator=g)
    g = torch.Generator().manual_seed(4)
    near, far, _ = ref.eg3d_ray_bounds(o, d)
    coarse = ref.eg3d_stratified_depths(near, far, 6, generator=g, samples_first=True)  # jittered in eval too
    w = r.render_at(planes, o, d, coarse, return_weights=True).weights
    fine = ref.eg3d_importance_depths(coarse, w, 4, generator=g)
    torch.testing.assert_close(got, torch.sort(torch.cat([coarse, fine], -1), -1).values, rtol=0, atol=0)
    assert (got[..., -1] > far).any()


def test_uniform_samplers_take_pinned_u():
    near, far = torch.full((1, 2), 2.0, dtype=D64), torch.full((1, 2), 4.0, dtype=D64)
    u = torch.rand(1, 2, 4, dtype=D64)
    got = ref.stratified_depths(near, far, 4, u=u)
    torch.testing.assert_close(got, 2.0 + (torch.arange(4, dtype=D64) + u) * 0.5, rtol=0, atol=1e-14)
    assert (got <= far.unsqueeze(-1)).all()  # inside [near, far], unlike "eg3d"
    w = torch.rand(1, 2, 3, dtype=D64)
    det = ref.importance_depths(got, w, 5, deterministic=True)
    torch.testing.assert_close(ref.importance_depths(got, w, 5, u=torch.linspace(0, 1, 5, dtype=D64).expand(1, 2, 5)),
                               det)
    t = ref.depths_around_target(torch.full((1, 2), 3.0, dtype=D64), 2, 0.1, u=torch.zeros(1, 2, 2, dtype=D64))
    torch.testing.assert_close(t, torch.tensor([[[2.9, 3.0], [2.9, 3.0]]], dtype=D64))
