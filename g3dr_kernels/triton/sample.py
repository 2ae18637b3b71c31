"""Triton kernels for fused multi-resolution triplane sampling (backend "triton").

Contract (g3dr_kernels/ops/sample.py):
  sample_fwd(levels, xyz, scale, plane_axes) -> out [B,N,C]
  sample_bwd(grad_out, levels, xyz, scale, plane_axes, need_xyz_grad) -> [grad_level_0, ..., grad_xyz]

Formula (DESIGN.md; oracle `g3dr_kernels.reference.sample_pyramid`): with u = scale * xyz and plane p
reading coordinates (a, b) = PLANE_COORDS[plane_axes][p] of u,
    out[b,n,c] = 1/3 sum_p sum_l bilinear(level_l[b,p,c], u_a, u_b)
    bilinear(F, a, b) = sum_{i,j in {0,1}} wx_i wy_j F[y0+j, x0+i]   (zero where a corner is outside)
    ix = ((a + 1) W - 1) / 2, x0 = floor(ix), wx_1 = ix - x0, wx_0 = 1 - wx_1 (same for iy, H)
i.e. F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False).
Backward: grad_level_l[b,p,c,y,x] += w * grad_out[b,n,c] / 3 for every corner (atomics into a float32
buffer, cast to the plane dtype at the end); grad_xyz[b,n,k] = scale * sum over planes p that read
axis k, levels and channels of (d out / d ix) * W/2 (or d out / d iy * H/2), the bilinear derivative.

Layout: one program per (block of BLOCK_N points, batch element); each holds a [BLOCK_N, BLOCK_C]
tile (BLOCK_C = next power of two of C, masked) and loops over the 3 planes and the levels, which
are passed as up to LEVELS_PER_LAUNCH separate pointers; longer pyramids are split into several
launches whose results are summed. Accumulation is in float32 (float64 for float64 planes), offsets
in int64. fp16/bf16 planes may come with float32 points; the output has the plane dtype.
"""
from __future__ import annotations

import os
import struct
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .._types import PLANE_COORDS

LEVELS_PER_LAUNCH = 4  # level pointers one kernel launch takes; more levels -> several launches
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Under TRITON_INTERPRET=1 every program is a Python call, so fewer, larger tiles run faster.
_INTERPRET_TILE = 65536  # BLOCK_N * BLOCK_C (BLOCK_N at most 1024)
# GPU tiles above this many elements spill registers (the backward holds 5 such tiles).
_MAX_TILE = 8192


# ---------------------------------------------------------------------------------------------
# Per-plane math (shared by forward and backward)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _axis(ux, uy, uz, K: tl.constexpr):
    """Coordinate K (0 x, 1 y, 2 z) of u."""
    if K == 0:
        u = ux
    elif K == 1:
        u = uy
    else:
        u = uz
    return u


@triton.jit
def _add_axis(gx, gy, gz, d, K: tl.constexpr):
    """Add d to the gradient of coordinate K."""
    if K == 0:
        gx += d
    elif K == 1:
        gy += d
    else:
        gz += d
    return gx, gy, gz


@triton.jit
def _bilinear(a, b, H, W, nmask):
    """Corner offsets (int64, within one H x W plane), weights and in-bounds masks for plane
    coordinates a (width) and b (height) in [-1, 1], align_corners=False."""
    ix = ((a + 1.0) * W - 1.0) * 0.5
    iy = ((b + 1.0) * H - 1.0) * 0.5
    # Clamp so the integer conversion cannot overflow: a coordinate clamped to -2 or W+1 has both
    # of its corners outside, as it had before, so values and gradients do not change.
    ix = tl.minimum(tl.maximum(ix, -2.0), W + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), H + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    wx1 = ix - x0f
    wy1 = iy - y0f
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    x1 = x0 + 1
    y1 = y0 + 1
    mx0 = (x0 >= 0) & (x0 < W)
    mx1 = (x1 >= 0) & (x1 < W)
    my0 = (y0 >= 0) & (y0 < H) & nmask
    my1 = (y1 >= 0) & (y1 < H) & nmask
    r0 = y0 * W
    r1 = y1 * W
    return (r0 + x0, r0 + x1, r1 + x0, r1 + x1, wx0, wx1, wy0, wy1,
            mx0 & my0, mx1 & my0, mx0 & my1, mx1 & my1)


@triton.jit
def _fwd_plane(acc, base, chan, cmask, a, b, H, W, nmask, ACC: tl.constexpr):
    """acc [BLOCK_N, BLOCK_C] += bilinear samples of the plane at `base` (chan: channel offsets)."""
    o00, o10, o01, o11, wx0, wx1, wy0, wy1, m00, m10, m01, m11 = _bilinear(a, b, H, W, nmask)
    ptr = base + chan[None, :]
    cm = cmask[None, :]
    v00 = tl.load(ptr + o00[:, None], mask=m00[:, None] & cm, other=0.0).to(ACC)
    v10 = tl.load(ptr + o10[:, None], mask=m10[:, None] & cm, other=0.0).to(ACC)
    v01 = tl.load(ptr + o01[:, None], mask=m01[:, None] & cm, other=0.0).to(ACC)
    v11 = tl.load(ptr + o11[:, None], mask=m11[:, None] & cm, other=0.0).to(ACC)
    acc += (v00 * wx0[:, None] + v10 * wx1[:, None]) * wy0[:, None]
    acc += (v01 * wx0[:, None] + v11 * wx1[:, None]) * wy1[:, None]
    return acc


@triton.jit
def _fwd_level(acc, L, H, W, pid_b, C, ux, uy, uz, cidx, cmask, nmask,
               PA0: tl.constexpr, PB0: tl.constexpr, PA1: tl.constexpr, PB1: tl.constexpr,
               PA2: tl.constexpr, PB2: tl.constexpr, ACC: tl.constexpr):
    HW = H * W
    plane = C * HW.to(tl.int64)
    base = L + pid_b.to(tl.int64) * 3 * plane
    chan = cidx.to(tl.int64) * HW
    acc = _fwd_plane(acc, base, chan, cmask, _axis(ux, uy, uz, PA0), _axis(ux, uy, uz, PB0), H, W, nmask, ACC)
    acc = _fwd_plane(acc, base + plane, chan, cmask, _axis(ux, uy, uz, PA1), _axis(ux, uy, uz, PB1), H, W, nmask,
                     ACC)
    acc = _fwd_plane(acc, base + 2 * plane, chan, cmask, _axis(ux, uy, uz, PA2), _axis(ux, uy, uz, PB2), H, W,
                     nmask, ACC)
    return acc


@triton.jit
def _bwd_plane(g, base, gbase, chan, cmask, a, b, H, W, nmask, NEED_XYZ: tl.constexpr, ACC: tl.constexpr):
    """Scatter g * corner weight into the plane gradient at `gbase`; return d(sum g*out)/d(a, b)
    for this plane ([BLOCK_N] each, zeros without NEED_XYZ)."""
    o00, o10, o01, o11, wx0, wx1, wy0, wy1, m00, m10, m01, m11 = _bilinear(a, b, H, W, nmask)
    gptr = gbase + chan[None, :]
    cm = cmask[None, :]
    tl.atomic_add(gptr + o00[:, None], g * (wx0 * wy0)[:, None], mask=m00[:, None] & cm, sem="relaxed")
    tl.atomic_add(gptr + o10[:, None], g * (wx1 * wy0)[:, None], mask=m10[:, None] & cm, sem="relaxed")
    tl.atomic_add(gptr + o01[:, None], g * (wx0 * wy1)[:, None], mask=m01[:, None] & cm, sem="relaxed")
    tl.atomic_add(gptr + o11[:, None], g * (wx1 * wy1)[:, None], mask=m11[:, None] & cm, sem="relaxed")
    if NEED_XYZ:
        ptr = base + chan[None, :]
        v00 = tl.load(ptr + o00[:, None], mask=m00[:, None] & cm, other=0.0).to(ACC)
        v10 = tl.load(ptr + o10[:, None], mask=m10[:, None] & cm, other=0.0).to(ACC)
        v01 = tl.load(ptr + o01[:, None], mask=m01[:, None] & cm, other=0.0).to(ACC)
        v11 = tl.load(ptr + o11[:, None], mask=m11[:, None] & cm, other=0.0).to(ACC)
        # d bilinear / d ix and / d iy, then d ix / d a = W/2, d iy / d b = H/2.
        dx = (v10 - v00) * wy0[:, None] + (v11 - v01) * wy1[:, None]
        dy = (v01 - v00) * wx0[:, None] + (v11 - v10) * wx1[:, None]
        da = tl.sum(g * dx, axis=1) * (W * 0.5)
        db = tl.sum(g * dy, axis=1) * (H * 0.5)
    else:
        da = tl.zeros_like(wx0)
        db = tl.zeros_like(wx0)
    return da, db


@triton.jit
def _bwd_level(g, gx, gy, gz, L, G, H, W, pid_b, C, ux, uy, uz, cidx, cmask, nmask,
               PA0: tl.constexpr, PB0: tl.constexpr, PA1: tl.constexpr, PB1: tl.constexpr,
               PA2: tl.constexpr, PB2: tl.constexpr, NEED_XYZ: tl.constexpr, ACC: tl.constexpr):
    HW = H * W
    plane = C * HW.to(tl.int64)
    off = pid_b.to(tl.int64) * 3 * plane
    chan = cidx.to(tl.int64) * HW
    da, db = _bwd_plane(g, L + off, G + off, chan, cmask, _axis(ux, uy, uz, PA0), _axis(ux, uy, uz, PB0), H, W,
                        nmask, NEED_XYZ, ACC)
    gx, gy, gz = _add_axis(gx, gy, gz, da, PA0)
    gx, gy, gz = _add_axis(gx, gy, gz, db, PB0)
    off += plane
    da, db = _bwd_plane(g, L + off, G + off, chan, cmask, _axis(ux, uy, uz, PA1), _axis(ux, uy, uz, PB1), H, W,
                        nmask, NEED_XYZ, ACC)
    gx, gy, gz = _add_axis(gx, gy, gz, da, PA1)
    gx, gy, gz = _add_axis(gx, gy, gz, db, PB1)
    off += plane
    da, db = _bwd_plane(g, L + off, G + off, chan, cmask, _axis(ux, uy, uz, PA2), _axis(ux, uy, uz, PB2), H, W,
                        nmask, NEED_XYZ, ACC)
    gx, gy, gz = _add_axis(gx, gy, gz, da, PA2)
    gx, gy, gz = _add_axis(gx, gy, gz, db, PB2)
    return gx, gy, gz


@triton.jit
def _load_points(xyz_ptr, pid_b, n, nmask, N, scale_hi, scale_lo, ACC: tl.constexpr):
    """u = scale * xyz for BLOCK_N points; scale = scale_hi + scale_lo (scale_lo != 0 only for
    float64, where one float32 scalar would lose precision)."""
    p = xyz_ptr + (pid_b.to(tl.int64) * N + n) * 3
    ux = tl.load(p, mask=nmask, other=0.0).to(ACC)
    uy = tl.load(p + 1, mask=nmask, other=0.0).to(ACC)
    uz = tl.load(p + 2, mask=nmask, other=0.0).to(ACC)
    return ux * scale_hi + ux * scale_lo, uy * scale_hi + uy * scale_lo, uz * scale_hi + uz * scale_lo


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sample_fwd_kernel(xyz_ptr, out_ptr, L0, L1, L2, L3, H0, W0, H1, W1, H2, W2, H3, W3, N, C, scale_hi, scale_lo,
                       NUM_LEVELS: tl.constexpr, PA0: tl.constexpr, PB0: tl.constexpr, PA1: tl.constexpr,
                       PB1: tl.constexpr, PA2: tl.constexpr, PB2: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, n, :] = 1/3 sum_planes sum_levels bilinear(level[b, plane], u_a, u_b), NUM_LEVELS <= 4."""
    pid_b = tl.program_id(1)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    cidx = tl.arange(0, BLOCK_C)
    cmask = cidx < C
    ux, uy, uz = _load_points(xyz_ptr, pid_b, n, nmask, N, scale_hi, scale_lo, ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    acc = _fwd_level(acc, L0, H0, W0, pid_b, C, ux, uy, uz, cidx, cmask, nmask, PA0, PB0, PA1, PB1, PA2, PB2, ACC)
    if NUM_LEVELS > 1:
        acc = _fwd_level(acc, L1, H1, W1, pid_b, C, ux, uy, uz, cidx, cmask, nmask, PA0, PB0, PA1, PB1, PA2, PB2,
                         ACC)
    if NUM_LEVELS > 2:
        acc = _fwd_level(acc, L2, H2, W2, pid_b, C, ux, uy, uz, cidx, cmask, nmask, PA0, PB0, PA1, PB1, PA2, PB2,
                         ACC)
    if NUM_LEVELS > 3:
        acc = _fwd_level(acc, L3, H3, W3, pid_b, C, ux, uy, uz, cidx, cmask, nmask, PA0, PB0, PA1, PB1, PA2, PB2,
                         ACC)
    # u * 0 is NaN exactly when a coordinate is not finite: such points give NaN, as in the reference
    acc = acc * (1.0 / 3.0) + (ux * 0.0 + uy * 0.0 + uz * 0.0)[:, None]
    optr = out_ptr + (pid_b.to(tl.int64) * N + n[:, None]) * C + cidx[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])


@triton.jit
def _sample_bwd_kernel(grad_ptr, xyz_ptr, gxyz_ptr, L0, L1, L2, L3, G0, G1, G2, G3, H0, W0, H1, W1, H2, W2, H3, W3,
                       N, C, scale_hi, scale_lo, NUM_LEVELS: tl.constexpr, PA0: tl.constexpr, PB0: tl.constexpr,
                       PA1: tl.constexpr, PB1: tl.constexpr, PA2: tl.constexpr, PB2: tl.constexpr,
                       NEED_XYZ: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """G_l[b, plane, :, y, x] += w * grad[b, n, :] / 3 (atomics); gxyz[b, n, :] = d(sum grad*out)/d xyz."""
    pid_b = tl.program_id(1)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    cidx = tl.arange(0, BLOCK_C)
    cmask = cidx < C
    ux, uy, uz = _load_points(xyz_ptr, pid_b, n, nmask, N, scale_hi, scale_lo, ACC)
    gptr = grad_ptr + (pid_b.to(tl.int64) * N + n[:, None]) * C + cidx[None, :]
    g = tl.load(gptr, mask=nmask[:, None] & cmask[None, :], other=0.0).to(ACC) * (1.0 / 3.0)
    gx = tl.zeros_like(ux)
    gy = tl.zeros_like(ux)
    gz = tl.zeros_like(ux)
    gx, gy, gz = _bwd_level(g, gx, gy, gz, L0, G0, H0, W0, pid_b, C, ux, uy, uz, cidx, cmask, nmask,
                            PA0, PB0, PA1, PB1, PA2, PB2, NEED_XYZ, ACC)
    if NUM_LEVELS > 1:
        gx, gy, gz = _bwd_level(g, gx, gy, gz, L1, G1, H1, W1, pid_b, C, ux, uy, uz, cidx, cmask, nmask,
                                PA0, PB0, PA1, PB1, PA2, PB2, NEED_XYZ, ACC)
    if NUM_LEVELS > 2:
        gx, gy, gz = _bwd_level(g, gx, gy, gz, L2, G2, H2, W2, pid_b, C, ux, uy, uz, cidx, cmask, nmask,
                                PA0, PB0, PA1, PB1, PA2, PB2, NEED_XYZ, ACC)
    if NUM_LEVELS > 3:
        gx, gy, gz = _bwd_level(g, gx, gy, gz, L3, G3, H3, W3, pid_b, C, ux, uy, uz, cidx, cmask, nmask,
                                PA0, PB0, PA1, PB1, PA2, PB2, NEED_XYZ, ACC)
    if NEED_XYZ:
        scale = scale_hi + scale_lo
        nonfinite = ux * 0.0 + uy * 0.0 + uz * 0.0  # NaN for points that are not finite, else 0
        gx += nonfinite
        gy += nonfinite
        gz += nonfinite
        p = gxyz_ptr + (pid_b.to(tl.int64) * N + n) * 3
        ety = gxyz_ptr.dtype.element_ty
        tl.store(p, (gx * scale).to(ety), mask=nmask)
        tl.store(p + 1, (gy * scale).to(ety), mask=nmask)
        tl.store(p + 2, (gz * scale).to(ety), mask=nmask)


# ---------------------------------------------------------------------------------------------
# Launch configuration: autotuned on a GPU (keyed on C and the level count), fixed when interpreting
# ---------------------------------------------------------------------------------------------


def _prune(configs, named_args, **kwargs):
    """Drop tiles that would spill registers; always keep the smallest."""
    block_c = kwargs["BLOCK_C"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * block_c <= _MAX_TILE]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=nw) for bn, nw in
            ((16, 2), (32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (256, 8))]
_sample_fwd_tuned = triton.autotune(_CONFIGS, key=["C", "NUM_LEVELS"], prune_configs_by={"early_config_prune": _prune})(
    _sample_fwd_kernel)
# Every trial launch adds into the plane gradients again, so they are zeroed before each one.
_sample_bwd_tuned = triton.autotune(_CONFIGS, key=["C", "NUM_LEVELS", "NEED_XYZ"],
                                    prune_configs_by={"early_config_prune": _prune},
                                    reset_to_zero=["G0", "G1", "G2", "G3"])(_sample_bwd_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(tuned, raw, B: int, N: int, C: int, args, **meta):
    block_c = triton.next_power_of_2(C)
    if _interpreting():
        block_n = max(16, min(1024, _INTERPRET_TILE // block_c))
        block_n = min(block_n, max(16, triton.next_power_of_2(N)))
        raw[(triton.cdiv(N, block_n), B)](*args, BLOCK_N=block_n, BLOCK_C=block_c, **meta)
    else:
        tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B)](*args, BLOCK_C=block_c, **meta)


# ---------------------------------------------------------------------------------------------
# Python entry points (the kernel contract)
# ---------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "[" + "x".join(str(s) for s in t.shape) + "]"


def _check(levels: Sequence[torch.Tensor], xyz: torch.Tensor, plane_axes: int) -> None:
    if plane_axes not in PLANE_COORDS:
        raise ValueError(f"plane_axes must be one of {tuple(PLANE_COORDS)}, got {plane_axes!r}")
    if len(levels) == 0:
        raise ValueError("sample_fwd needs at least one level")
    first = levels[0]
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"xyz must be [B,N,3], got {_shape(xyz)}")
    for i, lv in enumerate(levels):
        if lv.dim() != 5 or lv.shape[1] != 3 or lv.shape[:3] != first.shape[:3] or lv.shape[0] != xyz.shape[0]:
            raise ValueError(f"levels must be [B,3,C,H_l,W_l] with xyz [B,N,3]; got levels "
                             f"{[_shape(q) for q in levels]}, xyz {_shape(xyz)}")
        if lv.dtype != first.dtype or lv.device != xyz.device:
            raise ValueError(f"level {i} is {lv.dtype} on {lv.device}; level 0 is {first.dtype}, xyz on {xyz.device}")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton sample: planes must be one of {SUPPORTED_DTYPES}, got {first.dtype}")
    half = (torch.float16, torch.bfloat16)
    if xyz.dtype != first.dtype and not (first.dtype in half and xyz.dtype == torch.float32):
        raise TypeError(f"xyz has dtype {xyz.dtype} but planes have {first.dtype}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale_args(scale: float, acc: torch.dtype):
    """float32 scalar arguments (hi, lo) with hi + lo == scale to ~48 bits for float64, lo = 0 otherwise."""
    hi = struct.unpack("f", struct.pack("f", float(scale)))[0]
    return hi, (float(scale) - hi if acc == torch.float64 else 0.0)


def _meta(plane_axes: int, n_levels: int, acc: torch.dtype) -> dict:
    (pa0, pb0), (pa1, pb1), (pa2, pb2) = PLANE_COORDS[plane_axes]
    return dict(NUM_LEVELS=n_levels, PA0=pa0, PB0=pb0, PA1=pa1, PB1=pb1, PA2=pa2, PB2=pb2,
                ACC=tl.float64 if acc == torch.float64 else tl.float32)


def _level_args(chunk: Sequence[torch.Tensor]):
    """LEVELS_PER_LAUNCH pointers and (H, W) pairs; unused slots repeat level 0 (never read)."""
    ptrs = list(chunk) + [chunk[0]] * (LEVELS_PER_LAUNCH - len(chunk))
    sizes = []
    for i in range(LEVELS_PER_LAUNCH):
        sizes += list(chunk[i].shape[-2:]) if i < len(chunk) else [1, 1]
    return ptrs, sizes


def _chunks(items: Sequence, k: int = LEVELS_PER_LAUNCH) -> List[list]:
    return [list(items[i:i + k]) for i in range(0, len(items), k)]


def sample_fwd(levels: Sequence[torch.Tensor], xyz: torch.Tensor, scale: float, plane_axes: int) -> torch.Tensor:
    """levels: finest-first [B,3,C,H_l,W_l]; xyz [B,N,3]; scale = 2/box_warp -> [B,N,C] in the plane dtype."""
    levels = [lv.contiguous() for lv in levels]
    xyz = xyz.contiguous()
    _check(levels, xyz, plane_axes)
    B, N = xyz.shape[:2]
    C = levels[0].shape[2]
    dtype = levels[0].dtype
    acc = _acc_dtype(dtype)
    out = torch.empty(B, N, C, dtype=dtype, device=xyz.device)
    if out.numel() == 0:
        return out
    hi, lo = _scale_args(scale, acc)
    chunks = _chunks(levels)
    total = None
    for chunk in chunks:
        # one launch writes the plane dtype directly; several sum their partial results in `acc`
        dst = out if len(chunks) == 1 else torch.empty(B, N, C, dtype=acc, device=xyz.device)
        ptrs, sizes = _level_args(chunk)
        _launch(_sample_fwd_tuned, _sample_fwd_kernel, B, N, C, (xyz, dst, *ptrs, *sizes, N, C, hi, lo),
                **_meta(plane_axes, len(chunk), acc))
        if len(chunks) > 1:
            total = dst if total is None else total.add_(dst)
    if total is not None:
        out.copy_(total)
    return out


def sample_bwd(grad_out: torch.Tensor, levels: Sequence[torch.Tensor], xyz: torch.Tensor, scale: float,
               plane_axes: int, need_xyz_grad: bool) -> List[torch.Tensor]:
    """grad_out [B,N,C] -> [grad of each level (its shape and dtype), grad_xyz [B,N,3] (empty without
    need_xyz_grad)]."""
    levels = [lv.contiguous() for lv in levels]
    xyz = xyz.contiguous()
    grad_out = grad_out.contiguous()
    _check(levels, xyz, plane_axes)
    B, N = xyz.shape[:2]
    C = levels[0].shape[2]
    if grad_out.shape != (B, N, C):
        raise ValueError(f"grad_out must be [B,N,C] = [{B}x{N}x{C}], got {_shape(grad_out)}")
    dtype = levels[0].dtype
    acc = _acc_dtype(dtype)
    # atomics need the accumulation dtype; for float32/float64 planes that is the result itself
    gbufs = [torch.zeros(lv.shape, dtype=acc, device=lv.device) for lv in levels]
    gxyz = torch.zeros(B, N, 3, dtype=xyz.dtype, device=xyz.device) if need_xyz_grad else xyz.new_empty(0)
    if grad_out.numel() > 0:
        hi, lo = _scale_args(scale, acc)
        chunks = list(zip(_chunks(levels), _chunks(gbufs)))
        total = None
        for chunk, gchunk in chunks:
            # one launch writes grad_xyz directly; several sum their partial gradients in `acc`
            dst = gxyz if len(chunks) == 1 or not need_xyz_grad else torch.empty(B, N, 3, dtype=acc, device=xyz.device)
            ptrs, sizes = _level_args(chunk)
            gptrs, _ = _level_args(gchunk)
            # without need_xyz_grad the kernel never touches gxyz_ptr; xyz stands in for the empty tensor
            _launch(_sample_bwd_tuned, _sample_bwd_kernel, B, N, C,
                    (grad_out, xyz, dst if need_xyz_grad else xyz, *ptrs, *gptrs, *sizes, N, C, hi, lo),
                    NEED_XYZ=bool(need_xyz_grad), **_meta(plane_axes, len(chunk), acc))
            if need_xyz_grad and len(chunks) > 1:
                total = dst if total is None else total.add_(dst)
        if total is not None:
            gxyz.copy_(total)
    grads = [g if g.dtype == dtype else g.to(dtype) for g in gbufs]
    return grads + [gxyz]
