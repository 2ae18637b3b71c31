// The fused render op's boundary, compiled in every build: the g3dr_C::render_fwd/_bwd schemas, the
// argument checks and output allocation both backends share, and the registration of the CPU
// (csrc/cpu/render.cpp) and CUDA (csrc/cuda/render.cu) implementations under their dispatch keys.
// Contract: g3dr_kernels/ops/render.py; the options: RenderParams (g3dr/params.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "g3dr/op_args.h"
#include "g3dr/render_op.h"

namespace g3dr {
namespace render {
namespace {

constexpr const char* kInputs =
    "Tensor[] levels, Tensor rays_o, Tensor rays_d, Tensor depths, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
    "Tensor? target";

Inputs read_inputs(BoxedArgs& a) {  // kInputs, in order
  Inputs in;
  in.levels = a.tensors();
  in.rays_o = a.tensor();
  in.rays_d = a.tensor();
  in.depths = a.tensor();
  in.w1 = a.tensor();
  in.b1 = a.tensor();
  in.w2 = a.tensor();
  in.b2 = a.tensor();
  in.target = a.optional_tensor();
  return in;
}

// Shapes in every message. Leaves every tensor contiguous.
Dims check_inputs(Inputs& in) {
  const std::vector<at::Tensor>& levels = in.levels;
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
  const at::Tensor &depths = in.depths, &rays_o = in.rays_o, &rays_d = in.rays_d;
  TORCH_CHECK(depths.dim() == 3 && depths.size(0) == B, "render: depths must be [B,R,S] with B = ", B, ", got ",
              depths.sizes());
  const int64_t R = depths.size(1), S = depths.size(2);
  TORCH_CHECK(S >= 2, "render: needs S >= 2 samples per ray, got depths ", depths.sizes());
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  TORCH_CHECK(is(rays_o, {B, R, 3}) && is(rays_d, {B, R, 3}), "render: rays_o and rays_d must be [B,R,3] = [", B,
              ", ", R, ", 3], got ", rays_o.sizes(), " and ", rays_d.sizes());
  const at::Tensor &w1 = in.w1, &b1 = in.b1, &w2 = in.w2, &b2 = in.b2;
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C && w2.dim() == 2 && w2.size(0) >= 2 && w2.size(1) == w1.size(0) &&
                  is(b1, {w1.size(0)}) && is(b2, {w2.size(0)}),
              "render: decoder must be w1 [hidden,C=", C, "], b1 [hidden], w2 [1+D,hidden] (D >= 1), b2 [1+D]; got w1 ",
              w1.sizes(), ", b1 ", b1.sizes(), ", w2 ", w2.sizes(), ", b2 ", b2.sizes());
  if (in.target.has_value()) {
    TORCH_CHECK(is(*in.target, {B, R}), "render: target must be [B,R] = [", B, ", ", R, "], got ",
                in.target->sizes());
  }
  for (const at::Tensor* t : {&rays_o, &rays_d, &depths, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == l0.scalar_type() && t->device() == l0.device(),
                "render: all inputs must share the planes' dtype and device (", l0.scalar_type(), " on ", l0.device(),
                "), got a tensor of shape ", t->sizes(), " that is ", t->scalar_type(), " on ", t->device());
  }
  if (in.target.has_value()) {
    TORCH_CHECK(in.target->scalar_type() == l0.scalar_type() && in.target->device() == l0.device(),
                "render: target must match the planes' dtype and device, got ", in.target->scalar_type(), " on ",
                in.target->device());
  }
  const Dims d{B, R, S, C, w1.size(0), w2.size(0)};
  for (at::Tensor& lv : in.levels) lv = lv.contiguous();
  for (at::Tensor* t : {&in.rays_o, &in.rays_d, &in.depths, &in.w1, &in.b1, &in.w2, &in.b2}) *t = t->contiguous();
  if (in.target.has_value()) in.target = in.target->contiguous();
  return d;
}

template <decltype(fwd_cpu)* impl>
void fwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  BoxedArgs a(op, stack);
  Inputs in = read_inputs(a);
  const RenderParams p = a.block<RenderParams>();
  const bool need_weights = a.flag();
  const Dims d = check_inputs(in);
  check(p, "render");
  const auto opts = in.depths.options();
  Outputs out{at::empty({d.B, d.R, d.O - 1}, opts), at::empty({d.B, d.R}, opts), at::empty({d.B, d.R}, opts),
              need_weights ? at::empty({d.B, d.R, d.S - 1}, opts) : at::empty({0}, opts)};
  impl(d, in, p, out);
  a.finish(out.rgb, out.depth, out.opacity, out.weights);
}

template <decltype(bwd_cpu)* impl>
void bwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  BoxedArgs a(op, stack);
  const OutputGrads g = composite::read_output_grads(a);
  Inputs in = read_inputs(a);
  const Outputs saved = composite::read_saved_outputs(a);
  const RenderParams p = a.block<RenderParams>();
  const Dims d = check_inputs(in);
  check(p, "render");
  composite::check_output_grads("render_bwd", d.B, d.R, d.S, d.O - 1, g, saved, in.depths);
  Grads grads;
  for (const at::Tensor& lv : in.levels) grads.levels.push_back(at::empty(lv.sizes(), lv.options()));
  grads.w1 = at::empty(in.w1.sizes(), in.w1.options());
  grads.b1 = at::empty(in.b1.sizes(), in.b1.options());
  grads.w2 = at::empty(in.w2.sizes(), in.w2.options());
  grads.b2 = at::empty(in.b2.sizes(), in.b2.options());
  impl(d, in, g, saved, p, grads);
  std::vector<at::Tensor> result = grads.levels;
  result.insert(result.end(), {grads.w1, grads.b1, grads.w2, grads.b2});
  a.finish(std::move(result));
}

}  // namespace
}  // namespace render
}  // namespace g3dr

TORCH_LIBRARY_FRAGMENT(g3dr_C, m) {
  using namespace g3dr;
  const std::string params = schema_of<RenderParams>();
  const std::string inputs = render::kInputs;
  m.def(("render_fwd(" + inputs + ", " + params + ", bool need_weights) -> (Tensor, Tensor, Tensor, Tensor)").c_str());
  m.def(("render_bwd(" + std::string(composite::kOutputGrads) + ", " + inputs + ", " + composite::kSavedOutputs +
         ", " + params + ") -> Tensor[]")
            .c_str());
}

TORCH_LIBRARY_IMPL(g3dr_C, CPU, m) {
  using namespace g3dr::render;
  m.impl("render_fwd", torch::CppFunction::makeFromBoxedFunction<&fwd<fwd_cpu>>());
  m.impl("render_bwd", torch::CppFunction::makeFromBoxedFunction<&bwd<bwd_cpu>>());
}

#ifdef G3DR_WITH_CUDA
TORCH_LIBRARY_IMPL(g3dr_C, CUDA, m) {
  using namespace g3dr::render;
  m.impl("render_fwd", torch::CppFunction::makeFromBoxedFunction<&fwd<fwd_cuda>>());
  m.impl("render_bwd", torch::CppFunction::makeFromBoxedFunction<&bwd<bwd_cuda>>());
}
#endif
