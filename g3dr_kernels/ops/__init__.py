"""torch.library custom ops (schemas, fake kernels, autograd) over the compiled and Triton kernels.

Each op `g3dr::{name}_fwd` / `g3dr::{name}_bwd` takes a concrete `backend` ("cpu", "cuda" or
"triton") and calls `{name}_fwd` / `{name}_bwd` on the object `_backend.kernels(name, backend)`
returns: `torch.ops.g3dr_C` for the C++/CUDA extension (which dispatches on device), or the module
`g3dr_kernels.triton.{name}`. Both sides use the same argument lists, documented per op here.
"""
