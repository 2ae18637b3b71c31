// Fused multi-resolution triplane sampling: schemas, input checks and the CPU kernels.
//
// Contract (g3dr_kernels/ops/sample.py):
//   sample_fwd(levels: [B,3,C,H_l,W_l] per level, xyz [B,N,3], scale = 2 / box_warp, plane_axes)
//     -> [B,N,C] = sum over levels of the mean over the 3 planes of bilinear samples
//        (align_corners=False, zeros outside) at u = xyz * scale; per-point math in g3dr/sample_math.h.
//   sample_bwd(grad_out [B,N,C], levels, xyz, scale, plane_axes, need_xyz_grad)
//     -> one gradient per level (its shape and dtype), then grad_xyz [B,N,3] (empty when not asked).
//
// CPU layout: each level is copied once per call to channels-last [B,3,H,W,C] in the accumulation
// type (float, or double for double planes), so a bilinear corner is one contiguous run of C values
// and the channel loops vectorise. That copy is the size of the planes, independent of N; no
// per-level or per-plane [B,N,C] intermediates are made.
//   forward:   parallel over points; each point reads all levels of all three planes.
//   backward:  plane gradients parallel over (batch, plane, level): each task owns one H x W x C
//              slice of a channels-last gradient buffer and walks all N points of its batch element,
//              so there are no races and no atomics, and the sum order (ascending n) does not depend
//              on the thread count: bitwise deterministic. The xyz gradient is a second pass,
//              parallel over points (each point's gradient is its own), run only when asked.
// float16/bfloat16 planes are accepted (computed in float32, result cast back), as on CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "g3dr/sample_math.h"

namespace g3dr {

// ---------------------------------------------------------------------------------------------
// Input checks at the op boundary (shared with csrc/cuda/sample.cu, which declares them).
// ---------------------------------------------------------------------------------------------

void check_sample_inputs(const char* op, at::TensorList levels, const at::Tensor& xyz, double scale,
                         int64_t plane_axes) {
  TORCH_CHECK(!levels.empty(), op, ": levels must be a non-empty list of [B,3,C,H,W] tensors");
  const at::Tensor& l0 = levels[0];
  TORCH_CHECK(l0.dim() == 5 && l0.size(1) == 3, op, ": levels[0] must be [B,3,C,H,W], got ", l0.sizes());
  for (size_t i = 0; i < levels.size(); ++i) {
    const at::Tensor& lv = levels[i];
    TORCH_CHECK(lv.dim() == 5 && lv.size(0) == l0.size(0) && lv.size(1) == 3 && lv.size(2) == l0.size(2), op,
                ": every level must be [B,3,C,H,W] with the B and C of levels[0] ", l0.sizes(), "; levels[", i,
                "] is ", lv.sizes());
    TORCH_CHECK(lv.size(3) >= 1 && lv.size(4) >= 1, op, ": levels[", i, "] has an empty plane: ", lv.sizes());
    TORCH_CHECK(lv.scalar_type() == l0.scalar_type() && lv.device() == l0.device(), op, ": levels[", i, "] is ",
                lv.scalar_type(), " on ", lv.device(), " but levels[0] is ", l0.scalar_type(), " on ", l0.device());
  }
  TORCH_CHECK(at::isFloatingType(l0.scalar_type()), op, ": planes must be floating point, got ", l0.scalar_type());
  TORCH_CHECK(xyz.dim() == 3 && xyz.size(2) == 3 && xyz.size(0) == l0.size(0), op,
              ": xyz must be [B,N,3] with B of the planes ", l0.sizes(), ", got ", xyz.sizes());
  TORCH_CHECK(xyz.device() == l0.device(), op, ": xyz is on ", xyz.device(), " but the planes are on ", l0.device());
  const bool half = l0.scalar_type() == at::kHalf || l0.scalar_type() == at::kBFloat16;
  TORCH_CHECK(xyz.scalar_type() == l0.scalar_type() || (half && xyz.scalar_type() == at::kFloat), op,
              ": xyz has dtype ", xyz.scalar_type(), " but the planes have ", l0.scalar_type(),
              " (only float16/bfloat16 planes may take float32 points)");
  TORCH_CHECK(plane_axes == 0 || plane_axes == 1, op, ": plane_axes must be 0 (eg3d) or 1 (xyz), got ", plane_axes);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale (2 / box_warp) must be finite and > 0, got ", scale);
}

void check_sample_grad(const char* op, const at::Tensor& grad_out, at::TensorList levels, const at::Tensor& xyz) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == xyz.size(0) && grad_out.size(1) == xyz.size(1) &&
                  grad_out.size(2) == levels[0].size(2),
              op, ": grad_out must be [B,N,C] = [", xyz.size(0), ", ", xyz.size(1), ", ", levels[0].size(2),
              "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == xyz.device(), op, ": grad_out is on ", grad_out.device(), " but xyz is on ",
              xyz.device());
}

namespace {

// Points per parallel_for chunk: enough work to amortise the task overhead.
constexpr int64_t kPointGrain = 128;

// The channel loops are compiled twice: for the baseline x86-64 ISA and for AVX2+FMA, picked at run
// time (like ATen's own kernels, honouring ATEN_CPU_CAPABILITY=default). Everything they call is
// force-inlined so it is compiled for the caller's ISA.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define G3DR_HAVE_AVX2_VARIANT 1
#define G3DR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define G3DR_FORCE_INLINE inline __attribute__((always_inline))
#else
#define G3DR_HAVE_AVX2_VARIANT 0
#define G3DR_FORCE_INLINE inline
#endif

bool use_avx2() {
#if G3DR_HAVE_AVX2_VARIANT
  static const bool yes = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [B,3,C,H,W] -> contiguous [B,3,H,W,C] in `dtype` (one copy; none when C == 1 and the dtype matches).
at::Tensor channels_last(const at::Tensor& lv, at::ScalarType dtype) {
  return lv.permute({0, 1, 3, 4, 2}).to(dtype).contiguous();
}

template <typename acc_t>
struct LevelView {
  const acc_t* data;  // [B,3,H,W,C] (unused by the plane-gradient pass)
  acc_t* grad;        // [B,3,H,W,C] gradient buffer (plane-gradient pass only)
  int64_t H, W;
};

// Everything one pass needs; the level list is small (one entry per level).
template <typename acc_t>
struct Args {
  const LevelView<acc_t>* lv;
  int64_t L, B, N, C;
  const acc_t* xyz;   // [B,N,3]
  const acc_t* grad;  // [B,N,C] (backward)
  acc_t* out;         // [B,N,C] features (forward) or [B,N,3] xyz gradient
  const acc_t* zeros; // C zeros: the row a corner outside reads
  acc_t scale;
  int plane_axes;
};

// acc[c] += sum_k w[k] * r[k][c]; rows of corners outside point at a row of zeros.
template <typename acc_t>
G3DR_FORCE_INLINE void axpy4(acc_t* __restrict__ acc, const acc_t* __restrict__ r0, const acc_t* __restrict__ r1,
                             const acc_t* __restrict__ r2, const acc_t* __restrict__ r3, acc_t w0, acc_t w1, acc_t w2,
                             acc_t w3, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
}

// dst[c] += w * src[c]
template <typename acc_t>
G3DR_FORCE_INLINE void axpy(acc_t* __restrict__ dst, const acc_t* __restrict__ src, acc_t w, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] += w * src[c];
}

// <a, b> with 8 independent partial sums (a reduction the compiler can vectorise without reassociating).
template <typename acc_t>
G3DR_FORCE_INLINE acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t C) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[c + j] * b[c + j];
  acc_t r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; c < C; ++c) r += a[c] * b[c];
  return r;
}

template <typename acc_t>
G3DR_FORCE_INLINE void scaled_point(const Args<acc_t>& A, int64_t i, acc_t u[3]) {
  for (int k = 0; k < 3; ++k) u[k] = A.xyz[i * 3 + k] * A.scale;
}

// Forward over points [begin, end): out[i] = sum_l sum_p bilinear(level l, plane p) / 3.
template <typename acc_t>
G3DR_FORCE_INLINE void forward_points(const Args<acc_t>& A, int64_t begin, int64_t end) {
  const acc_t third = acc_t(1) / acc_t(3);
  const int64_t C = A.C;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / A.N;
    acc_t u[3];
    scaled_point(A, i, u);
    acc_t* o = A.out + i * C;
    for (int64_t c = 0; c < C; ++c) o[c] = acc_t(0);
    for (int64_t l = 0; l < A.L; ++l) {
      const LevelView<acc_t>& V = A.lv[l];
      for (int p = 0; p < 3; ++p) {
        acc_t a, bb;
        plane_uv(u, A.plane_axes, p, a, bb);
        BilinearTap<acc_t> t;
        if (!bilinear_tap(a, bb, V.H, V.W, t)) continue;
        const acc_t* base = V.data + (b * 3 + p) * V.H * V.W * C;
        const acc_t* r[4];
        for (int k = 0; k < 4; ++k) r[k] = t.idx[k] >= 0 ? base + t.idx[k] * C : A.zeros;
        axpy4(o, r[0], r[1], r[2], r[3], t.w[0] * third, t.w[1] * third, t.w[2] * third, t.w[3] * third, C);
      }
    }
  }
}

// Plane gradients of task (b, p, l): grad_out * weight / 3 into its own H x W x C slice, points in order.
template <typename acc_t>
G3DR_FORCE_INLINE void plane_grad_task(const Args<acc_t>& A, int64_t task) {
  const acc_t third = acc_t(1) / acc_t(3);
  const int64_t C = A.C, l = task % A.L, bp = task / A.L, b = bp / 3;
  const int p = static_cast<int>(bp % 3);
  const LevelView<acc_t>& V = A.lv[l];
  acc_t* g_plane = V.grad + bp * V.H * V.W * C;
  for (int64_t n = 0; n < A.N; ++n) {
    const int64_t i = b * A.N + n;
    acc_t u[3];
    scaled_point(A, i, u);
    acc_t a, bb;
    plane_uv(u, A.plane_axes, p, a, bb);
    BilinearTap<acc_t> t;
    if (!bilinear_tap(a, bb, V.H, V.W, t)) continue;
    const acc_t* g = A.grad + i * C;
    for (int k = 0; k < 4; ++k)
      if (t.idx[k] >= 0) axpy(g_plane + t.idx[k] * C, g, t.w[k] * third, C);
  }
}

// xyz gradient of points [begin, end): every level of every plane.
template <typename acc_t>
G3DR_FORCE_INLINE void xyz_grad_points(const Args<acc_t>& A, int64_t begin, int64_t end) {
  const acc_t third = acc_t(1) / acc_t(3);
  const int64_t C = A.C;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / A.N;
    acc_t u[3];
    scaled_point(A, i, u);
    const acc_t* g = A.grad + i * C;
    acc_t gu[3] = {0, 0, 0};
    for (int64_t l = 0; l < A.L; ++l) {
      const LevelView<acc_t>& V = A.lv[l];
      for (int p = 0; p < 3; ++p) {
        acc_t a, bb;
        plane_uv(u, A.plane_axes, p, a, bb);
        BilinearTap<acc_t> t;
        if (!bilinear_tap(a, bb, V.H, V.W, t)) continue;
        const acc_t* base = V.data + (b * 3 + p) * V.H * V.W * C;
        acc_t s[4];
        for (int k = 0; k < 4; ++k) s[k] = t.idx[k] >= 0 ? third * dot(g, base + t.idx[k] * C, C) : acc_t(0);
        accumulate_uv_grad(t, s, A.plane_axes, p, V.H, V.W, gu);
      }
    }
    for (int k = 0; k < 3; ++k) A.out[i * 3 + k] = gu[k] * A.scale;
  }
}

// One entry point per pass and ISA: (args, begin, end) over points or tasks.
#define G3DR_SAMPLE_VARIANTS(NAME, BODY)                                                          \
  template <typename acc_t>                                                                        \
  void NAME##_base(const Args<acc_t>& A, int64_t begin, int64_t end) { BODY; }                     \
  G3DR_SAMPLE_AVX2_VARIANT(NAME, BODY)

#if G3DR_HAVE_AVX2_VARIANT
#define G3DR_SAMPLE_AVX2_VARIANT(NAME, BODY) \
  template <typename acc_t>                  \
  G3DR_TARGET_AVX2 void NAME##_avx2(const Args<acc_t>& A, int64_t begin, int64_t end) { BODY; }
#else
#define G3DR_SAMPLE_AVX2_VARIANT(NAME, BODY) \
  template <typename acc_t>                  \
  void NAME##_avx2(const Args<acc_t>& A, int64_t begin, int64_t end) { BODY; }
#endif

G3DR_SAMPLE_VARIANTS(forward, forward_points(A, begin, end))
G3DR_SAMPLE_VARIANTS(plane_grad, for (int64_t task = begin; task < end; ++task) plane_grad_task(A, task))
G3DR_SAMPLE_VARIANTS(xyz_grad, xyz_grad_points(A, begin, end))

template <typename acc_t>
using Pass = void (*)(const Args<acc_t>&, int64_t, int64_t);

template <typename acc_t>
void run_pass(Pass<acc_t> base, Pass<acc_t> avx2, const Args<acc_t>& A, int64_t n, int64_t grain) {
  const Pass<acc_t> f = use_avx2() ? avx2 : base;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { f(A, begin, end); });
}

std::vector<at::Tensor> channels_last_levels(at::TensorList levels, at::ScalarType acc) {
  std::vector<at::Tensor> cl;
  for (const auto& lv : levels) cl.push_back(channels_last(lv, acc));
  return cl;
}

template <typename acc_t>
std::vector<LevelView<acc_t>> level_views(const std::vector<at::Tensor>& cl, const std::vector<at::Tensor>& grad) {
  std::vector<LevelView<acc_t>> v;
  for (size_t l = 0; l < std::max(cl.size(), grad.size()); ++l) {
    const at::Tensor& t = l < cl.size() ? cl[l] : grad[l];
    v.push_back({l < cl.size() ? cl[l].data_ptr<acc_t>() : nullptr,
                 l < grad.size() ? grad[l].data_ptr<acc_t>() : nullptr, t.size(2), t.size(3)});
  }
  return v;
}

at::Tensor sample_fwd_cpu(at::TensorList levels, const at::Tensor& xyz_in, double scale, int64_t plane_axes) {
  check_sample_inputs("g3dr_C::sample_fwd (CPU)", levels, xyz_in, scale, plane_axes);
  const at::ScalarType dtype = levels[0].scalar_type(), acc = acc_type(dtype);
  const int64_t B = xyz_in.size(0), N = xyz_in.size(1), C = levels[0].size(2);
  const at::Tensor xyz = xyz_in.to(acc).contiguous();
  const std::vector<at::Tensor> cl = channels_last_levels(levels, acc);
  at::Tensor out = at::empty({B, N, C}, xyz.options());
  const at::Tensor zeros = at::zeros({C}, xyz.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_fwd_cpu", [&] {
    const auto lv = level_views<scalar_t>(cl, {});
    const Args<scalar_t> A{lv.data(), static_cast<int64_t>(lv.size()), B, N, C, xyz.data_ptr<scalar_t>(), nullptr,
                           out.data_ptr<scalar_t>(), zeros.data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
                           static_cast<int>(plane_axes)};
    run_pass<scalar_t>(forward_base<scalar_t>, forward_avx2<scalar_t>, A, B * N, kPointGrain);
  });
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

std::vector<at::Tensor> sample_bwd_cpu(const at::Tensor& grad_in, at::TensorList levels, const at::Tensor& xyz_in,
                                       double scale, int64_t plane_axes, bool need_xyz_grad) {
  const char* op = "g3dr_C::sample_bwd (CPU)";
  check_sample_inputs(op, levels, xyz_in, scale, plane_axes);
  check_sample_grad(op, grad_in, levels, xyz_in);
  const at::ScalarType acc = acc_type(levels[0].scalar_type());
  const int64_t B = xyz_in.size(0), N = xyz_in.size(1), C = levels[0].size(2);
  const int64_t L = static_cast<int64_t>(levels.size());
  const at::Tensor xyz = xyz_in.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  std::vector<at::Tensor> gcl;  // channels-last gradient buffers [B,3,H,W,C]
  for (const auto& lv : levels) gcl.push_back(at::zeros({B, 3, lv.size(3), lv.size(4), C}, xyz.options()));
  at::Tensor gxyz = need_xyz_grad ? at::empty({B, N, 3}, xyz.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_bwd_cpu", [&] {
    const auto s = static_cast<scalar_t>(scale);
    const auto pa = static_cast<int>(plane_axes);
    {
      const auto lv = level_views<scalar_t>({}, gcl);
      const Args<scalar_t> A{lv.data(), L, B, N, C, xyz.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), nullptr,
                             nullptr, s, pa};
      run_pass<scalar_t>(plane_grad_base<scalar_t>, plane_grad_avx2<scalar_t>, A, B * 3 * L, 1);
    }
    if (need_xyz_grad) {
      const std::vector<at::Tensor> cl = channels_last_levels(levels, acc);
      const auto lv = level_views<scalar_t>(cl, {});
      const Args<scalar_t> A{lv.data(), L, B, N, C, xyz.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                             gxyz.data_ptr<scalar_t>(), nullptr, s, pa};
      run_pass<scalar_t>(xyz_grad_base<scalar_t>, xyz_grad_avx2<scalar_t>, A, B * N, kPointGrain);
    }
  });
  std::vector<at::Tensor> result;
  for (size_t l = 0; l < levels.size(); ++l)
    result.push_back(at::empty(levels[l].sizes(), levels[l].options()).copy_(gcl[l].permute({0, 1, 4, 2, 3})));
  result.push_back(need_xyz_grad ? gxyz.to(xyz_in.scalar_type()) : at::empty({0}, xyz_in.options()));
  return result;
}

}  // namespace
}  // namespace g3dr

TORCH_LIBRARY_FRAGMENT(g3dr_C, m) {
  m.def("sample_fwd(Tensor[] levels, Tensor xyz, float scale, int plane_axes) -> Tensor");
  m.def("sample_bwd(Tensor grad_out, Tensor[] levels, Tensor xyz, float scale, int plane_axes, bool need_xyz_grad)"
        " -> Tensor[]");
}

TORCH_LIBRARY_IMPL(g3dr_C, CPU, m) {
  m.impl("sample_fwd", &g3dr::sample_fwd_cpu);
  m.impl("sample_bwd", &g3dr::sample_bwd_cpu);
}
