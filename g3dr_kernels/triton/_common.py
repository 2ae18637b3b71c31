"""Device helpers shared by the Triton kernels (sample.py, composite.py, render.py); those files keep
only their kernels and what is theirs alone.

Every helper here is inlined into its caller by the Triton compiler, so moving code here changes no
generated code as long as the order of its statements stays (that order decides which products the
compiler contracts into FMAs, so the GPU's rounding: see _interval). Under TRITON_INTERPRET=1, though, each device-function call costs the
interpreter some Python work (~0.15 ms), so the helpers are few and coarse rather than many and tiny.

Formulas (their oracle is `g3dr_kernels.reference`):
    softplus(x) = x above 20, else log1p(exp(x))    (torch's, beta 1, threshold 20)
    softplus'(x) = 1 above 20, else sigmoid(x)       (as torch's softplus backward)
    bilinear taps (grid_sample, align_corners=False): ix = ((a + 1) W - 1) / 2, x0 = floor(ix),
        wx1 = ix - x0, wx0 = 1 - wx1 (same for iy, H); a corner is in bounds when 0 <= x < W, 0 <= y < H
    interval i of a ray (MipRayMarcher): x = (sigma_i + sigma_{i+1}) / 2 + density_bias,
        delta = t_{i+1} - t_i, e = exp(-softplus(x) delta), alpha = 1 - e, mid depth (t_i + t_{i+1}) / 2,
        transmittance factor 1 - alpha + 1e-10
    depth kernel (G3DR): k = min(c_max, max(s1 exp(-(target - t)^2 / s2), c_min))
"""
from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Scalars and selection
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A float argument in the accumulation dtype. Triton passes Python floats as float32, so float64
    runs get each one as hi + lo (both float32; lo is 0 for float32 runs), summed in float64."""
    if ACC == tl.float64:
        return (tl.zeros([], tl.float64) + hi) + lo  # (no .to: the interpreter passes Python floats)
    else:
        return hi


@triton.jit
def _depth_kernel_args(s1_hi, s1_lo, s2_hi, s2_lo, cmin_hi, cmin_lo, cmax_hi, cmax_lo, ACC: tl.constexpr):
    """(s1, s2, c_min, c_max) of the depth kernel in the accumulation dtype (see _scalar)."""
    return (_scalar(s1_hi, s1_lo, ACC), _scalar(s2_hi, s2_lo, ACC), _scalar(cmin_hi, cmin_lo, ACC),
            _scalar(cmax_hi, cmax_lo, ACC))


@triton.jit
def _pick(i, x0, x1, x2, x3):
    """x_i for an index i in 0..3 known only at run time (pointers, sizes or axis codes)."""
    return tl.where(i == 0, x0, tl.where(i == 1, x1, tl.where(i == 2, x2, x3)))


@triton.jit
def _axis(ux, uy, uz, k):
    """Coordinate k (0 x, 1 y, 2 z; a run-time scalar) of u, per point."""
    return tl.where(k == 0, ux, tl.where(k == 1, uy, uz))


@triton.jit
def _nonfinite(ux, uy, uz):
    """0 per point, NaN where a coordinate is NaN or infinite (u * 0 is NaN exactly then): added to a
    point's results so that such points give NaN, as grid_sample in the reference does."""
    return ux * 0.0 + uy * 0.0 + uz * 0.0


@triton.jit
def _plane_coords(ux, uy, uz, p, PLANE_AXES: tl.constexpr):
    """(a, b) = (width, height) coordinates of plane p (a runtime index): (x,y), (x,z), then (z,x)
    for eg3d (PLANE_AXES 0) or (y,z) for xyz (1): PLANE_COORDS[PLANE_AXES][p], selected on p directly
    (the sample kernels, which also need the axis codes, take them from PLANE_COORDS and use _axis)."""
    if PLANE_AXES == 0:
        a2 = uz
        b2 = ux
    else:
        a2 = uy
        b2 = uz
    a = tl.where(p == 2, a2, ux)
    b = tl.where(p == 0, uy, tl.where(p == 1, uz, b2))
    return a, b


# ---------------------------------------------------------------------------------------------
# Elementwise math (matches torch in value)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _log1p(z):
    """log1p(z) for z >= 0 as Goldberg's log(u) z / (u - 1), u = 1 + z (tl has no log1p the interpreter
    runs); it is z where u rounds to 1."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    """torch.nn.functional.softplus(x) (beta 1, threshold 20): x above 20, else log1p(exp(x)), written
    as torch writes it (the decoder's activation and the reference-rounded intervals)."""
    lp = _log1p(tl.exp(tl.minimum(x, 20.0)))
    # x != x keeps NaN (tl.minimum above would turn it into 20), as torch's softplus does.
    return tl.where((x > 20.0) | (x != x), x, lp)


@triton.jit
def _softplus_grad(x):
    """d softplus / dx as torch computes it: 1 above the threshold, else sigmoid(x)."""
    return tl.where(x > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# ---------------------------------------------------------------------------------------------
# Bilinear taps
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bilinear(a, b, H, W, IDX: tl.constexpr):
    """grid_sample (align_corners=False) taps for plane coordinates a (width) and b (height) in
    [-1, 1]: corner indices x0, y0, x1 = x0 + 1, y1 = y0 + 1 (dtype IDX), weights wx0, wy0, wx1, wy1
    and per-axis in-bounds masks vx0, vy0, vx1, vy1 (corner (x, y) is in bounds when vx & vy).
    One core for both users, which differ only in what they build from it: render.py combines the
    masks per corner and forms its texel offsets in its own (channels-last or not) layout, with int32
    indices; sample.py wants int64 offsets within an H x W plane and folds its point mask into the
    row masks (_bilinear_offsets there).
    The source index is clamped to [-2, size+1] first: outside that every corner is out of bounds
    either way (so values and gradients do not change), and the clamp keeps far-away points from
    overflowing the integer conversion."""
    Wf = W * 1.0  # sizes may arrive as python ints (1 is specialised to a constant)
    Hf = H * 1.0
    ix = ((a + 1.0) * Wf - 1.0) * 0.5
    iy = ((b + 1.0) * Hf - 1.0) * 0.5
    ix = tl.minimum(tl.maximum(ix, -2.0), Wf + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), Hf + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    wx1 = ix - x0f
    wy1 = iy - y0f
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    x0 = x0f.to(IDX)
    y0 = y0f.to(IDX)
    x1 = x0 + 1
    y1 = y0 + 1
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x1 >= 0) & (x1 < W)
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y1 >= 0) & (y1 < H)
    return x0, y0, x1, y1, wx0, wy0, wx1, wy1, vx0, vy0, vx1, vy1


# ---------------------------------------------------------------------------------------------
# Compositing: one interval, the depth kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _interval(s0, s1, d0, d1, density_bias, REF_ROUNDING: tl.constexpr, WITH_GRAD: tl.constexpr):
    """One interval from its two samples (densities s0, s1 at depths d0, d1): (alpha, e = exp(-sp delta),
    the transmittance factor 1 - alpha + 1e-10, mid depth t, delta, and d sp / d x with WITH_GRAD, else x).
    Two roundings of the same formulas, both kept so that each kernel's numbers stay what they were:
    - REF_ROUNDING (render.py): sp = _softplus(x), the factor formed as 1 - alpha + 1e-10, as the float32
      reference rounds them.
    - otherwise (composite.py, and the C++ kernels' composite_math.h): sp = max(x, 0) + log1p(exp(-|x|))
      (torch's threshold 20 kept) and the factor formed as e + 1e-10: equal in exact arithmetic, exact
      for small e, where fl(1 - fl(1 - e)) loses e entirely (e < 2^-24), and it keeps
      e / factor <= 1 in the backward pass.
    Making render.py use the second would change its results (by ulps, and by more behind an opaque
    interval): a numerics decision, not a refactor."""
    # The statement order is each kernel's own: it decides which products the compiler contracts into
    # FMAs (e.g. 0.5 * (d0 + d1) into the caller's t - target), i.e. how the GPU rounds (sm_90 PTX).
    if REF_ROUNDING:
        t = 0.5 * (d0 + d1)
        delta = d1 - d0
    x = 0.5 * (s0 + s1) + density_bias
    if REF_ROUNDING:
        sp = _softplus(x)
    else:
        log1p_z = _log1p(tl.exp(-tl.abs(x)))
        sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_z)
        delta = d1 - d0
    e = tl.exp(-sp * delta)
    alpha = 1.0 - e
    if REF_ROUNDING:
        keep = 1.0 - alpha + 1e-10
    else:
        keep = e + 1e-10
    if WITH_GRAD:
        dsp_dx = _softplus_grad(x)
    else:
        dsp_dx = x  # for a caller that takes _softplus_grad(x) later (compiled Triton cannot return None)
    if not REF_ROUNDING:
        t = 0.5 * (d0 + d1)
    return alpha, e, keep, t, delta, dsp_dx


@triton.jit
def _depth_kernel(target, t, s1, s2, c_min, c_max):
    """G3DR's depth-kernel gradient scale k = min(c_max, max(s1 exp(-(target - t)^2 / s2), c_min)) (operands
    in render.py's order: its sm_90 backward spills more with them swapped; composite.py's does not care)."""
    diff = target - t
    return tl.minimum(tl.maximum(s1 * tl.exp(-(diff * diff) / s2), c_min), c_max)
