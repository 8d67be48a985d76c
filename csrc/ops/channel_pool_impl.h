#pragma once

// channel_pool's private backward operator, the argument checks every backend shares, and the
// layout of its result. The kernel is one pass over x, so each backend writes it whole.

#include <ATen/ATen.h>

#include "channel_pool.h"

namespace cnn_attention {
namespace ops {

namespace detail {
CNN_ATTENTION_API at::Tensor _channel_pool_backward(const at::Tensor& grad_out,
                                                    const at::Tensor& x);
}  // namespace detail

// Every check on the arguments, shared by every backend.
void check_channel_pool_args(const at::Tensor& x);
void check_channel_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& x);

// The (N, 2, *S) result, laid out like x, for every backend.
at::Tensor channel_pool_output_like(const at::Tensor& x);

}  // namespace ops
}  // namespace cnn_attention
