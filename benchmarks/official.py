"""The official G3DR / EG3D code path, rewritten here (not copied) as the benchmark baseline:
grid_sample per level on [B*3, C, H, W], permute/reshape, mean over planes; PyTorch decoder;
MipRayMarcher with a cumprod of shifted alphas and an autograd Function for the depth-kernel
scaling. Equal in value to g3dr_kernels.reference, but laid out as the official code is."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from g3dr_kernels import DepthKernel

EG3D_PLANES = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                            [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                            [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)


def sample_from_planes(planes, xyz, box_warp=2.0):
    """One level: planes [B,3,C,H,W], xyz [B,N,3] -> [B,3,N,C] (EG3D sample_from_planes)."""
    B, P, C, H, W = planes.shape
    N = xyz.shape[1]
    inv = torch.linalg.inv(EG3D_PLANES.to(xyz)).unsqueeze(0).expand(B, -1, -1, -1).reshape(B * P, 3, 3)
    coords = (2 / box_warp) * xyz
    proj = torch.bmm(coords.unsqueeze(1).expand(-1, P, -1, -1).reshape(B * P, N, 3), inv)[..., :2]
    out = F.grid_sample(planes.reshape(B * P, C, H, W), proj.unsqueeze(1).to(planes.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.permute(0, 3, 2, 1).reshape(B, P, N, C)


def sample_triplanes(planes, xyz, levels=3, box_warp=2.0):
    """G3DR's multi-resolution sampling: downsample the planes per level, sum the levels, mean planes."""
    B, P, C, H, W = planes.shape
    total = 0
    for lvl in range(levels):
        p = planes if lvl == 0 else F.interpolate(planes.reshape(B * P, C, H, W), scale_factor=0.5 ** lvl,
                                                  mode="bilinear", antialias=True).reshape(B, P, C, H >> lvl, W >> lvl)
        total = total + sample_from_planes(p, xyz, box_warp)
    return total.mean(1)


class _DepthKernelGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(k)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (k,) = ctx.saved_tensors
        return g * k, None


def mip_ray_marcher(colors, densities, depths, target_depth=None, kernel=DepthKernel(), white_back=False):
    """EG3D MipRayMarcher (+ G3DR scaling): colors [B,R,S,D], densities [B,R,S,1], depths [B,R,S,1]."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    if target_depth is not None:
        k = kernel(target_depth[..., None, None], depths_mid)
        densities_mid = _DepthKernelGrad.apply(densities_mid, k)
        colors_mid = _DepthKernelGrad.apply(colors_mid, k)
    densities_mid = F.softplus(densities_mid - 1)
    alpha = 1 - torch.exp(-densities_mid * deltas)
    alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]
    rgb = torch.sum(weights * colors_mid, -2)
    opacity = weights.sum(2)
    depth = torch.sum(weights * depths_mid, -2) / (opacity + 1e-3)
    if white_back:
        rgb = rgb + 1 - opacity
    return rgb, depth, opacity, weights


def decoder(features, w1, b1, w2, b2):
    x = F.softplus(F.linear(features, w1, b1))
    x = F.linear(x, w2, b2)
    return x[..., 0:1], torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001


def render(planes, rays_o, rays_d, depths, w1, b1, w2, b2, target_depth=None, levels=3, box_warp=2.0):
    """The whole official path for one set of depths [B,R,S]."""
    B, R, S = depths.shape
    xyz = (rays_o.unsqueeze(-2) + depths.unsqueeze(-1) * rays_d.unsqueeze(-2)).reshape(B, R * S, 3)
    feats = sample_triplanes(planes, xyz, levels, box_warp)
    sigma, rgb = decoder(feats, w1, b1, w2, b2)
    return mip_ray_marcher(rgb.reshape(B, R, S, -1), sigma.reshape(B, R, S, 1), depths.unsqueeze(-1), target_depth)
