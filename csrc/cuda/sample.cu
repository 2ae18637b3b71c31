// Fused multi-resolution triplane sampling: CUDA kernels (schemas, input checks and outputs are the op
// boundary's, csrc/ops/sample.cpp; the per-point math in g3dr/sample_math.h is the one the CPU kernels run).
//
// Layout: each level is copied once per call to channels-last [B,3,H,W,C] (in its own dtype), so
// the lanes that share a point read and write consecutive channels of a corner (coalesced). A point
// is handled by TPP lanes (TPP = next power of two >= C, at most 32; TPP divides the warp size), each
// lane owning channels lane, lane + TPP, ... in registers (CPT of them per pass over the channels).
//   forward:  every lane computes the taps of its point (cheap arithmetic, no shared state) and
//             accumulates its channels over all levels and planes in float32 (float64 for double).
//   backward: plane gradients by atomicAdd into channels-last float32 (float64) buffers, converted to
//             each level's dtype and layout at the end; the xyz gradient (when asked) is each lane's
//             partial <grad_out, corner values> reduced over the point's lanes with warp shuffles
//             (no atomics: one lane writes it).
// float16/bfloat16 planes (with float32 or same-dtype xyz) are computed in float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "g3dr/sample_math.h"
#include "g3dr/sample_op.h"

namespace g3dr {

namespace {

constexpr int kMaxLevels = 16;  // levels passed by value in the kernel arguments
constexpr int kThreads = 256;   // threads per block (a multiple of 32: whole warps)
constexpr int kMaxCPT = 8;      // channels per lane held in registers per pass

template <typename scalar_t, typename acc_t>
struct Levels {
  const scalar_t* data[kMaxLevels];  // channels-last [B,3,H,W,C]
  acc_t* grad[kMaxLevels];           // channels-last gradient buffers (backward)
  int64_t H[kMaxLevels], W[kMaxLevels];
  int L;
};

template <typename scalar_t, typename acc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    sample_fwd_kernel(const Levels<scalar_t, acc_t> lv, const acc_t* __restrict__ xyz, scalar_t* __restrict__ out,
                      int64_t B, int64_t N, int64_t C, acc_t scale, int plane_axes, int tpp) {
  const int lane = threadIdx.x % tpp, ppb = blockDim.x / tpp;
  const int64_t total = B * N;
  const acc_t third = acc_t(1) / acc_t(3);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * ppb + threadIdx.x / tpp; i < total;
       i += static_cast<int64_t>(gridDim.x) * ppb) {
    const int64_t b = i / N;
    const acc_t u[3] = {xyz[i * 3] * scale, xyz[i * 3 + 1] * scale, xyz[i * 3 + 2] * scale};
    const bool finite = finite_point(u);
    for (int64_t c0 = lane; c0 < C; c0 += static_cast<int64_t>(tpp) * CPT) {
      acc_t acc[CPT];
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[j] = acc_t(0);
      for (int l = 0; l < lv.L; ++l) {
        const int64_t H = lv.H[l], W = lv.W[l];
        for (int p = 0; p < 3; ++p) {
          acc_t a, bb;
          plane_uv(u, plane_axes, p, a, bb);
          BilinearTap<acc_t> t;
          if (!bilinear_tap(a, bb, H, W, t)) continue;
          const scalar_t* base = lv.data[l] + (b * 3 + p) * H * W * C;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (t.idx[k] < 0) continue;
            const scalar_t* row = base + t.idx[k] * C;
#pragma unroll
            for (int j = 0; j < CPT; ++j) {
              const int64_t c = c0 + static_cast<int64_t>(j) * tpp;
              if (c < C) acc[j] += t.w[k] * static_cast<acc_t>(row[c]);
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        const int64_t c = c0 + static_cast<int64_t>(j) * tpp;
        if (c < C) out[i * C + c] = static_cast<scalar_t>(finite ? acc[j] * third : quiet_nan<acc_t>());
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    sample_bwd_kernel(const Levels<scalar_t, acc_t> lv, const scalar_t* __restrict__ grad_out,
                      const acc_t* __restrict__ xyz, acc_t* __restrict__ gxyz, int64_t B, int64_t N, int64_t C,
                      acc_t scale, int plane_axes, int tpp, bool need_xyz_grad) {
  const int lane = threadIdx.x % tpp, ppb = blockDim.x / tpp;
  const int64_t total = B * N;
  const acc_t third = acc_t(1) / acc_t(3);
  // The loop's trip count is the same for every thread of a block, so all lanes reach the shuffles.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * ppb; first < total;
       first += static_cast<int64_t>(gridDim.x) * ppb) {
    const int64_t i = first + threadIdx.x / tpp;
    const bool active = i < total;
    acc_t gu[3] = {acc_t(0), acc_t(0), acc_t(0)};
    if (active) {
      const int64_t b = i / N;
      const acc_t u[3] = {xyz[i * 3] * scale, xyz[i * 3 + 1] * scale, xyz[i * 3 + 2] * scale};
      for (int64_t c0 = lane; c0 < C; c0 += static_cast<int64_t>(tpp) * CPT) {
        acc_t g[CPT];
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
          const int64_t c = c0 + static_cast<int64_t>(j) * tpp;
          g[j] = c < C ? static_cast<acc_t>(grad_out[i * C + c]) * third : acc_t(0);
        }
        for (int l = 0; l < lv.L; ++l) {
          const int64_t H = lv.H[l], W = lv.W[l];
          for (int p = 0; p < 3; ++p) {
            acc_t a, bb;
            plane_uv(u, plane_axes, p, a, bb);
            BilinearTap<acc_t> t;
            if (!bilinear_tap(a, bb, H, W, t)) continue;
            const int64_t off = (b * 3 + p) * H * W * C;
            acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (t.idx[k] < 0) continue;
              acc_t* grow = lv.grad[l] + off + t.idx[k] * C;
              const scalar_t* row = need_xyz_grad ? lv.data[l] + off + t.idx[k] * C : nullptr;
#pragma unroll
              for (int j = 0; j < CPT; ++j) {
                const int64_t c = c0 + static_cast<int64_t>(j) * tpp;
                if (c < C) {
                  atomicAdd(grow + c, t.w[k] * g[j]);  // float or double (sm_60+)
                  if (need_xyz_grad) s[k] += g[j] * static_cast<acc_t>(row[c]);
                }
              }
            }
            // Linear in s, so each lane may add the part from its own channels.
            if (need_xyz_grad) accumulate_uv_grad(t, s, plane_axes, p, H, W, acc_t(1), gu);
          }
        }
      }
    }
    if (need_xyz_grad) {
      for (int off = tpp / 2; off > 0; off /= 2)
#pragma unroll
        for (int k = 0; k < 3; ++k) gu[k] += __shfl_xor_sync(0xffffffffu, gu[k], off, tpp);
      if (active && lane == 0)
#pragma unroll
        for (int k = 0; k < 3; ++k) gxyz[i * 3 + k] = gu[k] * scale;
    }
  }
}

// Lanes per point (a power of two, at most a warp) and channels per lane (1, 2, 4 or 8).
void launch_shape(int64_t C, int& tpp, int& cpt) {
  tpp = 1;
  while (tpp < 32 && tpp < C) tpp *= 2;
  const int64_t per_lane = (C + tpp - 1) / tpp;
  cpt = 1;
  while (cpt < kMaxCPT && cpt < per_lane) cpt *= 2;
}

int64_t num_blocks(int64_t points, int tpp) {
  const int64_t ppb = kThreads / tpp;
  return std::max<int64_t>(1, std::min<int64_t>((points + ppb - 1) / ppb, int64_t(1) << 30));
}

// Calls f(std::integral_constant<int, CPT>) for the runtime cpt.
template <typename F>
void dispatch_cpt(int cpt, F&& f) {
  switch (cpt) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<at::Tensor> channels_last_levels(at::TensorList levels) {
  std::vector<at::Tensor> cl;
  for (const auto& lv : levels) cl.push_back(lv.permute({0, 1, 3, 4, 2}).contiguous());
  return cl;
}

// The kernels' view of channels-last levels [B,3,H,W,C]: their data and their gradient buffers, either
// list empty when the kernel does not read it.
template <typename scalar_t, typename acc_t>
Levels<scalar_t, acc_t> levels_view(const std::vector<at::Tensor>& data, const std::vector<at::Tensor>& grad) {
  const std::vector<at::Tensor>& sized = data.empty() ? grad : data;
  Levels<scalar_t, acc_t> lv{};
  lv.L = static_cast<int>(sized.size());
  for (int l = 0; l < lv.L; ++l) {
    lv.data[l] = data.empty() ? nullptr : data[l].data_ptr<scalar_t>();
    lv.grad[l] = grad.empty() ? nullptr : grad[l].data_ptr<acc_t>();
    lv.H[l] = sized[l].size(2);
    lv.W[l] = sized[l].size(3);
  }
  return lv;
}

void check_cuda(const char* op, at::TensorList levels, const at::Tensor& xyz) {
  TORCH_CHECK(levels.size() <= static_cast<size_t>(kMaxLevels), op, ": at most ", kMaxLevels,
              " levels are supported on CUDA, got ", levels.size());
  TORCH_CHECK(xyz.is_cuda(), op, ": expected CUDA tensors, xyz is on ", xyz.device());
}

}  // namespace

namespace sample {

void fwd_cuda(const Inputs& in, const SampleParams& p, at::Tensor& out) {
  const std::vector<at::Tensor>& levels = in.levels;
  check_cuda("g3dr_C::sample_fwd (CUDA)", levels, in.xyz);
  const c10::cuda::CUDAGuard guard(in.xyz.device());
  const at::ScalarType dtype = levels[0].scalar_type();
  const int64_t B = in.xyz.size(0), N = in.xyz.size(1), C = levels[0].size(2);
  if (out.numel() == 0) return;
  const at::Tensor xyz = in.xyz.to(acc_type(dtype)).contiguous();
  const std::vector<at::Tensor> cl = channels_last_levels(levels);
  int tpp, cpt;
  launch_shape(C, tpp, cpt);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sample_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto lv = levels_view<scalar_t, acc_t>(cl, {});
    dispatch_cpt(cpt, [&](auto k) {
      sample_fwd_kernel<scalar_t, acc_t, decltype(k)::value><<<num_blocks(B * N, tpp), kThreads, 0, stream>>>(
          lv, xyz.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, N, C, static_cast<acc_t>(p.scale),
          static_cast<int>(p.plane_axes), tpp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bwd_cuda(const at::Tensor& grad_in, const Inputs& in, const SampleParams& p, Grads& grads) {
  const std::vector<at::Tensor>& levels = in.levels;
  check_cuda("g3dr_C::sample_bwd (CUDA)", levels, in.xyz);
  const c10::cuda::CUDAGuard guard(in.xyz.device());
  const at::ScalarType dtype = levels[0].scalar_type(), acc = acc_type(dtype);
  const int64_t B = in.xyz.size(0), N = in.xyz.size(1), C = levels[0].size(2);
  const bool need_xyz_grad = grads.xyz.dim() == 3;  // else the boundary left an empty tensor
  const at::Tensor xyz = in.xyz.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(dtype).contiguous();
  std::vector<at::Tensor> gcl;  // channels-last gradient buffers [B,3,H,W,C] in the accumulation type
  for (const auto& lv : levels) gcl.push_back(at::zeros({B, 3, lv.size(3), lv.size(4), C}, xyz.options()));
  at::Tensor gxyz = need_xyz_grad ? at::zeros({B, N, 3}, xyz.options()) : at::Tensor();
  if (B * N > 0 && C > 0) {
    const std::vector<at::Tensor> cl = need_xyz_grad ? channels_last_levels(levels) : std::vector<at::Tensor>();
    int tpp, cpt;
    launch_shape(C, tpp, cpt);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sample_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto lv = levels_view<scalar_t, acc_t>(cl, gcl);  // cl is empty without need_xyz_grad
      dispatch_cpt(cpt, [&](auto k) {
        sample_bwd_kernel<scalar_t, acc_t, decltype(k)::value><<<num_blocks(B * N, tpp), kThreads, 0, stream>>>(
            lv, grad.data_ptr<scalar_t>(), xyz.data_ptr<acc_t>(), need_xyz_grad ? gxyz.data_ptr<acc_t>() : nullptr,
            B, N, C, static_cast<acc_t>(p.scale), static_cast<int>(p.plane_axes), tpp, need_xyz_grad);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  for (size_t l = 0; l < levels.size(); ++l) grads.levels[l].copy_(gcl[l].permute({0, 1, 4, 2, 3}));
  if (need_xyz_grad) grads.xyz.copy_(gxyz);
}

}  // namespace sample
}  // namespace g3dr
