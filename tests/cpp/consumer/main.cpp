#include <cnn_attention/cnn_attention.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  cnn_attention::nn::ChannelAttention attention(
      cnn_attention::nn::ChannelAttentionOptions(16).pool("avgmax"));
  const torch::Tensor x = torch::randn({2, 16, 8, 8});
  const torch::Tensor y = attention(x);
  // The operator is also reachable by name, as a TorchScript model would call it.
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cnn_attention::channel_pool", "");
  (void)op;
  if (!y.sizes().equals(x.sizes()) || !torch::isfinite(y).all().item<bool>()) return 1;
  std::cout << "consumer ok (" << cnn_attention::build_info() << ")" << std::endl;
  return 0;
}
