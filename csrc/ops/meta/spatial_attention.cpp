#include <torch/library.h>

#include "../spatial_attention_impl.h"

namespace cnn_attention {
namespace ops {

namespace {

// Same checks and output strides as the device kernels.
at::Tensor soft_attention_forward_meta(const at::Tensor& x, const at::Tensor& scores,
                                       c10::string_view normalize, double temperature) {
  check_soft_attention_args(x, scores, normalize, temperature);
  return spatial_attention_output_like(x);
}

std::tuple<at::Tensor, at::Tensor> soft_attention_backward_meta(const at::Tensor& grad_y,
                                                                const at::Tensor& x,
                                                                const at::Tensor& scores,
                                                                c10::string_view normalize,
                                                                double temperature) {
  check_soft_attention_backward_args(grad_y, x, scores, normalize, temperature);
  return {spatial_attention_output_like(x), spatial_attention_scores_like(scores, x)};
}

at::Tensor soft_attention_pool_forward_meta(const at::Tensor& x, const at::Tensor& scores,
                                            double temperature) {
  check_soft_attention_pool_args(x, scores, temperature);
  return soft_attention_pool_output_like(x);
}

std::tuple<at::Tensor, at::Tensor> soft_attention_pool_backward_meta(const at::Tensor& grad_out,
                                                                     const at::Tensor& x,
                                                                     const at::Tensor& scores,
                                                                     double temperature) {
  check_soft_attention_pool_backward_args(grad_out, x, scores, temperature);
  return {spatial_attention_output_like(x), spatial_attention_scores_like(scores, x)};
}

std::tuple<at::Tensor, at::Tensor> hard_attention_forward_meta(
    const at::Tensor& x, const at::Tensor& scores, c10::string_view mode, double threshold,
    int64_t k, c10::string_view estimator, double temperature) {
  check_hard_attention_args(x, scores, mode, threshold, k, estimator, temperature);
  return {spatial_attention_output_like(x), spatial_attention_scores_like(scores, x)};
}

std::tuple<at::Tensor, at::Tensor> hard_attention_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scores,
    const std::optional<at::Tensor>& mask, c10::string_view mode, double threshold,
    c10::string_view estimator, double temperature) {
  check_hard_attention_backward_args(grad_y, x, scores, mask, mode, threshold, estimator,
                                     temperature);
  return {spatial_attention_output_like(x), spatial_attention_scores_like(scores, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Meta, m) {
  m.impl("soft_attention", TORCH_FN(soft_attention_forward_meta));
  m.impl("_soft_attention_backward", TORCH_FN(soft_attention_backward_meta));
  m.impl("soft_attention_pool", TORCH_FN(soft_attention_pool_forward_meta));
  m.impl("_soft_attention_pool_backward", TORCH_FN(soft_attention_pool_backward_meta));
  m.impl("hard_attention", TORCH_FN(hard_attention_forward_meta));
  m.impl("_hard_attention_backward", TORCH_FN(hard_attention_backward_meta));
}

}  // namespace ops
}  // namespace cnn_attention
