// The composite op between its boundary (csrc/ops/composite.cpp: schemas, argument checks, output
// allocation, registration for the CPU and CUDA dispatch keys) and its device implementations
// (csrc/cpu/composite.cpp, csrc/cuda/composite.cu). Contract: g3dr_kernels/ops/composite.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "g3dr/params.h"

namespace g3dr {

class BoxedArgs;  // g3dr/op_args.h

namespace composite {

// The op's tensors, checked (shapes, one dtype and device) and contiguous.
struct Inputs {
  at::Tensor sigma, rgb, depths;  // [B,R,S], [B,R,S,D], [B,R,S]
  std::optional<at::Tensor> target;  // [B,R]
};

// What the forward returns and the backward gets back (the fused render op returns the same):
// rgb [B,R,D], depth [B,R], opacity [B,R], weights [B,R,S-1] (an empty tensor when not asked for).
struct Outputs {
  at::Tensor rgb, depth, opacity, weights;
};

// The gradients reaching the outputs (none for the weights when they were not used).
struct OutputGrads {
  at::Tensor rgb, depth, opacity;
  std::optional<at::Tensor> weights;
};

// What the backward returns: the gradients of sigma and rgb.
struct Grads {
  at::Tensor sigma, rgb;
};

// The backward's arguments before the op's inputs, and after them, in composite_bwd and render_bwd:
// their schema text and their readers (which leave them contiguous; saved.weights stays undefined).
inline constexpr const char* kOutputGrads =
    "Tensor grad_rgb, Tensor grad_depth, Tensor grad_opacity, Tensor? grad_weights";
inline constexpr const char* kSavedOutputs = "Tensor out_rgb, Tensor out_depth, Tensor out_opacity";
OutputGrads read_output_grads(BoxedArgs& a);
Outputs read_saved_outputs(BoxedArgs& a);

// Checks of the backward's extra arguments, for composite and render alike (`op` starts the
// message): grad and saved outputs [B,R,D] / [B,R], grad weights [B,R,S-1], all like `ref`.
void check_output_grads(const char* op, int64_t B, int64_t R, int64_t S, int64_t D, const OutputGrads& g,
                        const Outputs& saved, const at::Tensor& ref);

// Device implementations, called by the boundary with checked, contiguous tensors; they fill the
// tensors the boundary allocated (out: Outputs of the shapes above; grads: like sigma and rgb).
void fwd_cpu(const Inputs& in, const CompositeParams& p, Outputs& out);
void bwd_cpu(const Inputs& in, const OutputGrads& g, const Outputs& saved, const CompositeParams& p, Grads& grads);
void fwd_cuda(const Inputs& in, const CompositeParams& p, Outputs& out);
void bwd_cuda(const Inputs& in, const OutputGrads& g, const Outputs& saved, const CompositeParams& p, Grads& grads);

}  // namespace composite
}  // namespace g3dr
