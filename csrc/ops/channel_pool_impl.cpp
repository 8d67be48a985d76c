#include "channel_pool_impl.h"

#include <c10/core/DeviceGuard.h>

namespace cnn_attention {
namespace ops {

at::Tensor channel_pool_forward(const ChannelPoolBackend& backend, const at::Tensor& x) {
  check_channel_pool_args(x);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor out = channel_pool_output_like(x);
  if (out.numel() == 0) return out;
  backend.pool(to_layout(x, layout), out, layout);
  return out;
}

at::Tensor channel_pool_backward(const ChannelPoolBackend& backend, const at::Tensor& grad_out,
                                 const at::Tensor& x) {
  check_channel_pool_backward_args(grad_out, x);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor grad_x = feature_map_like(x);
  if (grad_x.numel() == 0) return grad_x;
  backend.pool_backward(to_layout(grad_out, layout), to_layout(x, layout), grad_x, layout);
  return grad_x;
}

}  // namespace ops
}  // namespace cnn_attention
