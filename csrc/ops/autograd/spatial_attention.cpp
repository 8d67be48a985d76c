#include <torch/autograd.h>
#include <torch/library.h>

#include "../spatial_attention_impl.h"
#include "checks.h"

namespace cnn_attention {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Only inputs (and hard_attention's top-k mask) are saved: the backward recomputes the weights
// from the score map, which is small next to x.
class SoftAttentionFunction : public torch::autograd::Function<SoftAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scores,
                            c10::string_view normalize, double temperature) {
    ctx->saved_data["normalize"] = std::string(normalize);
    ctx->saved_data["temperature"] = temperature;
    ctx->save_for_backward({x, scores});
    at::AutoDispatchBelowADInplaceOrView guard;
    return soft_attention(x, scores, normalize, temperature);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_scores] = detail::_soft_attention_backward(
        grad_outputs[0], saved[0], saved[1], ctx->saved_data["normalize"].toStringRef(),
        ctx->saved_data["temperature"].toDouble());
    return {grad_x, grad_scores, at::Tensor(), at::Tensor()};
  }
};

class SoftAttentionPoolFunction : public torch::autograd::Function<SoftAttentionPoolFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scores,
                            double temperature) {
    ctx->saved_data["temperature"] = temperature;
    ctx->save_for_backward({x, scores});
    at::AutoDispatchBelowADInplaceOrView guard;
    return soft_attention_pool(x, scores, temperature);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_scores] = detail::_soft_attention_pool_backward(
        grad_outputs[0], saved[0], saved[1], ctx->saved_data["temperature"].toDouble());
    return {grad_x, grad_scores, at::Tensor()};
  }
};

class HardAttentionFunction : public torch::autograd::Function<HardAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scores,
                               c10::string_view mode, double threshold, int64_t k,
                               c10::string_view estimator, double temperature) {
    at::Tensor y, mask;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mask) = hard_attention(x, scores, mode, threshold, k, estimator, temperature);
    }
    const bool top_k = parse_mode("hard_attention", mode) == HardMode::TopK;
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["estimator"] = std::string(estimator);
    ctx->saved_data["temperature"] = temperature;
    // A threshold mask is recomputed from the scores in the backward; a top-k mask is not
    // (finding it again would be a selection per row).
    ctx->save_for_backward({x, scores, top_k ? mask : at::Tensor()});
    ctx->mark_non_differentiable({mask});
    // The mask has no gradient; materialized, it would be a zero-filled tensor of its size
    // (as large as x with a score channel per channel) made for every backward.
    ctx->set_materialize_grads(false);
    return {y, mask};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(7);
    const auto saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> mask =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    auto [grad_x, grad_scores] = detail::_hard_attention_backward(
        grad_outputs[0], saved[0], saved[1], mask, ctx->saved_data["mode"].toStringRef(),
        ctx->saved_data["threshold"].toDouble(), ctx->saved_data["estimator"].toStringRef(),
        ctx->saved_data["temperature"].toDouble());
    return {grad_x,       grad_scores,  at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The backward ops are not themselves differentiable; say so instead of returning wrong
// zeros.
template <typename BackwardOp>
class NotTwiceDifferentiable
    : public torch::autograd::Function<NotTwiceDifferentiable<BackwardOp>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext*, Args... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_scores] = BackwardOp::call(args...);
    return {grad_x, grad_scores};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, BackwardOp::kOp, ": double backward is not supported");
  }
};

struct SoftAttentionBackward {
  static constexpr const char* kOp = "soft_attention";
  static std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& scores,
                                                 c10::string_view normalize, double temperature) {
    return detail::_soft_attention_backward(grad_y, x, scores, normalize, temperature);
  }
};

struct SoftAttentionPoolBackward {
  static constexpr const char* kOp = "soft_attention_pool";
  static std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& scores, double temperature) {
    return detail::_soft_attention_pool_backward(grad_out, x, scores, temperature);
  }
};

struct HardAttentionBackward {
  static constexpr const char* kOp = "hard_attention";
  static std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& scores,
                                                 const std::optional<at::Tensor>& mask,
                                                 c10::string_view mode, double threshold,
                                                 c10::string_view estimator, double temperature) {
    return detail::_hard_attention_backward(grad_y, x, scores, mask, mode, threshold, estimator,
                                            temperature);
  }
};

std::tuple<at::Tensor, at::Tensor> pair_of(const variable_list& grads) {
  return {grads[0], grads[1]};
}

at::Tensor soft_attention_autograd(const at::Tensor& x, const at::Tensor& scores,
                                   c10::string_view normalize, double temperature) {
  check_defined("soft_attention", {{"x", x}, {"scores", scores}});
  return SoftAttentionFunction::apply(x, scores, normalize, temperature);
}

std::tuple<at::Tensor, at::Tensor> soft_attention_backward_autograd(const at::Tensor& grad_y,
                                                                    const at::Tensor& x,
                                                                    const at::Tensor& scores,
                                                                    c10::string_view normalize,
                                                                    double temperature) {
  check_defined("soft_attention", {{"grad_y", grad_y}, {"x", x}, {"scores", scores}});
  return pair_of(NotTwiceDifferentiable<SoftAttentionBackward>::apply(grad_y, x, scores, normalize,
                                                                      temperature));
}

at::Tensor soft_attention_pool_autograd(const at::Tensor& x, const at::Tensor& scores,
                                        double temperature) {
  check_defined("soft_attention_pool", {{"x", x}, {"scores", scores}});
  return SoftAttentionPoolFunction::apply(x, scores, temperature);
}

std::tuple<at::Tensor, at::Tensor> soft_attention_pool_backward_autograd(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& scores,
                                                                         double temperature) {
  check_defined("soft_attention_pool", {{"grad_out", grad_out}, {"x", x}, {"scores", scores}});
  return pair_of(
      NotTwiceDifferentiable<SoftAttentionPoolBackward>::apply(grad_out, x, scores, temperature));
}

std::tuple<at::Tensor, at::Tensor> hard_attention_autograd(const at::Tensor& x,
                                                           const at::Tensor& scores,
                                                           c10::string_view mode, double threshold,
                                                           int64_t k, c10::string_view estimator,
                                                           double temperature) {
  check_defined("hard_attention", {{"x", x}, {"scores", scores}});
  return pair_of(
      HardAttentionFunction::apply(x, scores, mode, threshold, k, estimator, temperature));
}

std::tuple<at::Tensor, at::Tensor> hard_attention_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scores,
    const std::optional<at::Tensor>& mask, c10::string_view mode, double threshold,
    c10::string_view estimator, double temperature) {
  check_defined("hard_attention", {{"grad_y", grad_y}, {"x", x}, {"scores", scores}});
  return pair_of(NotTwiceDifferentiable<HardAttentionBackward>::apply(
      grad_y, x, scores, mask, mode, threshold, estimator, temperature));
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Autograd, m) {
  m.impl("soft_attention", TORCH_FN(soft_attention_autograd));
  m.impl("_soft_attention_backward", TORCH_FN(soft_attention_backward_autograd));
  m.impl("soft_attention_pool", TORCH_FN(soft_attention_pool_autograd));
  m.impl("_soft_attention_pool_backward", TORCH_FN(soft_attention_pool_backward_autograd));
  m.impl("hard_attention", TORCH_FN(hard_attention_autograd));
  m.impl("_hard_attention_backward", TORCH_FN(hard_attention_backward_autograd));
}

}  // namespace ops
}  // namespace cnn_attention
