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

#include <cstdint>
#include <type_traits>

#include "g3dr/common.h"
#include "g3dr/composite_math.h"
// composite_math.h and sample_math.h each define G3DR_UNROLL (differently); their functions are
// already parsed, so dropping the first definition only silences the redefinition warning.
#undef G3DR_UNROLL
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

// softplus and sigmoid in the argument's own precision (std::exp/log1p overloads on the host, so
// float stays float; the CUDA overloads on the device). softplus has torch's threshold 20.
template <typename T>
G3DR_HD T softplus_t(T x) {
  return x > T(composite::kSoftplusThreshold) ? x : composite::log1p_(composite::exp_(x));
}

template <typename T>
G3DR_HD T sigmoid_t(T x) {
  return T(1) / (T(1) + composite::exp_(-x));
}

// d softplus(x) / dx as torch computes it (threshold 20: slope exactly 1 above it).
template <typename T>
G3DR_HD T softplus_grad(T x) {
  return x > T(composite::kSoftplusThreshold) ? T(1) : sigmoid_t(x);
}

#ifndef __CUDA_ARCH__
namespace detail {
G3DR_HD int32_t bits_of(float x) {
  int32_t i;
  __builtin_memcpy(&i, &x, 4);
  return i;
}
G3DR_HD float float_of(int32_t i) {
  float x;
  __builtin_memcpy(&x, &i, 4);
  return x;
}
}  // namespace detail

// Host float softplus over a vector, written so the compiler vectorises it (libm's log1pf is a
// scalar call and was most of the CPU kernel's time; the selects are integer bit operations because
// float compares do not vectorise under the default -ftrapping-math):
//   softplus(x) = max(x, 0) + log1p(y), y = exp(-|x|) in (0, 1]
//   exp: n = round(t log2 e), r = t - n ln 2 (Cody-Waite), degree-7 Taylor polynomial (error < 1e-8
//        relative on |r| <= ln2/2), times 2^n built in the exponent bits; t clamped at -87 (no denormals)
//   log1p(y) = 2 atanh(s), s = y / (2 + y) in (0, 1/3]: odd series to s^15 (next term < 2e-9 relative)
// Above x = 20 this gives x exactly in float (log1p(y) < ulp(20)/2), as torch's threshold does.
// softplus'(x) = sigmoid(x) = 1 / (1 + y) for x >= 0, y / (1 + y) below. NaN is not preserved.
template <bool kGrad>
inline void softplus_f32(const float* __restrict__ a, float* __restrict__ h, float* __restrict__ dh, int n) {
  const int32_t kClamp = detail::bits_of(87.f), kOne = detail::bits_of(1.f);
  for (int j = 0; j < n; ++j) {
    const int32_t xb = detail::bits_of(a[j]);
    const int32_t neg = xb >> 31;                   // all ones when x < 0 (or -0)
    const int32_t ab = xb & 0x7fffffff;             // |x|; for non-negative floats bit order is value order
    const int32_t small = (ab - kClamp) >> 31;      // all ones when |x| < 87
    const float t = -detail::float_of((ab & small) | (kClamp & ~small));
    const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const float kn = t * 1.44269504088896341f + magic;
    const float nf = kn - magic;
    const float r = (t - nf * 0.693145751953125f) - nf * 1.42860682030941723e-06f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const float y = p * detail::float_of((detail::bits_of(kn) - 0x4B400000 + 127) << 23);  // p 2^n, n >= -126
    const float s = y / (2.f + y);
    const float z = s * s;
    float q = 1.f / 15.f;
    q = q * z + 1.f / 13.f;
    q = q * z + 1.f / 11.f;
    q = q * z + 1.f / 9.f;
    q = q * z + 1.f / 7.f;
    q = q * z + 1.f / 5.f;
    q = q * z + 1.f / 3.f;
    q = q * z + 1.f;
    h[j] = detail::float_of(xb & ~neg) + 2.f * s * q;
    if (kGrad) dh[j] = detail::float_of((kOne & ~neg) | (detail::bits_of(y) & neg)) / (1.f + y);
  }
}
#endif

// h = softplus(a) [n], and dh = softplus'(a) when dh is not null.
template <typename T>
G3DR_HD void softplus_vec(const T* __restrict__ a, T* __restrict__ h, T* __restrict__ dh, int n) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same<T, float>::value) {
    if (dh != nullptr) {
      softplus_f32<true>(a, h, dh, n);
    } else {
      softplus_f32<false>(a, h, nullptr, n);
    }
    return;
  }
#endif
  for (int j = 0; j < n; ++j) h[j] = softplus_t(a[j]);
  if (dh != nullptr) {
    for (int j = 0; j < n; ++j) dh[j] = softplus_grad(a[j]);
  }
}

// Decoder forward for one sample. w1t is W1 transposed ([C, Hd], so the loop over hidden units is
// contiguous), w2 [O, Hd] (O = 1 + D). Writes h = softplus(W1 f + b1) [Hd] and o [O], using `a`
// [Hd] as scratch; with dh not null also dh = softplus'(W1 f + b1) [Hd] for the backward. Callers
// that need only the density pass O = 1.
template <typename T>
G3DR_HD void mlp_forward(const T* __restrict__ f, int C, const T* __restrict__ w1t, const T* __restrict__ b1,
                         int Hd, const T* __restrict__ w2, const T* __restrict__ b2, int O, T* __restrict__ a,
                         T* __restrict__ h, T* __restrict__ dh, T* __restrict__ o) {
  for (int j = 0; j < Hd; ++j) a[j] = b1[j];
  for (int c = 0; c < C; ++c) {
    const T fc = f[c];
    const T* __restrict__ row = w1t + static_cast<int64_t>(c) * Hd;
    for (int j = 0; j < Hd; ++j) a[j] += fc * row[j];
  }
  softplus_vec(a, h, dh, Hd);
  for (int k = 0; k < O; ++k) {
    const T* __restrict__ row = w2 + static_cast<int64_t>(k) * Hd;
    // Eight partial sums so the dot product vectorises without reassociation flags.
    T part[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
    int j = 0;
    for (; j + 8 <= Hd; j += 8) {
      for (int l = 0; l < 8; ++l) part[l] += row[j + l] * h[j + l];
    }
    T acc = b2[k];
    for (; j < Hd; ++j) acc += row[j] * h[j];
    o[k] = acc + (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])));
  }
}

template <typename T>
G3DR_HD T rgb_activation(T o) {
  return sigmoid_t(o) * T(1 + 2 * kRgbPad) - T(kRgbPad);
}

// d rgb / d o of rgb_activation.
template <typename T>
G3DR_HD T rgb_activation_grad(T o) {
  const T s = sigmoid_t(o);
  return T(1 + 2 * kRgbPad) * s * (T(1) - s);
}

// Decoder backward for one sample, given go = dL/do [O] and dh = softplus'(W1 f + b1) [Hd] from
// mlp_forward. Accumulates into gw1 [Hd, C], gb1 [Hd],
// gw2 [O, Hd], gb2 [O] (nn.Linear layout) and writes gf = dL/df [C]. gh is scratch [Hd].
template <typename T>
G3DR_HD void mlp_backward(const T* __restrict__ f, int C, const T* __restrict__ w1, int Hd, const T* __restrict__ w2,
                          int O, const T* __restrict__ dh, const T* __restrict__ h, const T* __restrict__ go,
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
    gh[j] *= dh[j];
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
