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
#include "g3dr/sample_math.h"

namespace g3dr {
namespace render {

// Colour activation of the decoder: sigmoid(o) * (1 + 2 kRgbPad) - kRgbPad (EG3D's OSGDecoder).
constexpr double kRgbPad = 1e-3;
// Most pyramid levels the kernels take (levels are halved each time; 8 covers 128x128 -> 1x1).
constexpr int kMaxLevels = 8;

// Sizes seen at the op boundary (csrc/cpu/render.cpp checks them for both backends): B batch, R rays,
// S samples per ray, C channels, Hd hidden units, O = 1 + D decoder outputs.
struct Dims {
  int64_t B, R, S, C, Hd, O;
};

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

// f[c] = sum over levels, mean over planes, of the bilinear samples at u [3] (zeros outside). A point
// with a NaN/inf coordinate gets NaN features, as grid_sample (the reference) gives: a ray with a
// non-finite origin, direction or depth then composites to NaN on every backend. scatter_point_grad
// adds nothing for such a point (bilinear_tap rejects it); its NaN reaches the gradients through
// the decoder and the ray's other samples, as in the reference.
template <typename scalar_t, typename acc_t>
G3DR_HD void point_features(const PyramidView<const scalar_t>& pv, int64_t b, const acc_t* u, int plane_axes,
                            acc_t* __restrict__ f) {
  const int C = pv.C;
  if (!finite_point(u)) {
    for (int c = 0; c < C; ++c) f[c] = quiet_nan<acc_t>();
    return;
  }
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
// softplus'(x) = sigmoid(x) = 1 / (1 + y) for x >= 0, y / (1 + y) below. softplus(NaN) is NaN.
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
    const int32_t nan = (0x7f800000 - ab) >> 31;  // all ones for NaN: passed through as torch does
    const int32_t hb = detail::bits_of(detail::float_of(xb & ~neg) + 2.f * s * q);
    h[j] = detail::float_of((hb & ~nan) | (xb & nan));
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

// o [O] = W2 h + b2 for one sample, w2 [O, Hd]. Eight partial sums per output so the dot products
// vectorise without reassociation flags.
template <typename T>
G3DR_HD void output_layer(const T* __restrict__ h, int Hd, const T* __restrict__ w2, const T* __restrict__ b2,
                          int O, T* __restrict__ o) {
  for (int k = 0; k < O; ++k) {
    const T* __restrict__ row = w2 + static_cast<int64_t>(k) * Hd;
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
  output_layer(h, Hd, w2, b2, O, o);
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

// Decoder backward to the input for one sample, given go = dL/do [O] and dh = softplus'(W1 f + b1)
// [Hd] from mlp_forward: writes ga = dL/d(W1 f + b1) [Hd] and gf = dL/df [C].
template <typename T>
G3DR_HD void mlp_backward_input(int C, const T* __restrict__ w1, int Hd, const T* __restrict__ w2, int O,
                                const T* __restrict__ dh, const T* __restrict__ go, T* __restrict__ ga,
                                T* __restrict__ gf) {
  for (int j = 0; j < Hd; ++j) ga[j] = T(0);
  for (int k = 0; k < O; ++k) {
    const T g = go[k];
    const T* __restrict__ row = w2 + static_cast<int64_t>(k) * Hd;
    for (int j = 0; j < Hd; ++j) ga[j] += g * row[j];
  }
  for (int j = 0; j < Hd; ++j) ga[j] *= dh[j];
  for (int c = 0; c < C; ++c) gf[c] = T(0);
  for (int j = 0; j < Hd; ++j) {
    const T g = ga[j];
    const T* __restrict__ row = w1 + static_cast<int64_t>(j) * C;
    for (int c = 0; c < C; ++c) gf[c] += g * row[c];
  }
}

// The decoder's weight gradients from one sample (nn.Linear layout): gw1 [Hd, C] += ga f^T,
// gb1 [Hd] += ga, gw2 [O, Hd] += go h^T, gb2 [O] += go.
template <typename T>
G3DR_HD void mlp_weight_grads(const T* __restrict__ f, int C, const T* __restrict__ h, int Hd,
                              const T* __restrict__ ga, const T* __restrict__ go, int O, T* __restrict__ gw1,
                              T* __restrict__ gb1, T* __restrict__ gw2, T* __restrict__ gb2) {
  for (int k = 0; k < O; ++k) {
    const T g = go[k];
    gb2[k] += g;
    T* __restrict__ grow = gw2 + static_cast<int64_t>(k) * Hd;
    for (int j = 0; j < Hd; ++j) grow[j] += g * h[j];
  }
  for (int j = 0; j < Hd; ++j) {
    const T g = ga[j];
    gb1[j] += g;
    T* __restrict__ grow = gw1 + static_cast<int64_t>(j) * C;
    for (int c = 0; c < C; ++c) grow[c] += g * f[c];
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

// ---------------------------------------------------------------------------------------------
// Per-ray loops, shared by the CPU kernel (a thread runs them for a chunk of rays) and the CUDA
// kernel (one thread per ray). Backends supply scratch memory and the gradient accumulation.
// ---------------------------------------------------------------------------------------------

// Everything the per-ray loops read and write, as raw pointers (contiguous tensors). The decoder
// weights are in the accumulation type: w1 [Hd,C], w1t = w1^T [C,Hd], b1 [Hd], w2 [O,Hd], b2 [O].
// Forward outputs and backward inputs are null where unused.
template <typename scalar_t, typename acc_t>
struct RenderArgs {
  int64_t R, S, C, Hd, O, D;
  PyramidView<const scalar_t> pv;
  const scalar_t *ro, *rd, *dz, *target;  // rays_o, rays_d [B*R,3], depths [B*R,S], target [B*R] or null
  const acc_t *w1, *w1t, *b1, *w2, *b2;
  acc_t scale;
  int plane_axes;
  composite::Params<acc_t> prm;
  scalar_t *out_rgb, *out_depth, *out_opacity, *out_w;                      // forward
  const scalar_t *g_rgb, *g_depth, *g_op, *g_w, *s_rgb, *s_depth, *s_op;  // backward (g_w may be null)
};

// Decoder state of one recomputed sample.
template <typename acc_t>
struct SampleState {
  acc_t *f, *a, *h, *dh, *o;  // features [C], scratch [Hd], softplus and softplus' [Hd], output [O]
  acc_t u[3];                 // the point in plane units
  acc_t z, sigma, dc;         // depth, density, g_rgb . rgb (backward)
};

// The point of a sample in plane units: u = (o + z d) * scale, the point rounded to the input dtype
// first as the reference's xyz tensor is.
template <typename scalar_t, typename acc_t>
G3DR_HD void sample_point(const scalar_t* o, const scalar_t* dir, acc_t z, acc_t scale, acc_t* u) {
  for (int k = 0; k < 3; ++k) {
    const scalar_t x = static_cast<scalar_t>(static_cast<acc_t>(o[k]) +
                                             static_cast<acc_t>(static_cast<scalar_t>(z)) * static_cast<acc_t>(dir[k]));
    u[k] = static_cast<acc_t>(x) * scale;
  }
}

// Recompute sample s of a ray (batch element b): point, features, decoder; full = false computes the
// density only (no colour rows, no softplus').
template <typename scalar_t, typename acc_t>
G3DR_HD void recompute_sample(const RenderArgs<scalar_t, acc_t>& c, int64_t ray, int64_t b, int64_t s,
                              SampleState<acc_t>& x, bool full) {
  x.z = static_cast<acc_t>(c.dz[ray * c.S + s]);
  sample_point(c.ro + ray * 3, c.rd + ray * 3, x.z, c.scale, x.u);
  point_features(c.pv, b, x.u, c.plane_axes, x.f);
  mlp_forward<acc_t>(x.f, static_cast<int>(c.C), c.w1t, c.b1, static_cast<int>(c.Hd), c.w2, c.b2,
                     full ? static_cast<int>(c.O) : 1, x.a, x.h, full ? x.dh : nullptr, x.o);
  x.sigma = x.o[0];
}

// The forward composite of one ray, fed one decoded sample at a time (the CUDA kernel as it decodes,
// the CPU kernel over a decoded tile): interval (s-1, s) adds w = alpha T to the colour (mean of the
// two samples' colours), opacity and depth, and w to the weights row when out_w is set.
// acc_rgb and prev_rgb are caller scratch of D each.
template <typename scalar_t, typename acc_t>
struct RayComposite {
  acc_t* acc_rgb;
  acc_t* prev_rgb;
  acc_t T, opacity, wt, prev_sigma, prev_z;

  G3DR_HD RayComposite(acc_t* acc, acc_t* prev, int64_t D)
      : acc_rgb(acc), prev_rgb(prev), T(1), opacity(0), wt(0), prev_sigma(0), prev_z(0) {
    for (int64_t k = 0; k < D; ++k) acc_rgb[k] = acc_t(0);
  }

  // Sample s at depth zs with density sigma and colour rgb [D] (activated).
  G3DR_HD void add(const RenderArgs<scalar_t, acc_t>& c, int64_t ray, int64_t s, acc_t zs, acc_t sigma,
                   const acc_t* rgb) {
    const int64_t D = c.D;
    if (s > 0) {
      const composite::Interval<acc_t> iv =
          composite::interval<acc_t>(acc_t(0.5) * (prev_sigma + sigma), zs - prev_z, c.prm.density_bias);
      const acc_t w = iv.alpha * T;
      for (int64_t k = 0; k < D; ++k) acc_rgb[k] += w * (acc_t(0.5) * (prev_rgb[k] + rgb[k]));
      opacity += w;
      wt += w * (acc_t(0.5) * (prev_z + zs));
      if (c.out_w != nullptr) c.out_w[ray * (c.S - 1) + s - 1] = static_cast<scalar_t>(w);
      T *= iv.trans;
    }
    for (int64_t k = 0; k < D; ++k) prev_rgb[k] = rgb[k];
    prev_sigma = sigma;
    prev_z = zs;
  }

  // Writes the ray's rgb (over the background), opacity and depth.
  G3DR_HD void finish(const RenderArgs<scalar_t, acc_t>& c, int64_t ray) const {
    const int64_t D = c.D;
    const acc_t bg = c.prm.white_bg ? acc_t(1) - opacity : acc_t(0);
    for (int64_t k = 0; k < D; ++k) c.out_rgb[ray * D + k] = static_cast<scalar_t>(acc_rgb[k] + bg);
    c.out_opacity[ray] = static_cast<scalar_t>(opacity);
    c.out_depth[ray] = static_cast<scalar_t>(wt / (opacity + c.prm.eps));
  }
};

// Forward of one ray: stream the samples, composite as they come, write the ray's outputs (and its
// weights when out_w is set). Scratch: f [C], a [Hd], h [Hd], o [O], acc_rgb [D], prev_rgb [D].
template <typename scalar_t, typename acc_t>
G3DR_HD void ray_forward_fused(const RenderArgs<scalar_t, acc_t>& c, int64_t ray, acc_t* f, acc_t* a, acc_t* h,
                               acc_t* o, acc_t* acc_rgb, acc_t* prev_rgb) {
  const int64_t S = c.S, D = c.D, b = ray / c.R;
  const scalar_t* z = c.dz + ray * S;
  RayComposite<scalar_t, acc_t> rc(acc_rgb, prev_rgb, D);
  for (int64_t s = 0; s < S; ++s) {
    const acc_t zs = static_cast<acc_t>(z[s]);
    acc_t u[3];
    sample_point(c.ro + ray * 3, c.rd + ray * 3, zs, c.scale, u);
    point_features(c.pv, b, u, c.plane_axes, f);
    mlp_forward<acc_t>(f, static_cast<int>(c.C), c.w1t, c.b1, static_cast<int>(c.Hd), c.w2, c.b2,
                       static_cast<int>(c.O), a, h, nullptr, o);
    for (int64_t k = 0; k < D; ++k) o[1 + k] = rgb_activation(o[1 + k]);  // o[1:] is now the colour
    rc.add(c, ray, s, zs, o[0], o + 1);
  }
  rc.finish(c, ray);
}

// The ray's weights gradient row, or null when there is none or it is all zeros.
template <typename scalar_t, typename acc_t>
G3DR_HD const scalar_t* ray_weights_grad(const RenderArgs<scalar_t, acc_t>& c, int64_t ray) {
  if (c.g_w == nullptr) return nullptr;
  const scalar_t* row = c.g_w + ray * (c.S - 1);
  for (int64_t i = 0; i + 1 < c.S; ++i) {
    if (static_cast<acc_t>(row[i]) != acc_t(0)) return row;
  }
  return nullptr;
}

// sum_i w_i g_weights_i of a ray, which joins the total of ray_grad_setup before the scan can start.
// stored: states has S entries, filled here with every sample's full state for the scan to reuse;
// otherwise states has 2 entries and only the densities are recomputed (the scan recomputes again).
template <typename scalar_t, typename acc_t>
G3DR_HD acc_t ray_weights_total(const RenderArgs<scalar_t, acc_t>& c, int64_t ray, int64_t b,
                                SampleState<acc_t>* states, bool stored, const scalar_t* gwr) {
  acc_t T = acc_t(1), total = acc_t(0);
  for (int64_t s = 0; s < c.S; ++s) {
    SampleState<acc_t>& cur = states[stored ? s : (s & 1)];
    recompute_sample(c, ray, b, s, cur, stored);
    if (s > 0) {
      const SampleState<acc_t>& prev = states[stored ? s - 1 : ((s & 1) ^ 1)];
      const composite::Interval<acc_t> iv =
          composite::interval<acc_t>(acc_t(0.5) * (prev.sigma + cur.sigma), cur.z - prev.z, c.prm.density_bias);
      total += iv.alpha * T * static_cast<acc_t>(gwr[s - 1]);
      T *= iv.trans;
    }
  }
  return total;
}

// Backward of one ray: a forward scan recomputing T_i (and, unless stored, every sample into two
// rotating states); interval i's density gradient uses suffix = total - prefix_i; a sample's output
// gradient go = dL/do [O] is complete one interval after the sample and goes to
// backprop(state, s, go, nonzero) (decoder and planes; the backend's accumulation). gwr: the ray's
// weights gradient (rg.total must already include ray_weights_total) or null. go: scratch [O].
// Returns whether any sample had a non-zero gradient.
template <typename scalar_t, typename acc_t, typename Backprop>
G3DR_HD bool ray_backward_scan(const RenderArgs<scalar_t, acc_t>& c, int64_t ray, int64_t b,
                               SampleState<acc_t>* states, bool stored, const scalar_t* gwr, const RayGrad<acc_t>& rg,
                               acc_t* go, Backprop& backprop) {
  const int64_t S = c.S, D = c.D;
  const scalar_t* gr = c.g_rgb + ray * D;
  const acc_t tgt = c.target != nullptr ? static_cast<acc_t>(c.target[ray]) : acc_t(0);
  bool touched = false;
  // Sample x's output gradient from dL/dsigma = gsig and dL/drgb = kw * g_rgb, then backprop.
  auto emit = [&](const SampleState<acc_t>& x, int64_t s, acc_t gsig, acc_t kw) {
    go[0] = gsig;
    bool any = gsig != acc_t(0);
    for (int64_t k = 0; k < D; ++k) {
      go[1 + k] = kw * static_cast<acc_t>(gr[k]) * rgb_activation_grad(x.o[1 + k]);
      any = any || go[1 + k] != acc_t(0);
    }
    backprop(x, s, go, any);
    touched = touched || any;
  };
  acc_t T = acc_t(1), prefix = acc_t(0), prev_gsm = acc_t(0), prev_kw = acc_t(0);
  for (int64_t s = 0; s < S; ++s) {
    SampleState<acc_t>& cur = states[stored ? s : (s & 1)];
    if (!stored) recompute_sample(c, ray, b, s, cur, true);
    cur.dc = acc_t(0);
    for (int64_t k = 0; k < D; ++k) cur.dc += static_cast<acc_t>(gr[k]) * rgb_activation(cur.o[1 + k]);
    if (s == 0) continue;
    const SampleState<acc_t>& prev = states[stored ? s - 1 : ((s & 1) ^ 1)];
    const acc_t delta = cur.z - prev.z, t_mid = acc_t(0.5) * (prev.z + cur.z);
    const composite::Interval<acc_t> iv =
        composite::interval<acc_t>(acc_t(0.5) * (prev.sigma + cur.sigma), delta, c.prm.density_bias);
    const acc_t wi = iv.alpha * T;
    acc_t G = acc_t(0.5) * (prev.dc + cur.dc) + rg.gd * t_mid + rg.base;
    if (gwr != nullptr) G += static_cast<acc_t>(gwr[s - 1]);
    prefix += wi * G;
    acc_t gsm = interval_density_grad<acc_t>(iv, T, G, rg.total - prefix, delta);
    acc_t kw = wi;
    if (c.target != nullptr) {
      const acc_t k = composite::depth_kernel<acc_t>(tgt, t_mid, c.prm);
      gsm *= k;
      kw *= k;
    }
    // sample s-1 now has both of its intervals: 0.5 (g_mid_{s-2} + g_mid_{s-1})
    emit(prev, s - 1, acc_t(0.5) * (prev_gsm + gsm), acc_t(0.5) * (prev_kw + kw));
    prev_gsm = gsm;
    prev_kw = kw;
    T *= iv.trans;
  }
  emit(states[stored ? S - 1 : ((S - 1) & 1)], S - 1, acc_t(0.5) * prev_gsm, acc_t(0.5) * prev_kw);
  return touched;
}

}  // namespace render
}  // namespace g3dr
