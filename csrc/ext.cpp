// The extension module g3dr_kernels._C. Importing it registers the torch.ops.g3dr_C.* operators.
// Each op's boundary (csrc/ops/*.cpp) declares its schemas with TORCH_LIBRARY_FRAGMENT(g3dr_C, m) and
// registers its CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels under their dispatch keys.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "g3dr/op_args.h"
#include "g3dr/params.h"

namespace g3dr {

std::string build_info() {
#ifdef G3DR_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

// The field order of an op's option block, as its schemas take them (tests compare it with Python's).
std::vector<std::string> params_fields(const std::string& op) {
  if (op == "sample") return field_names<SampleParams>();
  if (op == "composite") return field_names<CompositeParams>();
  TORCH_CHECK(op == "render", "params_fields: unknown op '", op, "' (sample, composite or render)");
  return field_names<RenderParams>();
}

}  // namespace g3dr

TORCH_LIBRARY(g3dr_C, m) {
  m.def("build_info() -> str", &g3dr::build_info);
  m.def("params_fields(str op) -> str[]", &g3dr::params_fields);
}

extern "C" {
// A plain module: the operators live in the torch.ops registry, not in this module's namespace.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "g3dr compiled kernels (see torch.ops.g3dr_C)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
}
