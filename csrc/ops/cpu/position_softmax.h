#pragma once

// The softmax over the positions of a score map on the CPU: the spatial attention backend's
// (SpatialAttentionBackend::position_softmax) and cbam_spatial's (ChannelAttentionBackend::
// position_softmax). Each row is summed in a fixed order, the same at every thread count;
// blocks of positions are summed in vectors and the blocks' sums in double, so that long rows
// do not stall.

#include <ATen/ATen.h>

#include "../common.h"

namespace cnn_attention {
namespace ops {

// factor * softmax(s / T) over the positions of each sample and score channel of `s`
// (N, Cs, *S), stored in `layout`; a new tensor stored the same way. See
// SpatialAttentionBackend::position_softmax.
at::Tensor position_softmax_cpu(const at::Tensor& s, double temperature, double factor,
                                Layout layout);

// factor * d loss / d s from d loss / d p and p = position_softmax_cpu(s, T, 1), both stored
// like p.
at::Tensor position_softmax_backward_cpu(const at::Tensor& grad_p, const at::Tensor& p,
                                         double temperature, double factor, Layout layout);

}  // namespace ops
}  // namespace cnn_attention
