#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../channel_attention_impl.h"

namespace cnn_attention {
namespace ops {

namespace {

// Same checks and the same output strides as the device kernels, so that fake tensors
// (torch.compile, torch.export) see exactly what a real run produces.
at::Tensor channel_attention_forward_meta(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  check_channel_attention_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate,
                               activation);
  return feature_map_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
channel_attention_backward_meta(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  check_channel_attention_backward_args(grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                        pool, gate, activation);
  return {feature_map_like(x), at::empty_symint(fc1_weight.sym_sizes(), fc1_weight.options()),
          at::empty_symint({fc1_weight.sym_size(0)}, fc1_weight.options()),
          at::empty_symint(fc2_weight.sym_sizes(), fc2_weight.options()),
          at::empty_symint({fc2_weight.sym_size(0)}, fc2_weight.options())};
}

at::Tensor channel_gate_forward_meta(
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  check_channel_gate_args(x, logits, gate);
  return feature_map_like(x);
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_meta(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  check_channel_gate_backward_args(grad_y, x, logits, gate);
  return {feature_map_like(x), at::empty_symint(logits.sym_sizes(), logits.options())};
}

at::Tensor cbam_forward_meta(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  check_cbam_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate,
                  activation);
  return feature_map_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_forward_saving_meta(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  check_cbam_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate,
                  activation);
  return {feature_map_like(x),
          at::empty_symint({2, x.sym_size(0), x.sym_size(1)},
                           x.options().dtype(at::toOpMathType(x.scalar_type()))),
          at::empty_symint({x.sym_size(0), x.sym_size(1)}, x.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_backward_meta(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& channel_stats,
    const at::Tensor& channel_argmax,
    c10::string_view gate,
    c10::string_view activation) {
  check_cbam_backward_args(grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight,
                           conv_bias, channel_stats, channel_argmax, gate, activation);
  return {feature_map_like(x),
          at::empty_symint(fc1_weight.sym_sizes(), fc1_weight.options()),
          at::empty_symint({fc1_weight.sym_size(0)}, fc1_weight.options()),
          at::empty_symint(fc2_weight.sym_sizes(), fc2_weight.options()),
          at::empty_symint({fc2_weight.sym_size(0)}, fc2_weight.options()),
          at::empty_symint(conv_weight.sym_sizes(), conv_weight.options()),
          at::empty_symint({1}, conv_weight.options())};
}

at::Tensor cbam_spatial_forward_meta(const at::Tensor& x, const at::Tensor& conv_weight,
                                     const std::optional<at::Tensor>& conv_bias,
                                     c10::string_view normalize, double temperature) {
  check_cbam_spatial_args(x, conv_weight, conv_bias, normalize, temperature);
  return feature_map_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_spatial_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view normalize, double temperature) {
  check_cbam_spatial_backward_args(grad_y, x, conv_weight, conv_bias, normalize, temperature);
  return {feature_map_like(x), at::empty_symint(conv_weight.sym_sizes(), conv_weight.options()),
          at::empty_symint({1}, conv_weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Meta, m) {
  m.impl("channel_attention", TORCH_FN(channel_attention_forward_meta));
  m.impl("_channel_attention_backward", TORCH_FN(channel_attention_backward_meta));
  m.impl("channel_gate", TORCH_FN(channel_gate_forward_meta));
  m.impl("_channel_gate_backward", TORCH_FN(channel_gate_backward_meta));
  m.impl("cbam", TORCH_FN(cbam_forward_meta));
  m.impl("_cbam_forward", TORCH_FN(cbam_forward_saving_meta));
  m.impl("_cbam_backward", TORCH_FN(cbam_backward_meta));
  m.impl("cbam_spatial", TORCH_FN(cbam_spatial_forward_meta));
  m.impl("_cbam_spatial_backward", TORCH_FN(cbam_spatial_backward_meta));
}

}  // namespace ops
}  // namespace cnn_attention
