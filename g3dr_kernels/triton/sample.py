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

Layout: one program per (block of BLOCK_N points, block of BLOCK_C channels, batch element), holding
a [BLOCK_C, BLOCK_N] tile (channels masked past C). Points are the tile's last (fastest) dimension, so
threads spread over points and each keeps its points' weights and corner offsets once, with the
channels in registers (the channels of a corner are H*W apart in memory: nothing to coalesce there).
Each program runs one loop over the 3 * levels (level, plane) pairs -- a loop, not unrolled code, so
registers and compile time stay those of one bilinear gather whatever the pyramid. Levels are passed
as up to LEVELS_PER_LAUNCH separate pointers, picked in the loop; longer pyramids are split into
several launches whose results are summed. Channel blocks of one point add their xyz gradients
atomically.

Precision: accumulation in float32 (float64 for float64 planes, so gradcheck works under the
interpreter), offsets in int64. fp16/bf16 planes may come with float32 (or same-dtype) points; the
output has the plane dtype. Points with a non-finite coordinate give NaN features and xyz
gradients, as the reference does, and add nothing to the plane gradients.
"""
from __future__ import annotations

import struct
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._params import SampleParams
from .._types import PLANE_COORDS
from ._common import _axis, _bilinear, _nonfinite, _pick

LEVELS_PER_LAUNCH = 4  # level pointers one kernel launch takes; more levels -> several launches
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Under TRITON_INTERPRET=1 every program is a Python call, so fewer, larger tiles run faster; the
# channel block stays below 64 so that C = 64 still runs (and tests) more than one channel block.
_INTERPRET_TILE = 65536  # BLOCK_N * BLOCK_C (BLOCK_N at most 1024)
_INTERPRET_BLOCK_C = 32
# GPU: tile elements per thread. A gather keeps a 64-bit address and a value per element for each
# of 4 corners, so more than this spills registers.
_MAX_ELEMS_PER_THREAD = 16


# ---------------------------------------------------------------------------------------------
# Per-plane math (shared by forward and backward)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bilinear_offsets(a, b, H, W, nmask):
    """Corner offsets (int64, within one H x W plane) in the order (x0,y0), (x1,y0), (x0,y1), (x1,y1),
    weights wx0, wx1, wy0, wy1 and the corners' masks (in bounds and a live point) for plane
    coordinates a (width) and b (height) in [-1, 1], align_corners=False (taps: _common._bilinear)."""
    x0, y0, x1, y1, wx0, wy0, wx1, wy1, vx0, vy0, vx1, vy1 = _bilinear(a, b, H, W, tl.int64)
    my0 = vy0 & nmask
    my1 = vy1 & nmask
    r0 = y0 * W
    r1 = y1 * W
    return (r0 + x0, r0 + x1, r1 + x0, r1 + x1, wx0, wx1, wy0, wy1,
            vx0 & my0, vx1 & my0, vx0 & my1, vx1 & my1)


@triton.jit
def _plane_offsets(pid_b, p, C, cidx, H, W):
    """Element offset of plane p of batch element pid_b in a [B,3,C,H,W] level, and the offsets of
    channels cidx within it, all int64: H * W alone passes 2^31 for planes of 2^31 texels or more
    (the int32 sizes are widened before any product)."""
    HW = H.to(tl.int64) * W.to(tl.int64)
    return (pid_b.to(tl.int64) * 3 + p) * C * HW, cidx.to(tl.int64) * HW


@triton.jit
def _step(i, pid_b, C, cidx, ux, uy, uz, L0, L1, L2, L3, H0, W0, H1, W1, H2, W2, H3, W3,
          PA0: tl.constexpr, PB0: tl.constexpr, PA1: tl.constexpr, PB1: tl.constexpr, PA2: tl.constexpr,
          PB2: tl.constexpr):
    """Loop step i -> level l = i // 3, plane p = i % 3: the plane's element offset in level l
    (int64), the [BLOCK_C] channel offsets, its size, the axes it reads (ka, kb) and the point
    coordinates on it (a, b)."""
    lvl = i // 3
    p = i - 3 * lvl
    H = _pick(lvl, H0, H1, H2, H3)
    W = _pick(lvl, W0, W1, W2, W3)
    off, chan = _plane_offsets(pid_b, p, C, cidx, H, W)
    ka = _pick(p, PA0, PA1, PA2, PA2)
    kb = _pick(p, PB0, PB1, PB2, PB2)
    return lvl, off, chan, H, W, ka, kb, _axis(ux, uy, uz, ka), _axis(ux, uy, uz, kb)


@triton.jit
def _program_tile(xyz_ptr, N, C, scale_hi, scale_lo, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """This program's tile: batch element pid_b, points n [BLOCK_N] (int64) and their mask, channels
    cidx [BLOCK_C] and their [BLOCK_C, 1] mask, and u = scale * xyz of its points (ux, uy, uz);
    scale = scale_hi + scale_lo (scale_lo != 0 only for float64, where one float32 scalar would lose
    precision)."""
    pid_b = tl.program_id(2)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    cidx = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = xyz_ptr + (pid_b.to(tl.int64) * N + n) * 3
    ux = tl.load(p, mask=nmask, other=0.0).to(ACC)
    uy = tl.load(p + 1, mask=nmask, other=0.0).to(ACC)
    uz = tl.load(p + 2, mask=nmask, other=0.0).to(ACC)
    return (pid_b, n, nmask, cidx, (cidx < C)[:, None],
            ux * scale_hi + ux * scale_lo, uy * scale_hi + uy * scale_lo, uz * scale_hi + uz * scale_lo)


@triton.jit
def _corners(ptr, o00, o10, o01, o11, m00, m10, m01, m11, cm, ACC: tl.constexpr):
    """The 4 corner values [BLOCK_C, BLOCK_N] at offsets o.. from ptr (channel offsets already in ptr),
    zero where a corner's mask is off, in the accumulation dtype."""
    return (tl.load(ptr + o00[None, :], mask=m00[None, :] & cm, other=0.0).to(ACC),
            tl.load(ptr + o10[None, :], mask=m10[None, :] & cm, other=0.0).to(ACC),
            tl.load(ptr + o01[None, :], mask=m01[None, :] & cm, other=0.0).to(ACC),
            tl.load(ptr + o11[None, :], mask=m11[None, :] & cm, other=0.0).to(ACC))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sample_fwd_kernel(xyz_ptr, out_ptr, L0, L1, L2, L3, H0, W0, H1, W1, H2, W2, H3, W3, n_levels, N, C, scale_hi,
                       scale_lo, PA0: tl.constexpr, PB0: tl.constexpr, PA1: tl.constexpr, PB1: tl.constexpr,
                       PA2: tl.constexpr, PB2: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """out[b, n, c] = 1/3 sum_planes sum_levels bilinear(level[b, plane, c], u_a, u_b), n_levels <= 4."""
    pid_b, n, nmask, cidx, cm, ux, uy, uz = _program_tile(xyz_ptr, N, C, scale_hi, scale_lo, ACC, BLOCK_N,
                                                          BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=ACC)
    for i in tl.range(0, 3 * n_levels):
        lvl, off, chan, H, W, ka, kb, a, b = _step(i, pid_b, C, cidx, ux, uy, uz, L0, L1, L2, L3, H0, W0, H1, W1,
                                                   H2, W2, H3, W3, PA0, PB0, PA1, PB1, PA2, PB2)
        o00, o10, o01, o11, wx0, wx1, wy0, wy1, m00, m10, m01, m11 = _bilinear_offsets(a, b, H, W, nmask)
        ptr = _pick(lvl, L0, L1, L2, L3) + off + chan[:, None]
        v00, v10, v01, v11 = _corners(ptr, o00, o10, o01, o11, m00, m10, m01, m11, cm, ACC)
        acc += (v00 * wx0[None, :] + v10 * wx1[None, :]) * wy0[None, :]
        acc += (v01 * wx0[None, :] + v11 * wx1[None, :]) * wy1[None, :]
    # points with a coordinate that is not finite give NaN, as in the reference
    acc = acc * (1.0 / 3.0) + _nonfinite(ux, uy, uz)[None, :]
    optr = out_ptr + (pid_b.to(tl.int64) * N + n[None, :]) * C + cidx[:, None]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=nmask[None, :] & cm)


@triton.jit
def _sample_bwd_kernel(grad_ptr, xyz_ptr, gxyz_ptr, L0, L1, L2, L3, G0, G1, G2, G3, H0, W0, H1, W1, H2, W2, H3, W3,
                       n_levels, N, C, scale_hi, scale_lo, PA0: tl.constexpr, PB0: tl.constexpr, PA1: tl.constexpr,
                       PB1: tl.constexpr, PA2: tl.constexpr, PB2: tl.constexpr, NEED_XYZ: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """G_l[b, plane, c, y, x] += w * grad[b, n, c] / 3 over the 4 corners (atomics);
    gxyz[b, n, :] += d(sum_c grad * out) / d xyz over this block's channels (atomics, NEED_XYZ)."""
    pid_b, n, nmask, cidx, cm, ux, uy, uz = _program_tile(xyz_ptr, N, C, scale_hi, scale_lo, ACC, BLOCK_N,
                                                          BLOCK_C)
    gptr = grad_ptr + (pid_b.to(tl.int64) * N + n[None, :]) * C + cidx[:, None]
    g = tl.load(gptr, mask=nmask[None, :] & cm, other=0.0).to(ACC) * (1.0 / 3.0)
    gx = tl.zeros_like(ux)
    gy = tl.zeros_like(ux)
    gz = tl.zeros_like(ux)
    for i in tl.range(0, 3 * n_levels):
        lvl, off, chan, H, W, ka, kb, a, b = _step(i, pid_b, C, cidx, ux, uy, uz, L0, L1, L2, L3, H0, W0, H1, W1,
                                                   H2, W2, H3, W3, PA0, PB0, PA1, PB1, PA2, PB2)
        o00, o10, o01, o11, wx0, wx1, wy0, wy1, m00, m10, m01, m11 = _bilinear_offsets(a, b, H, W, nmask)
        gp = _pick(lvl, G0, G1, G2, G3) + off + chan[:, None]
        tl.atomic_add(gp + o00[None, :], g * (wx0 * wy0)[None, :], mask=m00[None, :] & cm, sem="relaxed")
        tl.atomic_add(gp + o10[None, :], g * (wx1 * wy0)[None, :], mask=m10[None, :] & cm, sem="relaxed")
        tl.atomic_add(gp + o01[None, :], g * (wx0 * wy1)[None, :], mask=m01[None, :] & cm, sem="relaxed")
        tl.atomic_add(gp + o11[None, :], g * (wx1 * wy1)[None, :], mask=m11[None, :] & cm, sem="relaxed")
        if NEED_XYZ:
            ptr = _pick(lvl, L0, L1, L2, L3) + off + chan[:, None]
            v00, v10, v01, v11 = _corners(ptr, o00, o10, o01, o11, m00, m10, m01, m11, cm, ACC)
            # d bilinear / d ix and / d iy, times d ix / d a = W/2 and d iy / d b = H/2
            dx = (v10 - v00) * wy0[None, :] + (v11 - v01) * wy1[None, :]
            dy = (v01 - v00) * wx0[None, :] + (v11 - v10) * wx1[None, :]
            da = tl.sum(g * dx, axis=0) * (W * 0.5)
            db = tl.sum(g * dy, axis=0) * (H * 0.5)
            gx += tl.where(ka == 0, da, 0.0) + tl.where(kb == 0, db, 0.0)
            gy += tl.where(ka == 1, da, 0.0) + tl.where(kb == 1, db, 0.0)
            gz += tl.where(ka == 2, da, 0.0) + tl.where(kb == 2, db, 0.0)
    if NEED_XYZ:
        # times scale as hi + lo term by term: the float32 scalars' sum would round lo away again,
        # leaving float64 runs with a float32 scale (relative error ~3e-8 for box_warp = 3)
        nonfinite = _nonfinite(ux, uy, uz)
        p = gxyz_ptr + (pid_b.to(tl.int64) * N + n) * 3
        tl.atomic_add(p, gx * scale_hi + gx * scale_lo + nonfinite, mask=nmask, sem="relaxed")
        tl.atomic_add(p + 1, gy * scale_hi + gy * scale_lo + nonfinite, mask=nmask, sem="relaxed")
        tl.atomic_add(p + 2, gz * scale_hi + gz * scale_lo + nonfinite, mask=nmask, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launch configuration: autotuned on a GPU (keyed on C and the level count), fixed when interpreting
# ---------------------------------------------------------------------------------------------

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_C": bc}, num_warps=nw) for bn, bc, nw in
            ((32, 16, 2), (64, 16, 4), (128, 16, 4), (128, 8, 4), (256, 8, 8), (64, 32, 4), (128, 32, 8))]


def _prune(configs, named_args, **kwargs):
    """Fit BLOCK_C to C (no block wider than next_pow2(C)), drop tiles with more than
    _MAX_ELEMS_PER_THREAD elements per thread, remove duplicates; never returns an empty list."""
    cmax = triton.next_power_of_2(named_args["C"])
    seen, kept = set(), []
    for cfg in configs:
        bn, bc = cfg.kwargs["BLOCK_N"], min(cfg.kwargs["BLOCK_C"], cmax)
        if bn * bc > _MAX_ELEMS_PER_THREAD * 32 * cfg.num_warps or (bn, bc, cfg.num_warps) in seen:
            continue
        seen.add((bn, bc, cfg.num_warps))
        kept.append(triton.Config({"BLOCK_N": bn, "BLOCK_C": bc}, num_warps=cfg.num_warps))
    return kept or [triton.Config({"BLOCK_N": 32, "BLOCK_C": min(8, cmax)}, num_warps=4)]


_sample_fwd_tuned = triton.autotune(_CONFIGS, key=["C", "n_levels"], prune_configs_by={"early_config_prune": _prune})(
    _sample_fwd_kernel)
# Every trial launch adds into the gradients again, so they are zeroed before each one.
_sample_bwd_tuned = triton.autotune(_CONFIGS, key=["C", "n_levels", "NEED_XYZ"],
                                    prune_configs_by={"early_config_prune": _prune},
                                    reset_to_zero=["gxyz_ptr", "G0", "G1", "G2", "G3"])(_sample_bwd_kernel)


def _launch(tuned, raw, B: int, N: int, C: int, args, **meta):
    if triton_interpreting():
        block_c = min(triton.next_power_of_2(C), _INTERPRET_BLOCK_C)
        block_n = min(max(16, min(1024, _INTERPRET_TILE // block_c)), max(16, triton.next_power_of_2(N)))
        raw[(triton.cdiv(N, block_n), triton.cdiv(C, block_c), B)](*args, BLOCK_N=block_n, BLOCK_C=block_c, **meta)
    else:
        tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(C, m["BLOCK_C"]), B)](*args, **meta)


# ---------------------------------------------------------------------------------------------
# Python entry points (the kernel contract)
# ---------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "[" + "x".join(str(s) for s in t.shape) + "]"


def _check(levels: Sequence[torch.Tensor], xyz: torch.Tensor) -> None:
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
    if xyz.shape[0] > 65535:  # the batch is grid axis 2, which CUDA limits to 65535 blocks
        raise ValueError(f"triton sample supports batch sizes up to 65535, got xyz {_shape(xyz)}; split the batch")
    half = (torch.float16, torch.bfloat16)
    if xyz.dtype != first.dtype and not (first.dtype in half and xyz.dtype == torch.float32):
        raise TypeError(f"xyz has dtype {xyz.dtype} but planes have {first.dtype}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale_args(scale: float, acc: torch.dtype):
    """float32 scalar arguments (hi, lo) with hi + lo == scale to ~48 bits for float64, lo = 0 otherwise."""
    hi = struct.unpack("f", struct.pack("f", float(scale)))[0]
    return hi, (float(scale) - hi if acc == torch.float64 else 0.0)


def _meta(plane_axes: int, acc: torch.dtype) -> dict:
    (pa0, pb0), (pa1, pb1), (pa2, pb2) = PLANE_COORDS[plane_axes]
    return dict(PA0=pa0, PB0=pb0, PA1=pa1, PB1=pb1, PA2=pa2, PB2=pb2,
                ACC=tl.float64 if acc == torch.float64 else tl.float32)


def _level_args(chunk: Sequence[torch.Tensor]):
    """LEVELS_PER_LAUNCH pointers and (H, W) pairs; unused slots repeat level 0 (never read; its
    sizes rather than 1s, which Triton would specialise on and compile another variant for)."""
    padded = list(chunk) + [chunk[0]] * (LEVELS_PER_LAUNCH - len(chunk))
    return padded, [int(s) for lv in padded for s in lv.shape[-2:]]


def _chunks(items: Sequence, k: int = LEVELS_PER_LAUNCH) -> List[list]:
    return [list(items[i:i + k]) for i in range(0, len(items), k)]


def sample_fwd(levels: Sequence[torch.Tensor], xyz: torch.Tensor, *params) -> torch.Tensor:
    """levels: finest-first [B,3,C,H_l,W_l]; xyz [B,N,3]; params: the SampleParams fields in order
    (g3dr_kernels/_params.py) -> [B,N,C] in the plane dtype."""
    p, _ = SampleParams.split(params)
    levels = [lv.contiguous() for lv in levels]
    xyz = xyz.contiguous()
    _check(levels, xyz)
    B, N = xyz.shape[:2]
    C = levels[0].shape[2]
    dtype = levels[0].dtype
    acc = _acc_dtype(dtype)
    out = torch.empty(B, N, C, dtype=dtype, device=xyz.device)
    if out.numel() == 0:
        return out
    hi, lo = _scale_args(p.scale, acc)
    chunks = _chunks(levels)
    total = None
    for chunk in chunks:
        # one launch writes the plane dtype directly; several sum their partial results in `acc`
        dst = out if len(chunks) == 1 else torch.empty(B, N, C, dtype=acc, device=xyz.device)
        ptrs, sizes = _level_args(chunk)
        _launch(_sample_fwd_tuned, _sample_fwd_kernel, B, N, C, (xyz, dst, *ptrs, *sizes, len(chunk), N, C, hi, lo),
                **_meta(p.plane_axes, acc))
        if len(chunks) > 1:
            total = dst if total is None else total.add_(dst)
    if total is not None:
        out.copy_(total)
    return out


def sample_bwd(grad_out: torch.Tensor, levels: Sequence[torch.Tensor], xyz: torch.Tensor, *options
               ) -> List[torch.Tensor]:
    """grad_out [B,N,C]; options: the SampleParams fields in order, then need_xyz_grad -> [grad of each
    level (its shape and dtype), grad_xyz [B,N,3] (empty without need_xyz_grad)]."""
    p, (need_xyz_grad,) = SampleParams.split(options)
    levels = [lv.contiguous() for lv in levels]
    xyz = xyz.contiguous()
    grad_out = grad_out.contiguous()
    _check(levels, xyz)
    B, N = xyz.shape[:2]
    C = levels[0].shape[2]
    if grad_out.shape != (B, N, C):
        raise ValueError(f"grad_out must be [B,N,C] = [{B}x{N}x{C}], got {_shape(grad_out)}")
    dtype = levels[0].dtype
    acc = _acc_dtype(dtype)
    # atomics need the accumulation dtype; for float32/float64 planes that is the result itself
    gbufs = [torch.zeros(lv.shape, dtype=acc, device=lv.device) for lv in levels]
    gxyz = torch.zeros(B, N, 3, dtype=acc, device=xyz.device) if need_xyz_grad else xyz.new_empty(0)
    if grad_out.numel() > 0:
        hi, lo = _scale_args(p.scale, acc)
        chunks = list(zip(_chunks(levels), _chunks(gbufs)))
        total = None
        for chunk, gchunk in chunks:
            # One zeroed grad_xyz buffer per launch, summed after: the autotuner zeroes the buffer it
            # is given before its trial runs, which must not erase an earlier launch's part. Without
            # need_xyz_grad the kernel never touches it, but it must not alias an input either.
            dst = gxyz if len(chunks) == 1 else torch.zeros(B, N, 3, dtype=acc, device=xyz.device)
            if not need_xyz_grad:
                dst = torch.zeros(1, dtype=acc, device=xyz.device)
            ptrs, sizes = _level_args(chunk)
            gptrs, _ = _level_args(gchunk)
            _launch(_sample_bwd_tuned, _sample_bwd_kernel, B, N, C,
                    (grad_out, xyz, dst, *ptrs, *gptrs, *sizes, len(chunk), N, C, hi, lo),
                    NEED_XYZ=bool(need_xyz_grad), **_meta(p.plane_axes, acc))
            if need_xyz_grad and len(chunks) > 1:
                total = dst if total is None else total.add_(dst)
        if total is not None:
            gxyz = total
    gxyz = gxyz.to(xyz.dtype) if need_xyz_grad else gxyz
    grads = [g if g.dtype == dtype else g.to(dtype) for g in gbufs]
    return grads + [gxyz]
