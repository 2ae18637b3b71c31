"""nn.Module layer: a triplane decoder and an EG3D-style importance renderer, thin wrappers over
g3dr_kernels.functional. Shapes: B batch, R rays, S samples per ray, C plane channels."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from . import reference
from ._types import Composite, DepthKernel
from .functional import render_triplanes


class TriplaneDecoder(nn.Module):
    """EG3D's OSGDecoder: FullyConnected(C -> hidden) -> softplus -> FullyConnected(hidden -> 1 + D).

    EG3D FullyConnectedLayer conventions: the stored weight is randn / lr_multiplier and is used
    as weight * lr_multiplier / sqrt(in_features); the bias is used as bias * lr_multiplier. The
    effective weights (nn.Linear layout) feed the fused renderer. Output: sigma (raw density) and
    rgb = sigmoid(o[1:]) * (1 + 2e-3) - 1e-3.
    """

    def __init__(self, in_features: int, hidden: int = 64, out_features: int = 3, lr_multiplier: float = 1.0):
        super().__init__()
        if min(in_features, hidden, out_features) < 1:
            raise ValueError(f"decoder sizes must be >= 1, got C={in_features}, hidden={hidden}, D={out_features}")
        self.in_features, self.hidden, self.out_features = in_features, hidden, out_features
        self.lr_multiplier = lr_multiplier
        self.weight1 = nn.Parameter(torch.randn(hidden, in_features) / lr_multiplier)
        self.bias1 = nn.Parameter(torch.zeros(hidden))
        self.weight2 = nn.Parameter(torch.randn(1 + out_features, hidden) / lr_multiplier)
        self.bias2 = nn.Parameter(torch.zeros(1 + out_features))

    def effective_params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [hidden,C], b1 [hidden], w2 [1+D,hidden], b2 [1+D]) as used in the forward pass."""
        g = self.lr_multiplier
        return (self.weight1 * (g / math.sqrt(self.in_features)), self.bias1 * g,
                self.weight2 * (g / math.sqrt(self.hidden)), self.bias2 * g)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """features [..., C] -> sigma [...], rgb [..., D] (unfused; the renderer uses the fused op)."""
        return reference.decode(features, *self.effective_params())

    def extra_repr(self) -> str:
        return f"C={self.in_features}, hidden={self.hidden}, D={self.out_features}, lr_multiplier={self.lr_multiplier}"


class TriplaneRenderer(nn.Module):
    """EG3D ImportanceRenderer equivalent on the fused kernels.

    Per ray: bounds (the box [-box_warp/2, box_warp/2]^3, or fixed ray_start/ray_end), n_coarse
    stratified depths, a forward-only coarse pass for weights, n_fine importance samples from the
    smoothed weights, optionally n_target samples within +-target_spread of a target depth (taken
    with probability target_prob per call, as G3DR does), merged and sorted, then one fused render
    with gradients (and the depth-kernel gradient scaling when a target depth is given).
    """

    def __init__(self, decoder: TriplaneDecoder, *, n_coarse: int = 48, n_fine: int = 48, n_target: int = 0,
                 target_prob: float = 0.5, target_spread: float = 0.05, ray_start: Optional[float] = None,
                 ray_end: Optional[float] = None, levels: int = 3, box_warp: float = 2.0, plane_axes: str = "eg3d",
                 density_bias: float = -1.0, eps: float = 1e-3, white_background: bool = False,
                 kernel: DepthKernel = DepthKernel(), perturb: bool = True, backend: str = "auto"):
        super().__init__()
        if n_coarse < 2:
            raise ValueError(f"n_coarse must be >= 2, got {n_coarse}")
        if n_fine < 0 or n_target < 0:
            raise ValueError(f"n_fine and n_target must be >= 0, got {n_fine}, {n_target}")
        if (ray_start is None) != (ray_end is None) or (ray_start is not None and not ray_end > ray_start):
            raise ValueError(f"give both ray_start < ray_end or neither, got {ray_start}, {ray_end}")
        self.decoder = decoder
        self.n_coarse, self.n_fine, self.n_target = n_coarse, n_fine, n_target
        self.target_prob, self.target_spread = target_prob, target_spread
        self.ray_start, self.ray_end = ray_start, ray_end
        self.levels, self.box_warp, self.plane_axes = levels, box_warp, plane_axes
        self.density_bias, self.eps, self.white_background = density_bias, eps, white_background
        self.kernel, self.perturb, self.backend = kernel, perturb, backend

    def _render(self, planes, rays_o, rays_d, depths, params, target_depth=None, return_weights=False):
        return render_triplanes(planes, rays_o, rays_d, depths, *params, target_depth=target_depth,
                                kernel=self.kernel, levels=self.levels, box_warp=self.box_warp,
                                plane_axes=self.plane_axes, density_bias=self.density_bias, eps=self.eps,
                                white_background=self.white_background, return_weights=return_weights,
                                backend=self.backend)

    def bounds(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """near, far [B,R] for rays_o, rays_d [B,R,3]."""
        if self.ray_start is not None:
            shape = rays_o.shape[:2]
            return (rays_o.new_full(shape, self.ray_start), rays_o.new_full(shape, self.ray_end))
        near, far, _ = reference.ray_box_bounds(rays_o, rays_d, self.box_warp)
        return near, far

    def sample_depths(self, planes, rays_o, rays_d, target_depth=None, generator=None) -> torch.Tensor:
        """The final sample depths [B,R,S] (no gradient), S = n_coarse + n_fine (+ n_target)."""
        with torch.no_grad():
            near, far = self.bounds(rays_o, rays_d)
            perturb = self.perturb and self.training
            depths = reference.stratified_depths(near, far, self.n_coarse, perturb=perturb, generator=generator)
            sets = [depths]
            if self.n_fine > 0:
                params = [p.detach() for p in self.decoder.effective_params()]
                planes_d = planes.detach() if isinstance(planes, torch.Tensor) else [p.detach() for p in planes]
                coarse = self._render(planes_d, rays_o, rays_d, depths, params, return_weights=True)
                sets.append(reference.importance_depths(depths, coarse.weights, self.n_fine,
                                                        deterministic=not perturb, generator=generator))
            if target_depth is not None and self.n_target > 0:
                u = torch.rand((), generator=generator, device=generator.device if generator else "cpu")
                if u.item() < self.target_prob:
                    sets.append(reference.depths_around_target(target_depth, self.n_target, self.target_spread,
                                                               near=near, far=far, perturb=perturb,
                                                               generator=generator))
            return reference.merge_depths(*sets) if len(sets) > 1 else depths

    def forward(self, planes, rays_o: torch.Tensor, rays_d: torch.Tensor, target_depth: Optional[torch.Tensor] = None,
                return_weights: bool = False, generator: Optional[torch.Generator] = None) -> Composite:
        """planes [B,3,C,H,W] (or a finest-first pyramid list), rays_o/rays_d [B,R,3], target_depth [B,R]
        (optional: adds target samples and turns on the depth-kernel gradient scaling) -> Composite
        (rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] when return_weights)."""
        depths = self.sample_depths(planes, rays_o, rays_d, target_depth, generator)
        return self._render(planes, rays_o, rays_d, depths, self.decoder.effective_params(),
                            target_depth=target_depth, return_weights=return_weights)
