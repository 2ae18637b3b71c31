"""Sample placement along rays: ray/box bounds, stratified and importance samples, target samples.

Used by `g3dr_kernels.nn.TriplaneRenderer` (and by anyone who builds their own renderer on the fused ops).
No gradients flow through sample positions. Two families: "uniform" (this library's defaults: samples
inside [near, far], deterministic in eval mode) and "eg3d" (EG3D's ImportanceRenderer and G3DR's
train.py, written from their formulas). Every sampler takes its random numbers as an optional argument
(`u`), so tests can pin them; when `u` is None it is drawn with the shape and dtype the official code
draws it with.

Shapes: B batch, R rays, S samples per ray.
"""
from __future__ import annotations

import random as _pyrandom
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def ray_box_bounds(rays_o: torch.Tensor, rays_d: torch.Tensor, box_warp: float = 2.0
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against the cube [-box_warp/2, box_warp/2]^3.
    rays_o, rays_d [B,R,3] -> near [B,R], far [B,R], hit [B,R] (bool). Missed rays get near = far = 0
    (all their samples coincide, so delta = 0 and they composite to nothing)."""
    half = box_warp / 2
    d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0 = (-half - rays_o) / d
    t1 = (half - rays_o) / d
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0)
    far = torch.maximum(t0, t1).amin(-1)
    hit = far > near
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


def eg3d_ray_bounds(rays_o: torch.Tensor, rays_d: torch.Tensor, box_warp: float = 2.0
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EG3D's ray limits (math_utils.get_ray_limits_box) with its rule for rays that miss the box.
    rays_o, rays_d [B,R,3] -> near [B,R], far [B,R], hit [B,R] (bool).

    Slab test with t = (bound - o) * (1/d) per axis (no clamp at 0: a camera inside the box gets a
    negative near); hit = far > near. Missed rays are rendered, not emptied: their near is the
    smallest near of any hit ray in the whole batch and their far the *largest near* of any hit ray
    (EG3D's `ray_end[~valid] = ray_start[valid].max()`). If no ray of the batch hits, EG3D would
    march backwards from -1 to -2; here every ray then gets near = far = 0 (empty) instead.
    """
    half = box_warp / 2
    inv = 1 / rays_d
    t0 = (-half - rays_o) * inv
    t1 = (half - rays_o) * inv
    near = torch.minimum(t0, t1).amax(-1)
    far = torch.maximum(t0, t1).amin(-1)
    hit = far > near
    if not bool(hit.any()):
        zero = torch.zeros_like(near)
        return zero, zero.clone(), hit
    if not bool(hit.all()):
        lo, hi = near[hit].min(), near[hit].max()
        near, far = torch.where(hit, near, lo), torch.where(hit, far, hi)
    return near, far, hit


def _draw(u: Optional[torch.Tensor], shape, like: torch.Tensor, generator: Optional[torch.Generator],
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """u as given (checked against `shape`), or uniform [0,1) numbers of `shape` drawn in `dtype`
    (default: like's dtype) on like's device, then cast to like's dtype."""
    if u is None:
        u = torch.rand(*shape, device=like.device, dtype=dtype or like.dtype, generator=generator)
    elif tuple(u.shape) != tuple(shape):
        raise ValueError(f"pinned random numbers u must have shape {list(shape)}, got {list(u.shape)}")
    return u.to(like.device, like.dtype)


def _disparity_lerp(near: torch.Tensor, far: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Linear in inverse depth: 1 / (1/near (1-s) + 1/far s); near, far [B,R,1] > 0, s [...,S]."""
    return 1.0 / (1.0 / near * (1.0 - s) + 1.0 / far * s)


def stratified_depths(near: torch.Tensor, far: torch.Tensor, n_samples: int, *, perturb: bool = False,
                      generator: Optional[torch.Generator] = None, u: Optional[torch.Tensor] = None,
                      disparity: bool = False) -> torch.Tensor:
    """near, far [B,R] -> [B,R,S] ascending, inside [near, far]: t_i = near + (i + u_i) (far - near) / S,
    u_i = 0.5, or uniform in [0,1) per sample with perturb (or the pinned u [B,R,S]).
    disparity: the same fractions s_i = (i + u_i) / S placed linearly in inverse depth
    (t = 1 / (1/near (1 - s) + 1/far s)); needs near > 0 (rays with near = far = 0 stay at 0)."""
    B, R = near.shape
    i = torch.arange(n_samples, device=near.device, dtype=near.dtype)
    if u is not None or perturb:
        u = _draw(u, (B, R, n_samples), near, generator)
    else:
        u = torch.full((B, R, n_samples), 0.5, device=near.device, dtype=near.dtype)
    if disparity:
        n, f = near.unsqueeze(-1), far.unsqueeze(-1)
        t = _disparity_lerp(n, f, (i + u) / n_samples)
        return torch.where(n > 0, t, n.expand_as(t))
    return near.unsqueeze(-1) + (i + u) * ((far - near) / n_samples).unsqueeze(-1)


def eg3d_stratified_depths(near: torch.Tensor, far: torch.Tensor, n_samples: int, *,
                           u: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                           disparity: bool = False, u_dtype: Optional[torch.dtype] = None,
                           samples_first: bool = False) -> torch.Tensor:
    """EG3D's sample_stratified. near, far [B,R] -> [B,R,S], S = n_samples >= 2:
    t_i = near + i/(S-1) (far - near) + u_i (far - near)/(S-1), i = 0..S-1, u [B,R,S] uniform in
    [0,1) (always jittered, so the last sample lies past `far`). disparity: s_i = i/(S-1) + u_i/(S-1),
    t_i = 1 / (1/near (1 - s_i) + 1/far s_i) (rays with near <= 0 stay at near). u is drawn (when not given) in
    `u_dtype` (default near's dtype), as EG3D's `rand_like(depths)` does; samples_first draws them in
    [S,B,R] memory order, as rand_like does on EG3D's permuted linspace for per-ray (box) bounds."""
    B, R = near.shape
    if u is None and samples_first:
        u = torch.rand(n_samples, B, R, device=near.device, dtype=u_dtype or near.dtype,
                       generator=generator).permute(1, 2, 0)
    u = _draw(u, (B, R, n_samples), near, generator, u_dtype)
    steps = (torch.arange(n_samples, dtype=torch.float32, device=near.device) / (n_samples - 1)).to(near.dtype)
    n, f = near.unsqueeze(-1), far.unsqueeze(-1)
    if disparity:  # rays without a positive near (empty or inside the box) keep near for every sample
        t = _disparity_lerp(n, f, steps + u * (1.0 / (n_samples - 1)))
        return torch.where(n > 0, t, n.expand_as(t))
    return (n + steps * (f - n)) + u * ((f - n) / (n_samples - 1))


def smooth_weights(weights: torch.Tensor) -> torch.Tensor:
    """EG3D's smoothing of coarse weights [..., I]: max-pool (2, stride 1, pad 1) then average-pool
    (2, stride 1) -> same length, plus 0.01 so no interval has zero probability:
    a_k = (max(w_{k-1}, w_k) + max(w_k, w_{k+1})) / 2 + 0.01 (missing neighbours ignored)."""
    shape = weights.shape
    w = weights.reshape(-1, 1, shape[-1]).float()
    w = F.max_pool1d(w, 2, 1, padding=1)
    w = F.avg_pool1d(w, 2, 1)
    return (w.reshape(shape) + 0.01).to(weights.dtype)


def importance_depths(coarse_depths: torch.Tensor, coarse_weights: torch.Tensor, n_samples: int, *,
                      deterministic: bool = False, generator: Optional[torch.Generator] = None,
                      eps: float = 1e-5, u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse-CDF samples from the piecewise-constant pdf over the coarse intervals.
    coarse_depths [B,R,S] ascending, coarse_weights [B,R,S-1] (the composite weights) -> [B,R,n] ascending.
    Interval i ([t_i, t_{i+1}]) gets probability proportional to smooth_weights(w)_i + eps.
    u [B,R,n] in [0,1): pinned, or linspace(0, 1, n) when deterministic, else uniform random."""
    B, R, S = coarse_depths.shape
    w = smooth_weights(coarse_weights.detach()) + eps
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1)  # [B,R,S]
    cdf = cdf.clamp(max=1.0).contiguous()
    if u is not None or not deterministic:
        u = _draw(u, (B, R, n_samples), cdf, generator)
    else:
        u = torch.linspace(0, 1, n_samples, device=cdf.device, dtype=cdf.dtype).expand(B, R, n_samples)
    u = u.contiguous()
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, S - 1)
    lo, hi = idx - 1, idx
    c0, c1 = cdf.gather(-1, lo), cdf.gather(-1, hi)
    t0, t1 = coarse_depths.gather(-1, lo), coarse_depths.gather(-1, hi)
    denom = torch.where(c1 - c0 < eps, torch.ones_like(c0), c1 - c0)
    frac = ((u - c0) / denom).clamp(0, 1)
    return (t0 + frac * (t1 - t0)).detach()


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """NeRF/EG3D inverse-CDF sampling. bins [..., K+1] ascending edges, weights [..., K] >= 0,
    u [..., n] in [0,1) -> [..., n]: pdf = (w + eps) / sum(w + eps), cdf = [0, cumsum(pdf)];
    j = searchsorted(cdf, u, right) ; below = max(j-1, 0), above = min(j, K);
    t = bins[below] + (u - cdf[below]) / d * (bins[above] - bins[below]), d = cdf[above] - cdf[below]
    (d < eps -> 1). Computed in the weights' dtype for the cdf, as EG3D does."""
    K = weights.shape[-1]
    w = weights + eps
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1).contiguous()
    u = u.contiguous()
    j = torch.searchsorted(cdf, u, right=True)
    below, above = (j - 1).clamp(min=0), j.clamp(max=K)
    c0, c1 = cdf.gather(-1, below), cdf.gather(-1, above)
    b0, b1 = bins.gather(-1, below), bins.gather(-1, above)
    denom = torch.where(c1 - c0 < eps, torch.ones_like(c0), c1 - c0)
    return b0 + (u - c0) / denom * (b1 - b0)


def eg3d_importance_depths(coarse_depths: torch.Tensor, coarse_weights: torch.Tensor, n_samples: int, *,
                           u: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                           eps: float = 1e-5) -> torch.Tensor:
    """EG3D's sample_importance. coarse_depths [B,R,S] (S >= 4), coarse_weights [B,R,S-1] -> [B,R,n]
    (not sorted). Bin edges are the midpoints m_j = (t_j + t_{j+1}) / 2 between coarse samples; bin
    [m_j, m_{j+1}], j = 0..S-4, carries smooth_weights(w)_{j+1} (the smoothed weight of coarse
    interval j+1; computed in float32), so samples lie in [m_0, m_{S-3}]; u [B,R,n] in [0,1), drawn
    (when not given) as EG3D's torch.rand(B*R, n) in the default dtype. See `sample_pdf`."""
    B, R, S = coarse_depths.shape
    if S < 4:
        raise ValueError(f"EG3D importance sampling needs >= 4 coarse samples, got depths [{B}x{R}x{S}]")
    w = smooth_weights(coarse_weights.detach().float())[..., 1:-1]  # [B,R,S-3]
    bins = 0.5 * (coarse_depths[..., :-1] + coarse_depths[..., 1:])  # [B,R,S-1]
    if u is None:
        u = torch.rand(B * R, n_samples, device=coarse_depths.device, generator=generator).reshape(B, R, n_samples)
    elif tuple(u.shape) != (B, R, n_samples):
        raise ValueError(f"pinned random numbers u must have shape {[B, R, n_samples]}, got {list(u.shape)}")
    return sample_pdf(bins[..., :-1], w, u.to(w.device), eps).to(coarse_depths.dtype).detach()


def target_branch(prob: float, *, u: Optional[float] = None, generator: Optional[torch.Generator] = None,
                  rule: str = "g3dr") -> bool:
    """The per-call draw that decides whether target samples are used.
    rule "g3dr" (G3DR's `random() > 0.6` for prob 0.4): taken iff u > 1 - prob; u from Python's
    `random.random()` when no generator is given (so a G3DR run's seeds reproduce), else from
    torch.rand((), generator). rule "below" (this library's "add" mode): taken iff u < prob, u from
    torch.rand((), generator). prob >= 1 is always taken, prob <= 0 never. u pins the draw."""
    if rule not in ("g3dr", "below"):
        raise ValueError(f"unknown rule {rule!r}; expected 'g3dr' or 'below'")
    if u is None:
        if rule == "g3dr" and generator is None:
            u = _pyrandom.random()
        else:
            u = torch.rand((), generator=generator, device=generator.device if generator else "cpu").item()
    if prob >= 1:
        return True
    if prob <= 0:
        return False
    return u > 1 - prob if rule == "g3dr" else u < prob


def target_linspace_depths(target_depth: torch.Tensor, n_samples: int, spread: float = 0.05) -> torch.Tensor:
    """G3DR's target samples: target_depth [B,R] -> [B,R,n] = target + linspace(-spread, spread, n)
    (endpoints included, no jitter, not clamped to the ray bounds; the offsets in float32 as in G3DR)."""
    off = torch.linspace(-spread, spread, n_samples, device=target_depth.device)
    return target_depth.unsqueeze(-1) + off.to(target_depth.dtype)


def depths_around_target(target_depth: torch.Tensor, n_samples: int, spread: float, *,
                         near: Optional[torch.Tensor] = None, far: Optional[torch.Tensor] = None,
                         perturb: bool = False, generator: Optional[torch.Generator] = None,
                         u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n samples spread evenly over [target - spread, target + spread] (bin centres, or jittered within
    their bins with perturb / pinned u [B,R,n]), clamped to [near, far] when given.
    target_depth [B,R] -> [B,R,n] ascending."""
    base = stratified_depths(target_depth - spread, target_depth + spread, n_samples, perturb=perturb,
                             generator=generator, u=u)
    if near is not None:
        base = torch.maximum(base, near.unsqueeze(-1))
    if far is not None:
        base = torch.minimum(base, far.unsqueeze(-1))
    return base


def merge_depths(*depths: torch.Tensor, return_indices: bool = False):
    """Concatenate [B,R,S_k] sample sets and sort ascending -> [B,R,sum S_k] (and, with
    return_indices, the permutation [B,R,sum S_k] applied to the concatenation)."""
    out = torch.sort(torch.cat(depths, dim=-1), dim=-1)
    return (out.values, out.indices) if return_indices else out.values
