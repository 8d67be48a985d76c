#pragma once

// Spatial attention: a weight for every position of a feature map, from a map of scores.
// Three operators share these files because they share their kernels (see
// spatial_attention_impl.h): soft_attention, soft_attention_pool and hard_attention.
// See docs/design.md section 1. All are differentiable through the dispatcher (autograd is
// registered in C++).

#include <ATen/ATen.h>

#include <tuple>

#include "../macros.h"

namespace cnn_attention {
namespace ops {

// y = x * w with w = sigmoid(scores / T) or P * softmax(scores / T over the P positions);
// scores is (N, 1, *S) (shared by every channel) or (N, C, *S).
CNN_ATTENTION_API at::Tensor soft_attention(const at::Tensor& x, const at::Tensor& scores,
                                            c10::string_view normalize = "sigmoid",
                                            double temperature = 1.0);

// (N, C): sum over positions of softmax(scores / T) * x (attention pooling).
CNN_ATTENTION_API at::Tensor soft_attention_pool(const at::Tensor& x, const at::Tensor& scores,
                                                 double temperature = 1.0);

// (y, mask): y = x * mask with a 0/1 mask (sigmoid(scores / T) > threshold, or the k best
// scores per sample and score channel). The mask has the dtype of x and no gradient; the
// scores get a straight-through gradient (see docs/design.md).
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor> hard_attention(
    const at::Tensor& x, const at::Tensor& scores, c10::string_view mode = "threshold",
    double threshold = 0.5, int64_t k = 1, c10::string_view estimator = "sigmoid",
    double temperature = 1.0);

}  // namespace ops
}  // namespace cnn_attention
