#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../self_attention_impl.h"

namespace cnn_attention {
namespace ops {

namespace {

// Attention goes to torch's memory-efficient kernel (CUTLASS, O(P) memory) wherever it
// applies: unlike flash attention it takes query/key heads narrower than value heads, the
// shape of the default module. It pads its softmax statistics to a multiple of 32 positions;
// we keep them (N, H, P) like every other backend and pad again for its backward.
constexpr int64_t kLseAlignment = 32;

bool memory_efficient_applies(const at::Tensor& q, const at::Tensor& v) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return false;
  // Its kernels read heads in 16-byte vectors; other widths go to ours.
  if (q.size(-1) % 8 != 0 || v.size(-1) % 8 != 0) return false;
  if (dtype == at::kBFloat16 && at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  // Its grid puts the heads in gridDim.y (at most 65535). torch launches more than 65535
  // samples (gridDim.z) in chunks, but not every version splits the heads: ours take those.
  if (q.size(1) > 65535) return false;
  // Respect torch.backends.cuda.enable_mem_efficient_sdp(False).
  return at::globalContext().userEnabledMemEfficientSDP();
}

// Everything else (float64, odd head widths): an online-softmax kernel of ours, one thread
// per query row for the forward and the query gradient, one per key row for the key and
// value gradients, so that no two threads add to the same value (no atomics, deterministic).
// Per-row accumulators live in global scratch laid out (d, rows) so that a warp's accesses
// are coalesced. It is a fallback for what the fused kernel does not take, not a fast path.
constexpr int kThreads = 128;

struct HeadStrides {
  int64_t batch, head, row;
};

HeadStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_of(const scalar_t* data, HeadStrides s, int64_t n,
                                                  int64_t h, int64_t i) {
  return data + n * s.batch + h * s.head + i * s.row;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot(const scalar_t* a, const scalar_t* b, int64_t size) {
  acc_t total = 0;
  for (int64_t c = 0; c < size; ++c) total += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return total;
}

// Sizes of one call: (N, H) pairs, P query rows, Pk key rows, head widths dq and dv.
struct Extent {
  int64_t batch, heads, positions, key_positions, dq, dv;
};

// The sample n, head h and row i of thread `row` of a grid with one thread per row of
// `positions` rows per (sample, head).
struct RowIndex {
  int64_t n, h, i;
};

__device__ __forceinline__ RowIndex row_index(int64_t row, int64_t positions, int64_t heads) {
  return {row / (positions * heads), row / positions % heads, row % positions};
}

template <typename scalar_t, typename acc_t>
__global__ void attention_forward_kernel(const scalar_t* __restrict__ q, HeadStrides qs,
                                         const scalar_t* __restrict__ k, HeadStrides ks,
                                         const scalar_t* __restrict__ v, HeadStrides vs,
                                         acc_t* __restrict__ acc, scalar_t* __restrict__ out,
                                         acc_t* __restrict__ lse, Extent e, acc_t scale) {
  const int64_t rows = e.batch * e.heads * e.positions;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const auto [n, h, i] = row_index(row, e.positions, e.heads);
  const scalar_t* query = row_of(q, qs, n, h, i);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t running_max = kNegInf, running_sum = 0;
  for (int64_t c = 0; c < e.dv; ++c) acc[c * rows + row] = 0;
  for (int64_t j = 0; j < e.key_positions; ++j) {
    const acc_t s = dot<scalar_t, acc_t>(query, row_of(k, ks, n, h, j), e.dq) * scale;
    // The maximum propagates NaN, as the softmax of a row with a NaN is NaN.
    const acc_t new_max = (s > running_max || s != s) && running_max == running_max ? s : running_max;
    const acc_t shift = new_max == kNegInf ? acc_t(0) : new_max;
    const acc_t correction = exp(running_max - shift), p = exp(s - shift);
    running_sum = running_sum * correction + p;
    const scalar_t* value = row_of(v, vs, n, h, j);
    for (int64_t c = 0; c < e.dv; ++c) {
      acc[c * rows + row] = acc[c * rows + row] * correction + p * static_cast<acc_t>(value[c]);
    }
    running_max = new_max;
  }
  // out is (N, P, H, dv) dense: the heads token-major.
  scalar_t* out_row = out + ((n * e.positions + i) * e.heads + h) * e.dv;
  for (int64_t c = 0; c < e.dv; ++c) {
    out_row[c] = static_cast<scalar_t>(acc[c * rows + row] / running_sum);
  }
  lse[row] = running_max + log(running_sum);
}

// The softmax probability of (query i, key j), recomputed from the row's lse, and the
// gradient of its score, p * (dp - delta) with dp = grad_out . v, subtracted in double: where
// one key takes almost all of a row, dp and delta nearly cancel.
template <typename acc_t>
struct ScoreGradient {
  acc_t prob, grad_score;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t recomputed_prob(const scalar_t* query, const scalar_t* key,
                                                 acc_t lse, const Extent& e, acc_t scale) {
  return exp(dot<scalar_t, acc_t>(query, key, e.dq) * scale - lse);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ ScoreGradient<acc_t> score_gradient(
    const scalar_t* query, const scalar_t* key, const scalar_t* grad, const scalar_t* value,
    acc_t lse, double delta, const Extent& e, acc_t scale) {
  const acc_t p = recomputed_prob<scalar_t, acc_t>(query, key, lse, e, scale);
  const double grad_prob = static_cast<double>(dot<scalar_t, acc_t>(grad, value, e.dv));
  return {p, static_cast<acc_t>(static_cast<double>(p) * (grad_prob - delta))};
}

// One thread per query row: first the row's softmax correction delta, as the CPU backend
// defines it (the mean of dp = grad_out . v under the recomputed probabilities p,
// sum_j p_j dp_j / sum_j p_j, in double; rowsum(grad_out * out) is the same quantity but from
// the rounded output, and the difference dp - delta it feeds is small where one key
// dominates; dividing by sum_j p_j also cancels the rounding of lse), stored (N, H, P) for the
// key and value gradients; then the row's query gradient.
template <typename scalar_t, typename acc_t>
__global__ void attention_grad_query_kernel(const scalar_t* __restrict__ grad_out, HeadStrides gs,
                                            const scalar_t* __restrict__ q, HeadStrides qs,
                                            const scalar_t* __restrict__ k, HeadStrides ks,
                                            const scalar_t* __restrict__ v, HeadStrides vs,
                                            const acc_t* __restrict__ lse,
                                            double* __restrict__ delta,
                                            acc_t* __restrict__ grad_q, Extent e, acc_t scale) {
  const int64_t rows = e.batch * e.heads * e.positions;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const auto [n, h, i] = row_index(row, e.positions, e.heads);
  const scalar_t* query = row_of(q, qs, n, h, i);
  const scalar_t* grad = row_of(grad_out, gs, n, h, i);
  double weighted = 0, total = 0;
  for (int64_t j = 0; j < e.key_positions; ++j) {
    const double p = recomputed_prob<scalar_t, acc_t>(query, row_of(k, ks, n, h, j), lse[row], e,
                                                      scale);
    weighted += p * static_cast<double>(dot<scalar_t, acc_t>(grad, row_of(v, vs, n, h, j), e.dv));
    total += p;
  }
  // A row whose probabilities all vanish (scores of -inf) gets no gradient either way.
  const double row_delta = total == 0 ? 0.0 : weighted / total;
  delta[row] = row_delta;
  for (int64_t c = 0; c < e.dq; ++c) grad_q[c * rows + row] = 0;
  for (int64_t j = 0; j < e.key_positions; ++j) {
    const scalar_t* key = row_of(k, ks, n, h, j);
    const auto sg = score_gradient<scalar_t, acc_t>(query, key, grad, row_of(v, vs, n, h, j),
                                                    lse[row], row_delta, e, scale);
    for (int64_t c = 0; c < e.dq; ++c) {
      grad_q[c * rows + row] += scale * sg.grad_score * static_cast<acc_t>(key[c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void attention_grad_key_value_kernel(
    const scalar_t* __restrict__ grad_out, HeadStrides gs, const scalar_t* __restrict__ q,
    HeadStrides qs, const scalar_t* __restrict__ k, HeadStrides ks, const scalar_t* __restrict__ v,
    HeadStrides vs, const acc_t* __restrict__ lse, const double* __restrict__ delta,
    acc_t* __restrict__ grad_k, acc_t* __restrict__ grad_v, Extent e, acc_t scale) {
  const int64_t rows = e.batch * e.heads * e.key_positions;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const auto [n, h, j] = row_index(row, e.key_positions, e.heads);
  const scalar_t* key = row_of(k, ks, n, h, j);
  const scalar_t* value = row_of(v, vs, n, h, j);
  for (int64_t c = 0; c < e.dq; ++c) grad_k[c * rows + row] = 0;
  for (int64_t c = 0; c < e.dv; ++c) grad_v[c * rows + row] = 0;
  const int64_t query_rows = (n * e.heads + h) * e.positions;
  for (int64_t i = 0; i < e.positions; ++i) {
    const scalar_t* query = row_of(q, qs, n, h, i);
    const scalar_t* grad = row_of(grad_out, gs, n, h, i);
    const auto sg = score_gradient<scalar_t, acc_t>(query, key, grad, value, lse[query_rows + i],
                                                    delta[query_rows + i], e, scale);
    for (int64_t c = 0; c < e.dv; ++c) {
      grad_v[c * rows + row] += sg.prob * static_cast<acc_t>(grad[c]);
    }
    for (int64_t c = 0; c < e.dq; ++c) {
      grad_k[c * rows + row] += scale * sg.grad_score * static_cast<acc_t>(query[c]);
    }
  }
}

Extent extent_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

// Blocks of one thread per row. Checked, not truncated: past 2^31 - 1 blocks the scratch alone
// (d values per row) would exceed any device's memory, so no grid-stride loop is needed.
unsigned blocks_for(int64_t rows) {
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "self_attention: too many query or key rows for one CUDA grid, got ", rows);
  return static_cast<unsigned>(blocks);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const Extent e = extent_of(q, k, v);
  if (memory_efficient_applies(q, v)) {
    auto [out, lse, seed, offset] = at::_scaled_dot_product_efficient_attention(
        q, k, v, std::nullopt, /*compute_log_sumexp=*/true, /*dropout_p=*/0.0,
        /*is_causal=*/false, scale);
    return {out, lse.narrow(2, 0, e.positions).contiguous()};
  }
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor out = at::empty({e.batch, e.positions, e.heads, e.dv}, q.options());
  at::Tensor lse = at::empty({e.batch, e.heads, e.positions}, q.options().dtype(acc));
  at::Tensor scratch = at::empty({e.dv, e.batch, e.heads, e.positions}, lse.options());
  const int64_t rows = e.batch * e.heads * e.positions;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "self_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    attention_forward_kernel<scalar_t, acc_t><<<blocks_for(rows), kThreads, 0, stream>>>(
        q.data_ptr<scalar_t>(), strides_of(q), k.data_ptr<scalar_t>(), strides_of(k),
        v.data_ptr<scalar_t>(), strides_of(v), scratch.data_ptr<acc_t>(),
        out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), e, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.transpose(1, 2), lse};
}

void attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, double scale, const at::Tensor& grad_q,
                             const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const Extent e = extent_of(q, k, v);
  if (memory_efficient_applies(q, v)) {
    const int64_t padded = (e.positions + kLseAlignment - 1) / kLseAlignment * kLseAlignment;
    const at::Tensor padded_lse = at::constant_pad_nd(lse, {0, padded - e.positions}, 0.0);
    // Without dropout the random state is not read; these are what the forward returns.
    const at::Tensor seed = at::empty({}, at::dtype(at::kLong));
    const at::Tensor offset = at::empty({}, at::dtype(at::kLong));
    auto [dq, dk, dv, grad_bias] = at::_scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, at::Tensor(), out, padded_lse, seed, offset, /*dropout_p=*/0.0,
        {true, true, true, false}, /*is_causal=*/false, scale);
    grad_q.copy_(dq);
    grad_k.copy_(dk);
    grad_v.copy_(dv);
    return;
  }
  const auto acc = at::toOpMathType(q.scalar_type());
  const at::Tensor lse_rows = lse.to(acc).contiguous();
  const at::Tensor delta =
      at::empty({e.batch, e.heads, e.positions}, lse_rows.options().dtype(at::kDouble));
  at::Tensor scratch_q = at::empty({e.dq, e.batch, e.heads, e.positions}, lse_rows.options());
  at::Tensor scratch_k = at::empty({e.dq, e.batch, e.heads, e.key_positions}, lse_rows.options());
  at::Tensor scratch_v = at::empty({e.dv, e.batch, e.heads, e.key_positions}, lse_rows.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "self_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = static_cast<acc_t>(scale);
    attention_grad_query_kernel<scalar_t, acc_t>
        <<<blocks_for(e.batch * e.heads * e.positions), kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), strides_of(grad_out), q.data_ptr<scalar_t>(),
            strides_of(q), k.data_ptr<scalar_t>(), strides_of(k), v.data_ptr<scalar_t>(),
            strides_of(v), lse_rows.data_ptr<acc_t>(), delta.data_ptr<double>(),
            scratch_q.data_ptr<acc_t>(), e, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    attention_grad_key_value_kernel<scalar_t, acc_t>
        <<<blocks_for(e.batch * e.heads * e.key_positions), kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), strides_of(grad_out), q.data_ptr<scalar_t>(),
            strides_of(q), k.data_ptr<scalar_t>(), strides_of(k), v.data_ptr<scalar_t>(),
            strides_of(v), lse_rows.data_ptr<acc_t>(), delta.data_ptr<double>(),
            scratch_k.data_ptr<acc_t>(), scratch_v.data_ptr<acc_t>(), e, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // (d, N, H, rows) scratch into the (N, H, rows, d) gradients.
  grad_q.copy_(scratch_q.permute({1, 2, 3, 0}));
  grad_k.copy_(scratch_k.permute({1, 2, 3, 0}));
  grad_v.copy_(scratch_v.permute({1, 2, 3, 0}));
}

// One product per sample, summed in sample order, in the accumulation dtype (a running half
// sum over thousands of positions would lose every small term).
void position_sum_product_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                               bool accumulate) {
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  for (int64_t n = 0; n < a.size(0); ++n) {
    // beta = 0 ignores what `out` held (NaN included).
    const int beta = n == 0 && !accumulate ? 0 : 1;
    out.addmm_(a.select(0, n).to(acc).t(), b.select(0, n).to(acc), beta);
  }
}

// Not T's way: the backward recomputes the heads and attention_backward always writes grad_v (it
// reads out).
constexpr SelfAttentionBackend kCudaBackend{attention_forward_cuda,
                                            attention_backward_cuda,
                                            /*query_key_gradients=*/nullptr,
                                            /*value_gradients_through_sums=*/nullptr,
                                            blas_matmul,
                                            position_sum_product_cuda,
                                            /*attention_backward_reads_out=*/true,
                                            /*attention_backward_over_inputs=*/false};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CUDA, m) { register_self_attention_kernels<kCudaBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
