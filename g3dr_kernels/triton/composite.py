"""Triton kernels for volume compositing (EG3D MipRayMarcher) with G3DR's depth-kernel gradient scaling.

Contract: g3dr_kernels/ops/composite.py. Equations: DESIGN.md and `g3dr_kernels.reference.composite`.
Per ray, on the S-1 intervals i = 0..S-2 (mid values of adjacent samples):
    x_i = (sigma_i + sigma_{i+1}) / 2 + density_bias,  sp_i = softplus(x_i) (torch's, threshold 20)
    delta_i = depths_{i+1} - depths_i,  t_i = (depths_i + depths_{i+1}) / 2,  c_i = (rgb_i + rgb_{i+1}) / 2
    e_i = exp(-sp_i delta_i),  alpha_i = 1 - e_i,  T_i = prod_{j<i} (1 - alpha_j + 1e-10),  w_i = alpha_i T_i
    (the factor 1 - alpha_j + 1e-10 is formed as e_j + 1e-10: equal in exact arithmetic, and right in
     floating point where alpha_j rounds to 1; the float32 reference rounds it through alpha_j)
    rgb = sum w_i c_i (+ 1 - opacity if white_bg),  opacity = sum w_i,  depth = sum w_i t_i / (opacity + eps)
Backward, one forward scan per ray (O(S), no per-ray buffers):
    G_i = dL/dw_i = g_rgb . c_i + g_depth (t_i - depth) / (opacity + eps) + g_opacity
                    (- sum_d g_rgb if white_bg) + g_weights_i
    suffix_i = sum_{j>i} w_j G_j = total - sum_{j<=i} w_j G_j, with total = sum_j w_j G_j in closed form
               from the saved outputs (or from a first scan: see _total_wg)
    dL/dalpha_i = T_i G_i - suffix_i / (1 - alpha_i + 1e-10)
    dL/dsp_i = dL/dalpha_i * delta_i e_i = delta_i (T_i G_i e_i - suffix_i * [e_i / (1 - alpha_i + 1e-10)])
        (the bracket e_i / (e_i + 1e-10) <= 1 is formed first, so the cancellation error of suffix_i,
         ~ulp * |total|, is never amplified, and it is 0, not 0/0, when e_i underflows; that error is what
         intervals behind an opaque surface get instead of ~0: ~1e-8 relative to total in fp32)
    dL/dx_i = dL/dsp_i * sigmoid(x_i) (1 where x_i > 20),  dL/dc_i = w_i g_rgb
    with a target x: both multiplied by k_i = min(c_max, max(s1 exp(-(x - t_i)^2 / s2), c_min))
    each sample gets half of the gradient of each interval next to it.
Accumulation is fp32 (fp64 for fp64 inputs); fp16/bf16 inputs are read and written in their dtype.
Scalar arguments (s1, s2, c_min, c_max, density_bias, eps) reach the kernels as fp32 pairs (hi, lo)
(Triton passes floats as fp32): fp64 runs rebuild each as hi + lo in fp64 (~48 bits), so they match
the fp64 reference to summation order. Approximate fp32 exp on NVIDIA (ex2.approx): a few ulps.
"""
from __future__ import annotations

import struct

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._params import CompositeGrads, CompositeParams
from .._types import Composite
from ._common import _depth_kernel, _depth_kernel_args, _interval, _scalar

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_D = 64  # widest colour/feature vector (BLOCK_D registers per ray)


def _launch_config(n_rays: int, d: int) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): the one home of the launch heuristic. A program holds
    [BLOCK_R, BLOCK_D] colour tiles; at about 4 elements of a tile per thread, ptxas (sm_90, fp32) needs
    ~90 registers for the forward and ~140 for the backward without spills (at 8 per thread: ~150 and
    ~240). Chosen from register counts, not from timings: untuned on a GPU so far."""
    block_d = triton.next_power_of_2(d)
    block_r = max(16, min(128, 512 // block_d))
    block_r = min(block_r, max(16, triton.next_power_of_2(n_rays)))
    tile = block_r * block_d
    num_warps = 8 if tile >= 1024 else 4 if tile >= 128 else 2
    return block_r, block_d, num_warps


def _split(x: float, acc: tl.dtype) -> Tuple[float, float]:
    """(hi, lo) float32 parts of x for _scalar: lo carries what float32 drops, for float64 runs."""
    hi = struct.unpack("f", struct.pack("f", float(x)))[0]
    return hi, (struct.unpack("f", struct.pack("f", float(x) - hi))[0] if acc == tl.float64 else 0.0)


@triton.jit
def _ray_block(n_rays, S, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_R rays (int64) and their mask, the channel range and the [BLOCK_R, BLOCK_D]
    colour mask, and the element offsets of each ray's first sample in sigma/depths [*, S], rgb
    [*, S, D] (per channel) and weights [*, S-1]."""
    rays = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rays < n_rays
    dch = tl.arange(0, BLOCK_D)
    cmask = rmask[:, None] & (dch[None, :] < D)
    s_base = rays * S
    return rays, rmask, dch, cmask, s_base, s_base[:, None] * D + dch[None, :], rays * (S - 1)


@triton.jit
def _sample(sigma_ptr, depths_ptr, rgb_ptr, s_base, c_base, i, D, rmask, cmask, ACC: tl.constexpr):
    """Sample i of each ray: density and depth [BLOCK_R], colour [BLOCK_R, BLOCK_D], in ACC (zeros where
    masked)."""
    return (tl.load(sigma_ptr + s_base + i, mask=rmask, other=0.0).to(ACC),
            tl.load(depths_ptr + s_base + i, mask=rmask, other=0.0).to(ACC),
            tl.load(rgb_ptr + c_base + i * D, mask=cmask, other=0.0).to(ACC))


@triton.jit
def _composite_fwd_kernel(sigma_ptr, rgb_ptr, depths_ptr, out_rgb_ptr, out_depth_ptr, out_opacity_ptr,
                          weights_ptr, n_rays, S, D, bias_hi, bias_lo, eps_hi, eps_lo,
                          WHITE_BG: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    density_bias = _scalar(bias_hi, bias_lo, ACC)
    eps = _scalar(eps_hi, eps_lo, ACC)
    rays, rmask, dch, cmask, s_base, c_base, w_base = _ray_block(n_rays, S, D, BLOCK_R, BLOCK_D)

    s0, d0, c0 = _sample(sigma_ptr, depths_ptr, rgb_ptr, s_base, c_base, 0, D, rmask, cmask, ACC)
    T = tl.full((BLOCK_R,), 1.0, ACC)
    acc_o = tl.zeros((BLOCK_R,), ACC)
    acc_t = tl.zeros((BLOCK_R,), ACC)
    acc_c = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    for i in range(0, S - 1):
        s1, d1, c1 = _sample(sigma_ptr, depths_ptr, rgb_ptr, s_base, c_base, i + 1, D, rmask, cmask, ACC)
        alpha, e, keep, t, delta, _ = _interval(s0, s1, d0, d1, density_bias, False, False)
        w = alpha * T
        acc_o += w
        acc_t += w * t
        acc_c += w[:, None] * (0.5 * (c0 + c1))
        if NEED_WEIGHTS:
            tl.store(weights_ptr + w_base + i, w.to(weights_ptr.dtype.element_ty), mask=rmask)
        T = T * keep
        s0, d0, c0 = s1, d1, c1

    if WHITE_BG:
        acc_c += (1.0 - acc_o)[:, None]
    out_c = rays[:, None] * D + dch[None, :]
    tl.store(out_rgb_ptr + out_c, acc_c.to(out_rgb_ptr.dtype.element_ty), mask=cmask)
    tl.store(out_depth_ptr + rays, (acc_t / (acc_o + eps)).to(out_depth_ptr.dtype.element_ty), mask=rmask)
    tl.store(out_opacity_ptr + rays, acc_o.to(out_opacity_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _total_wg(sigma_ptr, rgb_ptr, depths_ptr, gw_ptr, s_base, c_base, w_base, rmask, cmask, S, D, density_bias,
              g_c, g_base, g_dscale, depth, FULL: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
              ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """First scan: sum_i w_i G_i with G_i the full dL/dw_i (FULL) or only its g_weights part."""
    s0 = tl.load(sigma_ptr + s_base, mask=rmask, other=0.0).to(ACC)
    d0 = tl.load(depths_ptr + s_base, mask=rmask, other=0.0).to(ACC)
    if FULL:
        c0 = tl.load(rgb_ptr + c_base, mask=cmask, other=0.0).to(ACC)
    T = tl.full((BLOCK_R,), 1.0, ACC)
    total = tl.zeros((BLOCK_R,), ACC)
    for i in range(0, S - 1):
        s1 = tl.load(sigma_ptr + s_base + (i + 1), mask=rmask, other=0.0).to(ACC)
        d1 = tl.load(depths_ptr + s_base + (i + 1), mask=rmask, other=0.0).to(ACC)
        alpha, e, keep, t, delta, _ = _interval(s0, s1, d0, d1, density_bias, False, False)
        G = tl.zeros((BLOCK_R,), ACC)
        if HAS_GRAD_WEIGHTS:
            G += tl.load(gw_ptr + w_base + i, mask=rmask, other=0.0).to(ACC)
        if FULL:
            c1 = tl.load(rgb_ptr + c_base + (i + 1) * D, mask=cmask, other=0.0).to(ACC)
            G += tl.sum(g_c * (0.5 * (c0 + c1)), axis=1) + g_dscale * (t - depth) + g_base
            c0 = c1
        total += alpha * T * G
        T = T * keep
        s0, d0 = s1, d1
    return total


@triton.jit
def _composite_bwd_kernel(g_rgb_ptr, g_depth_ptr, g_opacity_ptr, g_weights_ptr, sigma_ptr, rgb_ptr, depths_ptr,
                          target_ptr, out_rgb_ptr, out_depth_ptr, out_opacity_ptr, grad_sigma_ptr, grad_rgb_ptr,
                          n_rays, S, D, s1_hi, s1_lo, s2_hi, s2_lo, cmin_hi, cmin_lo, cmax_hi, cmax_lo,
                          bias_hi, bias_lo, eps_hi, eps_lo,
                          HAS_TARGET: tl.constexpr, WHITE_BG: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
                          FIRST_PASS_FULL: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    s1_k, s2_k, c_min, c_max = _depth_kernel_args(s1_hi, s1_lo, s2_hi, s2_lo, cmin_hi, cmin_lo, cmax_hi, cmax_lo,
                                                  ACC)
    density_bias = _scalar(bias_hi, bias_lo, ACC)
    eps = _scalar(eps_hi, eps_lo, ACC)
    rays, rmask, dch, cmask, s_base, c_base, w_base = _ray_block(n_rays, S, D, BLOCK_R, BLOCK_D)
    ray_c = rays[:, None] * D + dch[None, :]

    g_c = tl.load(g_rgb_ptr + ray_c, mask=cmask, other=0.0).to(ACC)
    g_d = tl.load(g_depth_ptr + rays, mask=rmask, other=0.0).to(ACC)
    g_o = tl.load(g_opacity_ptr + rays, mask=rmask, other=0.0).to(ACC)
    depth = tl.load(out_depth_ptr + rays, mask=rmask, other=0.0).to(ACC)
    opacity = tl.load(out_opacity_ptr + rays, mask=rmask, other=0.0).to(ACC)
    g_dscale = g_d / (opacity + eps)
    g_base = g_o
    if WHITE_BG:
        g_base -= tl.sum(g_c, axis=1)
    if HAS_TARGET:
        target = tl.load(target_ptr + rays, mask=rmask, other=0.0).to(ACC)

    # total = sum_i w_i G_i
    if FIRST_PASS_FULL:
        total = _total_wg(sigma_ptr, rgb_ptr, depths_ptr, g_weights_ptr, s_base, c_base, w_base, rmask, cmask, S, D,
                          density_bias, g_c, g_base, g_dscale, depth, True, HAS_GRAD_WEIGHTS, ACC, BLOCK_R)
    else:
        # closed form from the forward's outputs: sum w c = out_rgb (- (1 - opacity) if white_bg),
        # sum w (t - depth) = depth (opacity + eps) - depth opacity = depth eps
        sum_wc = tl.load(out_rgb_ptr + ray_c, mask=cmask, other=0.0).to(ACC)
        if WHITE_BG:
            sum_wc -= (1.0 - opacity)[:, None]
        total = tl.sum(g_c * sum_wc, axis=1) + g_dscale * (depth * eps) + g_base * opacity
        if HAS_GRAD_WEIGHTS:
            total += _total_wg(sigma_ptr, rgb_ptr, depths_ptr, g_weights_ptr, s_base, c_base, w_base, rmask, cmask, S,
                               D, density_bias, g_c, g_base, g_dscale, depth, False, True, ACC, BLOCK_R)

    s0, d0, c0 = _sample(sigma_ptr, depths_ptr, rgb_ptr, s_base, c_base, 0, D, rmask, cmask, ACC)
    T = tl.full((BLOCK_R,), 1.0, ACC)
    prefix = tl.zeros((BLOCK_R,), ACC)
    prev_gs = tl.zeros((BLOCK_R,), ACC)  # the previous interval's gradient to its mid density
    prev_gc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    for i in range(0, S - 1):
        s1, d1, c1 = _sample(sigma_ptr, depths_ptr, rgb_ptr, s_base, c_base, i + 1, D, rmask, cmask, ACC)
        alpha, e, keep, t, delta, dsp_dx = _interval(s0, s1, d0, d1, density_bias, False, True)
        w = alpha * T
        G = tl.sum(g_c * (0.5 * (c0 + c1)), axis=1) + g_dscale * (t - depth) + g_base
        if HAS_GRAD_WEIGHTS:
            G += tl.load(g_weights_ptr + w_base + i, mask=rmask, other=0.0).to(ACC)
        prefix += w * G
        suffix = total - prefix
        g_sp = delta * (T * G * e - suffix * (e / keep))
        g_s = g_sp * dsp_dx
        g_cm = w[:, None] * g_c
        if HAS_TARGET:
            k = _depth_kernel(target, t, s1_k, s2_k, c_min, c_max)
            g_s = g_s * k
            g_cm = g_cm * k[:, None]
        tl.store(grad_sigma_ptr + s_base + i, (0.5 * (prev_gs + g_s)).to(grad_sigma_ptr.dtype.element_ty),
                 mask=rmask)
        tl.store(grad_rgb_ptr + c_base + i * D, (0.5 * (prev_gc + g_cm)).to(grad_rgb_ptr.dtype.element_ty),
                 mask=cmask)
        prev_gs, prev_gc = g_s, g_cm
        T = T * keep
        s0, d0, c0 = s1, d1, c1
    tl.store(grad_sigma_ptr + s_base + (S - 1), (0.5 * prev_gs).to(grad_sigma_ptr.dtype.element_ty), mask=rmask)
    tl.store(grad_rgb_ptr + c_base + (S - 1) * D, (0.5 * prev_gc).to(grad_rgb_ptr.dtype.element_ty), mask=cmask)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(sigma: Tensor, rgb: Tensor, depths: Tensor, target: Optional[Tensor]) -> Tuple[int, int, int, int]:
    if sigma.dim() != 3 or rgb.dim() != 4 or depths.shape != sigma.shape or rgb.shape[:3] != sigma.shape:
        raise ValueError(f"expected sigma [B,R,S], rgb [B,R,S,D], depths [B,R,S]; got {tuple(sigma.shape)}, "
                         f"{tuple(rgb.shape)}, {tuple(depths.shape)}")
    B, R, S = sigma.shape
    D = rgb.shape[3]
    if S < 2 or not 1 <= D <= MAX_D:
        raise ValueError(f"the triton composite kernel needs S >= 2 and 1 <= D <= {MAX_D}; got S={S}, D={D}")
    if sigma.dtype not in _DTYPES:
        raise TypeError(f"the triton composite kernel supports {_DTYPES}, got {sigma.dtype}")
    for name, t in (("rgb", rgb), ("depths", depths), ("target", target)):
        if t is not None and (t.dtype != sigma.dtype or t.device != sigma.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but sigma is {sigma.dtype} on {sigma.device}")
    if target is not None and target.shape != (B, R):
        raise ValueError(f"target must be [B,R] = [{B}x{R}], got {tuple(target.shape)}")
    return B, R, S, D


def composite_fwd(sigma: Tensor, rgb: Tensor, depths: Tensor, target: Optional[Tensor], *options) -> Composite:
    """options: the CompositeParams fields in order (g3dr_kernels/_params.py), then need_weights.
    -> Composite(rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] or an empty tensor). The
    target and kernel parameters only matter in the backward pass; they are accepted for the contract."""
    p, (need_weights,) = CompositeParams.split(options)
    B, R, S, D = _check(sigma, rgb, depths, target)
    sigma, rgb, depths = sigma.contiguous(), rgb.contiguous(), depths.contiguous()
    out_rgb = rgb.new_empty(B, R, D)
    out_depth = sigma.new_empty(B, R)
    out_opacity = sigma.new_empty(B, R)
    weights = sigma.new_empty(B, R, S - 1) if need_weights else sigma.new_empty(0)
    n_rays = B * R
    if n_rays == 0:
        return Composite(out_rgb, out_depth, out_opacity, weights)
    block_r, block_d, num_warps = _launch_config(n_rays, D)
    grid = (triton.cdiv(n_rays, block_r),)
    acc = _acc_dtype(sigma.dtype)
    _composite_fwd_kernel[grid](sigma, rgb, depths, out_rgb, out_depth, out_opacity,
                                weights if need_weights else out_opacity, n_rays, S, D,
                                *_split(p.density_bias, acc), *_split(p.eps, acc), WHITE_BG=bool(p.white_bg),
                                NEED_WEIGHTS=bool(need_weights), ACC=acc, BLOCK_R=block_r, BLOCK_D=block_d,
                                num_warps=num_warps)
    return Composite(out_rgb, out_depth, out_opacity, weights)


def composite_bwd(grad_rgb: Tensor, grad_depth: Tensor, grad_opacity: Tensor, grad_weights: Optional[Tensor],
                  sigma: Tensor, rgb: Tensor, depths: Tensor, target: Optional[Tensor], out_rgb: Tensor,
                  out_depth: Tensor, out_opacity: Tensor, *params) -> CompositeGrads:
    """params: the CompositeParams fields in order. -> CompositeGrads(sigma [B,R,S], rgb [B,R,S,D]); with a
    target, interval i's mid-density and mid-colour gradients are multiplied by k(target, t_i)."""
    p, _ = CompositeParams.split(params)
    B, R, S, D = _check(sigma, rgb, depths, target)
    for name, t, shape in (("grad_rgb", grad_rgb, (B, R, D)), ("grad_depth", grad_depth, (B, R)),
                           ("grad_opacity", grad_opacity, (B, R)), ("out_rgb", out_rgb, (B, R, D)),
                           ("out_depth", out_depth, (B, R)), ("out_opacity", out_opacity, (B, R)),
                           ("grad_weights", grad_weights, (B, R, S - 1))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    grad_sigma = torch.empty_like(sigma, memory_format=torch.contiguous_format)
    grad_rgb_in = torch.empty_like(rgb, memory_format=torch.contiguous_format)
    n_rays = B * R
    if n_rays == 0:
        return CompositeGrads(grad_sigma, grad_rgb_in)
    c = [t.contiguous() for t in (grad_rgb, grad_depth, grad_opacity, sigma, rgb, depths, out_rgb, out_depth,
                                  out_opacity)]
    gw = None if grad_weights is None else grad_weights.contiguous()
    tgt = None if target is None else target.contiguous()
    # Low-precision outputs are rounded copies of the fp32 totals: the suffix sums would inherit that
    # rounding, so the total is recomputed in a first fp32 scan instead (fp32/fp64: closed form).
    full_first_pass = sigma.dtype in (torch.float16, torch.bfloat16)
    block_r, block_d, num_warps = _launch_config(n_rays, D)
    grid = (triton.cdiv(n_rays, block_r),)
    k = p.kernel
    scalars = (k.s1, k.s2, k.c_min, k.c_max, p.density_bias, p.eps)  # the kernel's order
    _composite_bwd_kernel[grid](c[0], c[1], c[2], gw if gw is not None else c[1], c[3], c[4], c[5],
                                tgt if tgt is not None else c[1], c[6], c[7], c[8], grad_sigma, grad_rgb_in,
                                n_rays, S, D, *[v for x in scalars for v in _split(x, _acc_dtype(sigma.dtype))],
                                HAS_TARGET=tgt is not None, WHITE_BG=bool(p.white_bg),
                                HAS_GRAD_WEIGHTS=gw is not None, FIRST_PASS_FULL=full_first_pass,
                                ACC=_acc_dtype(sigma.dtype), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return CompositeGrads(grad_sigma, grad_rgb_in)
