#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "../self_attention_impl.h"
#include "checks.h"

namespace cnn_attention {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Saves the inputs and the softmax statistics: the backward recomputes the head outputs rather
// than keeping attn alive, and the projection (one matrix product) rather than keeping q, k
// and v, except where x has few tokens for its channels (few_tokens_for_their_channels). There
// the projection is at most half the size of the weights' gradients that the backward returns
// anyway, and computing it again would be one more product as large as those gradients' own.
class SelfAttentionFunction : public torch::autograd::Function<SelfAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qkv_weight,
                            const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
                            const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                            int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
                            bool keep_projection) {
    at::Tensor y, lse, projection;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, std::ignore, lse, projection) =
          detail::_self_attention_forward(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma,
                                          qk_dim, num_heads, kv_stride, keep_projection);
    }
    ctx->saved_data["qk_dim"] = qk_dim;
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["kv_stride"] = kv_stride;
    ctx->saved_data["has_qkv_bias"] = qkv_bias.has_value();
    ctx->saved_data["has_out_bias"] = out_bias.has_value();
    ctx->saved_data["keeps_projection"] = keep_projection;
    ctx->save_for_backward({x, qkv_weight, qkv_bias.value_or(at::Tensor()), out_weight,
                            out_bias.value_or(at::Tensor()), gamma, lse,
                            keep_projection ? projection : at::Tensor()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto optional_of = [&](const char* flag, const at::Tensor& t) {
      return ctx->saved_data[flag].toBool() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const auto qkv_bias = optional_of("has_qkv_bias", saved[2]);
    const auto out_bias = optional_of("has_out_bias", saved[4]);
    const auto projection = optional_of("keeps_projection", saved[7]);
    auto [grad_x, grad_qkv_weight, grad_qkv_bias, grad_out_weight, grad_out_bias, grad_gamma] =
        detail::_self_attention_backward(
            grad_outputs[0], saved[0], saved[1], qkv_bias, saved[3], out_bias, saved[5], saved[6],
            ctx->saved_data["qk_dim"].toInt(), ctx->saved_data["num_heads"].toInt(),
            ctx->saved_data["kv_stride"].toInt(), projection);
    return {grad_x,
            grad_qkv_weight,
            qkv_bias.has_value() ? grad_qkv_bias : at::Tensor(),
            grad_out_weight,
            out_bias.has_value() ? grad_out_bias : at::Tensor(),
            grad_gamma,
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// The backward op is not itself differentiable; say so instead of returning wrong zeros.
class SelfAttentionBackwardFunction
    : public torch::autograd::Function<SelfAttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& qkv_weight,
                               const std::optional<at::Tensor>& qkv_bias,
                               const at::Tensor& out_weight,
                               const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                               const at::Tensor& lse, int64_t qk_dim, int64_t num_heads,
                               int64_t kv_stride, const std::optional<at::Tensor>& projection) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c, d, e, f] =
        detail::_self_attention_backward(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias,
                                         gamma, lse, qk_dim, num_heads, kv_stride, projection);
    return {a, b, c, d, e, f};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "self_attention: double backward is not supported");
  }
};

at::Tensor self_attention_autograd(const at::Tensor& x, const at::Tensor& qkv_weight,
                                   const std::optional<at::Tensor>& qkv_bias,
                                   const at::Tensor& out_weight,
                                   const std::optional<at::Tensor>& out_bias,
                                   const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads,
                                   int64_t kv_stride) {
  check_defined(
      "self_attention",
      {{"x", x}, {"qkv_weight", qkv_weight}, {"out_weight", out_weight}, {"gamma", gamma}});
  // Kept only for a backward that will run (apply records one under the same condition).
  const bool records_backward =
      torch::autograd::compute_requires_grad(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma);
  return SelfAttentionFunction::apply(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim,
                                      num_heads, kv_stride,
                                      records_backward && few_tokens_for_their_channels(x));
}

// _self_attention_forward is what the Autograd kernel above calls below autograd; called
// directly it is not differentiable.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_attention_forward_autograd(
    const at::Tensor& x, const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
    const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
    bool keep_projection) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return detail::_self_attention_forward(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma,
                                         qk_dim, num_heads, kv_stride, keep_projection);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
self_attention_backward_autograd(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& out_weight,
                                 const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                                 const at::Tensor& lse, int64_t qk_dim, int64_t num_heads,
                                 int64_t kv_stride, const std::optional<at::Tensor>& projection) {
  check_defined("self_attention", {{"grad_y", grad_y},
                                   {"x", x},
                                   {"qkv_weight", qkv_weight},
                                   {"out_weight", out_weight},
                                   {"gamma", gamma},
                                   {"lse", lse}});
  const auto grads =
      SelfAttentionBackwardFunction::apply(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias,
                                           gamma, lse, qk_dim, num_heads, kv_stride, projection);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Autograd, m) {
  m.impl("self_attention", TORCH_FN(self_attention_autograd));
  m.impl("_self_attention_forward", TORCH_FN(self_attention_forward_autograd));
  m.impl("_self_attention_backward", TORCH_FN(self_attention_backward_autograd));
}

}  // namespace ops
}  // namespace cnn_attention
