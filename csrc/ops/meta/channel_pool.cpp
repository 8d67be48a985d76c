#include <torch/library.h>

#include "../channel_pool_impl.h"
#include "../common.h"

namespace cnn_attention {
namespace ops {

namespace {

// Same checks and output strides as the device kernels.
at::Tensor channel_pool_forward_meta(const at::Tensor& x) {
  check_channel_pool_args(x);
  return channel_pool_output_like(x);
}

at::Tensor channel_pool_backward_meta(const at::Tensor& grad_out, const at::Tensor& x) {
  check_channel_pool_backward_args(grad_out, x);
  return feature_map_like(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Meta, m) {
  m.impl("channel_pool", TORCH_FN(channel_pool_forward_meta));
  m.impl("_channel_pool_backward", TORCH_FN(channel_pool_backward_meta));
}

}  // namespace ops
}  // namespace cnn_attention
