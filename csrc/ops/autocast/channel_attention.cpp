#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../channel_attention.h"

namespace cnn_attention {
namespace ops {

namespace {

// Under autocast the op runs in the lower-precision dtype, as convolutions do: the feature
// map usually arrives in it already, the parameters (float32) are cast to it, and the
// kernels accumulate in float32 anyway, so nothing is lost but half the bytes moved.
// float64 inputs are left alone. channel_gate's logits and cbam's and cbam_spatial's
// parameters follow x.
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor channel_attention_autocast(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::Tensor input = at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type);
  const at::ScalarType param_dtype = input.scalar_type();
  return channel_attention(
      input, at::autocast::cached_cast(param_dtype, fc1_weight, device_type),
      at::autocast::cached_cast(param_dtype, fc1_bias, device_type),
      at::autocast::cached_cast(param_dtype, fc2_weight, device_type),
      at::autocast::cached_cast(param_dtype, fc2_bias, device_type), pool, gate, activation);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor channel_gate_autocast(
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::Tensor input = at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type);
  return channel_gate(input, at::autocast::cached_cast(input.scalar_type(), logits, device_type),
                      gate);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor cbam_autocast(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::Tensor input = at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type);
  const at::ScalarType param_dtype = input.scalar_type();
  const auto cast = [&](const auto& t) {
    return at::autocast::cached_cast(param_dtype, t, device_type);
  };
  return cbam(input, cast(fc1_weight), cast(fc1_bias), cast(fc2_weight), cast(fc2_bias),
              cast(conv_weight), cast(conv_bias), gate, activation);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor cbam_spatial_autocast(const at::Tensor& x, const at::Tensor& conv_weight,
                                 const std::optional<at::Tensor>& conv_bias,
                                 c10::string_view normalize, double temperature) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::Tensor input = at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type);
  const at::ScalarType param_dtype = input.scalar_type();
  return cbam_spatial(input, at::autocast::cached_cast(param_dtype, conv_weight, device_type),
                      at::autocast::cached_cast(param_dtype, conv_bias, device_type), normalize,
                      temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCPU, m) {
  m.impl("channel_attention",
         TORCH_FN((channel_attention_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
  m.impl("channel_gate",
         TORCH_FN((channel_gate_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
  m.impl("cbam", TORCH_FN((cbam_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
  m.impl("cbam_spatial",
         TORCH_FN((cbam_spatial_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCUDA, m) {
  m.impl("channel_attention",
         TORCH_FN((channel_attention_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
  m.impl("channel_gate",
         TORCH_FN((channel_gate_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
  m.impl("cbam",
         TORCH_FN((cbam_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
  m.impl("cbam_spatial",
         TORCH_FN((cbam_spatial_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace ops
}  // namespace cnn_attention
