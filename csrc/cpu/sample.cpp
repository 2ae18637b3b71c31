// Fused multi-resolution triplane sampling: the CPU kernels (the op boundary, with the schemas, input
// checks and outputs, is csrc/ops/sample.cpp).
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
//   backward:  plane gradients parallel over (batch, plane, level): each task accumulates its plane
//              into a per-thread channels-last H x W x C scratch, walking all N points of its batch
//              element, then writes its own slice of the level's gradient; so there are no races and
//              no atomics, and the sum order (ascending n) does not depend on the thread count:
//              bitwise deterministic. The xyz gradient is a second pass,
//              parallel over points (each point's gradient is its own), run only when asked.
// float16/bfloat16 planes are accepted (computed in float32, result cast back), as on CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <string>
#include <vector>

#include "g3dr/sample_math.h"
#include "g3dr/sample_op.h"

namespace g3dr {

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

// [B,3,C,H,W] -> contiguous [B,3,H,W,C] in `dtype`: one copy (none when C == 1 and the dtype matches).
at::Tensor channels_last(const at::Tensor& lv, at::ScalarType dtype) {
  const at::Tensor view = lv.permute({0, 1, 3, 4, 2});
  if (lv.scalar_type() == dtype) return view.contiguous();
  return at::empty(view.sizes(), view.options().dtype(dtype)).copy_(view);
}

template <typename acc_t>
struct LevelView {
  const acc_t* data;  // [B,3,H,W,C] (unused by the plane-gradient pass)
  acc_t* grad;        // [B,3,C,H,W] level gradient (plane-gradient pass only)
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

template <typename acc_t>
G3DR_FORCE_INLINE void scaled_point(const Args<acc_t>& A, int64_t i, acc_t u[3]) {
  for (int k = 0; k < 3; ++k) u[k] = A.xyz[i * 3 + k] * A.scale;
}

// The channel rows of a tap's four corners in plane p of batch b (channels-last level view); a corner
// outside the plane reads A.zeros.
template <typename acc_t>
G3DR_FORCE_INLINE void corner_rows(const Args<acc_t>& A, const LevelView<acc_t>& V, int64_t b, int p,
                                   const BilinearTap<acc_t>& t, const acc_t* r[4]) {
  const acc_t* base = V.data + (b * 3 + p) * V.H * V.W * A.C;
  for (int k = 0; k < 4; ++k) r[k] = t.idx[k] >= 0 ? base + t.idx[k] * A.C : A.zeros;
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
        const acc_t* r[4];
        corner_rows(A, V, b, p, t, r);
        axpy4(o, r[0], r[1], r[2], r[3], t.w[0] * third, t.w[1] * third, t.w[2] * third, t.w[3] * third, C);
      }
    }
    if (!finite_point(u))
      for (int64_t c = 0; c < C; ++c) o[c] = quiet_nan<acc_t>();
  }
}

// Plane gradients of task (b, p, l): grad_out * weight / 3 accumulated, points in order, into a
// channels-last H x W x C scratch owned by the calling thread, then transposed into the task's own
// [C,H,W] slice of the level's gradient (every element written, so the output needs no zeroing).
template <typename acc_t>
G3DR_FORCE_INLINE void plane_grad_task(const Args<acc_t>& A, int64_t task, std::vector<acc_t>& scratch) {
  const acc_t third = acc_t(1) / acc_t(3);
  const int64_t C = A.C, l = task % A.L, bp = task / A.L, b = bp / 3;
  const int p = static_cast<int>(bp % 3);
  const LevelView<acc_t>& V = A.lv[l];
  const int64_t HW = V.H * V.W;
  scratch.assign(HW * C, acc_t(0));
  acc_t* g_plane = scratch.data();
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
  // [HW, C] -> [C, HW] in blocks of texels, so the reads of a block stay in L1.
  acc_t* dst = V.grad + bp * C * HW;
  constexpr int64_t kBlock = 64;
  for (int64_t t0 = 0; t0 < HW; t0 += kBlock) {
    const int64_t t1 = std::min(HW, t0 + kBlock);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = t0; t < t1; ++t) dst[c * HW + t] = g_plane[t * C + c];
  }
}

// xyz gradient of points [begin, end): every level of every plane. Per channel block of 8, the
// corner rows are combined with the coordinate weights of the tap (tap_coord_weights) and multiplied
// by grad_out into 8 partial sums per coordinate, reduced once per point (no per-corner dot products).
template <typename acc_t>
G3DR_FORCE_INLINE void xyz_grad_points(const Args<acc_t>& A, int64_t begin, int64_t end) {
  constexpr int V = 8;
  const acc_t third = acc_t(1) / acc_t(3);
  const int64_t C = A.C;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / A.N;
    acc_t u[3];
    scaled_point(A, i, u);
    const acc_t* g = A.grad + i * C;
    acc_t G[3][V] = {};
    for (int64_t l = 0; l < A.L; ++l) {
      const LevelView<acc_t>& L = A.lv[l];
      for (int p = 0; p < 3; ++p) {
        acc_t a, bb;
        plane_uv(u, A.plane_axes, p, a, bb);
        BilinearTap<acc_t> t;
        if (!bilinear_tap(a, bb, L.H, L.W, t)) continue;
        acc_t da[4], db[4];
        tap_coord_weights(t, L.H, L.W, third, da, db);
        const acc_t* r[4];
        corner_rows(A, L, b, p, t, r);
        acc_t sa[V] = {}, sb[V] = {};
        int64_t c = 0;
        for (; c + V <= C; c += V)
          for (int j = 0; j < V; ++j) {
            const acc_t v0 = r[0][c + j], v1 = r[1][c + j], v2 = r[2][c + j], v3 = r[3][c + j];
            sa[j] += g[c + j] * (da[0] * v0 + da[1] * v1 + da[2] * v2 + da[3] * v3);
            sb[j] += g[c + j] * (db[0] * v0 + db[1] * v1 + db[2] * v2 + db[3] * v3);
          }
        for (; c < C; ++c) {
          const acc_t v0 = r[0][c], v1 = r[1][c], v2 = r[2][c], v3 = r[3][c];
          sa[0] += g[c] * (da[0] * v0 + da[1] * v1 + da[2] * v2 + da[3] * v3);
          sb[0] += g[c] * (db[0] * v0 + db[1] * v1 + db[2] * v2 + db[3] * v3);
        }
        int ia, ib;
        plane_coord_index(A.plane_axes, p, ia, ib);
        for (int j = 0; j < V; ++j) {
          G[ia][j] += sa[j];
          G[ib][j] += sb[j];
        }
      }
    }
    for (int k = 0; k < 3; ++k) {
      const acc_t* q = G[k];
      A.out[i * 3 + k] = (((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]))) * A.scale;
    }
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
G3DR_SAMPLE_VARIANTS(plane_grad, std::vector<acc_t> scratch;
                     for (int64_t task = begin; task < end; ++task) plane_grad_task(A, task, scratch))
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

// Views of channels-last levels [B,3,H,W,C] (forward, xyz gradient) ...
template <typename acc_t>
std::vector<LevelView<acc_t>> data_views(const std::vector<at::Tensor>& cl) {
  std::vector<LevelView<acc_t>> v;
  for (const auto& t : cl) v.push_back({t.data_ptr<acc_t>(), nullptr, t.size(2), t.size(3)});
  return v;
}

// ... and of level gradients [B,3,C,H,W] (plane-gradient pass).
template <typename acc_t>
std::vector<LevelView<acc_t>> grad_views(const std::vector<at::Tensor>& grad) {
  std::vector<LevelView<acc_t>> v;
  for (const auto& t : grad) v.push_back({nullptr, t.data_ptr<acc_t>(), t.size(3), t.size(4)});
  return v;
}

}  // namespace

namespace sample {

void fwd_cpu(const Inputs& in, const SampleParams& p, at::Tensor& out) {
  const at::ScalarType dtype = in.levels[0].scalar_type(), acc = acc_type(dtype);
  const int64_t B = in.xyz.size(0), N = in.xyz.size(1), C = in.levels[0].size(2);
  const at::Tensor xyz = in.xyz.to(acc).contiguous();
  const std::vector<at::Tensor> cl = channels_last_levels(in.levels, acc);
  // Computed in the accumulation type: straight into `out` when that is the planes' dtype.
  at::Tensor res = acc == dtype ? out : at::empty({B, N, C}, xyz.options());
  const at::Tensor zeros = at::zeros({C}, xyz.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_fwd_cpu", [&] {
    const auto lv = data_views<scalar_t>(cl);
    const Args<scalar_t> A{lv.data(), static_cast<int64_t>(lv.size()), B, N, C, xyz.data_ptr<scalar_t>(), nullptr,
                           res.data_ptr<scalar_t>(), zeros.data_ptr<scalar_t>(), static_cast<scalar_t>(p.scale),
                           static_cast<int>(p.plane_axes)};
    run_pass<scalar_t>(forward_base<scalar_t>, forward_avx2<scalar_t>, A, B * N, kPointGrain);
  });
  if (acc != dtype) out.copy_(res);
}

void bwd_cpu(const at::Tensor& grad_in, const Inputs& in, const SampleParams& p, Grads& grads) {
  const std::vector<at::Tensor>& levels = in.levels;
  const at::ScalarType acc = acc_type(levels[0].scalar_type());
  const int64_t B = in.xyz.size(0), N = in.xyz.size(1), C = levels[0].size(2);
  const int64_t L = static_cast<int64_t>(levels.size());
  const bool need_xyz_grad = grads.xyz.dim() == 3;  // else the boundary left an empty tensor
  const at::Tensor xyz = in.xyz.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  // Gradients in the accumulation type: straight into `grads` where that is the result's dtype.
  std::vector<at::Tensor> gout;  // [B,3,C,H,W]
  for (size_t l = 0; l < levels.size(); ++l) {
    const at::Tensor& g = grads.levels[l];
    gout.push_back(g.scalar_type() == acc ? g : at::empty(g.sizes(), xyz.options()));
  }
  at::Tensor gxyz;
  if (need_xyz_grad) gxyz = grads.xyz.scalar_type() == acc ? grads.xyz : at::empty({B, N, 3}, xyz.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_bwd_cpu", [&] {
    const auto s = static_cast<scalar_t>(p.scale);
    const auto pa = static_cast<int>(p.plane_axes);
    {
      const auto lv = grad_views<scalar_t>(gout);
      const Args<scalar_t> A{lv.data(), L, B, N, C, xyz.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), nullptr,
                             nullptr, s, pa};
      run_pass<scalar_t>(plane_grad_base<scalar_t>, plane_grad_avx2<scalar_t>, A, B * 3 * L, 1);
    }
    if (need_xyz_grad) {
      const std::vector<at::Tensor> cl = channels_last_levels(levels, acc);
      const auto lv = data_views<scalar_t>(cl);
      const at::Tensor zeros = at::zeros({C}, xyz.options());
      const Args<scalar_t> A{lv.data(), L, B, N, C, xyz.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                             gxyz.data_ptr<scalar_t>(), zeros.data_ptr<scalar_t>(), s, pa};
      run_pass<scalar_t>(xyz_grad_base<scalar_t>, xyz_grad_avx2<scalar_t>, A, B * N, kPointGrain);
    }
  });
  for (size_t l = 0; l < levels.size(); ++l) {
    if (!gout[l].is_same(grads.levels[l])) grads.levels[l].copy_(gout[l]);
  }
  if (need_xyz_grad && !gxyz.is_same(grads.xyz)) grads.xyz.copy_(gxyz);
}

}  // namespace sample
}  // namespace g3dr
