// Volume compositing with depth-kernel gradient scaling: op schemas and the CPU kernels.
// The per-ray math is g3dr::composite::ray_forward / ray_backward (csrc/include/g3dr/composite_math.h);
// this file checks arguments, allocates outputs and runs one ray per iteration of at::parallel_for.
// Contract: g3dr_kernels/ops/composite.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "g3dr/composite_math.h"

namespace g3dr {
namespace composite {

// Argument checks shared with csrc/cuda/composite.cu (declared there). Shapes in every message.
void check_fwd_args(const at::Tensor& sigma, const at::Tensor& rgb, const at::Tensor& depths,
                    const std::optional<at::Tensor>& target, double s2, double c_min, double c_max) {
  TORCH_CHECK(sigma.dim() == 3 && rgb.dim() == 4 && depths.dim() == 3,
              "composite: expected sigma [B,R,S], rgb [B,R,S,D], depths [B,R,S]; got sigma ", sigma.sizes(),
              ", rgb ", rgb.sizes(), ", depths ", depths.sizes());
  TORCH_CHECK(rgb.sizes().slice(0, 3) == sigma.sizes() && depths.sizes() == sigma.sizes(),
              "composite: sigma, rgb and depths disagree on B,R,S: sigma ", sigma.sizes(), ", rgb ", rgb.sizes(),
              ", depths ", depths.sizes());
  TORCH_CHECK(sigma.size(2) >= 2, "composite: needs S >= 2 samples per ray, got sigma ", sigma.sizes());
  TORCH_CHECK(rgb.size(3) >= 1, "composite: rgb needs D >= 1 channels, got ", rgb.sizes());
  TORCH_CHECK(rgb.scalar_type() == sigma.scalar_type() && depths.scalar_type() == sigma.scalar_type(),
              "composite: sigma, rgb, depths must share a dtype, got ", sigma.scalar_type(), ", ",
              rgb.scalar_type(), ", ", depths.scalar_type());
  TORCH_CHECK(rgb.device() == sigma.device() && depths.device() == sigma.device(),
              "composite: sigma, rgb, depths must be on one device, got ", sigma.device(), ", ", rgb.device(), ", ",
              depths.device());
  if (target.has_value()) {
    const at::Tensor& t = *target;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == sigma.size(0) && t.size(1) == sigma.size(1),
                "composite: target must be [B,R] = [", sigma.size(0), ", ", sigma.size(1), "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == sigma.scalar_type() && t.device() == sigma.device(),
                "composite: target must match sigma's dtype and device, got ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(s2 > 0 && c_min <= c_max, "composite: depth kernel needs s2 > 0 and c_min <= c_max, got s2=", s2,
              ", c_min=", c_min, ", c_max=", c_max);
}

void check_bwd_args(const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
                    const std::optional<at::Tensor>& grad_weights, const at::Tensor& sigma, const at::Tensor& rgb,
                    const at::Tensor& out_rgb, const at::Tensor& out_depth, const at::Tensor& out_opacity) {
  const int64_t B = sigma.size(0), R = sigma.size(1), S = sigma.size(2), D = rgb.size(3);
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  TORCH_CHECK(is(grad_rgb, {B, R, D}) && is(out_rgb, {B, R, D}) && is(grad_depth, {B, R}) &&
                  is(grad_opacity, {B, R}) && is(out_depth, {B, R}) && is(out_opacity, {B, R}),
              "composite_bwd: with sigma ", sigma.sizes(), " and rgb ", rgb.sizes(),
              " expected grad_rgb/out_rgb [B,R,D] and grad_depth/grad_opacity/out_depth/out_opacity [B,R]; got "
              "grad_rgb ", grad_rgb.sizes(), ", out_rgb ", out_rgb.sizes(), ", grad_depth ", grad_depth.sizes(),
              ", grad_opacity ", grad_opacity.sizes(), ", out_depth ", out_depth.sizes(), ", out_opacity ",
              out_opacity.sizes());
  if (grad_weights.has_value()) {
    TORCH_CHECK(is(*grad_weights, {B, R, S - 1}), "composite_bwd: grad_weights must be [B,R,S-1] = [", B, ", ", R,
                ", ", S - 1, "], got ", grad_weights->sizes());
  }
  for (const at::Tensor* t : {&grad_rgb, &grad_depth, &grad_opacity, &out_rgb, &out_depth, &out_opacity}) {
    TORCH_CHECK(t->scalar_type() == sigma.scalar_type() && t->device() == sigma.device(),
                "composite_bwd: gradients and saved outputs must match sigma's dtype ", sigma.scalar_type(),
                " and device ", sigma.device(), ", got ", t->scalar_type(), " on ", t->device());
  }
  if (grad_weights.has_value()) {
    TORCH_CHECK(grad_weights->scalar_type() == sigma.scalar_type() && grad_weights->device() == sigma.device(),
                "composite_bwd: grad_weights must match sigma's dtype and device");
  }
}

namespace {

template <typename T>
Params<T> make_params(double s1, double s2, double c_min, double c_max, double density_bias, double eps,
                      bool white_bg) {
  return Params<T>{T(s1), T(s2), T(c_min), T(c_max), T(density_bias), T(eps), white_bg};
}

// Rays per parallel_for chunk: enough intervals that scheduling is noise.
int64_t grain(int64_t S) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(S, 1)); }

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
  at::parallel_for(0, n, grain(S), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t d0 = 0; d0 < D; d0 += CH) {
        ray_forward<CH, scalar_t, scalar_t>(sg + r * S, c + r * S * D, t + r * S, S, D, d0, prm, orgb + r * D, od + r,
                                            oo + r, w != nullptr ? w + r * (S - 1) : nullptr);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_fwd_cpu(
    const at::Tensor& sigma_in, const at::Tensor& rgb_in, const at::Tensor& depths_in,
    const std::optional<at::Tensor>& target, double s1, double s2, double c_min, double c_max, double density_bias,
    double eps, bool white_bg, bool need_weights) {
  check_fwd_args(sigma_in, rgb_in, depths_in, target, s2, c_min, c_max);
  TORCH_CHECK(sigma_in.scalar_type() == at::kFloat || sigma_in.scalar_type() == at::kDouble,
              "composite (cpu): float32 and float64 only, got ", sigma_in.scalar_type(),
              "; use backend='torch' for other dtypes on CPU");
  const at::Tensor sigma = sigma_in.contiguous(), rgb = rgb_in.contiguous(), depths = depths_in.contiguous();
  const int64_t B = sigma.size(0), R = sigma.size(1), S = sigma.size(2), D = rgb.size(3);
  at::Tensor out_rgb = at::empty({B, R, D}, rgb.options());
  at::Tensor out_depth = at::empty({B, R}, sigma.options());
  at::Tensor out_opacity = at::empty({B, R}, sigma.options());
  at::Tensor weights = need_weights ? at::empty({B, R, S - 1}, sigma.options()) : at::empty({0}, sigma.options());
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_fwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(s1, s2, c_min, c_max, density_bias, eps, white_bg);
    at::Tensor* w = need_weights ? &weights : nullptr;
    if (D <= 4) {
      fwd_cpu_impl<scalar_t, 4>(sigma, rgb, depths, prm, out_rgb, out_depth, out_opacity, w);
    } else {
      fwd_cpu_impl<scalar_t, 8>(sigma, rgb, depths, prm, out_rgb, out_depth, out_opacity, w);
    }
  });
  return {out_rgb, out_depth, out_opacity, weights};
}

std::tuple<at::Tensor, at::Tensor> composite_bwd_cpu(
    const at::Tensor& grad_rgb_in, const at::Tensor& grad_depth_in, const at::Tensor& grad_opacity_in,
    const std::optional<at::Tensor>& grad_weights_in, const at::Tensor& sigma_in, const at::Tensor& rgb_in,
    const at::Tensor& depths_in, const std::optional<at::Tensor>& target_in, const at::Tensor& out_rgb_in,
    const at::Tensor& out_depth_in, const at::Tensor& out_opacity_in, double s1, double s2, double c_min, double c_max,
    double density_bias, double eps, bool white_bg) {
  check_fwd_args(sigma_in, rgb_in, depths_in, target_in, s2, c_min, c_max);
  check_bwd_args(grad_rgb_in, grad_depth_in, grad_opacity_in, grad_weights_in, sigma_in, rgb_in, out_rgb_in,
                 out_depth_in, out_opacity_in);
  TORCH_CHECK(sigma_in.scalar_type() == at::kFloat || sigma_in.scalar_type() == at::kDouble,
              "composite (cpu): float32 and float64 only, got ", sigma_in.scalar_type());
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
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_bwd_cpu", [&] {
    const auto prm = make_params<scalar_t>(s1, s2, c_min, c_max, density_bias, eps, white_bg);
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
    at::parallel_for(0, n, grain(S), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        ray_backward<scalar_t, scalar_t>(gr + r * D, gd[r], go[r], gw != nullptr ? gw + r * (S - 1) : nullptr,
                                         sg + r * S, c + r * S * D, t + r * S, tg != nullptr ? tg + r : nullptr,
                                         orgb + r * D, od[r], oo[r], S, D, prm, gs + r * S, gc + r * S * D);
      }
    });
  });
  return {grad_sigma, grad_rgb};
}

}  // namespace
}  // namespace composite
}  // namespace g3dr

TORCH_LIBRARY_FRAGMENT(g3dr_C, m) {
  m.def(
      "composite_fwd(Tensor sigma, Tensor rgb, Tensor depths, Tensor? target, float s1, float s2, float c_min, "
      "float c_max, float density_bias, float eps, bool white_bg, bool need_weights) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "composite_bwd(Tensor grad_rgb, Tensor grad_depth, Tensor grad_opacity, Tensor? grad_weights, Tensor sigma, "
      "Tensor rgb, Tensor depths, Tensor? target, Tensor out_rgb, Tensor out_depth, Tensor out_opacity, float s1, "
      "float s2, float c_min, float c_max, float density_bias, float eps, bool white_bg) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(g3dr_C, CPU, m) {
  m.impl("composite_fwd", &g3dr::composite::composite_fwd_cpu);
  m.impl("composite_bwd", &g3dr::composite::composite_bwd_cpu);
}
