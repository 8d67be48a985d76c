#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "../channel_attention_impl.h"
#include "checks.h"

namespace cnn_attention {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ChannelAttentionFunction
    : public torch::autograd::Function<ChannelAttentionFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& fc1_weight,
      const std::optional<at::Tensor>& fc1_bias,
      const at::Tensor& fc2_weight,
      const std::optional<at::Tensor>& fc2_bias,
      c10::string_view pool,
      c10::string_view gate,
      c10::string_view activation) {
    ctx->saved_data["pool"] = std::string(pool);
    ctx->saved_data["gate"] = std::string(gate);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_fc1_bias"] = fc1_bias.has_value();
    ctx->saved_data["has_fc2_bias"] = fc2_bias.has_value();
    // Only inputs are saved: the backward recomputes the (N, C) statistics while it reads x.
    ctx->save_for_backward({x, fc1_weight, fc1_bias.value_or(at::Tensor()), fc2_weight,
                            fc2_bias.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return channel_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> fc1_bias =
        ctx->saved_data["has_fc1_bias"].toBool() ? std::optional<at::Tensor>(saved[2])
                                                 : std::nullopt;
    const std::optional<at::Tensor> fc2_bias =
        ctx->saved_data["has_fc2_bias"].toBool() ? std::optional<at::Tensor>(saved[4])
                                                 : std::nullopt;
    const std::string pool = ctx->saved_data["pool"].toStringRef();
    const std::string gate = ctx->saved_data["gate"].toStringRef();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_x, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias] =
        detail::_channel_attention_backward(grad_outputs[0], saved[0], saved[1], fc1_bias,
                                            saved[3], fc2_bias, pool, gate, activation);
    return {grad_x,
            grad_fc1_weight,
            fc1_bias.has_value() ? grad_fc1_bias : at::Tensor(),
            grad_fc2_weight,
            fc2_bias.has_value() ? grad_fc2_bias : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// The backward is not itself differentiable; say so instead of returning wrong zeros.
class ChannelAttentionBackwardFunction
    : public torch::autograd::Function<ChannelAttentionBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& grad_y,
      const at::Tensor& x,
      const at::Tensor& fc1_weight,
      const std::optional<at::Tensor>& fc1_bias,
      const at::Tensor& fc2_weight,
      const std::optional<at::Tensor>& fc2_bias,
      c10::string_view pool,
      c10::string_view gate,
      c10::string_view activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c, d, e] = detail::_channel_attention_backward(
        grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
    return {a, b, c, d, e};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "channel_attention: double backward is not supported");
  }
};

at::Tensor channel_attention_autograd(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  check_defined("channel_attention",
                {{"x", x}, {"fc1_weight", fc1_weight}, {"fc2_weight", fc2_weight}});
  return ChannelAttentionFunction::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool,
                                         gate, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
channel_attention_backward_autograd(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    c10::string_view activation) {
  check_defined(
      "channel_attention",
      {{"grad_y", grad_y}, {"x", x}, {"fc1_weight", fc1_weight}, {"fc2_weight", fc2_weight}});
  auto grads = ChannelAttentionBackwardFunction::apply(grad_y, x, fc1_weight, fc1_bias, fc2_weight,
                                                       fc2_bias, pool, gate, activation);
  return {grads[0], grads[1], grads[2], grads[3], grads[4]};
}

class ChannelGateFunction : public torch::autograd::Function<ChannelGateFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& logits,
      c10::string_view gate) {
    ctx->saved_data["gate"] = std::string(gate);
    ctx->save_for_backward({x, logits});
    at::AutoDispatchBelowADInplaceOrView guard;
    return channel_gate(x, logits, gate);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_logits] = detail::_channel_gate_backward(
        grad_outputs[0], saved[0], saved[1], ctx->saved_data["gate"].toStringRef());
    return {grad_x, grad_logits, at::Tensor()};
  }
};

class ChannelGateBackwardFunction
    : public torch::autograd::Function<ChannelGateBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& grad_y,
      const at::Tensor& x,
      const at::Tensor& logits,
      c10::string_view gate) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_logits] = detail::_channel_gate_backward(grad_y, x, logits, gate);
    return {grad_x, grad_logits};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "channel_gate: double backward is not supported");
  }
};

at::Tensor channel_gate_autograd(
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  check_defined("channel_gate", {{"x", x}, {"logits", logits}});
  return ChannelGateFunction::apply(x, logits, gate);
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward_autograd(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& logits,
    c10::string_view gate) {
  check_defined("channel_gate", {{"grad_y", grad_y}, {"x", x}, {"logits", logits}});
  auto grads = ChannelGateBackwardFunction::apply(grad_y, x, logits, gate);
  return {grads[0], grads[1]};
}

class CbamFunction : public torch::autograd::Function<CbamFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& fc1_weight,
      const std::optional<at::Tensor>& fc1_bias,
      const at::Tensor& fc2_weight,
      const std::optional<at::Tensor>& fc2_bias,
      const at::Tensor& conv_weight,
      const std::optional<at::Tensor>& conv_bias,
      c10::string_view gate,
      c10::string_view activation) {
    ctx->saved_data["gate"] = std::string(gate);
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_fc1_bias"] = fc1_bias.has_value();
    ctx->saved_data["has_fc2_bias"] = fc2_bias.has_value();
    ctx->saved_data["has_conv_bias"] = conv_bias.has_value();
    at::Tensor y, channel_stats, channel_argmax;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, channel_stats, channel_argmax) = detail::_cbam_forward(
          x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate, activation);
    }
    // The inputs and the (N, C) channel statistics: the backward recomputes the spatial pooling
    // and the scores, which take a pass over x that it makes anyway.
    ctx->save_for_backward({x, fc1_weight, fc1_bias.value_or(at::Tensor()), fc2_weight,
                            fc2_bias.value_or(at::Tensor()), conv_weight,
                            conv_bias.value_or(at::Tensor()), channel_stats, channel_argmax});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [&](const char* flag, size_t index) {
      return ctx->saved_data[flag].toBool() ? std::optional<at::Tensor>(saved[index])
                                            : std::nullopt;
    };
    const std::optional<at::Tensor> fc1_bias = optional("has_fc1_bias", 2);
    const std::optional<at::Tensor> fc2_bias = optional("has_fc2_bias", 4);
    const std::optional<at::Tensor> conv_bias = optional("has_conv_bias", 6);
    auto [grad_x, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias,
          grad_conv_weight, grad_conv_bias] =
        detail::_cbam_backward(grad_outputs[0], saved[0], saved[1], fc1_bias, saved[3], fc2_bias,
                               saved[5], conv_bias, saved[7], saved[8],
                               ctx->saved_data["gate"].toStringRef(),
                               ctx->saved_data["activation"].toStringRef());
    return {grad_x,
            grad_fc1_weight,
            fc1_bias.has_value() ? grad_fc1_bias : at::Tensor(),
            grad_fc2_weight,
            fc2_bias.has_value() ? grad_fc2_bias : at::Tensor(),
            grad_conv_weight,
            conv_bias.has_value() ? grad_conv_bias : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

class CbamBackwardFunction : public torch::autograd::Function<CbamBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
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
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c, d, e, f, g] = detail::_cbam_backward(
        grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
        channel_stats, channel_argmax, gate, activation);
    return {a, b, c, d, e, f, g};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "cbam: double backward is not supported");
  }
};

at::Tensor cbam_autograd(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  check_defined("cbam", {{"x", x},
                         {"fc1_weight", fc1_weight},
                         {"fc2_weight", fc2_weight},
                         {"conv_weight", conv_weight}});
  if (!torch::autograd::compute_requires_grad(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                              conv_weight, conv_bias)) {
    // No backward will run (inference, or nothing requires a gradient): the forward alone,
    // whose statistics pass finds no argmax for a backward to read (at deep stages, 16 or 49
    // positions a channel, that search cost a third of the forward).
    at::AutoDispatchBelowADInplaceOrView guard;
    return cbam(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate,
                activation);
  }
  return CbamFunction::apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight,
                             conv_bias, gate, activation);
}

// _cbam_forward is what the Autograd kernel above calls below autograd; called directly it is
// not differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_forward_autograd(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate,
    c10::string_view activation) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return detail::_cbam_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight,
                               conv_bias, gate, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_backward_autograd(
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
  check_defined("cbam", {{"grad_y", grad_y},
                         {"x", x},
                         {"fc1_weight", fc1_weight},
                         {"fc2_weight", fc2_weight},
                         {"conv_weight", conv_weight},
                         {"channel_stats", channel_stats},
                         {"channel_argmax", channel_argmax}});
  auto grads = CbamBackwardFunction::apply(grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                           conv_weight, conv_bias, channel_stats, channel_argmax,
                                           gate, activation);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6]};
}

class CbamSpatialFunction : public torch::autograd::Function<CbamSpatialFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& conv_weight,
                            const std::optional<at::Tensor>& conv_bias, c10::string_view normalize,
                            double temperature) {
    ctx->saved_data["normalize"] = std::string(normalize);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["has_conv_bias"] = conv_bias.has_value();
    // Only inputs are saved: the backward recomputes the pooling and the scores while it reads x.
    ctx->save_for_backward({x, conv_weight, conv_bias.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return cbam_spatial(x, conv_weight, conv_bias, normalize, temperature);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> conv_bias = ctx->saved_data["has_conv_bias"].toBool()
                                                    ? std::optional<at::Tensor>(saved[2])
                                                    : std::nullopt;
    auto [grad_x, grad_conv_weight, grad_conv_bias] = detail::_cbam_spatial_backward(
        grad_outputs[0], saved[0], saved[1], conv_bias, ctx->saved_data["normalize"].toStringRef(),
        ctx->saved_data["temperature"].toDouble());
    return {grad_x, grad_conv_weight, conv_bias.has_value() ? grad_conv_bias : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

class CbamSpatialBackwardFunction : public torch::autograd::Function<CbamSpatialBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& conv_weight,
                               const std::optional<at::Tensor>& conv_bias,
                               c10::string_view normalize, double temperature) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c] =
        detail::_cbam_spatial_backward(grad_y, x, conv_weight, conv_bias, normalize, temperature);
    return {a, b, c};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "cbam_spatial: double backward is not supported");
  }
};

at::Tensor cbam_spatial_autograd(const at::Tensor& x, const at::Tensor& conv_weight,
                                 const std::optional<at::Tensor>& conv_bias,
                                 c10::string_view normalize, double temperature) {
  check_defined("cbam_spatial", {{"x", x}, {"conv_weight", conv_weight}});
  return CbamSpatialFunction::apply(x, conv_weight, conv_bias, normalize, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_spatial_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view normalize, double temperature) {
  check_defined("cbam_spatial", {{"grad_y", grad_y}, {"x", x}, {"conv_weight", conv_weight}});
  auto grads =
      CbamSpatialBackwardFunction::apply(grad_y, x, conv_weight, conv_bias, normalize, temperature);
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Autograd, m) {
  m.impl("channel_attention", TORCH_FN(channel_attention_autograd));
  m.impl("_channel_attention_backward", TORCH_FN(channel_attention_backward_autograd));
  m.impl("channel_gate", TORCH_FN(channel_gate_autograd));
  m.impl("_channel_gate_backward", TORCH_FN(channel_gate_backward_autograd));
  m.impl("cbam", TORCH_FN(cbam_autograd));
  m.impl("_cbam_forward", TORCH_FN(cbam_forward_autograd));
  m.impl("_cbam_backward", TORCH_FN(cbam_backward_autograd));
  m.impl("cbam_spatial", TORCH_FN(cbam_spatial_autograd));
  m.impl("_cbam_spatial_backward", TORCH_FN(cbam_spatial_backward_autograd));
}

}  // namespace ops
}  // namespace cnn_attention
