"""g3dr_kernels.cameras' generic cameras (look_at, orbit_cameras, camera_rays): degenerate and malformed
input raises a ValueError that says what was wrong, instead of a singular matrix, parallel rays, a
ZeroDivisionError or a silently truncated image."""
import math

import pytest
import torch

from g3dr_kernels.cameras import camera_rays, fov_to_intrinsics, look_at, orbit_cameras


def test_look_at_frame_is_a_rotation():
    eye = torch.tensor([[0.3, 1.0, -2.0], [2.0, -0.5, 0.1]], dtype=torch.float64)
    c2w = look_at(eye, torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], dtype=torch.float64))
    R = c2w[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(c2w[:, :3, 3], eye)


@pytest.mark.parametrize("eye, target, pattern", [
    ([[0.0, 2.0, 0.0]], None, r"looks along up"),                        # straight down at the origin
    ([[0.0, -3.0, 0.0]], None, r"looks along up"),                       # straight up
    ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], r"sits on its target"),       # eye == target
    ([[1.0, float("nan"), 3.0]], None, r"finite"),
], ids=["down", "up", "eye_is_target", "nan"])
def test_look_at_degenerate(eye, target, pattern):
    with pytest.raises(ValueError, match=pattern):
        look_at(torch.tensor(eye), None if target is None else torch.tensor(target))


def test_look_at_bad_shapes():
    with pytest.raises(ValueError, match=r"eye must be a \[B,3\] tensor, got \(3,\)"):
        look_at(torch.zeros(3))
    with pytest.raises(ValueError, match=r"target must be \[B,3\] like eye \(2, 3\), got \(1, 3\)"):
        look_at(torch.ones(2, 3), torch.zeros(1, 3))


def test_orbit_cameras():
    c2w = orbit_cameras(4, radius=2.0, elevation_deg=89.0)  # close to the pole still has a frame
    assert torch.isfinite(c2w).all() and torch.linalg.det(c2w[:, :3, :3]).sub(1).abs().max() < 1e-5
    torch.testing.assert_close(c2w[:, :3, 3].norm(dim=-1), torch.full((4,), 2.0))
    assert c2w[0, 1, 3].item() == pytest.approx(2.0 * math.sin(math.radians(89.0)), rel=1e-6)
    for bad, pattern in [(dict(n=0), r"n >= 1 cameras, got 0"), (dict(n=2.5), r"int n"), (dict(n=True), r"int n"),
                         (dict(n=2, elevation_deg=90), r"elevation_deg must be in \(-90, 90\)"),
                         (dict(n=2, elevation_deg=-90.0), r"elevation_deg"), (dict(n=2, radius=0), r"radius"),
                         (dict(n=2, radius=float("inf")), r"radius")]:
        with pytest.raises(ValueError, match=pattern):
            orbit_cameras(**bad)


def test_camera_rays_sizes():
    cams = orbit_cameras(2)
    K = fov_to_intrinsics(30.0)
    o, d = camera_rays(cams, K, 3, 5)
    assert o.shape == d.shape == (2, 15, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2, 15))
    for h, w in [(4.5, None), (4, 2.0), (0, 4), (True, 4), (4, -1)]:
        with pytest.raises(ValueError, match=r"image size must be positive integers"):
            camera_rays(cams, K, h, w)
    with pytest.raises(ValueError, match=r"intrinsics must be \[3,3\] or \[B,3,3\] with B = 2, got \(3, 3, 3\)"):
        camera_rays(cams, K.expand(3, 3, 3), 4)
