// The sample op's boundary, compiled in every build: the g3dr_C::sample_fwd/_bwd schemas, the
// argument checks and output allocation both backends share, and the registration of the CPU
// (csrc/cpu/sample.cpp) and CUDA (csrc/cuda/sample.cu) implementations under their dispatch keys.
// Contract: g3dr_kernels/ops/sample.py; the options: SampleParams (g3dr/params.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "g3dr/op_args.h"
#include "g3dr/sample_op.h"

namespace g3dr {
namespace sample {
namespace {

constexpr const char* kInputs = "Tensor[] levels, Tensor xyz";

Inputs read_inputs(BoxedArgs& a) {  // kInputs, in order
  Inputs in;
  in.levels = a.tensors();
  in.xyz = a.tensor();
  return in;
}

// Shapes in every message. Leaves every tensor contiguous.
void check_inputs(const char* op, Inputs& in) {
  const std::vector<at::Tensor>& levels = in.levels;
  const at::Tensor& xyz = in.xyz;
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
  for (at::Tensor& lv : in.levels) lv = lv.contiguous();
  in.xyz = in.xyz.contiguous();
}

template <decltype(fwd_cpu)* impl>
void fwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const char* name = "g3dr_C::sample_fwd";
  BoxedArgs a(op, stack);
  Inputs in = read_inputs(a);
  const SampleParams p = a.block<SampleParams>();
  check_inputs(name, in);
  check(p, name);
  at::Tensor out = at::empty({in.xyz.size(0), in.xyz.size(1), in.levels[0].size(2)}, in.levels[0].options());
  impl(in, p, out);
  a.finish(out);
}

template <decltype(bwd_cpu)* impl>
void bwd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const char* name = "g3dr_C::sample_bwd";
  BoxedArgs a(op, stack);
  at::Tensor grad_out = a.tensor();
  Inputs in = read_inputs(a);
  const SampleParams p = a.block<SampleParams>();
  const bool need_xyz_grad = a.flag();
  check_inputs(name, in);
  check(p, name);
  const at::Tensor& xyz = in.xyz;
  const int64_t C = in.levels[0].size(2);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == xyz.size(0) && grad_out.size(1) == xyz.size(1) &&
                  grad_out.size(2) == C,
              name, ": grad_out must be [B,N,C] = [", xyz.size(0), ", ", xyz.size(1), ", ", C, "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device() == xyz.device(), name, ": grad_out is on ", grad_out.device(), " but xyz is on ",
              xyz.device());
  Grads grads;
  for (const at::Tensor& lv : in.levels) grads.levels.push_back(at::empty(lv.sizes(), lv.options()));
  grads.xyz = need_xyz_grad ? at::empty({xyz.size(0), xyz.size(1), 3}, xyz.options()) : at::empty({0}, xyz.options());
  impl(grad_out.contiguous(), in, p, grads);
  std::vector<at::Tensor> result = grads.levels;
  result.push_back(grads.xyz);
  a.finish(std::move(result));
}

}  // namespace
}  // namespace sample
}  // namespace g3dr

TORCH_LIBRARY_FRAGMENT(g3dr_C, m) {
  using namespace g3dr;
  const std::string inputs = sample::kInputs, params = schema_of<SampleParams>();
  m.def(("sample_fwd(" + inputs + ", " + params + ") -> Tensor").c_str());
  m.def(("sample_bwd(Tensor grad_out, " + inputs + ", " + params + ", bool need_xyz_grad) -> Tensor[]").c_str());
}

TORCH_LIBRARY_IMPL(g3dr_C, CPU, m) {
  using namespace g3dr::sample;
  m.impl("sample_fwd", torch::CppFunction::makeFromBoxedFunction<&fwd<fwd_cpu>>());
  m.impl("sample_bwd", torch::CppFunction::makeFromBoxedFunction<&bwd<bwd_cpu>>());
}

#ifdef G3DR_WITH_CUDA
TORCH_LIBRARY_IMPL(g3dr_C, CUDA, m) {
  using namespace g3dr::sample;
  m.impl("sample_fwd", torch::CppFunction::makeFromBoxedFunction<&fwd<fwd_cuda>>());
  m.impl("sample_bwd", torch::CppFunction::makeFromBoxedFunction<&bwd<bwd_cuda>>());
}
#endif
