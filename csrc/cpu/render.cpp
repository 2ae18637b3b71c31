// Fully fused renderer (points -> multi-resolution triplane sampling -> decoder -> composite): the CPU
// kernels. Contract: g3dr_kernels/ops/render.py; the op boundary (schemas, checks, outputs) is
// csrc/ops/render.cpp. The per-sample math and the
// per-ray loops live in csrc/include/g3dr/render_math.h (with sample_math.h and composite_math.h),
// shared with csrc/cuda/render.cu; this file lays the planes out channels-last and
// runs chunks of rays per thread with at::parallel_for, each batch element's rays in Morton order of
// their mid point (ray_order: texel rows reused from cache). On the CPU the decoder runs over tiles of
// whole rays (~256 samples): taps.h gathers and scatters, tile_gemm.h's small matrix products for the
// decoder and its backward, the shared per-ray compositing in between (see "tiles of samples" below).
//
// Memory: nothing of size B x R x S is ever allocated (per-thread tile buffers only). The forward writes
// per-ray outputs (and the weights when asked); the backward recomputes every sample once, a tile at a
// time, and accumulates plane and decoder gradients in per-chunk buffers that are reduced in a fixed
// order at the end (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "g3dr/render_math.h"
#include "g3dr/render_op.h"
#include "taps.h"
#include "tile_gemm.h"

namespace g3dr {
namespace render {

namespace {

// Rays per parallel_for grain in the forward, and the fewest rays a backward chunk gets (each chunk
// owns a plane-gradient buffer of one batch element, so chunks must not be tiny).
constexpr int64_t kFwdGrain = 8;
constexpr int64_t kMinRaysPerChunk = 64;
// The backward splits rays into chunks by thread count, and the chunks' plane gradients are summed
// in a fixed order, so results are bitwise reproducible for a given thread count but differ (by
// float rounding, ~1e-6 relative) between thread counts. Under torch.use_deterministic_algorithms(True)
// the split assumes this many threads whatever the real count: identical gradients for any count.
constexpr int64_t kDeterministicThreads = 8;

// The per-chunk loops are compiled three times on x86-64 (AVX-512, AVX2+FMA and baseline; the loader
// picks one), with every call inside them inlined so the shared header math gets the wider vectors too.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define G3DR_CPU_KERNEL __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) || defined(__clang__)
#define G3DR_CPU_KERNEL __attribute__((flatten))
#else
#define G3DR_CPU_KERNEL
#endif

// The flat channels-last layout of a [B,3,C,H,W] pyramid (taps.h): per batch element the levels
// [3,H,W,C] one after another, a corner's C channels contiguous.
tile::FlatPyramid flat_layout(at::TensorList levels) {
  tile::FlatPyramid fp{};
  fp.levels = static_cast<int>(levels.size());
  fp.C = static_cast<int>(levels[0].size(2));
  int64_t off = 0;
  for (int l = 0; l < fp.levels; ++l) {
    fp.H[l] = static_cast<int>(levels[l].size(3));
    fp.W[l] = static_cast<int>(levels[l].size(4));
    fp.level_off[l] = off;
    off += 3 * levels[l].size(3) * levels[l].size(4) * fp.C;
  }
  fp.P = off;
  return fp;
}

// The levels copied into one [B, P] buffer of that layout.
at::Tensor flat_channels_last(at::TensorList levels, const tile::FlatPyramid& fp) {
  const int64_t B = levels[0].size(0);
  at::Tensor flat = at::empty({B, fp.P}, levels[0].options());
  for (int l = 0; l < fp.levels; ++l) {
    const at::Tensor& lv = levels[l];
    flat.narrow(1, fp.level_off[l], 3 * fp.H[l] * fp.W[l] * fp.C)
        .view({B, 3, fp.H[l], fp.W[l], fp.C})
        .copy_(lv.permute({0, 1, 3, 4, 2}));
  }
  return flat;
}

template <typename T>
PyramidView<T> view_of(const at::Tensor& flat, const tile::FlatPyramid& fp) {
  PyramidView<T> v{};
  v.levels = fp.levels;
  v.C = fp.C;
  for (int l = 0; l < v.levels; ++l) {
    v.data[l] = flat.data_ptr<std::remove_const_t<T>>() + fp.level_off[l];
    v.H[l] = fp.H[l];
    v.W[l] = fp.W[l];
    v.batch_stride[l] = fp.P;
  }
  return v;
}

// Decoder weights in the accumulation type: w1 [Hd,C], its transpose [C,Hd], b1, w2 [O,Hd], b2.
struct Decoder {
  at::Tensor w1, w1t, b1, w2, b2;
};

Decoder decoder_in(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                   at::ScalarType acc) {
  Decoder d;
  d.w1 = w1.to(acc).contiguous();
  d.w1t = d.w1.t().contiguous();
  d.b1 = b1.to(acc).contiguous();
  d.w2 = w2.to(acc).contiguous();
  d.b2 = b2.to(acc).contiguous();
  return d;
}

template <typename scalar_t>
using Args = RenderArgs<scalar_t, at::opmath_type<scalar_t>>;

// What the CPU loops need: the per-ray arguments (shared with the CUDA kernel; pv points into the
// flat pyramid), the flat pyramid's layout, planes = its start ([B, P]), and the order in which the
// rays are processed: position q of [0, B R) is ray order[q] (see ray_order).
template <typename scalar_t>
struct Work {
  Args<scalar_t> a;
  tile::FlatPyramid fp;
  const scalar_t* planes;
  const int64_t* order;
};

// ---- ray order --------------------------------------------------------------------------------------
// The kernels process each batch element's rays sorted by the Morton code (3 x 10 bits) of the ray's
// point half way between its first and last sample, in plane units: rays that sample the same
// texels run one after another, so the texel rows of the pyramid and of its gradient buffer are
// reused from L1/L2 instead of fetched from L3 or memory. Rays of an image in row-major order sweep
// a whole plane per image row, a random set of rays jumps everywhere; at the G3DR size the sort
// made fwd+bwd 1.4x faster on random rays and 1.1x on a row-major image (benchmarks/results/
// render_cpu_speed.md). Results do not depend on the order except for the summation order of the
// plane gradients (fixed: ties are broken by ray index).
inline uint32_t spread_bits10(uint32_t v) {  // bit k of v -> bit 3k
  v &= 0x3ffu;
  v = (v | (v << 16)) & 0x030000ffu;
  v = (v | (v << 8)) & 0x0300f00fu;
  v = (v | (v << 4)) & 0x030c30c3u;
  v = (v | (v << 2)) & 0x09249249u;
  return v;
}

template <typename scalar_t>
std::vector<int64_t> ray_order(const Args<scalar_t>& c, int64_t B) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = c.R, S = c.S;
  std::vector<int64_t> order(B * R);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<uint32_t, int64_t>> keyed(R);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t ray = b * R + r;
        const acc_t zm = acc_t(0.5) * (static_cast<acc_t>(c.dz[ray * S]) + static_cast<acc_t>(c.dz[ray * S + S - 1]));
        acc_t u[3];
        sample_point(c.ro + ray * 3, c.rd + ray * 3, zm, c.scale, u);
        uint32_t key = 0;
        for (int m = 0; m < 3; ++m) {
          const acc_t q = (u[m] + acc_t(1)) * acc_t(512);  // the box [-1, 1] -> [0, 1024)
          uint32_t cell = 1023u;                             // also NaN
          if (q < acc_t(1023)) cell = q >= acc_t(0) ? static_cast<uint32_t>(q) : 0u;
          key |= spread_bits10(cell) << m;
        }
        keyed[r] = {key, ray};
      }
      std::sort(keyed.begin(), keyed.end());
      for (int64_t r = 0; r < R; ++r) order[b * R + r] = keyed[r].second;
    }
  });
  return order;
}

// What a backward chunk needs on top of that: chunk k covers part k % per_batch of batch element
// k / per_batch and owns row k of the plane-gradient and decoder-gradient buffers.
template <typename scalar_t>
struct Chunks {
  Work<scalar_t> w;
  int64_t per_batch, nW;
  at::opmath_type<scalar_t>* gplanes;  // [B * per_batch, P], the flat layout
  double* gdec;                        // [B * per_batch, nW]
};

template <typename scalar_t>
Args<scalar_t> make_args(const Dims& d, const at::Tensor& flat, const tile::FlatPyramid& fp, const Inputs& in,
                         const Decoder& dec, const RenderParams& p, bool with_target) {
  using acc_t = at::opmath_type<scalar_t>;
  Args<scalar_t> c = args_for<scalar_t, acc_t>(d, p);
  c.pv = view_of<const scalar_t>(flat, fp);
  c.ro = in.rays_o.data_ptr<scalar_t>();
  c.rd = in.rays_d.data_ptr<scalar_t>();
  c.dz = in.depths.data_ptr<scalar_t>();
  c.target = with_target && in.target.has_value() ? in.target->data_ptr<scalar_t>() : nullptr;
  c.w1 = dec.w1.data_ptr<acc_t>();
  c.w1t = dec.w1t.data_ptr<acc_t>();
  c.b1 = dec.b1.data_ptr<acc_t>();
  c.w2 = dec.w2.data_ptr<acc_t>();
  c.b2 = dec.b2.data_ptr<acc_t>();
  return c;
}

// ---- tiles of samples ----------------------------------------------------------------------------
// Both passes run the decoder over a tile of whole rays (about kTileSamples samples) at a time: the
// shared header math composites each ray, taps.h gathers each sample's features (and scatters their
// gradients) with the bilinear taps computed once per point and the channel sums in registers, and
// the decoder's layers and their backward are small matrix products over the tile (tile_gemm.h), so
// every weight row is read once per block of samples instead of once per sample, and the weight
// gradients are accumulated in registers across the tile instead of as one rank-1 update per sample.
constexpr int64_t kTileSamples = 256;

inline int64_t rays_per_tile(int64_t S) { return std::max<int64_t>(1, kTileSamples / std::max<int64_t>(S, 1)); }

// Per-thread buffers of one tile of n = rays * S samples, all in the accumulation type, row-major:
// u [n,3] points, f [n,C] features, a [n,Hd] pre-activation (reused for dL/da in the backward),
// h, dh [n,Hd] softplus and softplus', o [n,O] raw outputs; backward only: go [n,O] dL/do,
// gf [n,C] dL/df, active [n] (whether the sample's dL/do is non-zero).
template <typename acc_t>
struct Tile {
  int64_t cap, C, Hd, O;
  std::vector<acc_t> mem;
  std::vector<char> active;
  std::vector<tile::PointTaps<acc_t>> taps;  // [n] in the backward (reused by the scatter), else [1]
  acc_t *u, *f, *a, *h, *dh, *o, *go, *gf;

  Tile(int64_t rays, int64_t S, int64_t C_, int64_t Hd_, int64_t O_, bool grad)
      : cap(rays * S), C(C_), Hd(Hd_), O(O_) {
    const int64_t n = cap;
    mem.assign(n * (3 + C + 3 * Hd + O) + (grad ? n * (O + C) : 0), acc_t(0));
    acc_t* q = mem.data();
    auto take = [&](int64_t k) {
      acc_t* p = q;
      q += k;
      return p;
    };
    u = take(3 * n);
    f = take(C * n);
    a = take(Hd * n);
    h = take(Hd * n);
    dh = take(Hd * n);
    o = take(O * n);
    go = grad ? take(O * n) : nullptr;
    gf = grad ? take(C * n) : nullptr;
    if (grad) active.assign(n, 0);
    taps.resize(grad ? n : 1);
  }
};

// Points, taps, features and decoder (a, h, o; dh when grad) of every sample of the rays at positions
// [q0, q0 + nrays) of the ray order.
template <typename scalar_t>
void decode_tile(const Work<scalar_t>& w, int64_t q0, int64_t nrays, Tile<at::opmath_type<scalar_t>>& t,
                 bool grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t>& c = w.a;
  const int64_t S = c.S, C = c.C, Hd = c.Hd, O = c.O, n = nrays * S;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ray = w.order[q0 + i / S];
    const acc_t z = static_cast<acc_t>(c.dz[ray * S + i % S]);
    tile::PointTaps<acc_t>& taps = t.taps[grad ? i : 0];
    sample_point(c.ro + ray * 3, c.rd + ray * 3, z, c.scale, t.u + 3 * i);
    tile::point_taps(w.fp, t.u + 3 * i, c.plane_axes, taps);
    tile::gather_point(w.planes + ray / c.R * w.fp.P, static_cast<int>(C), taps, t.f + i * C);
  }
  for (int64_t i = 0; i < n; ++i) std::copy(c.b1, c.b1 + Hd, t.a + i * Hd);
  tile::gemm<acc_t>(n, static_cast<int>(C), static_cast<int>(Hd), t.f, C, 1, c.w1t, Hd, t.a, Hd, true);
  softplus_vec<acc_t>(t.a, t.h, grad ? t.dh : nullptr, static_cast<int>(n * Hd));
  tile::gemm_nt_narrow<acc_t>(n, static_cast<int>(Hd), static_cast<int>(O), t.h, Hd, c.w2, c.b2, t.o, O);
}

// Forward of rays [begin, end): decode a tile, then composite each of its rays (RayComposite, the
// per-sample step ray_forward_fused in render_math.h runs, over the decoded samples).
template <typename scalar_t>
void fwd_rays(const Work<scalar_t>& w, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t>& c = w.a;
  const int64_t S = c.S, D = c.D, O = c.O, per = rays_per_tile(S);
  Tile<acc_t> t(std::min(per, end - begin), S, c.C, c.Hd, O, false);
  std::vector<acc_t> rgb(3 * D);
  acc_t* acc_rgb = rgb.data();
  acc_t* prev_rgb = acc_rgb + D;
  acc_t* cur_rgb = prev_rgb + D;
  for (int64_t q0 = begin; q0 < end; q0 += per) {
    const int64_t nrays = std::min(per, end - q0);
    decode_tile(w, q0, nrays, t, false);
    for (int64_t r = 0; r < nrays; ++r) {
      const int64_t ray = w.order[q0 + r];
      const scalar_t* z = c.dz + ray * S;
      RayComposite<scalar_t, acc_t> rc(acc_rgb, prev_rgb, D);
      for (int64_t s = 0; s < S; ++s) {
        const acc_t* o = t.o + (r * S + s) * O;
        for (int64_t k = 0; k < D; ++k) cur_rgb[k] = rgb_activation(o[1 + k]);
        rc.add(c, ray, s, static_cast<acc_t>(z[s]), o[0], cur_rgb);
      }
      rc.finish(c, ray);
    }
  }
}

// ray_backward_scan's per-sample callback: keeps dL/do of sample s of the tile's ray r for the tile's
// matrix products, and whether it is non-zero (a zero sample, e.g. on a ray that misses the box,
// contributes nothing, not even 0 * NaN).
template <typename acc_t>
struct KeepGrad {
  Tile<acc_t>& t;
  int64_t base;  // tile row of the ray's sample 0
  void operator()(const SampleState<acc_t>& /*x*/, int64_t s, const acc_t* go, bool nonzero) {
    const int64_t i = base + s;
    std::copy(go, go + t.O, t.go + i * t.O);
    t.active[i] = nonzero ? 1 : 0;
  }
};

// Backward of chunks [cbegin, cend): per tile of rays, decode (the forward again), run each ray's
// composite backward scan over the decoded samples (no further recompute), then the decoder backward
// for the whole tile: ga = (go W2) * dh, gf = ga W1, gW1 += ga^T f, gW2 += go^T h, and scatter gf.
template <typename scalar_t>
void bwd_chunks(const Chunks<scalar_t>& k, int64_t cbegin, int64_t cend) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t>& c = k.w.a;
  const int64_t R = c.R, S = c.S, C = c.C, Hd = c.Hd, O = c.O, nW = k.nW, per = rays_per_tile(S);
  Tile<acc_t> t(std::min(per, std::max<int64_t>(R, 1)), S, C, Hd, O, true);
  std::vector<acc_t> gdec(nW), go(O);
  acc_t* gw1 = gdec.data();
  acc_t* gb1 = gw1 + Hd * C;
  acc_t* gw2 = gb1 + Hd;
  acc_t* gb2 = gw2 + O * Hd;
  std::vector<SampleState<acc_t>> st(S);
  for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
    const int64_t b = chunk / k.per_batch, part = chunk % k.per_batch;
    const int64_t r0 = R * part / k.per_batch, r1 = R * (part + 1) / k.per_batch;
    acc_t* gbase = k.gplanes + chunk * k.w.fp.P;  // batch element b only
    double* gdec_chunk = k.gdec + chunk * nW;
    for (int64_t q0 = b * R + r0; q0 < b * R + r1; q0 += per) {
      const int64_t nrays = std::min(per, b * R + r1 - q0), n = nrays * S;
      decode_tile(k.w, q0, nrays, t, true);
      bool any = false;
      for (int64_t r = 0; r < nrays; ++r) {
        const int64_t ray = k.w.order[q0 + r];
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = r * S + s;
          SampleState<acc_t>& x = st[s];
          x.f = t.f + i * C;
          x.a = t.a + i * Hd;
          x.h = t.h + i * Hd;
          x.dh = t.dh + i * Hd;
          x.o = t.o + i * O;
          for (int m = 0; m < 3; ++m) x.u[m] = t.u[3 * i + m];
          x.z = static_cast<acc_t>(c.dz[ray * S + s]);
          x.sigma = x.o[0];
        }
        RayGrad<acc_t> rg = ray_grad_setup<scalar_t, acc_t>(
            c.g_rgb + ray * c.D, static_cast<acc_t>(c.g_depth[ray]), static_cast<acc_t>(c.g_op[ray]),
            c.s_rgb + ray * c.D, static_cast<acc_t>(c.s_depth[ray]), static_cast<acc_t>(c.s_op[ray]), c.D, c.prm);
        const scalar_t* gwr = ray_weights_grad(c, ray);
        if (gwr != nullptr) {  // sum_i w_i g_weights_i (ray_weights_total on the decoded samples)
          acc_t T = acc_t(1), total = acc_t(0);
          for (int64_t s = 1; s < S; ++s) {
            const composite::Interval<acc_t> iv = composite::interval<acc_t>(
                acc_t(0.5) * (st[s - 1].sigma + st[s].sigma), st[s].z - st[s - 1].z, c.prm.density_bias);
            total += iv.alpha * T * static_cast<acc_t>(gwr[s - 1]);
            T *= iv.trans;
          }
          rg.total += total;
        }
        KeepGrad<acc_t> keep{t, r * S};
        any = ray_backward_scan(c, ray, b, st.data(), true, gwr, rg, go.data(), keep) || any;
      }
      if (!any) continue;
      // Inactive samples: zero rows everywhere the tile's products read them (their f, h or dh may be
      // NaN for a non-finite point, and they must add nothing).
      for (int64_t i = 0; i < n; ++i) {
        if (t.active[i]) continue;
        std::fill(t.go + i * O, t.go + (i + 1) * O, acc_t(0));
        std::fill(t.f + i * C, t.f + (i + 1) * C, acc_t(0));
        std::fill(t.h + i * Hd, t.h + (i + 1) * Hd, acc_t(0));
        std::fill(t.dh + i * Hd, t.dh + (i + 1) * Hd, acc_t(0));
      }
      acc_t* ga = t.a;  // a is not needed any more
      tile::gemm<acc_t>(n, static_cast<int>(O), static_cast<int>(Hd), t.go, O, 1, c.w2, Hd, ga, Hd, false);
      for (int64_t q = 0; q < n * Hd; ++q) ga[q] *= t.dh[q];
      tile::gemm<acc_t>(n, static_cast<int>(Hd), static_cast<int>(C), ga, Hd, 1, c.w1, C, t.gf, C, false);
      std::fill(gdec.begin(), gdec.end(), acc_t(0));
      tile::gemm<acc_t>(Hd, static_cast<int>(n), static_cast<int>(C), ga, 1, Hd, t.f, C, gw1, C, true);
      tile::gemm<acc_t>(O, static_cast<int>(n), static_cast<int>(Hd), t.go, 1, O, t.h, Hd, gw2, Hd, true);
      for (int64_t i = 0; i < n; ++i) {  // gb1 += column sums of ga, gb2 += those of go
        for (int64_t j = 0; j < Hd; ++j) gb1[j] += ga[i * Hd + j];
        for (int64_t m = 0; m < O; ++m) gb2[m] += t.go[i * O + m];
      }
      for (int64_t q = 0; q < nW; ++q) gdec_chunk[q] += static_cast<double>(gdec[q]);
      for (int64_t i = 0; i < n; ++i) {
        if (t.active[i]) tile::scatter_point(gbase, static_cast<int>(C), t.taps[i], t.gf + i * C);
      }
    }
  }
}

G3DR_CPU_KERNEL void fwd_rays_f32(const Work<float>& w, int64_t begin, int64_t end) { fwd_rays<float>(w, begin, end); }
G3DR_CPU_KERNEL void fwd_rays_f64(const Work<double>& w, int64_t begin, int64_t end) {
  fwd_rays<double>(w, begin, end);
}
G3DR_CPU_KERNEL void bwd_chunks_f32(const Chunks<float>& k, int64_t begin, int64_t end) {
  bwd_chunks<float>(k, begin, end);
}
G3DR_CPU_KERNEL void bwd_chunks_f64(const Chunks<double>& k, int64_t begin, int64_t end) {
  bwd_chunks<double>(k, begin, end);
}

inline void fwd_rays_any(const Work<float>& w, int64_t b, int64_t e) { fwd_rays_f32(w, b, e); }
inline void fwd_rays_any(const Work<double>& w, int64_t b, int64_t e) { fwd_rays_f64(w, b, e); }
inline void bwd_chunks_any(const Chunks<float>& k, int64_t b, int64_t e) { bwd_chunks_f32(k, b, e); }
inline void bwd_chunks_any(const Chunks<double>& k, int64_t b, int64_t e) { bwd_chunks_f64(k, b, e); }

}  // namespace

void fwd_cpu(const Dims& d, const Inputs& in, const RenderParams& p, Outputs& out) {
  if (d.B * d.R == 0) return;
  const tile::FlatPyramid fp = flat_layout(in.levels);
  const at::Tensor flat = flat_channels_last(in.levels, fp);
  AT_DISPATCH_FLOATING_TYPES(in.depths.scalar_type(), "render_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Decoder dec = decoder_in(in.w1, in.b1, in.w2, in.b2, c10::CppTypeToScalarType<acc_t>::value);
    // The forward ignores the target: it only scales gradients.
    Work<scalar_t> w{make_args<scalar_t>(d, flat, fp, in, dec, p, false), fp, flat.data_ptr<scalar_t>(), nullptr};
    Args<scalar_t>& c = w.a;
    const std::vector<int64_t> order = ray_order(c, d.B);
    w.order = order.data();
    set_outputs(c, out);
    at::parallel_for(0, d.B * d.R, kFwdGrain, [&](int64_t begin, int64_t end) { fwd_rays_any(w, begin, end); });
  });
}

void bwd_cpu(const Dims& d, const Inputs& in, const OutputGrads& g, const Outputs& saved, const RenderParams& p,
             Grads& grads) {
  if (d.B * d.R == 0) {  // nothing to accumulate (and the buffers below may have no room for a level)
    for (at::Tensor& t : grads.levels) t.zero_();
    for (at::Tensor* t : {&grads.w1, &grads.b1, &grads.w2, &grads.b2}) t->zero_();
    return;
  }
  const at::ScalarType acc = at::toOpMathType(in.depths.scalar_type());
  // Chunks: each batch element's rays split into per_batch parts, enough for every thread to have one
  // when B is small; each chunk owns a plane-gradient buffer for its batch element.
  const int64_t threads = at::globalContext().deterministicAlgorithms()
                              ? kDeterministicThreads
                              : std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_batch = std::max<int64_t>(1, std::min<int64_t>((threads + d.B - 1) / d.B, d.R / kMinRaysPerChunk));
  const tile::FlatPyramid fp = flat_layout(in.levels);
  const int64_t P = fp.P;  // one batch element of the pyramid
  const int64_t nW = d.Hd * d.C + d.Hd + d.O * d.Hd + d.O;
  at::Tensor gplanes = at::zeros({d.B, per_batch, P}, in.depths.options().dtype(acc));
  at::Tensor gdec = at::zeros({d.B * per_batch, nW}, in.depths.options().dtype(at::kDouble));
  const at::Tensor flat = flat_channels_last(in.levels, fp);
  AT_DISPATCH_FLOATING_TYPES(in.depths.scalar_type(), "render_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Decoder dec = decoder_in(in.w1, in.b1, in.w2, in.b2, c10::CppTypeToScalarType<acc_t>::value);
    Chunks<scalar_t> k{};
    Args<scalar_t>& c = k.w.a;
    c = make_args<scalar_t>(d, flat, fp, in, dec, p, true);
    k.w.fp = fp;
    k.w.planes = flat.data_ptr<scalar_t>();
    const std::vector<int64_t> order = ray_order(c, d.B);
    k.w.order = order.data();
    set_output_grads(c, g, saved);
    k.per_batch = per_batch;
    k.nW = nW;
    k.gplanes = gplanes.data_ptr<acc_t>();
    k.gdec = gdec.data_ptr<double>();
    at::parallel_for(0, d.B * per_batch, 1, [&](int64_t begin, int64_t end) { bwd_chunks_any(k, begin, end); });
  });
  const at::Tensor gsum = per_batch == 1 ? gplanes.select(1, 0) : gplanes.sum(1);  // [B, P], fixed order
  int64_t off = 0;
  for (at::Tensor& g_level : grads.levels) {
    const int64_t H = g_level.size(3), W = g_level.size(4), n = 3 * H * W * d.C;
    g_level.copy_(gsum.narrow(1, off, n).view({d.B, 3, H, W, d.C}).permute({0, 1, 4, 2, 3}));
    off += n;
  }
  const at::Tensor gd = gdec.sum(0).to(in.depths.scalar_type());
  int64_t o = 0;
  for (at::Tensor* t : {&grads.w1, &grads.b1, &grads.w2, &grads.b2}) {  // gdec's layout: w1, b1, w2, b2
    t->copy_(gd.narrow(0, o, t->numel()).view(t->sizes()));
    o += t->numel();
  }
}

}  // namespace render
}  // namespace g3dr
