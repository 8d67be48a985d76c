#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "../macros.h"

namespace cnn_attention {
namespace nn {

// Options of SelfAttention, with the defaults of the Python module:
//   SelfAttention(SelfAttentionOptions(256).num_heads(4).kv_stride(2))
struct CNN_ATTENTION_API SelfAttentionOptions {
  /* implicit */ SelfAttentionOptions(int64_t channels) : channels_(channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, num_heads) = 1;
  // qk_dim = max(channels / qk_reduction, num_heads); v_dim = max(channels / v_reduction,
  // num_heads).
  TORCH_ARG(int64_t, qk_reduction) = 8;
  TORCH_ARG(int64_t, v_reduction) = 1;
  TORCH_ARG(int64_t, kv_stride) = 1;
  TORCH_ARG(double, gamma_init) = 0.0;
};

// Non-local / SAGAN self attention over cnn_attention::ops::self_attention; the same
// parameters (names, shapes, initialisation) as the Python cnn_attention.SelfAttention.
class CNN_ATTENTION_API SelfAttentionImpl : public torch::nn::Cloneable<SelfAttentionImpl> {
 public:
  explicit SelfAttentionImpl(SelfAttentionOptions options);

  void reset() override;
  void reset_parameters();
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  SelfAttentionOptions options;
  int64_t qk_dim = 0, v_dim = 0;
  torch::Tensor qkv_weight, qkv_bias, out_weight, out_bias, gamma;
};

TORCH_MODULE(SelfAttention);

}  // namespace nn
}  // namespace cnn_attention
