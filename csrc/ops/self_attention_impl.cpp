#include "self_attention_impl.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace cnn_attention {
namespace ops {

namespace {

// x (dense in `layout`) as (N, P, C) tokens, a view: rows of channels for channels last,
// a transposed (column-major) matrix per sample for channels first; BLAS reads both.
at::Tensor tokens_of(const at::Tensor& x, Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  if (layout == Layout::ChannelsLast) {
    return x.permute(channels_last_order(x.dim())).reshape({batch, positions, channels});
  }
  return x.reshape({batch, channels, positions}).transpose(1, 2);
}

// Whether the samples of `a` (N, M, K) stack into one (N * M, K) row-major matrix.
bool rows_stack(const at::Tensor& a) {
  return a.stride(2) == 1 && (a.size(0) == 1 || a.stride(0) == a.size(1) * a.stride(1));
}

// out (N, M, L) = a (N, M, K) @ b (K, L) (+ bias (L,)): one product when the samples of `a`
// stack into a matrix, else one per sample, each reading `a` in place.
at::Tensor tokens_mm(const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias = std::nullopt) {
  const int64_t batch = a.size(0), rows = a.size(1), cols = b.size(1);
  if (rows_stack(a)) {
    const at::Tensor a2 = a.reshape({batch * rows, a.size(2)});
    const at::Tensor out = bias.has_value() ? at::addmm(*bias, a2, b) : at::mm(a2, b);
    return out.view({batch, rows, cols});
  }
  at::Tensor out = at::empty({batch, rows, cols}, a.options());
  for (int64_t n = 0; n < batch; ++n) {
    at::Tensor slice = out.select(0, n);
    if (bias.has_value()) {
      at::addmm_out(slice, *bias, a.select(0, n), b);
    } else {
      at::mm_out(slice, a.select(0, n), b);
    }
  }
  return out;
}

// tokens_outer on CPU: positions per partial sum, and per product within it.
constexpr int64_t kOuterChunk = 1024;
constexpr int64_t kOuterProduct = 128;

// sum over samples and positions of a[n]^T (K, M) @ b[n] (M, L): the weight gradient of a
// per-position linear map. On CPU, BLAS splits a long inner dimension among threads
// differently for different thread counts (a (1024, 24)^T (1024, 16) product differs in the
// last bits between 1 and 2 threads), so the sum is cut into fixed chunks of positions. Each
// chunk is a partial built from short products (an inner dimension of 128, which BLAS does
// not split, run on one thread inside the parallel region) added in order; the partials are
// then added in chunk order: the same bits for every thread count. The worker threads get
// the caller's thread-local state (below autograd, grad mode), as at::launch does.
// The sums accumulate in float32 at least: half inputs are widened product by product, and
// the result is in the accumulation dtype (a running half sum over thousands of positions
// would lose every small term).
at::Tensor tokens_outer(const at::Tensor& a, const at::Tensor& b) {
  const int64_t batch = a.size(0), positions = a.size(1);
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  const auto widened = [acc](const at::Tensor& t) { return t.to(acc); };
  if (!a.is_cpu()) {
    at::Tensor out = at::mm(widened(a.select(0, 0)).t(), widened(b.select(0, 0)));
    for (int64_t n = 1; n < batch; ++n) {
      out.addmm_(widened(a.select(0, n)).t(), widened(b.select(0, n)));
    }
    return out;
  }
  const int64_t chunks_per_sample = (positions + kOuterChunk - 1) / kOuterChunk;
  const at::Tensor partials =
      at::empty({batch * chunks_per_sample, a.size(2), b.size(2)}, a.options().dtype(acc));
  const at::ThreadLocalState caller;
  at::parallel_for(0, batch * chunks_per_sample, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n = chunk / chunks_per_sample;
      const int64_t chunk_end = std::min(positions, (chunk % chunks_per_sample + 1) * kOuterChunk);
      at::Tensor partial = partials.select(0, chunk);
      for (int64_t first = chunk % chunks_per_sample * kOuterChunk; first < chunk_end;
           first += kOuterProduct) {
        const int64_t length = std::min(kOuterProduct, chunk_end - first);
        const at::Tensor lhs = widened(a.select(0, n).narrow(0, first, length)).t();
        const at::Tensor rhs = widened(b.select(0, n).narrow(0, first, length));
        if (first % kOuterChunk == 0) {
          at::mm_out(partial, lhs, rhs);
        } else {
          partial.addmm_(lhs, rhs);
        }
      }
    }
  });
  at::Tensor out = partials.select(0, 0).clone();
  for (int64_t chunk = 1; chunk < batch * chunks_per_sample; ++chunk) {
    out.add_(partials.select(0, chunk));
  }
  return out;
}

struct Geometry {
  int64_t batch, channels, positions, key_positions;
  std::vector<int64_t> spatial, pooled;
  Layout layout;
  SelfAttentionSizes sizes;
};

Geometry geometry_of(const at::Tensor& x, const SelfAttentionSizes& sizes) {
  Geometry g{x.size(0), x.size(1), num_positions(x), 1, {}, {}, choose_layout(x), sizes};
  for (int64_t d = 2; d < x.dim(); ++d) {
    g.spatial.push_back(x.size(d));
    g.pooled.push_back(x.size(d) / sizes.kv_stride);
    g.key_positions *= g.pooled.back();
  }
  return g;
}

// The projection qkv (N, P, R) and the keys and values after pooling: kv (N, Pk, qk + v)
// (a view of qkv when kv_stride == 1) and the pooling's flat spatial indices, laid out
// (N, qk + v, *S') (undefined when kv_stride == 1).
struct Projection {
  at::Tensor qkv, kv, kv_indices;
};

Projection project(const at::Tensor& x_tokens, const at::Tensor& qkv_weight,
                   const std::optional<at::Tensor>& qkv_bias, const Geometry& g) {
  Projection p;
  p.qkv = tokens_mm(x_tokens, qkv_weight.t(), qkv_bias);
  const int64_t qk = g.sizes.qk_dim, kv_columns = g.sizes.qk_dim + g.sizes.v_dim;
  const at::Tensor kv = p.qkv.narrow(2, qk, kv_columns);
  if (g.sizes.kv_stride == 1) {
    p.kv = kv;
    return p;
  }
  // (N, qk + v, *S): the key and value columns as feature maps, channels-last strides.
  std::vector<int64_t> sizes{g.batch};
  sizes.insert(sizes.end(), g.spatial.begin(), g.spatial.end());
  sizes.push_back(kv_columns);
  std::vector<int64_t> to_maps{0, static_cast<int64_t>(sizes.size()) - 1};
  for (size_t d = 0; d < g.spatial.size(); ++d) to_maps.push_back(static_cast<int64_t>(d) + 1);
  const at::Tensor maps = kv.view(sizes).permute(to_maps);
  const int64_t s = g.sizes.kv_stride;
  at::Tensor pooled;
  switch (g.spatial.size()) {
    case 1:
      std::tie(pooled, p.kv_indices) = at::max_pool1d_with_indices(maps, {s}, {s});
      break;
    case 2:
      std::tie(pooled, p.kv_indices) = at::max_pool2d_with_indices(maps, {s, s}, {s, s});
      break;
    default:
      std::tie(pooled, p.kv_indices) = at::max_pool3d_with_indices(maps, {s, s, s}, {s, s, s});
  }
  p.kv = pooled.permute(channels_last_order(pooled.dim()))
             .reshape({g.batch, g.key_positions, kv_columns});
  return p;
}

// (N, rows, H, d) columns [first, first + H * d) of a token-major (N, rows, R) tensor as
// per-head (N, H, rows, d) views.
at::Tensor heads_of(const at::Tensor& tokens, int64_t first, int64_t heads, int64_t head_dim) {
  return tokens.narrow(2, first, heads * head_dim)
      .view({tokens.size(0), tokens.size(1), heads, head_dim})
      .transpose(1, 2);
}

double softmax_scale(const SelfAttentionSizes& sizes) {
  return 1.0 / std::sqrt(static_cast<double>(sizes.qk_head_dim()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> self_attention_forward(
    const at::Tensor& x, const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
    const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
    const SelfAttentionKernels& kernels) {
  const SelfAttentionSizes sizes = check_self_attention_args(
      x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads, kv_stride);
  const Geometry g = geometry_of(x, sizes);
  if (g.batch == 0 || g.positions == 0) {
    return {self_attention_output_like(x), self_attention_attn_like(x, sizes),
            self_attention_lse_like(x, sizes)};
  }
  const at::Tensor x_dense = to_layout(x, g.layout);
  Projection p = project(tokens_of(x_dense, g.layout), qkv_weight, qkv_bias, g);
  const int64_t heads = sizes.num_heads, dq = sizes.qk_head_dim(), dv = sizes.v_head_dim();
  auto [heads_out, lse] =
      kernels.attention_forward(heads_of(p.qkv, 0, heads, dq), heads_of(p.kv, 0, heads, dq),
                                heads_of(p.kv, sizes.qk_dim, heads, dv), softmax_scale(sizes));
  p = Projection();  // memory: q, k and v are not needed once y is being written
  // (N, P, v): a view when the kernel wrote the heads token-major, as ours do.
  const at::Tensor attn = heads_out.transpose(1, 2).reshape({g.batch, g.positions, sizes.v_dim});

  // out = attn @ out_weight^T + out_bias, written straight into y in the layout of x, then
  // y = x + gamma * out in place.
  at::Tensor y = self_attention_output_like(x);
  if (g.layout == Layout::ChannelsLast) {
    at::Tensor rows = tokens_of(y, g.layout).view({g.batch * g.positions, g.channels});
    const at::Tensor attn_rows = attn.view({g.batch * g.positions, sizes.v_dim});
    if (out_bias.has_value()) {
      at::addmm_out(rows, *out_bias, attn_rows, out_weight.t());
    } else {
      at::mm_out(rows, attn_rows, out_weight.t());
    }
  } else {
    const at::Tensor columns = y.view({g.batch, g.channels, g.positions});
    const std::optional<at::Tensor> bias_column =
        out_bias.has_value() ? std::optional<at::Tensor>(out_bias->unsqueeze(1)) : std::nullopt;
    for (int64_t n = 0; n < g.batch; ++n) {
      at::Tensor slice = columns.select(0, n);
      if (bias_column.has_value()) {
        at::addmm_out(slice, *bias_column, out_weight, attn.select(0, n).t());
      } else {
        at::mm_out(slice, out_weight, attn.select(0, n).t());
      }
    }
  }
  at::addcmul_out(y, x_dense, gamma.reshape({}), y);
  return {y, attn, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
self_attention_backward(const at::Tensor& grad_y, const at::Tensor& x,
                        const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                        const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                        const at::Tensor& gamma, const at::Tensor& attn, const at::Tensor& lse,
                        int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
                        const SelfAttentionKernels& kernels) {
  const SelfAttentionSizes sizes =
      check_self_attention_backward_args(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias,
                                         gamma, attn, lse, qk_dim, num_heads, kv_stride);
  const Geometry g = geometry_of(x, sizes);
  const int64_t rows = qkv_weight.size(0);
  if (g.batch == 0 || g.positions == 0) {
    return {self_attention_output_like(x).zero_(), at::zeros_like(qkv_weight),
            at::zeros({rows}, x.options()),        at::zeros_like(out_weight),
            at::zeros({g.channels}, x.options()),  at::zeros_like(gamma)};
  }
  const at::Tensor x_tokens = tokens_of(to_layout(x, g.layout), g.layout);
  const at::Tensor grad_dense = to_layout(grad_y, g.layout);
  const at::Tensor grad_tokens = tokens_of(grad_dense, g.layout);
  const at::Tensor attn_dense = attn.contiguous();

  // Output projection and residual. With G = sum over positions of grad^T attn (C, v), the
  // weight gradient is gamma * G, and gamma's, sum(grad * out), is sum(G * out_weight) +
  // sum(grad) . out_bias: nothing as large as the feature map is needed for either.
  const at::Tensor gamma_value = gamma.reshape({});
  const at::Tensor grad_sum = grad_tokens.sum(at::IntArrayRef{0, 1});  // (C,)
  const at::Tensor grad_out_product = tokens_outer(grad_tokens, attn_dense);
  at::Tensor grad_gamma = at::mul(grad_out_product, out_weight).sum();
  if (out_bias.has_value()) grad_gamma = grad_gamma + at::mul(grad_sum, *out_bias).sum();
  const at::Tensor grad_out_weight = grad_out_product * gamma_value;
  const at::Tensor grad_out_bias = grad_sum * gamma_value;
  at::Tensor grad_attn = tokens_mm(grad_tokens, out_weight).mul_(gamma_value);

  // Attention, its gradients written straight into that of the projection, grad_qkv (N, P,
  // R). Pooled keys and values get theirs in a buffer first, then sent back to the positions
  // that won their windows (the windows do not overlap, so every position gets at most one
  // value: a deterministic scatter).
  Projection p = project(x_tokens, qkv_weight, qkv_bias, g);
  const int64_t heads = sizes.num_heads, dq = sizes.qk_head_dim(), dv = sizes.v_head_dim();
  const int64_t kv_columns = sizes.qk_dim + sizes.v_dim;
  at::Tensor grad_qkv = at::empty({g.batch, g.positions, rows}, x.options());
  const at::Tensor grad_kv =
      sizes.kv_stride == 1 ? grad_qkv.narrow(2, sizes.qk_dim, kv_columns)
                           : at::empty({g.batch, g.key_positions, kv_columns}, x.options());
  kernels.attention_backward(
      heads_of(grad_attn, 0, heads, dv), heads_of(p.qkv, 0, heads, dq),
      heads_of(p.kv, 0, heads, dq), heads_of(p.kv, sizes.qk_dim, heads, dv),
      heads_of(attn_dense, 0, heads, dv), lse.contiguous(), softmax_scale(sizes),
      heads_of(grad_qkv, 0, heads, dq), heads_of(grad_kv, 0, heads, dq),
      heads_of(grad_kv, sizes.qk_dim, heads, dv));
  grad_attn.reset();  // memory: free what is no longer needed before the last products
  if (sizes.kv_stride > 1) {
    const at::Tensor index = p.kv_indices.permute(channels_last_order(p.kv_indices.dim()))
                                 .reshape({g.batch, g.key_positions, kv_columns});
    grad_qkv.narrow(2, sizes.qk_dim, kv_columns).zero_().scatter_(1, index, grad_kv);
  }
  p = Projection();
  const at::Tensor grad_qkv_weight = tokens_outer(grad_qkv, x_tokens);
  const at::Tensor grad_qkv_bias = grad_qkv.sum(at::IntArrayRef{0, 1});

  // grad_x = grad_y + grad_qkv @ qkv_weight, in the layout of x.
  at::Tensor grad_x = self_attention_output_like(x);
  if (g.layout == Layout::ChannelsLast) {
    at::Tensor grad_rows = tokens_of(grad_x, g.layout).view({g.batch * g.positions, g.channels});
    at::addmm_out(grad_rows, grad_tokens.reshape({g.batch * g.positions, g.channels}),
                  grad_qkv.view({g.batch * g.positions, rows}), qkv_weight);
  } else {
    const at::Tensor grad_columns = grad_dense.view({g.batch, g.channels, g.positions});
    const at::Tensor grad_x_columns = grad_x.view({g.batch, g.channels, g.positions});
    for (int64_t n = 0; n < g.batch; ++n) {
      at::Tensor slice = grad_x_columns.select(0, n);
      at::addmm_out(slice, grad_columns.select(0, n), qkv_weight.t(), grad_qkv.select(0, n).t());
    }
  }
  // The weight gradients come from tokens_outer in the accumulation dtype.
  const at::ScalarType dtype = x.scalar_type();
  return {grad_x,        grad_qkv_weight.to(dtype),
          grad_qkv_bias, grad_out_weight.to(dtype),
          grad_out_bias, grad_gamma.reshape(gamma.sizes()).to(dtype)};
}

}  // namespace ops
}  // namespace cnn_attention
