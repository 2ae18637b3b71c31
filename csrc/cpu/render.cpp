// Fully fused renderer (points -> multi-resolution triplane sampling -> decoder -> composite): op
// schemas and the CPU kernels. Contract: g3dr_kernels/ops/render.py. The per-sample math and the
// per-ray loops live in csrc/include/g3dr/render_math.h (with sample_math.h and composite_math.h),
// shared with csrc/cuda/render.cu; this file checks arguments, lays the planes out channels-last and
// runs chunks of rays per thread with at::parallel_for.
//
// Memory: nothing of size B x R x S is ever allocated. The forward writes per-ray outputs (and the
// weights when asked); the backward recomputes every sample once, streaming along each ray (see
// render_math.h), and accumulates plane and decoder gradients in per-chunk buffers that are reduced in
// a fixed order at the end (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "g3dr/render_math.h"

namespace g3dr {
namespace render {

// Argument checks shared with csrc/cuda/render.cu (declared there). Shapes in every message.
Dims check_fwd_args(at::TensorList levels, const at::Tensor& rays_o, const at::Tensor& rays_d,
                    const at::Tensor& depths, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const std::optional<at::Tensor>& target, double scale,
                    int64_t plane_axes, double s2, double c_min, double c_max) {
  TORCH_CHECK(!levels.empty() && static_cast<int>(levels.size()) <= kMaxLevels, "render: expected 1..", kMaxLevels,
              " pyramid levels, got ", levels.size());
  const at::Tensor& l0 = levels[0];
  TORCH_CHECK(l0.dim() == 5 && l0.size(1) == 3, "render: levels[0] must be [B,3,C,H,W], got ", l0.sizes());
  const int64_t B = l0.size(0), C = l0.size(2);
  for (size_t l = 0; l < levels.size(); ++l) {
    const at::Tensor& lv = levels[l];
    TORCH_CHECK(lv.dim() == 5 && lv.size(0) == B && lv.size(1) == 3 && lv.size(2) == C && lv.size(3) >= 1 &&
                    lv.size(4) >= 1,
                "render: every level must be [B,3,C,H,W] with levels[0]'s B and C ", l0.sizes(), "; levels[", l,
                "] is ", lv.sizes());
    TORCH_CHECK(lv.scalar_type() == l0.scalar_type() && lv.device() == l0.device(), "render: levels[", l,
                "] is ", lv.scalar_type(), " on ", lv.device(), " but levels[0] is ", l0.scalar_type(), " on ",
                l0.device());
  }
  TORCH_CHECK(depths.dim() == 3 && depths.size(0) == B, "render: depths must be [B,R,S] with B = ", B, ", got ",
              depths.sizes());
  const int64_t R = depths.size(1), S = depths.size(2);
  TORCH_CHECK(S >= 2, "render: needs S >= 2 samples per ray, got depths ", depths.sizes());
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  TORCH_CHECK(is(rays_o, {B, R, 3}) && is(rays_d, {B, R, 3}), "render: rays_o and rays_d must be [B,R,3] = [", B,
              ", ", R, ", 3], got ", rays_o.sizes(), " and ", rays_d.sizes());
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && w2.dim() == 2 && w2.size(0) >= 2 && w2.size(1) == w1.size(0) &&
                  is(b1, {w1.size(0)}) && is(b2, {w2.size(0)}),
              "render: decoder must be w1 [hidden,C=", C, "], b1 [hidden], w2 [1+D,hidden] (D >= 1), b2 [1+D]; got w1 ",
              w1.sizes(), ", b1 ", b1.sizes(), ", w2 ", w2.sizes(), ", b2 ", b2.sizes());
  if (target.has_value()) {
    TORCH_CHECK(is(*target, {B, R}), "render: target must be [B,R] = [", B, ", ", R, "], got ", target->sizes());
  }
  for (const at::Tensor* t : {&rays_o, &rays_d, &depths, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == l0.scalar_type() && t->device() == l0.device(),
                "render: all inputs must share the planes' dtype and device (", l0.scalar_type(), " on ", l0.device(),
                "), got a tensor of shape ", t->sizes(), " that is ", t->scalar_type(), " on ", t->device());
  }
  if (target.has_value()) {
    TORCH_CHECK(target->scalar_type() == l0.scalar_type() && target->device() == l0.device(),
                "render: target must match the planes' dtype and device, got ", target->scalar_type(), " on ",
                target->device());
  }
  TORCH_CHECK(plane_axes == 0 || plane_axes == 1, "render: plane_axes must be 0 (eg3d) or 1 (xyz), got ", plane_axes);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "render: scale (2 / box_warp) must be finite and > 0, got ", scale);
  TORCH_CHECK(s2 > 0 && c_min <= c_max, "render: depth kernel needs s2 > 0 and c_min <= c_max, got s2=", s2,
              ", c_min=", c_min, ", c_max=", c_max);
  return Dims{B, R, S, C, w1.size(0), w2.size(0)};
}

void check_bwd_args(const Dims& d, const at::Tensor& grad_rgb, const at::Tensor& grad_depth,
                    const at::Tensor& grad_opacity, const std::optional<at::Tensor>& grad_weights,
                    const at::Tensor& out_rgb, const at::Tensor& out_depth, const at::Tensor& out_opacity,
                    const at::Tensor& ref) {
  const int64_t B = d.B, R = d.R, D = d.O - 1;
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  TORCH_CHECK(is(grad_rgb, {B, R, D}) && is(out_rgb, {B, R, D}) && is(grad_depth, {B, R}) &&
                  is(grad_opacity, {B, R}) && is(out_depth, {B, R}) && is(out_opacity, {B, R}),
              "render_bwd: expected grad_rgb/out_rgb [B,R,D] = [", B, ", ", R, ", ", D,
              "] and grad_depth/grad_opacity/out_depth/out_opacity [B,R]; got grad_rgb ", grad_rgb.sizes(),
              ", out_rgb ", out_rgb.sizes(), ", grad_depth ", grad_depth.sizes(), ", grad_opacity ",
              grad_opacity.sizes(), ", out_depth ", out_depth.sizes(), ", out_opacity ", out_opacity.sizes());
  if (grad_weights.has_value()) {
    TORCH_CHECK(is(*grad_weights, {B, R, d.S - 1}), "render_bwd: grad_weights must be [B,R,S-1] = [", B, ", ", R,
                ", ", d.S - 1, "], got ", grad_weights->sizes());
  }
  for (const at::Tensor* t : {&grad_rgb, &grad_depth, &grad_opacity, &out_rgb, &out_depth, &out_opacity}) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type() && t->device() == ref.device(),
                "render_bwd: gradients and saved outputs must be ", ref.scalar_type(), " on ", ref.device(),
                ", got a tensor of shape ", t->sizes(), " that is ", t->scalar_type(), " on ", t->device());
  }
  if (grad_weights.has_value()) {
    TORCH_CHECK(grad_weights->scalar_type() == ref.scalar_type() && grad_weights->device() == ref.device(),
                "render_bwd: grad_weights must be ", ref.scalar_type(), " on ", ref.device());
  }
}

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

// The per-chunk loops are compiled twice on x86-64 (AVX2+FMA and baseline; the loader picks one), with
// every call inside them inlined so the shared header math gets the wider vectors too.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define G3DR_CPU_KERNEL __attribute__((flatten, target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) || defined(__clang__)
#define G3DR_CPU_KERNEL __attribute__((flatten))
#else
#define G3DR_CPU_KERNEL
#endif

// [B,3,C,H,W] levels -> channels-last [B,3,H,W,C] copies (a corner's C channels are contiguous).
std::vector<at::Tensor> channels_last(at::TensorList levels) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& lv : levels) out.push_back(lv.permute({0, 1, 3, 4, 2}).contiguous());
  return out;
}

template <typename T>
PyramidView<T> view_of(const std::vector<at::Tensor>& cl, int64_t C) {
  PyramidView<T> v{};
  v.levels = static_cast<int>(cl.size());
  v.C = static_cast<int>(C);
  for (int l = 0; l < v.levels; ++l) {
    v.data[l] = cl[l].data_ptr<std::remove_const_t<T>>();
    v.H[l] = static_cast<int>(cl[l].size(2));
    v.W[l] = static_cast<int>(cl[l].size(3));
    v.batch_stride[l] = cl[l].stride(0);
  }
  return v;
}

template <typename acc_t>
composite::Params<acc_t> params(double s1, double s2, double c_min, double c_max, double density_bias, double eps,
                                bool white_bg) {
  return composite::Params<acc_t>{acc_t(s1), acc_t(s2), acc_t(c_min), acc_t(c_max), acc_t(density_bias),
                                  acc_t(eps), white_bg};
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

// What a backward chunk needs on top of the per-ray arguments: chunk k covers part k % per_batch of
// batch element k / per_batch and owns row k of the plane-gradient and decoder-gradient buffers.
template <typename scalar_t>
struct Chunks {
  Args<scalar_t> a;
  int64_t per_batch, P, nW;
  int64_t level_off[kMaxLevels];    // offset of each level in a row of gplanes
  at::opmath_type<scalar_t>* gplanes;  // [B * per_batch, P], channels-last levels one after another
  double* gdec;                        // [B * per_batch, nW]
};

template <typename scalar_t>
Args<scalar_t> make_args(const Dims& d, const std::vector<at::Tensor>& cl, const at::Tensor& rays_o,
                         const at::Tensor& rays_d, const at::Tensor& depths, const std::optional<at::Tensor>& target,
                         const Decoder& dec, double scale, int64_t plane_axes,
                         const composite::Params<at::opmath_type<scalar_t>>& prm) {
  using acc_t = at::opmath_type<scalar_t>;
  Args<scalar_t> c{};
  c.R = d.R;
  c.S = d.S;
  c.C = d.C;
  c.Hd = d.Hd;
  c.O = d.O;
  c.D = d.O - 1;
  c.pv = view_of<const scalar_t>(cl, d.C);
  c.ro = rays_o.data_ptr<scalar_t>();
  c.rd = rays_d.data_ptr<scalar_t>();
  c.dz = depths.data_ptr<scalar_t>();
  c.target = target.has_value() ? target->data_ptr<scalar_t>() : nullptr;
  c.w1 = dec.w1.data_ptr<acc_t>();
  c.w1t = dec.w1t.data_ptr<acc_t>();
  c.b1 = dec.b1.data_ptr<acc_t>();
  c.w2 = dec.w2.data_ptr<acc_t>();
  c.b2 = dec.b2.data_ptr<acc_t>();
  c.scale = static_cast<acc_t>(scale);
  c.plane_axes = static_cast<int>(plane_axes);
  c.prm = prm;
  return c;
}

// Forward of rays [begin, end) (ray_forward_fused per ray, with this thread's scratch).
template <typename scalar_t>
void fwd_rays(const Args<scalar_t>& c, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> scratch(c.C + 2 * c.Hd + c.O + 2 * c.D);
  acc_t* f = scratch.data();
  acc_t* a = f + c.C;
  acc_t* h = a + c.Hd;
  acc_t* o = h + c.Hd;
  acc_t* acc_rgb = o + c.O;
  for (int64_t ray = begin; ray < end; ++ray) ray_forward_fused(c, ray, f, a, h, o, acc_rgb, acc_rgb + c.D);
}

struct PlainAdd {
  template <typename T>
  inline void operator()(T* p, T v) const {
    *p += v;
  }
};

// Per-thread buffers of the backward: two rotating sample states, the states of a whole ray (for rays
// with a weights gradient; allocated on first use), ga [Hd], gf [C], go [O] and the current ray's
// decoder gradient [nW] (gw1 [Hd,C], gb1 [Hd], gw2 [O,Hd], gb2 [O]).
template <typename acc_t>
struct BwdScratch {
  int64_t C, Hd, O;
  std::vector<acc_t> mem;
  SampleState<acc_t> st[2];
  acc_t *ga, *gf, *go, *gdec;
  std::vector<acc_t> ray_mem;
  std::vector<SampleState<acc_t>> ray_st;

  BwdScratch(int64_t C_, int64_t Hd_, int64_t O_, int64_t nW)
      : C(C_), Hd(Hd_), O(O_), mem(2 * (C + 3 * Hd + O) + Hd + C + O + nW) {
    acc_t* q = mem.data();
    for (auto& x : st) q = place(x, q);
    ga = q;
    gf = ga + Hd;
    go = gf + C;
    gdec = go + O;
  }
  acc_t* place(SampleState<acc_t>& x, acc_t* q) const {
    x.f = q;
    x.a = x.f + C;
    x.h = x.a + Hd;
    x.dh = x.h + Hd;
    x.o = x.dh + Hd;
    return x.o + O;
  }
  SampleState<acc_t>* ray_states(int64_t S) {
    if (static_cast<int64_t>(ray_st.size()) < S) {
      ray_mem.assign(S * (C + 3 * Hd + O), acc_t(0));
      ray_st.resize(S);
      acc_t* q = ray_mem.data();
      for (auto& x : ray_st) q = place(x, q);
    }
    return ray_st.data();
  }
};

// The CPU's per-sample backprop: decoder gradients into the thread's per-ray sums, feature gradients
// into the chunk's plane-gradient buffer (private to this thread, so plain adds).
template <typename scalar_t>
struct CpuBackprop {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t>& c;
  BwdScratch<acc_t>& w;
  const PyramidView<acc_t>& gv;
  void operator()(const SampleState<acc_t>& x, int64_t /*s*/, const acc_t* go, bool nonzero) {
    if (!nonzero) return;  // e.g. rays that miss the box: nothing to add
    const int C = static_cast<int>(c.C), Hd = static_cast<int>(c.Hd), O = static_cast<int>(c.O);
    mlp_backward_input<acc_t>(C, c.w1, Hd, c.w2, O, x.dh, go, w.ga, w.gf);
    acc_t* gw1 = w.gdec;
    acc_t* gb1 = gw1 + c.Hd * c.C;
    acc_t* gw2 = gb1 + c.Hd;
    acc_t* gb2 = gw2 + c.O * c.Hd;
    mlp_weight_grads<acc_t>(x.f, C, x.h, Hd, w.ga, go, O, gw1, gb1, gw2, gb2);
    scatter_point_grad(gv, 0, x.u, c.plane_axes, w.gf, PlainAdd{});
  }
};

// Backward of chunks [cbegin, cend).
template <typename scalar_t>
void bwd_chunks(const Chunks<scalar_t>& k, int64_t cbegin, int64_t cend) {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t>& c = k.a;
  const int64_t R = c.R, nW = k.nW;
  BwdScratch<acc_t> w(c.C, c.Hd, c.O, nW);
  for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
    const int64_t b = chunk / k.per_batch, part = chunk % k.per_batch;
    const int64_t r0 = R * part / k.per_batch, r1 = R * (part + 1) / k.per_batch;
    PyramidView<acc_t> gv{};
    gv.levels = c.pv.levels;
    gv.C = c.pv.C;
    for (int l = 0; l < c.pv.levels; ++l) {
      gv.data[l] = k.gplanes + chunk * k.P + k.level_off[l];
      gv.H[l] = c.pv.H[l];
      gv.W[l] = c.pv.W[l];
      gv.batch_stride[l] = 0;  // the buffer holds batch element b only
    }
    double* gdec_chunk = k.gdec + chunk * nW;
    CpuBackprop<scalar_t> backprop{c, w, gv};
    for (int64_t ray = b * R + r0; ray < b * R + r1; ++ray) {
      RayGrad<acc_t> rg = ray_grad_setup<scalar_t, acc_t>(
          c.g_rgb + ray * c.D, static_cast<acc_t>(c.g_depth[ray]), static_cast<acc_t>(c.g_op[ray]),
          c.s_rgb + ray * c.D, static_cast<acc_t>(c.s_depth[ray]), static_cast<acc_t>(c.s_op[ray]), c.D, c.prm);
      // With a weights gradient, the whole ray is recomputed once into per-sample states (its
      // sum_i w_i g_weights_i joins the total) and the scan reuses them; otherwise the scan
      // recomputes each sample into two rotating states.
      const scalar_t* gwr = ray_weights_grad(c, ray);
      SampleState<acc_t>* states = gwr != nullptr ? w.ray_states(c.S) : w.st;
      if (gwr != nullptr) rg.total += ray_weights_total(c, ray, b, states, true, gwr);
      if (ray_backward_scan(c, ray, b, states, gwr != nullptr, gwr, rg, w.go, backprop)) {
        for (int64_t i = 0; i < nW; ++i) {  // per-ray sums (S terms) flushed into the chunk's float64 sums
          gdec_chunk[i] += static_cast<double>(w.gdec[i]);
          w.gdec[i] = acc_t(0);
        }
      }
    }
  }
}

G3DR_CPU_KERNEL void fwd_rays_f32(const Args<float>& c, int64_t begin, int64_t end) { fwd_rays<float>(c, begin, end); }
G3DR_CPU_KERNEL void fwd_rays_f64(const Args<double>& c, int64_t begin, int64_t end) {
  fwd_rays<double>(c, begin, end);
}
G3DR_CPU_KERNEL void bwd_chunks_f32(const Chunks<float>& k, int64_t begin, int64_t end) {
  bwd_chunks<float>(k, begin, end);
}
G3DR_CPU_KERNEL void bwd_chunks_f64(const Chunks<double>& k, int64_t begin, int64_t end) {
  bwd_chunks<double>(k, begin, end);
}

inline void fwd_rays_any(const Args<float>& c, int64_t b, int64_t e) { fwd_rays_f32(c, b, e); }
inline void fwd_rays_any(const Args<double>& c, int64_t b, int64_t e) { fwd_rays_f64(c, b, e); }
inline void bwd_chunks_any(const Chunks<float>& k, int64_t b, int64_t e) { bwd_chunks_f32(k, b, e); }
inline void bwd_chunks_any(const Chunks<double>& k, int64_t b, int64_t e) { bwd_chunks_f64(k, b, e); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> render_fwd_cpu(
    at::TensorList levels, const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& depths,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const std::optional<at::Tensor>& target, double scale, int64_t plane_axes, double s1, double s2, double c_min,
    double c_max, double density_bias, double eps, bool white_bg, bool need_weights) {
  const Dims d =
      check_fwd_args(levels, rays_o, rays_d, depths, w1, b1, w2, b2, target, scale, plane_axes, s2, c_min, c_max);
  TORCH_CHECK(depths.device().is_cpu(), "render_fwd (cpu): tensors must be on the CPU, got ", depths.device());
  const auto opts = depths.options();
  at::Tensor out_rgb = at::empty({d.B, d.R, d.O - 1}, opts);
  at::Tensor out_depth = at::empty({d.B, d.R}, opts);
  at::Tensor out_opacity = at::empty({d.B, d.R}, opts);
  at::Tensor weights = need_weights ? at::empty({d.B, d.R, d.S - 1}, opts) : at::empty({0}, opts);
  if (d.B * d.R == 0) return {out_rgb, out_depth, out_opacity, weights};
  const std::vector<at::Tensor> cl = channels_last(levels);
  const at::Tensor ro = rays_o.contiguous(), rd = rays_d.contiguous(), dz = depths.contiguous();
  AT_DISPATCH_FLOATING_TYPES(depths.scalar_type(), "render_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Decoder dec = decoder_in(w1, b1, w2, b2, c10::CppTypeToScalarType<acc_t>::value);
    Args<scalar_t> c = make_args<scalar_t>(d, cl, ro, rd, dz, std::nullopt, dec, scale, plane_axes,
                                           params<acc_t>(s1, s2, c_min, c_max, density_bias, eps, white_bg));
    c.out_rgb = out_rgb.data_ptr<scalar_t>();
    c.out_depth = out_depth.data_ptr<scalar_t>();
    c.out_opacity = out_opacity.data_ptr<scalar_t>();
    c.out_w = need_weights ? weights.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, d.B * d.R, kFwdGrain, [&](int64_t begin, int64_t end) { fwd_rays_any(c, begin, end); });
  });
  return {out_rgb, out_depth, out_opacity, weights};
}

std::vector<at::Tensor> render_bwd_cpu(const at::Tensor& grad_rgb, const at::Tensor& grad_depth,
                                       const at::Tensor& grad_opacity, const std::optional<at::Tensor>& grad_weights,
                                       at::TensorList levels, const at::Tensor& rays_o, const at::Tensor& rays_d,
                                       const at::Tensor& depths, const at::Tensor& w1, const at::Tensor& b1,
                                       const at::Tensor& w2, const at::Tensor& b2,
                                       const std::optional<at::Tensor>& target, const at::Tensor& out_rgb,
                                       const at::Tensor& out_depth, const at::Tensor& out_opacity, double scale,
                                       int64_t plane_axes, double s1, double s2, double c_min, double c_max,
                                       double density_bias, double eps, bool white_bg) {
  const Dims d =
      check_fwd_args(levels, rays_o, rays_d, depths, w1, b1, w2, b2, target, scale, plane_axes, s2, c_min, c_max);
  check_bwd_args(d, grad_rgb, grad_depth, grad_opacity, grad_weights, out_rgb, out_depth, out_opacity, depths);
  TORCH_CHECK(depths.device().is_cpu(), "render_bwd (cpu): tensors must be on the CPU, got ", depths.device());
  const at::ScalarType acc = at::toOpMathType(depths.scalar_type());
  // Chunks: each batch element's rays split into per_batch parts, enough for every thread to have one
  // when B is small; each chunk owns a plane-gradient buffer for its batch element.
  const int64_t threads = at::globalContext().deterministicAlgorithms()
                              ? kDeterministicThreads
                              : std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_batch =
      d.B == 0 ? 1 : std::max<int64_t>(1, std::min<int64_t>((threads + d.B - 1) / d.B, d.R / kMinRaysPerChunk));
  int64_t P = 0;  // one batch element of the pyramid
  for (const at::Tensor& lv : levels) P += lv.numel() / std::max<int64_t>(d.B, 1);
  const int64_t nW = d.Hd * d.C + d.Hd + d.O * d.Hd + d.O;
  at::Tensor gplanes = at::zeros({d.B, per_batch, P}, depths.options().dtype(acc));
  at::Tensor gdec = at::zeros({d.B * per_batch, nW}, depths.options().dtype(at::kDouble));
  if (d.B * d.R > 0) {
    const std::vector<at::Tensor> cl = channels_last(levels);
    const at::Tensor ro = rays_o.contiguous(), rd = rays_d.contiguous(), dz = depths.contiguous();
    std::optional<at::Tensor> tg, gw;
    if (target.has_value()) tg = target->contiguous();
    if (grad_weights.has_value()) gw = grad_weights->contiguous();
    const at::Tensor g_rgb = grad_rgb.contiguous(), g_depth = grad_depth.contiguous(),
                     g_op = grad_opacity.contiguous(), s_rgb = out_rgb.contiguous(), s_depth = out_depth.contiguous(),
                     s_op = out_opacity.contiguous();
    AT_DISPATCH_FLOATING_TYPES(depths.scalar_type(), "render_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Decoder dec = decoder_in(w1, b1, w2, b2, c10::CppTypeToScalarType<acc_t>::value);
      Chunks<scalar_t> k{};
      Args<scalar_t>& c = k.a;
      c = make_args<scalar_t>(d, cl, ro, rd, dz, tg, dec, scale, plane_axes,
                              params<acc_t>(s1, s2, c_min, c_max, density_bias, eps, white_bg));
      c.g_rgb = g_rgb.data_ptr<scalar_t>();
      c.g_depth = g_depth.data_ptr<scalar_t>();
      c.g_op = g_op.data_ptr<scalar_t>();
      c.g_w = gw.has_value() ? gw->data_ptr<scalar_t>() : nullptr;
      c.s_rgb = s_rgb.data_ptr<scalar_t>();
      c.s_depth = s_depth.data_ptr<scalar_t>();
      c.s_op = s_op.data_ptr<scalar_t>();
      k.per_batch = per_batch;
      k.P = P;
      k.nW = nW;
      for (size_t l = 0, off = 0; l < cl.size(); ++l) {
        k.level_off[l] = static_cast<int64_t>(off);
        off += cl[l].numel() / d.B;
      }
      k.gplanes = gplanes.data_ptr<acc_t>();
      k.gdec = gdec.data_ptr<double>();
      at::parallel_for(0, d.B * per_batch, 1, [&](int64_t begin, int64_t end) { bwd_chunks_any(k, begin, end); });
    });
  }
  if (d.B * d.R == 0) {  // nothing was accumulated (and the buffers may have no room for a level)
    std::vector<at::Tensor> zeros;
    for (const at::Tensor& t : levels) zeros.push_back(at::zeros_like(t));
    for (const at::Tensor* t : {&w1, &b1, &w2, &b2}) zeros.push_back(at::zeros_like(*t));
    return zeros;
  }
  const at::Tensor gsum = per_batch == 1 ? gplanes.select(1, 0) : gplanes.sum(1);  // [B, P], fixed order
  std::vector<at::Tensor> out;
  int64_t off = 0;
  for (const at::Tensor& lv : levels) {
    const int64_t H = lv.size(3), W = lv.size(4), n = 3 * H * W * d.C;
    at::Tensor g = at::empty(lv.sizes(), lv.options());
    g.copy_(gsum.narrow(1, off, n).view({d.B, 3, H, W, d.C}).permute({0, 1, 4, 2, 3}));
    out.push_back(g);
    off += n;
  }
  const at::Tensor gd = gdec.sum(0).to(depths.scalar_type());
  int64_t o = 0;
  auto take = [&](at::IntArrayRef shape, int64_t n) {
    at::Tensor t = gd.narrow(0, o, n).view(shape).clone();
    o += n;
    return t;
  };
  out.push_back(take({d.Hd, d.C}, d.Hd * d.C));
  out.push_back(take({d.Hd}, d.Hd));
  out.push_back(take({d.O, d.Hd}, d.O * d.Hd));
  out.push_back(take({d.O}, d.O));
  return out;
}

}  // namespace render
}  // namespace g3dr

TORCH_LIBRARY_FRAGMENT(g3dr_C, m) {
  m.def(
      "render_fwd(Tensor[] levels, Tensor rays_o, Tensor rays_d, Tensor depths, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, Tensor? target, float scale, int plane_axes, float s1, float s2, float c_min, float c_max, "
      "float density_bias, float eps, bool white_bg, bool need_weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "render_bwd(Tensor grad_rgb, Tensor grad_depth, Tensor grad_opacity, Tensor? grad_weights, Tensor[] levels, "
      "Tensor rays_o, Tensor rays_d, Tensor depths, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? target, "
      "Tensor out_rgb, Tensor out_depth, Tensor out_opacity, float scale, int plane_axes, float s1, float s2, "
      "float c_min, float c_max, float density_bias, float eps, bool white_bg) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(g3dr_C, CPU, m) {
  m.impl("render_fwd", &g3dr::render::render_fwd_cpu);
  m.impl("render_bwd", &g3dr::render::render_bwd_cpu);
}
