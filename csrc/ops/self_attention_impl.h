#pragma once

// The device-independent half of self_attention (see docs/design.md, "One pattern per
// operator"). Everything but the attention itself is a handful of matrix products over
// positions, done here through the backend's products (SelfAttentionBackend::matmul: a
// fixed-order kernel of ours on CPU, cuBLAS on CUDA) in the token-major layout (N, P, features)
// that attention wants:
//
//   qkv  (N, P, 2 qk + v)  = x_tokens @ qkv_weight^T + qkv_bias   one product, no copy of x
//   k, v (N, Pk, qk + v)   = max-pool of qkv's key and value columns when kv_stride > 1
//   attn (N, P, v)         = per head softmax(q k^T * scale) v     the backend
//   y                      = x + gamma * (attn @ out_weight^T + out_bias), laid out like x
//
// The backward recomputes qkv from x (one product) and attn (the backend's attention forward,
// bit for bit the forward's) or, where fewer multiply-adds (sums_through_grad_y), the sums
// T = p^T grad_y that give the output projection's and the values' gradients instead, a chunk
// of samples at a time, so that only the softmax statistics lse ((N, H, P), one value per
// position and head) are saved besides the inputs: nothing as large as the feature map lives
// from forward to backward (deep stages keep qkv: few_tokens_for_their_channels).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "dispatch.h"
#include "self_attention.h"

namespace cnn_attention {
namespace ops {

// The private operators, the argument checks every backend shares, and the results' layouts
// (internal: the installed headers carry the public operators only).

namespace detail {

// (y, attn, lse, projection): also the concatenated head outputs attn (N, P, v_dim), dtype of
// x (for inspection: the backward recomputes them), the log-sum-exp of every softmax row, lse
// (N, num_heads, P) in the accumulation dtype, and with keep_projection the projection
// x W_qkv^T + b_qkv as (N, P, 2 * qk_dim + v_dim) tokens, dtype of x (else an empty (0,)
// tensor): what the backward takes besides the inputs.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_self_attention_forward(const at::Tensor& x, const at::Tensor& qkv_weight,
                        const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
                        const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                        int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
                        bool keep_projection = false);

// (grad_x, grad_qkv_weight, grad_qkv_bias, grad_out_weight, grad_out_bias, grad_gamma); the
// bias gradients are returned whether or not there are biases. Given the forward's projection
// the backward reads it instead of computing it again.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_self_attention_backward(const at::Tensor& grad_y, const at::Tensor& x,
                         const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                         const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                         const at::Tensor& gamma, const at::Tensor& lse, int64_t qk_dim,
                         int64_t num_heads, int64_t kv_stride,
                         const std::optional<at::Tensor>& projection = std::nullopt);

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
    const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma, const at::Tensor& lse,
    int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
    const std::optional<at::Tensor>& projection);

// Results of every backend, with the same sizes and strides: y laid out like x, attn
// (N, P, v_dim), lse (N, num_heads, P) and the kept projection (N, P, R) dense.
at::Tensor self_attention_attn_like(const at::Tensor& x, const SelfAttentionSizes& sizes);
at::Tensor self_attention_lse_like(const at::Tensor& x, const SelfAttentionSizes& sizes);
at::Tensor self_attention_projection_like(const at::Tensor& x, const at::Tensor& qkv_weight,
                                          bool keep_projection);

// Whether the feature map x has few tokens for its channels, 2 N P <= C (deep stages: a few
// positions, many channels). Then the backward's temporaries for the whole batch, 2 (v_dim + R)
// values per token, are no larger than the weights' gradients, (R + v_dim) C values, that it must
// return anyway: the backward takes the batch in one chunk, and the forward's projection (R values
// per token, at most half the weights' gradients) is kept for it rather than computed twice.
bool few_tokens_for_their_channels(const at::Tensor& x);

// What a backend supplies. q (N, H, P, dq), k (N, H, Pk, dq), v (N, H, Pk, dv) are views with a
// unit stride on the last dim and any other strides, in the dtype of x; backends choose how to
// compute attention.
struct SelfAttentionBackend {
  // (out (N, H, P, dv) in the dtype of q with any strides, lse (N, H, P) dense in the
  // accumulation dtype): out = softmax(q k^T * scale) v, lse = logsumexp(q k^T * scale).
  std::tuple<at::Tensor, at::Tensor> (*attention_forward)(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale);
  // Writes grad_q, grad_k and grad_v: views shaped like q, k and v with a unit last stride,
  // in the dtype of q, whose contents on entry are undefined (slices of the projection's
  // gradient, so that nothing is copied afterwards). out and lse are attention_forward's results
  // for the same q, k and v (out undefined unless attention_backward_reads_out).
  void (*attention_backward)(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             double scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                             const at::Tensor& grad_v);
  // T's way (self_attention_impl.cpp, sums_through_grad_y), for float32 and float64; both
  // nullptr where the backend has none (the backward then recomputes the heads and takes grad_v
  // from attention_backward). grad_tokens (N, P, C) are grad_y's tokens (rows, or the columns of
  // a channels-first map), out_weight (C, H dv), and the output gradient of the heads is
  // grad_attn = gamma * grad_tokens @ out_weight, which neither call holds whole. `workspace`
  // (1-D, may be undefined) is memory the caller lends for partial sums; as much of it is used as
  // the shape allows, the rest comes from the allocator.
  // query_key_gradients writes grad_q and grad_k (tensors of their own) as attention_backward
  // would, given grad_attn.
  void (*query_key_gradients)(const at::Tensor& grad_tokens, const at::Tensor& out_weight,
                              double gamma, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& lse, double scale,
                              const at::Tensor& grad_q, const at::Tensor& grad_k,
                              const at::Tensor& workspace);
  // value_gradients_through_sums, with T_h = p_h^T grad_tokens (Pk, C) per head, writes
  // grad_v = gamma * T_h out_weight_h (grad_v may be v itself) and returns G = the sum of
  // T_h^T v_h (C, H dv) over samples and keys.
  at::Tensor (*value_gradients_through_sums)(const at::Tensor& grad_tokens,
                                             const at::Tensor& out_weight, double gamma,
                                             const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& lse,
                                             double scale, const at::Tensor& grad_v,
                                             const at::Tensor& workspace);
  // out (M, N) = a (M, K) @ b (K, N), or out += a @ b with `accumulate`: 2-D tensors with any
  // strides, `out` written in place (see MatmulFn).
  MatmulFn matmul;
  // out (K, L) = the sum over samples and positions of a[n]^T (K, M) @ b[n] (M, L) for
  // a (N, M, K) and b (N, M, L), or out += it with `accumulate`: a weight gradient, `out` in the
  // accumulation dtype with a unit last stride, written in place.
  void (*position_sum_product)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                               bool accumulate);
  // Whether attention_backward reads `out`: where it does not, the backward frees the
  // recomputed heads before calling it (memory).
  bool attention_backward_reads_out;
  // Whether attention_backward may be given grad_q, grad_k and grad_v that are the very views
  // q, k and v (all three, grad_v where defined): the projection's gradient written over the
  // recomputed projection, one (N, P, R) tensor less at the backward's peak.
  bool attention_backward_over_inputs;
};

// The kernels of _self_attention_forward, self_attention (its first result) and
// _self_attention_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_attention_forward(
    const SelfAttentionBackend& backend, const at::Tensor& x, const at::Tensor& qkv_weight,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma, int64_t qk_dim,
    int64_t num_heads, int64_t kv_stride, bool keep_projection);

at::Tensor self_attention_result(const SelfAttentionBackend& backend, const at::Tensor& x,
                                 const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& out_weight,
                                 const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                                 int64_t qk_dim, int64_t num_heads, int64_t kv_stride);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
self_attention_backward(const SelfAttentionBackend& backend, const at::Tensor& grad_y,
                        const at::Tensor& x, const at::Tensor& qkv_weight,
                        const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
                        const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                        const at::Tensor& lse, int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
                        const std::optional<at::Tensor>& projection);

// The operators' kernels on one backend: TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) calls
// register_self_attention_kernels<kCpuBackend>(m).
template <const SelfAttentionBackend& kBackend>
void register_self_attention_kernels(torch::Library& m) {
  m.impl("self_attention", TORCH_FN((OnBackend<self_attention_result, kBackend>::kernel)));
  m.impl("_self_attention_forward",
         TORCH_FN((OnBackend<self_attention_forward, kBackend>::kernel)));
  m.impl("_self_attention_backward",
         TORCH_FN((OnBackend<self_attention_backward, kBackend>::kernel)));
}

}  // namespace ops
}  // namespace cnn_attention
