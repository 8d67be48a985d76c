#pragma once

// Checks of the Autograd kernels, which run before the operators' own checks.

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace cnn_attention {
namespace ops {

// Required tensors passed as None arrive undefined. torch's autograd layer would fail on them
// ("tensor does not have a device") before any check of the operator runs.
inline void check_defined(const char* op,
                          std::initializer_list<std::pair<const char*, const at::Tensor&>> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  }
}

}  // namespace ops
}  // namespace cnn_attention
