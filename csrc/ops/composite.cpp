// The composite op's boundary, compiled in every build: the g3dr_C::composite_fwd/_bwd schemas, the
// argument checks and output allocation both backends share (and the backward's checks that render_bwd
// shares), and the registration of the CPU (csrc/cpu/composite.cpp) and CUDA (csrc/cuda/composite.cu)
// implementations under their dispatch keys. Contract: g3dr_kernels/ops/composite.py; the options:
// CompositeParams (g3dr/params.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

#include "g3dr/composite_op.h"
#include "g3dr/op_args.h"

namespace g3dr {
namespace composite {

OutputGrads read_output_grads(BoxedArgs& a) {  // kOutputGrads, in order
  OutputGrads g;
  g.rgb = a.tensor().contiguous();
  g.depth = a.tensor().contiguous();
  g.opacity = a.tensor().contiguous();
  g.weights = a.optional_tensor();
  if (g.weights.has_value()) g.weights = g.weights->contiguous();
  return g;
}

Outputs read_saved_outputs(BoxedArgs& a) {  // kSavedOutputs, in order
  Outputs saved;
  saved.rgb = a.tensor().contiguous();
  saved.depth = a.tensor().contiguous();
  saved.opacity = a.tensor().contiguous();
  return saved;
}

void check_output_grads(const char* op, int64_t B, int64_t R, int64_t S, int64_t D, const OutputGrads& g,
                        const Outputs& saved, const at::Tensor& ref) {
  auto is = [](const at::Tensor& t, std::initializer_list<int64_t> shape) { return t.sizes() == at::IntArrayRef(shape); };
  TORCH_CHECK(is(g.rgb, {B, R, D}) && is(saved.rgb, {B, R, D}) && is(g.depth, {B, R}) && is(g.opacity, {B, R}) &&
                  is(saved.depth, {B, R}) && is(saved.opacity, {B, R}),
              op, ": expected grad_rgb/out_rgb [B,R,D] = [", B, ", ", R, ", ", D,
              "] and grad_depth/grad_opacity/out_depth/out_opacity [B,R]; got grad_rgb ", g.rgb.sizes(), ", out_rgb ",
              saved.rgb.sizes(), ", grad_depth ", g.depth.sizes(), ", grad_opacity ", g.opacity.sizes(),
              ", out_depth ", saved.depth.sizes(), ", out_opacity ", saved.opacity.sizes());
  if (g.weights.has_value()) {
    TORCH_CHECK(is(*g.weights, {B, R, S - 1}), op, ": grad_weights must be [B,R,S-1] = [", B, ", ", R, ", ", S - 1,
                "], got ", g.weights->sizes());
  }
  for (const at::Tensor* t : {&g.rgb, &g.depth, &g.opacity, &saved.rgb, &saved.depth, &saved.opacity}) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type() && t->device() == ref.device(), op,
                ": gradients and saved outputs must be ", ref.scalar_type(), " on ", ref.device(),
                ", got a tensor of shape ", t->sizes(), " that is ", t->scalar_type(), " on ", t->device());
  }
  if (g.weights.has_value()) {
    TORCH_CHECK(g.weights->scalar_type() == ref.scalar_type() && g.weights->device() == ref.device(), op,
                ": grad_weights must be ", ref.scalar_type(), " on ", ref.device());
  }
}

namespace {

constexpr const char* kInputs = "Tensor sigma, Tensor rgb, Tensor depths, Tensor? target";

Inputs read_inputs(BoxedArgs& a) {  // kInputs, in order
  Inputs in;
  in.sigma = a.tensor();
  in.rgb = a.tensor();
  in.depths = a.tensor();
  in.target = a.optional_tensor();
  return in;
}

// Shapes in every message. Leaves every tensor contiguous.
void check_inputs(Inputs& in) {
  const at::Tensor &sigma = in.sigma, &rgb = in.rgb, &depths = in.depths;
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
  if (in.target.has_value()) {
    const at::Tensor& t = *in.target;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == sigma.size(0) && t.size(1) == sigma.size(1),
                "composite: target must be [B,R] = [", sigma.size(0), ", ", sigma.size(1), "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == sigma.scalar_type() && t.device() == sigma.device(),
                "composite: target must match sigma's dtype and device, got ", t.scalar_type(), " on ", t.device());
    in.target = t.contiguous();
  }
  for (at::Tensor* t : {&in.sigma, &in.rgb, &in.depths}) *t = t->contiguous();
}

template <decltype(fwd_cpu)* impl>
void fwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  BoxedArgs a(op, stack);
  Inputs in = read_inputs(a);
  const CompositeParams p = a.block<CompositeParams>();
  const bool need_weights = a.flag();
  check_inputs(in);
  check(p, "composite");
  const int64_t B = in.sigma.size(0), R = in.sigma.size(1), S = in.sigma.size(2), D = in.rgb.size(3);
  const auto opts = in.sigma.options();
  Outputs out{at::empty({B, R, D}, in.rgb.options()), at::empty({B, R}, opts), at::empty({B, R}, opts),
              need_weights ? at::empty({B, R, S - 1}, opts) : at::empty({0}, opts)};
  impl(in, p, out);
  a.finish(out.rgb, out.depth, out.opacity, out.weights);
}

template <decltype(bwd_cpu)* impl>
void bwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  BoxedArgs a(op, stack);
  const OutputGrads g = read_output_grads(a);
  Inputs in = read_inputs(a);
  const Outputs saved = read_saved_outputs(a);
  const CompositeParams p = a.block<CompositeParams>();
  check_inputs(in);
  check(p, "composite");
  check_output_grads("composite_bwd", in.sigma.size(0), in.sigma.size(1), in.sigma.size(2), in.rgb.size(3), g, saved,
                     in.sigma);
  Grads grads{at::empty_like(in.sigma), at::empty_like(in.rgb)};
  impl(in, g, saved, p, grads);
  a.finish(grads.sigma, grads.rgb);
}

}  // namespace
}  // namespace composite
}  // namespace g3dr

TORCH_LIBRARY_FRAGMENT(g3dr_C, m) {
  using namespace g3dr;
  const std::string inputs = composite::kInputs, params = schema_of<CompositeParams>();
  m.def(("composite_fwd(" + inputs + ", " + params + ", bool need_weights) -> (Tensor, Tensor, Tensor, Tensor)")
            .c_str());
  m.def(("composite_bwd(" + std::string(composite::kOutputGrads) + ", " + inputs + ", " + composite::kSavedOutputs +
         ", " + params + ") -> (Tensor, Tensor)")
            .c_str());
}

TORCH_LIBRARY_IMPL(g3dr_C, CPU, m) {
  using namespace g3dr::composite;
  m.impl("composite_fwd", torch::CppFunction::makeFromBoxedFunction<&fwd<fwd_cpu>>());
  m.impl("composite_bwd", torch::CppFunction::makeFromBoxedFunction<&bwd<bwd_cpu>>());
}

#ifdef G3DR_WITH_CUDA
TORCH_LIBRARY_IMPL(g3dr_C, CUDA, m) {
  using namespace g3dr::composite;
  m.impl("composite_fwd", torch::CppFunction::makeFromBoxedFunction<&fwd<fwd_cuda>>());
  m.impl("composite_bwd", torch::CppFunction::makeFromBoxedFunction<&bwd<bwd_cuda>>());
}
#endif
