#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../macros.h"

namespace cnn_attention {
namespace ops {

// SE / CBAM channel attention: y = x * gate(fc2(activation(fc1(pool(x))))), weights broadcast
// over the spatial dims. See docs/design.md section 1. Differentiable through the dispatcher
// (autograd is registered in C++), so it trains from Python, TorchScript and plain C++.
CNN_ATTENTION_API at::Tensor channel_attention(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool = "avg",
    c10::string_view gate = "sigmoid",
    c10::string_view activation = "relu");

}  // namespace ops
}  // namespace cnn_attention
