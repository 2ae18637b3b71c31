"""G3DR's cameras for training and rendering, on g3dr_kernels.cameras (3DGP spherical convention):
the canonical camera, the novel-view samplers (official uniform, paper Gaussian) and trajectories."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from g3dr_kernels.cameras import g3dr_cam2world, g3dr_rays

from . import schedules
from .config import Config

CANONICAL_YAW = CANONICAL_PITCH = math.pi / 2


def rays(yaw: torch.Tensor, pitch: torch.Tensor, cfg: Config, resolution: int | None = None,
         device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """yaw, pitch [B] (radians) -> rays_o, rays_d [B, H*W, 3] with the config's radius and fov."""
    res = resolution or cfg.model.image_size
    c2w = g3dr_cam2world(yaw, pitch, cfg.render.radius, device=device)
    return g3dr_rays(c2w, cfg.render.fov, res)


def canonical_rays(cfg: Config, batch: int = 1, resolution: int | None = None, device=None):
    """The canonical view (yaw = pitch = pi/2) for `batch` images: rays_o, rays_d [B, H*W, 3]."""
    o, d = rays(torch.tensor([CANONICAL_YAW]), torch.tensor([CANONICAL_PITCH]), cfg, resolution, device)
    return o.expand(batch, -1, -1), d.expand(batch, -1, -1)


def canonical_camera_frame(points: torch.Tensor, radius: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """points [..., 3] (world) -> (the canonical camera's centre [3], the points in its frame [..., 3]):
    x right, y up, z backwards (OpenGL: the camera looks down its -z), in the points' dtype and device."""
    c2w = g3dr_cam2world(CANONICAL_YAW, CANONICAL_PITCH, radius, device=points.device, dtype=points.dtype)[0]
    return c2w[:3, 3], (points - c2w[:3, 3]) @ c2w[:3, :3]


def input_view_regions(points: torch.Tensor, depth: torch.Tensor, cfg: Config, margin: float
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the input (canonical) view says about 3D points: points [B,N,3], depth [B,1,H,W] (the input
    view's depth, ray distance in G3DR units) -> (empty, behind), bool [B,N].
    The input's surface is its depth map seen as z-depth (along the camera axis), extended beyond the
    image by repeating its edge pixels (the scene is taken to go on as it leaves the frame).
    empty: in front of that surface by more than `margin` (against the 3x3 minimum around the pixel, so
      silhouettes are kept); behind: behind it by more than `margin` (3x3 maximum). A point is at most
      one of the two; points near the surface or in its shadow at its edges are neither."""
    B, H, W = depth.shape[0], depth.shape[-2], depth.shape[-1]
    rel = canonical_camera_frame(points, cfg.render.radius)[1]
    focal = 1.0 / math.tan(math.radians(cfg.render.fov) / 2)
    z = -rel[..., 2]
    ahead = z.clamp_min(1e-6)
    x, y = focal * rel[..., 0] / ahead, focal * rel[..., 1] / ahead  # [-1,1] over the outermost pixel centres
    grid = torch.stack([x, -y], -1).clamp(-1, 1)[:, None]  # grid_sample: -1 is the top row; clamp = edge pixels
    gy, gx = torch.meshgrid(torch.linspace(1, -1, H, device=points.device, dtype=points.dtype),
                            torch.linspace(-1, 1, W, device=points.device, dtype=points.dtype), indexing="ij")
    zmap = depth.reshape(B, 1, H, W).to(points.dtype) * focal / (gx.square() + gy.square() + focal ** 2).sqrt()
    near = F.grid_sample(-F.max_pool2d(-zmap, 3, 1, 1), grid, mode="nearest", align_corners=True)[:, 0, 0]
    far = F.grid_sample(F.max_pool2d(zmap, 3, 1, 1), grid, mode="nearest", align_corners=True)[:, 0, 0]
    return (z < near - margin), (z > far + margin)


def sample_novel(cfg: Config, step: int, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """n novel-view angles (yaw [n], pitch [n]) for training step `step`.
    uniform (official): yaw = pi/2 + U(-1,1) * yaw_range(step) (pi/24 -> pi/6 over the first third),
      pitch = pi/2 + U(-1,1) * pitch_range (pi/18);
    gaussian (paper): yaw ~ N(pi/2, yaw_std), pitch = pi/2 + N(0, pitch_std)."""
    s = cfg.schedule
    if s.view_sampler == "uniform":
        u = torch.rand(2, n, generator=generator) * 2 - 1
        return CANONICAL_YAW + u[0] * schedules.yaw_range(cfg, step), CANONICAL_PITCH + u[1] * s.pitch_range
    z = torch.randn(2, n, generator=generator)
    return CANONICAL_YAW + z[0] * s.yaw_std, CANONICAL_PITCH + z[1] * s.pitch_std


def front_circle(n: int, yaw_amp: float = 0.25, pitch_amp: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official visualiser's trajectory: a loop of n views, yaw +-yaw_amp, pitch +-pitch_amp (radians)."""
    a = torch.arange(n, dtype=torch.float32) * (2 * math.pi / n)
    return CANONICAL_YAW + yaw_amp * torch.sin(a), CANONICAL_PITCH + pitch_amp * torch.cos(a)


def orbit(n: int, pitch: float = CANONICAL_PITCH) -> Tuple[torch.Tensor, torch.Tensor]:
    """A full turn around the y axis starting at the canonical view."""
    yaw = CANONICAL_YAW + torch.arange(n, dtype=torch.float32) * (2 * math.pi / n)
    return yaw, torch.full_like(yaw, pitch)
