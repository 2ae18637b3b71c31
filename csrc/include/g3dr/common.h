// Definitions shared by the C++ and CUDA kernels. Everything here compiles as host C++ and as CUDA.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define G3DR_HD __host__ __device__ __forceinline__
#else
#define G3DR_HD inline
#endif

// Unroll the fixed-width channel loops (nvcc and gcc/clang spell it differently).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define G3DR_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define G3DR_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define G3DR_UNROLL _Pragma("GCC unroll 8")
#else
#define G3DR_UNROLL
#endif

namespace g3dr {

// Plane conventions (must match g3dr_kernels._types.PLANE_AXES / PLANE_COORDS).
// Plane p samples coordinates (a, b) of u = xyz * scale; a indexes width, b height.
//   0 "eg3d": (x,y), (x,z), (z,x)      1 "xyz": (x,y), (x,z), (y,z)
G3DR_HD void plane_coord_index(int plane_axes, int p, int& a, int& b) {
  a = (p == 2 && plane_axes == 0) ? 2 : (p == 2 ? 1 : 0);
  b = (p == 0) ? 1 : (p == 1 ? 2 : (plane_axes == 0 ? 0 : 2));
}

// Numerically stable softplus and sigmoid in the accumulation type.
template <typename T>
G3DR_HD T softplus(T x) {
  return x > T(20) ? x : log1p(exp(x));
}

template <typename T>
G3DR_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

}  // namespace g3dr
