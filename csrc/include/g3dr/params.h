// The scalar options of each op, written once in C++; g3dr_kernels/_params.py holds the same blocks in
// Python. Every g3dr_C op schema takes its block flattened after the op's tensors, in the order the
// block's fields() visits them (a nested block's fields in its place). g3dr/op_args.h generates the
// schema text and reads a call's arguments from that one order; the op g3dr_C::params_fields(op)
// reports it, and tests/test_params.py checks that it is the Python dataclasses' field order.
//
// fields(f, p...) calls f(name, p.field...) for each field in order: on one block to read, write or
// name its fields, on two blocks to convert one into the other (cast below).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "g3dr/composite_math.h"

namespace g3dr {

// Options of sample (and the sampling half of render).
struct SampleParams {
  double scale;        // 2 / box_warp: world coordinates -> the planes' [-1, 1]
  int64_t plane_axes;  // 0 eg3d, 1 xyz (g3dr_kernels._types.PLANE_AXES)

  template <typename F, typename... P>
  static void fields(F&& f, P&... p) {
    f("scale", p.scale...);
    f("plane_axes", p.plane_axes...);
  }
};

// Options of composite (and the compositing half of render): the depth kernel, density_bias, eps,
// white_bg, as the kernels take them (composite_math.h), here in double.
using CompositeParams = composite::Params<double>;

// Options of the fused render: those of its sampling, then those of its compositing.
struct RenderParams {
  SampleParams sample;
  CompositeParams composite;

  template <typename F, typename... P>
  static void fields(F&& f, P&... p) {
    SampleParams::fields(f, p.sample...);
    CompositeParams::fields(f, p.composite...);
  }
};

// The checks every backend relies on; `op` starts the message.
inline void check(const SampleParams& p, const char* op) {
  TORCH_CHECK(p.plane_axes == 0 || p.plane_axes == 1, op, ": plane_axes must be 0 (eg3d) or 1 (xyz), got ",
              p.plane_axes);
  TORCH_CHECK(std::isfinite(p.scale) && p.scale > 0, op, ": scale (2 / box_warp) must be finite and > 0, got ",
              p.scale);
}

inline void check(const CompositeParams& p, const char* op) {
  TORCH_CHECK(p.s2 > 0 && p.c_min <= p.c_max, op, ": depth kernel needs s2 > 0 and c_min <= c_max, got s2=", p.s2,
              ", c_min=", p.c_min, ", c_max=", p.c_max);
}

inline void check(const RenderParams& p, const char* op) {
  check(p.sample, op);
  check(p.composite, op);
}

// A block in another field type (the kernels' accumulation type), field by field.
template <typename To, typename From>
To cast(const From& from) {
  To to{};
  To::fields([](const char*, auto& dst, const auto& src) { dst = static_cast<std::decay_t<decltype(dst)>>(src); },
             to, from);
  return to;
}

}  // namespace g3dr
