#include <torch/autograd.h>
#include <torch/library.h>

#include "../channel_pool_impl.h"
#include "checks.h"

namespace cnn_attention {
namespace ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ChannelPoolFunction : public torch::autograd::Function<ChannelPoolFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    // The backward finds each position's maximum again while it reads x: no index is kept.
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView guard;
    return channel_pool(x);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    return {detail::_channel_pool_backward(grad_outputs[0], saved[0])};
  }
};

class ChannelPoolBackwardFunction
    : public torch::autograd::Function<ChannelPoolBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return detail::_channel_pool_backward(grad_out, x);
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "channel_pool: double backward is not supported");
  }
};

at::Tensor channel_pool_autograd(const at::Tensor& x) {
  check_defined("channel_pool", {{"x", x}});
  return ChannelPoolFunction::apply(x);
}

at::Tensor channel_pool_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x) {
  check_defined("channel_pool", {{"grad_out", grad_out}, {"x", x}});
  return ChannelPoolBackwardFunction::apply(grad_out, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Autograd, m) {
  m.impl("channel_pool", TORCH_FN(channel_pool_autograd));
  m.impl("_channel_pool_backward", TORCH_FN(channel_pool_backward_autograd));
}

}  // namespace ops
}  // namespace cnn_attention
