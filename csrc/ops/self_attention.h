#pragma once

// self_attention: a non-local / SAGAN block over the P positions of a feature map, with
// multi-head attention whose memory is linear in P (the P x P matrix is never built).
// See docs/design.md section 1. Differentiable through the dispatcher (autograd is registered
// in C++).

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../macros.h"

namespace cnn_attention {
namespace ops {

// y = x + gamma * (out_weight @ attention(q, k, v) + out_bias), with q, k, v from one
// projection qkv = qkv_weight @ x + qkv_bias per position (rows: qk_dim queries, qk_dim
// keys, v_dim values) and keys and values max-pooled by kv_stride.
CNN_ATTENTION_API at::Tensor self_attention(const at::Tensor& x, const at::Tensor& qkv_weight,
                                            const std::optional<at::Tensor>& qkv_bias,
                                            const at::Tensor& out_weight,
                                            const std::optional<at::Tensor>& out_bias,
                                            const at::Tensor& gamma, int64_t qk_dim,
                                            int64_t num_heads = 1, int64_t kv_stride = 1);

namespace detail {

// (y, attn, lse): also the concatenated head outputs attn (N, P, v_dim), dtype of x, and
// the log-sum-exp of every softmax row, lse (N, num_heads, P) in the accumulation dtype:
// what the backward needs besides the inputs.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor> _self_attention_forward(
    const at::Tensor& x, const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
    const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads, int64_t kv_stride);

// (grad_x, grad_qkv_weight, grad_qkv_bias, grad_out_weight, grad_out_bias, grad_gamma); the
// bias gradients are returned whether or not there are biases.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_self_attention_backward(const at::Tensor& grad_y, const at::Tensor& x,
                         const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                         const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                         const at::Tensor& gamma, const at::Tensor& attn, const at::Tensor& lse,
                         int64_t qk_dim, int64_t num_heads, int64_t kv_stride);

}  // namespace detail

// The sizes an input set implies, after every check of docs/design.md section 1 (shared by every
// backend, so that all raise the same messages).
struct SelfAttentionSizes {
  int64_t qk_dim, v_dim, num_heads, kv_stride;
  int64_t qk_head_dim() const { return qk_dim / num_heads; }
  int64_t v_head_dim() const { return v_dim / num_heads; }
};

SelfAttentionSizes check_self_attention_args(const at::Tensor& x, const at::Tensor& qkv_weight,
                                             const std::optional<at::Tensor>& qkv_bias,
                                             const at::Tensor& out_weight,
                                             const std::optional<at::Tensor>& out_bias,
                                             const at::Tensor& gamma, int64_t qk_dim,
                                             int64_t num_heads, int64_t kv_stride);
SelfAttentionSizes check_self_attention_backward_args(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& qkv_weight,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma, const at::Tensor& attn,
    const at::Tensor& lse, int64_t qk_dim, int64_t num_heads, int64_t kv_stride);

// Results of every backend, with the same sizes and strides: y laid out like x, attn
// (N, P, v_dim) and lse (N, num_heads, P) dense.
at::Tensor self_attention_output_like(const at::Tensor& x);
at::Tensor self_attention_attn_like(const at::Tensor& x, const SelfAttentionSizes& sizes);
at::Tensor self_attention_lse_like(const at::Tensor& x, const SelfAttentionSizes& sizes);

}  // namespace ops
}  // namespace cnn_attention
