"""Fully fused triplane renderer in Triton: points -> multi-resolution triplane sampling -> MLP decoder
-> volume compositing with G3DR's depth-kernel gradient scaling, one kernel per direction.

Formulas (DESIGN.md; oracle `g3dr_kernels.reference.render_triplanes`). Per ray, samples s = 0..S-1:
  x_s = o + t_s d,  u = x_s * scale,  f_s = sum_levels (1/3) sum_planes bilinear(plane, (a, b) of u)
      (align_corners=False, zeros outside; planes read (x,y), (x,z), (z,x) ("eg3d") or (y,z) ("xyz") last)
  h_s = softplus(f_s @ w1.T + b1),  o_s = h_s @ w2.T + b2,  sigma_s = o_s[0],
  c_s = sigmoid(o_s[1:]) * (1 + 2e-3) - 1e-3
  intervals i = 0..S-2 (MipRayMarcher): sm_i, cm_i, t_i = the mids of samples i, i+1;
  delta_i = t_{i+1} - t_i; alpha_i = 1 - exp(-softplus(sm_i + density_bias) delta_i);
  T_i = prod_{j<i} (1 - alpha_j + 1e-10); w_i = alpha_i T_i;
  rgb = sum w_i cm_i (+ 1 - opacity with a white background), opacity = sum w_i,
  depth = sum w_i t_i / (opacity + eps).

Layout: one program per block of BLOCK_R rays (flattened over B*R); it walks the S samples of its
rays in order, so a sample tile is [BLOCK_R rays, channels]. The decoder runs on those tiles with
tl.dot (C, hidden and 1+D padded to powers of two >= 16, which tl.dot needs), the interval of
samples (s-1, s) is composited as soon as sample s is decoded (the previous sample stays in
registers), and every accumulation is in float32 (float64 for float64 inputs).

Backward recomputes the forward for its block in the same order and gets the composite gradients
in O(S) per ray from the saved totals (out_rgb, out_depth, out_opacity): with E = opacity + eps,
  dL/dw_i = g_rgb . cm_i + g_depth (t_i - depth) / E + g_opacity (- sum g_rgb, white bg) + g_w_i
  sum_{j>i} w_j dL/dw_j = Total - sum_{j<=i} w_j dL/dw_j, where
  Total = g_rgb . out_rgb (- sum g_rgb, white bg) + g_depth depth eps / E + g_opacity opacity + sum_j w_j g_w_j
  dL/dalpha_i = T_i dL/dw_i - (sum_{j>i} w_j dL/dw_j) / (1 - alpha_i + 1e-10)
  dL/dsm_i = k_i dL/dalpha_i exp(-softplus(.) delta_i) delta_i sigmoid(sm_i + density_bias),
  dL/dcm_i = k_i w_i g_rgb,  k_i = min(c_max, max(s1 exp(-(target - t_i)^2 / s2), c_min)) (1 without target)
and half of each interval's gradient goes to each of its two samples. sum_j w_j g_w_j needs every
weight of the ray first, so when the weights' gradient is nonzero a forward pre-pass computes it
(autograd passes zeros when the weights are unused; checking that costs one device sync).
Sample s-1 is back-propagated through the decoder at step s (when both of its intervals are known):
the w1/b1/w2/b2 gradients accumulate in registers and each program writes its partial sums once
(reduced in torch, deterministically); plane gradients are added atomically (float32 buffers).

Planes: any number of levels (a tuple of pointers, one compile per count); on the GPU they are
copied channels-last ([B,3,H,W,C]) so a texel's channels are one contiguous read. Float arguments
reach float64 runs in float64 (split into two float32 halves, see _scalar).

Reference for the layout (blocks of rays marching samples, tl.dot MLP on ray tiles): Lightplane
(facebookresearch/lightplane), written here from the equations above.
"""
from __future__ import annotations


from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .._params import RenderParams
from .._types import Composite
from ._common import (_bilinear, _depth_kernel, _depth_kernel_args, _interval, _nonfinite, _plane_coords, _scalar,
                      _sigmoid, _softplus, _softplus_grad)

# Launch heuristics (their one home). None of this was timed: no GPU was available while writing.
# What was checked is what an sm_90 compile needs per thread (cuobjdump), with the settings below.
# C=32, hidden=64, D=3, 3 levels: forward 176 registers, no spill, 20 KB shared; backward 255
# registers + 64 B stack, 60 KB shared. (In earlier variants of these kernels, 4 warps,
# BLOCK_R_BWD=32 and "ieee" backward dots each spilled more.) C=64, hidden=128, D=32: forward 288 B stack, 80 KB shared; the backward needs 288 KB
# of shared memory with hoisted weights, so it falls back to per-step weight reads (32 KB shared,
# 2.2 KB stack: it runs, slowly). Splitting the hidden layer into chunks is the next step for such
# sizes. Re-time all of this on a GPU.
BLOCK_R_FWD = 32  # rays per program, >= 16 for tl.dot
BLOCK_R_BWD = 16
NUM_WARPS = 8
# Under TRITON_INTERPRET=1 every tl op costs interpreter overhead while numpy work is nearly free,
# so fewer, wider programs: up to this many rays per program.
BLOCK_R_INTERPRET = 64
# No software pipelining of the sample loop: its loads are gathers (up to 36 [BLOCK_R, C] tiles per
# sample), and multi-buffering them took ~168 KB of shared memory per program at C=32 (sm_90 compile).
NUM_STAGES = 1
# Planes go to the kernel channels-last on the GPU ([B,3,H,W,C], one copy per call) so the C channels
# of a texel are one contiguous read instead of C reads H*W apart (unmeasured).
CHANNELS_LAST_GPU = True
# tl.dot precision for float32: "ieee" is exact float32 (FMAs, no tensor cores); "tf32x3" is three
# TF32 tensor-core products with float32-level error (not plain TF32). In the sm_90 compiles tf32x3
# cut the backward's spills (C=32/hidden=64: ~840 -> ~250 B before weight hoisting), while the
# forward compiled as well or better with ieee. float64 always uses ieee (the interpreter ignores the
# choice and multiplies exactly).
DOT_PRECISION_FWD = "ieee"
DOT_PRECISION_BWD = "tf32x3"
MAX_PAD = 256  # widest padded C / hidden / 1+D accepted
HOIST_WEIGHTS = True  # first choice for both kernels; see _weights and _launch
BWD_PROGRAMS_PER_SM = 4  # backward is persistent: programs loop over ray blocks, few partial sums


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------
# Triplane sampling / its adjoint on a [BLOCK_R, CP] tile
# ---------------------------------------------------------------------------------------------


@triton.jit
def _texel(bidx, p, cc, x, y, H, W, C, CL: tl.constexpr):
    """[BR, CP] int64 element offsets of texel (x, y), channels cc, plane p of each ray's batch.
    Layout [B,3,C,H,W], or [B,3,H,W,C] with CL (channels-last: a texel's channels are contiguous)."""
    plane = (bidx * 3 + p) * H * W * C  # [BR] int64: start of the plane in either layout
    pix = y.to(tl.int64) * W + x
    if CL:
        return (plane + pix * C)[:, None] + cc[None, :]
    else:
        return (plane + pix)[:, None] + (cc.to(tl.int64) * H * W)[None, :]


@triton.jit
def _level_feats(ptr, H, W, bidx, ux, uy, uz, cc, cmask, rmask, C, CDT: tl.constexpr,
                 PLANE_AXES: tl.constexpr, CL: tl.constexpr):
    """Mean over the 3 planes of one level, [BR, CP] (zeros in padded channels / dead rows)."""
    m = rmask[:, None] & cmask[None, :]
    out = tl.zeros([bidx.shape[0], cc.shape[0]], CDT)
    for p in range(3):  # a runtime loop: unrolled, the 12 gathers per level all stayed live at once
        a, b = _plane_coords(ux, uy, uz, p, PLANE_AXES)
        x0, y0, x1, y1, wx0, wy0, wx1, wy1, vx0, vy0, vx1, vy1 = _bilinear(a, b, H, W, tl.int32)
        v00 = tl.load(ptr + _texel(bidx, p, cc, x0, y0, H, W, C, CL), mask=m & (vy0 & vx0)[:, None], other=0.0)
        v01 = tl.load(ptr + _texel(bidx, p, cc, x1, y0, H, W, C, CL), mask=m & (vy0 & vx1)[:, None], other=0.0)
        v10 = tl.load(ptr + _texel(bidx, p, cc, x0, y1, H, W, C, CL), mask=m & (vy1 & vx0)[:, None], other=0.0)
        v11 = tl.load(ptr + _texel(bidx, p, cc, x1, y1, H, W, C, CL), mask=m & (vy1 & vx1)[:, None], other=0.0)
        out += (v00.to(CDT) * (wx0 * wy0)[:, None] + v01.to(CDT) * (wx1 * wy0)[:, None]
                + v10.to(CDT) * (wx0 * wy1)[:, None] + v11.to(CDT) * (wx1 * wy1)[:, None])
    return out / 3.0


@triton.jit
def _level_scatter(gptr, H, W, bidx, ux, uy, uz, df, cc, cmask, rmask, C, PLANE_AXES: tl.constexpr,
                   CL: tl.constexpr):
    """Adjoint of _level_feats: atomically add df [BR, CP] / 3 times the corner weights."""
    m = rmask[:, None] & cmask[None, :]
    g = df / 3.0
    for p in range(3):  # a runtime loop: unrolled, the 12 gathers per level all stayed live at once
        a, b = _plane_coords(ux, uy, uz, p, PLANE_AXES)
        x0, y0, x1, y1, wx0, wy0, wx1, wy1, vx0, vy0, vx1, vy1 = _bilinear(a, b, H, W, tl.int32)
        tl.atomic_add(gptr + _texel(bidx, p, cc, x0, y0, H, W, C, CL), g * (wx0 * wy0)[:, None],
                      mask=m & (vy0 & vx0)[:, None])
        tl.atomic_add(gptr + _texel(bidx, p, cc, x1, y0, H, W, C, CL), g * (wx1 * wy0)[:, None],
                      mask=m & (vy0 & vx1)[:, None])
        tl.atomic_add(gptr + _texel(bidx, p, cc, x0, y1, H, W, C, CL), g * (wx0 * wy1)[:, None],
                      mask=m & (vy1 & vx0)[:, None])
        tl.atomic_add(gptr + _texel(bidx, p, cc, x1, y1, H, W, C, CL), g * (wx1 * wy1)[:, None],
                      mask=m & (vy1 & vx1)[:, None])


@triton.jit
def _feats(planes, hs, ws, bidx, ux, uy, uz, cc, cmask, rmask, C, N_LEVELS: tl.constexpr,
           CDT: tl.constexpr, PLANE_AXES: tl.constexpr, CL: tl.constexpr):
    """Sum over levels: [BR, CP]. planes/hs/ws are tuples, one entry per level. A point with a
    NaN/inf coordinate gets NaN features (_nonfinite), as grid_sample in the reference gives, so
    such a ray composites to NaN; _level_scatter adds nothing for it."""
    f = _level_feats(planes[0], hs[0], ws[0], bidx, ux, uy, uz, cc, cmask, rmask, C, CDT, PLANE_AXES, CL)
    for lv in tl.static_range(1, N_LEVELS):
        f += _level_feats(planes[lv], hs[lv], ws[lv], bidx, ux, uy, uz, cc, cmask, rmask, C, CDT, PLANE_AXES, CL)
    return f + _nonfinite(ux, uy, uz)[:, None]


@triton.jit
def _scatter(gplanes, hs, ws, bidx, ux, uy, uz, df, cc, cmask, rmask, C, N_LEVELS: tl.constexpr,
             PLANE_AXES: tl.constexpr, CL: tl.constexpr):
    for lv in tl.static_range(N_LEVELS):
        _level_scatter(gplanes[lv], hs[lv], ws[lv], bidx, ux, uy, uz, df, cc, cmask, rmask, C, PLANE_AXES, CL)


# ---------------------------------------------------------------------------------------------
# Per-sample-tile pieces shared by the two kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ranges(C, HID, D, CP: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr):
    """Index ranges over the padded channel, hidden and output (1 + D) widths, and their masks."""
    cc = tl.arange(0, CP)
    hh = tl.arange(0, HP)
    jj = tl.arange(0, DP)
    return cc, hh, jj, cc < C, hh < HID, jj < D + 1


@triton.jit
def _rays(ro_ptr, rd_ptr, g, rmask, CDT: tl.constexpr):
    """Origins and directions [BR] each (ox, oy, oz, dx, dy, dz) of rays g (int64) from [*, 3] buffers."""
    return (tl.load(ro_ptr + g * 3 + 0, mask=rmask, other=0.0).to(CDT),
            tl.load(ro_ptr + g * 3 + 1, mask=rmask, other=0.0).to(CDT),
            tl.load(ro_ptr + g * 3 + 2, mask=rmask, other=0.0).to(CDT),
            tl.load(rd_ptr + g * 3 + 0, mask=rmask, other=0.0).to(CDT),
            tl.load(rd_ptr + g * 3 + 1, mask=rmask, other=0.0).to(CDT),
            tl.load(rd_ptr + g * 3 + 2, mask=rmask, other=0.0).to(CDT))


@triton.jit
def _point(ox, oy, oz, dx, dy, dz, t, scale):
    """u = (o + t d) * scale, as the reference rounds it (point first, then the scale)."""
    return (ox + t * dx) * scale, (oy + t * dy) * scale, (oz + t * dz) * scale


@triton.jit
def _tile(ptr, i, j, mi, mj, si, sj, CDT: tl.constexpr):
    """[len(i), len(j)] tile ptr[i * si + j * sj] (zeros outside mi x mj) in the compute dtype."""
    return tl.load(ptr + i[:, None] * si + j[None, :] * sj, mask=mi[:, None] & mj[None, :], other=0.0).to(CDT)


@triton.jit
def _weights(held, ptr, i, j, mi, mj, si, sj, CDT: tl.constexpr, HOIST_W: tl.constexpr):
    """A decoder weight tile: the one loaded once before the loops (HOIST_W), or a fresh read at
    every sample step. Hoisting compiles leaner (sm_90, C=32/hidden=64: forward 176 vs 241
    registers, backward 64 vs ~270 B of stack) but keeps the tiles in shared memory for the whole
    kernel, which at C=64/hidden=128/D=32 wants 288 KB in the backward: more than a GPU has, so the
    host falls back to fresh reads when a hoisted launch runs out of resources."""
    if HOIST_W:
        return held
    else:
        return _tile(ptr, i, j, mi, mj, si, sj, CDT)


@triton.jit
def _decode(f, w1t, b1v, w2t, b2v, jj, D, DOT_PREC: tl.constexpr):
    """f [BR, CP] -> pre [BR, HP], o [BR, DP], sigma [BR], colour tile c [BR, DP] (column j holds
    channel j-1; column 0 and padding are zero). w1t [CP, HP] = w1.T, w2t [HP, DP] = w2.T."""
    pre = tl.dot(f, w1t, input_precision=DOT_PREC) + b1v[None, :]
    h = _softplus(pre)
    o = tl.dot(h, w2t, input_precision=DOT_PREC) + b2v[None, :]
    sig = tl.sum(tl.where(jj[None, :] == 0, o, 0.0), axis=1)
    col = (jj >= 1) & (jj <= D)
    c = tl.where(col[None, :], _sigmoid(o) * (1.0 + 2e-3) - 1e-3, 0.0)
    return pre, o, sig, c


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _render_fwd_kernel(
    planes, hs, ws,
    ro_ptr, rd_ptr, dep_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gw_ptr,
    rgb_ptr, depth_ptr, op_ptr, wts_ptr, gsum_ptr,
    n_rays, R, S, C, HID, D,
    scale_hi, scale_lo, bias_hi, bias_lo, eps_hi, eps_lo,
    N_LEVELS: tl.constexpr, PLANE_AXES: tl.constexpr, CL: tl.constexpr, WHITE_BG: tl.constexpr,
    NEED_WEIGHTS: tl.constexpr,
    GW_DOT: tl.constexpr, STORE_OUT: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
    HOIST_W: tl.constexpr, BLOCK_R: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
):
    """Forward. STORE_OUT writes rgb/depth/opacity (and weights with NEED_WEIGHTS); GW_DOT instead
    writes sum_i w_i g_w_i per ray (the backward's pre-pass when the weights have a gradient)."""
    scale = _scalar(scale_hi, scale_lo, CDT)
    density_bias = _scalar(bias_hi, bias_lo, CDT)
    eps = _scalar(eps_hi, eps_lo, CDT)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rays, BLOCK_R)
    cc, hh, jj, cmask, hmask, jmask = _ranges(C, HID, D, CP, HP, DP)
    if HOIST_W:
        w1t = _tile(w1_ptr, cc, hh, cmask, hmask, 1, C, CDT)  # [CP, HP] = w1.T
        w2t = _tile(w2_ptr, hh, jj, hmask, jmask, 1, HID, CDT)  # [HP, DP] = w2.T
    else:
        w1t = 0.0  # read inside the loop instead (_weights)
        w2t = 0.0
    b1v = tl.load(b1_ptr + hh, mask=hmask, other=0.0).to(CDT)
    b2v = tl.load(b2_ptr + jj, mask=jmask, other=0.0).to(CDT)
    col = (jj >= 1) & (jj <= D)
    for blk in range(pid, n_blocks, nprog):
        g = blk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # global ray index over B*R
        rmask = g < n_rays
        bidx = g // R  # batch index of each ray
        ox, oy, oz, dx, dy, dz = _rays(ro_ptr, rd_ptr, g, rmask, CDT)
        t_prev = tl.load(dep_ptr + g * S, mask=rmask, other=0.0).to(CDT)
        sig_prev = tl.zeros([BLOCK_R], CDT)
        c_prev = tl.zeros([BLOCK_R, DP], CDT)
        T = tl.full([BLOCK_R], 1.0, CDT)
        acc_c = tl.zeros([BLOCK_R, DP], CDT)
        acc_o = tl.zeros([BLOCK_R], CDT)
        acc_d = tl.zeros([BLOCK_R], CDT)
        acc_g = tl.zeros([BLOCK_R], CDT)
        for s in range(0, S):
            sv = tl.full([BLOCK_R], s, tl.int32)  # vector form: scalar bools do not combine with masks
            live = sv > 0
            t = tl.load(dep_ptr + g * S + s, mask=rmask, other=0.0).to(CDT)
            ux, uy, uz = _point(ox, oy, oz, dx, dy, dz, t, scale)
            f = _feats(planes, hs, ws, bidx, ux, uy, uz, cc, cmask, rmask, C, N_LEVELS, CDT, PLANE_AXES, CL)
            pre, o, sig, c = _decode(f, _weights(w1t, w1_ptr, cc, hh, cmask, hmask, 1, C, CDT, HOIST_W), b1v,
                                     _weights(w2t, w2_ptr, hh, jj, hmask, jmask, 1, HID, CDT, HOIST_W), b2v, jj, D,
                                     DOT_PREC)
            alpha, e, keep, tm, delta, _ = _interval(sig_prev, sig, t_prev, t, density_bias, True, False)
            om = tl.where(live, keep, 1.0)  # 1 on the dead interval before the first sample
            w = tl.where(live, alpha * T, 0.0)
            if STORE_OUT:
                acc_c += w[:, None] * (0.5 * (c_prev + c))
                acc_o += w
                acc_d += w * tm
                if NEED_WEIGHTS:
                    tl.store(wts_ptr + g * (S - 1) + (s - 1), w.to(wts_ptr.dtype.element_ty), mask=rmask & live)
            if GW_DOT:
                gw = tl.load(gw_ptr + g * (S - 1) + (s - 1), mask=rmask & live, other=0.0).to(CDT)
                acc_g += w * gw
            T = T * om
            t_prev = t
            sig_prev = sig
            c_prev = c
        if STORE_OUT:
            rgb = acc_c
            if WHITE_BG:
                rgb = rgb + (1.0 - acc_o)[:, None]
            tl.store(rgb_ptr + g[:, None] * D + (jj[None, :] - 1), rgb.to(rgb_ptr.dtype.element_ty),
                     mask=rmask[:, None] & col[None, :])
            tl.store(op_ptr + g, acc_o.to(op_ptr.dtype.element_ty), mask=rmask)
            tl.store(depth_ptr + g, (acc_d / (acc_o + eps)).to(depth_ptr.dtype.element_ty), mask=rmask)
        if GW_DOT:
            tl.store(gsum_ptr + g, acc_g, mask=rmask)


@triton.jit
def _sample_bwd(f, o, g_sig, g_c, prow, w1, w1t, b1v, w2, jj, acc_w1, acc_b1, acc_w2, acc_b2,
                DOT_PREC: tl.constexpr):
    """Decoder backward for one sample tile given dL/dsigma [BR] and dL/dc [BR, DP] (column layout
    of _decode); rows outside `prow` contribute nothing. Returns dL/df [BR, CP] and the updated
    register accumulators of the w1, b1, w2, b2 gradients."""
    sg = _sigmoid(o)
    g_o = tl.where(jj[None, :] == 0, g_sig[:, None], g_c * ((1.0 + 2e-3) * sg * (1.0 - sg)))
    g_o = tl.where(prow[:, None], g_o, 0.0)
    # the hidden pre-activation is recomputed rather than carried over from the previous step
    pre = tl.dot(f, w1t, input_precision=DOT_PREC) + b1v[None, :]
    h = _softplus(pre)
    acc_w2 += tl.dot(tl.trans(g_o), h, input_precision=DOT_PREC)  # [DP, HP]
    acc_b2 += tl.sum(g_o, axis=0)
    dpre = tl.dot(g_o, w2, input_precision=DOT_PREC) * _softplus_grad(pre)  # [BR, HP]
    acc_w1 += tl.dot(tl.trans(dpre), f, input_precision=DOT_PREC)  # [HP, CP]
    acc_b1 += tl.sum(dpre, axis=0)
    df = tl.dot(dpre, w1, input_precision=DOT_PREC)  # [BR, CP]
    return df, acc_w1, acc_b1, acc_w2, acc_b2


@triton.jit
def _render_bwd_kernel(
    planes, gplanes, hs, ws,
    ro_ptr, rd_ptr, dep_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, tgt_ptr, gw_ptr, gsum_ptr,
    grgb_ptr, gdep_ptr, gop_ptr, orgb_ptr, odep_ptr, oop_ptr,
    pw1_ptr, pb1_ptr, pw2_ptr, pb2_ptr,
    n_rays, R, S, C, HID, D,
    scale_hi, scale_lo, s1_hi, s1_lo, s2_hi, s2_lo, cmin_hi, cmin_lo, cmax_hi, cmax_lo, bias_hi, bias_lo,
    eps_hi, eps_lo,
    N_LEVELS: tl.constexpr, PLANE_AXES: tl.constexpr, CL: tl.constexpr, WHITE_BG: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_GW: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr, HOIST_W: tl.constexpr,
    BLOCK_R: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
):
    """Backward (see the module docstring). Persistent: program pid handles ray blocks pid,
    pid + nprog, ...; plane gradients are atomically added to gplanes (float32/64 buffers), the
    decoder gradients are written once per program to pw1 [nprog, HP, CP], pb1 [nprog, HP],
    pw2 [nprog, DP, HP], pb2 [nprog, DP]."""
    scale = _scalar(scale_hi, scale_lo, CDT)
    s1, s2, c_min, c_max = _depth_kernel_args(s1_hi, s1_lo, s2_hi, s2_lo, cmin_hi, cmin_lo, cmax_hi, cmax_lo,
                                              CDT)
    density_bias = _scalar(bias_hi, bias_lo, CDT)
    eps = _scalar(eps_hi, eps_lo, CDT)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rays, BLOCK_R)
    cc, hh, jj, cmask, hmask, jmask = _ranges(C, HID, D, CP, HP, DP)
    col = (jj >= 1) & (jj <= D)
    b1v = tl.load(b1_ptr + hh, mask=hmask, other=0.0).to(CDT)
    b2v = tl.load(b2_ptr + jj, mask=jmask, other=0.0).to(CDT)
    if HOIST_W:
        w1 = _tile(w1_ptr, hh, cc, hmask, cmask, C, 1, CDT)  # [HP, CP]
        w2 = _tile(w2_ptr, jj, hh, jmask, hmask, HID, 1, CDT)  # [DP, HP]
        w1t = tl.trans(w1)
        w2t = tl.trans(w2)
    else:
        w1 = 0.0  # read inside the loop instead (_weights)
        w2 = 0.0
        w1t = 0.0
        w2t = 0.0
    acc_w1 = tl.zeros([HP, CP], CDT)
    acc_b1 = tl.zeros([HP], CDT)
    acc_w2 = tl.zeros([DP, HP], CDT)
    acc_b2 = tl.zeros([DP], CDT)
    for blk in range(pid, n_blocks, nprog):
        g = blk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = g < n_rays
        bidx = g // R
        ox, oy, oz, dx, dy, dz = _rays(ro_ptr, rd_ptr, g, rmask, CDT)
        cmask2 = rmask[:, None] & col[None, :]
        g_rgb = tl.load(grgb_ptr + g[:, None] * D + (jj[None, :] - 1), mask=cmask2, other=0.0).to(CDT)
        o_rgb = tl.load(orgb_ptr + g[:, None] * D + (jj[None, :] - 1), mask=cmask2, other=0.0).to(CDT)
        g_d = tl.load(gdep_ptr + g, mask=rmask, other=0.0).to(CDT)
        g_op = tl.load(gop_ptr + g, mask=rmask, other=0.0).to(CDT)
        o_d = tl.load(odep_ptr + g, mask=rmask, other=0.0).to(CDT)
        o_op = tl.load(oop_ptr + g, mask=rmask, other=0.0).to(CDT)
        E = o_op + eps
        sum_g = tl.sum(g_rgb, axis=1)
        # sum_j w_j dL/dw_j from the saved totals (module docstring)
        total = tl.sum(g_rgb * o_rgb, axis=1) + g_d * o_d * eps / E + g_op * o_op
        if WHITE_BG:
            g_op = g_op - sum_g
            total = total - sum_g
        if HAS_GW:
            total += tl.load(gsum_ptr + g, mask=rmask, other=0.0).to(CDT)
        if HAS_TARGET:
            tgt = tl.load(tgt_ptr + g, mask=rmask, other=0.0).to(CDT)
        t_prev = tl.load(dep_ptr + g * S, mask=rmask, other=0.0).to(CDT)
        sig_prev = tl.zeros([BLOCK_R], CDT)
        c_prev = tl.zeros([BLOCK_R, DP], CDT)
        f_prev = tl.zeros([BLOCK_R, CP], CDT)
        o_prev = tl.zeros([BLOCK_R, DP], CDT)
        dsm_left = tl.zeros([BLOCK_R], CDT)
        dcm_left = tl.zeros([BLOCK_R, DP], CDT)
        T = tl.full([BLOCK_R], 1.0, CDT)
        prefix = tl.zeros([BLOCK_R], CDT)
        # step s decodes sample s, differentiates interval (s-1, s), then back-propagates sample s-1,
        # whose two intervals are now known; step S only finishes sample S-1.
        for s in range(0, S + 1):
            sv = tl.full([BLOCK_R], s, tl.int32)  # vector form: scalar bools do not combine with masks
            live = (sv > 0) & (sv < S)
            t = tl.load(dep_ptr + g * S + s, mask=rmask & (sv < S), other=0.0).to(CDT)
            t = tl.where(sv < S, t, t_prev)
            ux, uy, uz = _point(ox, oy, oz, dx, dy, dz, t, scale)
            f = _feats(planes, hs, ws, bidx, ux, uy, uz, cc, cmask, rmask, C, N_LEVELS, CDT, PLANE_AXES, CL)
            pre, o, sig, c = _decode(f, _weights(w1t, w1_ptr, cc, hh, cmask, hmask, 1, C, CDT, HOIST_W), b1v,
                                     _weights(w2t, w2_ptr, hh, jj, hmask, jmask, 1, HID, CDT, HOIST_W), b2v, jj, D,
                                     DOT_PREC)
            alpha, e, keep, tm, delta, x = _interval(sig_prev, sig, t_prev, t, density_bias, True, False)
            om = tl.where(live, keep, 1.0)  # 1 on the dead interval before the first sample
            w = tl.where(live, alpha * T, 0.0)
            dldw = tl.sum(g_rgb * (0.5 * (c_prev + c)), axis=1) + g_d * (tm - o_d) / E + g_op
            if HAS_GW:
                dldw += tl.load(gw_ptr + g * (S - 1) + (s - 1), mask=rmask & live, other=0.0).to(CDT)
            prefix += w * dldw
            suffix = total - prefix  # sum_{j>i} w_j dL/dw_j
            dsm = (T * dldw * e - suffix * (e / om)) * delta * _softplus_grad(x)
            dsm = tl.where(live & rmask, dsm, 0.0)
            if HAS_TARGET:
                k = _depth_kernel(tgt, tm, s1, s2, c_min, c_max)
            else:
                k = tl.full([BLOCK_R], 1.0, CDT)
            dsm = dsm * k
            dcm = (k * w)[:, None] * g_rgb
            T = T * om
            prow = rmask & (sv > 0)
            df, acc_w1, acc_b1, acc_w2, acc_b2 = _sample_bwd(
                f_prev, o_prev, 0.5 * (dsm_left + dsm), 0.5 * (dcm_left + dcm), prow,
                _weights(w1, w1_ptr, hh, cc, hmask, cmask, C, 1, CDT, HOIST_W),
                _weights(w1t, w1_ptr, cc, hh, cmask, hmask, 1, C, CDT, HOIST_W), b1v,
                _weights(w2, w2_ptr, jj, hh, jmask, hmask, HID, 1, CDT, HOIST_W), jj, acc_w1, acc_b1, acc_w2, acc_b2,
                DOT_PREC)
            pux, puy, puz = _point(ox, oy, oz, dx, dy, dz, t_prev, scale)
            _scatter(gplanes, hs, ws, bidx, pux, puy, puz, df, cc, cmask, prow, C, N_LEVELS, PLANE_AXES, CL)
            t_prev = t
            sig_prev = sig
            c_prev = c
            f_prev = f
            o_prev = o
            dsm_left = dsm
            dcm_left = dcm
    pid64 = pid.to(tl.int64)
    tl.store(pw1_ptr + pid64 * HP * CP + hh[:, None] * CP + cc[None, :], acc_w1)
    tl.store(pb1_ptr + pid64 * HP + hh, acc_b1)
    tl.store(pw2_ptr + pid64 * DP * HP + jj[:, None] * HP + hh[None, :], acc_w2)
    tl.store(pb2_ptr + pid64 * DP + jj, acc_b2)


# ---------------------------------------------------------------------------------------------
# Host side: the functions named in g3dr_kernels/ops/render.py
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    """float64 inputs compute in float64; everything else (fp16/bf16/fp32) in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _tl_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _sizes(levels: Sequence[Tensor], depths: Tensor, w1: Tensor, w2: Tensor, *others: Optional[Tensor]
           ) -> Tuple[int, ...]:
    if len(levels) < 1:
        raise ValueError("render needs at least one plane level")
    if depths.dim() != 3 or depths.shape[2] < 2:
        raise ValueError(f"triton render: depths must be [B,R,S] with S >= 2, got {list(depths.shape)}")
    B, R, S = depths.shape
    l0 = levels[0]
    for i, lv in enumerate(levels):
        if lv.dim() != 5 or lv.shape[:3] != (B, 3, l0.shape[2]) or lv.shape[3] < 1 or lv.shape[4] < 1:
            raise ValueError(f"triton render: levels must be [B,3,C,H,W] with depths' B = {B} and one C; "
                             f"levels[{i}] is {list(lv.shape)}, levels[0] {list(l0.shape)}")
    C, HID, D = l0.shape[2], w1.shape[0], w2.shape[0] - 1
    rays_o, rays_d, b1, b2, *rest = others
    want = {"rays_o": (rays_o, (B, R, 3)), "rays_d": (rays_d, (B, R, 3)), "w1": (w1, (HID, C)),
            "b1": (b1, (HID,)), "w2": (w2, (D + 1, HID)), "b2": (b2, (D + 1,))}
    if rest and rest[0] is not None:
        want["target"] = (rest[0], (B, R))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"triton render: {name} must be {list(shape)} (B={B}, R={R}, C={C}, hidden={HID}, "
                             f"D={D}), got {list(t.shape)}")
        if t.device != depths.device:
            raise ValueError(f"triton render: {name} is on {t.device} but depths are on {depths.device}")
    if D < 1:
        raise ValueError(f"triton render: w2 must be [1+D,hidden] with D >= 1, got {list(w2.shape)}")
    CP, HP, DP = _pad(C), _pad(HID), _pad(D + 1)
    if max(CP, HP, DP) > MAX_PAD:
        raise ValueError(f"triton render supports C, hidden and 1+D up to {MAX_PAD}; got planes "
                         f"{list(levels[0].shape)}, w1 {list(w1.shape)}, w2 {list(w2.shape)}")
    for t in (*levels, depths, w1, w2, *others):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"triton render expects contiguous inputs, got one of shape {list(t.shape)}")
    return B, R, S, C, HID, D, CP, HP, DP


def _split(x: float, cdt: torch.dtype) -> Tuple[float, float]:
    """(hi, lo) float32 parts of x for _scalar: lo carries what float32 drops, for float64 runs."""
    hi = float(np.float32(x))
    return hi, (float(np.float32(float(x) - hi)) if cdt == torch.float64 else 0.0)


def _dot_precision(choice: str, cdt: torch.dtype) -> str:
    return "ieee" if cdt == torch.float64 else choice


def _kernel_planes(levels: Sequence[Tensor], cl: bool):
    """(planes tuple in the kernel's layout, heights, widths)."""
    hs = tuple(int(lv.shape[3]) for lv in levels)
    ws = tuple(int(lv.shape[4]) for lv in levels)
    planes = tuple(lv.permute(0, 1, 3, 4, 2).contiguous() for lv in levels) if cl else tuple(levels)
    return planes, hs, ws


def _channels_last(device: torch.device) -> bool:
    return device.type == "cuda" and CHANNELS_LAST_GPU


def _block_r(gpu_block: int, n: int, device: torch.device) -> int:
    if device.type == "cuda":
        return gpu_block
    return min(BLOCK_R_INTERPRET, max(16, triton.next_power_of_2(n)))


def _device_programs(device: torch.device, n_blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, BWD_PROGRAMS_PER_SM * sms))
    return max(1, n_blocks)  # interpreter: programs run one after another, the count only sets the partials


_NO_HOIST = set()  # (kernel, device, tile sizes, dtype) whose weight-hoisting launch ran out of resources


def _launch(kernel, grid, device: torch.device, sizes: dict, *args, **constexprs) -> None:
    """Launch with the decoder weights held for the whole kernel (HOIST_W) unless that is known not
    to fit; a launch that runs out of resources (shared memory) is retried reading them per step.
    Nothing has run when OutOfResources is raised (it comes from loading the binary), so the retry
    sees untouched buffers."""
    key = (kernel.fn.__name__, str(device), *sizes.values())
    kw = dict(constexprs, **sizes, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if HOIST_WEIGHTS and key not in _NO_HOIST:
        try:
            kernel[grid](*args, HOIST_W=True, **kw)
            return
        except OutOfResources:
            _NO_HOIST.add(key)
    kernel[grid](*args, HOIST_W=False, **kw)


def _launch_fwd(kplanes, cl, rays_o, rays_d, depths, w1, b1, w2, b2, sizes, cdt, p: RenderParams, outs, weights, gw,
                gsum):
    B, R, S, C, HID, D, CP, HP, DP = sizes
    n = B * R
    planes, hs, ws = kplanes
    rgb, dep, op = outs
    dummy = depths  # for pointers a variant does not touch
    block = _block_r(BLOCK_R_FWD, n, depths.device)
    _launch(_render_fwd_kernel, (triton.cdiv(n, block),), depths.device, dict(CP=CP, HP=HP, DP=DP, CDT=_tl_dtype(cdt)),
        planes, hs, ws, rays_o, rays_d, depths, w1, b1, w2, b2, dummy if gw is None else gw,
        dummy if rgb is None else rgb, dummy if dep is None else dep, dummy if op is None else op,
        dummy if weights is None else weights, dummy if gsum is None else gsum,
        n, R, S, C, HID, D, *_split(p.sample.scale, cdt), *_split(p.composite.density_bias, cdt),
        *_split(p.composite.eps, cdt),
        N_LEVELS=len(planes), PLANE_AXES=int(p.sample.plane_axes), CL=cl, WHITE_BG=bool(p.composite.white_bg),
        NEED_WEIGHTS=weights is not None, GW_DOT=gw is not None, STORE_OUT=rgb is not None,
        DOT_PREC=_dot_precision(DOT_PRECISION_FWD, cdt), BLOCK_R=block)


def render_fwd(levels: List[Tensor], rays_o: Tensor, rays_d: Tensor, depths: Tensor, w1: Tensor, b1: Tensor,
               w2: Tensor, b2: Tensor, target: Optional[Tensor], *options) -> Composite:
    """options: the RenderParams fields in order (g3dr_kernels/_params.py), then need_weights.
    -> Composite(rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] or an empty tensor).
    The forward ignores target and the kernel constants (they only scale gradients)."""
    p, (need_weights,) = RenderParams.split(options)
    sizes = _sizes(levels, depths, w1, w2, rays_o, rays_d, b1, b2, target)
    B, R, S, C, HID, D, *_ = sizes
    rgb = depths.new_empty(B, R, D)
    dep = depths.new_empty(B, R)
    op = depths.new_empty(B, R)
    weights = depths.new_empty(B, R, max(S - 1, 0)) if need_weights else depths.new_empty(0)
    if B * R == 0:
        return Composite(rgb, dep, op, weights)
    cl = _channels_last(depths.device)
    _launch_fwd(_kernel_planes(levels, cl), cl, rays_o, rays_d, depths, w1, b1, w2, b2, sizes,
                _compute_dtype(*levels, depths, w1), p, (rgb, dep, op), weights if need_weights else None, None, None)
    return Composite(rgb, dep, op, weights)


def render_bwd(grad_rgb: Tensor, grad_depth: Tensor, grad_opacity: Tensor, grad_weights: Optional[Tensor],
               levels: List[Tensor], rays_o: Tensor, rays_d: Tensor, depths: Tensor, w1: Tensor, b1: Tensor,
               w2: Tensor, b2: Tensor, target: Optional[Tensor], out_rgb: Tensor, out_depth: Tensor,
               out_opacity: Tensor, *params) -> List[Tensor]:
    """params: the RenderParams fields in order. -> [grad of each level..., grad_w1, grad_b1, grad_w2, grad_b2]."""
    p, _ = RenderParams.split(params)
    sizes = _sizes(levels, depths, w1, w2, rays_o, rays_d, b1, b2, target)
    B, R, S, C, HID, D, CP, HP, DP = sizes
    n = B * R
    dev = depths.device
    if n == 0 or S < 2:
        return [torch.zeros_like(t) for t in (*levels, w1, b1, w2, b2)]
    cdt = _compute_dtype(*levels, depths, w1)
    cl = _channels_last(dev)
    kplanes = _kernel_planes(levels, cl)
    gplanes = tuple(torch.zeros(kp.shape, dtype=cdt, device=dev) for kp in kplanes[0])  # atomics in float32/64
    # The weights' gradient couples every interval of a ray to all later ones through
    # sum_j w_j g_w_j; autograd hands zeros when the weights were not used, so check first.
    gw = gsum = None
    if grad_weights is not None and grad_weights.numel() > 0 and bool((grad_weights != 0).any()):
        gw = grad_weights.contiguous()
        gsum = torch.empty(B, R, dtype=cdt, device=dev)
        _launch_fwd(kplanes, cl, rays_o, rays_d, depths, w1, b1, w2, b2, sizes, cdt, p, (None, None, None), None, gw,
                    gsum)
    block = _block_r(BLOCK_R_BWD, n, dev)
    nprog = _device_programs(dev, triton.cdiv(n, block))
    pw1 = torch.empty(nprog, HP, CP, dtype=cdt, device=dev)
    pb1 = torch.empty(nprog, HP, dtype=cdt, device=dev)
    pw2 = torch.empty(nprog, DP, HP, dtype=cdt, device=dev)
    pb2 = torch.empty(nprog, DP, dtype=cdt, device=dev)
    planes, hs, ws = kplanes
    k, comp = p.composite.kernel, p.composite
    scalars = (p.sample.scale, k.s1, k.s2, k.c_min, k.c_max, comp.density_bias, comp.eps)  # the kernel's order
    _launch(_render_bwd_kernel, (nprog,), dev, dict(CP=CP, HP=HP, DP=DP, CDT=_tl_dtype(cdt)),
        planes, gplanes, hs, ws, rays_o, rays_d, depths, w1, b1, w2, b2,
        depths if target is None else target, depths if gw is None else gw, depths if gsum is None else gsum,
        grad_rgb.contiguous(), grad_depth.contiguous(), grad_opacity.contiguous(), out_rgb.contiguous(),
        out_depth.contiguous(), out_opacity.contiguous(), pw1, pb1, pw2, pb2,
        n, R, S, C, HID, D, *[v for x in scalars for v in _split(x, cdt)],
        N_LEVELS=len(planes), PLANE_AXES=int(p.sample.plane_axes), CL=cl, WHITE_BG=bool(comp.white_bg),
        HAS_TARGET=target is not None, HAS_GW=gw is not None, DOT_PREC=_dot_precision(DOT_PRECISION_BWD, cdt),
        BLOCK_R=block)
    if cl:
        gplanes = tuple(g.permute(0, 1, 4, 2, 3) for g in gplanes)
    out = [g.to(lv.dtype).contiguous() for g, lv in zip(gplanes, levels)]
    out += [pw1.sum(0)[:HID, :C], pb1.sum(0)[:HID], pw2.sum(0)[:D + 1, :HID], pb2.sum(0)[:D + 1]]
    return out[:len(levels)] + [g.to(t.dtype).contiguous() for g, t in zip(out[len(levels):], (w1, b1, w2, b2))]
