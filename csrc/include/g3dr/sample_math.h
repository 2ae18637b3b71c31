// Per-point math of fused multi-resolution triplane sampling, shared by the CPU (csrc/cpu/sample.cpp)
// and CUDA (csrc/cuda/sample.cu) kernels. Everything here compiles as host C++ and as CUDA.
//
// For one point u = xyz * scale and one plane p of one level (H x W texels), the plane reads the two
// coordinates (a, b) of u given by plane_coord_index. Bilinear sampling with align_corners=False and
// zeros outside (torch.nn.functional.grid_sample, padding_mode="zeros"):
//   ix = ((a + 1) W - 1) / 2,  iy = ((b + 1) H - 1) / 2,  x0 = floor(ix), tx = ix - x0 (same for y)
//   f  = (1-tx)(1-ty) P[y0,x0] + tx(1-ty) P[y0,x0+1] + (1-tx)ty P[y0+1,x0] + tx ty P[y0+1,x0+1]
// where corners outside the plane read 0. The op's output is sum over levels of the mean over planes.
//
// Points far outside are "all corners outside"; so are non-finite coordinates (NaN/inf in xyz) inside
// bilinear_tap, but the forward kernels then write NaN (see finite_point). Outside points
// contribute 0 to the features and get 0 gradient (grid_sample, and so the "torch" reference, gives
// NaN for NaN or infinite coordinates).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "g3dr/common.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define G3DR_HDI G3DR_HD
#else
// Forced inline on the host: the CPU kernels are compiled per ISA (AVX2 and baseline), and a helper
// left out of line would run the baseline code from inside the AVX2 kernel.
#if defined(__GNUC__)
#define G3DR_HDI inline __attribute__((always_inline))
#else
#define G3DR_HDI inline
#endif
#endif

namespace g3dr {

template <typename T>
G3DR_HDI T floor_(T x) {
#ifdef __CUDA_ARCH__
  return floor(x);  // CUDA's float/double overloads
#else
  return std::floor(x);
#endif
}

// The four corners of a bilinear tap, in the order (y0,x0), (y0,x1), (y1,x0), (y1,x1).
template <typename acc_t>
struct BilinearTap {
  int64_t idx[4];  // texel index y * W + x of each corner; -1 for a corner outside the plane
  acc_t w[4];      // bilinear weight of each corner; 0 for a corner outside
  acc_t tx, ty;    // fractional parts of ix, iy (for the coordinate gradient)
};

// v[k] for k in {0, 1, 2} by selects, not by a runtime index, so that on the GPU a 3-vector stays in
// registers instead of going to local memory.
template <typename acc_t>
G3DR_HDI acc_t pick3(const acc_t* v, int k) {
  return k == 0 ? v[0] : (k == 1 ? v[1] : v[2]);
}

// The plane coordinates (a, b) that plane p reads from u [3].
template <typename acc_t>
G3DR_HDI void plane_uv(const acc_t* u, int plane_axes, int p, acc_t& a, acc_t& b) {
  int ia, ib;
  plane_coord_index(plane_axes, p, ia, ib);
  a = pick3(u, ia);
  b = pick3(u, ib);
}

// True when every coordinate of u is finite (x - x is 0 for finite x, NaN for NaN and inf). The
// forward kernels write NaN features for a point with a non-finite coordinate, as grid_sample (the
// reference) does: each coordinate is read by at least one plane in both conventions.
template <typename acc_t>
G3DR_HDI bool finite_point(const acc_t* u) {
  return (u[0] - u[0]) == acc_t(0) && (u[1] - u[1]) == acc_t(0) && (u[2] - u[2]) == acc_t(0);
}

template <typename acc_t>
G3DR_HDI acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// Fills `t` for normalised plane coordinates (a, b) on an H x W plane. Returns false when no corner
// is inside (then `t` holds idx -1 and weight 0 everywhere); NaN/inf coordinates land here too. The
// range test runs in floating point before any float->int conversion, so huge values are safe.
template <typename acc_t>
G3DR_HDI bool bilinear_tap(acc_t a, acc_t b, int64_t H, int64_t W, BilinearTap<acc_t>& t) {
  const acc_t ix = ((a + acc_t(1)) * acc_t(W) - acc_t(1)) / acc_t(2);
  const acc_t iy = ((b + acc_t(1)) * acc_t(H) - acc_t(1)) / acc_t(2);
  // A corner can be inside only when -1 <= ix < W (and likewise iy); written so NaN fails it.
  if (!(ix >= acc_t(-1) && ix < acc_t(W) && iy >= acc_t(-1) && iy < acc_t(H))) {
G3DR_UNROLL
    for (int k = 0; k < 4; ++k) {
      t.idx[k] = -1;
      t.w[k] = acc_t(0);
    }
    t.tx = t.ty = acc_t(0);
    return false;
  }
  const acc_t fx = floor_(ix), fy = floor_(iy);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  const acc_t tx = ix - fx, ty = iy - fy;
  t.tx = tx;
  t.ty = ty;
  const bool vx0 = x0 >= 0, vx1 = x1 < W, vy0 = y0 >= 0, vy1 = y1 < H;
  const bool valid[4] = {vy0 && vx0, vy0 && vx1, vy1 && vx0, vy1 && vx1};
  const int64_t idx[4] = {y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1};
  const acc_t w[4] = {(acc_t(1) - tx) * (acc_t(1) - ty), tx * (acc_t(1) - ty), (acc_t(1) - tx) * ty, tx * ty};
  bool any = false;
G3DR_UNROLL
  for (int k = 0; k < 4; ++k) {
    t.idx[k] = valid[k] ? idx[k] : -1;
    t.w[k] = valid[k] ? w[k] : acc_t(0);
    any = any || valid[k];
  }
  return any;
}

// d w_k / d ix and d w_k / d iy for the corners of `t` (including corners outside: their value is 0,
// so whatever multiplies them vanishes; this is grid_sample's gradient with zeros padding).
template <typename acc_t>
G3DR_HDI void bilinear_weight_grads(const BilinearTap<acc_t>& t, acc_t dwdx[4], acc_t dwdy[4]) {
  const acc_t tx = t.tx, ty = t.ty;
  dwdx[0] = -(acc_t(1) - ty);
  dwdx[1] = acc_t(1) - ty;
  dwdx[2] = -ty;
  dwdx[3] = ty;
  dwdy[0] = -(acc_t(1) - tx);
  dwdy[1] = -tx;
  dwdy[2] = acc_t(1) - tx;
  dwdy[3] = tx;
}

// d w_k / d a and d w_k / d b: the chain rule through ix = ((a + 1) W - 1) / 2 (d ix / d a = W / 2)
// and iy = ((b + 1) H - 1) / 2, times `factor` (the plane weight 1/3 in the kernels).
template <typename acc_t>
G3DR_HDI void tap_coord_weights(const BilinearTap<acc_t>& t, int64_t H, int64_t W, acc_t factor, acc_t dwda[4],
                                acc_t dwdb[4]) {
  acc_t dwdx[4], dwdy[4];
  bilinear_weight_grads(t, dwdx, dwdy);
  const acc_t fa = factor * acc_t(W) / acc_t(2), fb = factor * acc_t(H) / acc_t(2);
G3DR_UNROLL
  for (int k = 0; k < 4; ++k) {
    dwda[k] = dwdx[k] * fa;
    dwdb[k] = dwdy[k] * fb;
  }
}

// Adds the coordinate gradient of one tap to gu [3] (w.r.t. u = xyz * scale; the caller multiplies by
// scale once per point): s[k] = <grad_out, value of corner k> (0 for a corner outside), and
// gu[ia] += sum_k s[k] dwda[k] * factor, gu[ib] += sum_k s[k] dwdb[k] * factor, (ia, ib) the
// coordinates plane p reads.
template <typename acc_t>
G3DR_HDI void accumulate_uv_grad(const BilinearTap<acc_t>& t, const acc_t s[4], int plane_axes, int p, int64_t H,
                                 int64_t W, acc_t factor, acc_t* gu) {
  acc_t dwda[4], dwdb[4];
  tap_coord_weights(t, H, W, factor, dwda, dwdb);
  acc_t ga = acc_t(0), gb = acc_t(0);
G3DR_UNROLL
  for (int k = 0; k < 4; ++k) {
    ga += s[k] * dwda[k];
    gb += s[k] * dwdb[k];
  }
  int ia, ib;
  plane_coord_index(plane_axes, p, ia, ib);
G3DR_UNROLL
  for (int m = 0; m < 3; ++m) gu[m] += (m == ia ? ga : acc_t(0)) + (m == ib ? gb : acc_t(0));
}

}  // namespace g3dr
