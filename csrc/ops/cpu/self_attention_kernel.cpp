#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../self_attention.h"
#include "../self_attention_impl.h"
#include "vec.h"

namespace cnn_attention {
namespace ops {

namespace {

using cpu::lane_sum;
using cpu::nan_max;

// Attention in blocks of query and key rows with an online softmax (flash attention): a
// (kQueryBlock x kKeyBlock) block of scores lives in a per-thread buffer (256 KiB in
// float32, within L2) and the P x P matrix never exists. Every block product goes to BLAS.
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 256;
// The backward owns the key and value gradients of its key blocks and adds to the query
// gradient of every query block. For enough parallel tasks the key blocks of each (sample,
// head) are split into groups, each with a partial query gradient that is summed at the end
// in group order. The group count depends on the shape only, so results are the same for
// every thread count.
constexpr int64_t kMinBackwardTasks = 16;

// c (m x n) = alpha * op(a) op(b) + beta * c for row-major blocks with leading dims lda, ldb,
// ldc (op = transpose or not), read and written in place by ATen's BLAS. beta = 0 ignores
// what c held. Called inside at::parallel_for, where each product runs on its thread alone;
// the workers carry the caller's thread-local state (ThreadLocalStateGuard) so that these
// ATen calls dispatch as the caller's would.
template <typename T>
void block_gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha,
                const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // op(matrix) is rows x cols; the matrix itself is stored row-major with leading dim ld.
  auto matrix = [&](const T* data, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
    return transpose ? at::from_blob(const_cast<T*>(data), {rows, cols}, {1, ld}, options)
                     : at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  out.addmm_(matrix(a, m, k, lda, transpose_a), matrix(b, k, n, ldb, transpose_b), beta, alpha);
}

// Strides of a (N, H, rows, d) view with a unit last stride, and its data.
template <typename T>
struct HeadRows {
  T* data;
  int64_t batch_stride, head_stride, row_stride;
  explicit HeadRows(const at::Tensor& t)
      : data(t.data_ptr<T>()),
        batch_stride(t.stride(0)),
        head_stride(t.stride(1)),
        row_stride(t.stride(2)) {}
  T* rows(int64_t n, int64_t h, int64_t first_row) const {
    return data + n * batch_stride + h * head_stride + first_row * row_stride;
  }
};

template <typename T>
void attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              T scale, const at::Tensor& out, const at::Tensor& lse) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dq = q.size(3);
  const int64_t key_positions = k.size(2), dv = v.size(3);
  const int64_t query_blocks = (positions + kQueryBlock - 1) / kQueryBlock;
  const HeadRows<T> queries(q), keys(k), values(v), outputs(out);
  T* lse_data = lse.data_ptr<T>();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  const at::ThreadLocalState caller;
  at::parallel_for(0, batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    std::vector<T> scores(kQueryBlock * kKeyBlock), acc(kQueryBlock * dv);
    std::vector<T> row_max(kQueryBlock), row_sum(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nh = task / query_blocks, n = nh / heads, h = nh % heads;
      const int64_t first = (task % query_blocks) * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, positions - first);
      const T* query = queries.rows(n, h, first);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t key_first = 0; key_first < key_positions; key_first += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, key_positions - key_first);
        block_gemm<T>(false, true, rows, cols, dq, scale, query, queries.row_stride,
                      keys.rows(n, h, key_first), keys.row_stride, T(0), scores.data(), kKeyBlock);
        for (int64_t i = 0; i < rows; ++i) {
          T* s = scores.data() + i * kKeyBlock;
          T block_max = kNegInf;
          for (int64_t j = 0; j < cols; ++j) block_max = nan_max(s[j], block_max);
          const T new_max = nan_max(block_max, row_max[i]);
          // A row of -inf scores so far has nothing to shift by (exp(-inf) is 0 anyway).
          const T shift = new_max == kNegInf ? T(0) : new_max;
          const T correction = std::exp(row_max[i] - shift);
          const Vec shift_vec(shift);
          Vec sum_vec(0);
          int64_t j = 0;
          for (; j + Vec::size() <= cols; j += Vec::size()) {
            const Vec p = (Vec::loadu(s + j) - shift_vec).exp_u20();
            p.store(s + j);
            sum_vec = sum_vec + p;
          }
          T sum = lane_sum(sum_vec);
          for (; j < cols; ++j) {
            s[j] = std::exp(s[j] - shift);
            sum += s[j];
          }
          row_sum[i] = row_sum[i] * correction + sum;
          row_max[i] = new_max;
          if (correction != T(1)) {
            T* a = acc.data() + i * dv;
            for (int64_t c = 0; c < dv; ++c) a[c] *= correction;
          }
        }
        block_gemm<T>(false, false, rows, dv, cols, T(1), scores.data(), kKeyBlock,
                      values.rows(n, h, key_first), values.row_stride, T(1), acc.data(), dv);
      }
      T* out_rows = outputs.rows(n, h, first);
      T* lse_rows = lse_data + nh * positions + first;
      for (int64_t i = 0; i < rows; ++i) {
        const T inverse = T(1) / row_sum[i];
        const T* a = acc.data() + i * dv;
        T* o = out_rows + i * outputs.row_stride;
        for (int64_t c = 0; c < dv; ++c) o[c] = a[c] * inverse;
        lse_rows[i] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
}

// grad_q, grad_k, grad_v: (N, H, rows, d) with a unit last stride, zero on entry; delta
// (N, H, P) = rowsum(grad_out * out).
template <typename T>
void attention_backward_kernel(const at::Tensor& grad_out, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                               const at::Tensor& delta, T scale, const at::Tensor& grad_q,
                               const at::Tensor& grad_k, const at::Tensor& grad_v) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dq = q.size(3);
  const int64_t key_positions = k.size(2), dv = v.size(3);
  const int64_t key_blocks = (key_positions + kKeyBlock - 1) / kKeyBlock;
  const int64_t wanted_groups =
      std::min(key_blocks, (kMinBackwardTasks + batch * heads - 1) / (batch * heads));
  const int64_t blocks_per_group = (key_blocks + wanted_groups - 1) / wanted_groups;
  const int64_t groups = (key_blocks + blocks_per_group - 1) / blocks_per_group;
  // Group 0 adds straight into grad_q, the others into their dense partial.
  const at::Tensor partials =
      at::zeros({std::max<int64_t>(groups - 1, 0), batch, heads, positions, dq}, q.options());
  const HeadRows<T> queries(q), keys(k), values(v), grads(grad_out);
  const HeadRows<T> grad_queries(grad_q), grad_keys(grad_k), grad_values(grad_v);
  const T* lse_data = lse.data_ptr<T>();
  const T* delta_data = delta.data_ptr<T>();
  T* partial_data = partials.data_ptr<T>();

  const at::ThreadLocalState caller;
  at::parallel_for(0, batch * heads * groups, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    std::vector<T> probs(kQueryBlock * kKeyBlock), grad_scores(kQueryBlock * kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nh = task / groups, group = task % groups, n = nh / heads, h = nh % heads;
      T* grad_query = group == 0 ? grad_queries.rows(n, h, 0)
                                 : partial_data + ((group - 1) * batch * heads + nh) * positions * dq;
      const int64_t grad_query_stride = group == 0 ? grad_queries.row_stride : dq;
      const T* row_lse = lse_data + nh * positions;
      const T* row_delta = delta_data + nh * positions;
      const int64_t block_end = std::min(key_blocks, (group + 1) * blocks_per_group);
      for (int64_t block = group * blocks_per_group; block < block_end; ++block) {
        const int64_t key_first = block * kKeyBlock;
        const int64_t cols = std::min(kKeyBlock, key_positions - key_first);
        const T* key = keys.rows(n, h, key_first);
        const T* value = values.rows(n, h, key_first);
        T* grad_key = grad_keys.rows(n, h, key_first);
        T* grad_value = grad_values.rows(n, h, key_first);
        for (int64_t first = 0; first < positions; first += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, positions - first);
          const T* query = queries.rows(n, h, first);
          const T* grad = grads.rows(n, h, first);
          // probs = exp(q k^T * scale - lse): the forward's softmax, recomputed.
          block_gemm<T>(false, true, rows, cols, dq, scale, query, queries.row_stride, key,
                        keys.row_stride, T(0), probs.data(), kKeyBlock);
          for (int64_t i = 0; i < rows; ++i) {
            T* p = probs.data() + i * kKeyBlock;
            const Vec row_shift(row_lse[first + i]);
            int64_t j = 0;
            for (; j + Vec::size() <= cols; j += Vec::size()) {
              (Vec::loadu(p + j) - row_shift).exp_u20().store(p + j);
            }
            for (; j < cols; ++j) p[j] = std::exp(p[j] - row_lse[first + i]);
          }
          // grad_v += probs^T grad_out
          block_gemm<T>(true, false, cols, dv, rows, T(1), probs.data(), kKeyBlock, grad,
                        grads.row_stride, T(1), grad_value, grad_values.row_stride);
          // grad_scores = probs * (grad_out v^T - delta)
          block_gemm<T>(false, true, rows, cols, dv, T(1), grad, grads.row_stride, value,
                        values.row_stride, T(0), grad_scores.data(), kKeyBlock);
          for (int64_t i = 0; i < rows; ++i) {
            T* ds = grad_scores.data() + i * kKeyBlock;
            const T* p = probs.data() + i * kKeyBlock;
            const Vec row_delta_vec(row_delta[first + i]);
            int64_t j = 0;
            for (; j + Vec::size() <= cols; j += Vec::size()) {
              (Vec::loadu(p + j) * (Vec::loadu(ds + j) - row_delta_vec)).store(ds + j);
            }
            for (; j < cols; ++j) ds[j] = p[j] * (ds[j] - row_delta[first + i]);
          }
          // grad_k += scale * grad_scores^T q;  grad_q += scale * grad_scores k
          block_gemm<T>(true, false, cols, dq, rows, scale, grad_scores.data(), kKeyBlock, query,
                        queries.row_stride, T(1), grad_key, grad_keys.row_stride);
          block_gemm<T>(false, false, rows, dq, cols, scale, grad_scores.data(), kKeyBlock, key,
                        keys.row_stride, T(1), grad_query + first * grad_query_stride,
                        grad_query_stride);
        }
      }
    }
  });
  for (int64_t group = 1; group < groups; ++group) grad_q.add_(partials[group - 1]);
}

// delta (N, H, P) = rowsum(grad_out * out), row by row (no temporary as large as out).
template <typename T>
void row_dot_kernel(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& delta) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t batch = out.size(0), heads = out.size(1), positions = out.size(2);
  const int64_t width = out.size(3);
  const HeadRows<T> grads(grad_out), outputs(out);
  T* delta_data = delta.data_ptr<T>();
  at::parallel_for(0, batch * heads * positions, cpu::grain_for(width), [&](int64_t begin,
                                                                           int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % positions, h = row / positions % heads;
      const int64_t n = row / (positions * heads);
      const T* g = grads.rows(n, h, i);
      const T* o = outputs.rows(n, h, i);
      Vec sum_vec(0);
      int64_t c = 0;
      for (; c + Vec::size() <= width; c += Vec::size()) {
        sum_vec = at::vec::fmadd(Vec::loadu(g + c), Vec::loadu(o + c), sum_vec);
      }
      T sum = lane_sum(sum_vec);
      for (; c < width; ++c) sum += g[c] * o[c];
      delta_data[row] = sum;
    }
  });
}

at::ScalarType accumulation_type(const at::Tensor& t) {
  return at::toOpMathType(t.scalar_type());
}

// Half inputs are converted to float32 once (O(P) memory), so every block product runs in
// the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  const auto acc = accumulation_type(q);
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dv = v.size(3);
  // Heads written token-major, (N, P, H, dv), so that the caller's (N, P, v) is a view.
  at::Tensor out = at::empty({batch, positions, heads, dv}, q.options().dtype(acc)).transpose(1, 2);
  at::Tensor lse = at::empty({batch, heads, positions}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "self_attention_forward_cpu", [&] {
    attention_forward_kernel<scalar_t>(q.to(acc), k.to(acc), v.to(acc),
                                       static_cast<scalar_t>(scale), out, lse);
  });
  return {out.to(q.scalar_type()), lse};
}

void attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                            const at::Tensor& lse, double scale, const at::Tensor& grad_q,
                            const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const auto acc = accumulation_type(q);
  const at::Tensor grad_acc = grad_out.to(acc);
  const at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc));
  // float32 and float64 gradients accumulate in place; half ones in float32 first.
  const bool in_place = acc == q.scalar_type();
  auto accumulator = [&](const at::Tensor& grad) {
    return in_place ? grad.zero_() : at::zeros(grad.sizes(), grad.options().dtype(acc));
  };
  const at::Tensor grad_q_acc = accumulator(grad_q), grad_k_acc = accumulator(grad_k),
                   grad_v_acc = accumulator(grad_v);
  AT_DISPATCH_FLOATING_TYPES(acc, "self_attention_backward_cpu", [&] {
    row_dot_kernel<scalar_t>(grad_acc, out.to(acc), delta);
    attention_backward_kernel<scalar_t>(grad_acc, q.to(acc), k.to(acc), v.to(acc),
                                        lse.to(acc).contiguous(), delta,
                                        static_cast<scalar_t>(scale), grad_q_acc, grad_k_acc,
                                        grad_v_acc);
  });
  if (!in_place) {
    grad_q.copy_(grad_q_acc);
    grad_k.copy_(grad_k_acc);
    grad_v.copy_(grad_v_acc);
  }
}

const SelfAttentionKernels kCpuKernels{attention_forward_cpu, attention_backward_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_forward_kernel(
    const at::Tensor& x, const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
    const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads, int64_t kv_stride) {
  return self_attention_forward(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim,
                                num_heads, kv_stride, kCpuKernels);
}

at::Tensor self_attention_kernel(const at::Tensor& x, const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& out_weight,
                                 const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                                 int64_t qk_dim, int64_t num_heads, int64_t kv_stride) {
  return std::get<0>(self_attention_forward_kernel(x, qkv_weight, qkv_bias, out_weight, out_bias,
                                                   gamma, qk_dim, num_heads, kv_stride));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
self_attention_backward_kernel(const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& qkv_weight,
                               const std::optional<at::Tensor>& qkv_bias,
                               const at::Tensor& out_weight,
                               const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                               const at::Tensor& attn, const at::Tensor& lse, int64_t qk_dim,
                               int64_t num_heads, int64_t kv_stride) {
  return self_attention_backward(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias, gamma,
                                 attn, lse, qk_dim, num_heads, kv_stride, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) {
  m.impl("self_attention", TORCH_FN(self_attention_kernel));
  m.impl("_self_attention_forward", TORCH_FN(self_attention_forward_kernel));
  m.impl("_self_attention_backward", TORCH_FN(self_attention_backward_kernel));
}

}  // namespace ops
}  // namespace cnn_attention
