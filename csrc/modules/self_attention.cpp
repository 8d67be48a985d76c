#include "self_attention.h"

#include <torch/nn/init.h>

#include <algorithm>
#include <cmath>

#include "../ops/self_attention.h"

namespace cnn_attention {
namespace nn {

SelfAttentionImpl::SelfAttentionImpl(SelfAttentionOptions options_)
    : options(std::move(options_)) {
  reset();
}

void SelfAttentionImpl::reset() {
  const int64_t channels = options.channels(), heads = options.num_heads();
  TORCH_CHECK(std::min({channels, heads, options.qk_reduction(), options.v_reduction(),
                        options.kv_stride()}) >= 1,
              "SelfAttention: channels, num_heads, qk_reduction, v_reduction and kv_stride must "
              "be >= 1, got ",
              channels, ", ", heads, ", ", options.qk_reduction(), ", ", options.v_reduction(),
              ", ", options.kv_stride());
  qk_dim = std::max(channels / options.qk_reduction(), heads);
  v_dim = std::max(channels / options.v_reduction(), heads);
  TORCH_CHECK(qk_dim % heads == 0 && v_dim % heads == 0, "SelfAttention: num_heads = ", heads,
              " must divide qk_dim = ", qk_dim, " (channels / qk_reduction) and v_dim = ", v_dim,
              " (channels / v_reduction)");
  TORCH_CHECK(std::isfinite(options.gamma_init()), "SelfAttention: gamma_init must be finite, got ",
              options.gamma_init());
  qkv_weight = register_parameter("qkv_weight", torch::empty({2 * qk_dim + v_dim, channels}));
  qkv_bias = register_parameter("qkv_bias", torch::empty({2 * qk_dim + v_dim}));
  out_weight = register_parameter("out_weight", torch::empty({channels, v_dim}));
  out_bias = register_parameter("out_bias", torch::empty({channels}));
  gamma = register_parameter("gamma", torch::empty({1}));
  reset_parameters();
}

void SelfAttentionImpl::reset_parameters() {
  // As the 1x1 convolutions of a non-local block initialise (and the Python module).
  torch::NoGradGuard no_grad;
  for (auto [weight, bias] : {std::make_pair(&qkv_weight, &qkv_bias),
                              std::make_pair(&out_weight, &out_bias)}) {
    torch::nn::init::kaiming_uniform_(*weight, std::sqrt(5.0));
    const double bound = 1.0 / std::sqrt(double(weight->size(1)));
    bias->uniform_(-bound, bound);
  }
  gamma.fill_(options.gamma_init());
}

torch::Tensor SelfAttentionImpl::forward(const torch::Tensor& x) {
  return ops::self_attention(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim,
                             options.num_heads(), options.kv_stride());
}

void SelfAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::SelfAttention(" << options.channels()
         << ", num_heads=" << options.num_heads() << ", qk_dim=" << qk_dim << ", v_dim=" << v_dim
         << ", kv_stride=" << options.kv_stride() << ")";
}

}  // namespace nn
}  // namespace cnn_attention
