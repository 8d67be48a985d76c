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

}  // namespace ops
}  // namespace cnn_attention
