#include "channel_attention.h"

#include <torch/library.h>

#include "channel_attention_impl.h"
#include "common.h"
#include "dispatch.h"

namespace cnn_attention {
namespace ops {

namespace {
constexpr const char* kOp = "channel_attention";
constexpr const char* kGateOp = "channel_gate";
}  // namespace

at::Tensor channel_attention(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  static auto op = find_op<decltype(channel_attention)>("cnn_attention::channel_attention");
  return op.call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
}

at::Tensor channel_gate(
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  static auto op = find_op<decltype(channel_gate)>("cnn_attention::channel_gate");
  return op.call(x, logits, gate);
}

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_channel_attention_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  static auto op = find_op<decltype(_channel_attention_backward)>("cnn_attention::_channel_attention_backward");
  return op.call(grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
}

std::tuple<at::Tensor, at::Tensor> _channel_gate_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  static auto op = find_op<decltype(_channel_gate_backward)>("cnn_attention::_channel_gate_backward");
  return op.call(grad_y, x, logits, gate);
}

}  // namespace detail

ChannelPool parse_channel_pool(const char* op, c10::string_view pool) {
  return parse_choice<ChannelPool>(
      op, "pool", pool,
      {{"avg", ChannelPool::Avg}, {"max", ChannelPool::Max}, {"avgmax", ChannelPool::AvgMax}});
}

ChannelGate parse_channel_gate(const char* op, c10::string_view gate) {
  return parse_choice<ChannelGate>(op, "gate", gate,
                                   {{"sigmoid", ChannelGate::Sigmoid},
                                    {"softmax", ChannelGate::Softmax},
                                    {"hard_sigmoid", ChannelGate::HardSigmoid}});
}

ChannelActivation parse_channel_activation(const char* op, c10::string_view activation) {
  return parse_choice<ChannelActivation>(op, "activation", activation,
                                         {{"relu", ChannelActivation::Relu},
                                          {"silu", ChannelActivation::Silu},
                                          {"gelu", ChannelActivation::Gelu},
                                          {"identity", ChannelActivation::Identity}});
}

ChannelAttentionModes check_channel_attention_args(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  check_feature_map(kOp, "x", x);
  const c10::SymInt channels = x.sym_size(1);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.sym_size(1) == channels,
              kOp, ": fc1_weight must be (R, C) with C = ", channels, ", got ",
              format_sizes(fc1_weight.sym_sizes()));
  const c10::SymInt hidden = fc1_weight.sym_size(0);
  TORCH_CHECK(hidden > 0, kOp, ": fc1_weight must have at least one row (R >= 1), got ",
              format_sizes(fc1_weight.sym_sizes()));
  check_sizes(kOp, "fc2_weight", fc2_weight, {channels, hidden}, "(C, R)");
  check_like(kOp, "x", x, "fc1_weight", fc1_weight);
  check_like(kOp, "x", x, "fc2_weight", fc2_weight);
  if (fc1_bias.has_value()) {
    check_sizes(kOp, "fc1_bias", *fc1_bias, {hidden}, "(R,)");
    check_like(kOp, "x", x, "fc1_bias", *fc1_bias);
  }
  if (fc2_bias.has_value()) {
    check_sizes(kOp, "fc2_bias", *fc2_bias, {channels}, "(C,)");
    check_like(kOp, "x", x, "fc2_bias", *fc2_bias);
  }
  return {parse_channel_pool(kOp, pool), parse_channel_gate(kOp, gate),
          parse_channel_activation(kOp, activation)};
}

ChannelAttentionModes check_channel_attention_backward_args(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  const ChannelAttentionModes modes = check_channel_attention_args(
      x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
  check_like(kOp, "x", x, "grad_y", grad_y);
  check_sizes(kOp, "grad_y", grad_y, x.sym_sizes().vec(), "the size of x");
  return modes;
}

ChannelGate check_channel_gate_args(
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  check_feature_map(kGateOp, "x", x);
  check_sizes(kGateOp, "logits", logits, {x.sym_size(0), x.sym_size(1)}, "(N, C)");
  check_like(kGateOp, "x", x, "logits", logits);
  return parse_channel_gate(kGateOp, gate);
}

ChannelGate check_channel_gate_backward_args(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  const ChannelGate mode = check_channel_gate_args(x, logits, gate);
  check_like(kGateOp, "x", x, "grad_y", grad_y);
  check_sizes(kGateOp, "grad_y", grad_y, x.sym_sizes().vec(), "the size of x");
  return mode;
}

TORCH_LIBRARY_FRAGMENT(cnn_attention, m) {
  m.def(
      "channel_attention(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "Tensor? fc2_bias, str pool=\"avg\", str gate=\"sigmoid\", str activation=\"relu\") "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_channel_attention_backward(Tensor grad_y, Tensor x, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias, str pool, str gate, str activation=\"relu\") "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("channel_gate(Tensor x, Tensor logits, str gate=\"sigmoid\") -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("_channel_gate_backward(Tensor grad_y, Tensor x, Tensor logits, str gate) "
        "-> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace ops
}  // namespace cnn_attention
