#include "self_attention_impl.h"

#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

// Whether the samples' `tokens` are copied into one matrix for one product with `weight`
// instead of a product per sample. Each product per sample reads all of the weight, and its
// width (a sample's positions: 49 at 7 x 7) leaves partly filled vectors at the edge; where the
// batch's tokens are no larger than the weight (deep stages: few positions, many channels) one
// copy of them costs less than reading the weight once per sample. Every element is the same sum
// either way.
bool stack_by_copy(const at::Tensor& tokens, const at::Tensor& weight) {
  return tokens.size(0) > 1 && tokens.numel() <= weight.numel();
}

// out (N, M, L) = a (N, M, K) @ b (K, L) (+ bias (L,)), out contiguous: one product when the
// samples of `a` stack into a matrix (copied into one where stack_by_copy), else one per sample,
// each reading `a` in place.
void tokens_mm_into(MatmulFn matmul, const at::Tensor& out, const at::Tensor& a,
                    const at::Tensor& b, const std::optional<at::Tensor>& bias = std::nullopt) {
  const int64_t batch = a.size(0), rows = a.size(1), cols = b.size(1);
  if (bias.has_value()) out.copy_(bias->expand({batch, rows, cols}));
  // Channels-first tokens (each sample a transposed matrix, x's (K, M)) times a transposed
  // weight: the samples side by side, (K, N * M), are a copy of runs of M values, and out^T =
  // b^T @ them is one product that reads b^T (the weight) and them in place. Stacking the
  // tokens row by row instead transposes them, and the product of a transposed weight then
  // transposes them back (see fixed_order_matmul). Every element is the same sum either way.
  if (!rows_stack(a) && a.stride(1) == 1 && b.stride(0) == 1 && stack_by_copy(a, b)) {
    const at::Tensor side_by_side =
        a.permute({2, 0, 1}).contiguous().view({a.size(2), batch * rows});
    matmul(out.view({batch * rows, cols}).t(), b.t(), side_by_side, bias.has_value());
    return;
  }
  // A column-major b (a transposed weight) is read by rows: see fixed_order_matmul.
  if (rows_stack(a) || stack_by_copy(a, b)) {
    matmul(out.view({batch * rows, cols}), a.reshape({batch * rows, a.size(2)}), b,
           bias.has_value());
    return;
  }
  for (int64_t n = 0; n < batch; ++n) matmul(out.select(0, n), a.select(0, n), b, bias.has_value());
}

at::Tensor tokens_mm(MatmulFn matmul, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias = std::nullopt) {
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options());
  tokens_mm_into(matmul, out, a, b, bias);
  return out;
}

// Whether `map` starts on a 64-byte boundary, as a new tensor does: in_memory_of lays a tensor in
// its memory only then.
bool aligned_for_memory_of(const at::Tensor& map) {
  return reinterpret_cast<uintptr_t>(map.data_ptr()) % 64 == 0;
}

// A new contiguous tensor of `sizes`, in the memory of `map` where it fits: `map` is dense (in
// any layout) and nothing reads it before it is written again (the backward's part of grad_x
// for a chunk of samples, written last), so a temporary as large as the chunk's tokens costs
// no memory of its own. Only where `map` starts on a 64-byte boundary, as a new tensor does
// (a later chunk of a map with an odd number of values per sample does not): kernels may read
// their operands in aligned vectors.
at::Tensor in_memory_of(const at::Tensor& map, at::IntArrayRef sizes) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (numel > map.numel() || !aligned_for_memory_of(map)) {
    return at::empty(sizes, map.options());
  }
  return map.as_strided({numel}, {1}).view(sizes);
}

// out (N, L, M) = w (L, K) @ tokens (N, M, K)^T per sample, or out += it with `accumulate`:
// the token-major products written into a feature map of channels-first layout. Where
// stack_by_copy, out's samples are copied side by side into one (L, N * M) matrix and back,
// around one product.
void columns_mm(MatmulFn matmul, const at::Tensor& out, const at::Tensor& w,
                const at::Tensor& tokens, bool accumulate) {
  const int64_t batch = out.size(0), rows = out.size(1), positions = out.size(2);
  if (stack_by_copy(tokens, w)) {
    const at::Tensor stacked = at::empty({rows, batch * positions}, out.options());
    const at::Tensor samples = stacked.view({rows, batch, positions}).permute({1, 0, 2});
    if (accumulate) samples.copy_(out);
    matmul(stacked, w, tokens.reshape({batch * positions, tokens.size(2)}).t(), accumulate);
    out.copy_(samples);
    return;
  }
  for (int64_t n = 0; n < batch; ++n) {
    matmul(out.select(0, n), w, tokens.select(0, n).t(), accumulate);
  }
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

// (*S') the flat spatial index of each pooling window's first element, S' = g.pooled.
at::Tensor window_first_positions(const Geometry& g, const at::TensorOptions& options) {
  at::Tensor first = at::zeros({}, options.dtype(at::kLong));
  int64_t spatial_stride = 1;
  for (int64_t d = static_cast<int64_t>(g.spatial.size()) - 1; d >= 0; --d) {
    std::vector<int64_t> shape(g.spatial.size(), 1);
    shape[d] = g.pooled[d];
    first = first + at::arange(g.pooled[d], options.dtype(at::kLong))
                        .mul_(g.sizes.kv_stride * spatial_stride)
                        .view(shape);
    spatial_stride *= g.spatial[d];
  }
  return first;
}

// The projection of x's tokens, or (`kept`) the forward's, with its pooled keys and values.
Projection project(MatmulFn matmul, const at::Tensor& x_tokens, const at::Tensor& qkv_weight,
                   const std::optional<at::Tensor>& qkv_bias, const Geometry& g,
                   const std::optional<at::Tensor>& kept = std::nullopt) {
  Projection p;
  p.qkv =
      kept.has_value() ? kept->contiguous() : tokens_mm(matmul, x_tokens, qkv_weight.t(), qkv_bias);
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
  // ATen's CUDA pooling of channels-last maps starts every window's index at 0, so a window
  // whose elements are all -inf (none exceeds the starting -inf) names position 0, outside
  // the window, and several such windows would scatter their gradients to one place. The CPU
  // kernels and ATen's contiguous CUDA kernel name the window's first element: so do we, on
  // every device, wherever the maximum is -inf.
  p.kv_indices = at::where(pooled == -std::numeric_limits<double>::infinity(),
                           window_first_positions(g, pooled.options()), p.kv_indices);
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

// sum = backend.position_sum_product(a, b), a new (K, L) tensor in the accumulation dtype where
// `sum` is undefined (the first chunk's), else sum += it in place: a chunk's part of a weight
// gradient is never a second weight-sized tensor.
void add_position_sum_product(const SelfAttentionBackend& backend, const at::Tensor& a,
                              const at::Tensor& b, at::Tensor& sum) {
  const bool accumulate = sum.defined();
  if (!accumulate) {
    sum = at::empty({a.size(2), b.size(2)}, b.options().dtype(at::toOpMathType(b.scalar_type())));
  }
  backend.position_sum_product(a, b, sum, accumulate);
}

// (L,): the sum over samples and positions of b (N, M, L), in the accumulation dtype, in the
// backend's order (ATen's reductions may split a long sum by thread).
at::Tensor position_sums(const SelfAttentionBackend& backend, const at::Tensor& b) {
  const at::Tensor ones = at::ones({1, 1, 1}, b.options()).expand({b.size(0), b.size(1), 1});
  at::Tensor sums;
  add_position_sum_product(backend, ones, b, sums);
  return sums.view({b.size(2)});
}

// The sum of every element of a 2-D (R, L) tensor, column sums first (each a sum down a
// column: vector lanes side by side, where a row's sum would be one dependent chain), in the
// backend's order.
at::Tensor ordered_sum(MatmulFn matmul, const at::Tensor& t) {
  at::Tensor columns = at::empty({1, t.size(1)}, t.options());
  matmul(columns, at::ones({1, t.size(0)}, t.options()), t, false);
  at::Tensor total = at::empty({1, 1}, t.options());
  matmul(total, columns, at::ones({t.size(1), 1}, t.options()), false);
  return total.view(at::IntArrayRef{});
}

// Whether the backward takes the output projection's gradient and the value gradient from
// T = p^T grad_y, the probability-weighted sums of grad_y's C channels over the queries (per
// head; backend.value_gradients_through_sums): G = T^T v and grad_v = gamma * T out_weight^T,
// instead of recomputing the heads for G = grad_y^T attn and summing grad_v = p^T grad_attn. By the
// multiply-adds per sample and head, with P queries and Pk keys: T takes P Pk (dq + C) (p
// recomputed, then C channels per pair) and its two products 2 Pk C dv; the heads take
// P Pk (dq + dv), grad_v P Pk dv and G P C dv. T wins where a head's values are wide next to
// the channels and the keys many: the default block (one head, dv = C, all keys) where P > C,
// never at deep stages (P < C).
bool sums_through_grad_y(const SelfAttentionBackend& backend, const Geometry& g) {
  if (backend.value_gradients_through_sums == nullptr) return false;
  const double queries = static_cast<double>(g.positions),
               keys = static_cast<double>(g.key_positions);
  const double channels = static_cast<double>(g.channels);
  const double dq = static_cast<double>(g.sizes.qk_head_dim()),
               dv = static_cast<double>(g.sizes.v_head_dim());
  const double through_sums = queries * keys * (dq + channels) + 2 * keys * channels * dv;
  const double through_heads = queries * keys * (dq + 2 * dv) + queries * channels * dv;
  return through_sums < through_heads;
}

// One reduction (at::isfinite and all take four passes and a temporary): the extremes are
// finite where every element is (a NaN is the extreme it meets).
bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const auto [low, high] = at::aminmax(t);
  return std::isfinite(low.item<double>()) && std::isfinite(high.item<double>());
}

double softmax_scale(const SelfAttentionSizes& sizes) {
  return 1.0 / std::sqrt(static_cast<double>(sizes.qk_head_dim()));
}

// Tensors carved one after another out of `memory` (1-D, contiguous), each on a 64-byte boundary
// (16 elements: kernels may read their operands in aligned vectors), or of their own where
// `memory` has no room left.
class Carving {
 public:
  explicit Carving(at::Tensor memory) : memory_(std::move(memory)) {}
  at::Tensor take(at::IntArrayRef sizes) {
    const int64_t numel = c10::multiply_integers(sizes);
    if (used_ + numel > memory_.numel()) return at::empty(sizes, memory_.options());
    at::Tensor part = memory_.narrow(0, used_, numel).view(sizes);
    used_ = used_after(used_, numel, memory_.numel());
    return part;
  }
  // How much of `memory` values is used once a part of `numel` is taken after `used`.
  static int64_t used_after(int64_t used, int64_t numel, int64_t memory) {
    if (used + numel > memory) return used;
    return std::min(memory, on_boundary(used + numel));
  }
  // `values` rounded up to the next part's boundary.
  static int64_t on_boundary(int64_t values) { return (values + 15) / 16 * 16; }

 private:
  at::Tensor memory_;
  int64_t used_ = 0;
};

// The memory T's way lends its kernels for their partial sums, in values (none: the kernels
// allocate what they need): what the chunk's part of grad_x leaves after q's and k's gradients,
// up to room for four partial key gradients (qk values per position each), so that four groups
// of query blocks of a (sample, head) run side by side, or for two of G's weight-sized partials
// per (sample, head). It sets how many groups of key blocks G's sums are cut into, and so their
// order: both of T's ways lend this much, from that part of grad_x or from memory of their own
// (values_in_grad_x_backward).
int64_t sums_workspace_values(const Geometry& part) {
  const SelfAttentionSizes& sizes = part.sizes;
  const int64_t memory = part.batch * part.positions * part.channels;
  const int64_t used = Carving::used_after(
      Carving::used_after(0, part.batch * part.positions * sizes.qk_dim, memory),
      part.batch * part.key_positions * sizes.qk_dim, memory);
  return std::min(memory - used,
                  part.batch * std::max(4 * part.positions * sizes.qk_dim,
                                        2 * sizes.num_heads * part.channels * sizes.v_head_dim()));
}

// sums_workspace_values(part) carved out of `region`, or undefined where that is none.
at::Tensor sums_workspace(Carving& region, const Geometry& part) {
  const int64_t values = sums_workspace_values(part);
  return values > 0 ? region.take({values}) : at::Tensor();
}

// A channels-first sample's tokens A (P, C), token-major, transposed into (C, P) in their own
// memory with a scratch of about half of it: A's top rows are copied out (two column blocks);
// the result's first `left` rows then lie where those rows were (left P <= top C) and take the
// copies' and A's bottom rows' left columns; A's bottom right block is copied out (into the first
// block's place where it fits, else after the copies) before the result's last rows cover it.
struct InPlaceTransposition {
  int64_t top, left, bottom, right, bottom_right_at;
  InPlaceTransposition(int64_t positions, int64_t channels)
      : top((positions + 1) / 2),
        left(channels / 2),
        bottom(positions - top),
        right(channels - left),
        bottom_right_at(bottom * right <= top * left ? 0 : top * channels) {}
  int64_t scratch_values() const {
    return std::max(top * (left + right), bottom_right_at + bottom * right);
  }
};

// The values values_in_grad_x_backward holds beside y and grad_x while its kernels run: q's and
// k's gradients, and q's and k's columns with the kernels' workspace (each up to Carving's next
// boundary).
int64_t side_values(const Geometry& part) {
  const int64_t query_key_values = part.batch * part.positions * 2 * part.sizes.qk_dim;
  return 2 * Carving::on_boundary(query_key_values) + sums_workspace_values(part);
}

// Whether a chunk of T's way keeps its values, and then their gradient, in its part of grad_x
// (values_in_grad_x_backward): where the batch is that one chunk (one sample), so that the
// chunk's temporaries come on top of y and grad_x for it alone and the whole projection (80
// values a position for the default module) would take the peak to 1.5 times |Q| + |K| + |V| +
// |out|; a chunk of a larger batch holds a share of the batch's y and grad_x, and the projection
// whole costs fewer calls. And where it recomputes the projection (not the forward's kept one),
// its keys and values are not pooled, a value row is as wide as a token of grad_x (v = C), so
// that the values fill that part exactly, row for row, and what it holds beside them while its
// kernels run is less than the projection (q and k narrow next to C: the default block's
// qk = C / 8).
bool values_fit_grad_x(const Geometry& part, bool whole_batch, bool recomputed,
                       const at::Tensor& chunk_grad_x) {
  const SelfAttentionSizes& sizes = part.sizes;
  return whole_batch && recomputed && sizes.kv_stride == 1 && sizes.v_dim == part.channels &&
         aligned_for_memory_of(chunk_grad_x) &&
         side_values(part) < part.batch * part.positions * (2 * sizes.qk_dim + sizes.v_dim);
}

// T's way for a chunk (values_fit_grad_x) whose values v, as many as the chunk's part of grad_x
// holds, are written there by the projection: nothing reads that part until it is written
// last, and the value gradient is written over v (value_gradients_through_sums). So the chunk's
// temporaries are q's and k's gradients and a scratch tensor of q's and k's columns and the
// kernels' partial sums (2 * 2 qk + max(4 qk, 2 H C dv / P) values per position: 64 against the
// whole projection's 80 for the default module), not the projection (N, P, R) on top of grad_x.
// The scratch goes before the weights' gradients are formed (at small maps they and G are nearly
// as large as it). grad_x is then written over the value gradient a tile of positions at a
// time, each tile's rows of the projection's gradient first copied into a buffer of a quarter of
// the projection's gradient: a token's gradient reads that token's value-gradient row alone,
// which it is written over. A channels-first map gets the tokens' gradients token-major first and
// then transposed in place (InPlaceTransposition, once q's and k's gradients are gone), grad_y
// added as they go. Every element is the same sum as T's way with the whole projection gives
// (self_attention_backward): the products are split by rows or columns of their results, never
// within a sum, and the kernels are lent as much workspace.
//
// Adds the chunk's parts to the projection's weight and bias gradients (defined after the first
// chunk) and returns its part of G, or an undefined tensor where that is not finite (the caller
// then takes the heads' way, from the projection again: grad_x's part then holds nothing).
at::Tensor values_in_grad_x_backward(const SelfAttentionBackend& backend, const Geometry& part,
                                     const at::Tensor& grad_tokens, const at::Tensor& grad_dense,
                                     const at::Tensor& x_tokens, const at::Tensor& qkv_weight,
                                     const std::optional<at::Tensor>& qkv_bias,
                                     const at::Tensor& out_weight, double gamma,
                                     const at::Tensor& lse, const at::Tensor& chunk_grad_x,
                                     at::Tensor& grad_qkv_weight, at::Tensor& grad_qkv_bias) {
  const SelfAttentionSizes& sizes = part.sizes;
  const int64_t count = part.batch, positions = part.positions, channels = part.channels;
  const int64_t heads = sizes.num_heads, dq = sizes.qk_head_dim(), dv = sizes.v_head_dim();
  const int64_t qk = sizes.qk_dim, query_key = 2 * qk, rows = query_key + channels;
  const int64_t token_rows = count * positions;
  // The values (count, P, C): the chunk's part of grad_x as token rows, whatever its layout.
  const at::Tensor values = in_memory_of(chunk_grad_x, {count, positions, channels});
  TORCH_INTERNAL_ASSERT(values.data_ptr() == chunk_grad_x.data_ptr());
  at::Tensor grad_query_key = at::empty({count, positions, query_key}, x_tokens.options());
  at::Tensor out_part;
  {
    const at::Tensor scratch =
        at::empty({Carving::on_boundary(grad_query_key.numel()) + sums_workspace_values(part)},
                  x_tokens.options());
    Carving region(scratch);
    const at::Tensor query_key_rows = region.take({count, positions, query_key});
    const at::Tensor workspace = sums_workspace(region, part);
    // The projection, by rows of the weight: q's and k's columns, then v's into grad_x.
    const auto bias_rows = [&](int64_t first, int64_t length) -> std::optional<at::Tensor> {
      if (!qkv_bias.has_value()) return std::nullopt;
      return qkv_bias->narrow(0, first, length);
    };
    tokens_mm_into(backend.matmul, query_key_rows, x_tokens, qkv_weight.narrow(0, 0, query_key).t(),
                   bias_rows(0, query_key));
    tokens_mm_into(backend.matmul, values, x_tokens, qkv_weight.narrow(0, query_key, channels).t(),
                   bias_rows(query_key, channels));
    const at::Tensor q = heads_of(query_key_rows, 0, heads, dq),
                     k = heads_of(query_key_rows, qk, heads, dq),
                     v = heads_of(values, 0, heads, dv);
    const double scale = softmax_scale(sizes);
    backend.query_key_gradients(grad_tokens, out_weight, gamma, q, k, v, lse, scale,
                                heads_of(grad_query_key, 0, heads, dq),
                                heads_of(grad_query_key, qk, heads, dq), workspace);
    out_part = backend.value_gradients_through_sums(grad_tokens, out_weight, gamma, q, k, v, lse,
                                                    scale, v, workspace);
  }
  if (!all_finite(out_part)) return at::Tensor();

  // The projection's weight and bias gradients, by rows: q's and k's, then v's.
  const bool accumulate = grad_qkv_weight.defined();
  if (!accumulate) {
    grad_qkv_weight = at::empty({rows, channels},
                                x_tokens.options().dtype(at::toOpMathType(x_tokens.scalar_type())));
  }
  backend.position_sum_product(grad_query_key, x_tokens, grad_qkv_weight.narrow(0, 0, query_key),
                               accumulate);
  backend.position_sum_product(values, x_tokens, grad_qkv_weight.narrow(0, query_key, channels),
                               accumulate);
  const at::Tensor bias_part =
      at::cat({position_sums(backend, grad_query_key), position_sums(backend, values)});
  grad_qkv_bias = accumulate ? grad_qkv_bias.add_(bias_part) : bias_part;

  // The tokens' gradients over the value gradient, a tile of rows at a time: channels last,
  // grad_y's rows plus the product; channels first, the product alone (grad_y is added below).
  const bool channels_last = part.layout == Layout::ChannelsLast;
  const at::Tensor token_gradients = values.view({token_rows, channels});
  {
    const int64_t tile_rows = (token_rows + 3) / 4;
    const at::Tensor buffer = at::empty({tile_rows, rows}, x_tokens.options());
    const at::Tensor grad_query_key_rows = grad_query_key.view({token_rows, query_key});
    const at::Tensor grad_rows =
        channels_last ? grad_tokens.reshape({token_rows, channels}) : at::Tensor();
    for (int64_t first = 0; first < token_rows; first += tile_rows) {
      const int64_t length = std::min(tile_rows, token_rows - first);
      const at::Tensor tile = buffer.narrow(0, 0, length);
      tile.narrow(1, 0, query_key).copy_(grad_query_key_rows.narrow(0, first, length));
      tile.narrow(1, query_key, channels).copy_(token_gradients.narrow(0, first, length));
      const at::Tensor out = token_gradients.narrow(0, first, length);
      if (channels_last) out.copy_(grad_rows.narrow(0, first, length));
      backend.matmul(out, tile, qkv_weight, channels_last);
    }
  }
  grad_query_key.reset();
  if (!channels_last) {
    const InPlaceTransposition t(positions, channels);
    const int64_t top = t.top, left = t.left, bottom = t.bottom, right = t.right;
    const at::Tensor scratch = at::empty({t.scratch_values()}, x_tokens.options());
    const at::Tensor left_top = scratch.narrow(0, 0, top * left).view({top, left});
    const at::Tensor right_top = scratch.narrow(0, top * left, top * right).view({top, right});
    const at::Tensor right_bottom =
        scratch.narrow(0, t.bottom_right_at, bottom * right).view({bottom, right});
    const auto add_into = [](at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
      at::add_out(out, a, b);
    };
    for (int64_t n = 0; n < count; ++n) {
      const at::Tensor tokens = values.select(0, n);
      const at::Tensor out = chunk_grad_x.select(0, n).view({channels, positions});
      const at::Tensor grad = grad_dense.select(0, n).view({channels, positions});
      left_top.copy_(tokens.narrow(0, 0, top).narrow(1, 0, left));
      right_top.copy_(tokens.narrow(0, 0, top).narrow(1, left, right));
      add_into(out.narrow(0, 0, left).narrow(1, 0, top), grad.narrow(0, 0, left).narrow(1, 0, top),
               left_top.t());
      add_into(out.narrow(0, 0, left).narrow(1, top, bottom),
               grad.narrow(0, 0, left).narrow(1, top, bottom),
               tokens.narrow(0, top, bottom).narrow(1, 0, left).t());
      right_bottom.copy_(tokens.narrow(0, top, bottom).narrow(1, left, right));
      add_into(out.narrow(0, left, right).narrow(1, 0, top),
               grad.narrow(0, left, right).narrow(1, 0, top), right_top.t());
      add_into(out.narrow(0, left, right).narrow(1, top, bottom),
               grad.narrow(0, left, right).narrow(1, top, bottom), right_bottom.t());
    }
  }
  return out_part;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_attention_forward(
    const SelfAttentionBackend& backend, const at::Tensor& x, const at::Tensor& qkv_weight,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma, int64_t qk_dim,
    int64_t num_heads, int64_t kv_stride, bool keep_projection) {
  const SelfAttentionSizes sizes = check_self_attention_args(
      x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads, kv_stride);
  const c10::DeviceGuard device_guard(x.device());
  const Geometry g = geometry_of(x, sizes);
  if (g.batch == 0 || g.positions == 0) {
    return {feature_map_like(x), self_attention_attn_like(x, sizes),
            self_attention_lse_like(x, sizes),
            self_attention_projection_like(x, qkv_weight, keep_projection)};
  }
  const at::Tensor x_dense = to_layout(x, g.layout);
  Projection p = project(backend.matmul, tokens_of(x_dense, g.layout), qkv_weight, qkv_bias, g);
  const int64_t heads = sizes.num_heads, dq = sizes.qk_head_dim(), dv = sizes.v_head_dim();
  auto [heads_out, lse] =
      backend.attention_forward(heads_of(p.qkv, 0, heads, dq), heads_of(p.kv, 0, heads, dq),
                                heads_of(p.kv, sizes.qk_dim, heads, dv), softmax_scale(sizes));
  // memory: q, k and v are not needed once y is being written, unless kept for the backward
  const at::Tensor projection =
      keep_projection ? p.qkv : self_attention_projection_like(x, qkv_weight, false);
  p = Projection();
  // (N, P, v): a view when the kernel wrote the heads token-major, as ours do.
  const at::Tensor attn = heads_out.transpose(1, 2).reshape({g.batch, g.positions, sizes.v_dim});

  // out = attn @ out_weight^T + out_bias, written straight into y in the layout of x, then
  // y = x + gamma * out in place.
  at::Tensor y = feature_map_like(x);
  const bool with_bias = out_bias.has_value();
  if (g.layout == Layout::ChannelsLast) {
    const at::Tensor rows = tokens_of(y, g.layout).view({g.batch * g.positions, g.channels});
    if (with_bias) rows.copy_(out_bias->expand_as(rows));
    backend.matmul(rows, attn.view({g.batch * g.positions, sizes.v_dim}), out_weight.t(),
                   with_bias);
  } else {
    const at::Tensor columns = y.view({g.batch, g.channels, g.positions});
    if (with_bias) columns.copy_(out_bias->view({1, g.channels, 1}).expand_as(columns));
    columns_mm(backend.matmul, columns, out_weight, attn, with_bias);
  }
  at::addcmul_out(y, x_dense, gamma.reshape({}), y);
  return {y, attn, lse, projection};
}

at::Tensor self_attention_result(const SelfAttentionBackend& backend, const at::Tensor& x,
                                 const at::Tensor& qkv_weight,
                                 const std::optional<at::Tensor>& qkv_bias,
                                 const at::Tensor& out_weight,
                                 const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                                 int64_t qk_dim, int64_t num_heads, int64_t kv_stride) {
  return std::get<0>(self_attention_forward(backend, x, qkv_weight, qkv_bias, out_weight, out_bias,
                                            gamma, qk_dim, num_heads, kv_stride, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
self_attention_backward(const SelfAttentionBackend& backend, const at::Tensor& grad_y,
                        const at::Tensor& x, const at::Tensor& qkv_weight,
                        const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
                        const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                        const at::Tensor& lse, int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
                        const std::optional<at::Tensor>& projection) {
  const SelfAttentionSizes sizes =
      check_self_attention_backward_args(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias,
                                         gamma, lse, qk_dim, num_heads, kv_stride, projection);
  const c10::DeviceGuard device_guard(x.device());
  const Geometry g = geometry_of(x, sizes);
  const int64_t rows = qkv_weight.size(0);
  if (g.batch == 0 || g.positions == 0) {
    return {feature_map_like(x).zero_(),          at::zeros_like(qkv_weight),
            at::zeros({rows}, x.options()),       at::zeros_like(out_weight),
            at::zeros({g.channels}, x.options()), at::zeros_like(gamma)};
  }
  const bool few_tokens = few_tokens_for_their_channels(x);
  // Channels-first tokens (a transposed matrix per sample) of few tokens are copied token-major
  // once here, where every product that reads them would stack them itself; grad_y's copy,
  // ours, then takes grad_x's sum in place.
  const bool token_copies = few_tokens && g.layout == Layout::ChannelsFirst && g.batch > 1;
  const at::Tensor x_tokens_in_place = tokens_of(to_layout(x, g.layout), g.layout);
  at::Tensor x_tokens = token_copies ? x_tokens_in_place.contiguous() : x_tokens_in_place;
  const at::Tensor grad_dense = to_layout(grad_y, g.layout);
  const at::Tensor grad_tokens_in_place = tokens_of(grad_dense, g.layout);
  at::Tensor grad_tokens = token_copies ? grad_tokens_in_place.clone(at::MemoryFormat::Contiguous)
                                        : grad_tokens_in_place;
  const at::Tensor gamma_value = gamma.reshape({});
  const at::Tensor grad_sum = position_sums(backend, grad_tokens);  // (C,)
  // The attention's backward runs on chunks of samples: its temporaries (the recomputed
  // projection, which its gradient overwrites where it may, the heads; in the chunk's part of
  // grad_x the heads' gradient, or q's and k's gradients and partial sums) then take a chunk's
  // share of memory on top of what the backward must hold (grad_x). A chunk of kChunkPositions
  // positions keeps each call's work large next to its fixed costs; a chunk of at most a quarter of
  // the samples keeps those temporaries (about twice |Q| + |K| + |V| + |out| per position) at half
  // of the call's |Q| + |K| + |V| + |out| or less. Where the two disagree (small maps) memory wins.
  // But every chunk reads the weights again in its products, and where a product packs a transposed
  // weight, copies it: where the whole batch's temporaries are no larger than the weights
  // (few_tokens_for_their_channels), the batch is one chunk. (With 4 samples of 64 positions
  // the peak is 1.43 times |Q| + |K| + |V| + |out|, of which y and grad_x are 0.89 and the
  // weights' gradients 0.25: see test_small_map_backward_holds_one_sample_of_temporaries.)
  constexpr int64_t kChunkPositions = 1024;
  const int64_t chunk =
      few_tokens ? g.batch
                 : std::max<int64_t>(1, std::min(kChunkPositions / g.positions, g.batch / 4));
  const int64_t heads = sizes.num_heads, dq = sizes.qk_head_dim(), dv = sizes.v_head_dim();
  const int64_t kv_columns = sizes.qk_dim + sizes.v_dim;
  // The two ways associate the products differently, so they propagate infinities and NaN
  // differently: the heads' way is the reference composition's. A chunk keeps T's way only where
  // T, v and the output projection's weight and gamma are finite. In a half dtype the forward
  // rounds the heads it returns (attn) and G is their exact sum, which T (from the unrounded
  // heads) is not: half dtypes take the heads' way.
  const bool sums_may_serve = x.scalar_type() == at::toOpMathType(x.scalar_type()) &&
                              sums_through_grad_y(backend, g) && all_finite(out_weight) &&
                              all_finite(gamma);
  const double gamma_number = sums_may_serve ? gamma_value.item<double>() : 0.0;
  const at::Tensor dense_out_weight = sums_may_serve ? out_weight.contiguous() : out_weight;
  at::Tensor grad_x = feature_map_like(x);
  // G = the sum over positions of grad^T attn (C, v): over the chunks' recomputed heads, or
  // their sums T^T v.
  at::Tensor grad_out_product, grad_qkv_weight, grad_qkv_bias;
  for (int64_t first = 0; first < g.batch; first += chunk) {
    const int64_t count = std::min(chunk, g.batch - first);
    Geometry part = g;
    part.batch = count;
    const at::Tensor chunk_grad_tokens = grad_tokens.narrow(0, first, count);
    const at::Tensor chunk_x_tokens = x_tokens.narrow(0, first, count);
    // The chunk's part of grad_x is written last: until then it holds the chunk's temporaries
    // (the heads' output gradient, or in T's way q's and k's gradients and partial sums).
    const at::Tensor chunk_grad_x = grad_x.narrow(0, first, count);
    const at::Tensor chunk_lse = lse.narrow(0, first, count).contiguous();
    const bool over_projection = !projection.has_value();
    bool through_sums = sums_may_serve;
    if (through_sums && values_fit_grad_x(part, chunk == g.batch, over_projection, chunk_grad_x)) {
      const at::Tensor out_part = values_in_grad_x_backward(
          backend, part, chunk_grad_tokens, grad_dense.narrow(0, first, count), chunk_x_tokens,
          qkv_weight, qkv_bias, dense_out_weight, gamma_number, chunk_lse, chunk_grad_x,
          grad_qkv_weight, grad_qkv_bias);
      if (out_part.defined()) {
        grad_out_product = grad_out_product.defined() ? grad_out_product.add_(out_part) : out_part;
        continue;
      }
      through_sums = false;  // G is not finite: the heads' way, as below
    }
    // The projection (the forward's, if it kept it) again: the same products on the same rows
    // as the forward's, so the same bits (and the heads and lse it gives are the forward's).
    Projection p = project(
        backend.matmul, chunk_x_tokens, qkv_weight, qkv_bias, part,
        projection.has_value() ? std::optional(projection->narrow(0, first, count)) : std::nullopt);
    at::Tensor q = heads_of(p.qkv, 0, heads, dq), k = heads_of(p.kv, 0, heads, dq),
               v = heads_of(p.kv, sizes.qk_dim, heads, dv);
    // The projection's gradient grad_qkv (count, P, R), and grad_kv (count, Pk, qk + v), a view
    // of it, or with pooled keys and values their gradients, sent back below to the positions
    // that won their windows.
    at::Tensor grad_qkv, grad_kv;
    if (through_sums) {
      // T's way, where the chunk holds its projection and little else (never the forward's kept
      // projection, autograd's saved tensor, which gets a gradient of its own): the heads'
      // output gradient is formed a block of queries at a time inside the kernel that gives q's
      // and k's gradients, which go to the chunk's part of grad_x (written last) with the
      // kernels' partial sums; then T, a block of keys at a time, gives G's part and the value
      // gradient, written over v; last q's and k's gradients are copied over q and k.
      Carving region(in_memory_of(chunk_grad_x, {chunk_grad_x.numel()}));
      const at::Tensor grad_q = region.take({count, g.positions, sizes.qk_dim});
      const at::Tensor grad_k = region.take({count, g.key_positions, sizes.qk_dim});
      const at::Tensor workspace = sums_workspace(region, part);
      backend.query_key_gradients(chunk_grad_tokens, dense_out_weight, gamma_number, q, k, v,
                                  chunk_lse, softmax_scale(sizes), heads_of(grad_q, 0, heads, dq),
                                  heads_of(grad_k, 0, heads, dq), workspace);
      grad_qkv = over_projection ? p.qkv : at::empty({count, g.positions, rows}, x.options());
      grad_kv = over_projection ? p.kv
                : sizes.kv_stride == 1
                    ? grad_qkv.narrow(2, sizes.qk_dim, kv_columns)
                    : at::empty({count, g.key_positions, kv_columns}, x.options());
      const at::Tensor out_part = backend.value_gradients_through_sums(
          chunk_grad_tokens, dense_out_weight, gamma_number, q, k, v, chunk_lse,
          softmax_scale(sizes), heads_of(grad_kv, sizes.qk_dim, heads, dv), workspace);
      // Every element of T^T v sums a term of each element of T's row and of v's column, so it
      // is finite where both T and v are. Where it is not, the chunk takes the heads' way below,
      // from its projection again where v now holds its gradient.
      if (all_finite(out_part)) {
        grad_out_product = grad_out_product.defined() ? grad_out_product.add_(out_part) : out_part;
        grad_kv.narrow(2, 0, sizes.qk_dim).copy_(grad_k);
        grad_qkv.narrow(2, 0, sizes.qk_dim).copy_(grad_q);
      } else {
        grad_qkv = grad_kv = at::Tensor();
        if (over_projection) {
          p = project(backend.matmul, chunk_x_tokens, qkv_weight, qkv_bias, part, std::nullopt);
          q = heads_of(p.qkv, 0, heads, dq);
          k = heads_of(p.kv, 0, heads, dq);
          v = heads_of(p.kv, sizes.qk_dim, heads, dv);
        }
      }
    }
    if (!grad_qkv.defined()) {
      // The heads' way: G's part from the recomputed heads, added at once (the chunks' parts
      // in chunk order: the result depends on the shape alone), and the heads freed before the
      // attention's backward where it does not read them. Where the backend allows it,
      // grad_qkv is the recomputed projection itself, overwritten: not the forward's kept
      // projection, nor where the keys and values are pooled (a tensor of their own).
      at::Tensor heads_out = std::get<0>(backend.attention_forward(q, k, v, softmax_scale(sizes)));
      add_position_sum_product(backend, chunk_grad_tokens,
                               heads_out.transpose(1, 2).reshape({count, g.positions, sizes.v_dim}),
                               grad_out_product);
      if (!backend.attention_backward_reads_out) heads_out.reset();
      const bool over_heads_projection =
          backend.attention_backward_over_inputs && over_projection && sizes.kv_stride == 1;
      grad_qkv = over_heads_projection ? p.qkv : at::empty({count, g.positions, rows}, x.options());
      grad_kv = sizes.kv_stride == 1 ? grad_qkv.narrow(2, sizes.qk_dim, kv_columns)
                                     : at::empty({count, g.key_positions, kv_columns}, x.options());
      // grad_attn = gamma * grad_y @ out_weight, (count, P, v), the heads' output gradient.
      const at::Tensor grad_attn = in_memory_of(chunk_grad_x, {count, g.positions, sizes.v_dim});
      tokens_mm_into(backend.matmul, grad_attn, chunk_grad_tokens, out_weight);
      grad_attn.mul_(gamma_value);
      backend.attention_backward(heads_of(grad_attn, 0, heads, dv), q, k, v, heads_out, chunk_lse,
                                 softmax_scale(sizes), heads_of(grad_qkv, 0, heads, dq),
                                 heads_of(grad_kv, 0, heads, dq),
                                 heads_of(grad_kv, sizes.qk_dim, heads, dv));
    }
    // Pooled keys and values: their gradients go to the positions that won their windows (the
    // windows do not overlap, so every position gets at most one value: a deterministic
    // scatter).
    if (sizes.kv_stride > 1) {
      const at::Tensor index = p.kv_indices.permute(channels_last_order(p.kv_indices.dim()))
                                   .reshape({count, g.key_positions, kv_columns});
      grad_qkv.narrow(2, sizes.qk_dim, kv_columns).zero_().scatter_(1, index, grad_kv);
    }
    p = Projection();  // memory: with the heads' views of it, before the weight-sized products
    q.reset();
    k.reset();
    v.reset();
    add_position_sum_product(backend, grad_qkv, chunk_x_tokens, grad_qkv_weight);
    const at::Tensor bias_part = position_sums(backend, grad_qkv);
    grad_qkv_bias = first == 0 ? bias_part : grad_qkv_bias.add_(bias_part);

    // grad_x = grad_y + grad_qkv @ qkv_weight, in the layout of x.
    if (g.layout == Layout::ChannelsLast) {
      const at::Tensor grad_rows =
          tokens_of(chunk_grad_x, g.layout).view({count * g.positions, g.channels});
      grad_rows.copy_(chunk_grad_tokens.reshape({count * g.positions, g.channels}));
      backend.matmul(grad_rows, grad_qkv.view({count * g.positions, rows}), qkv_weight, true);
    } else if (token_copies) {  // grad_y's rows, read for the last time, take the sum
      backend.matmul(chunk_grad_tokens.view({count * g.positions, g.channels}),
                     grad_qkv.view({count * g.positions, rows}), qkv_weight, true);
      chunk_grad_x.view({count, g.channels, g.positions}).copy_(chunk_grad_tokens.transpose(1, 2));
    } else {
      const at::Tensor grad_x_columns = chunk_grad_x.view({count, g.channels, g.positions});
      grad_x_columns.copy_(
          grad_dense.narrow(0, first, count).view({count, g.channels, g.positions}));
      columns_mm(backend.matmul, grad_x_columns, qkv_weight.t(), grad_qkv, true);
    }
  }
  x_tokens.reset();  // memory: their copies are not needed for the weight-sized results below
  grad_tokens.reset();
  // Output projection and residual: the weight gradient is gamma * G, and gamma's,
  // sum(grad * out), is sum(G * out_weight) + sum(grad) . out_bias: nothing as large as the
  // feature map is needed for either. G * out_weight is formed in G's place once gamma * G is
  // out (a weight-sized temporary less).
  const at::Tensor grad_out_weight = grad_out_product * gamma_value;
  at::Tensor grad_gamma = ordered_sum(backend.matmul, grad_out_product.mul_(out_weight));
  if (out_bias.has_value()) {
    grad_gamma =
        grad_gamma + ordered_sum(backend.matmul, at::mul(grad_sum, *out_bias).unsqueeze(0));
  }
  const at::Tensor grad_out_bias = grad_sum * gamma_value;
  // The weight and bias gradients come from position_sum_product in the accumulation dtype.
  const at::ScalarType dtype = x.scalar_type();
  return {grad_x,
          grad_qkv_weight.to(dtype),
          grad_qkv_bias.to(dtype),
          grad_out_weight.to(dtype),
          grad_out_bias.to(dtype),
          grad_gamma.reshape(gamma.sizes()).to(dtype)};
}

}  // namespace ops
}  // namespace cnn_attention
