#pragma once

// Validation and memory-layout helpers shared by every operator and every backend
// (CPU, CUDA, Meta), so that all of them accept the same inputs, raise the same
// messages and produce outputs with the same strides.

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace cnn_attention {
namespace ops {

// "(8, 64, 56, 56)" for messages.
inline std::string format_sizes(c10::SymIntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i ? ", " : "") << sizes[i];
  }
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A feature map is (N, C, *S) with one to three spatial dims and a floating dtype.
inline void check_feature_map(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(
      x.dim() >= 3 && x.dim() <= 5,
      op, ": ", name, " must be (N, C, *S) with 1 to 3 spatial dims, got ", x.dim(),
      " dims with sizes ", format_sizes(x.sym_sizes()));
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()),
      op, ": ", name, " must have a floating dtype (float16, bfloat16, float32, float64), got ",
      x.scalar_type());
}

// `t` must live on the device of `x` and share its dtype.
inline void check_like(const char* op, const char* x_name, const at::Tensor& x,
                       const char* name, const at::Tensor& t) {
  TORCH_CHECK(
      t.scalar_type() == x.scalar_type(),
      op, ": ", name, " must have the dtype of ", x_name, " (", x.scalar_type(), "), got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == x.device(),
      op, ": ", name, " must be on the device of ", x_name, " (", x.device(), "), got ",
      t.device());
}

inline void check_sizes(const char* op, const char* name, const at::Tensor& t,
                        std::vector<c10::SymInt> expected, const char* expected_text) {
  TORCH_CHECK(
      t.sym_sizes().equals(expected),
      op, ": ", name, " must be ", expected_text, " = ", format_sizes(expected), ", got ",
      format_sizes(t.sym_sizes()));
}

// The value that `text` names among `choices`, or an error naming the operator (or module),
// the argument and the accepted values: `pool must be one of "avg", "max", got "mean"`.
template <typename Value>
Value parse_choice(const char* op, const char* name, c10::string_view text,
                   std::initializer_list<std::pair<const char*, Value>> choices) {
  for (const auto& [choice, value] : choices) {
    if (text == choice) return value;
  }
  std::ostringstream accepted;
  for (const auto& [choice, value] : choices) {
    accepted << (accepted.tellp() > 0 ? ", " : "") << '"' << choice << '"';
  }
  TORCH_CHECK(false, op, ": ", name, " must be one of ", accepted.str(), ", got \"",
              std::string(text), "\"");
}

// out (M, N) = a (M, K) @ b (K, N), or out += a @ b with `accumulate`, for 2-D tensors of one
// dtype and device with any strides; `out` is written in place. Each backend names its own:
// on CPU a fixed-order kernel (cpu/gemm.h), since CPU BLAS results change with the thread
// count; elsewhere the device's BLAS (blas_matmul).
using MatmulFn = void (*)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          bool accumulate);

inline void blas_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool accumulate) {
  at::Tensor result = out;
  // beta = 0 ignores the old contents, NaN included.
  at::addmm_out(result, out, a, b, accumulate ? 1 : 0, 1);
}

// Values of a long row summed into one set of float accumulators before they are added to
// the row's total. A float sum stops growing once it is 2^24 times its terms (a row of 2^31
// ones summed in 32 lanes gives a quarter of the true sum), so rows longer than this are
// summed block by block; a row within one block is summed exactly as without blocks. A
// multiple of every vector size.
constexpr int64_t kSumBlock = int64_t(1) << 20;

// Number of spatial positions P of a feature map, symbolic (for the checks the Meta kernels
// run too).
inline c10::SymInt sym_positions(const at::Tensor& x) {
  c10::SymInt positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions = positions * x.sym_size(d);
  return positions;
}

// Number of spatial positions P of a feature map.
inline int64_t num_positions(const at::Tensor& x) {
  int64_t positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) positions *= x.size(d);
  return positions;
}

// Kernels read a feature map as a dense (N, C, P) array ("channels first", the default
// contiguous layout) or as a dense (N, P, C) array ("channels last"). Any other strides
// are copied into channels-first once; both dense layouts are read in place.
enum class Layout { ChannelsFirst, ChannelsLast };

// Order of dims that makes a channels-last feature map contiguous: (0, 2, ..., dim-1, 1).
inline std::vector<int64_t> channels_last_order(int64_t dim) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < dim; ++d) order.push_back(d);
  order.push_back(1);
  return order;
}

inline bool is_dense_in(const at::Tensor& x, Layout layout) {
  return layout == Layout::ChannelsFirst
             ? x.is_contiguous()
             : x.permute(channels_last_order(x.dim())).is_contiguous();
}

// The layout a kernel works in for `x` (and in which it writes outputs shaped like `x`).
inline Layout choose_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return Layout::ChannelsFirst;
  return is_dense_in(x, Layout::ChannelsLast) ? Layout::ChannelsLast : Layout::ChannelsFirst;
}

// {batch stride, row stride} of the rows a kernel walks in `layout`, when every row is
// contiguous: channels first, the (n, c) runs of P positions (row stride: that of the
// channels); channels last, the (n, p) runs of C channels (row stride: that of the
// positions, whose dims must merge into one). The row starts may be strided or overlap (a
// channel slice, an expanded tensor): kernels that take these strides read such an input in
// place. nullopt when the rows are not contiguous.
inline std::optional<std::pair<int64_t, int64_t>> row_strides(const at::Tensor& t, Layout layout) {
  const int64_t dim = t.dim();
  if (layout == Layout::ChannelsFirst) {
    int64_t expected = 1;
    for (int64_t d = dim - 1; d >= 2; --d) {
      if (t.size(d) != 1 && t.stride(d) != expected) return std::nullopt;
      expected *= t.size(d);
    }
    return std::make_pair(t.stride(0), t.stride(1));
  }
  if (t.size(1) != 1 && t.stride(1) != 1) return std::nullopt;
  std::optional<int64_t> position_stride, expected;
  for (int64_t d = dim - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (!expected.has_value()) {
      position_stride = t.stride(d);
    } else if (t.stride(d) != *expected) {
      return std::nullopt;
    }
    expected = t.stride(d) * t.size(d);
  }
  return std::make_pair(t.stride(0), position_stride.value_or(t.size(1)));
}

// choose_layout, except that an input whose rows are contiguous only channels-last (a
// channel slice of a channels-last tensor) is worked on channels-last, where it can be read
// in place by kernels that take row strides.
inline Layout choose_row_layout(const at::Tensor& x) {
  const Layout layout = choose_layout(x);
  if (layout == Layout::ChannelsFirst && !x.is_contiguous() &&
      !row_strides(x, Layout::ChannelsFirst) && row_strides(x, Layout::ChannelsLast)) {
    return Layout::ChannelsLast;
  }
  return layout;
}

// `x` itself when it is already dense in `layout`, else one copy into it.
inline at::Tensor to_layout(const at::Tensor& x, Layout layout) {
  if (is_dense_in(x, layout)) return x;
  if (layout == Layout::ChannelsFirst) return x.contiguous();
  const auto order = channels_last_order(x.dim());
  std::vector<int64_t> inverse(order.size());
  for (size_t i = 0; i < order.size(); ++i) inverse[order[i]] = static_cast<int64_t>(i);
  return x.permute(order).contiguous().permute(inverse);
}

// An uninitialised tensor of `sizes` (N, C, *S) stored densely in `layout`.
inline at::Tensor empty_in_layout(c10::SymIntArrayRef sizes, const at::TensorOptions& options,
                                  Layout layout) {
  const int64_t dim = static_cast<int64_t>(sizes.size());
  std::vector<c10::SymInt> strides(dim);
  c10::SymInt stride = 1;
  const auto order = layout == Layout::ChannelsFirst ? std::vector<int64_t>{} : channels_last_order(dim);
  for (int64_t i = dim - 1; i >= 0; --i) {
    const int64_t d = layout == Layout::ChannelsFirst ? i : order[i];
    strides[d] = stride;
    stride = stride * sizes[d];
  }
  return at::empty_strided_symint(sizes, strides, options);
}

// An uninitialised tensor like the feature map `x` (a result or a gradient of x's shape),
// stored densely in x's kernel layout: what every backend and the Meta kernels return.
inline at::Tensor feature_map_like(const at::Tensor& x) {
  return empty_in_layout(x.sym_sizes(), x.options(), choose_layout(x));
}

}  // namespace ops
}  // namespace cnn_attention
