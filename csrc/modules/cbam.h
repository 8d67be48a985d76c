#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "../macros.h"
#include "channel_attention.h"
#include "spatial_attention.h"

namespace cnn_attention {
namespace nn {

struct CNN_ATTENTION_API CBAMOptions {
  /* implicit */ CBAMOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, reduction) = 16;
  TORCH_ARG(int64_t, min_hidden) = 8;
  TORCH_ARG(int64_t, kernel_size) = 7;
  TORCH_ARG(int64_t, spatial_dims) = 2;
};

// CBAM: ChannelAttention(pool "avgmax"), then SoftAttention, run as one operator (ops::cbam);
// the parameters live in the submodules `channel` and `spatial`, as in the Python module.
class CNN_ATTENTION_API CBAMImpl : public torch::nn::Cloneable<CBAMImpl> {
 public:
  explicit CBAMImpl(CBAMOptions options);

  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  CBAMOptions options;
  ChannelAttention channel{nullptr};
  SoftAttention spatial{nullptr};
};

TORCH_MODULE(CBAM);

}  // namespace nn
}  // namespace cnn_attention
