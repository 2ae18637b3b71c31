"""G3DR's cameras for training and rendering, on g3dr_kernels.cameras (3DGP spherical convention):
the canonical camera, the novel-view samplers (official uniform, paper Gaussian) and trajectories."""
from __future__ import annotations

import math
from typing import Tuple

import torch

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
