// The fused render op between its boundary (csrc/ops/render.cpp: schemas, argument checks, output
// allocation, registration for the CPU and CUDA dispatch keys) and its device implementations
// (csrc/cpu/render.cpp, csrc/cuda/render.cu). Contract: g3dr_kernels/ops/render.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "g3dr/composite_op.h"
#include "g3dr/params.h"
#include "g3dr/render_math.h"

namespace g3dr {
namespace render {

// The op's tensors, checked (the shapes of Dims, one dtype and device) and contiguous.
struct Inputs {
  std::vector<at::Tensor> levels;   // [B,3,C,H_l,W_l] each
  at::Tensor rays_o, rays_d, depths;  // [B,R,3], [B,R,3], [B,R,S]
  at::Tensor w1, b1, w2, b2;        // [Hd,C], [Hd], [O,Hd], [O]
  std::optional<at::Tensor> target;  // [B,R]
};

// The forward's results and the backward's incoming gradients are those of composite.
using Outputs = composite::Outputs;
using OutputGrads = composite::OutputGrads;

// What the backward returns: one gradient per level, then the decoder's.
struct Grads {
  std::vector<at::Tensor> levels;
  at::Tensor w1, b1, w2, b2;
};

// RenderArgs with the sizes and options filled in; each backend adds its pointers.
template <typename scalar_t, typename acc_t>
RenderArgs<scalar_t, acc_t> args_for(const Dims& d, const RenderParams& p) {
  RenderArgs<scalar_t, acc_t> c{};
  c.R = d.R;
  c.S = d.S;
  c.C = d.C;
  c.Hd = d.Hd;
  c.O = d.O;
  c.D = d.O - 1;
  c.scale = static_cast<acc_t>(p.sample.scale);
  c.plane_axes = static_cast<int>(p.sample.plane_axes);
  c.prm = cast<composite::Params<acc_t>>(p.composite);
  return c;
}

// The forward's output pointers in c (out_w null when the weights were not asked for).
template <typename scalar_t, typename acc_t>
void set_outputs(RenderArgs<scalar_t, acc_t>& c, Outputs& out) {
  c.out_rgb = out.rgb.mutable_data_ptr<scalar_t>();
  c.out_depth = out.depth.mutable_data_ptr<scalar_t>();
  c.out_opacity = out.opacity.mutable_data_ptr<scalar_t>();
  c.out_w = out.weights.dim() == 3 ? out.weights.mutable_data_ptr<scalar_t>() : nullptr;  // else an empty tensor
}

// The backward's input pointers in c: the outputs' gradients (g_w null without one) and the saved outputs.
template <typename scalar_t, typename acc_t>
void set_output_grads(RenderArgs<scalar_t, acc_t>& c, const OutputGrads& g, const Outputs& saved) {
  c.g_rgb = g.rgb.const_data_ptr<scalar_t>();
  c.g_depth = g.depth.const_data_ptr<scalar_t>();
  c.g_op = g.opacity.const_data_ptr<scalar_t>();
  c.g_w = g.weights.has_value() ? g.weights->const_data_ptr<scalar_t>() : nullptr;
  c.s_rgb = saved.rgb.const_data_ptr<scalar_t>();
  c.s_depth = saved.depth.const_data_ptr<scalar_t>();
  c.s_op = saved.opacity.const_data_ptr<scalar_t>();
}

// Device implementations, called by the boundary with checked, contiguous tensors; they fill the
// tensors the boundary allocated (out: Outputs [B,R,D], [B,R], [B,R], [B,R,S-1] or empty; grads: the
// shapes and dtypes of levels and decoder).
void fwd_cpu(const Dims& d, const Inputs& in, const RenderParams& p, Outputs& out);
void bwd_cpu(const Dims& d, const Inputs& in, const OutputGrads& g, const Outputs& saved, const RenderParams& p,
             Grads& grads);
void fwd_cuda(const Dims& d, const Inputs& in, const RenderParams& p, Outputs& out);
void bwd_cuda(const Dims& d, const Inputs& in, const OutputGrads& g, const Outputs& saved, const RenderParams& p,
              Grads& grads);

}  // namespace render
}  // namespace g3dr
