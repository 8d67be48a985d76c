#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../self_attention_impl.h"
#include "gemm.h"
#include "vec.h"

namespace cnn_attention {
namespace ops {

namespace {

using cpu::block_product;
using cpu::lane_max;
using cpu::lane_sum;
using cpu::nan_max;
using cpu::transpose_rows;

// Attention in blocks of query and key rows with an online softmax (flash attention): a
// (kQueryBlock x kKeyBlock) block of scores lives in a per-thread buffer (128 KiB in
// float32, within L2) and the P x P matrix never exists.
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 256;
// The backward's passes split the blocks of each (sample, head) into groups of whole blocks,
// one task each, for at least this many tasks where there are enough blocks.
constexpr int64_t kMinBackwardTasks = 16;

// The backward's key blocks: kKeyBlock keys, or narrower (at least kMinKeyBlock) where the
// (sample, head) pairs would have fewer than kMinKeyBlocks blocks between them: a small map
// (the backward runs a sample at a time) would otherwise give one thread all the work.
constexpr int64_t kMinKeyBlock = 64;
constexpr int64_t kMinKeyBlocks = 4;

int64_t backward_key_block(int64_t key_positions, int64_t batch_heads) {
  const int64_t blocks_per_pair = (kMinKeyBlocks + batch_heads - 1) / batch_heads;
  const int64_t width = (key_positions + blocks_per_pair - 1) / blocks_per_pair;
  return std::clamp<int64_t>((width + 15) / 16 * 16, kMinKeyBlock, kKeyBlock);
}

struct BlockGroups {
  int64_t count, blocks_per_group;
};

// `blocks` blocks of each of `batch_heads` (sample, head) pairs in groups (at most `max_groups`):
// the split depends on the shape only, so results are the same for every thread count.
BlockGroups group_blocks(int64_t blocks, int64_t batch_heads,
                         int64_t max_groups = std::numeric_limits<int64_t>::max()) {
  const int64_t wanted = std::max<int64_t>(
      1, std::min({blocks, (kMinBackwardTasks + batch_heads - 1) / batch_heads, max_groups}));
  const int64_t per_group = std::max<int64_t>(1, (blocks + wanted - 1) / wanted);
  return {(blocks + per_group - 1) / per_group, per_group};
}

// Strides of a (N, H, rows, d) view with a unit last stride, and its data.
template <typename T>
struct HeadRows {
  T* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
  HeadRows() = default;
  explicit HeadRows(const at::Tensor& t)
      : data(t.data_ptr<T>()),
        batch_stride(t.stride(0)),
        head_stride(t.stride(1)),
        row_stride(t.stride(2)) {}
  T* rows(int64_t n, int64_t h, int64_t first_row) const {
    return data + n * batch_stride + h * head_stride + first_row * row_stride;
  }
};

// The output gradient's rows (N, H, P, dv) that a backward task reads: a tensor's, or, where the
// caller has not formed them (T's way, see self_attention_impl.cpp), a block of rows formed where
// it is read, gamma * grad_y @ out_weight_h, from grad_y's tokens (N, P, C: rows, or the columns
// of a channels-first map) and the head's columns of out_weight (C, H dv): each element the same
// chain of multiply-adds as the caller's product, times gamma, with no (N, P, v) tensor.
template <typename T>
struct HeadsGradient {
  HeadRows<T> given;
  bool formed_here = false;
  const T* tokens = nullptr;
  int64_t token_batch_stride = 0, token_row = 0, token_col = 0, channels = 0;
  const T* out_weight = nullptr;
  int64_t out_weight_ld = 0, dv = 0;
  T gamma = T(0);

  explicit HeadsGradient(const at::Tensor& grad_out) : given(grad_out) {}
  HeadsGradient(const at::Tensor& grad_tokens, const at::Tensor& weight, T gamma_value,
                int64_t head_dim)
      : formed_here(true),
        tokens(grad_tokens.const_data_ptr<T>()),
        token_batch_stride(grad_tokens.stride(0)),
        token_row(grad_tokens.stride(1)),
        token_col(grad_tokens.stride(2)),
        channels(grad_tokens.size(2)),
        out_weight(weight.const_data_ptr<T>()),
        out_weight_ld(weight.stride(0)),
        dv(head_dim),
        gamma(gamma_value) {}

  bool formed() const { return formed_here; }
  // Rows [first, first + count) of pair (n, h) and their row stride: the given tensor's, or
  // formed into `buffer` (count x dv).
  std::pair<const T*, int64_t> rows(int64_t n, int64_t h, int64_t first, int64_t count,
                                    T* buffer) const {
    if (!formed()) return {given.rows(n, h, first), given.row_stride};
    block_product<T>(count, dv, channels, gamma,
                     tokens + n * token_batch_stride + first * token_row, token_row, token_col,
                     out_weight + h * dv, out_weight_ld, false, buffer, dv);
    return {buffer, dv};
  }
};

// A buffer of `sizes` for a pass's partial sums: the front of the caller's `workspace` where it
// is large enough (memory the caller holds anyway), else a tensor of its own.
at::Tensor partial_buffer(const at::Tensor& workspace, at::IntArrayRef sizes,
                          const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (workspace.defined() && workspace.numel() >= numel) {
    return workspace.narrow(0, 0, numel).view(sizes);
  }
  return at::empty(sizes, options);
}

// How many partial sums of `each` values fit the caller's workspace (at least one), or no limit
// without one.
int64_t partials_that_fit(const at::Tensor& workspace, int64_t each) {
  if (!workspace.defined()) return std::numeric_limits<int64_t>::max();
  return std::max<int64_t>(1, workspace.numel() / std::max<int64_t>(1, each));
}

// A task's scratch buffer, left uninitialized: each task writes every element it reads
// (std::vector would zero a few hundred KiB per task and call).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t size) {
  return std::unique_ptr<T[]>(new T[size]);
}

// probs (rows x cols, leading dim ld) = exp(q k^T * scale - lse): the forward's softmax of one
// block of keys (key_columns: dq x cols, leading dim key_ld), recomputed by every pass of the
// backward in the same way.
template <typename T>
void recompute_probs(int64_t rows, int64_t cols, int64_t dq, T scale, const T* query,
                     int64_t query_stride, const T* key_columns, const T* row_lse, T* probs,
                     int64_t ld = kKeyBlock, int64_t key_ld = kKeyBlock) {
  using Vec = at::vec::Vectorized<T>;
  block_product<T>(rows, cols, dq, scale, query, query_stride, 1, key_columns, key_ld, false, probs,
                   ld);
  for (int64_t i = 0; i < rows; ++i) {
    T* p = probs + i * ld;
    const Vec row_shift(row_lse[i]);
    int64_t j = 0;
    for (; j + Vec::size() <= cols; j += Vec::size()) {
      cpu::exp_u20_nonfinite(Vec::loadu(p + j) - row_shift).store(p + j);
    }
    for (; j < cols; ++j) p[j] = std::exp(p[j] - row_lse[i]);
  }
}

// The largest of `cols` values, NaN if any is NaN: a maximum is exact, so the vector lanes
// give the value a scan in order gives.
template <typename T>
T row_max_of(const T* s, int64_t cols) {
  using Vec = at::vec::Vectorized<T>;
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (cols >= Vec::size()) {
    Vec best_vec = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= cols; j += Vec::size()) {
      best_vec = at::vec::maximum(best_vec, Vec::loadu(s + j));
    }
    best = lane_max(best_vec);
  }
  for (; j < cols; ++j) best = nan_max(s[j], best);
  return best;
}

template <typename T>
void attention_forward_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, T scale,
                             const at::Tensor& out, const at::Tensor& lse) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dq = q.size(3);
  const int64_t key_positions = k.size(2), dv = v.size(3);
  const int64_t query_blocks = (positions + kQueryBlock - 1) / kQueryBlock;
  const HeadRows<T> queries(q), keys(k), values(v), outputs(out);
  T* lse_data = lse.data_ptr<T>();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, batch * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    const auto scores = scratch<T>(kQueryBlock * kKeyBlock), acc = scratch<T>(kQueryBlock * dv),
               key_columns = scratch<T>(dq * kKeyBlock);
    const auto row_max = scratch<T>(kQueryBlock), row_sum = scratch<T>(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nh = task / query_blocks, n = nh / heads, h = nh % heads;
      const int64_t first = (task % query_blocks) * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, positions - first);
      const T* query = queries.rows(n, h, first);
      std::fill_n(row_max.get(), kQueryBlock, kNegInf);
      std::fill_n(row_sum.get(), kQueryBlock, T(0));
      std::fill_n(acc.get(), kQueryBlock * dv, T(0));
      for (int64_t key_first = 0; key_first < key_positions; key_first += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, key_positions - key_first);
        transpose_rows(keys.rows(n, h, key_first), keys.row_stride, cols, dq, key_columns.get(),
                       kKeyBlock);
        block_product<T>(rows, cols, dq, scale, query, queries.row_stride, 1, key_columns.get(),
                         kKeyBlock, false, scores.get(), kKeyBlock);
        for (int64_t i = 0; i < rows; ++i) {
          T* s = scores.get() + i * kKeyBlock;
          const T block_max = row_max_of(s, cols);
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
            T* a = acc.get() + i * dv;
            for (int64_t c = 0; c < dv; ++c) a[c] *= correction;
          }
        }
        block_product<T>(rows, dv, cols, T(1), scores.get(), kKeyBlock, 1,
                         values.rows(n, h, key_first), values.row_stride, true, acc.get(), dv);
      }
      T* out_rows = outputs.rows(n, h, first);
      T* lse_rows = lse_data + nh * positions + first;
      for (int64_t i = 0; i < rows; ++i) {
        const T inverse = T(1) / row_sum[i];
        const T* a = acc.get() + i * dv;
        T* o = out_rows + i * outputs.row_stride;
        for (int64_t c = 0; c < dv; ++c) o[c] = a[c] * inverse;
        lse_rows[i] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
}

// The backward's correction term delta of a query row (grad_scores = p * (dp - delta)): the
// mean of dp = grad_out v^T under the row's probabilities p, sum_j p_j dp_j / sum_j p_j over
// every key, from the very p and dp it is subtracted from, summed in double. Flash attention's
// rowsum(grad_out * out) is the same quantity, but from the rounded output: where one key takes
// almost all of a row, dp_j - delta is a small difference of two nearly equal values, and only a
// delta made of the p and dp it corrects keeps that difference accurate (dividing by sum_j p_j
// also cancels the rounding of lse). Both backward paths below hold whole rows of p and dp.
//
// (sum_j p_j dp_j, sum_j p_j) over `cols` values, in double: element j goes to partial sum
// j % kLanes (a fused multiply-add for the first), and the partial sums are added in a fixed
// tree, so the order is the same on every CPU while the partial sums sit in vector registers.
template <typename T>
std::pair<double, double> weighted_sum(const T* p, const T* dp, int64_t cols) {
  constexpr int kLanes = 8;
  double weighted[kLanes] = {}, total[kLanes] = {};
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // Lanes 0-3 and 4-7 of the partial sums in two vectors each.
    __m256d weighted_low = _mm256_setzero_pd(), weighted_high = _mm256_setzero_pd();
    __m256d total_low = _mm256_setzero_pd(), total_high = _mm256_setzero_pd();
    for (; j + kLanes <= cols; j += kLanes) {
      const __m256 p8 = _mm256_loadu_ps(p + j), dp8 = _mm256_loadu_ps(dp + j);
      const __m256d p_low = _mm256_cvtps_pd(_mm256_castps256_ps128(p8));
      const __m256d p_high = _mm256_cvtps_pd(_mm256_extractf128_ps(p8, 1));
      weighted_low =
          _mm256_fmadd_pd(p_low, _mm256_cvtps_pd(_mm256_castps256_ps128(dp8)), weighted_low);
      weighted_high =
          _mm256_fmadd_pd(p_high, _mm256_cvtps_pd(_mm256_extractf128_ps(dp8, 1)), weighted_high);
      total_low = _mm256_add_pd(total_low, p_low);
      total_high = _mm256_add_pd(total_high, p_high);
    }
    _mm256_storeu_pd(weighted, weighted_low);
    _mm256_storeu_pd(weighted + 4, weighted_high);
    _mm256_storeu_pd(total, total_low);
    _mm256_storeu_pd(total + 4, total_high);
  }
#endif
  for (; j + kLanes <= cols; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double probability = static_cast<double>(p[j + l]);
      weighted[l] = std::fma(probability, static_cast<double>(dp[j + l]), weighted[l]);
      total[l] += probability;
    }
  }
  for (int l = 0; j < cols; ++j, ++l) {
    const double probability = static_cast<double>(p[j]);
    weighted[l] = std::fma(probability, static_cast<double>(dp[j]), weighted[l]);
    total[l] += probability;
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      weighted[l] += weighted[l + width];
      total[l] += total[l + width];
    }
  }
  return {weighted[0], total[0]};
}

// grad_scores = p * (dp - delta) in place, for `rows` whole rows of `cols` keys (leading dim
// ld) of p and of dp (in grad_scores on entry), delta each row's correction term.
template <typename T>
void score_gradients(int64_t rows, int64_t cols, const T* probs, T* grad_scores, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    T* ds = grad_scores + i * ld;
    const T* p = probs + i * ld;
    const auto [weighted, total] = weighted_sum(p, ds, cols);
    // A row whose probabilities all vanish (scores of -inf) gets no gradient either way.
    const double delta = total == 0 ? 0.0 : weighted / total;
    for (int64_t j = 0; j < cols; ++j) {
      ds[j] = static_cast<T>(p[j] * (static_cast<double>(ds[j]) - delta));
    }
  }
}

// The blocks (or groups of blocks) of each of `batch_heads` (sample, head) pairs that one wave
// of a backward pass runs side by side, each with its own partial sum: enough tasks for every
// thread, at most `blocks`. The partials are added in block order whatever the wave, so the
// thread count sets the memory, not the result.
int64_t wave_size(int64_t batch_heads, int64_t blocks) {
  return std::clamp<int64_t>((at::get_num_threads() + batch_heads - 1) / batch_heads, 1, blocks);
}

// sum = part for the first of the partial sums, sum += part for the others.
void add_partial(const at::Tensor& sum, const at::Tensor& part, bool first) {
  if (first) {
    sum.copy_(part);
  } else {
    sum.add_(part);
  }
}

// The query rows of one task of single_block_backward_typed: kQueryBlock, or fewer where the
// (sample, head) pairs would have fewer than kMinSingleBlockTasks tasks between them (the
// backward runs a sample at a time). Depends on the shape only: the rows of a task set the
// order in which the key and value gradients are summed. A second task for a (sample, head)
// adds a partial sum of its key gradients, and of its value gradients where the kernel sums
// them (`with_values`): dq + dv values a key, as large as the sample's K and V together, for a
// gain in time that such small maps did not show. So only a partial of the key gradients alone
// (dq values a key) is worth a second task.
constexpr int64_t kMinSingleBlockTasks = 2;

int64_t single_block_query_rows(int64_t positions, int64_t batch_heads, bool with_values) {
  const int64_t query_blocks = (positions + kQueryBlock - 1) / kQueryBlock;
  const int64_t min_tasks = with_values ? 1 : kMinSingleBlockTasks;
  if (batch_heads * query_blocks >= min_tasks) return kQueryBlock;
  const int64_t blocks_per_pair = (min_tasks + batch_heads - 1) / batch_heads;
  const int64_t rows = (positions + blocks_per_pair - 1) / blocks_per_pair;
  return std::max<int64_t>(8, (rows + 7) / 8 * 8);
}

// Whether single_block_backward_typed gives each (sample, head) pair one task: every key in one
// block and every query row in one block of rows. Such a task reads all of its pair's q, k and
// v before it writes the pair's gradients, so the gradients may be written over them.
bool one_task_per_pair(int64_t positions, int64_t key_positions, int64_t batch_heads,
                       bool with_values) {
  return key_positions <= kKeyBlock &&
         single_block_query_rows(positions, batch_heads, with_values) >= positions;
}

// The backward where every key fits one block (at most kKeyBlock keys): a task takes a block of
// query rows against all keys, so it has whole rows of p and dp = grad_out v^T and computes the
// correction term (see weighted_sum) and grad_scores from one recomputation. Its query gradient
// rows are complete; its key and value gradients (the value gradient where grad_v is defined)
// are partial sums over its rows, added in query-block order. The blocks run in waves
// (wave_size): the first block of each (sample, head) writes the gradients themselves when it
// shares its wave with all the others, and the rest have a partial buffer per block of a wave.
// A task reads the keys and values into its own buffers first and writes its query gradient
// last (from its copy of the keys), after the key and value gradients, which read its query
// rows: where one_task_per_pair, the gradients may be the very views q, k and v.
template <typename T>
void single_block_backward_typed(const HeadsGradient<T>& grads, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                                 T scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                                 const at::Tensor& grad_v, const at::Tensor& workspace) {
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dq = q.size(3);
  const int64_t key_positions = k.size(2), dv = v.size(3), batch_heads = batch * heads;
  TORCH_INTERNAL_ASSERT(key_positions <= kKeyBlock);
  const bool with_values = grad_v.defined();
  const int64_t query_rows = single_block_query_rows(positions, batch_heads, with_values);
  const int64_t query_blocks = (positions + query_rows - 1) / query_rows;
  // (slots, N, H, Pk, dq [+ dv]): a block's key and value gradients side by side, as many
  // slots as fit the workspace.
  const int64_t widths = with_values ? dq + dv : dq;
  int64_t wave = wave_size(batch_heads, query_blocks);
  const int64_t fit = partials_that_fit(workspace, batch_heads * key_positions * widths);
  if (wave - (wave == query_blocks ? 1 : 0) > fit) wave = fit;
  const bool one_wave = wave == query_blocks;
  const int64_t slots = one_wave ? wave - 1 : wave;
  const at::Tensor partials =
      partial_buffer(workspace, {slots, batch, heads, key_positions, widths}, q.options());
  const HeadRows<T> queries(q), keys(k), values(v);
  const HeadRows<T> grad_queries(grad_q), grad_keys(grad_k);
  const HeadRows<T> grad_values(with_values ? grad_v : grad_k);  // unread without grad_v
  const T* lse_data = lse.const_data_ptr<T>();
  T* partial_data = partials.data_ptr<T>();

  for (int64_t wave_first = 0; wave_first < query_blocks; wave_first += wave) {
    const int64_t wave_blocks = std::min(wave, query_blocks - wave_first);
    at::parallel_for(0, batch_heads * wave_blocks, 1, [&](int64_t begin, int64_t end) {
      const auto probs = scratch<T>(kQueryBlock * kKeyBlock),
                 grad_scores = scratch<T>(kQueryBlock * kKeyBlock);
      const auto key_columns = scratch<T>(dq * kKeyBlock), key_rows = scratch<T>(kKeyBlock * dq),
                 value_columns = scratch<T>(dv * kKeyBlock),
                 grad_rows = scratch<T>(grads.formed() ? query_rows * dv : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t nh = task / wave_blocks, block = wave_first + task % wave_blocks;
        const int64_t n = nh / heads, h = nh % heads;
        const int64_t first = block * query_rows, rows = std::min(query_rows, positions - first);
        const T* key = keys.rows(n, h, 0);
        const T* query = queries.rows(n, h, first);
        const auto [grad, grad_stride] = grads.rows(n, h, first, rows, grad_rows.get());
        transpose_rows(key, keys.row_stride, key_positions, dq, key_columns.get(), kKeyBlock);
        for (int64_t j = 0; j < key_positions; ++j) {
          std::copy_n(key + j * keys.row_stride, dq, key_rows.get() + j * dq);
        }
        transpose_rows(values.rows(n, h, 0), values.row_stride, key_positions, dv,
                       value_columns.get(), kKeyBlock);
        recompute_probs<T>(rows, key_positions, dq, scale, query, queries.row_stride,
                           key_columns.get(), lse_data + nh * positions + first, probs.get());
        // dp = grad_out v^T into grad_scores, then the score gradients in place.
        block_product<T>(rows, key_positions, dv, T(1), grad, grad_stride, 1, value_columns.get(),
                         kKeyBlock, false, grad_scores.get(), kKeyBlock);
        score_gradients(rows, key_positions, probs.get(), grad_scores.get(), kKeyBlock);
        // grad_k (+)= scale * grad_scores^T q and grad_v (+)= p^T grad_out over these rows.
        T* grad_key = grad_keys.rows(n, h, 0);
        T* grad_value = grad_values.rows(n, h, 0);
        int64_t ld_key = grad_keys.row_stride, ld_value = grad_values.row_stride;
        if (block != 0 || !one_wave) {
          const int64_t slot = block - wave_first - (one_wave ? 1 : 0);
          grad_key = partial_data + (slot * batch_heads + nh) * key_positions * widths;
          grad_value = grad_key + dq;
          ld_key = ld_value = widths;
        }
        block_product<T>(key_positions, dq, rows, scale, grad_scores.get(), 1, kKeyBlock, query,
                         queries.row_stride, false, grad_key, ld_key);
        if (with_values) {
          block_product<T>(key_positions, dv, rows, T(1), probs.get(), 1, kKeyBlock, grad,
                           grad_stride, false, grad_value, ld_value);
        }
        // grad_q = scale * grad_scores k, whole rows.
        block_product<T>(rows, dq, key_positions, scale, grad_scores.get(), kKeyBlock, 1,
                         key_rows.get(), dq, false, grad_queries.rows(n, h, first),
                         grad_queries.row_stride);
      }
    });
    // The partial sums in block order.
    const int64_t first_slot_block = wave_first + (one_wave ? 1 : 0);
    for (int64_t block = first_slot_block; block < wave_first + wave_blocks; ++block) {
      const at::Tensor part = partials[block - first_slot_block];
      add_partial(grad_k, part.narrow(3, 0, dq), block == 0);
      if (with_values) add_partial(grad_v, part.narrow(3, dq, dv), block == 0);
    }
  }
}

// The query rows of one block of rows_pass_typed: as many as keep a block's rows of p and of
// grad_scores over every key within kRowBufferValues values each (512 KiB in float32; at least
// 8 rows, at most kQueryBlock). Every block sums its own key-gradient partial (and transposes
// the keys and values again where they do not fit kTransposedValues), so taller blocks cost
// less: at 1024 keys, with those transposes, 32, 64 and 128 rows took 480, 423 and 400 ms in
// the rows passes of the same 40 backwards.
constexpr int64_t kRowBufferValues = 4 * kQueryBlock * kKeyBlock;
// The most keys and values rows_pass_typed transposes once per task (4 MiB in float32).
constexpr int64_t kTransposedValues = int64_t{1} << 20;

int64_t rows_pass_rows(int64_t key_positions) {
  return std::clamp<int64_t>(kRowBufferValues / key_positions / 8 * 8, 8, kQueryBlock);
}

// The backward's first pass where the keys do not fit one block: a task takes a group of blocks
// of query rows of a (sample, head), each block against every key, so that it has whole rows of
// p and dp = grad_out v^T (computed a key block at a time into row buffers) and computes the
// correction term from them (see weighted_sum), then grad_scores, its rows of the query
// gradient, whole, and the key gradient summed over its rows, accumulated over the group's
// blocks in order. The groups run in waves (wave_size, or as many as have a partial buffer in
// the caller's workspace), each group's key gradient in a partial buffer, added to grad_k in
// group order. The value gradient, which needs p alone, is
// value_pass_typed's.
template <typename T>
void rows_pass_typed(const HeadsGradient<T>& grads, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, T scale, const at::Tensor& grad_q,
                     const at::Tensor& grad_k, const at::Tensor& workspace) {
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dq = q.size(3);
  const int64_t key_positions = k.size(2), dv = v.size(3), batch_heads = batch * heads;
  const int64_t query_rows = rows_pass_rows(key_positions);
  const int64_t query_blocks = (positions + query_rows - 1) / query_rows;
  const BlockGroups query_groups = group_blocks(query_blocks, batch_heads);
  const int64_t groups = query_groups.count, blocks_per_group = query_groups.blocks_per_group;
  const int64_t wave = std::min(wave_size(batch_heads, groups),
                                partials_that_fit(workspace, batch_heads * key_positions * dq));
  const at::Tensor partials =
      partial_buffer(workspace, {wave, batch, heads, key_positions, dq}, q.options());
  const HeadRows<T> queries(q), keys(k), values(v), grad_queries(grad_q);
  const T* lse_data = lse.const_data_ptr<T>();
  T* partial_data = partials.data_ptr<T>();
  const int64_t ld = key_positions;
  // The keys and values are transposed once per task for all its blocks where they fit
  // kTransposedValues, else a key block at a time for every block of rows.
  const bool transpose_once = (dq + dv) * key_positions <= kTransposedValues;
  const int64_t columns_ld = transpose_once ? key_positions : kKeyBlock;

  for (int64_t wave_first = 0; wave_first < groups; wave_first += wave) {
    const int64_t wave_groups = std::min(wave, groups - wave_first);
    at::parallel_for(0, batch_heads * wave_groups, 1, [&](int64_t begin, int64_t end) {
      const auto probs = scratch<T>(query_rows * ld), grad_scores = scratch<T>(query_rows * ld);
      const auto key_columns = scratch<T>(dq * columns_ld),
                 value_columns = scratch<T>(dv * columns_ld),
                 grad_rows = scratch<T>(grads.formed() ? query_rows * dv : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t nh = task / wave_groups, slot = task % wave_groups;
        const int64_t group = wave_first + slot, n = nh / heads, h = nh % heads;
        T* grad_key = partial_data + (slot * batch_heads + nh) * key_positions * dq;
        if (transpose_once) {
          transpose_rows(keys.rows(n, h, 0), keys.row_stride, key_positions, dq, key_columns.get(),
                         columns_ld);
          transpose_rows(values.rows(n, h, 0), values.row_stride, key_positions, dv,
                         value_columns.get(), columns_ld);
        }
        const int64_t block_end = std::min(query_blocks, (group + 1) * blocks_per_group);
        for (int64_t block = group * blocks_per_group; block < block_end; ++block) {
          const int64_t first = block * query_rows;
          const int64_t rows = std::min(query_rows, positions - first);
          const T* query = queries.rows(n, h, first);
          const auto [grad, grad_stride] = grads.rows(n, h, first, rows, grad_rows.get());
          for (int64_t key_first = 0; key_first < key_positions; key_first += kKeyBlock) {
            const int64_t cols = std::min(kKeyBlock, key_positions - key_first);
            const int64_t column = transpose_once ? key_first : 0;
            if (!transpose_once) {
              transpose_rows(keys.rows(n, h, key_first), keys.row_stride, cols, dq,
                             key_columns.get(), columns_ld);
              transpose_rows(values.rows(n, h, key_first), values.row_stride, cols, dv,
                             value_columns.get(), columns_ld);
            }
            recompute_probs<T>(rows, cols, dq, scale, query, queries.row_stride,
                               key_columns.get() + column, lse_data + nh * positions + first,
                               probs.get() + key_first, ld, columns_ld);
            block_product<T>(rows, cols, dv, T(1), grad, grad_stride, 1,
                             value_columns.get() + column, columns_ld, false,
                             grad_scores.get() + key_first, ld);
          }
          score_gradients(rows, key_positions, probs.get(), grad_scores.get(), ld);
          // grad_q = scale * grad_scores k, whole rows; grad_k (+)= scale * grad_scores^T q.
          block_product<T>(rows, dq, key_positions, scale, grad_scores.get(), ld, 1,
                           keys.rows(n, h, 0), keys.row_stride, false,
                           grad_queries.rows(n, h, first), grad_queries.row_stride);
          block_product<T>(key_positions, dq, rows, scale, grad_scores.get(), 1, ld, query,
                           queries.row_stride, block != group * blocks_per_group, grad_key, dq);
        }
      }
    });
    for (int64_t slot = 0; slot < wave_groups; ++slot) {
      add_partial(grad_k, partials[slot], wave_first + slot == 0);
    }
  }
}

// The key blocks of the probability sums' tasks: a task per group of key blocks of a (sample,
// head).
struct SumsBlocks {
  int64_t key_block, key_blocks;
  BlockGroups groups;
};

SumsBlocks sums_blocks(int64_t key_positions, int64_t batch_heads,
                       int64_t max_groups = std::numeric_limits<int64_t>::max()) {
  const int64_t key_block = backward_key_block(key_positions, batch_heads);
  const int64_t key_blocks = (key_positions + key_block - 1) / key_block;
  return {key_block, key_blocks, group_blocks(key_blocks, batch_heads, max_groups)};
}

// sums (N, H, Pk, w) = p^T rows for rows (N, H, P, w): the value gradient (rows: grad_out), the
// backward's second pass where the keys do not fit one block, or T = p^T grad_y
// (value_gradients_through_sums_typed). A task per group of key blocks of a (sample, head),
// each summing over every query block in order into its own rows of sums. p is recomputed once
// more (dq multiply-adds and an exponential per pair): summing grad_v in the rows pass instead
// would take a partial buffer of dv values per key for every group of a wave. Rows stored by
// columns (a unit stride between rows: the tokens of a channels-first map) are read a query block
// at a time through a transposing copy, rather than copied whole by the caller. Where `sums` is
// undefined, a key block's sums are formed in the task's buffer instead and handed, complete, to
// finish(n, h, task, first_of_group, key_first, cols, block_sums, ld), task = (n * H + h) *
// groups + group.
template <typename T, typename Finish>
void probability_sums_blocks(const at::Tensor& rows, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& lse, T scale, const SumsBlocks& blocks,
                             const at::Tensor& sums, const Finish& finish) {
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dq = q.size(3);
  const int64_t key_positions = k.size(2), width = rows.size(3), batch_heads = batch * heads;
  const int64_t key_block = blocks.key_block, key_blocks = blocks.key_blocks;
  const int64_t groups = blocks.groups.count, blocks_per_group = blocks.groups.blocks_per_group;
  const bool rows_by_columns = width > 1 && rows.stride(3) != 1;
  TORCH_INTERNAL_ASSERT(!rows_by_columns || rows.stride(2) == 1);
  const int64_t column_stride = rows.stride(3);
  const HeadRows<T> queries(q), keys(k), row_data(rows);
  const HeadRows<T> sum_rows = sums.defined() ? HeadRows<T>(sums) : HeadRows<T>();
  const T* lse_data = lse.const_data_ptr<T>();
  at::parallel_for(0, batch_heads * groups, 1, [&](int64_t begin, int64_t end) {
    const auto probs = scratch<T>(kQueryBlock * kKeyBlock);
    const auto key_columns = scratch<T>(dq * kKeyBlock);
    const auto row_block = scratch<T>(rows_by_columns ? kQueryBlock * width : 0);
    const auto block_sums = scratch<T>(sums.defined() ? 0 : key_block * width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nh = task / groups, group = task % groups, n = nh / heads, h = nh % heads;
      const int64_t block_end = std::min(key_blocks, (group + 1) * blocks_per_group);
      for (int64_t block = group * blocks_per_group; block < block_end; ++block) {
        const int64_t key_first = block * key_block;
        const int64_t cols = std::min(key_block, key_positions - key_first);
        T* target = sums.defined() ? sum_rows.rows(n, h, key_first) : block_sums.get();
        const int64_t target_ld = sums.defined() ? sum_rows.row_stride : width;
        transpose_rows(keys.rows(n, h, key_first), keys.row_stride, cols, dq, key_columns.get(),
                       kKeyBlock);
        for (int64_t first = 0; first < positions; first += kQueryBlock) {
          const int64_t query_rows = std::min(kQueryBlock, positions - first);
          recompute_probs<T>(query_rows, cols, dq, scale, queries.rows(n, h, first),
                             queries.row_stride, key_columns.get(),
                             lse_data + nh * positions + first, probs.get());
          const T* block_rows = row_data.rows(n, h, first);
          int64_t block_row_stride = row_data.row_stride;
          if (rows_by_columns) {
            transpose_rows(block_rows, column_stride, width, query_rows, row_block.get(), width);
            block_rows = row_block.get();
            block_row_stride = width;
          }
          block_product<T>(cols, width, query_rows, T(1), probs.get(), 1, kKeyBlock, block_rows,
                           block_row_stride, first != 0, target, target_ld);
        }
        if (!sums.defined()) {
          finish(n, h, task, block == group * blocks_per_group, key_first, cols,
                 static_cast<const T*>(target), target_ld);
        }
      }
    }
  });
}

template <typename T>
void probability_sums_typed(const at::Tensor& rows, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& lse, T scale, const at::Tensor& sums) {
  probability_sums_blocks<T>(rows, q, k, lse, scale, sums_blocks(k.size(2), q.size(0) * q.size(1)),
                             sums, [](auto&&...) {});
}

// T's way (see sums_through_grad_y in self_attention_impl.cpp) with T = p^T grad_y never whole:
// each key block's sums T_b (cols x C), complete, give G's part T_b^T v_b (C x dv, summed over a
// group's blocks in order into the group's partial) and the value gradient gamma T_b
// out_weight_h, written once the block's values are read (grad_v may be v itself: no other task
// reads those rows). G (C, H dv) = the partials added in order of sample and group, for each
// head. The groups are as many as leave a partial for each in the workspace: the split depends
// on the shape only.
template <typename T>
at::Tensor value_gradients_through_sums_typed(const at::Tensor& grad_tokens,
                                              const at::Tensor& out_weight, T gamma,
                                              const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& lse, T scale,
                                              const at::Tensor& grad_v,
                                              const at::Tensor& workspace) {
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), dv = v.size(3);
  const int64_t channels = grad_tokens.size(2), batch_heads = batch * heads;
  const SumsBlocks blocks = sums_blocks(k.size(2), batch_heads,
                                        partials_that_fit(workspace, batch_heads * channels * dv));
  const int64_t groups = blocks.groups.count;
  const at::Tensor partials =
      partial_buffer(workspace, {batch, heads, groups, channels, dv}, q.options());
  T* partial_data = partials.data_ptr<T>();
  const HeadRows<T> values(v), grad_values(grad_v);
  const T* weight = out_weight.const_data_ptr<T>();
  const int64_t weight_ld = out_weight.stride(0);
  const auto finish = [&](int64_t n, int64_t h, int64_t task, bool first_of_group,
                          int64_t key_first, int64_t cols, const T* block_sums, int64_t ld) {
    block_product<T>(channels, dv, cols, T(1), block_sums, 1, ld, values.rows(n, h, key_first),
                     values.row_stride, !first_of_group, partial_data + task * channels * dv, dv);
    block_product<T>(cols, dv, channels, gamma, block_sums, ld, 1, weight + h * dv, weight_ld,
                     false, grad_values.rows(n, h, key_first), grad_values.row_stride);
  };
  const at::Tensor rows = grad_tokens.unsqueeze(1).expand({batch, heads, positions, channels});
  probability_sums_blocks<T>(rows, q, k, lse, scale, blocks, at::Tensor(), finish);
  const at::Tensor product = at::empty({channels, heads * dv}, q.options());
  for (int64_t h = 0; h < heads; ++h) {
    const at::Tensor head_product = product.narrow(1, h * dv, dv);
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t group = 0; group < groups; ++group) {
        add_partial(head_product, partials[n][h][group], n == 0 && group == 0);
      }
    }
  }
  return product;
}

at::ScalarType accumulation_type(const at::Tensor& t) { return at::toOpMathType(t.scalar_type()); }

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
    attention_forward_typed<scalar_t>(q.to(acc), k.to(acc), v.to(acc), static_cast<scalar_t>(scale),
                                      out, lse);
  });
  return {out.to(q.scalar_type()), lse};
}

// float32 and float64 results are written in place; half ones in float32 first, then copied.
at::Tensor accumulator(const at::Tensor& result, at::ScalarType acc) {
  return acc == result.scalar_type() ? result.zero_()
                                     : at::zeros(result.sizes(), result.options().dtype(acc));
}

void copy_from_accumulator(const at::Tensor& result, const at::Tensor& acc_result) {
  if (!result.is_same(acc_result)) result.copy_(acc_result);
}

void attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                            double scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                            const at::Tensor& grad_v) {
  const auto acc = accumulation_type(q);
  const at::Tensor grad_acc = grad_out.to(acc);
  // The gradients may be q, k and v themselves (SelfAttentionBackend). Half ones are read
  // from float32 copies anyway; where a (sample, head) takes one task of the single-block
  // kernel, that task reads its inputs before it writes over them; elsewhere the inputs are
  // copied first.
  const bool gradients_over_inputs = grad_q.data_ptr() == q.data_ptr();
  TORCH_INTERNAL_ASSERT(gradients_over_inputs == (grad_k.data_ptr() == k.data_ptr()) &&
                        gradients_over_inputs == (grad_v.data_ptr() == v.data_ptr()));
  const bool overwrites_read_inputs = gradients_over_inputs && acc == q.scalar_type();
  const bool reads_before_writes =
      one_task_per_pair(q.size(2), k.size(2), q.size(0) * q.size(1), /*with_values=*/true);
  const auto input = [&](const at::Tensor& t) {
    return overwrites_read_inputs && !reads_before_writes ? t.clone() : t.to(acc);
  };
  const at::Tensor q_acc = input(q), k_acc = input(k), v_acc = input(v);
  // The single-block kernel writes every element of the gradients (no zeros needed).
  const auto gradient = [&](const at::Tensor& t) {
    return overwrites_read_inputs && reads_before_writes ? t : accumulator(t, acc);
  };
  const at::Tensor grad_q_acc = gradient(grad_q), grad_k_acc = gradient(grad_k),
                   grad_v_acc = gradient(grad_v);
  // out is not read: the correction term is recomputed from the very p and dp it corrects
  // (see weighted_sum).
  (void)out;
  const at::Tensor lse_acc = lse.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "self_attention_backward_cpu", [&] {
    const auto scale_value = static_cast<scalar_t>(scale);
    const HeadsGradient<scalar_t> grads(grad_acc);
    if (k.size(2) <= kKeyBlock) {
      single_block_backward_typed<scalar_t>(grads, q_acc, k_acc, v_acc, lse_acc, scale_value,
                                            grad_q_acc, grad_k_acc, grad_v_acc, at::Tensor());
      return;
    }
    rows_pass_typed<scalar_t>(grads, q_acc, k_acc, v_acc, lse_acc, scale_value, grad_q_acc,
                              grad_k_acc, at::Tensor());
    probability_sums_typed<scalar_t>(grad_acc, q_acc, k_acc, lse_acc, scale_value, grad_v_acc);
  });
  copy_from_accumulator(grad_q, grad_q_acc);
  copy_from_accumulator(grad_k, grad_k_acc);
  copy_from_accumulator(grad_v, grad_v_acc);
}

// T's way takes float32 and float64 only (half dtypes take the heads' way: see
// self_attention_impl.cpp), so these read and write their tensors in place.
void query_key_gradients_cpu(const at::Tensor& grad_tokens, const at::Tensor& out_weight,
                             double gamma, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& lse, double scale,
                             const at::Tensor& grad_q, const at::Tensor& grad_k,
                             const at::Tensor& workspace) {
  TORCH_INTERNAL_ASSERT(accumulation_type(q) == q.scalar_type());
  const at::Tensor lse_acc = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "self_attention_query_key_gradients_cpu", [&] {
    const HeadsGradient<scalar_t> grads(grad_tokens, out_weight, static_cast<scalar_t>(gamma),
                                        v.size(3));
    const auto scale_value = static_cast<scalar_t>(scale);
    if (k.size(2) <= kKeyBlock) {
      single_block_backward_typed<scalar_t>(grads, q, k, v, lse_acc, scale_value, grad_q, grad_k,
                                            at::Tensor(), workspace);
    } else {
      rows_pass_typed<scalar_t>(grads, q, k, v, lse_acc, scale_value, grad_q, grad_k, workspace);
    }
  });
}

at::Tensor value_gradients_through_sums_cpu(const at::Tensor& grad_tokens,
                                            const at::Tensor& out_weight, double gamma,
                                            const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& lse,
                                            double scale, const at::Tensor& grad_v,
                                            const at::Tensor& workspace) {
  TORCH_INTERNAL_ASSERT(accumulation_type(q) == q.scalar_type());
  const at::Tensor lse_acc = lse.contiguous();
  at::Tensor product;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "self_attention_value_gradients_cpu", [&] {
    product = value_gradients_through_sums_typed<scalar_t>(
        grad_tokens, out_weight, static_cast<scalar_t>(gamma), q, k, v, lse_acc,
        static_cast<scalar_t>(scale), grad_v, workspace);
  });
  return product;
}

// Rows (positions of all samples) per partial sum of position_sum_product_cpu.
constexpr int64_t kPositionChunk = 1024;

// The sum over samples and positions is cut into chunks of rows whose size depends on the
// shape alone; each chunk's product is a task, and the partials are added in chunk order, so
// the result is the same for every thread count. Samples of fewer than kPositionChunk
// positions have their rows stacked (a copy where they do not follow each other in memory,
// positions-sized), so that a few positions of many samples make one product and one partial
// rather than a weight-sized partial per sample. One sample (or one stack) is one product
// over all its positions, written into (or added to) `out` itself, its tiles shared among the
// threads: no partials. Otherwise the chunks run in waves of one per thread, so that the
// partials held are as many as the threads, not the chunks. The worker threads get the
// caller's thread-local state (below autograd, grad mode), as at::launch does.
void position_sum_product_cpu(const at::Tensor& a_samples, const at::Tensor& b_samples,
                              const at::Tensor& out, bool accumulate) {
  const bool stack = a_samples.size(1) < kPositionChunk;
  const auto rows_of = [&](const at::Tensor& t) {
    return stack ? t.reshape({1, t.size(0) * t.size(1), t.size(2)}) : t;
  };
  const at::Tensor a = rows_of(a_samples), b = rows_of(b_samples);
  const int64_t batch = a.size(0), positions = a.size(1);
  if (batch == 1) {
    cpu::fixed_order_matmul(out, a.select(0, 0).t(), b.select(0, 0), accumulate);
    return;
  }
  const int64_t chunks_per_sample = (positions + kPositionChunk - 1) / kPositionChunk;
  const int64_t chunks = batch * chunks_per_sample;
  const auto chunk_product = [&](int64_t chunk, const at::Tensor& product) {
    const int64_t n = chunk / chunks_per_sample, first = chunk % chunks_per_sample * kPositionChunk;
    const int64_t length = std::min(kPositionChunk, positions - first);
    cpu::fixed_order_matmul(product, a.select(0, n).narrow(0, first, length).t(),
                            b.select(0, n).narrow(0, first, length), false);
  };
  const int64_t wave = std::clamp<int64_t>(at::get_num_threads(), 1, chunks);
  const at::Tensor partials = at::empty({wave, a.size(2), b.size(2)}, out.options());
  const at::ThreadLocalState caller;
  for (int64_t wave_first = 0; wave_first < chunks; wave_first += wave) {
    const int64_t wave_chunks = std::min(wave, chunks - wave_first);
    at::parallel_for(0, wave_chunks, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(caller);
      for (int64_t slot = begin; slot < end; ++slot) {
        chunk_product(wave_first + slot, partials.select(0, slot));
      }
    });
    for (int64_t slot = 0; slot < wave_chunks; ++slot) {
      add_partial(out, partials.select(0, slot), wave_first + slot == 0 && !accumulate);
    }
  }
}

constexpr SelfAttentionBackend kCpuBackend{attention_forward_cpu,
                                           attention_backward_cpu,
                                           query_key_gradients_cpu,
                                           value_gradients_through_sums_cpu,
                                           cpu::fixed_order_matmul,
                                           position_sum_product_cpu,
                                           /*attention_backward_reads_out=*/false,
                                           /*attention_backward_over_inputs=*/true};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) { register_self_attention_kernels<kCpuBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
