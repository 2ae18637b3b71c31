"""Custom op for volume compositing with the depth-kernel gradient scaling.

Kernel contract (C++ `g3dr_C::composite_fwd/_bwd`, Triton `g3dr_kernels.triton.composite`):
  composite_fwd(sigma [B,R,S], rgb [B,R,S,D], depths [B,R,S], target: [B,R] or None,
                s1, s2, c_min, c_max, density_bias, eps: float, white_bg: bool, need_weights: bool)
      -> (rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] or an empty tensor)
  composite_bwd(grad_rgb [B,R,D], grad_depth [B,R], grad_opacity [B,R], grad_weights [B,R,S-1] or None,
                sigma, rgb, depths, target or None, out_rgb, out_depth, out_opacity,
                s1, s2, c_min, c_max, density_bias, eps, white_bg)
      -> (grad_sigma [B,R,S], grad_rgb [B,R,S,D]); with a target, the gradients of the mid
         density and mid colour of interval i are multiplied by k(target, t_i) (DESIGN.md).
All inputs contiguous, same dtype; no gradient to depths or target.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import kernels


@torch.library.custom_op("g3dr::composite_fwd", mutates_args=())
def composite_fwd(sigma: Tensor, rgb: Tensor, depths: Tensor, target: Optional[Tensor], s1: float, s2: float,
                  c_min: float, c_max: float, density_bias: float, eps: float, white_bg: bool, need_weights: bool,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    out = kernels("composite", backend).composite_fwd(sigma, rgb, depths, target, s1, s2, c_min, c_max,
                                                      density_bias, eps, white_bg, need_weights)
    return tuple(out)


@composite_fwd.register_fake
def _(sigma, rgb, depths, target, s1, s2, c_min, c_max, density_bias, eps, white_bg, need_weights, backend):
    B, R, S = sigma.shape
    w = sigma.new_empty(B, R, S - 1) if need_weights else sigma.new_empty(0)
    return rgb.new_empty(B, R, rgb.shape[-1]), sigma.new_empty(B, R), sigma.new_empty(B, R), w


@torch.library.custom_op("g3dr::composite_bwd", mutates_args=())
def composite_bwd(grad_rgb: Tensor, grad_depth: Tensor, grad_opacity: Tensor, grad_weights: Optional[Tensor],
                  sigma: Tensor, rgb: Tensor, depths: Tensor, target: Optional[Tensor], out_rgb: Tensor,
                  out_depth: Tensor, out_opacity: Tensor, s1: float, s2: float, c_min: float, c_max: float,
                  density_bias: float, eps: float, white_bg: bool, backend: str) -> Tuple[Tensor, Tensor]:
    out = kernels("composite", backend).composite_bwd(grad_rgb, grad_depth, grad_opacity, grad_weights, sigma, rgb,
                                                      depths, target, out_rgb, out_depth, out_opacity, s1, s2,
                                                      c_min, c_max, density_bias, eps, white_bg)
    return tuple(out)


@composite_bwd.register_fake
def _(grad_rgb, grad_depth, grad_opacity, grad_weights, sigma, rgb, *args):
    return torch.empty_like(sigma), torch.empty_like(rgb)


def _setup_context(ctx, inputs, output):
    sigma, rgb, depths, target, *params, need_weights, backend = inputs
    out_rgb, out_depth, out_opacity, _ = output
    ctx.save_for_backward(sigma, rgb, depths, target, out_rgb, out_depth, out_opacity)
    ctx.params, ctx.need_weights, ctx.backend = params, need_weights, backend


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g.contiguous()


def _backward(ctx, g_rgb, g_depth, g_opacity, g_weights):
    sigma, rgb, depths, target, out_rgb, out_depth, out_opacity = ctx.saved_tensors
    gw = g_weights.contiguous() if (ctx.need_weights and g_weights is not None) else None
    gs, gc = composite_bwd(_zeros_if_none(g_rgb, out_rgb), _zeros_if_none(g_depth, out_depth),
                           _zeros_if_none(g_opacity, out_opacity), gw, sigma, rgb, depths, target, out_rgb,
                           out_depth, out_opacity, *ctx.params, ctx.backend)
    return (gs, gc) + (None,) * 11


composite_fwd.register_autograd(_backward, setup_context=_setup_context)
