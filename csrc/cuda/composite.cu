// Volume compositing with depth-kernel gradient scaling: CUDA kernels, one thread per ray.
// The per-ray math is g3dr::composite::ray_forward / ray_backward (csrc/include/g3dr/composite_math.h),
// the same code the CPU kernels run; schemas, argument checks and outputs are the op boundary's
// (csrc/ops/composite.cpp).
// float32/float64, and float16/bfloat16 with float32 accumulation. Contract: g3dr_kernels/ops/composite.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <type_traits>

#include "g3dr/composite_math.h"
#include "g3dr/composite_op.h"

namespace g3dr {
namespace composite {

namespace {

constexpr int kThreads = 128;  // rays per block

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename scalar_t, typename acc_t, int CH>
__global__ void __launch_bounds__(kThreads)
    composite_fwd_kernel(const scalar_t* __restrict__ sigma, const scalar_t* __restrict__ rgb,
                         const scalar_t* __restrict__ depths, int64_t n, int64_t S, int64_t D, Params<acc_t> prm,
                         scalar_t* __restrict__ out_rgb, scalar_t* __restrict__ out_depth,
                         scalar_t* __restrict__ out_opacity, scalar_t* __restrict__ weights) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const OnTheFly<scalar_t, acc_t> src{sigma + r * S, depths + r * S, nullptr, prm};
  for (int64_t d0 = 0; d0 < D; d0 += CH) {
    ray_forward<CH, scalar_t, acc_t>(src, rgb + r * S * D, depths + r * S, S, D, d0, prm, out_rgb + r * D,
                                     out_depth + r, out_opacity + r, weights != nullptr ? weights + r * (S - 1) : nullptr);
  }
}

template <typename scalar_t, typename acc_t, int DC>
__global__ void __launch_bounds__(kThreads)
    composite_bwd_kernel(const scalar_t* __restrict__ g_rgb, const scalar_t* __restrict__ g_depth,
                         const scalar_t* __restrict__ g_opacity, const scalar_t* __restrict__ g_weights,
                         const scalar_t* __restrict__ sigma, const scalar_t* __restrict__ rgb,
                         const scalar_t* __restrict__ depths, const scalar_t* __restrict__ target,
                         const scalar_t* __restrict__ out_rgb, const scalar_t* __restrict__ out_depth,
                         const scalar_t* __restrict__ out_opacity, int64_t n, int64_t S, int64_t D, Params<acc_t> prm,
                         scalar_t* __restrict__ grad_sigma, scalar_t* __restrict__ grad_rgb) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const OnTheFly<scalar_t, acc_t> src{sigma + r * S, depths + r * S, target != nullptr ? target + r : nullptr, prm};
  ray_backward<scalar_t, acc_t, DC>(src, g_rgb + r * D, static_cast<acc_t>(g_depth[r]), static_cast<acc_t>(g_opacity[r]),
                                g_weights != nullptr ? g_weights + r * (S - 1) : nullptr, rgb + r * S * D,
                                depths + r * S, out_rgb + r * D, static_cast<acc_t>(out_depth[r]),
                                static_cast<acc_t>(out_opacity[r]), S, D, prm, grad_sigma + r * S, grad_rgb + r * S * D);
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "composite (cuda): ", name, " must be a CUDA tensor, got ", t.device());
}

}  // namespace

void fwd_cuda(const Inputs& in, const CompositeParams& p, Outputs& out) {
  check_cuda(in.sigma, "sigma");
  const c10::cuda::CUDAGuard guard(in.sigma.device());
  const int64_t B = in.sigma.size(0), R = in.sigma.size(1), S = in.sigma.size(2), D = in.rgb.size(3), n = B * R;
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.sigma.scalar_type(), "composite_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto prm = cast<Params<acc_t>>(p);
    scalar_t* w = out.weights.dim() == 3 ? out.weights.mutable_data_ptr<scalar_t>() : nullptr;  // else not asked for
    const scalar_t* sg = in.sigma.const_data_ptr<scalar_t>();
    const scalar_t* c = in.rgb.const_data_ptr<scalar_t>();
    const scalar_t* t = in.depths.const_data_ptr<scalar_t>();
    if (D <= 4) {
      composite_fwd_kernel<scalar_t, acc_t, 4><<<blocks_for(n), kThreads, 0, stream>>>(
          sg, c, t, n, S, D, prm, out.rgb.mutable_data_ptr<scalar_t>(), out.depth.mutable_data_ptr<scalar_t>(),
          out.opacity.mutable_data_ptr<scalar_t>(), w);
    } else {
      composite_fwd_kernel<scalar_t, acc_t, 8><<<blocks_for(n), kThreads, 0, stream>>>(
          sg, c, t, n, S, D, prm, out.rgb.mutable_data_ptr<scalar_t>(), out.depth.mutable_data_ptr<scalar_t>(),
          out.opacity.mutable_data_ptr<scalar_t>(), w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bwd_cuda(const Inputs& in, const OutputGrads& g, const Outputs& saved, const CompositeParams& p, Grads& grads) {
  check_cuda(in.sigma, "sigma");
  const c10::cuda::CUDAGuard guard(in.sigma.device());
  const int64_t n = in.sigma.size(0) * in.sigma.size(1), S = in.sigma.size(2), D = in.rgb.size(3);
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.sigma.scalar_type(), "composite_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto prm = cast<Params<acc_t>>(p);
    auto launch = [&](auto dc) {  // D = 3 (RGB) compiled with its channel loops unrolled
      composite_bwd_kernel<scalar_t, acc_t, decltype(dc)::value><<<blocks_for(n), kThreads, 0, stream>>>(
          g.rgb.const_data_ptr<scalar_t>(), g.depth.const_data_ptr<scalar_t>(), g.opacity.const_data_ptr<scalar_t>(),
          g.weights.has_value() ? g.weights->const_data_ptr<scalar_t>() : nullptr, in.sigma.const_data_ptr<scalar_t>(),
          in.rgb.const_data_ptr<scalar_t>(), in.depths.const_data_ptr<scalar_t>(),
          in.target.has_value() ? in.target->const_data_ptr<scalar_t>() : nullptr, saved.rgb.const_data_ptr<scalar_t>(),
          saved.depth.const_data_ptr<scalar_t>(), saved.opacity.const_data_ptr<scalar_t>(), n, S, D, prm,
          grads.sigma.mutable_data_ptr<scalar_t>(), grads.rgb.mutable_data_ptr<scalar_t>());
    };
    if (D == 3) {
      launch(std::integral_constant<int, 3>{});
    } else {
      launch(std::integral_constant<int, 0>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace composite
}  // namespace g3dr
