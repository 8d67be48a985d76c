#include "spatial_attention.h"

#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

#include "common.h"
#include "dispatch.h"
#include "spatial_attention_impl.h"

namespace cnn_attention {
namespace ops {

namespace {
constexpr const char* kSoft = "soft_attention";
constexpr const char* kSoftPool = "soft_attention_pool";
constexpr const char* kHard = "hard_attention";
}  // namespace

at::Tensor soft_attention(const at::Tensor& x, const at::Tensor& scores, c10::string_view normalize,
                          double temperature) {
  static auto op = find_op<decltype(soft_attention)>("cnn_attention::soft_attention");
  return op.call(x, scores, normalize, temperature);
}

at::Tensor soft_attention_pool(const at::Tensor& x, const at::Tensor& scores, double temperature) {
  static auto op = find_op<decltype(soft_attention_pool)>("cnn_attention::soft_attention_pool");
  return op.call(x, scores, temperature);
}

std::tuple<at::Tensor, at::Tensor> hard_attention(const at::Tensor& x, const at::Tensor& scores,
                                                  c10::string_view mode, double threshold,
                                                  int64_t k, c10::string_view estimator,
                                                  double temperature) {
  static auto op = find_op<decltype(hard_attention)>("cnn_attention::hard_attention");
  return op.call(x, scores, mode, threshold, k, estimator, temperature);
}

namespace detail {

std::tuple<at::Tensor, at::Tensor> _soft_attention_backward(const at::Tensor& grad_y,
                                                            const at::Tensor& x,
                                                            const at::Tensor& scores,
                                                            c10::string_view normalize,
                                                            double temperature) {
  static auto op =
      find_op<decltype(_soft_attention_backward)>("cnn_attention::_soft_attention_backward");
  return op.call(grad_y, x, scores, normalize, temperature);
}

std::tuple<at::Tensor, at::Tensor> _soft_attention_pool_backward(const at::Tensor& grad_out,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& scores,
                                                                 double temperature) {
  static auto op = find_op<decltype(_soft_attention_pool_backward)>(
      "cnn_attention::_soft_attention_pool_backward");
  return op.call(grad_out, x, scores, temperature);
}

std::tuple<at::Tensor, at::Tensor> _hard_attention_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scores,
    const std::optional<at::Tensor>& mask, c10::string_view mode, double threshold,
    c10::string_view estimator, double temperature) {
  static auto op =
      find_op<decltype(_hard_attention_backward)>("cnn_attention::_hard_attention_backward");
  return op.call(grad_y, x, scores, mask, mode, threshold, estimator, temperature);
}

}  // namespace detail

namespace {

// scores is (N, 1, *S) or (N, C, *S) for x (N, C, *S), with the dtype and device of x.
void check_scores(const char* op, const at::Tensor& x, const at::Tensor& scores) {
  check_feature_map(op, "x", x);
  bool matches = scores.dim() == x.dim() && scores.sym_size(0) == x.sym_size(0) &&
                 (scores.sym_size(1) == 1 || scores.sym_size(1) == x.sym_size(1));
  for (int64_t d = 2; matches && d < x.dim(); ++d) {
    matches = scores.sym_size(d) == x.sym_size(d);
  }
  if (!matches) {
    std::ostringstream expected;
    expected << "(" << x.sym_size(0) << ", 1 or " << x.sym_size(1);
    for (int64_t d = 2; d < x.dim(); ++d) expected << ", " << x.sym_size(d);
    expected << ")";
    TORCH_CHECK(false, op, ": scores must be (N, 1, *S) or (N, C, *S) = ", expected.str(), ", got ",
                format_sizes(scores.sym_sizes()));
  }
  check_like(op, "x", x, "scores", scores);
}

void check_grad_like_x(const char* op, const char* name, const at::Tensor& grad,
                       const at::Tensor& x) {
  check_like(op, "x", x, name, grad);
  check_sizes(op, name, grad, x.sym_sizes().vec(), "the size of x");
}

}  // namespace

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
              ": temperature must be finite and positive, got ", temperature);
}

SoftNormalize parse_normalize(const char* op, c10::string_view normalize) {
  return parse_choice<SoftNormalize>(
      op, "normalize", normalize,
      {{"sigmoid", SoftNormalize::Sigmoid}, {"softmax", SoftNormalize::Softmax}});
}

HardMode parse_mode(const char* op, c10::string_view mode) {
  return parse_choice<HardMode>(op, "mode", mode,
                                {{"threshold", HardMode::Threshold}, {"topk", HardMode::TopK}});
}

HardEstimator parse_estimator(const char* op, c10::string_view estimator) {
  return parse_choice<HardEstimator>(
      op, "estimator", estimator,
      {{"sigmoid", HardEstimator::Sigmoid}, {"identity", HardEstimator::Identity}});
}

SoftNormalize check_soft_attention_args(const at::Tensor& x, const at::Tensor& scores,
                                        c10::string_view normalize, double temperature) {
  check_scores(kSoft, x, scores);
  const SoftNormalize mode = parse_normalize(kSoft, normalize);
  check_temperature(kSoft, temperature);
  return mode;
}

SoftNormalize check_soft_attention_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& scores,
                                                 c10::string_view normalize, double temperature) {
  const SoftNormalize mode = check_soft_attention_args(x, scores, normalize, temperature);
  check_grad_like_x(kSoft, "grad_y", grad_y, x);
  return mode;
}

void check_soft_attention_pool_args(const at::Tensor& x, const at::Tensor& scores,
                                    double temperature) {
  check_scores(kSoftPool, x, scores);
  check_temperature(kSoftPool, temperature);
}

void check_soft_attention_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& scores, double temperature) {
  check_soft_attention_pool_args(x, scores, temperature);
  check_like(kSoftPool, "x", x, "grad_out", grad_out);
  check_sizes(kSoftPool, "grad_out", grad_out, {x.sym_size(0), x.sym_size(1)}, "(N, C)");
}

namespace {

// What the forward and the backward of hard_attention check alike.
HardAttentionModes check_hard_attention_modes(const at::Tensor& x, const at::Tensor& scores,
                                              c10::string_view mode, double threshold,
                                              c10::string_view estimator, double temperature) {
  check_scores(kHard, x, scores);
  const HardAttentionModes modes{parse_mode(kHard, mode), parse_estimator(kHard, estimator)};
  check_temperature(kHard, temperature);
  if (modes.mode == HardMode::Threshold) {
    TORCH_CHECK(std::isfinite(threshold) && threshold >= 0 && threshold <= 1, kHard,
                ": threshold must be finite and in [0, 1], got ", threshold);
  }
  return modes;
}

}  // namespace

HardAttentionModes check_hard_attention_args(const at::Tensor& x, const at::Tensor& scores,
                                             c10::string_view mode, double threshold, int64_t k,
                                             c10::string_view estimator, double temperature) {
  const HardAttentionModes modes =
      check_hard_attention_modes(x, scores, mode, threshold, estimator, temperature);
  if (modes.mode == HardMode::TopK) {
    const c10::SymInt positions = sym_positions(x);
    // With no positions there is nothing to select and the result is empty.
    TORCH_CHECK(k >= 1 && (positions == 0 || positions >= k), kHard,
                ": k must be in [1, P] with P = ", positions, " in top-k mode, got ", k);
  }
  return modes;
}

HardAttentionModes check_hard_attention_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& scores,
                                                      const std::optional<at::Tensor>& mask,
                                                      c10::string_view mode, double threshold,
                                                      c10::string_view estimator,
                                                      double temperature) {
  const HardAttentionModes modes =
      check_hard_attention_modes(x, scores, mode, threshold, estimator, temperature);
  check_grad_like_x(kHard, "grad_y", grad_y, x);
  const bool given_mask = mask.has_value() && mask->defined();
  if (modes.mode == HardMode::Threshold) {
    // A mask given here could disagree with the scores it would be recomputed from.
    TORCH_CHECK(!given_mask, kHard,
                ": mask must be None in threshold mode (the backward recomputes it from scores)");
  } else {
    TORCH_CHECK(given_mask, kHard, ": mask must be a tensor in top-k mode, got None");
    check_like(kHard, "x", x, "mask", *mask);
    check_sizes(kHard, "mask", *mask, scores.sym_sizes().vec(), "the size of scores");
  }
  return modes;
}

at::Tensor spatial_attention_output_like(const at::Tensor& x) {
  return empty_in_layout(x.sym_sizes(), x.options(), choose_row_layout(x));
}

at::Tensor spatial_attention_scores_like(const at::Tensor& scores, const at::Tensor& x) {
  return empty_in_layout(scores.sym_sizes(), x.options(), choose_row_layout(x));
}

at::Tensor soft_attention_pool_output_like(const at::Tensor& x) {
  return at::empty_symint({x.sym_size(0), x.sym_size(1)}, x.options());
}

TORCH_LIBRARY_FRAGMENT(cnn_attention, m) {
  m.def(
      "soft_attention(Tensor x, Tensor scores, str normalize=\"sigmoid\", "
      "float temperature=1.0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_soft_attention_backward(Tensor grad_y, Tensor x, Tensor scores, str normalize, "
      "float temperature) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def("soft_attention_pool(Tensor x, Tensor scores, float temperature=1.0) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "_soft_attention_pool_backward(Tensor grad_out, Tensor x, Tensor scores, "
      "float temperature) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "hard_attention(Tensor x, Tensor scores, str mode=\"threshold\", float threshold=0.5, "
      "int k=1, str estimator=\"sigmoid\", float temperature=1.0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_hard_attention_backward(Tensor grad_y, Tensor x, Tensor scores, Tensor? mask, "
      "str mode, float threshold, str estimator, float temperature) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace ops
}  // namespace cnn_attention
