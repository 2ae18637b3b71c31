"""Custom op for volume compositing with the depth-kernel gradient scaling.

Kernel contract (C++ `g3dr_C::composite_fwd/_bwd`, Triton `g3dr_kernels.triton.composite`), with
`*params` the fields of `CompositeParams` in order (g3dr_kernels/_params.py):
  composite_fwd(sigma [B,R,S], rgb [B,R,S,D], depths [B,R,S], target: [B,R] or None, *params,
                need_weights: bool)
      -> (rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] or an empty tensor)
  composite_bwd(grad_rgb [B,R,D], grad_depth [B,R], grad_opacity [B,R], grad_weights [B,R,S-1] or None,
                sigma, rgb, depths, target or None, out_rgb, out_depth, out_opacity, *params)
      -> (grad_sigma [B,R,S], grad_rgb [B,R,S,D]) (CompositeGrads); with a target, the gradients of the
         mid density and mid colour of interval i are multiplied by k(target, t_i) (DESIGN.md).
All inputs contiguous, same dtype; no gradient to depths or target.
The ops below pass every argument but `backend` through to the kernel unchanged.
"""
from __future__ import annotations

import torch

from .._backend import kernels
from .._params import CompositeGrads, CompositeParams

INPUTS_SCHEMA = "Tensor sigma, Tensor rgb, Tensor depths, Tensor? target"
N_INPUTS = INPUTS_SCHEMA.count("Tensor")  # sigma .. target
# The backward's leading arguments (shared with the render op): the outputs' gradients, and the
# outputs the forward returned.
GRADS_SCHEMA = "Tensor grad_rgb, Tensor grad_depth, Tensor grad_opacity, Tensor? grad_weights"
SAVED_SCHEMA = "Tensor out_rgb, Tensor out_depth, Tensor out_opacity"


@torch.library.custom_op("g3dr::composite_fwd", mutates_args=(), schema=(
    f"({INPUTS_SCHEMA}, {CompositeParams.schema()}, bool need_weights, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)"))
def composite_fwd(*args):
    *kernel_args, backend = args
    return tuple(kernels("composite", backend).composite_fwd(*kernel_args))


@composite_fwd.register_fake
def _(sigma, rgb, depths, target, *rest):
    need_weights = rest[-2]
    B, R, S = sigma.shape
    w = sigma.new_empty(B, R, S - 1) if need_weights else sigma.new_empty(0)
    return rgb.new_empty(B, R, rgb.shape[-1]), sigma.new_empty(B, R), sigma.new_empty(B, R), w


@torch.library.custom_op("g3dr::composite_bwd", mutates_args=(), schema=(
    f"({GRADS_SCHEMA}, {INPUTS_SCHEMA}, {SAVED_SCHEMA}, {CompositeParams.schema()}, str backend) "
    "-> (Tensor, Tensor)"))
def composite_bwd(*args):
    *kernel_args, backend = args
    return tuple(kernels("composite", backend).composite_bwd(*kernel_args))


@composite_bwd.register_fake
def _(grad_rgb, grad_depth, grad_opacity, grad_weights, sigma, rgb, *rest):
    return torch.empty_like(sigma), torch.empty_like(rgb)


def _setup_context(ctx, inputs, output):
    sigma, rgb, depths, target = inputs[:N_INPUTS]
    *ctx.params, ctx.need_weights, ctx.backend = inputs[N_INPUTS:]
    out_rgb, out_depth, out_opacity, _ = output
    ctx.save_for_backward(sigma, rgb, depths, target, out_rgb, out_depth, out_opacity)


def zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g.contiguous()


def _backward(ctx, g_rgb, g_depth, g_opacity, g_weights):
    sigma, rgb, depths, target, out_rgb, out_depth, out_opacity = ctx.saved_tensors
    gw = g_weights.contiguous() if (ctx.need_weights and g_weights is not None) else None
    g = CompositeGrads(*composite_bwd(zeros_if_none(g_rgb, out_rgb), zeros_if_none(g_depth, out_depth),
                                      zeros_if_none(g_opacity, out_opacity), gw, sigma, rgb, depths, target, out_rgb,
                                      out_depth, out_opacity, *ctx.params, ctx.backend))
    no_grad = (None,) * (CompositeParams.size() + 2)  # the options, need_weights, backend
    return (g.sigma, g.rgb, None, None) + no_grad


composite_fwd.register_autograd(_backward, setup_context=_setup_context)
