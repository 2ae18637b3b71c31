// Volume compositing with depth-kernel gradient scaling: CUDA kernels, one thread per ray.
// The per-ray math is g3dr::composite::ray_forward / ray_backward (csrc/include/g3dr/composite_math.h),
// the same code the CPU kernels run; schemas and argument checks live in csrc/cpu/composite.cpp.
// float32/float64, and float16/bfloat16 with float32 accumulation. Contract: g3dr_kernels/ops/composite.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "g3dr/composite_math.h"

namespace g3dr {
namespace composite {

// Defined in csrc/cpu/composite.cpp.
void check_fwd_args(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& depths,
                    const std::optional<at::Tensor>& target, double s2, double c_min, double c_max);
void check_bwd_args(const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
                    const std::optional<at::Tensor>& grad_weights, const at::Tensor& sigma, const at::Tensor& rgb,
                    const at::Tensor& out_rgb, const at::Tensor& out_depth, const at::Tensor& out_opacity);

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
  for (int64_t d0 = 0; d0 < D; d0 += CH) {
    ray_forward<CH, scalar_t, acc_t>(sigma + r * S, rgb + r * S * D, depths + r * S, S, D, d0, prm, out_rgb + r * D,
                                     out_depth + r, out_opacity + r, weights != nullptr ? weights + r * (S - 1) : nullptr);
  }
}

template <typename scalar_t, typename acc_t>
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
  ray_backward<scalar_t, acc_t>(g_rgb + r * D, static_cast<acc_t>(g_depth[r]), static_cast<acc_t>(g_opacity[r]),
                                g_weights != nullptr ? g_weights + r * (S - 1) : nullptr, sigma + r * S, rgb + r * S * D,
                                depths + r * S, target != nullptr ? target + r : nullptr, out_rgb + r * D,
                                static_cast<acc_t>(out_depth[r]), static_cast<acc_t>(out_opacity[r]), S, D, prm,
                                grad_sigma + r * S, grad_rgb + r * S * D);
}

template <typename T>
Params<T> make_params(double s1, double s2, double c_min, double c_max, double density_bias, double eps,
                      bool white_bg) {
  return Params<T>{T(s1), T(s2), T(c_min), T(c_max), T(density_bias), T(eps), white_bg};
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "composite (cuda): ", name, " must be a CUDA tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_fwd_cuda(
    const at::Tensor& sigma_in, const at::Tensor& rgb_in, const at::Tensor& depths_in,
    const std::optional<at::Tensor>& target, double s1, double s2, double c_min, double c_max, double density_bias,
    double eps, bool white_bg, bool need_weights) {
  check_fwd_args(sigma_in, rgb_in, depths_in, target, s2, c_min, c_max);
  check_cuda(sigma_in, "sigma");
  const c10::cuda::CUDAGuard guard(sigma_in.device());
  const at::Tensor sigma = sigma_in.contiguous(), rgb = rgb_in.contiguous(), depths = depths_in.contiguous();
  const int64_t B = sigma.size(0), R = sigma.size(1), S = sigma.size(2), D = rgb.size(3), n = B * R;
  at::Tensor out_rgb = at::empty({B, R, D}, rgb.options());
  at::Tensor out_depth = at::empty({B, R}, sigma.options());
  at::Tensor out_opacity = at::empty({B, R}, sigma.options());
  at::Tensor weights = need_weights ? at::empty({B, R, S - 1}, sigma.options()) : at::empty({0}, sigma.options());
  if (n == 0) return {out_rgb, out_depth, out_opacity, weights};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sigma.scalar_type(), "composite_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto prm = make_params<acc_t>(s1, s2, c_min, c_max, density_bias, eps, white_bg);
    scalar_t* w = need_weights ? weights.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sg = sigma.const_data_ptr<scalar_t>();
    const scalar_t* c = rgb.const_data_ptr<scalar_t>();
    const scalar_t* t = depths.const_data_ptr<scalar_t>();
    if (D <= 4) {
      composite_fwd_kernel<scalar_t, acc_t, 4><<<blocks_for(n), kThreads, 0, stream>>>(
          sg, c, t, n, S, D, prm, out_rgb.mutable_data_ptr<scalar_t>(),
          out_depth.mutable_data_ptr<scalar_t>(), out_opacity.mutable_data_ptr<scalar_t>(), w);
    } else {
      composite_fwd_kernel<scalar_t, acc_t, 8><<<blocks_for(n), kThreads, 0, stream>>>(
          sg, c, t, n, S, D, prm, out_rgb.mutable_data_ptr<scalar_t>(),
          out_depth.mutable_data_ptr<scalar_t>(), out_opacity.mutable_data_ptr<scalar_t>(), w);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_rgb, out_depth, out_opacity, weights};
}

std::tuple<at::Tensor, at::Tensor> composite_bwd_cuda(
    const at::Tensor& grad_rgb_in, const at::Tensor& grad_depth_in, const at::Tensor& grad_opacity_in,
    const std::optional<at::Tensor>& grad_weights_in, const at::Tensor& sigma_in, const at::Tensor& rgb_in,
    const at::Tensor& depths_in, const std::optional<at::Tensor>& target_in, const at::Tensor& out_rgb_in,
    const at::Tensor& out_depth_in, const at::Tensor& out_opacity_in, double s1, double s2, double c_min, double c_max,
    double density_bias, double eps, bool white_bg) {
  check_fwd_args(sigma_in, rgb_in, depths_in, target_in, s2, c_min, c_max);
  check_bwd_args(grad_rgb_in, grad_depth_in, grad_opacity_in, grad_weights_in, sigma_in, rgb_in, out_rgb_in,
                 out_depth_in, out_opacity_in);
  check_cuda(sigma_in, "sigma");
  const c10::cuda::CUDAGuard guard(sigma_in.device());
  const at::Tensor sigma = sigma_in.contiguous(), rgb = rgb_in.contiguous(), depths = depths_in.contiguous();
  const at::Tensor g_rgb = grad_rgb_in.contiguous(), g_depth = grad_depth_in.contiguous(),
                   g_op = grad_opacity_in.contiguous();
  const at::Tensor o_rgb = out_rgb_in.contiguous(), o_depth = out_depth_in.contiguous(),
                   o_op = out_opacity_in.contiguous();
  const std::optional<at::Tensor> g_w =
      grad_weights_in.has_value() ? std::optional<at::Tensor>(grad_weights_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> target =
      target_in.has_value() ? std::optional<at::Tensor>(target_in->contiguous()) : std::nullopt;
  at::Tensor grad_sigma = at::empty_like(sigma);
  at::Tensor grad_rgb = at::empty_like(rgb);
  const int64_t n = sigma.size(0) * sigma.size(1), S = sigma.size(2), D = rgb.size(3);
  if (n == 0) return {grad_sigma, grad_rgb};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sigma.scalar_type(), "composite_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto prm = make_params<acc_t>(s1, s2, c_min, c_max, density_bias, eps, white_bg);
    composite_bwd_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g_rgb.const_data_ptr<scalar_t>(), g_depth.const_data_ptr<scalar_t>(), g_op.const_data_ptr<scalar_t>(),
        g_w.has_value() ? g_w->const_data_ptr<scalar_t>() : nullptr, sigma.const_data_ptr<scalar_t>(),
        rgb.const_data_ptr<scalar_t>(), depths.const_data_ptr<scalar_t>(),
        target.has_value() ? target->const_data_ptr<scalar_t>() : nullptr, o_rgb.const_data_ptr<scalar_t>(),
        o_depth.const_data_ptr<scalar_t>(), o_op.const_data_ptr<scalar_t>(), n, S, D, prm,
        grad_sigma.mutable_data_ptr<scalar_t>(), grad_rgb.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_sigma, grad_rgb};
}

}  // namespace
}  // namespace composite
}  // namespace g3dr

TORCH_LIBRARY_IMPL(g3dr_C, CUDA, m) {
  m.impl("composite_fwd", &g3dr::composite::composite_fwd_cuda);
  m.impl("composite_bwd", &g3dr::composite::composite_bwd_cuda);
}
