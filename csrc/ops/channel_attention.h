#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../macros.h"

namespace cnn_attention {
namespace ops {

// SE / CBAM channel attention: y = x * gate(mlp(pool(x))), weights broadcast over the
// spatial dims. See docs/design.md section 1. Differentiable through the dispatcher (autograd
// is registered in C++), so it trains from Python, TorchScript and plain C++.
CNN_ATTENTION_API at::Tensor channel_attention(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool = "avg",
    c10::string_view gate = "sigmoid");

namespace detail {

// Gradients (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias); the bias gradients are
// returned even when a bias is absent so that the schema has no optional outputs.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_channel_attention_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate);

}  // namespace detail

enum class ChannelPool { Avg, Max, AvgMax };
enum class ChannelGate { Sigmoid, Softmax };

struct ChannelAttentionModes {
  ChannelPool pool;
  ChannelGate gate;
};

// Every check of docs/design.md section 1 on the arguments; shared by every backend so that
// all raise the same messages.
ChannelAttentionModes check_channel_attention_args(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate);

// The same, plus grad_y, for _channel_attention_backward.
ChannelAttentionModes check_channel_attention_backward_args(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate);

}  // namespace ops
}  // namespace cnn_attention
