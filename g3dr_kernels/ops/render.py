"""Custom op for the fully fused renderer (points -> triplane sampling -> decoder -> composite).

Kernel contract (C++ `g3dr_C::render_fwd/_bwd`, Triton `g3dr_kernels.triton.render`):
  render_fwd(levels: list of [B,3,C,H_l,W_l], rays_o [B,R,3], rays_d [B,R,3], depths [B,R,S],
             w1 [hidden,C], b1 [hidden], w2 [1+D,hidden], b2 [1+D], target: [B,R] or None,
             scale (= 2/box_warp), plane_axes: int, s1, s2, c_min, c_max, density_bias, eps,
             white_bg: bool, need_weights: bool)
      -> (rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] or an empty tensor)
  render_bwd(grad_rgb, grad_depth, grad_opacity, grad_weights or None, levels, rays_o, rays_d, depths,
             w1, b1, w2, b2, target or None, out_rgb, out_depth, out_opacity, scale, plane_axes,
             s1, s2, c_min, c_max, density_bias, eps, white_bg)
      -> list: one gradient per level, then grad_w1, grad_b1, grad_w2, grad_b2.
No gradient to rays, depths or target. All inputs contiguous, same dtype.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._backend import kernels
from .composite import _zeros_if_none


@torch.library.custom_op("g3dr::render_fwd", mutates_args=())
def render_fwd(levels: List[Tensor], rays_o: Tensor, rays_d: Tensor, depths: Tensor, w1: Tensor, b1: Tensor,
               w2: Tensor, b2: Tensor, target: Optional[Tensor], scale: float, plane_axes: int, s1: float,
               s2: float, c_min: float, c_max: float, density_bias: float, eps: float, white_bg: bool,
               need_weights: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out = kernels("render", backend).render_fwd(levels, rays_o, rays_d, depths, w1, b1, w2, b2, target, scale,
                                                plane_axes, s1, s2, c_min, c_max, density_bias, eps, white_bg,
                                                need_weights)
    return tuple(out)


@render_fwd.register_fake
def _(levels, rays_o, rays_d, depths, w1, b1, w2, b2, target, scale, plane_axes, s1, s2, c_min, c_max,
      density_bias, eps, white_bg, need_weights, backend):
    B, R, S = depths.shape
    D = w2.shape[0] - 1
    w = depths.new_empty(B, R, S - 1) if need_weights else depths.new_empty(0)
    return depths.new_empty(B, R, D), depths.new_empty(B, R), depths.new_empty(B, R), w


@torch.library.custom_op("g3dr::render_bwd", mutates_args=())
def render_bwd(grad_rgb: Tensor, grad_depth: Tensor, grad_opacity: Tensor, grad_weights: Optional[Tensor],
               levels: List[Tensor], rays_o: Tensor, rays_d: Tensor, depths: Tensor, w1: Tensor, b1: Tensor,
               w2: Tensor, b2: Tensor, target: Optional[Tensor], out_rgb: Tensor, out_depth: Tensor,
               out_opacity: Tensor, scale: float, plane_axes: int, s1: float, s2: float, c_min: float,
               c_max: float, density_bias: float, eps: float, white_bg: bool, backend: str) -> List[Tensor]:
    out = kernels("render", backend).render_bwd(grad_rgb, grad_depth, grad_opacity, grad_weights, levels, rays_o,
                                                rays_d, depths, w1, b1, w2, b2, target, out_rgb, out_depth,
                                                out_opacity, scale, plane_axes, s1, s2, c_min, c_max, density_bias,
                                                eps, white_bg)
    return list(out)


@render_bwd.register_fake
def _(grad_rgb, grad_depth, grad_opacity, grad_weights, levels, rays_o, rays_d, depths, w1, b1, w2, b2, *args):
    return [torch.empty_like(lv) for lv in levels] + [torch.empty_like(t) for t in (w1, b1, w2, b2)]


def _setup_context(ctx, inputs, output):
    levels, rays_o, rays_d, depths, w1, b1, w2, b2, target, *params, need_weights, backend = inputs
    out_rgb, out_depth, out_opacity, _ = output
    ctx.n_levels = len(levels)
    ctx.save_for_backward(rays_o, rays_d, depths, w1, b1, w2, b2, target, out_rgb, out_depth, out_opacity, *levels)
    ctx.params, ctx.need_weights, ctx.backend = params, need_weights, backend


def _backward(ctx, g_rgb, g_depth, g_opacity, g_weights):
    rays_o, rays_d, depths, w1, b1, w2, b2, target, out_rgb, out_depth, out_opacity, *levels = ctx.saved_tensors
    gw = g_weights.contiguous() if (ctx.need_weights and g_weights is not None) else None
    grads = render_bwd(_zeros_if_none(g_rgb, out_rgb), _zeros_if_none(g_depth, out_depth),
                       _zeros_if_none(g_opacity, out_opacity), gw, levels, rays_o,
                       rays_d, depths, w1, b1, w2, b2, target, out_rgb, out_depth, out_opacity, *ctx.params,
                       ctx.backend)
    n = ctx.n_levels
    gw1, gb1, gw2, gb2 = grads[n:]
    return (list(grads[:n]), None, None, None, gw1, gb1, gw2, gb2) + (None,) * 12


render_fwd.register_autograd(_backward, setup_context=_setup_context)
