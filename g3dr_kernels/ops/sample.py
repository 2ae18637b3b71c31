"""Custom op for fused multi-resolution triplane sampling.

Kernel contract (C++ `g3dr_C::sample_fwd/_bwd`, Triton `g3dr_kernels.triton.sample`), with
`*params` the fields of `SampleParams` in order (g3dr_kernels/_params.py: scale = 2 / box_warp,
plane_axes 0 eg3d / 1 xyz):
  sample_fwd(levels: list of [B,3,C,H_l,W_l] contiguous, xyz [B,N,3] contiguous, *params) -> [B,N,C]
             = sum over levels, mean over planes, bilinear (align_corners=False, zeros outside).
  sample_bwd(grad_out [B,N,C], levels, xyz, *params, need_xyz_grad: bool)
             -> list: one gradient per level (shape of the level), then grad_xyz [B,N,3]
                (an empty tensor when need_xyz_grad is False) (SampleGrads.from_flat).
The ops below pass every argument but `backend` through to the kernel unchanged.
"""
from __future__ import annotations

import torch

from .._backend import kernels
from .._params import SampleGrads, SampleParams

# Backends whose sample_bwd computes the gradient with respect to xyz.
XYZ_GRAD_BACKENDS = {"torch", "cpu", "triton", "cuda"}

INPUTS_SCHEMA = "Tensor[] levels, Tensor xyz"
N_INPUTS = INPUTS_SCHEMA.count("Tensor")  # levels, xyz


@torch.library.custom_op("g3dr::sample_fwd", mutates_args=(), schema=(
    f"({INPUTS_SCHEMA}, {SampleParams.schema()}, str backend) -> Tensor"))
def sample_fwd(*args):
    *kernel_args, backend = args
    return kernels("sample", backend).sample_fwd(*kernel_args)


@sample_fwd.register_fake
def _(levels, xyz, *rest):
    return levels[0].new_empty(xyz.shape[0], xyz.shape[1], levels[0].shape[2])


@torch.library.custom_op("g3dr::sample_bwd", mutates_args=(), schema=(
    f"(Tensor grad_out, {INPUTS_SCHEMA}, {SampleParams.schema()}, bool need_xyz_grad, str backend) -> Tensor[]"))
def sample_bwd(*args):
    *kernel_args, backend = args
    return list(kernels("sample", backend).sample_bwd(*kernel_args))


@sample_bwd.register_fake
def _(grad_out, levels, xyz, *rest):
    need_xyz_grad = rest[-2]
    return [torch.empty_like(lv) for lv in levels] + [torch.empty_like(xyz) if need_xyz_grad else xyz.new_empty(0)]


def _setup_context(ctx, inputs, output):
    levels, xyz = inputs[:N_INPUTS]
    *ctx.params, ctx.backend = inputs[N_INPUTS:]
    ctx.save_for_backward(xyz, *levels)


def _backward(ctx, grad):
    xyz, *levels = ctx.saved_tensors
    need_xyz = bool(ctx.needs_input_grad[1])
    g = SampleGrads.from_flat(sample_bwd(grad.contiguous(), levels, xyz, *ctx.params, need_xyz, ctx.backend))
    return (g.levels, g.xyz if need_xyz else None) + (None,) * (SampleParams.size() + 1)  # options, backend


sample_fwd.register_autograd(_backward, setup_context=_setup_context)
