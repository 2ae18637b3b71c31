"""torch.library custom ops (schemas, fake kernels, autograd) over the compiled and Triton kernels.

Each op `g3dr::{name}_fwd` / `g3dr::{name}_bwd` takes a concrete `backend` ("cpu", "cuda" or
"triton") and calls `{name}_fwd` / `{name}_bwd` on the object `_backend.kernels(name, backend)`
returns: `torch.ops.g3dr_C` for the C++/CUDA extension (which dispatches on device), or the module
`g3dr_kernels.triton.{name}`. Both sides take the same arguments, documented per op here: the
op's tensors, then its option block (g3dr_kernels/_params.py) flattened in field order, then its
flags; the schemas here are generated from the block.
"""
