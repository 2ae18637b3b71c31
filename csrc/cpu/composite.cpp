// Volume compositing with depth-kernel gradient scaling: the CPU kernels (the op boundary, with the
// schemas, checks and outputs, is csrc/ops/composite.cpp).
// The per-ray math is g3dr::composite::ray_forward / ray_backward (csrc/include/g3dr/composite_math.h);
// this file runs it over the rays with at::parallel_for (float32
// first computes each block of rays' per-interval coefficients with vectorised transcendentals).
// Contract: g3dr_kernels/ops/composite.py.

// The float32 coefficient loops below vectorise only if the compiler may evaluate both sides of a select
// (GCC otherwise keeps branches around arithmetic that "could trap"): nothing here enables FP exceptions,
// and -fno-trapping-math changes no result. fp-contract=fast lets the AVX2+FMA build of those loops fuse
// multiply-adds (-std=c++20 turns contraction off); everything else is compiled for the baseline ISA,
// which has no FMA, so it changes nothing there. Before every include, so inline functions share one set
// of options.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>
#include <optional>

#include "g3dr/composite_math.h"
#include "g3dr/composite_op.h"

namespace g3dr {
namespace composite {

namespace {

// Runs body(begin, end) on chunks of rays covering [0, n), handed out to the at::parallel_for threads
// one at a time: a thread that is held up (a busy core) costs the call one chunk, not a fixed share
// of the rays. A chunk is about 16K intervals (~0.1-1 ms of work).
template <typename Body>
void parallel_rays(int64_t n, int64_t S, const Body& body) {
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
    }
  });
}

// Per-thread scratch for the coefficient tables (reused across chunks and calls).
float* scratch(int64_t size) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < size) buf.resize(size);
  return buf.data();
}

// ---------------------------------------------------------------------------------------------------
// float32: the transcendentals of a whole ray at once, in branch-free float code that the compiler
// vectorises (SSE2 everywhere, and an AVX2+FMA build picked at run time where the CPU has it). Each is
// within a few ulps of libm: Cephes-style range reduction and polynomials.
// ---------------------------------------------------------------------------------------------------
// (Always inlined, so that each build below compiles them for its own instruction set.)
#if defined(__GNUC__)
#define G3DR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define G3DR_ALWAYS_INLINE inline
#endif

namespace vmath {

G3DR_ALWAYS_INLINE float float_of(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

G3DR_ALWAYS_INLINE int32_t bits_of(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// E = exp(-a) and M = expm1(-a) for a >= 0 (NaN stays NaN). Above 87.3 (where exp(-a) leaves the normal
// range) a is clamped: E = 1.2e-38 instead of something smaller, M = -1. The clamp is a blend of bit
// patterns so that the compiler sees one straight path and vectorises it, rather than a branch with a
// constant result.
G3DR_ALWAYS_INLINE void exp_expm1_neg(float a, float& E, float& M) {
  const int32_t kClamp = bits_of(87.3f);
  const int32_t keep = -static_cast<int32_t>(!(a >= 87.3f));  // all ones when a < 87.3 or a is NaN
  const float y = -float_of((bits_of(a) & keep) | (kClamp & ~keep));
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504088896341f + magic) - magic;
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;  // |r| <= ln2/2, Cody-Waite split of ln2
  // expm1(r) = r + r^2 p(r), Taylor to r^8 (truncation < 1e-9 relative on |r| <= 0.35); p in Estrin's
  // scheme, whose short dependency chains keep the vector units busy.
  const float r2 = r * r, r4 = r2 * r2;
  const float p = ((0.5f + r * (1.f / 6.f)) + r2 * (1.f / 24.f + r * (1.f / 120.f))) +
                  r4 * ((1.f / 720.f + r * (1.f / 5040.f)) + r2 * (1.f / 40320.f));
  const float em = r + r2 * p;
  const float s = float_of((static_cast<int32_t>(n) + 127) << 23);  // 2^n, n in [-126, 0]
  E = s * em + s;
  M = s * em + (s - 1.f);  // s - 1 is exact for n >= -24 and rounds to -1 below
}

// log1p(u) for u in [0, 1] (Cephes logf's polynomial on [sqrt(1/2) - 1, sqrt(2) - 1]).
G3DR_ALWAYS_INLINE float log1p_unit(float u) {
  const bool big = u > 0.41421356f;  // 1 + u > sqrt(2): log1p(u) = ln 2 + log1p((u - 1) / 2)
  const float f_big = (u - 1.f) * 0.5f;
  const float f = big ? f_big : u;
  // log1p(f) = f - f^2/2 + f^3 P(f), P of degree 8 in Estrin's scheme
  const float z = f * f, z2 = z * z;
  const float P = ((3.3333331174e-1f - 2.4999993993e-1f * f) + z * (2.0000714765e-1f - 1.6668057665e-1f * f)) +
                  z2 * (((1.4249322787e-1f - 1.2420140846e-1f * f) + z * (1.1676998740e-1f - 1.1514610310e-1f * f)) +
                        z2 * 7.0376836292e-2f);
  float y = P * f * z;
  y += big ? -2.12194440e-4f : 0.f;
  y -= 0.5f * z;
  const float res = f + y;
  const float res_big = res + 0.693359375f;
  return big ? res_big : res;
}

}  // namespace vmath

// The coefficients of the sample pairs (j, j+1), j < n, of a block of consecutive rays (float32): alpha,
// trans and, with Grad, ga, gb (and k with Target; target holds each pair's ray target). Interval i of the
// block's ray q is entry q S + i; the entries that pair one ray's last sample with the next ray's first
// are computed and never read (one long loop vectorises better than many of length S-1).
// Same stage functions as composite::interval / depth_kernel, with vmath's transcendentals.
template <bool Grad, bool Target>
G3DR_ALWAYS_INLINE void fill_table_impl(const float* __restrict__ sigma, const float* __restrict__ depths, int64_t n,
                                        const Params<float>& prm, const float* __restrict__ target,
                                        float* __restrict__ alpha, float* __restrict__ trans, float* __restrict__ ga,
                                        float* __restrict__ gb, float* __restrict__ k) {
  const Params<float> P = prm;  // a local copy: no loads the compiler must guard inside the loop
  const float bias = P.density_bias;
  for (int64_t j = 0; j < n; ++j) {
    const float z = 0.5f * (sigma[j] + sigma[j + 1]) + bias;
    const float delta = depths[j + 1] - depths[j];
    float u, unused, sp, dsp, E, M;
    vmath::exp_expm1_neg(std::fabs(z), u, unused);
    softplus_stage(z, u, vmath::log1p_unit(u), sp, dsp);
    vmath::exp_expm1_neg(sp * delta, E, M);
    const Interval<float> iv = alpha_stage(E, M, dsp);
    alpha[j] = iv.alpha;
    trans[j] = iv.trans;
    if (Grad) {
      float kk = 1.f;
      if (Target) {
        const float d = target[j] - 0.5f * (depths[j] + depths[j + 1]);
        float q;
        vmath::exp_expm1_neg((d * d) / P.s2, q, unused);
        kk = kernel_stage(q, P);
        k[j] = kk;
      }
      grad_coefs(iv, delta, kk, ga[j], gb[j]);
    }
  }
}

// Each fill is compiled twice on x86-64: for the baseline ISA (SSE2) and for AVX2+FMA, picked at run time.
#define G3DR_FILL_BODIES(SUFFIX, ATTR)                                                                          \
  ATTR void fill_table_fwd_##SUFFIX(const float* __restrict__ sigma, const float* __restrict__ depths, int64_t n, \
                                    const Params<float>& prm, float* __restrict__ alpha,                          \
                                    float* __restrict__ trans) {                                                  \
    fill_table_impl<false, false>(sigma, depths, n, prm, nullptr, alpha, trans, nullptr, nullptr, nullptr);        \
  }                                                                                                               \
  ATTR void fill_table_bwd_##SUFFIX(const float* __restrict__ sigma, const float* __restrict__ depths, int64_t n, \
                                    const Params<float>& prm, const float* __restrict__ target,                   \
                                    float* __restrict__ alpha, float* __restrict__ trans, float* __restrict__ ga,  \
                                    float* __restrict__ gb, float* __restrict__ k) {                              \
    if (target != nullptr) {                                                                                      \
      fill_table_impl<true, true>(sigma, depths, n, prm, target, alpha, trans, ga, gb, k);                         \
    } else {                                                                                                      \
      fill_table_impl<true, false>(sigma, depths, n, prm, nullptr, alpha, trans, ga, gb, nullptr);                 \
    }                                                                                                             \
  }

G3DR_FILL_BODIES(base, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define G3DR_HAVE_AVX2_FILL 1
#define G3DR_AVX2_ATTR __attribute__((target("avx2,fma")))
G3DR_FILL_BODIES(avx2, G3DR_AVX2_ATTR)

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

void fill_table_fwd(const float* sigma, const float* depths, int64_t n, const Params<float>& prm, float* alpha,
                    float* trans) {
#ifdef G3DR_HAVE_AVX2_FILL
  if (cpu_has_avx2_fma()) return fill_table_fwd_avx2(sigma, depths, n, prm, alpha, trans);
#endif
  fill_table_fwd_base(sigma, depths, n, prm, alpha, trans);
}

void fill_table_bwd(const float* sigma, const float* depths, int64_t n, const Params<float>& prm, const float* target,
                    float* alpha, float* trans, float* ga, float* gb, float* k) {
#ifdef G3DR_HAVE_AVX2_FILL
  if (cpu_has_avx2_fma()) return fill_table_bwd_avx2(sigma, depths, n, prm, target, alpha, trans, ga, gb, k);
#endif
  fill_table_bwd_base(sigma, depths, n, prm, target, alpha, trans, ga, gb, k);
}

// Rays per table block: about 2048 sample pairs, so the block's tables stay in L1/L2.
int64_t block_rays(int64_t S) { return std::max<int64_t>(1, 2048 / S); }

// One ray's forward for every channel chunk, from any coefficient source.
template <int CH, typename scalar_t, typename Src>
inline void forward_ray(const Src& src, const scalar_t* rgb, const scalar_t* depths, int64_t S, int64_t D,
                        const Params<scalar_t>& prm, scalar_t* out_rgb, scalar_t* out_depth, scalar_t* out_opacity,
                        scalar_t* weights) {
  for (int64_t d0 = 0; d0 < D; d0 += CH) {
    ray_forward<CH, scalar_t, scalar_t>(src, rgb, depths, S, D, d0, prm, out_rgb, out_depth, out_opacity, weights);
  }
}

template <typename scalar_t, int CH>
void fwd_cpu_impl(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& depths, const Params<scalar_t>& prm,
                  at::Tensor& out_rgb, at::Tensor& out_depth, at::Tensor& out_opacity, at::Tensor* weights) {
  const int64_t n = sigma.size(0) * sigma.size(1), S = sigma.size(2), D = rgb.size(3);
  const scalar_t* sg = sigma.const_data_ptr<scalar_t>();
  const scalar_t* c = rgb.const_data_ptr<scalar_t>();
  const scalar_t* t = depths.const_data_ptr<scalar_t>();
  scalar_t* orgb = out_rgb.mutable_data_ptr<scalar_t>();
  scalar_t* od = out_depth.mutable_data_ptr<scalar_t>();
  scalar_t* oo = out_opacity.mutable_data_ptr<scalar_t>();
  scalar_t* w = weights != nullptr ? weights->mutable_data_ptr<scalar_t>() : nullptr;
  parallel_rays(n, S, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t nb = block_rays(S);
      float* al = scratch(2 * nb * S);
      float* tr = al + nb * S;
      for (int64_t r0 = begin; r0 < end; r0 += nb) {
        const int64_t r1 = std::min(end, r0 + nb);
        fill_table_fwd(sg + r0 * S, t + r0 * S, (r1 - r0) * S - 1, prm, al, tr);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = (r - r0) * S;
          const Table<float> src{al + o, tr + o, nullptr, nullptr, nullptr};
          forward_ray<CH>(src, c + r * S * D, t + r * S, S, D, prm, orgb + r * D, od + r, oo + r,
                          w != nullptr ? w + r * (S - 1) : nullptr);
        }
      }
    } else {
      for (int64_t r = begin; r < end; ++r) {
        const OnTheFly<scalar_t, scalar_t> src{sg + r * S, t + r * S, nullptr, prm};
        forward_ray<CH>(src, c + r * S * D, t + r * S, S, D, prm, orgb + r * D, od + r, oo + r,
                        w != nullptr ? w + r * (S - 1) : nullptr);
      }
    }
  });
}

template <typename scalar_t>
void bwd_cpu_impl(const at::Tensor& g_rgb, const at::Tensor& g_depth, const at::Tensor& g_op,
                  const std::optional<at::Tensor>& g_w, const at::Tensor& sigma, const at::Tensor& rgb,
                  const at::Tensor& depths, const std::optional<at::Tensor>& target, const at::Tensor& o_rgb,
                  const at::Tensor& o_depth, const at::Tensor& o_op, const Params<scalar_t>& prm, at::Tensor& grad_sigma,
                  at::Tensor& grad_rgb) {
  const int64_t n = sigma.size(0) * sigma.size(1), S = sigma.size(2), D = rgb.size(3), I = S - 1;
  const scalar_t* gr = g_rgb.const_data_ptr<scalar_t>();
  const scalar_t* gd = g_depth.const_data_ptr<scalar_t>();
  const scalar_t* go = g_op.const_data_ptr<scalar_t>();
  const scalar_t* gw = g_w.has_value() ? g_w->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sg = sigma.const_data_ptr<scalar_t>();
  const scalar_t* c = rgb.const_data_ptr<scalar_t>();
  const scalar_t* t = depths.const_data_ptr<scalar_t>();
  const scalar_t* tg = target.has_value() ? target->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* orgb = o_rgb.const_data_ptr<scalar_t>();
  const scalar_t* od = o_depth.const_data_ptr<scalar_t>();
  const scalar_t* oo = o_op.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_sigma.mutable_data_ptr<scalar_t>();
  scalar_t* gc = grad_rgb.mutable_data_ptr<scalar_t>();
  parallel_rays(n, S, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t nb = block_rays(S), L = nb * S;
      float *al = scratch(6 * L), *tr = al + L, *ga = tr + L, *gb = ga + L, *kk = gb + L, *tt = kk + L;
      for (int64_t r0 = begin; r0 < end; r0 += nb) {
        const int64_t r1 = std::min(end, r0 + nb);
        if (tg != nullptr) {
          for (int64_t r = r0; r < r1; ++r) std::fill(tt + (r - r0) * S, tt + (r - r0 + 1) * S, tg[r]);
        }
        fill_table_bwd(sg + r0 * S, t + r0 * S, (r1 - r0) * S - 1, prm, tg != nullptr ? tt : nullptr, al, tr, ga, gb,
                       kk);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = (r - r0) * S;
          const Table<float> src{al + o, tr + o, ga + o, gb + o, tg != nullptr ? kk + o : nullptr};
          auto run = [&](auto dc) {
            ray_backward<scalar_t, scalar_t, decltype(dc)::value>(
                src, gr + r * D, gd[r], go[r], gw != nullptr ? gw + r * I : nullptr, c + r * S * D, t + r * S,
                orgb + r * D, od[r], oo[r], S, D, prm, gs + r * S, gc + r * S * D);
          };
          if (D == 3) {
            run(std::integral_constant<int, 3>{});
          } else {
            run(std::integral_constant<int, 0>{});
          }
        }
      }
    } else {
      for (int64_t r = begin; r < end; ++r) {
        const OnTheFly<scalar_t, scalar_t> src{sg + r * S, t + r * S, tg != nullptr ? tg + r : nullptr, prm};
        ray_backward<scalar_t, scalar_t>(src, gr + r * D, gd[r], go[r], gw != nullptr ? gw + r * I : nullptr,
                                         c + r * S * D, t + r * S, orgb + r * D, od[r], oo[r], S, D, prm, gs + r * S,
                                         gc + r * S * D);
      }
    }
  });
}

void check_dtype(const at::Tensor& sigma) {
  TORCH_CHECK(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == at::kDouble,
              "composite (cpu): float32 and float64 only, got ", sigma.scalar_type(),
              "; use backend='torch' for other dtypes on CPU");
}

}  // namespace

void fwd_cpu(const Inputs& in, const CompositeParams& p, Outputs& out) {
  check_dtype(in.sigma);
  AT_DISPATCH_FLOATING_TYPES(in.sigma.scalar_type(), "composite_fwd_cpu", [&] {
    const auto prm = cast<Params<scalar_t>>(p);
    at::Tensor* w = out.weights.dim() == 3 ? &out.weights : nullptr;  // else not asked for
    if (in.rgb.size(3) <= 4) {
      fwd_cpu_impl<scalar_t, 4>(in.sigma, in.rgb, in.depths, prm, out.rgb, out.depth, out.opacity, w);
    } else {
      fwd_cpu_impl<scalar_t, 8>(in.sigma, in.rgb, in.depths, prm, out.rgb, out.depth, out.opacity, w);
    }
  });
}

void bwd_cpu(const Inputs& in, const OutputGrads& g, const Outputs& saved, const CompositeParams& p, Grads& grads) {
  check_dtype(in.sigma);
  AT_DISPATCH_FLOATING_TYPES(in.sigma.scalar_type(), "composite_bwd_cpu", [&] {
    bwd_cpu_impl<scalar_t>(g.rgb, g.depth, g.opacity, g.weights, in.sigma, in.rgb, in.depths, in.target, saved.rgb,
                           saved.depth, saved.opacity, cast<Params<scalar_t>>(p), grads.sigma, grads.rgb);
  });
}

}  // namespace composite
}  // namespace g3dr
