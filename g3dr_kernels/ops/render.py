"""Custom op for the fully fused renderer (points -> triplane sampling -> decoder -> composite).

Kernel contract (C++ `g3dr_C::render_fwd/_bwd`, Triton `g3dr_kernels.triton.render`), with
`*params` the fields of `RenderParams` in order (g3dr_kernels/_params.py):
  render_fwd(levels: list of [B,3,C,H_l,W_l], rays_o [B,R,3], rays_d [B,R,3], depths [B,R,S],
             w1 [hidden,C], b1 [hidden], w2 [1+D,hidden], b2 [1+D], target: [B,R] or None,
             *params, need_weights: bool)
      -> (rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] or an empty tensor)
  render_bwd(grad_rgb, grad_depth, grad_opacity, grad_weights or None, levels, rays_o, rays_d, depths,
             w1, b1, w2, b2, target or None, out_rgb, out_depth, out_opacity, *params)
      -> list: one gradient per level, then grad_w1, grad_b1, grad_w2, grad_b2 (RenderGrads.from_flat).
No gradient to rays, depths or target. All inputs contiguous, same dtype.
The ops below pass every argument but `backend` through to the kernel unchanged.
"""
from __future__ import annotations

import torch

from .._backend import kernels
from .._params import RenderGrads, RenderParams
from .composite import GRADS_SCHEMA, SAVED_SCHEMA, zeros_if_none

INPUTS_SCHEMA = ("Tensor[] levels, Tensor rays_o, Tensor rays_d, Tensor depths, Tensor w1, Tensor b1, Tensor w2, "
                 "Tensor b2, Tensor? target")
N_INPUTS = INPUTS_SCHEMA.count("Tensor")  # levels .. target


@torch.library.custom_op("g3dr::render_fwd", mutates_args=(), schema=(
    f"({INPUTS_SCHEMA}, {RenderParams.schema()}, bool need_weights, str backend) -> (Tensor, Tensor, Tensor, Tensor)"))
def render_fwd(*args):
    *kernel_args, backend = args
    return tuple(kernels("render", backend).render_fwd(*kernel_args))


@render_fwd.register_fake
def _(levels, rays_o, rays_d, depths, w1, b1, w2, b2, target, *rest):
    need_weights = rest[-2]
    B, R, S = depths.shape
    D = w2.shape[0] - 1
    w = depths.new_empty(B, R, S - 1) if need_weights else depths.new_empty(0)
    return depths.new_empty(B, R, D), depths.new_empty(B, R), depths.new_empty(B, R), w


@torch.library.custom_op("g3dr::render_bwd", mutates_args=(), schema=(
    f"({GRADS_SCHEMA}, {INPUTS_SCHEMA}, {SAVED_SCHEMA}, {RenderParams.schema()}, str backend) -> Tensor[]"))
def render_bwd(*args):
    *kernel_args, backend = args
    return list(kernels("render", backend).render_bwd(*kernel_args))


@render_bwd.register_fake
def _(grad_rgb, grad_depth, grad_opacity, grad_weights, levels, rays_o, rays_d, depths, w1, b1, w2, b2, *rest):
    return [torch.empty_like(lv) for lv in levels] + [torch.empty_like(t) for t in (w1, b1, w2, b2)]


def _setup_context(ctx, inputs, output):
    levels, rays_o, rays_d, depths, w1, b1, w2, b2, target = inputs[:N_INPUTS]
    *ctx.params, ctx.need_weights, ctx.backend = inputs[N_INPUTS:]
    out_rgb, out_depth, out_opacity, _ = output
    ctx.save_for_backward(rays_o, rays_d, depths, w1, b1, w2, b2, target, out_rgb, out_depth, out_opacity, *levels)


def _backward(ctx, g_rgb, g_depth, g_opacity, g_weights):
    rays_o, rays_d, depths, w1, b1, w2, b2, target, out_rgb, out_depth, out_opacity, *levels = ctx.saved_tensors
    gw = g_weights.contiguous() if (ctx.need_weights and g_weights is not None) else None
    grads = render_bwd(zeros_if_none(g_rgb, out_rgb), zeros_if_none(g_depth, out_depth),
                       zeros_if_none(g_opacity, out_opacity), gw, levels, rays_o, rays_d, depths, w1, b1, w2, b2,
                       target, out_rgb, out_depth, out_opacity, *ctx.params, ctx.backend)
    g = RenderGrads.from_flat(grads)
    no_grad = (None,) * (RenderParams.size() + 2)  # the options, need_weights, backend
    return (g.levels, None, None, None, g.w1, g.b1, g.w2, g.b2, None) + no_grad


render_fwd.register_autograd(_backward, setup_context=_setup_context)
