#pragma once

#include <ATen/ATen.h>

#include "../macros.h"

namespace cnn_attention {
namespace ops {

// CBAM's spatial input: (N, 2, *S) holding the mean over channels, then the max over
// channels, from one read of x. Differentiable; the max sends its gradient to the first
// channel that attains it.
CNN_ATTENTION_API at::Tensor channel_pool(const at::Tensor& x);

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
