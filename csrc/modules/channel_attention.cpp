#include "channel_attention.h"

#include <torch/nn/init.h>

#include <cmath>

#include "../ops/channel_attention.h"
#include "../ops/channel_attention_impl.h"

namespace cnn_attention {
namespace nn {

ChannelAttentionImpl::ChannelAttentionImpl(ChannelAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

void ChannelAttentionImpl::reset() {
  TORCH_CHECK(options.channels() >= 1 && options.reduction() >= 1 && options.min_hidden() >= 1,
              "ChannelAttention: channels, reduction and min_hidden must be >= 1, got ",
              options.channels(), ", ", options.reduction(), ", ", options.min_hidden());
  ops::parse_channel_pool("ChannelAttention", options.pool());
  ops::parse_channel_gate("ChannelAttention", options.gate());
  ops::parse_channel_activation("ChannelAttention", options.activation());
  const int64_t channels = options.channels();
  hidden = std::max(channels / options.reduction(), options.min_hidden());
  fc1_weight = register_parameter("fc1_weight", torch::empty({hidden, channels}));
  fc1_bias = register_parameter("fc1_bias", torch::empty({hidden}));
  fc2_weight = register_parameter("fc2_weight", torch::empty({channels, hidden}));
  fc2_bias = register_parameter("fc2_bias", torch::empty({channels}));
  reset_parameters();
}

void ChannelAttentionImpl::reset_parameters() {
  // As torch::nn::Linear initialises (and the Python module).
  torch::NoGradGuard no_grad;
  for (auto* pair : {&fc1_weight, &fc2_weight}) {
    torch::nn::init::kaiming_uniform_(*pair, std::sqrt(5.0));
  }
  fc1_bias.uniform_(-1.0 / std::sqrt(double(fc1_weight.size(1))),
                    1.0 / std::sqrt(double(fc1_weight.size(1))));
  fc2_bias.uniform_(-1.0 / std::sqrt(double(fc2_weight.size(1))),
                    1.0 / std::sqrt(double(fc2_weight.size(1))));
}

torch::Tensor ChannelAttentionImpl::forward(const torch::Tensor& x) {
  return ops::channel_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, options.pool(),
                                options.gate(), options.activation());
}

void ChannelAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::ChannelAttention(" << options.channels() << ", hidden=" << hidden
         << ", pool=" << options.pool() << ", gate=" << options.gate()
         << ", activation=" << options.activation() << ")";
}

ChannelGateImpl::ChannelGateImpl(ChannelGateOptions options_) : options(std::move(options_)) {
  reset();
}

void ChannelGateImpl::reset() { ops::parse_channel_gate("ChannelGate", options.gate()); }

torch::Tensor ChannelGateImpl::forward(const torch::Tensor& x, const torch::Tensor& logits) {
  return ops::channel_gate(x, logits, options.gate());
}

void ChannelGateImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::ChannelGate(gate=" << options.gate() << ")";
}

}  // namespace nn
}  // namespace cnn_attention
