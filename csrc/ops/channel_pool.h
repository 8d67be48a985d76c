#pragma once

#include <ATen/ATen.h>

#include "../macros.h"

namespace cnn_attention {
namespace ops {

// CBAM's spatial input: (N, 2, *S) holding the mean over channels, then the max over
// channels, from one read of x. Differentiable; the max sends its gradient to the first
// channel that attains it.
CNN_ATTENTION_API at::Tensor channel_pool(const at::Tensor& x);

}  // namespace ops
}  // namespace cnn_attention
