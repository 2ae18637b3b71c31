"""G3DR's camera (3DGP convention) against the official formulas, written out here from
preddy5/G3DR src/camera.py (spherical2cartesian, compute_cam2world_matrix, sample_rays)."""
import math

import pytest
import torch

from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays


def _official(yaw, pitch, radius, fov, H, W):
    yaw, pitch = torch.as_tensor(yaw, dtype=torch.float64), torch.as_tensor(pitch, dtype=torch.float64)
    o = torch.stack([radius * torch.sin(pitch) * torch.sin(-yaw), radius * torch.cos(pitch),
                     radius * torch.sin(pitch) * torch.cos(yaw)], -1)
    fwd = -o / o.norm(dim=-1, keepdim=True)
    up = torch.tensor([0, 1.0, 0], dtype=torch.float64).expand_as(fwd)
    left = torch.cross(up, fwd, dim=-1)
    left = left / left.norm(dim=-1, keepdim=True)
    up = torch.cross(fwd, left, dim=-1)
    up = up / up.norm(dim=-1, keepdim=True)
    R = torch.stack([-left, up, -fwd], -1)
    x, y = torch.meshgrid(torch.linspace(-1, 1, W, dtype=torch.float64), torch.linspace(1, -1, H, dtype=torch.float64),
                          indexing="ij")
    x, y = x.T.flatten(), y.T.flatten()
    z = -torch.ones_like(x) / math.tan(fov / 360 * 2 * math.pi * 0.5)
    d = torch.stack([x, y, z], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    dw = torch.einsum("bij,nj->bni", R, d)
    dw = dw / dw.norm(dim=-1, keepdim=True)
    return o[:, None].expand_as(dw), dw


@pytest.mark.parametrize("H,W", [(16, 16), (5, 7)])
def test_rays_match_official(H, W):
    yaw = torch.tensor([math.pi / 2, math.pi / 2 + 0.3, 1.0])
    pitch = torch.tensor([math.pi / 2, math.pi / 2 - 0.1, 2.0])
    o_ref, d_ref = _official(yaw, pitch, 5.0, 18.0, H, W)
    c2w = g3dr_cam2world(yaw.double(), pitch.double(), 5.0, dtype=torch.float64)
    o, d = g3dr_rays(c2w, 18.0, H, W)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(d, d_ref, atol=1e-12, rtol=0)


def test_canonical_camera_looks_along_x():
    c2w = g3dr_cam2world(math.pi / 2, math.pi / 2)
    o, d = g3dr_rays(c2w, 18.0, 9, 9)
    torch.testing.assert_close(o[0, 0], torch.tensor([-5.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(d[0, 40], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)  # centre pixel
    # the corner pixel centres lie at 9 degrees from the axis horizontally and vertically
    corner = d[0, 0]
    tan_h = abs(corner[2].item()) / corner[0].item()
    assert abs(tan_h - math.tan(math.radians(9))) < 1e-5
    assert corner[1] > 0  # row 0 is the top of the image


@pytest.mark.parametrize("kw,match", [(dict(yaw=0.0, pitch=0.0), "parallel"), (dict(yaw=0.0, pitch=1.0, radius=0.0),
                                                                               "radius"),
                                      (dict(yaw=float("nan"), pitch=1.0), "finite")])
def test_bad_cameras(kw, match):
    with pytest.raises(ValueError, match=match):
        g3dr_cam2world(**kw)


def test_bad_ray_grid():
    c2w = g3dr_cam2world(1.0, 1.0)
    with pytest.raises(ValueError, match="image size"):
        g3dr_rays(c2w, 18.0, 1)
    with pytest.raises(ValueError, match="fov"):
        g3dr_rays(c2w, 180.0, 8)
