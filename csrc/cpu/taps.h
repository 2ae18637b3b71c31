// Feature gather and gradient scatter of one point for the CPU fused renderer (csrc/cpu/render.cpp):
// the same math and summation order as point_features / scatter_point_grad in
// csrc/include/g3dr/render_math.h (which the CUDA kernel runs), restructured for the CPU: the bilinear
// taps of every level and plane (offset and weight / 3) are computed once per point, then the
// channels run in blocks of generic vectors (tile_gemm.h's Vec) whose sums stay in registers over
// all taps, instead of a read-modify-write of f [C] per tap. Corners outside a plane are dropped
// from the list (their weight is 0), so the sums are those of the header functions.
#pragma once

#include <cstdint>
#include <type_traits>

#include "g3dr/render_math.h"
#include "tile_gemm.h"

namespace g3dr {
namespace render {
namespace tile {

// Up to 4 corners x 3 planes x kMaxLevels taps of one point.
template <typename acc_t>
struct PointTaps {
  int n;
  int level[kMaxLevels * 12];
  int64_t off[kMaxLevels * 12];  // element offset in the level's batch element: plane, texel * C
  acc_t w[kMaxLevels * 12];      // bilinear weight / 3
};

// The taps of point u [3] (plane units); the level sizes H, W and C come from the view (a pyramid or
// its gradient buffer: the same shapes). Non-finite points get no taps (bilinear_tap rejects them).
template <typename T, typename acc_t>
inline void point_taps(const PyramidView<T>& pv, const acc_t* u, int plane_axes, PointTaps<acc_t>& t) {
  const int64_t C = pv.C;
  const acc_t third = acc_t(1) / acc_t(3);
  t.n = 0;
  for (int l = 0; l < pv.levels; ++l) {
    const int64_t H = pv.H[l], W = pv.W[l];
    for (int p = 0; p < 3; ++p) {
      acc_t pa, pb;
      plane_uv(u, plane_axes, p, pa, pb);
      BilinearTap<acc_t> bt;
      if (!bilinear_tap(pa, pb, H, W, bt)) continue;
      for (int k = 0; k < 4; ++k) {
        if (bt.idx[k] < 0) continue;
        t.level[t.n] = l;
        t.off[t.n] = (p * H * W + bt.idx[k]) * C;
        t.w[t.n] = bt.w[k] * third;
        ++t.n;
      }
    }
  }
}

// f [C] = the features of point u of batch element b (point_features): the sum over its taps t
// (filled here) of w * level[off + c]; NaN for a point with a non-finite coordinate.
template <typename scalar_t, typename acc_t>
inline void gather_point(const PyramidView<const scalar_t>& pv, int64_t b, const acc_t* u, int plane_axes,
                         PointTaps<acc_t>& t, acc_t* __restrict__ f) {
  const int C = pv.C;
  point_taps(pv, u, plane_axes, t);
  if (!finite_point(u)) {
    for (int c = 0; c < C; ++c) f[c] = quiet_nan<acc_t>();
    return;
  }
  const scalar_t* base[kMaxLevels];
  for (int l = 0; l < pv.levels; ++l) base[l] = pv.data[l] + b * pv.batch_stride[l];
  int c0 = 0;
#ifdef G3DR_TILE_VECTORS
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    for (; c0 + 2 * L <= C; c0 += 2 * L) {
      V s0{}, s1{};
      for (int i = 0; i < t.n; ++i) {
        const scalar_t* v = base[t.level[i]] + t.off[i] + c0;
        s0 += t.w[i] * load(v);
        s1 += t.w[i] * load(v + L);
      }
      store(f + c0, s0);
      store(f + c0 + L, s1);
    }
  }
#endif
  for (int c = c0; c < C; ++c) f[c] = acc_t(0);
  if (c0 == C) return;
  for (int i = 0; i < t.n; ++i) {
    const scalar_t* __restrict__ v = base[t.level[i]] + t.off[i];
    const acc_t wi = t.w[i];
    for (int c = c0; c < C; ++c) f[c] += wi * static_cast<acc_t>(v[c]);
  }
}

// Adds gf [C] * w into every tap t of a point (from gather_point) in a one-element channels-last
// gradient pyramid (the transpose of gather_point, as scatter_point_grad with plain adds into a
// private buffer).
template <typename acc_t>
inline void scatter_point(const PyramidView<acc_t>& gv, const PointTaps<acc_t>& t, const acc_t* __restrict__ gf) {
  const int C = gv.C;
  for (int i = 0; i < t.n; ++i) {
    acc_t* __restrict__ g = gv.data[t.level[i]] + t.off[i];
    const acc_t wi = t.w[i];
    int c0 = 0;
#ifdef G3DR_TILE_VECTORS
    constexpr int L = Vec<acc_t>::lanes;
    for (; c0 + L <= C; c0 += L) store(g + c0, load(g + c0) + wi * load(gf + c0));
#endif
    for (int c = c0; c < C; ++c) g[c] += wi * gf[c];
  }
}

}  // namespace tile
}  // namespace render
}  // namespace g3dr
