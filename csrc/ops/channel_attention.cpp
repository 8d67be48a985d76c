#include "channel_attention.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "channel_attention_impl.h"
#include "common.h"
#include "dispatch.h"

namespace cnn_attention {
namespace ops {

namespace {
constexpr const char* kOp = "channel_attention";
constexpr const char* kGateOp = "channel_gate";
constexpr const char* kCbamOp = "cbam";
constexpr const char* kCbamSpatialOp = "cbam_spatial";
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

at::Tensor cbam(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  static auto op = find_op<decltype(cbam)>("cnn_attention::cbam");
  return op.call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate,
                 activation);
}

at::Tensor cbam_spatial(const at::Tensor& x, const at::Tensor& conv_weight,
                        const std::optional<at::Tensor>& conv_bias, c10::string_view normalize,
                        double temperature) {
  static auto op = find_op<decltype(cbam_spatial)>("cnn_attention::cbam_spatial");
  return op.call(x, conv_weight, conv_bias, normalize, temperature);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> _cbam_forward(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  static auto op = find_op<decltype(_cbam_forward)>("cnn_attention::_cbam_forward");
  return op.call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate,
                 activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_cbam_backward(
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
  static auto op = find_op<decltype(_cbam_backward)>("cnn_attention::_cbam_backward");
  return op.call(grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                 channel_stats, channel_argmax, gate, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _cbam_spatial_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view normalize, double temperature) {
  static auto op =
      find_op<decltype(_cbam_spatial_backward)>("cnn_attention::_cbam_spatial_backward");
  return op.call(grad_y, x, conv_weight, conv_bias, normalize, temperature);
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

namespace {

// The checks of channel_attention's arguments, raised in the name of `kOp`.
ChannelAttentionModes check_mlp_args(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  check_feature_map(op, "x", x);
  const c10::SymInt channels = x.sym_size(1);
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.sym_size(1) == channels,
              op, ": fc1_weight must be (R, C) with C = ", channels, ", got ",
              format_sizes(fc1_weight.sym_sizes()));
  const c10::SymInt hidden = fc1_weight.sym_size(0);
  TORCH_CHECK(hidden > 0, op, ": fc1_weight must have at least one row (R >= 1), got ",
              format_sizes(fc1_weight.sym_sizes()));
  check_sizes(op, "fc2_weight", fc2_weight, {channels, hidden}, "(C, R)");
  check_like(op, "x", x, "fc1_weight", fc1_weight);
  check_like(op, "x", x, "fc2_weight", fc2_weight);
  if (fc1_bias.has_value()) {
    check_sizes(op, "fc1_bias", *fc1_bias, {hidden}, "(R,)");
    check_like(op, "x", x, "fc1_bias", *fc1_bias);
  }
  if (fc2_bias.has_value()) {
    check_sizes(op, "fc2_bias", *fc2_bias, {channels}, "(C,)");
    check_like(op, "x", x, "fc2_bias", *fc2_bias);
  }
  return {parse_channel_pool(op, pool), parse_channel_gate(op, gate),
          parse_channel_activation(op, activation)};
}

// The score convolution's weight and bias of cbam and cbam_spatial: (1, 2, k, ..., k), one
// k per spatial dim of x, k odd (same padding k / 2), and (1,).
void check_score_conv(const char* op, const at::Tensor& x, const at::Tensor& conv_weight,
                      const std::optional<at::Tensor>& conv_bias) {
  const int64_t dim = x.dim();
  bool square =
      conv_weight.dim() == dim && conv_weight.sym_size(0) == 1 && conv_weight.sym_size(1) == 2;
  if (square) {
    const c10::SymInt width = conv_weight.sym_size(2);
    for (int64_t d = 2; d < dim; ++d) square = square && conv_weight.sym_size(d) == width;
    square = square && width % 2 == 1;
  }
  std::string expected = "(1, 2";
  for (int64_t d = 2; d < dim; ++d) expected += ", k";
  TORCH_CHECK(square, op, ": conv_weight must be ", expected,
              ") with k odd, one k per spatial dim of x, got ",
              format_sizes(conv_weight.sym_sizes()));
  check_like(op, "x", x, "conv_weight", conv_weight);
  if (conv_bias.has_value()) {
    check_sizes(op, "conv_bias", *conv_bias, {1}, "(1,)");
    check_like(op, "x", x, "conv_bias", *conv_bias);
  }
}

}  // namespace

ChannelAttentionModes check_channel_attention_args(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  return check_mlp_args(kOp, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate,
                        activation);
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

ChannelAttentionModes check_cbam_args(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  const ChannelAttentionModes modes = check_mlp_args(
      kCbamOp, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "avgmax", gate, activation);
  check_score_conv(kCbamOp, x, conv_weight, conv_bias);
  return modes;
}

ChannelAttentionModes check_cbam_backward_args(
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
  const ChannelAttentionModes modes = check_cbam_args(
      x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate, activation);
  check_like(kCbamOp, "x", x, "grad_y", grad_y);
  check_sizes(kCbamOp, "grad_y", grad_y, x.sym_sizes().vec(), "the size of x");
  // What _cbam_forward saved: (2, N, C) means and maxima in the accumulation dtype, (N, C)
  // int64 positions of the maxima.
  const auto check_saved = [&](const char* name, const at::Tensor& t, at::ScalarType dtype) {
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == x.device(), kCbamOp, ": ", name,
                " must be ", dtype, " on ", x.device(), ", got ", t.scalar_type(), " on ",
                t.device());
  };
  check_saved("channel_stats", channel_stats, at::toOpMathType(x.scalar_type()));
  check_saved("channel_argmax", channel_argmax, at::kLong);
  check_sizes(kCbamOp, "channel_stats", channel_stats, {2, x.sym_size(0), x.sym_size(1)},
              "(2, N, C)");
  check_sizes(kCbamOp, "channel_argmax", channel_argmax, {x.sym_size(0), x.sym_size(1)},
              "(N, C)");
  return modes;
}

SoftNormalize check_cbam_spatial_args(const at::Tensor& x, const at::Tensor& conv_weight,
                                      const std::optional<at::Tensor>& conv_bias,
                                      c10::string_view normalize, double temperature) {
  check_feature_map(kCbamSpatialOp, "x", x);
  // As channel_pool: a mean over no channels is no score.
  TORCH_CHECK(x.sym_size(1) > 0, kCbamSpatialOp,
              ": x must have at least one channel (C >= 1), got sizes ",
              format_sizes(x.sym_sizes()));
  check_score_conv(kCbamSpatialOp, x, conv_weight, conv_bias);
  const SoftNormalize mode = parse_normalize(kCbamSpatialOp, normalize);
  check_temperature(kCbamSpatialOp, temperature);
  return mode;
}

SoftNormalize check_cbam_spatial_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                               const at::Tensor& conv_weight,
                                               const std::optional<at::Tensor>& conv_bias,
                                               c10::string_view normalize, double temperature) {
  const SoftNormalize mode =
      check_cbam_spatial_args(x, conv_weight, conv_bias, normalize, temperature);
  check_like(kCbamSpatialOp, "x", x, "grad_y", grad_y);
  check_sizes(kCbamSpatialOp, "grad_y", grad_y, x.sym_sizes().vec(), "the size of x");
  return mode;
}

void check_cbam_channel_argmax(const at::Tensor& x, const at::Tensor& channel_argmax) {
  if (channel_argmax.numel() == 0) return;
  const int64_t positions = num_positions(x);
  const auto [smallest, largest] = at::aminmax(channel_argmax);
  const int64_t low = smallest.item<int64_t>(), high = largest.item<int64_t>();
  TORCH_CHECK(low >= 0 && high < positions, kCbamOp,
              ": channel_argmax must hold positions in [0, ", positions, "), got values in [",
              low, ", ", high, "]");
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
  m.def(
      "cbam(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "Tensor conv_weight, Tensor? conv_bias, str gate=\"sigmoid\", str activation=\"relu\") "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_cbam_forward(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "Tensor? fc2_bias, Tensor conv_weight, Tensor? conv_bias, str gate, str activation) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_cbam_backward(Tensor grad_y, Tensor x, Tensor fc1_weight, Tensor? fc1_bias, "
      "Tensor fc2_weight, Tensor? fc2_bias, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor channel_stats, Tensor channel_argmax, str gate, str activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "cbam_spatial(Tensor x, Tensor conv_weight, Tensor? conv_bias, "
      "str normalize=\"sigmoid\", float temperature=1.0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_cbam_spatial_backward(Tensor grad_y, Tensor x, Tensor conv_weight, "
      "Tensor? conv_bias, str normalize, float temperature) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace ops
}  // namespace cnn_attention
