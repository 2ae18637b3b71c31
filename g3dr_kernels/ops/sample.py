"""Custom op for fused multi-resolution triplane sampling.

Kernel contract (C++ `g3dr_C::sample_fwd/_bwd`, Triton `g3dr_kernels.triton.sample`):
  sample_fwd(levels: list of [B,3,C,H_l,W_l] contiguous, xyz [B,N,3] contiguous, scale: float
             (= 2 / box_warp), plane_axes: int (0 eg3d, 1 xyz)) -> [B,N,C]
             = sum over levels, mean over planes, bilinear (align_corners=False, zeros outside).
  sample_bwd(grad_out [B,N,C], levels, xyz, scale, plane_axes, need_xyz_grad: bool)
             -> list: one gradient per level (shape of the level), then grad_xyz [B,N,3]
                (an empty tensor when need_xyz_grad is False).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .._backend import kernels

# Backends whose sample_bwd computes the gradient with respect to xyz.
XYZ_GRAD_BACKENDS = {"torch", "cpu", "triton", "cuda"}


@torch.library.custom_op("g3dr::sample_fwd", mutates_args=())
def sample_fwd(levels: List[Tensor], xyz: Tensor, scale: float, plane_axes: int, backend: str) -> Tensor:
    return kernels("sample", backend).sample_fwd(levels, xyz, scale, plane_axes)


@sample_fwd.register_fake
def _(levels, xyz, scale, plane_axes, backend):
    return levels[0].new_empty(xyz.shape[0], xyz.shape[1], levels[0].shape[2])


@torch.library.custom_op("g3dr::sample_bwd", mutates_args=())
def sample_bwd(grad_out: Tensor, levels: List[Tensor], xyz: Tensor, scale: float, plane_axes: int,
               need_xyz_grad: bool, backend: str) -> List[Tensor]:
    return list(kernels("sample", backend).sample_bwd(grad_out, levels, xyz, scale, plane_axes, need_xyz_grad))


@sample_bwd.register_fake
def _(grad_out, levels, xyz, scale, plane_axes, need_xyz_grad, backend):
    return [torch.empty_like(lv) for lv in levels] + [torch.empty_like(xyz) if need_xyz_grad else xyz.new_empty(0)]


def _setup_context(ctx, inputs, output):
    levels, xyz, scale, plane_axes, backend = inputs
    ctx.save_for_backward(xyz, *levels)
    ctx.args = (scale, plane_axes, backend)


def _backward(ctx, grad):
    xyz, *levels = ctx.saved_tensors
    scale, plane_axes, backend = ctx.args
    need_xyz = bool(ctx.needs_input_grad[1])
    grads = sample_bwd(grad.contiguous(), levels, xyz, scale, plane_axes, need_xyz, backend)
    return list(grads[:-1]), (grads[-1] if need_xyz else None), None, None, None


sample_fwd.register_autograd(_backward, setup_context=_setup_context)
