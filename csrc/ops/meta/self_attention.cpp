#include <torch/library.h>

#include "../self_attention_impl.h"

namespace cnn_attention {
namespace ops {

namespace {

// Same checks and output strides as the device kernels.
at::Tensor self_attention_meta(const at::Tensor& x, const at::Tensor& qkv_weight,
                               const std::optional<at::Tensor>& qkv_bias,
                               const at::Tensor& out_weight,
                               const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                               int64_t qk_dim, int64_t num_heads, int64_t kv_stride) {
  check_self_attention_args(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads,
                            kv_stride);
  return feature_map_like(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_attention_forward_meta(
    const at::Tensor& x, const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
    const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
    bool keep_projection) {
  const SelfAttentionSizes sizes = check_self_attention_args(
      x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads, kv_stride);
  return {feature_map_like(x), self_attention_attn_like(x, sizes),
          self_attention_lse_like(x, sizes),
          self_attention_projection_like(x, qkv_weight, keep_projection)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
self_attention_backward_meta(const at::Tensor& grad_y, const at::Tensor& x,
                             const at::Tensor& qkv_weight,
                             const std::optional<at::Tensor>& qkv_bias,
                             const at::Tensor& out_weight,
                             const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                             const at::Tensor& lse, int64_t qk_dim, int64_t num_heads,
                             int64_t kv_stride, const std::optional<at::Tensor>& projection) {
  check_self_attention_backward_args(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias, gamma,
                                     lse, qk_dim, num_heads, kv_stride, projection);
  const auto options = x.options();
  return {feature_map_like(x),
          at::empty_symint(qkv_weight.sym_sizes(), options),
          at::empty_symint({qkv_weight.sym_size(0)}, options),
          at::empty_symint(out_weight.sym_sizes(), options),
          at::empty_symint({x.sym_size(1)}, options),
          at::empty_symint(gamma.sym_sizes(), options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, Meta, m) {
  m.impl("self_attention", TORCH_FN(self_attention_meta));
  m.impl("_self_attention_forward", TORCH_FN(self_attention_forward_meta));
  m.impl("_self_attention_backward", TORCH_FN(self_attention_backward_meta));
}

}  // namespace ops
}  // namespace cnn_attention
