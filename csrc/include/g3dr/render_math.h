// Per-sample math of the fused renderer (g3dr_C::render_fwd / render_bwd), shared by the C++ CPU
// kernel (csrc/cpu/render.cpp) and the CUDA kernel (csrc/cuda/render.cu). Everything compiles as
// host C++ and as CUDA; the kernels differ only in how they parallelise and accumulate.
//
// Equations (DESIGN.md, g3dr_kernels/reference.py::render_triplanes):
//   point   x_s = o + z_s d, u = x_s * scale
//   feature f_s = sum_l mean_p bilinear(level_l[p], u_(a_p,b_p))         [C]
//   decoder a = W1 f + b1, h = softplus(a), o = W2 h + b2             [hidden], [1+D]
//           sigma = o_0, rgb_k = sigmoid(o_(1+k)) * (1 + 2e-3) - 1e-3
//   composite on intervals i = (s, s+1): MipRayMarcher (composite_math.h) with the depth kernel
//   k(target, t_i) scaling the gradients of the interval's mid density and mid colour.
// The backward streams along each ray: interval i's gradient needs the suffix sum
// sum_{j>i} w_j dL/dw_j = total - prefix_i, with the total taken from the saved per-ray outputs, so a
// sample's gradient 0.5 (g_mid_{s-1} + g_mid_s) is final one interval after it was recomputed and the
// scan keeps the decoder state of two samples only.
#pragma once

#include "g3dr/common.h"
#include "g3dr/composite_math.h"
#include "g3dr/sample_math.h"

namespace g3dr {
namespace render {

// Colour activation of the decoder: sigmoid(o) * (1 + 2 kRgbPad) - kRgbPad (EG3D's OSGDecoder).
constexpr double kRgbPad = 1e-3;
// Most pyramid levels the kernels take (levels are halved each time; 8 covers 128x128 -> 1x1).
constexpr int kMaxLevels = 8;

// A pyramid of channels-last planes [B,3,H_l,W_l,C] (one pointer per level; data may be a gradient
// buffer). batch_stride[l] = 3 * H_l * W_l * C.
template <typename T>
struct PyramidView {
  T* data[kMaxLevels];
  int H[kMaxLevels];
  int W[kMaxLevels];
  int64_t batch_stride[kMaxLevels];
  int levels;
  int C;
};

// f[c] = sum over levels, mean over planes, of the bilinear samples at u [3] (zeros outside).
template <typename scalar_t, typename acc_t>
G3DR_HD void point_features(const PyramidView<const scalar_t>& pv, int64_t b, const acc_t* u, int plane_axes,
                            acc_t* __restrict__ f) {
  const int C = pv.C;
  for (int c = 0; c < C; ++c) f[c] = acc_t(0);
  const acc_t third = acc_t(1) / acc_t(3);
  for (int l = 0; l < pv.levels; ++l) {
    const int64_t H = pv.H[l], W = pv.W[l];
    for (int p = 0; p < 3; ++p) {
      const scalar_t* plane = pv.data[l] + b * pv.batch_stride[l] + p * H * W * C;
      acc_t pa, pb;
      plane_uv(u, plane_axes, p, pa, pb);
      BilinearTap<acc_t> t;
      if (!bilinear_tap(pa, pb, H, W, t)) continue;
      for (int k = 0; k < 4; ++k) {
        if (t.idx[k] < 0) continue;
        const scalar_t* __restrict__ v = plane + t.idx[k] * C;
        const acc_t wk = t.w[k] * third;
        for (int c = 0; c < C; ++c) f[c] += wk * static_cast<acc_t>(v[c]);
      }
    }
  }
}

// The transpose of point_features: adds gf[c] * (bilinear weight / 3) into every tap of every
// level and plane of a channels-last gradient pyramid. `add(ptr, value)` does the accumulation
// (a plain += into a private buffer on the CPU, an atomicAdd on CUDA).
template <typename acc_t, typename Add>
G3DR_HD void scatter_point_grad(const PyramidView<acc_t>& gv, int64_t b, const acc_t* u, int plane_axes,
                                const acc_t* __restrict__ gf, Add add) {
  const int C = gv.C;
  const acc_t third = acc_t(1) / acc_t(3);
  for (int l = 0; l < gv.levels; ++l) {
    const int64_t H = gv.H[l], W = gv.W[l];
    for (int p = 0; p < 3; ++p) {
      acc_t* plane = gv.data[l] + b * gv.batch_stride[l] + p * H * W * C;
      acc_t pa, pb;
      plane_uv(u, plane_axes, p, pa, pb);
      BilinearTap<acc_t> t;
      if (!bilinear_tap(pa, pb, H, W, t)) continue;
      for (int k = 0; k < 4; ++k) {
        if (t.idx[k] < 0) continue;
        acc_t* __restrict__ g = plane + t.idx[k] * C;
        const acc_t wk = t.w[k] * third;
        for (int c = 0; c < C; ++c) add(g + c, wk * gf[c]);
      }
    }
  }
}

// Decoder forward for one sample. w1t is W1 transposed ([C, Hd], so the loop over hidden units is
// contiguous), w2 [O, Hd] (O = 1 + D). Writes the pre-activation a [Hd], h = softplus(a) [Hd] and
// o [O]; callers that need only the density pass O = 1.
template <typename T>
G3DR_HD void mlp_forward(const T* __restrict__ f, int C, const T* __restrict__ w1t, const T* __restrict__ b1,
                         int Hd, const T* __restrict__ w2, const T* __restrict__ b2, int O, T* __restrict__ a,
                         T* __restrict__ h, T* __restrict__ o) {
  for (int j = 0; j < Hd; ++j) a[j] = b1[j];
  for (int c = 0; c < C; ++c) {
    const T fc = f[c];
    const T* __restrict__ row = w1t + static_cast<int64_t>(c) * Hd;
    for (int j = 0; j < Hd; ++j) a[j] += fc * row[j];
  }
  for (int j = 0; j < Hd; ++j) h[j] = softplus(a[j]);
  for (int k = 0; k < O; ++k) {
    const T* __restrict__ row = w2 + static_cast<int64_t>(k) * Hd;
    T acc = b2[k];
    for (int j = 0; j < Hd; ++j) acc += row[j] * h[j];
    o[k] = acc;
  }
}

template <typename T>
G3DR_HD T rgb_activation(T o) {
  return sigmoid(o) * T(1 + 2 * kRgbPad) - T(kRgbPad);
}

// d rgb / d o of rgb_activation.
template <typename T>
G3DR_HD T rgb_activation_grad(T o) {
  const T s = sigmoid(o);
  return T(1 + 2 * kRgbPad) * s * (T(1) - s);
}

// d softplus(x) / dx as torch computes it (threshold 20: slope exactly 1 above it).
template <typename T>
G3DR_HD T softplus_grad(T x) {
  return x > T(20) ? T(1) : sigmoid(x);
}

// Decoder backward for one sample, given go = dL/do [O]. Accumulates into gw1 [Hd, C], gb1 [Hd],
// gw2 [O, Hd], gb2 [O] (nn.Linear layout) and writes gf = dL/df [C]. gh is scratch [Hd].
template <typename T>
G3DR_HD void mlp_backward(const T* __restrict__ f, int C, const T* __restrict__ w1, int Hd, const T* __restrict__ w2,
                          int O, const T* __restrict__ a, const T* __restrict__ h, const T* __restrict__ go,
                          T* __restrict__ gh, T* __restrict__ gf, T* __restrict__ gw1, T* __restrict__ gb1,
                          T* __restrict__ gw2, T* __restrict__ gb2) {
  for (int j = 0; j < Hd; ++j) gh[j] = T(0);
  for (int k = 0; k < O; ++k) {
    const T g = go[k];
    gb2[k] += g;
    const T* __restrict__ row = w2 + static_cast<int64_t>(k) * Hd;
    T* __restrict__ grow = gw2 + static_cast<int64_t>(k) * Hd;
    for (int j = 0; j < Hd; ++j) {
      gh[j] += g * row[j];
      grow[j] += g * h[j];
    }
  }
  for (int j = 0; j < Hd; ++j) {
    gh[j] *= softplus_grad(a[j]);
    gb1[j] += gh[j];
  }
  for (int c = 0; c < C; ++c) gf[c] = T(0);
  for (int j = 0; j < Hd; ++j) {
    const T g = gh[j];
    const T* __restrict__ row = w1 + static_cast<int64_t>(j) * C;
    T* __restrict__ grow = gw1 + static_cast<int64_t>(j) * C;
    for (int c = 0; c < C; ++c) {
      gf[c] += g * row[c];
      grow[c] += g * f[c];
    }
  }
}

// Per-ray constants of the streamed composite backward (as composite::ray_backward):
// dL/dw_i = G_i = g_rgb.c_i + gd t_i + base (+ g_weights_i), and total = sum_i w_i G_i taken from the
// saved outputs (without the g_weights part, which the caller adds when there is one).
template <typename T>
struct RayGrad {
  T gd, base, total;
};

template <typename scalar_t, typename acc_t>
G3DR_HD RayGrad<acc_t> ray_grad_setup(const scalar_t* __restrict__ g_rgb, acc_t g_depth, acc_t g_opacity,
                                      const scalar_t* __restrict__ out_rgb, acc_t depth, acc_t opacity, int64_t D,
                                      const composite::Params<acc_t>& prm) {
  RayGrad<acc_t> r;
  r.gd = g_depth / (opacity + prm.eps);
  acc_t sum_g = acc_t(0), dot_out = acc_t(0);
  for (int64_t d = 0; d < D; ++d) {
    const acc_t g = static_cast<acc_t>(g_rgb[d]);
    sum_g += g;
    dot_out += g * static_cast<acc_t>(out_rgb[d]);
  }
  r.base = g_opacity - (prm.white_bg ? sum_g : acc_t(0)) - r.gd * depth;
  // sum w c = out_rgb (- (1 - opacity) with white_bg), sum w t = depth (opacity + eps), sum w = opacity.
  const acc_t dot_core = dot_out - (prm.white_bg ? sum_g * (acc_t(1) - opacity) : acc_t(0));
  r.total = dot_core + r.gd * depth * (opacity + prm.eps) + r.base * opacity;
  return r;
}

// dL/d(mid density) of one interval (before the depth kernel), given the transmittance T before it,
// G = dL/dw and suffix = sum_{j>i} w_j G_j. e / trans <= 1 is formed first so that a saturated
// interval (trans = 1e-10) does not amplify the rounding error of the suffix sum.
template <typename T>
G3DR_HD T interval_density_grad(const composite::Interval<T>& iv, T trans_before, T G, T suffix, T delta) {
  return (trans_before * G * iv.e - suffix * (iv.e / iv.trans)) * delta * iv.dsp;
}

}  // namespace render
}  // namespace g3dr
