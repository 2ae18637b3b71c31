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
#include <torch/library.h>

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

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [B,3,C,H,W] -> contiguous [B,3,H,W,C] in `dtype` (one copy; none when C == 1 and the dtype matches).
at::Tensor channels_last(const at::Tensor& lv, at::ScalarType dtype) {
  return lv.permute({0, 1, 3, 4, 2}).to(dtype).contiguous();
}

template <typename acc_t>
struct LevelView {
  const acc_t* data;  // [B,3,H,W,C]
  int64_t H, W;
};

template <typename acc_t>
std::vector<LevelView<acc_t>> views(const std::vector<at::Tensor>& cl) {
  std::vector<LevelView<acc_t>> v;
  for (const auto& t : cl) v.push_back({t.data_ptr<acc_t>(), t.size(2), t.size(3)});
  return v;
}

// acc[c] += sum_k w[k] * r[k][c]; rows of corners outside point at a row of zeros.
template <typename acc_t>
inline void axpy4(acc_t* __restrict__ acc, const acc_t* __restrict__ r0, const acc_t* __restrict__ r1,
                  const acc_t* __restrict__ r2, const acc_t* __restrict__ r3, acc_t w0, acc_t w1, acc_t w2, acc_t w3,
                  int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
}

// dst[c] += w * src[c]
template <typename acc_t>
inline void axpy(acc_t* __restrict__ dst, const acc_t* __restrict__ src, acc_t w, int64_t C) {
  for (int64_t c = 0; c < C; ++c) dst[c] += w * src[c];
}

// <a, b> with 8 independent partial sums (a reduction the compiler can vectorise without reassociating).
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t C) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[c + j] * b[c + j];
  acc_t r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; c < C; ++c) r += a[c] * b[c];
  return r;
}

template <typename acc_t>
void forward_kernel(const std::vector<LevelView<acc_t>>& lv, const acc_t* xyz, acc_t* out, int64_t B, int64_t N,
                    int64_t C, acc_t scale, int plane_axes) {
  const acc_t third = acc_t(1) / acc_t(3);
  at::parallel_for(0, B * N, kPointGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> zeros(C, acc_t(0));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / N;
      const acc_t u[3] = {xyz[i * 3] * scale, xyz[i * 3 + 1] * scale, xyz[i * 3 + 2] * scale};
      acc_t* o = out + i * C;
      for (int64_t c = 0; c < C; ++c) o[c] = acc_t(0);
      for (const auto& L : lv) {
        const int64_t plane = L.H * L.W * C;
        for (int p = 0; p < 3; ++p) {
          acc_t a, bb;
          plane_uv(u, plane_axes, p, a, bb);
          BilinearTap<acc_t> t;
          if (!bilinear_tap(a, bb, L.H, L.W, t)) continue;
          const acc_t* base = L.data + (b * 3 + p) * plane;
          const acc_t* r[4];
          for (int k = 0; k < 4; ++k) r[k] = t.idx[k] >= 0 ? base + t.idx[k] * C : zeros.data();
          axpy4(o, r[0], r[1], r[2], r[3], t.w[0] * third, t.w[1] * third, t.w[2] * third, t.w[3] * third, C);
        }
      }
    }
  });
}

// Plane gradients: task (b, p, l) accumulates grad_out * weight / 3 into its slice of gcl[l].
template <typename acc_t>
void plane_grad_kernel(const std::vector<acc_t*>& gcl, const std::vector<LevelView<acc_t>>& lv, const acc_t* grad,
                       const acc_t* xyz, int64_t B, int64_t N, int64_t C, acc_t scale, int plane_axes) {
  const int64_t L = static_cast<int64_t>(lv.size());
  const acc_t third = acc_t(1) / acc_t(3);
  at::parallel_for(0, B * 3 * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % L, bp = task / L, b = bp / 3;
      const int p = static_cast<int>(bp % 3);
      const int64_t H = lv[l].H, W = lv[l].W;
      acc_t* g_plane = gcl[l] + bp * H * W * C;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = b * N + n;
        const acc_t u[3] = {xyz[i * 3] * scale, xyz[i * 3 + 1] * scale, xyz[i * 3 + 2] * scale};
        acc_t a, bb;
        plane_uv(u, plane_axes, p, a, bb);
        BilinearTap<acc_t> t;
        if (!bilinear_tap(a, bb, H, W, t)) continue;
        const acc_t* g = grad + i * C;
        for (int k = 0; k < 4; ++k)
          if (t.idx[k] >= 0) axpy(g_plane + t.idx[k] * C, g, t.w[k] * third, C);
      }
    }
  });
}

// xyz gradient: parallel over points, every level of every plane.
template <typename acc_t>
void xyz_grad_kernel(const std::vector<LevelView<acc_t>>& lv, const acc_t* grad, const acc_t* xyz, acc_t* gxyz,
                     int64_t B, int64_t N, int64_t C, acc_t scale, int plane_axes) {
  const acc_t third = acc_t(1) / acc_t(3);
  at::parallel_for(0, B * N, kPointGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / N;
      const acc_t u[3] = {xyz[i * 3] * scale, xyz[i * 3 + 1] * scale, xyz[i * 3 + 2] * scale};
      const acc_t* g = grad + i * C;
      acc_t gu[3] = {0, 0, 0};
      for (const auto& L : lv) {
        for (int p = 0; p < 3; ++p) {
          acc_t a, bb;
          plane_uv(u, plane_axes, p, a, bb);
          BilinearTap<acc_t> t;
          if (!bilinear_tap(a, bb, L.H, L.W, t)) continue;
          const acc_t* base = L.data + (b * 3 + p) * L.H * L.W * C;
          acc_t s[4];
          for (int k = 0; k < 4; ++k) s[k] = t.idx[k] >= 0 ? third * dot(g, base + t.idx[k] * C, C) : acc_t(0);
          accumulate_uv_grad(t, s, plane_axes, p, L.H, L.W, gu);
        }
      }
      for (int k = 0; k < 3; ++k) gxyz[i * 3 + k] = gu[k] * scale;
    }
  });
}

std::vector<at::Tensor> channels_last_levels(at::TensorList levels, at::ScalarType acc) {
  std::vector<at::Tensor> cl;
  for (const auto& lv : levels) cl.push_back(channels_last(lv, acc));
  return cl;
}

at::Tensor sample_fwd_cpu(at::TensorList levels, const at::Tensor& xyz_in, double scale, int64_t plane_axes) {
  check_sample_inputs("g3dr_C::sample_fwd (CPU)", levels, xyz_in, scale, plane_axes);
  const at::ScalarType dtype = levels[0].scalar_type(), acc = acc_type(dtype);
  const int64_t B = xyz_in.size(0), N = xyz_in.size(1), C = levels[0].size(2);
  const at::Tensor xyz = xyz_in.to(acc).contiguous();
  const std::vector<at::Tensor> cl = channels_last_levels(levels, acc);
  at::Tensor out = at::empty({B, N, C}, xyz.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_fwd_cpu", [&] {
    forward_kernel<scalar_t>(views<scalar_t>(cl), xyz.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, N, C,
                             static_cast<scalar_t>(scale), static_cast<int>(plane_axes));
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
  const at::Tensor xyz = xyz_in.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous();
  std::vector<at::Tensor> gcl;  // channels-last gradient buffers [B,3,H,W,C]
  for (const auto& lv : levels) gcl.push_back(at::zeros({B, 3, lv.size(3), lv.size(4), C}, xyz.options()));
  at::Tensor gxyz = need_xyz_grad ? at::empty({B, N, 3}, xyz.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "sample_bwd_cpu", [&] {
    std::vector<scalar_t*> gptr;
    std::vector<LevelView<scalar_t>> shapes;
    for (const auto& g : gcl) {
      gptr.push_back(g.data_ptr<scalar_t>());
      shapes.push_back({nullptr, g.size(2), g.size(3)});
    }
    const auto s = static_cast<scalar_t>(scale);
    plane_grad_kernel<scalar_t>(gptr, shapes, grad.data_ptr<scalar_t>(), xyz.data_ptr<scalar_t>(), B, N, C, s,
                                static_cast<int>(plane_axes));
    if (need_xyz_grad) {
      const std::vector<at::Tensor> cl = channels_last_levels(levels, acc);
      xyz_grad_kernel<scalar_t>(views<scalar_t>(cl), grad.data_ptr<scalar_t>(), xyz.data_ptr<scalar_t>(),
                                gxyz.data_ptr<scalar_t>(), B, N, C, s, static_cast<int>(plane_axes));
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
