// The extension module g3dr_kernels._C. Importing it registers the torch.ops.g3dr_C.* operators.
// Each op file declares its own schemas with TORCH_LIBRARY_FRAGMENT(g3dr_C, m) next to its CPU kernel
// (csrc/cpu/*.cpp) and adds CUDA kernels with TORCH_LIBRARY_IMPL(g3dr_C, CUDA, m) (csrc/cuda/*.cu).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace g3dr {

std::string build_info() {
#ifdef G3DR_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace g3dr

TORCH_LIBRARY(g3dr_C, m) {
  m.def("build_info() -> str", &g3dr::build_info);
}

extern "C" {
// A plain module: the operators live in the torch.ops registry, not in this module's namespace.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "g3dr compiled kernels (see torch.ops.g3dr_C)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
}
