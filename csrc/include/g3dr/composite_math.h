// Volume compositing (EG3D's MipRayMarcher) with G3DR's depth-kernel gradient scaling: the per-interval
// formulas and the per-ray forward/backward scans, shared by the C++ CPU kernel (csrc/cpu/composite.cpp)
// and the CUDA kernel (csrc/cuda/composite.cu). Everything here compiles as host C++ and as CUDA.
//
// On the I = S-1 intervals of a ray (DESIGN.md, g3dr_kernels.reference.composite):
//   sm_i = (sigma_i + sigma_{i+1})/2, c_i = (rgb_i + rgb_{i+1})/2, t_i = (depth_i + depth_{i+1})/2,
//   delta_i = depth_{i+1} - depth_i, x_i = softplus(sm_i + density_bias) * delta_i,
//   alpha_i = 1 - exp(-x_i), p_i = 1 - alpha_i + 1e-10, T_i = prod_{j<i} p_j, w_i = alpha_i T_i,
//   rgb = sum w_i c_i (+ 1 - opacity if white_bg), opacity = sum w_i, depth = sum w_i t_i / (opacity + eps).
// Backward, with G_i = dL/dw_i = g_rgb.c_i + g_depth (t_i - depth)/(opacity + eps) + g_opacity
//   (- sum_d g_rgb_d if white_bg) + g_weights_i:
//   dL/dalpha_i = T_i G_i - (sum_{j>i} w_j G_j) / p_i,
//   dL/dsm_i = k_i * dL/dalpha_i * exp(-x_i) * delta_i * softplus'(sm_i + bias),  dL/dc_i = k_i * w_i * g_rgb,
// k_i = min(c_max, max(s1 exp(-(target - t_i)^2 / s2), c_min)) with a target depth, else 1.
// The suffix sum sum_{j>i} w_j G_j is total - prefix_i, where the total comes from the saved per-ray
// outputs (no per-interval state is saved between forward and backward).
//
// Numerics: alpha_i = -expm1(-x_i) and p_i = exp(-x_i) + 1e-10 (exact forms of the reference's
// 1 - exp(-x) and 1 - alpha + 1e-10); softplus(z) = max(z, 0) + log1p(exp(-|z|)) below torch's threshold
// of 20 and z above it (torch's softplus), softplus' = sigmoid(z) (1 above 20). dL/dsm_i is formed as
// ga_i T_i G_i - gb_i suffix_i with gb_i = (exp(-x_i)/p_i) delta_i softplus'_i k_i, a ratio <= 1, so a
// saturated interval (alpha -> 1, p_i = 1e-10) does not amplify the rounding error of the suffix sum;
// delta = 0 gives alpha = 0 and a zero density gradient.
//
// The scans read the per-interval coefficients (Coef) from a source: OnTheFly computes them from the
// samples with the scalar math below (the CUDA kernel, and the CPU kernel in float64, so the CPU tests
// cover the GPU's math); the CPU kernel in float32 first fills a table for a block of rays with
// vectorised transcendentals (csrc/cpu/composite.cpp), through the same stage functions
// (softplus_stage, alpha_stage, kernel_stage, grad_coefs).
#pragma once

#include <cmath>
#include <cstdint>

#include "g3dr/common.h"

namespace g3dr {
namespace composite {

// The 1e-10 of MipRayMarcher's shifted alphas (1 - alpha + 1e-10).
constexpr double kTransmittanceEps = 1e-10;
// torch.nn.functional.softplus's default threshold: softplus(z) = z above it (see common.h).
constexpr double kSoftplusThreshold = 20.0;

// The op's options: Params<double> is the block the op boundary reads (g3dr/params.h), a kernel takes
// Params<acc_t> (g3dr::cast). fields() is the one list of them, in the op schemas' order.
template <typename T>
struct Params {
  T s1, s2, c_min, c_max;  // DepthKernel
  T density_bias, eps;
  bool white_bg;

  // f(name, p.field...) for every field in order, over one block or several of any T (host code).
  template <typename F, typename... P>
  static void fields(F&& f, P&... p) {
    f("s1", p.s1...);
    f("s2", p.s2...);
    f("c_min", p.c_min...);
    f("c_max", p.c_max...);
    f("density_bias", p.density_bias...);
    f("eps", p.eps...);
    f("white_bg", p.white_bg...);
  }
};

// Math on the accumulation type, via std:: on the host and the CUDA overloads on the device.
template <typename T>
G3DR_HD T exp_(T x) {
  using std::exp;
  return exp(x);
}
template <typename T>
G3DR_HD T expm1_(T x) {
  using std::expm1;
  return expm1(x);
}
template <typename T>
G3DR_HD T log1p_(T x) {
  using std::log1p;
  return log1p(x);
}

// ---- stage functions: the formulas between the transcendental calls (shared by every path) ----

// softplus(z) and softplus'(z) from u = exp(-|z|) and l = log1p(u).
// (Both sides of every select are computed first: a pure select lets the CPU loops vectorise.)
template <typename T>
G3DR_HD void softplus_stage(T z, T u, T l, T& sp, T& dsp) {
  const bool lin = z > T(kSoftplusThreshold);
  const T sp_log = (z > T(0) ? z : T(0)) + l;
  const T sig = (z >= T(0) ? T(1) : u) / (T(1) + u);
  sp = lin ? z : sp_log;
  dsp = lin ? T(1) : sig;
}

// One interval's opacity and what the backward needs.
template <typename T>
struct Interval {
  T alpha;  // 1 - exp(-x)
  T trans;  // p = exp(-x) + 1e-10, the factor it contributes to the transmittance
  T e;      // exp(-x) = d alpha / d x
  T dsp;    // softplus'(sm + bias): sigmoid, or 1 above the threshold (as torch's softplus backward)
};

// From E = exp(-x) and M = expm1(-x).
template <typename T>
G3DR_HD Interval<T> alpha_stage(T E, T M, T dsp) {
  Interval<T> iv;
  iv.alpha = -M;
  iv.e = E;
  iv.trans = E + T(kTransmittanceEps);
  iv.dsp = dsp;
  return iv;
}

// k from q = exp(-(target - t)^2 / s2): min(c_max, max(s1 q, c_min)), in DepthKernel.__call__'s order.
template <typename T>
G3DR_HD T kernel_stage(T q, const Params<T>& prm) {
  T k = prm.s1 * q;
  k = k < prm.c_min ? prm.c_min : k;
  return k > prm.c_max ? prm.c_max : k;
}

// dL/dsm = ga * T G - gb * suffix, with the depth-kernel factor k folded in.
template <typename T>
G3DR_HD void grad_coefs(const Interval<T>& iv, T delta, T k, T& ga, T& gb) {
  const T f = delta * iv.dsp * k;
  ga = iv.e * f;
  gb = (iv.e / iv.trans) * f;
}

// ---- scalar per-interval math ----

template <typename T>
G3DR_HD Interval<T> interval(T sigma_mid, T delta, T density_bias) {
  const T z = sigma_mid + density_bias;
  const T u = exp_(-(z < T(0) ? -z : z));
  T sp, dsp;
  softplus_stage(z, u, log1p_(u), sp, dsp);
  const T x = sp * delta;
  return alpha_stage(exp_(-x), expm1_(-x), dsp);
}

template <typename T>
G3DR_HD T depth_kernel(T target, T t, const Params<T>& prm) {
  const T d = target - t;
  return kernel_stage(exp_(-(d * d) / prm.s2), prm);
}

// ---- per-interval coefficient sources for the scans ----

template <typename T>
struct Coef {
  T alpha, trans;  // forward
  T ga, gb, k;     // backward: dL/dsm = ga T G - gb suffix; dL/dc_mid = k w g_rgb
};

// Computes the coefficients of interval i from the ray's samples (scalar math).
template <typename scalar_t, typename acc_t>
struct OnTheFly {
  const scalar_t* __restrict__ sigma;  // [S]
  const scalar_t* __restrict__ depths;  // [S]
  const scalar_t* __restrict__ target;  // the ray's target depth, or nullptr
  Params<acc_t> prm;

  template <bool Grad>
  G3DR_HD Coef<acc_t> get(int64_t i) const {
    const acc_t t_lo = static_cast<acc_t>(depths[i]), t_hi = static_cast<acc_t>(depths[i + 1]);
    const acc_t delta = t_hi - t_lo;
    const Interval<acc_t> iv = interval<acc_t>(
        acc_t(0.5) * (static_cast<acc_t>(sigma[i]) + static_cast<acc_t>(sigma[i + 1])), delta, prm.density_bias);
    Coef<acc_t> c;
    c.alpha = iv.alpha;
    c.trans = iv.trans;
    if (Grad) {
      c.k = target != nullptr ? depth_kernel<acc_t>(static_cast<acc_t>(*target), acc_t(0.5) * (t_lo + t_hi), prm)
                              : acc_t(1);
      grad_coefs(iv, delta, c.k, c.ga, c.gb);
    }
    return c;
  }
};

// Reads precomputed coefficients of a ray ([I] arrays; the backward ones may be null in the forward).
template <typename T>
struct Table {
  const T* __restrict__ alpha;
  const T* __restrict__ trans;
  const T* __restrict__ ga;
  const T* __restrict__ gb;
  const T* __restrict__ k;  // nullptr without a target

  template <bool Grad>
  G3DR_HD Coef<T> get(int64_t i) const {
    Coef<T> c;
    c.alpha = alpha[i];
    c.trans = trans[i];
    if (Grad) {
      c.ga = ga[i];
      c.gb = gb[i];
      c.k = k != nullptr ? k[i] : T(1);
    }
    return c;
  }
};

// ---- per-ray scans ----

// Forward for one ray and the channels [d0, d0 + CH) of D (guarded). The scalar outputs (depth,
// opacity, weights) are written by the chunk with d0 == 0. Rows: depths [S], rgb [S, D], out_rgb [D];
// weights [S-1] or nullptr.
template <int CH, typename scalar_t, typename acc_t, typename Src>
G3DR_HD void ray_forward(const Src& src, const scalar_t* __restrict__ rgb, const scalar_t* __restrict__ depths,
                         int64_t S, int64_t D, int64_t d0, const Params<acc_t>& prm, scalar_t* __restrict__ out_rgb,
                         scalar_t* __restrict__ out_depth, scalar_t* __restrict__ out_opacity,
                         scalar_t* __restrict__ weights) {
  acc_t acc[CH];
  G3DR_UNROLL
  for (int c = 0; c < CH; ++c) acc[c] = acc_t(0);
  const int64_t nd = (D - d0) < CH ? (D - d0) : CH;
  const bool scalars = d0 == 0;
  acc_t T = acc_t(1), opacity = acc_t(0), wt = acc_t(0);
  acc_t t_lo = static_cast<acc_t>(depths[0]);
  for (int64_t i = 0; i + 1 < S; ++i) {
    const acc_t t_hi = static_cast<acc_t>(depths[i + 1]);
    const Coef<acc_t> cf = src.template get<false>(i);
    const acc_t w = cf.alpha * T;
    const scalar_t* c0 = rgb + i * D + d0;
    G3DR_UNROLL
    for (int c = 0; c < CH; ++c) {
      if (c < nd) {
        acc[c] += w * (acc_t(0.5) * (static_cast<acc_t>(c0[c]) + static_cast<acc_t>(c0[c + D])));
      }
    }
    opacity += w;  // every chunk needs it for the white background
    if (scalars) {
      wt += w * (acc_t(0.5) * (t_lo + t_hi));
      if (weights != nullptr) weights[i] = static_cast<scalar_t>(w);
    }
    T *= cf.trans;
    t_lo = t_hi;
  }
  if (scalars) {
    *out_opacity = static_cast<scalar_t>(opacity);
    *out_depth = static_cast<scalar_t>(wt / (opacity + prm.eps));
  }
  const acc_t bg = prm.white_bg ? acc_t(1) - opacity : acc_t(0);
  G3DR_UNROLL
  for (int c = 0; c < CH; ++c) {
    if (c < nd) out_rgb[d0 + c] = static_cast<scalar_t>(acc[c] + bg);
  }
}

// Backward for one ray. Rows: g_rgb, out_rgb [D]; g_weights [S-1] or nullptr; rgb [S, D], depths [S].
// Writes grad_sigma [S] and grad_rgb [S, D] (every entry). DC > 0: D == DC known at compile time (the
// per-sample channel loops unroll); DC = 0: any D.
template <typename scalar_t, typename acc_t, int DC = 0, typename Src>
G3DR_HD void ray_backward(const Src& src, const scalar_t* __restrict__ g_rgb, acc_t g_depth, acc_t g_opacity,
                          const scalar_t* __restrict__ g_weights, const scalar_t* __restrict__ rgb,
                          const scalar_t* __restrict__ depths, const scalar_t* __restrict__ out_rgb, acc_t depth,
                          acc_t opacity, int64_t S, int64_t D_, const Params<acc_t>& prm,
                          scalar_t* __restrict__ grad_sigma, scalar_t* __restrict__ grad_rgb) {
  const int64_t D = DC > 0 ? DC : D_;
  // G_i = g_rgb.c_i + gd * t_i + base (+ g_weights_i)
  const acc_t gd = g_depth / (opacity + prm.eps);
  acc_t sum_g = acc_t(0), dot_out = acc_t(0);
  for (int64_t d = 0; d < D; ++d) {
    const acc_t g = static_cast<acc_t>(g_rgb[d]);
    sum_g += g;
    dot_out += g * static_cast<acc_t>(out_rgb[d]);
  }
  const acc_t base = g_opacity - (prm.white_bg ? sum_g : acc_t(0)) - gd * depth;
  // total = sum_i w_i G_i from the saved outputs: sum w c = out_rgb (- (1 - opacity) with white_bg),
  // sum w t = depth (opacity + eps), sum w = opacity.
  const acc_t dot_core = dot_out - (prm.white_bg ? sum_g * (acc_t(1) - opacity) : acc_t(0));
  acc_t total = dot_core + gd * depth * (opacity + prm.eps) + base * opacity;
  if (g_weights != nullptr) {  // + sum_i w_i g_weights_i: one more scan (weights are not saved)
    acc_t T = acc_t(1);
    for (int64_t i = 0; i + 1 < S; ++i) {
      const Coef<acc_t> cf = src.template get<false>(i);
      total += cf.alpha * T * static_cast<acc_t>(g_weights[i]);
      T *= cf.trans;
    }
  }

  auto dot_sample = [&](int64_t s) {  // g_rgb . rgb_s
    acc_t v = acc_t(0);
    const scalar_t* c = rgb + s * D;
    for (int64_t d = 0; d < D; ++d) v += static_cast<acc_t>(g_rgb[d]) * static_cast<acc_t>(c[d]);
    return v;
  };
  auto write_rgb_grad = [&](int64_t s, acc_t scale) {  // grad_rgb_s = scale * g_rgb
    scalar_t* o = grad_rgb + s * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(scale * static_cast<acc_t>(g_rgb[d]));
  };

  acc_t T = acc_t(1), prefix = acc_t(0), prev_gsm = acc_t(0), prev_kw = acc_t(0);
  acc_t t_lo = static_cast<acc_t>(depths[0]), dc_lo = dot_sample(0);
  for (int64_t i = 0; i + 1 < S; ++i) {
    const acc_t t_hi = static_cast<acc_t>(depths[i + 1]);
    const acc_t dc_hi = dot_sample(i + 1);
    const Coef<acc_t> cf = src.template get<true>(i);
    const acc_t w = cf.alpha * T;
    acc_t G = acc_t(0.5) * (dc_lo + dc_hi) + gd * (acc_t(0.5) * (t_lo + t_hi)) + base;
    if (g_weights != nullptr) G += static_cast<acc_t>(g_weights[i]);
    prefix += w * G;
    const acc_t gsm = cf.ga * (T * G) - cf.gb * (total - prefix);  // total - prefix = sum_{j>i} w_j G_j
    const acc_t kw = cf.k * w;
    grad_sigma[i] = static_cast<scalar_t>(acc_t(0.5) * (prev_gsm + gsm));
    write_rgb_grad(i, acc_t(0.5) * (prev_kw + kw));
    prev_gsm = gsm;
    prev_kw = kw;
    T *= cf.trans;
    t_lo = t_hi;
    dc_lo = dc_hi;
  }
  grad_sigma[S - 1] = static_cast<scalar_t>(acc_t(0.5) * prev_gsm);
  write_rgb_grad(S - 1, acc_t(0.5) * prev_kw);
}

}  // namespace composite
}  // namespace g3dr
