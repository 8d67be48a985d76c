#include "self_attention.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "dispatch.h"
#include "self_attention_impl.h"

namespace cnn_attention {
namespace ops {

namespace {
constexpr const char* kOp = "self_attention";
}  // namespace

at::Tensor self_attention(const at::Tensor& x, const at::Tensor& qkv_weight,
                          const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
                          const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma,
                          int64_t qk_dim, int64_t num_heads, int64_t kv_stride) {
  static auto op = find_op<decltype(self_attention)>("cnn_attention::self_attention");
  return op.call(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads,
                 kv_stride);
}

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> _self_attention_forward(
    const at::Tensor& x, const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
    const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
    bool keep_projection) {
  static auto op =
      find_op<decltype(_self_attention_forward)>("cnn_attention::_self_attention_forward");
  return op.call(x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads, kv_stride,
                 keep_projection);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_self_attention_backward(const at::Tensor& grad_y, const at::Tensor& x,
                         const at::Tensor& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                         const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                         const at::Tensor& gamma, const at::Tensor& lse, int64_t qk_dim,
                         int64_t num_heads, int64_t kv_stride,
                         const std::optional<at::Tensor>& projection) {
  static auto op =
      find_op<decltype(_self_attention_backward)>("cnn_attention::_self_attention_backward");
  return op.call(grad_y, x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, lse, qk_dim,
                 num_heads, kv_stride, projection);
}

}  // namespace detail

namespace {

void check_matrix(const at::Tensor& x, const char* name, const at::Tensor& t,
                  std::vector<c10::SymInt> expected, const char* expected_text) {
  check_like(kOp, "x", x, name, t);
  check_sizes(kOp, name, t, std::move(expected), expected_text);
}

}  // namespace

SelfAttentionSizes check_self_attention_args(const at::Tensor& x, const at::Tensor& qkv_weight,
                                             const std::optional<at::Tensor>& qkv_bias,
                                             const at::Tensor& out_weight,
                                             const std::optional<at::Tensor>& out_bias,
                                             const at::Tensor& gamma, int64_t qk_dim,
                                             int64_t num_heads, int64_t kv_stride) {
  check_feature_map(kOp, "x", x);
  const c10::SymInt channels = x.sym_size(1);
  TORCH_CHECK(qkv_weight.dim() == 2 && qkv_weight.sym_size(1) == channels, kOp,
              ": qkv_weight must be (2 * qk_dim + v_dim, C) with C = ", channels, ", got ",
              format_sizes(qkv_weight.sym_sizes()));
  check_like(kOp, "x", x, "qkv_weight", qkv_weight);
  const int64_t rows = qkv_weight.size(0);
  // qk_dim <= (rows - 1) / 2, not 2 * qk_dim < rows: a huge qk_dim must not overflow.
  TORCH_CHECK(qk_dim >= 1 && qk_dim <= (rows - 1) / 2, kOp, ": qk_dim must be in [1, ",
              (rows - 1) / 2, "] so that qkv_weight (", rows,
              " rows = 2 * qk_dim + v_dim) leaves v_dim >= 1, got ", qk_dim);
  const int64_t v_dim = rows - 2 * qk_dim;
  TORCH_CHECK(num_heads >= 1 && qk_dim % num_heads == 0 && v_dim % num_heads == 0, kOp,
              ": num_heads must divide qk_dim = ", qk_dim, " and v_dim = ", v_dim, ", got ",
              num_heads);
  if (qkv_bias.has_value()) check_matrix(x, "qkv_bias", *qkv_bias, {rows}, "(2 * qk_dim + v_dim,)");
  check_matrix(x, "out_weight", out_weight, {channels, v_dim}, "(C, v_dim)");
  if (out_bias.has_value()) check_matrix(x, "out_bias", *out_bias, {channels}, "(C,)");
  check_like(kOp, "x", x, "gamma", gamma);
  TORCH_CHECK(gamma.sym_numel() == 1, kOp, ": gamma must have one element, got sizes ",
              format_sizes(gamma.sym_sizes()));
  c10::SymInt smallest = x.sym_size(2);
  for (int64_t d = 3; d < x.dim(); ++d) {
    if (x.sym_size(d) < smallest) smallest = x.sym_size(d);
  }
  // With no positions at all there is nothing to pool and the result is empty.
  TORCH_CHECK(kv_stride >= 1 && (smallest == 0 || kv_stride <= smallest), kOp,
              ": kv_stride must be in [1, ", smallest, "] (the smallest spatial size of x), got ",
              kv_stride);
  return {qk_dim, v_dim, num_heads, kv_stride};
}

SelfAttentionSizes check_self_attention_backward_args(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& qkv_weight,
    const std::optional<at::Tensor>& qkv_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, const at::Tensor& gamma, const at::Tensor& lse,
    int64_t qk_dim, int64_t num_heads, int64_t kv_stride,
    const std::optional<at::Tensor>& projection) {
  const SelfAttentionSizes sizes = check_self_attention_args(
      x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads, kv_stride);
  check_matrix(x, "grad_y", grad_y, x.sym_sizes().vec(), "the size of x");
  if (projection.has_value()) {
    check_matrix(x, "projection", *projection,
                 {x.sym_size(0), sym_positions(x), qkv_weight.sym_size(0)},
                 "(N, P, 2 * qk_dim + v_dim)");
  }
  // The size of the saved lse, compared without allocating it (an invalid x may be a huge
  // expanded view).
  const c10::SymInt positions = sym_positions(x);
  const at::ScalarType lse_dtype = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_dtype && lse.device() == x.device(), kOp, ": lse must be ",
              lse_dtype, " on ", x.device(), ", got ", lse.scalar_type(), " on ", lse.device());
  check_sizes(kOp, "lse", lse, {x.sym_size(0), sizes.num_heads, positions}, "(N, num_heads, P)");
  return sizes;
}

at::Tensor self_attention_attn_like(const at::Tensor& x, const SelfAttentionSizes& sizes) {
  return at::empty_symint({x.sym_size(0), sym_positions(x), sizes.v_dim}, x.options());
}

at::Tensor self_attention_lse_like(const at::Tensor& x, const SelfAttentionSizes& sizes) {
  return at::empty_symint({x.sym_size(0), sizes.num_heads, sym_positions(x)},
                          x.options().dtype(at::toOpMathType(x.scalar_type())));
}

at::Tensor self_attention_projection_like(const at::Tensor& x, const at::Tensor& qkv_weight,
                                          bool keep_projection) {
  if (!keep_projection) return at::empty({0}, x.options());
  return at::empty_symint({x.sym_size(0), sym_positions(x), qkv_weight.sym_size(0)}, x.options());
}

bool few_tokens_for_their_channels(const at::Tensor& x) {
  // N P <= C / 2: N P cannot overflow (N P C elements exist), 2 N P could. Not a feature map
  // (the operators reject it): false.
  return x.dim() >= 3 && x.sym_size(0) * sym_positions(x) <= x.sym_size(1) / 2;
}

TORCH_LIBRARY_FRAGMENT(cnn_attention, m) {
  m.def(
      "self_attention(Tensor x, Tensor qkv_weight, Tensor? qkv_bias, Tensor out_weight, "
      "Tensor? out_bias, Tensor gamma, int qk_dim, int num_heads=1, int kv_stride=1) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_self_attention_forward(Tensor x, Tensor qkv_weight, Tensor? qkv_bias, Tensor out_weight, "
      "Tensor? out_bias, Tensor gamma, int qk_dim, int num_heads, int kv_stride, "
      "bool keep_projection=False) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_self_attention_backward(Tensor grad_y, Tensor x, Tensor qkv_weight, Tensor? qkv_bias, "
      "Tensor out_weight, Tensor? out_bias, Tensor gamma, Tensor lse, int qk_dim, int num_heads, "
      "int kv_stride, Tensor? projection=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace ops
}  // namespace cnn_attention
