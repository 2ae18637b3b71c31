"""Public functions: validate at the boundary, pick a backend, make inputs contiguous, call the op.

Every function takes `backend="auto" | "torch" | "cpu" | "triton" | "cuda"` (see `_backend.resolve`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import reference
from ._backend import resolve
from ._params import CompositeParams, RenderParams, SampleParams
from ._types import Composite, DepthKernel
from ._validate import (check_backend, check_box_warp, check_composite, check_decoder, check_depths, check_planes, check_rays,
                        check_xyz, plane_axes_code)

Planes = Union[torch.Tensor, Sequence[torch.Tensor]]


def _pyramid(planes: Planes, levels: int, pyr):
    """The finest-first pyramid for `planes`, given check_planes' result `pyr` for them."""
    if isinstance(planes, torch.Tensor) and levels > 1:
        pyr = reference.build_pyramid(planes, levels)  # stays in PyTorch so its gradient reaches the finest level
    return pyr


def _no_grad_inputs(backend: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"backend {backend!r} gives no gradient with respect to {name}; detach it, or use "
                             f"backend='torch' if you need that gradient")


def sample_triplanes(planes: Planes, xyz: torch.Tensor, *, levels: int = 3, box_warp: float = 2.0,
                     plane_axes: str = "eg3d", backend: str = "auto") -> torch.Tensor:
    """Multi-resolution triplane features at points.

    planes: [B,3,C,H,W] finest level (levels-1 coarser ones are made by antialiased bilinear
        downsampling by 0.5**l), or a finest-first list of `levels` such tensors.
    xyz: [B,N,3] world points; u = xyz * 2/box_warp lands in [-1,1] inside the box.
    plane_axes: "eg3d" planes read (x,y), (x,z), (z,x) of u; "xyz" read (x,y), (x,z), (y,z).
    Returns [B,N,C]: the mean over the 3 planes of the sum over levels of bilinear samples
    (align_corners=False, zeros outside). Differentiable w.r.t. planes (every level) and xyz on every
    backend. A point with a NaN/inf coordinate gets NaN features (and a NaN xyz gradient) on every
    backend, as grid_sample gives, and adds nothing to the plane gradients. box_warp must be finite
    with 2/box_warp a normal float32 (about [5.9e-39, 1.7e38]).
    """
    check_backend(backend)
    code = plane_axes_code(plane_axes)
    check_box_warp(box_warp)
    pyr = check_planes(planes, levels)
    check_xyz(xyz, pyr[0])
    b = resolve(backend, "sample", xyz.device)
    pyr = _pyramid(planes, levels, pyr)
    if b == "torch":
        return reference.sample_pyramid(pyr, xyz, box_warp, code)
    from .ops.sample import XYZ_GRAD_BACKENDS, sample_fwd
    if b not in XYZ_GRAD_BACKENDS:
        _no_grad_inputs(b, xyz=xyz)
    return sample_fwd([p.contiguous() for p in pyr], xyz.contiguous(), *SampleParams(2.0 / box_warp, code).flat(), b)


def composite(sigma: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, *,
              target_depth: Optional[torch.Tensor] = None, kernel: DepthKernel = DepthKernel(),
              density_bias: float = -1.0, eps: float = 1e-3, white_background: bool = False,
              return_weights: bool = True, backend: str = "auto") -> Composite:
    """Volume compositing (EG3D MipRayMarcher semantics) with G3DR's depth-kernel gradient scaling.

    sigma [B,R,S] raw densities, rgb [B,R,S,D], depths [B,R,S] ascending (same units as
    target_depth). On the S-1 intervals: mid values, delta_i = depths[i+1]-depths[i],
    alpha_i = 1 - exp(-softplus(sigma_mid_i + density_bias) delta_i), T_i = prod_{j<i}(1-alpha_j+1e-10),
    w_i = alpha_i T_i. Returns Composite(rgb [B,R,D] = sum w c (+ 1 - opacity with white_background),
    depth [B,R] = sum w t / (opacity + eps), opacity [B,R] = sum w, weights [B,R,S-1] or None when
    return_weights=False). With target_depth [B,R], gradients of the mid densities/colours of each
    interval are multiplied by kernel(target, t_i); forward values are unchanged. Gradients flow to
    sigma and rgb (the "torch" backend also to depths).
    """
    check_backend(backend)
    check_composite(sigma, rgb, depths, target_depth, kernel)
    b = resolve(backend, "composite", sigma.device)
    if b == "torch":
        out = reference.composite(sigma, rgb, depths, target_depth=target_depth, kernel=kernel,
                                  density_bias=density_bias, eps=eps, white_background=white_background)
        return out if return_weights else out._replace(weights=None)
    _no_grad_inputs(b, depths=depths)
    from .ops.composite import composite_fwd
    t = None if target_depth is None else target_depth.detach().contiguous()
    params = CompositeParams(kernel, density_bias, eps, white_background)
    c, d, o, w = composite_fwd(sigma.contiguous(), rgb.contiguous(), depths.contiguous(), t, *params.flat(),
                               bool(return_weights), b)
    return Composite(c, d, o, w if return_weights else None)


def render_triplanes(planes: Planes, rays_o: torch.Tensor, rays_d: torch.Tensor, depths: torch.Tensor,
                     w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
                     target_depth: Optional[torch.Tensor] = None, kernel: DepthKernel = DepthKernel(),
                     levels: int = 3, box_warp: float = 2.0, plane_axes: str = "eg3d", density_bias: float = -1.0,
                     eps: float = 1e-3, white_background: bool = False, return_weights: bool = True,
                     backend: str = "auto") -> Composite:
    """Fused renderer: points o + t d for every depth -> sample_triplanes -> decoder -> composite.

    planes as in `sample_triplanes`; rays_o, rays_d [B,R,3]; depths [B,R,S] ascending;
    decoder (nn.Linear layout) w1 [hidden,C], b1 [hidden], w2 [1+D,hidden], b2 [1+D]:
    h = softplus(f @ w1.T + b1), o = h @ w2.T + b2, sigma = o[...,0],
    rgb = sigmoid(o[...,1:]) * (1 + 2e-3) - 1e-3. Then `composite` with the given options.
    Gradients flow to planes (every level, through the pyramid), w1, b1, w2, b2.
    One dtype for planes, rays, depths and decoder. Depths (and target_depth) must be finite; a ray
    whose origin or direction holds NaN/inf renders NaN (rgb, depth, opacity, weights) on every
    backend, as the reference does, and its NaN reaches the gradients.
    """
    check_backend(backend)
    code = plane_axes_code(plane_axes)
    check_box_warp(box_warp)
    pyr = check_planes(planes, levels)
    check_rays(rays_o, rays_d, depths, pyr[0])
    check_decoder(w1, b1, w2, b2, pyr[0].shape[2], pyr[0])
    check_depths(depths, target_depth, kernel)
    b = resolve(backend, "render", depths.device)
    pyr = _pyramid(planes, levels, pyr)
    if b == "torch":
        out = reference.render_triplanes(pyr, rays_o, rays_d, depths, w1, b1, w2, b2, target_depth=target_depth,
                                         kernel=kernel, levels=levels, box_warp=box_warp, plane_axes=plane_axes,
                                         density_bias=density_bias, eps=eps, white_background=white_background)
        return out if return_weights else out._replace(weights=None)
    _no_grad_inputs(b, rays_o=rays_o, rays_d=rays_d, depths=depths)
    from .ops.render import render_fwd
    t = None if target_depth is None else target_depth.detach().contiguous()
    params = RenderParams(SampleParams(2.0 / box_warp, code),
                          CompositeParams(kernel, density_bias, eps, white_background))
    c, d, o, w = render_fwd([p.contiguous() for p in pyr], rays_o.contiguous(), rays_d.contiguous(),
                            depths.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), t,
                            *params.flat(), bool(return_weights), b)
    return Composite(c, d, o, w if return_weights else None)
