#include "channel_pool.h"

#include <torch/library.h>

#include "channel_pool_impl.h"
#include "common.h"
#include "dispatch.h"

namespace cnn_attention {
namespace ops {

namespace {
constexpr const char* kOp = "channel_pool";

std::vector<c10::SymInt> pooled_sizes(const at::Tensor& x) {
  std::vector<c10::SymInt> sizes = x.sym_sizes().vec();
  sizes[1] = 2;
  return sizes;
}
}  // namespace

at::Tensor channel_pool(const at::Tensor& x) {
  static auto op = find_op<decltype(channel_pool)>("cnn_attention::channel_pool");
  return op.call(x);
}

namespace detail {
at::Tensor _channel_pool_backward(const at::Tensor& grad_out, const at::Tensor& x) {
  static auto op = find_op<decltype(_channel_pool_backward)>("cnn_attention::_channel_pool_backward");
  return op.call(grad_out, x);
}
}  // namespace detail

void check_channel_pool_args(const at::Tensor& x) {
  check_feature_map(kOp, "x", x);
  TORCH_CHECK(x.sym_size(1) > 0, kOp, ": x must have at least one channel (C >= 1), got sizes ",
              format_sizes(x.sym_sizes()));
}

void check_channel_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& x) {
  check_channel_pool_args(x);
  check_like(kOp, "x", x, "grad_out", grad_out);
  check_sizes(kOp, "grad_out", grad_out, pooled_sizes(x), "(N, 2, *S)");
}

at::Tensor channel_pool_output_like(const at::Tensor& x) {
  return empty_in_layout(pooled_sizes(x), x.options(), choose_layout(x));
}

TORCH_LIBRARY_FRAGMENT(cnn_attention, m) {
  m.def("channel_pool(Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("_channel_pool_backward(Tensor grad_out, Tensor x) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace ops
}  // namespace cnn_attention
