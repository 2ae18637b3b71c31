"""nn.Module layer: a triplane decoder and an EG3D-style importance renderer, thin wrappers over
g3dr_kernels.functional. Shapes: B batch, R rays, S samples per ray, C plane channels."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from . import reference, sampling
from ._types import Composite, DepthKernel
from ._validate import check_backend, check_box_warp, plane_axes_code
from .functional import composite, render_triplanes, sample_triplanes

SAMPLINGS = ("uniform", "eg3d")
TARGET_MODES = ("add", "replace")


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


def _check_int(name: str, v, minimum: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def _check_number(name: str, v, lo: float, hi: float = math.inf) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")


@dataclass
class RendererOptions:
    """Every option of `TriplaneRenderer`, with its default and its check, in one place (see the
    renderer's docstring for what each does). `validate(prefix)` raises naming the field, with the prefix
    an application puts before its own field names (e.g. "render.")."""

    n_coarse: int = 48
    n_fine: int = 48
    n_target: int = 0
    target_prob: float = 0.5
    target_spread: float = 0.05
    ray_start: Optional[float] = None
    ray_end: Optional[float] = None
    levels: int = 3
    box_warp: float = 2.0
    plane_axes: str = "eg3d"
    density_bias: float = -1.0
    eps: float = 1e-3
    white_background: bool = False
    perturb: bool = True
    backend: str = "auto"
    sampling: str = "uniform"
    target_mode: str = "add"
    disparity_space_sampling: bool = False
    density_noise: float = 0.0

    @classmethod
    def build(cls, options: Optional["RendererOptions"] = None, *, prefix: str = "", **overrides) -> "RendererOptions":
        """options (or the defaults) with single fields replaced, validated (errors name fields with
        `prefix`). Takes only this class's fields from `options`, so a subclass (an application config that
        embeds these options) works too."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown renderer option(s) {unknown}; options are {sorted(names)}")
        base = {} if options is None else {n: getattr(options, n) for n in names}
        opts = cls(**{**base, **overrides})
        opts.validate(prefix)
        return opts

    def validate(self, prefix: str = "") -> None:
        p = prefix
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown {p}sampling {self.sampling!r}; expected one of {SAMPLINGS}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"unknown {p}target_mode {self.target_mode!r}; expected one of {TARGET_MODES}")
        check_backend(self.backend)
        plane_axes_code(self.plane_axes)
        check_box_warp(self.box_warp)
        _check_int(p + "levels", self.levels, 1)
        _check_int(p + "n_fine", self.n_fine, 0)
        _check_int(p + "n_coarse", self.n_coarse, 4 if self.sampling == "eg3d" and self.n_fine > 0 else 2)
        _check_int(p + "n_target", self.n_target, 0)
        _check_number(p + "target_prob", self.target_prob, 0.0, 1.0)
        _check_number(p + "target_spread", self.target_spread, 0.0)
        _check_number(p + "density_noise", self.density_noise, 0.0)
        _check_number(p + "eps", self.eps, 0.0)
        _check_number(p + "density_bias", self.density_bias, -math.inf)
        if self.target_mode == "replace" and self.n_target:
            raise ValueError(f"{p}target_mode='replace' replaces the n_fine samples; {p}n_target must be 0, got "
                             f"{self.n_target}")
        if self.target_mode == "replace" and self.n_fine == 0:
            raise ValueError(f"{p}target_mode='replace' replaces the n_fine importance samples, so {p}n_fine must "
                             f"be >= 1")
        start, end = self.ray_start, self.ray_end
        if (start is None) != (end is None) or (start is not None and not end > start):
            raise ValueError(f"give both {p}ray_start < {p}ray_end or neither, got {start}, {end}")
        if self.disparity_space_sampling and start is not None and not start > 0:
            raise ValueError(f"{p}disparity_space_sampling needs {p}ray_start > 0, got {start}")


class TriplaneRenderer(nn.Module):
    """EG3D ImportanceRenderer equivalent on the fused kernels.

    Per ray: bounds (the box [-box_warp/2, box_warp/2]^3, or fixed ray_start/ray_end), n_coarse
    stratified depths, a forward-only coarse pass for weights, n_fine importance samples from the
    smoothed weights, optional samples around a target depth, merged and sorted, then one fused
    render with gradients (and the depth-kernel gradient scaling when a target depth is given).
    Depths are in world units along rays_d (unit-length directions give distances).

    sampling="uniform" (default, this library's choices): coarse t_i = near + (i + u_i)(far - near)/n
    inside [near, far], u_i = 0.5 in eval mode or with perturb=False; importance samples from the
    coarse intervals; rays that miss the box are empty (near = far = 0).
    sampling="eg3d" (EG3D's ImportanceRenderer and G3DR, exactly): coarse
    t_i = near + (i + u_i)(far - near)/(n - 1), always jittered (train and eval; perturb=False pins
    u_i = 0.5); importance bins between coarse midpoints; rays that miss the box span the smallest
    to the largest entry depth of the batch's hit rays (see `sampling.eg3d_ray_bounds`). With no
    generator, random numbers come from torch's global RNG (and Python's `random` for the G3DR target
    draw) in the shapes, dtypes and order of the official code, so the same seeds give the same samples.

    Target samples (only when forward gets target_depth [B,R]):
    target_mode="add": with probability target_prob (u < p, drawn from torch), n_target samples
    spread over target +- target_spread (bin centres, jittered when perturbing), clamped to the
    bounds, are added (S = n_coarse + n_fine + n_target).
    target_mode="replace" (G3DR): with probability target_prob (G3DR's `random() > 1 - p`), the
    n_fine importance samples are replaced by target + linspace(-target_spread, target_spread, n_fine)
    (endpoints included, not clamped); S stays n_coarse + n_fine. G3DR: target_prob=0.4, spread 0.05.
    In both modes the depth-kernel gradient scaling is on whenever target_depth is given.

    disparity_space_sampling: coarse samples linear in inverse depth (needs near > 0).
    density_noise: std of Gaussian noise added to the raw densities of every sample, coarse and
    final (EG3D's option; then the decoder runs unfused between the sample and composite kernels).
    """

    def __init__(self, decoder: TriplaneDecoder, options: Optional[RendererOptions] = None, *,
                 kernel: DepthKernel = DepthKernel(), **overrides):
        """options: a RendererOptions (default: its defaults); keyword overrides replace single fields,
        e.g. `TriplaneRenderer(decoder, n_coarse=64, sampling="eg3d")`."""
        super().__init__()
        if not callable(getattr(decoder, "effective_params", None)):
            raise TypeError(f"decoder must provide effective_params() (a TriplaneDecoder or compat.OSGDecoder), "
                            f"got {type(decoder).__name__}")
        if not isinstance(kernel, DepthKernel):
            raise TypeError(f"kernel must be a DepthKernel, got {type(kernel).__name__}")
        opts = RendererOptions.build(options, **overrides)
        self.decoder, self.kernel = decoder, kernel
        for f in dataclasses.fields(RendererOptions):  # the options are plain attributes (one copy, no sync)
            setattr(self, f.name, getattr(opts, f.name))

    @property
    def options(self) -> RendererOptions:
        """The current options (a new RendererOptions read from the attributes)."""
        return RendererOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RendererOptions)})

    def with_options(self, **overrides) -> "TriplaneRenderer":
        """A renderer on the same decoder and kernel with some options changed (it holds no parameters of
        its own, so this is cheap), e.g. deterministic stills: `with_options(sampling="uniform").eval()`."""
        r = TriplaneRenderer(self.decoder, RendererOptions.build(self.options, **overrides), kernel=self.kernel)
        return r.train(self.training)

    def extra_repr(self) -> str:
        return (f"sampling={self.sampling!r}, n_coarse={self.n_coarse}, n_fine={self.n_fine}, "
                f"n_target={self.n_target}, target_mode={self.target_mode!r}, target_prob={self.target_prob}, "
                f"backend={self.backend!r}")

    # ------------------------------------------------------------------------------------ rendering
    def _render(self, planes, rays_o, rays_d, depths, params, target_depth=None, return_weights=False, noise=None):
        """Fused render of depths [B,R,S]; with noise [B,R,S] (density noise) the decoder runs in
        PyTorch between the sample and composite kernels, so the noise can be added to sigma."""
        opts = dict(kernel=self.kernel, density_bias=self.density_bias, eps=self.eps,
                    white_background=self.white_background, return_weights=return_weights, backend=self.backend)
        if noise is None:
            return render_triplanes(planes, rays_o, rays_d, depths, *params, target_depth=target_depth,
                                    levels=self.levels, box_warp=self.box_warp, plane_axes=self.plane_axes, **opts)
        B, R, S = depths.shape
        xyz = (rays_o.unsqueeze(2) + depths.unsqueeze(-1) * rays_d.unsqueeze(2)).reshape(B, R * S, 3)
        feats = sample_triplanes(planes, xyz, levels=self.levels, box_warp=self.box_warp,
                                 plane_axes=self.plane_axes, backend=self.backend)
        sigma, rgb = reference.decode(feats, *params)
        sigma = sigma.reshape(B, R, S) + noise.to(sigma.dtype)
        return composite(sigma, rgb.reshape(B, R, S, -1), depths, target_depth=target_depth, **opts)

    def _noise(self, B: int, R: int, S: int, like: torch.Tensor, generator) -> Optional[torch.Tensor]:
        """Density noise [B,R,S], drawn as EG3D's randn_like(sigma [B, R*S, 1])."""
        if self.density_noise <= 0:
            return None
        n = torch.randn(B, R * S, 1, device=like.device, dtype=like.dtype, generator=generator)
        return n.reshape(B, R, S) * self.density_noise

    # ------------------------------------------------------------------------------------ sampling
    def bounds(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """near, far [B,R] for rays_o, rays_d [B,R,3] (the sampling mode's rule for missed rays)."""
        if self.ray_start is not None:
            shape = rays_o.shape[:2]
            return (rays_o.new_full(shape, self.ray_start), rays_o.new_full(shape, self.ray_end))
        fn = sampling.eg3d_ray_bounds if self.sampling == "eg3d" else sampling.ray_box_bounds
        near, far, _ = fn(rays_o, rays_d, self.box_warp)
        return near, far

    def _coarse(self, near, far, generator):
        n = self.n_coarse
        if self.sampling == "eg3d":
            u = None if self.perturb else torch.full(near.shape + (n,), 0.5, dtype=near.dtype, device=near.device)
            # EG3D draws in the dtype of its depths: the rays' with box bounds, the default with fixed numbers
            u_dtype = near.dtype if self.ray_start is None else torch.get_default_dtype()
            # and, with box bounds (not disparity), in the [S,B,R] memory order of its permuted linspace
            first = self.ray_start is None and not self.disparity_space_sampling
            return sampling.eg3d_stratified_depths(near, far, n, u=u, generator=generator, u_dtype=u_dtype,
                                                    disparity=self.disparity_space_sampling, samples_first=first)
        return sampling.stratified_depths(near, far, n, perturb=self.perturb and self.training, generator=generator,
                                           disparity=self.disparity_space_sampling)

    def _sample(self, planes, rays_o, rays_d, target_depth, generator):
        """-> depths [B,R,S] ascending, density noise [B,R,S] or None. Random numbers are drawn in
        EG3D's order: coarse u, coarse noise, target draw, importance u, fine noise, target u."""
        with torch.no_grad():
            B, R = rays_o.shape[:2]
            near, far = self.bounds(rays_o, rays_d)
            coarse = self._coarse(near, far, generator)
            params = [p.detach() for p in self.decoder.effective_params()]
            noise = [self._noise(B, R, self.n_coarse, params[0], generator)]
            sets = [coarse]
            if self.n_fine > 0:
                fine = None
                if target_depth is not None and self.target_mode == "replace":
                    if sampling.target_branch(self.target_prob, generator=generator, rule="g3dr"):
                        fine = sampling.target_linspace_depths(target_depth, self.n_fine, self.target_spread)
                if fine is None:
                    planes_d = planes.detach() if isinstance(planes, torch.Tensor) else [p.detach() for p in planes]
                    w = self._render(planes_d, rays_o, rays_d, coarse, params, return_weights=True,
                                     noise=noise[0]).weights
                    if self.sampling == "eg3d":
                        fine = sampling.eg3d_importance_depths(coarse, w, self.n_fine, generator=generator)
                    else:
                        fine = sampling.importance_depths(coarse, w, self.n_fine, generator=generator,
                                                           deterministic=not (self.perturb and self.training))
                sets.append(fine)
                noise.append(self._noise(B, R, self.n_fine, params[0], generator))
            if target_depth is not None and self.target_mode == "add" and self.n_target > 0:
                if sampling.target_branch(self.target_prob, generator=generator, rule="below"):
                    perturb = self.perturb and self.training
                    sets.append(sampling.depths_around_target(target_depth, self.n_target, self.target_spread,
                                                               near=near, far=far, perturb=perturb,
                                                               generator=generator))
                    noise.append(self._noise(B, R, self.n_target, params[0], generator))
            if len(sets) == 1:
                return coarse, noise[0]
            depths, order = sampling.merge_depths(*sets, return_indices=True)
            if noise[0] is not None:
                return depths, torch.cat(noise, -1).gather(-1, order)
            return depths, None

    def sample_depths(self, planes, rays_o, rays_d, target_depth=None, generator=None) -> torch.Tensor:
        """The final sample depths [B,R,S] (no gradient): S = n_coarse + n_fine, plus n_target when
        target samples are added ("add" mode, when drawn)."""
        self._check_inputs(rays_o, rays_d, target_depth)
        return self._sample(planes, rays_o, rays_d, target_depth, generator)[0]

    def _check_inputs(self, rays_o, rays_d, target_depth) -> None:
        for name, t in (("rays_o", rays_o), ("rays_d", rays_d)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != 3:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor [B,R,3], got {got}")
        if rays_o.shape != rays_d.shape:
            raise ValueError(f"rays_o {list(rays_o.shape)} and rays_d {list(rays_d.shape)} must have the same shape")
        if target_depth is None:
            return
        if not isinstance(target_depth, torch.Tensor):
            raise TypeError(f"target_depth must be a tensor [B,R], got {type(target_depth).__name__}")
        if target_depth.shape != rays_o.shape[:2]:
            raise ValueError(f"target_depth must be [B,R] = {list(rays_o.shape[:2])} (one depth per ray of rays_o "
                             f"{list(rays_o.shape)}), got {list(target_depth.shape)}")
        if target_depth.device != rays_o.device:
            raise ValueError(f"target_depth is on {target_depth.device} but rays_o is on {rays_o.device}")
        if target_depth.dtype != rays_o.dtype:
            raise TypeError(f"target_depth has dtype {target_depth.dtype} but rays_o has {rays_o.dtype}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(target_depth).all()):
            raise ValueError(f"target_depth {list(target_depth.shape)} contains NaN or inf (the target depths "
                             f"themselves, before any sampling)")

    def forward(self, planes, rays_o: torch.Tensor, rays_d: torch.Tensor, target_depth: Optional[torch.Tensor] = None,
                return_weights: bool = False, generator: Optional[torch.Generator] = None) -> Composite:
        """planes [B,3,C,H,W] (or a finest-first pyramid list), rays_o/rays_d [B,R,3], target_depth [B,R]
        (optional: target samples as set by target_mode, and the depth-kernel gradient scaling) ->
        Composite (rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] when return_weights)."""
        depths, noise = self.render_depths(planes, rays_o, rays_d, target_depth, generator)
        return self.render_at(planes, rays_o, rays_d, depths, target_depth, return_weights, noise)

    def render_depths(self, planes, rays_o, rays_d, target_depth=None, generator=None):
        """Validated sampling step of forward: -> (depths [B,R,S], density noise [B,R,S] or None)."""
        self._check_inputs(rays_o, rays_d, target_depth)
        return self._sample(planes, rays_o, rays_d, target_depth, generator)

    def render_at(self, planes, rays_o, rays_d, depths, target_depth=None, return_weights=False, noise=None
                  ) -> Composite:
        """Rendering step of forward at given depths [B,R,S] (with the density noise [B,R,S], if any)."""
        return self._render(planes, rays_o, rays_d, depths, self.decoder.effective_params(),
                            target_depth=target_depth, return_weights=return_weights, noise=noise)
