#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
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
// (kQueryBlock x kKeyBlock) block of scores lives in a per-thread buffer (128 KiB in
// float32, within L2) and the P x P matrix never exists.
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 256;
// The backward owns the key and value gradients of its key blocks and adds to the query
// gradient of every query block. For enough parallel tasks the key blocks of each (sample,
// head) are split into groups, each with a partial query gradient that is summed at the end
// in group order. The group count depends on the shape only, so results are the same for
// every thread count.
constexpr int64_t kMinBackwardTasks = 16;

// Block products. Those whose inner or output width is a head's query/key width (q k^T,
// scores @ k, scores^T @ q) are ours: MKL's results for them (widths like 8) changed in the
// last bits with torch.set_num_threads even though each call runs on one thread inside the
// parallel region. Ours sum each element over l in order, the same on any thread. The wide
// products (scores @ v, scores^T @ grad_out, grad_out @ v^T: most of the work) go to BLAS,
// whose results for them the determinism tests find identical for every thread count.
//
// c (m x n) = alpha * sum over l of a(i, l) * b(l, :), stored into c or added to it, with
// a(i, l) = a[i * a_row + l * a_col] (a row-major block or, with a_row = 1, a transposed one)
// and b, c row-major with contiguous rows. Tiles of kRows rows by kVecs vectors of columns
// keep their sums in registers; b's vectors are loaded once per l for all kRows rows.
template <typename T, int kRows, int kVecs>
inline void product_tile(int64_t k, T alpha, const T* a, int64_t a_row, int64_t a_col, const T* b,
                         int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  Vec sums[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) sums[r][v] = Vec(T(0));
  }
  const T* a_rows[kRows];
  for (int r = 0; r < kRows; ++r) a_rows[r] = a + r * a_row;
  for (int64_t l = 0; l < k; ++l, b += ldb) {
    Vec columns[kVecs];
    for (int v = 0; v < kVecs; ++v) columns[v] = Vec::loadu(b + v * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec weight(*a_rows[r]);
      a_rows[r] += a_col;
      for (int v = 0; v < kVecs; ++v) sums[r][v] = at::vec::fmadd(weight, columns[v], sums[r][v]);
    }
  }
  const Vec alpha_vec(alpha);
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      T* out = c + r * ldc + v * Vec::size();
      const Vec result = sums[r][v] * alpha_vec;
      (accumulate ? result + Vec::loadu(out) : result).store(out);
    }
  }
}

// The last columns, fewer than a vector.
template <typename T, int kRows>
inline void product_tail(int64_t k, int64_t cols, T alpha, const T* a, int64_t a_row,
                         int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,
                         int64_t ldc) {
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      T sum = 0;
      for (int64_t l = 0; l < k; ++l) sum += a[r * a_row + l * a_col] * b[l * ldb + j];
      c[r * ldc + j] = accumulate ? c[r * ldc + j] + alpha * sum : alpha * sum;
    }
  }
}

template <typename T>
void block_product(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row,
                   int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  auto rows = [&](auto rows_tag, int64_t i) {
    constexpr int kRows = decltype(rows_tag)::value;
    const T* a_rows = a + i * a_row;
    T* c_rows = c + i * ldc;
    int64_t j = 0;
    for (; j + 3 * kWidth <= n; j += 3 * kWidth) {
      product_tile<T, kRows, 3>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc);
    }
    for (; j + 2 * kWidth <= n; j += 2 * kWidth) {
      product_tile<T, kRows, 2>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc);
    }
    for (; j + kWidth <= n; j += kWidth) {
      product_tile<T, kRows, 1>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc);
    }
    if (j < n) {
      product_tail<T, kRows>(k, n - j, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate,
                             c_rows + j, ldc);
    }
  };
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) rows(std::integral_constant<int, 4>{}, i);
  for (; i < m; ++i) rows(std::integral_constant<int, 1>{}, i);
}

// c (m x n) = alpha * a (m x k) b (k x n) (+ c), row-major blocks with leading dims (a
// transposed when a_transposed: stored k x m), through ATen's BLAS, which runs on the calling
// thread inside a parallel region. Only from_blob tensors reach it, so the worker threads
// need none of the caller's thread-local state.
template <typename T>
void blas_product(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  bool a_transposed, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor lhs =
      a_transposed ? at::from_blob(const_cast<T*>(a), {m, k}, {1, lda}, options)
                   : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, options);
  const at::Tensor rhs = at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, options);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  out.addmm_(lhs, rhs, accumulate ? T(1) : T(0), alpha);
}

// out (width x rows, leading dim ld_out) = the transpose of `rows` rows of `width` values
// (leading dim ld): a key or value block as b operand of a product with its transpose.
template <typename T>
void transpose_rows(const T* in, int64_t ld, int64_t rows, int64_t width, T* out, int64_t ld_out) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t c = 0; c < width; ++c) out[c * ld_out + j] = in[j * ld + c];
  }
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

  at::parallel_for(0, batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kQueryBlock * kKeyBlock), acc(kQueryBlock * dv), key_columns(dq * kKeyBlock);
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
        transpose_rows(keys.rows(n, h, key_first), keys.row_stride, cols, dq, key_columns.data(),
                       kKeyBlock);
        block_product<T>(rows, cols, dq, scale, query, queries.row_stride, 1, key_columns.data(),
                         kKeyBlock, false, scores.data(), kKeyBlock);
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
            const Vec p = cpu::exp_u20_nonfinite(Vec::loadu(s + j) - shift_vec);
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
        blas_product<T>(rows, dv, cols, T(1), scores.data(), kKeyBlock, false,
                        values.rows(n, h, key_first), values.row_stride, true, acc.data(), dv);
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

  at::parallel_for(0, batch * heads * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(kQueryBlock * kKeyBlock), grad_scores(kQueryBlock * kKeyBlock);
    std::vector<T> key_columns(dq * kKeyBlock), value_columns(dv * kKeyBlock);
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
        transpose_rows(key, keys.row_stride, cols, dq, key_columns.data(), kKeyBlock);
        transpose_rows(value, values.row_stride, cols, dv, value_columns.data(), kKeyBlock);
        for (int64_t first = 0; first < positions; first += kQueryBlock) {
          const int64_t rows = std::min(kQueryBlock, positions - first);
          const T* query = queries.rows(n, h, first);
          const T* grad = grads.rows(n, h, first);
          // probs = exp(q k^T * scale - lse): the forward's softmax, recomputed.
          block_product<T>(rows, cols, dq, scale, query, queries.row_stride, 1,
                           key_columns.data(), kKeyBlock, false, probs.data(), kKeyBlock);
          for (int64_t i = 0; i < rows; ++i) {
            T* p = probs.data() + i * kKeyBlock;
            const Vec row_shift(row_lse[first + i]);
            int64_t j = 0;
            for (; j + Vec::size() <= cols; j += Vec::size()) {
              cpu::exp_u20_nonfinite(Vec::loadu(p + j) - row_shift).store(p + j);
            }
            for (; j < cols; ++j) p[j] = std::exp(p[j] - row_lse[first + i]);
          }
          // grad_v += probs^T grad_out
          blas_product<T>(cols, dv, rows, T(1), probs.data(), kKeyBlock, true, grad,
                          grads.row_stride, true, grad_value, grad_values.row_stride);
          // grad_scores = probs * (grad_out v^T - delta)
          blas_product<T>(rows, cols, dv, T(1), grad, grads.row_stride, false,
                          value_columns.data(), kKeyBlock, false, grad_scores.data(), kKeyBlock);
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
          block_product<T>(cols, dq, rows, scale, grad_scores.data(), 1, kKeyBlock, query,
                           queries.row_stride, true, grad_key, grad_keys.row_stride);
          block_product<T>(rows, dq, cols, scale, grad_scores.data(), kKeyBlock, 1, key,
                           keys.row_stride, true, grad_query + first * grad_query_stride,
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

// The forward runs on ATen's CPU flash attention where it applies: query/key heads as wide
// as value heads (it refuses others, and scaled_dot_product_attention then builds the P x P
// matrix). Its tuned block products beat ours there (about 2x at 4 x 4096 positions, 64-wide
// heads), and its forward, like ours, does not depend on the thread count. Its backward
// does (with several heads), so the backward is always ours, from the same log-sum-exp.
// torch.backends.cuda.enable_flash_sdp(False) (which governs the CPU kernel too) sends every
// shape to ours.
bool aten_flash_applies(const at::Tensor& q, const at::Tensor& v) {
  return q.size(-1) == v.size(-1) && at::globalContext().userEnabledFlashSDP();
}

// Half inputs are converted to float32 once (O(P) memory), so every block product runs in
// the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  if (aten_flash_applies(q, v)) {
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        q, k, v, /*dropout_p=*/0.0, /*is_causal=*/false, std::nullopt, scale);
    return {out, lse.contiguous()};
  }
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
