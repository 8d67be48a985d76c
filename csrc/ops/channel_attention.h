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

// The gate alone: y = x * gate(logits), logits (N, C) broadcast over the spatial dims, with
// `gate` as in channel_attention. The fused end of an excitation block whose middle is not the
// standard MLP (ECA's 1-D convolution, GC's transform, SE with normalization): the small (N, C)
// part runs in PyTorch between a pooling and this gate. See docs/design.md section 1.
CNN_ATTENTION_API at::Tensor channel_gate(
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate = "sigmoid");

// CBAM in one operator: channel attention (pool "avgmax", the MLP and `gate` as in
// channel_attention), then spatial attention on the channel-weighted map x1 = x * w: scores =
// conv_weight * [mean over channels of x1, max over channels of x1] + conv_bias (a k x ... x k
// convolution from 2 channels to 1 with same padding, k odd), y = x1 * sigmoid(scores). The
// result of channel_attention, channel_pool, the convolution and soft_attention in turn, in fewer
// passes over x: x1 is never written. See docs/design.md section 1.
CNN_ATTENTION_API at::Tensor cbam(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate = "sigmoid",
    c10::string_view activation = "relu");

// CBAM's spatial attention in one operator (the SoftAttention module): scores = conv_weight *
// [mean over channels of x, max over channels of x] + conv_bias (a k x ... x k convolution from
// 2 channels to 1 with same padding, k odd), y = x * w with w = sigmoid(scores / T) or
// P * softmax(scores / T) over the positions, as soft_attention's `normalize`. The result of
// channel_pool, the convolution and soft_attention in turn, in fewer passes over x: the
// forward reads x twice, the backward reads x once and grad_y twice. It shares cbam's passes.
// See docs/design.md section 1.
CNN_ATTENTION_API at::Tensor cbam_spatial(const at::Tensor& x, const at::Tensor& conv_weight,
                                          const std::optional<at::Tensor>& conv_bias,
                                          c10::string_view normalize = "sigmoid",
                                          double temperature = 1.0);

}  // namespace ops
}  // namespace cnn_attention
