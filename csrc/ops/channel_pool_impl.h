#pragma once

// The device-independent half of channel_pool (see docs/design.md, "One pattern per
// operator"): the checks, the layouts and the allocations, around the one pass over x that
// each backend implements (ChannelPoolBackend).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "channel_pool.h"
#include "common.h"
#include "dispatch.h"

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

// What a backend supplies. Every tensor is dense in `layout`; `x` has at least one element.
struct ChannelPoolBackend {
  // out (N, 2, *S) = the mean and the max over the channels of x, in one read of x.
  void (*pool)(const at::Tensor& x, at::Tensor& out, Layout layout);
  // grad_x = grad_out[:, 0] / C everywhere, plus grad_out[:, 1] at the first channel
  // attaining the max, in one read of x.
  void (*pool_backward)(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& grad_x,
                        Layout layout);
};

at::Tensor channel_pool_forward(const ChannelPoolBackend& backend, const at::Tensor& x);
at::Tensor channel_pool_backward(const ChannelPoolBackend& backend, const at::Tensor& grad_out,
                                 const at::Tensor& x);

// The operators' kernels on one backend: TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) calls
// register_channel_pool_kernels<kCpuBackend>(m).
template <const ChannelPoolBackend& kBackend>
void register_channel_pool_kernels(torch::Library& m) {
  m.impl("channel_pool", TORCH_FN((OnBackend<channel_pool_forward, kBackend>::kernel)));
  m.impl("_channel_pool_backward", TORCH_FN((OnBackend<channel_pool_backward, kBackend>::kernel)));
}

}  // namespace ops
}  // namespace cnn_attention
