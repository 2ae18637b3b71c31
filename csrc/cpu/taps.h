// Feature gather and gradient scatter of one point for the CPU fused renderer (csrc/cpu/render.cpp):
// the math of point_features / scatter_point_grad in csrc/include/g3dr/render_math.h (which the CUDA
// kernel runs), restructured for the CPU:
// - the bilinear taps of every level and plane (an element offset and weight / 3) are computed once
//   per point (the backward keeps them for the scatter);
// - the pyramid of a batch element is one flat channels-last buffer (FlatPyramid): level l starts at
//   element level_off[l], so one offset per tap addresses the pyramid and, with the same layout, the
//   plane-gradient buffer;
// - the channels run in blocks of up to 4 generic vectors (tile_gemm.h's Vec; 2 where wide_blocks()
//   says the registers are AVX2's 16) held in registers over all taps, the taps alternating between
//   two partial sums: a gather is then 2 x blocks independent chains of multiply-adds instead of one
//   chain of 36 per vector (the chains' latency, not memory, bounded the gather: prefetching the
//   texel rows a few points ahead changed nothing, measured);
//   the scatter keeps the point's gradient in registers over the taps.
// Corners outside a plane are dropped from the list (their weight is 0). Summation order of a
// feature: even taps, odd taps (each in tap order: level, plane, corner), then even + odd.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "g3dr/render_math.h"
#include "tile_gemm.h"

namespace g3dr {
namespace render {
namespace tile {

// Sizes of a flat channels-last pyramid: per batch element P elements, level l ([3, H_l, W_l, C]) at
// element level_off[l].
struct FlatPyramid {
  int levels, C;
  int H[kMaxLevels], W[kMaxLevels];
  int64_t level_off[kMaxLevels];
  int64_t P;
};

// Up to 4 corners x 3 planes x kMaxLevels taps of one point; n = -1 for a point with a non-finite
// coordinate (no taps; its features are NaN).
template <typename acc_t>
struct PointTaps {
  int n;
  int64_t off[kMaxLevels * 12];  // element offset of the corner's C channels in a batch element
  acc_t w[kMaxLevels * 12];      // bilinear weight / 3
};

// The taps of point u [3] (plane units).
template <typename acc_t>
inline void point_taps(const FlatPyramid& fp, const acc_t* u, int plane_axes, PointTaps<acc_t>& t) {
  const int64_t C = fp.C;
  const acc_t third = acc_t(1) / acc_t(3);
  t.n = 0;
  if (!finite_point(u)) {
    t.n = -1;
    return;
  }
  for (int l = 0; l < fp.levels; ++l) {
    const int64_t H = fp.H[l], W = fp.W[l];
    for (int p = 0; p < 3; ++p) {
      acc_t pa, pb;
      plane_uv(u, plane_axes, p, pa, pb);
      const int64_t plane0 = fp.level_off[l] + p * H * W * C;
      // The common case, all four corners inside: bilinear_tap's weights without its per-corner tests.
      const acc_t ix = ((pa + acc_t(1)) * acc_t(W) - acc_t(1)) / acc_t(2);
      const acc_t iy = ((pb + acc_t(1)) * acc_t(H) - acc_t(1)) / acc_t(2);
      if (ix >= acc_t(0) && ix < acc_t(W - 1) && iy >= acc_t(0) && iy < acc_t(H - 1)) {
        const acc_t fx = std::floor(ix), fy = std::floor(iy), tx = ix - fx, ty = iy - fy;
        const int64_t o = plane0 + (static_cast<int64_t>(fy) * W + static_cast<int64_t>(fx)) * C;
        t.off[t.n] = o;
        t.off[t.n + 1] = o + C;
        t.off[t.n + 2] = o + W * C;
        t.off[t.n + 3] = o + W * C + C;
        t.w[t.n] = (acc_t(1) - tx) * (acc_t(1) - ty) * third;
        t.w[t.n + 1] = tx * (acc_t(1) - ty) * third;
        t.w[t.n + 2] = (acc_t(1) - tx) * ty * third;
        t.w[t.n + 3] = tx * ty * third;
        t.n += 4;
        continue;
      }
      BilinearTap<acc_t> bt;
      if (!bilinear_tap(pa, pb, H, W, bt)) continue;
      for (int k = 0; k < 4; ++k) {
        if (bt.idx[k] < 0) continue;
        t.off[t.n] = plane0 + bt.idx[k] * C;
        t.w[t.n] = bt.w[k] * third;
        ++t.n;
      }
    }
  }
}

#ifdef G3DR_TILE_VECTORS
// f [c0, c0 + NB * lanes) of a point: the taps alternate between two sets of NB vector sums.
template <int NB, typename acc_t>
inline void gather_block(const acc_t* __restrict__ base, const PointTaps<acc_t>& t, int c0, acc_t* __restrict__ f) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V even[NB], odd[NB];
  for (int b = 0; b < NB; ++b) even[b] = odd[b] = V{};
  int i = 0;
  for (; i + 2 <= t.n; i += 2) {
    const acc_t* v0 = base + t.off[i] + c0;
    const acc_t* v1 = base + t.off[i + 1] + c0;
    const acc_t w0 = t.w[i], w1 = t.w[i + 1];
    for (int b = 0; b < NB; ++b) {
      even[b] += w0 * load(v0 + b * L);
      odd[b] += w1 * load(v1 + b * L);
    }
  }
  if (i < t.n) {
    const acc_t* v0 = base + t.off[i] + c0;
    for (int b = 0; b < NB; ++b) even[b] += t.w[i] * load(v0 + b * L);
  }
  for (int b = 0; b < NB; ++b) store(f + c0 + b * L, even[b] + odd[b]);
}

// g[off + c] += w * gf[c] for c in [c0, c0 + NB * lanes) over the taps, gf held in registers.
template <int NB, typename acc_t>
inline void scatter_block(acc_t* __restrict__ gbase, const PointTaps<acc_t>& t, int c0,
                          const acc_t* __restrict__ gf) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V g[NB];
  for (int b = 0; b < NB; ++b) g[b] = load(gf + c0 + b * L);
  for (int i = 0; i < t.n; ++i) {
    acc_t* p = gbase + t.off[i] + c0;
    const acc_t wi = t.w[i];
    for (int b = 0; b < NB; ++b) store(p + b * L, load(p + b * L) + wi * g[b]);
  }
}
#endif

// f [C] = the features of a point (point_features) from its taps t, base = the batch element's flat
// pyramid; NaN for a non-finite point.
template <typename scalar_t, typename acc_t>
inline void gather_point(const scalar_t* __restrict__ base, int C, const PointTaps<acc_t>& t, acc_t* __restrict__ f) {
  if (t.n < 0) {
    for (int c = 0; c < C; ++c) f[c] = quiet_nan<acc_t>();
    return;
  }
  int c0 = 0;
#ifdef G3DR_TILE_VECTORS
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    constexpr int L = Vec<acc_t>::lanes;
    if (wide_blocks()) {
      for (; c0 + 4 * L <= C; c0 += 4 * L) gather_block<4>(base, t, c0, f);
    }
    for (; c0 + 2 * L <= C; c0 += 2 * L) gather_block<2>(base, t, c0, f);
    if (c0 + L <= C) {
      gather_block<1>(base, t, c0, f);
      c0 += L;
    }
  }
#endif
  if (c0 == C) return;
  for (int c = c0; c < C; ++c) f[c] = acc_t(0);
  for (int i = 0; i < t.n; ++i) {
    const scalar_t* __restrict__ v = base + t.off[i];
    const acc_t wi = t.w[i];
    for (int c = c0; c < C; ++c) f[c] += wi * static_cast<acc_t>(v[c]);
  }
}

// Adds gf [C] * w into every tap of t in a batch element's flat gradient pyramid gbase (the transpose
// of gather_point, as scatter_point_grad with plain adds into a private buffer).
template <typename acc_t>
inline void scatter_point(acc_t* __restrict__ gbase, int C, const PointTaps<acc_t>& t, const acc_t* __restrict__ gf) {
  int c0 = 0;
#ifdef G3DR_TILE_VECTORS
  constexpr int L = Vec<acc_t>::lanes;
  if (wide_blocks()) {
    for (; c0 + 4 * L <= C; c0 += 4 * L) scatter_block<4>(gbase, t, c0, gf);
  }
  for (; c0 + 2 * L <= C; c0 += 2 * L) scatter_block<2>(gbase, t, c0, gf);
  if (c0 + L <= C) {
    scatter_block<1>(gbase, t, c0, gf);
    c0 += L;
  }
#endif
  if (c0 == C) return;
  for (int i = 0; i < t.n; ++i) {
    acc_t* __restrict__ g = gbase + t.off[i];
    const acc_t wi = t.w[i];
    for (int c = c0; c < C; ++c) g[c] += wi * gf[c];
  }
}

}  // namespace tile
}  // namespace render
}  // namespace g3dr
