"""Cameras and rays in G3DR's (EG3D's) conventions: camera-to-world 4x4 matrices in the OpenCV
frame (x right, y down, z forward), normalised intrinsics (focal length and principal point in
units of the image size), one ray per pixel centre, unit-length directions."""
from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch
import torch.nn.functional as F


def fov_to_intrinsics(fov_degrees: float, eg3d_compat: bool = False, device=None,
                      dtype=torch.float32) -> torch.Tensor:
    """Normalised intrinsics [3,3] for a square image with the given field of view (degrees).
    eg3d_compat=True reproduces EG3D's FOV_to_intrinsics, whose focal length carries an extra 1/1.414
    (its 'fov' is then the diagonal-ish angle its checkpoints were trained with)."""
    if not 0 < fov_degrees < 180:
        raise ValueError(f"fov_degrees must be in (0, 180), got {fov_degrees}")
    t = math.tan(math.radians(fov_degrees) / 2)
    f = 1 / (t * 1.414) if eg3d_compat else 0.5 / t
    return torch.tensor([[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]], device=device, dtype=dtype)


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: Tuple[float, float, float] = (0, 1, 0)
            ) -> torch.Tensor:
    """eye [B,3] (and target [B,3], default origin) -> camera-to-world [B,4,4], OpenCV frame.
    `up` is the world direction that appears upwards in the image. Raises ValueError when the camera
    sits on its target, or looks along `up` (the frame is then undefined)."""
    if not isinstance(eye, torch.Tensor) or eye.dim() != 2 or eye.shape[-1] != 3:
        got = tuple(eye.shape) if isinstance(eye, torch.Tensor) else repr(eye)
        raise ValueError(f"eye must be a [B,3] tensor, got {got}")
    target = torch.zeros_like(eye) if target is None else target
    if not isinstance(target, torch.Tensor) or target.shape != eye.shape:
        raise ValueError(f"target must be [B,3] like eye {tuple(eye.shape)}, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else target!r}")
    if not (torch.isfinite(eye).all() and torch.isfinite(target).all()):
        raise ValueError("look_at: eye and target must be finite")
    view = target - eye
    dist = view.norm(dim=-1)
    if (dist <= 1e-6 * (1 + eye.norm(dim=-1))).any():
        bad = int(torch.nonzero(dist <= 1e-6 * (1 + eye.norm(dim=-1)))[0])
        raise ValueError(f"look_at: camera {bad} sits on its target (eye == target = {eye[bad].tolist()})")
    z = view / dist.unsqueeze(-1)
    upv = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(z)
    side = torch.cross(z, upv, dim=-1)
    # |z x up| = |up| sin(angle): below 1e-4 |up| the view is (nearly) parallel to up, no frame
    if (side.norm(dim=-1) <= 1e-4 * upv.norm(dim=-1)).any():
        bad = int(torch.nonzero(side.norm(dim=-1) <= 1e-4 * upv.norm(dim=-1))[0])
        raise ValueError(f"look_at: camera {bad} looks along up={tuple(up)} (view direction {z[bad].tolist()}); "
                         f"the image orientation is undefined; pass another `up` or move the camera")
    x = F.normalize(side, dim=-1)
    y = torch.cross(z, x, dim=-1)
    c2w = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = x, y, z, eye
    return c2w


def orbit_cameras(n: int, radius: float = 2.7, elevation_deg: float = 15.0, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """A turntable: n camera-to-world matrices [n,4,4] on a circle around the y axis, `elevation_deg`
    above the xz plane (+y is up in the images), looking at the origin. elevation_deg must be in
    (-90, 90): at the poles the view is parallel to +y and the frame is undefined."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"orbit_cameras needs an int n >= 1 cameras, got {n!r}")
    if not (isinstance(radius, numbers.Real) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite positive number, got {radius!r}")
    if not (isinstance(elevation_deg, numbers.Real) and -90 < elevation_deg < 90):
        raise ValueError(f"elevation_deg must be in (-90, 90) (the poles look along the up axis), got "
                         f"{elevation_deg!r}")
    az = torch.arange(n, dtype=dtype, device=device) * (2 * math.pi / n)
    el = math.radians(elevation_deg)
    eye = torch.stack([radius * math.cos(el) * torch.sin(az), torch.full_like(az, radius * math.sin(el)),
                       -radius * math.cos(el) * torch.cos(az)], dim=-1)
    return look_at(eye)


def camera_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int | None = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cam2world [B,4,4], intrinsics [3,3] or [B,3,3] (normalised) -> rays_o, rays_d [B, H*W, 3],
    row-major over pixels (row 0 is the image top), directions unit length."""
    width = height if width is None else width
    if cam2world.dim() != 3 or cam2world.shape[-2:] != (4, 4):
        raise ValueError(f"cam2world must be [B,4,4], got {tuple(cam2world.shape)}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in (height, width)):
        raise ValueError(f"image size must be positive integers, got height={height!r}, width={width!r}")
    if intrinsics.shape not in ((3, 3), (cam2world.shape[0], 3, 3)):
        raise ValueError(f"intrinsics must be [3,3] or [B,3,3] with B = {cam2world.shape[0]}, got "
                         f"{tuple(intrinsics.shape)}")
    B = cam2world.shape[0]
    K = intrinsics.expand(B, 3, 3) if intrinsics.dim() == 2 else intrinsics
    dev, dt = cam2world.device, cam2world.dtype
    v, u = torch.meshgrid((torch.arange(height, device=dev, dtype=dt) + 0.5) / height,
                          (torch.arange(width, device=dev, dtype=dt) + 0.5) / width, indexing="ij")
    u, v = u.reshape(1, -1), v.reshape(1, -1)
    fx, fy, cx, cy, sk = K[:, 0, 0:1], K[:, 1, 1:2], K[:, 0, 2:3], K[:, 1, 2:3], K[:, 0, 1:2]
    x = (u - cx + cy * sk / fy - sk * v / fy) / fx
    y = (v - cy) / fy
    dirs_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [B, HW, 3]
    rays_d = F.normalize(dirs_cam @ cam2world[:, :3, :3].transpose(1, 2), dim=-1)
    rays_o = cam2world[:, None, :3, 3].expand_as(rays_d)
    return rays_o.contiguous(), rays_d.contiguous()


# ---------------------------------------------------------------------------------------------
# G3DR's cameras (3DGP spherical convention, OpenGL camera frame, fov over the outermost pixel centres)
# ---------------------------------------------------------------------------------------------

def spherical_to_cartesian(yaw: torch.Tensor, pitch: torch.Tensor, radius=1.0) -> torch.Tensor:
    """3DGP/G3DR spherical convention: yaw (rotation about +y) and pitch (from +y) in radians, tensors
    [B] -> points [B,3]: (r sin(pitch) sin(-yaw), r cos(pitch), r sin(pitch) cos(yaw)).
    yaw = pitch = pi/2 puts the point on the -x axis."""
    return torch.stack([radius * torch.sin(pitch) * torch.sin(-yaw), radius * torch.cos(pitch) * torch.ones_like(yaw),
                        radius * torch.sin(pitch) * torch.cos(yaw)], dim=-1)


def g3dr_cam2world(yaw, pitch, radius=5.0, look_at: torch.Tensor | None = None, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """G3DR's camera: yaw, pitch [B] (radians; numbers broadcast to B=1), radius (number or [B]),
    look_at [B,3] (default: the origin) -> camera-to-world [B,4,4] in the OpenGL frame (x right,
    y up, camera looks down -z), world +y up. The canonical training camera is
    yaw = pitch = pi/2, radius 5: at (-5, 0, 0) looking at the origin along +x."""
    yaw = torch.as_tensor(yaw, dtype=dtype, device=device).reshape(-1)
    pitch = torch.as_tensor(pitch, dtype=dtype, device=device).reshape(-1)
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    radius = torch.as_tensor(radius, dtype=dtype, device=yaw.device)
    if not torch.isfinite(yaw).all() or not torch.isfinite(pitch).all() or not torch.isfinite(radius).all():
        raise ValueError("g3dr_cam2world: yaw, pitch and radius must be finite")
    if (radius <= 0).any():
        raise ValueError(f"g3dr_cam2world: radius must be > 0, got {radius.tolist()}")
    origins = spherical_to_cartesian(yaw, pitch, radius)
    target = torch.zeros_like(origins) if look_at is None else look_at.to(origins).expand_as(origins)
    forward = target - origins
    n = forward.norm(dim=-1, keepdim=True)
    if (n < 1e-9).any():
        raise ValueError("g3dr_cam2world: the camera sits on its look-at point")
    forward = forward / n
    up_w = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=yaw.device).expand_as(forward)
    left = torch.cross(up_w, forward, dim=-1)
    ln = left.norm(dim=-1, keepdim=True)
    if (ln < 1e-6).any():
        raise ValueError("g3dr_cam2world: the view direction is parallel to the world up axis (pitch 0 or pi)")
    left = left / ln
    up = F.normalize(torch.cross(forward, left, dim=-1), dim=-1)
    c2w = torch.eye(4, dtype=dtype, device=yaw.device).repeat(yaw.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = -left, up, -forward, origins
    return c2w


def g3dr_rays(cam2world: torch.Tensor, fov_degrees: float = 18.0, height: int = 128, width: int | None = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """G3DR's rays (3DGP `sample_rays`): cam2world [B,4,4] in the OpenGL frame -> rays_o, rays_d
    [B, H*W, 3], row-major, row 0 the image top. The field of view spans the outermost pixel
    *centres*: camera-space direction (x, y, -1/tan(fov/2)) with x = linspace(-1, 1, W) across
    columns and y = linspace(1, -1, H) down the rows, normalised, then rotated."""
    width = height if width is None else width
    if cam2world.dim() != 3 or cam2world.shape[-2:] != (4, 4):
        raise ValueError(f"cam2world must be [B,4,4], got {tuple(cam2world.shape)}")
    if not (isinstance(height, int) and isinstance(width, int)) or height < 2 or width < 2:
        raise ValueError(f"image size must be integers >= 2 (the grid spans pixel centres), got {height}x{width}")
    if not 0 < fov_degrees < 180:
        raise ValueError(f"fov_degrees must be in (0, 180), got {fov_degrees}")
    dev, dt = cam2world.device, cam2world.dtype
    y, x = torch.meshgrid(torch.linspace(1, -1, height, device=dev, dtype=dt),
                          torch.linspace(-1, 1, width, device=dev, dtype=dt), indexing="ij")
    z = torch.full_like(x, -1.0 / math.tan(math.radians(fov_degrees) / 2))
    d_cam = F.normalize(torch.stack([x, y, z], -1).reshape(1, -1, 3), dim=-1)
    rays_d = F.normalize(d_cam @ cam2world[:, :3, :3].transpose(1, 2), dim=-1)
    rays_o = cam2world[:, None, :3, 3].expand_as(rays_d)
    return rays_o.contiguous(), rays_d.contiguous()
