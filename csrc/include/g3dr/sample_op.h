// The sample op between its boundary (csrc/ops/sample.cpp: schemas, argument checks, output
// allocation, registration for the CPU and CUDA dispatch keys) and its device implementations
// (csrc/cpu/sample.cpp, csrc/cuda/sample.cu). Contract: g3dr_kernels/ops/sample.py.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "g3dr/params.h"

namespace g3dr {
namespace sample {

// The op's tensors, checked and contiguous: levels [B,3,C,H_l,W_l] (floating point, one dtype and
// device), xyz [B,N,3] in their dtype (or float32 with float16/bfloat16 planes).
struct Inputs {
  std::vector<at::Tensor> levels;
  at::Tensor xyz;
};

// What the backward returns: one gradient per level (its shape and dtype), and the gradient of xyz
// ([B,N,3] in its dtype, or an empty tensor when not asked for).
struct Grads {
  std::vector<at::Tensor> levels;
  at::Tensor xyz;
};

// Device implementations, called by the boundary with checked, contiguous tensors; they fill the
// tensors the boundary allocated (out [B,N,C] in the planes' dtype; grads as above). grad_out [B,N,C].
void fwd_cpu(const Inputs& in, const SampleParams& p, at::Tensor& out);
void bwd_cpu(const at::Tensor& grad_out, const Inputs& in, const SampleParams& p, Grads& grads);
void fwd_cuda(const Inputs& in, const SampleParams& p, at::Tensor& out);
void bwd_cuda(const at::Tensor& grad_out, const Inputs& in, const SampleParams& p, Grads& grads);

}  // namespace sample
}  // namespace g3dr
