"""Pure-PyTorch reference renderer: the oracle every backend is tested against, and the "torch"
backend. Written from the equations in DESIGN.md; no validation here (the public functions in
`g3dr_kernels.functional` validate before calling in).

Shapes: B batch, N points, R rays, S samples per ray, C channels, D colour channels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._types import PLANE_AXES, PLANE_COORDS, Composite, DepthKernel

# ---------------------------------------------------------------------------------------------
# Multi-resolution triplane sampling
# ---------------------------------------------------------------------------------------------


def build_pyramid(finest: torch.Tensor, levels: int) -> List[torch.Tensor]:
    """[B,3,C,H,W] -> finest-first list of `levels` tensors; level l is the antialiased bilinear
    downsampling of the finest level by 0.5**l (as the official G3DR code does). fp16/bf16 planes are
    downsampled in float32 (antialiased interpolate has no half kernel on every device) and the
    coarser levels cast back to the plane dtype."""
    B, P, C, H, W = finest.shape
    out = [finest]
    low = finest.dtype in (torch.float16, torch.bfloat16)
    flat = finest.reshape(B * P, C, H, W)
    flat = flat.float() if low else flat
    for lvl in range(1, levels):
        down = F.interpolate(flat, scale_factor=0.5 ** lvl, mode="bilinear", antialias=True, align_corners=False)
        out.append(down.reshape(B, P, C, *down.shape[-2:]).to(finest.dtype))
    return out


def project(xyz: torch.Tensor, box_warp: float, plane_axes: Union[str, int]) -> torch.Tensor:
    """[B,N,3] world points -> [B,3,N,2] plane coordinates in [-1,1] (grid_sample order: (w, h))."""
    code = PLANE_AXES[plane_axes] if isinstance(plane_axes, str) else plane_axes
    u = xyz * (2.0 / box_warp)
    return torch.stack([u[..., list(ab)] for ab in PLANE_COORDS[code]], dim=1)


def sample_pyramid(levels: Sequence[torch.Tensor], xyz: torch.Tensor, box_warp: float = 2.0,
                   plane_axes: Union[str, int] = "eg3d") -> torch.Tensor:
    """Sum over levels, mean over the 3 planes, of bilinear samples (align_corners=False, zeros
    outside). levels: finest-first list of [B,3,C,H_l,W_l]; xyz [B,N,3] -> [B,N,C]."""
    B, N = xyz.shape[:2]
    C = levels[0].shape[2]
    dtype = levels[0].dtype
    low = dtype in (torch.float16, torch.bfloat16)  # the oracle computes half planes in float32
    grid = project(xyz.float() if low else xyz, box_warp, plane_axes).reshape(B * 3, 1, N, 2)
    out = grid.new_zeros(B, N, C)
    for lv in levels:
        lv = lv.float() if low else lv
        H, W = lv.shape[-2:]
        s = F.grid_sample(lv.reshape(B * 3, C, H, W), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)  # [B*3, C, 1, N]
        out = out + s.reshape(B, 3, C, N).mean(1).transpose(1, 2)
    return out.to(dtype)


def sample_triplanes(planes: Union[torch.Tensor, Sequence[torch.Tensor]], xyz: torch.Tensor, *, levels: int = 3,
                     box_warp: float = 2.0, plane_axes: str = "eg3d") -> torch.Tensor:
    """planes [B,3,C,H,W] (pyramid built here) or a finest-first list; xyz [B,N,3] -> [B,N,C]."""
    pyr = build_pyramid(planes, levels) if isinstance(planes, torch.Tensor) else list(planes)
    return sample_pyramid(pyr, xyz, box_warp, plane_axes)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


def decode(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
           b2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """features [..., C] -> sigma [...] (raw), rgb [..., D] = sigmoid(o[...,1:]) * (1 + 2e-3) - 1e-3.
    h = softplus(f @ w1.T + b1), o = h @ w2.T + b2 (nn.Linear layout: w1 [hidden,C], w2 [1+D,hidden])."""
    h = F.softplus(features @ w1.t() + b1)
    o = h @ w2.t() + b2
    return o[..., 0], torch.sigmoid(o[..., 1:]) * (1 + 2e-3) - 1e-3


# ---------------------------------------------------------------------------------------------
# Compositing with depth-kernel gradient scaling
# ---------------------------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `k` (no gradient to k)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (k,) = ctx.saved_tensors
        return g * k, None


def composite_intervals(sigma_mid: torch.Tensor, rgb_mid: torch.Tensor, t_mid: torch.Tensor, delta: torch.Tensor, *,
                        target_depth: Optional[torch.Tensor] = None, kernel: DepthKernel = DepthKernel(),
                        density_bias: float = -1.0, eps: float = 1e-3,
                        white_background: bool = False) -> Composite:
    """Composite on intervals: sigma_mid [B,R,I], rgb_mid [B,R,I,D], t_mid [B,R,I], delta [B,R,I].

    alpha_i = 1 - exp(-softplus(sigma_mid_i + density_bias) * delta_i)
    T_i = prod_{j<i} (1 - alpha_j + 1e-10), w_i = alpha_i T_i
    With target_depth [B,R] the gradients reaching sigma_mid_i and rgb_mid_i are multiplied by
    kernel(target, t_mid_i); forward values are unchanged.
    """
    if target_depth is not None:
        k = kernel(target_depth.unsqueeze(-1), t_mid)
        sigma_mid = _ScaleGrad.apply(sigma_mid, k)
        rgb_mid = _ScaleGrad.apply(rgb_mid, k.unsqueeze(-1))
    alpha = 1 - torch.exp(-F.softplus(sigma_mid + density_bias) * delta)
    shifted = torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], dim=-1)
    weights = alpha * torch.cumprod(shifted, dim=-1)[..., :-1]
    opacity = weights.sum(-1)
    rgb = (weights.unsqueeze(-1) * rgb_mid).sum(-2)
    if white_background:
        rgb = rgb + (1 - opacity).unsqueeze(-1)
    depth = (weights * t_mid).sum(-1) / (opacity + eps)
    return Composite(rgb, depth, opacity, weights)


def composite(sigma: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, *,
              target_depth: Optional[torch.Tensor] = None, kernel: DepthKernel = DepthKernel(),
              density_bias: float = -1.0, eps: float = 1e-3, white_background: bool = False) -> Composite:
    """MipRayMarcher on the S-1 intervals of sigma [B,R,S], rgb [B,R,S,D], depths [B,R,S]:
    mid density, mid colour, mid depth, delta = depths[i+1] - depths[i]."""
    sigma_mid = 0.5 * (sigma[..., 1:] + sigma[..., :-1])
    rgb_mid = 0.5 * (rgb[..., 1:, :] + rgb[..., :-1, :])
    t_mid = 0.5 * (depths[..., 1:] + depths[..., :-1])
    delta = depths[..., 1:] - depths[..., :-1]
    return composite_intervals(sigma_mid, rgb_mid, t_mid, delta, target_depth=target_depth, kernel=kernel,
                               density_bias=density_bias, eps=eps, white_background=white_background)


# ---------------------------------------------------------------------------------------------
# The whole renderer
# ---------------------------------------------------------------------------------------------


def render_triplanes(planes, rays_o: torch.Tensor, rays_d: torch.Tensor, depths: torch.Tensor, w1: torch.Tensor,
                     b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *, target_depth: Optional[torch.Tensor] = None,
                     kernel: DepthKernel = DepthKernel(), levels: int = 3, box_warp: float = 2.0,
                     plane_axes: str = "eg3d", density_bias: float = -1.0, eps: float = 1e-3,
                     white_background: bool = False) -> Composite:
    """Points o + t d for every depth -> sample_triplanes -> decode -> composite.
    rays_o, rays_d [B,R,3], depths [B,R,S] -> Composite (rgb [B,R,D], ...)."""
    B, R, S = depths.shape
    xyz = (rays_o.unsqueeze(2) + depths.unsqueeze(-1) * rays_d.unsqueeze(2)).reshape(B, R * S, 3)
    feats = sample_triplanes(planes, xyz, levels=levels, box_warp=box_warp, plane_axes=plane_axes)
    sigma, rgb = decode(feats, w1, b1, w2, b2)
    return composite(sigma.reshape(B, R, S), rgb.reshape(B, R, S, rgb.shape[-1]), depths, target_depth=target_depth,
                     kernel=kernel, density_bias=density_bias, eps=eps, white_background=white_background)


# Sample placement lives in g3dr_kernels.sampling; these names stay importable from here.
from .sampling import (  # noqa: E402,F401
    depths_around_target, eg3d_importance_depths, eg3d_ray_bounds, eg3d_stratified_depths, importance_depths,
    merge_depths, ray_box_bounds, sample_pdf, smooth_weights, stratified_depths, target_branch,
    target_linspace_depths)
