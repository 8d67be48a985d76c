#include "../spatial_attention.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace cnn_attention {
namespace ops {

namespace {

// Same policy as channel_attention: the feature map runs in autocast's lower-precision
// dtype (the weights and every reduction are computed in float32 anyway), the scores
// follow the dtype of x, float64 is left alone.
template <c10::DeviceType device_type>
std::pair<at::Tensor, at::Tensor> autocast_inputs(const at::Tensor& x, const at::Tensor& scores) {
  const at::Tensor input = at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type);
  return {input, at::autocast::cached_cast(input.scalar_type(), scores, device_type)};
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor soft_attention_autocast(const at::Tensor& x, const at::Tensor& scores,
                                   c10::string_view normalize, double temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto [input, input_scores] = autocast_inputs<device_type>(x, scores);
  return soft_attention(input, input_scores, normalize, temperature);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor soft_attention_pool_autocast(const at::Tensor& x, const at::Tensor& scores,
                                        double temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto [input, input_scores] = autocast_inputs<device_type>(x, scores);
  return soft_attention_pool(input, input_scores, temperature);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor> hard_attention_autocast(const at::Tensor& x,
                                                           const at::Tensor& scores,
                                                           c10::string_view mode, double threshold,
                                                           int64_t k, c10::string_view estimator,
                                                           double temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto [input, input_scores] = autocast_inputs<device_type>(x, scores);
  return hard_attention(input, input_scores, mode, threshold, k, estimator, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCPU, m) {
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  constexpr auto device = c10::DeviceType::CPU;
  m.impl("soft_attention", TORCH_FN((soft_attention_autocast<key, device>)));
  m.impl("soft_attention_pool", TORCH_FN((soft_attention_pool_autocast<key, device>)));
  m.impl("hard_attention", TORCH_FN((hard_attention_autocast<key, device>)));
}

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCUDA, m) {
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  constexpr auto device = c10::DeviceType::CUDA;
  m.impl("soft_attention", TORCH_FN((soft_attention_autocast<key, device>)));
  m.impl("soft_attention_pool", TORCH_FN((soft_attention_pool_autocast<key, device>)));
  m.impl("hard_attention", TORCH_FN((hard_attention_autocast<key, device>)));
}

}  // namespace ops
}  // namespace cnn_attention
