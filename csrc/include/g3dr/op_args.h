// What the op boundaries (csrc/ops/*.cpp) share: an option block's schema text and names, generated
// from its fields() (g3dr/params.h), and BoxedArgs, which reads a call's arguments in schema order.
//
// The ops are registered as boxed kernels (torch::CppFunction::makeFromBoxedFunction): a kernel gets
// the call's arguments as a stack of IValues, so an option block is read by walking its fields()
// instead of being spelled out as one C++ parameter per option in every signature.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace g3dr {

// The schema type of a field's C++ type.
template <typename T>
constexpr const char* schema_type() {
  if constexpr (std::is_same_v<T, double>) {
    return "float";
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return "int";
  } else {
    static_assert(std::is_same_v<T, bool>, "option fields are double, int64_t or bool");
    return "bool";
  }
}

// "float scale, int plane_axes": block P as schema arguments.
template <typename P>
std::string schema_of() {
  std::string out;
  P p{};
  P::fields(
      [&](const char* name, const auto& v) {
        out += (out.empty() ? "" : ", ") + std::string(schema_type<std::decay_t<decltype(v)>>()) + " " + name;
      },
      p);
  return out;
}

// The names of block P's fields, in order.
template <typename P>
std::vector<std::string> field_names() {
  std::vector<std::string> out;
  P p{};
  P::fields([&](const char* name, const auto&) { out.emplace_back(name); }, p);
  return out;
}

// The arguments of a boxed call, read front to back in schema order; finish() replaces them with the
// results.
class BoxedArgs {
 public:
  BoxedArgs(const c10::OperatorHandle& op, torch::jit::Stack* stack)
      : stack_(*stack), n_(op.schema().arguments().size()), next_(stack->size() - n_) {}

  at::Tensor tensor() { return next().toTensor(); }
  std::optional<at::Tensor> optional_tensor() { return next().toOptional<at::Tensor>(); }
  std::vector<at::Tensor> tensors() { return next().toTensorVector(); }
  bool flag() { return next().toBool(); }

  // Option block P, its fields in fields() order.
  template <typename P>
  P block() {
    P p{};
    P::fields([this](const char*, auto& v) { read(v); }, p);
    return p;
  }

  template <typename... Results>
  void finish(Results&&... results) {
    TORCH_INTERNAL_ASSERT(next_ == stack_.size(), "g3dr op: ", stack_.size() - next_, " arguments were not read");
    torch::jit::drop(stack_, n_);
    torch::jit::push(stack_, std::forward<Results>(results)...);
  }

 private:
  const c10::IValue& next() {
    TORCH_INTERNAL_ASSERT(next_ < stack_.size(), "g3dr op: read past the last argument");
    return stack_[next_++];
  }
  void read(double& v) { v = next().toDouble(); }
  void read(int64_t& v) { v = next().toInt(); }
  void read(bool& v) { v = next().toBool(); }

  torch::jit::Stack& stack_;
  size_t n_;
  size_t next_;
};

}  // namespace g3dr
