#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <string>

#include "../macros.h"

namespace cnn_attention {
namespace nn {

// Options of ChannelAttention, with the defaults of the Python module:
//   ChannelAttention(ChannelAttentionOptions(64).reduction(8).pool("avgmax"))
struct CNN_ATTENTION_API ChannelAttentionOptions {
  /* implicit */ ChannelAttentionOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, reduction) = 16;
  TORCH_ARG(int64_t, min_hidden) = 8;
  TORCH_ARG(std::string, pool) = "avg";
  TORCH_ARG(std::string, gate) = "sigmoid";
  TORCH_ARG(std::string, activation) = "relu";
};

// SE / CBAM channel attention over cnn_attention::ops::channel_attention; the same
// parameters (names, shapes, initialisation) as the Python cnn_attention.ChannelAttention.
class CNN_ATTENTION_API ChannelAttentionImpl
    : public torch::nn::Cloneable<ChannelAttentionImpl> {
 public:
  explicit ChannelAttentionImpl(ChannelAttentionOptions options);

  void reset() override;
  void reset_parameters();
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  ChannelAttentionOptions options;
  int64_t hidden = 0;
  torch::Tensor fc1_weight, fc1_bias, fc2_weight, fc2_bias;
};

TORCH_MODULE(ChannelAttention);

// Options of ChannelGate: ChannelGate(ChannelGateOptions().gate("hard_sigmoid")).
struct CNN_ATTENTION_API ChannelGateOptions {
  TORCH_ARG(std::string, gate) = "sigmoid";
};

// y = x * gate(logits) over cnn_attention::ops::channel_gate, logits (N, C): the end of an
// excitation block whose (N, C) middle is computed elsewhere. No parameters.
class CNN_ATTENTION_API ChannelGateImpl : public torch::nn::Cloneable<ChannelGateImpl> {
 public:
  explicit ChannelGateImpl(ChannelGateOptions options = {});

  void reset() override;
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& logits);
  void pretty_print(std::ostream& stream) const override;

  ChannelGateOptions options;
};

TORCH_MODULE(ChannelGate);

}  // namespace nn
}  // namespace cnn_attention
