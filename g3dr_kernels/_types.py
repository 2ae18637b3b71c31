"""Small value types shared by every layer: the composite result and the depth kernel."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class Composite(NamedTuple):
    """Result of volume compositing.

    rgb     [B, R, D]     composited colour (or features)
    depth   [B, R]        expected depth  sum(w t) / (opacity + eps)
    opacity [B, R]        accumulated weight sum(w)
    weights [B, R, S-1]   per-interval weights, or None when not requested
    """

    rgb: torch.Tensor
    depth: torch.Tensor
    opacity: torch.Tensor
    weights: Optional[torch.Tensor]


@dataclass(frozen=True)
class DepthKernel:
    """G3DR's depth-centred gradient kernel (paper eqs. 2-3).

    k(x, t) = min(c_max, max(s1 * exp(-(x - t)^2 / s2), c_min)), x the target depth, t an
    interval's mid depth (same units as the depths). It scales the gradients of mid densities and
    mid colours in the backward pass; forward values are unchanged.
    """

    s1: float = 1.25
    s2: float = 0.03
    c_min: float = 0.05
    c_max: float = 1.0

    def __post_init__(self):
        for name in ("s1", "s2", "c_min", "c_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"DepthKernel.{name} must be a finite number, got {v!r}")
        if self.s2 <= 0:
            raise ValueError(f"DepthKernel.s2 must be > 0, got {self.s2}")
        if self.c_min > self.c_max:
            raise ValueError(f"DepthKernel needs c_min <= c_max, got c_min={self.c_min}, c_max={self.c_max}")

    @classmethod
    def for_sampling(cls, ray_start: float, ray_end: float, n_coarse: int, **kwargs) -> "DepthKernel":
        """The paper's heuristic: s2 = half the coarse sample spacing (ray_end - ray_start) / n_coarse."""
        if n_coarse < 1 or not ray_end > ray_start:
            raise ValueError(f"need n_coarse >= 1 and ray_end > ray_start, got {n_coarse}, {ray_start}, {ray_end}")
        return cls(s2=0.5 * (ray_end - ray_start) / n_coarse, **kwargs)

    def __call__(self, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """k(target, t), broadcasting; computed without gradient."""
        with torch.no_grad():
            k = self.s1 * torch.exp(-((target - t) ** 2) / self.s2)
            return k.clamp(min=self.c_min).clamp(max=self.c_max)


PLANE_AXES = {"eg3d": 0, "xyz": 1}
"""Plane conventions -> the integer code the kernels take. Plane p reads coordinates (a, b) of u:
eg3d: (x,y), (x,z), (z,x); xyz: (x,y), (x,z), (y,z). a indexes width, b height (grid_sample order)."""

PLANE_COORDS = {0: ((0, 1), (0, 2), (2, 0)), 1: ((0, 1), (0, 2), (1, 2))}
