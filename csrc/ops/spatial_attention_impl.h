#pragma once

// The device-independent half of the spatial attention kernels (soft_attention,
// soft_attention_pool, hard_attention; see docs/design.md, "One pattern per operator"). Every one
// of them is "weights from scores, then one sweep over the feature map": the weights live on the
// (N, Cs, *S) score map, which for the usual single score channel is C times smaller than x, so
// they are computed here once with ATen calls in the accumulation dtype (sigmoid, a row softmax, a
// row selection for top-k), while each backend implements the sweeps over x
// (SpatialAttentionBackend).
//
// soft_attention / hard_attention forward:  w = weights(scores);  y = x * w
//   backward: (grad_x, grad_w) = scale_backward(grad_y, x, w);  grad_scores from grad_w
// soft_attention_pool forward:  a = softmax(scores / T);  out = pool(x, a)
//   backward: (grad_x, grad_a) = scale_backward(grad_out broadcast over positions, x, a)
// so the forward of soft/hard attention moves 3|x| bytes and the backward 4|x|.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "dispatch.h"
#include "spatial_attention.h"

namespace cnn_attention {
namespace ops {

// The private operators, the argument checks every backend shares, and the results' layouts
// (internal: the installed headers carry the public operators only).

namespace detail {

// Each returns (grad_x, grad_scores).
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor> _soft_attention_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scores,
    c10::string_view normalize, double temperature);

CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor> _soft_attention_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scores, double temperature);

// `mask` is the forward's in top-k mode; in threshold mode it is None and the backward
// recomputes it from the scores (one read of x-sized data less with a score channel per channel).
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor> _hard_attention_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scores,
    const std::optional<at::Tensor>& mask, c10::string_view mode, double threshold,
    c10::string_view estimator, double temperature);

}  // namespace detail

enum class SoftNormalize { Sigmoid, Softmax };
enum class HardMode { Threshold, TopK };
enum class HardEstimator { Sigmoid, Identity };

struct HardAttentionModes {
  HardMode mode;
  HardEstimator estimator;
};

// Every check of docs/design.md section 1 on the arguments, shared by every backend so that
// all raise the same messages.
SoftNormalize check_soft_attention_args(const at::Tensor& x, const at::Tensor& scores,
                                        c10::string_view normalize, double temperature);
SoftNormalize check_soft_attention_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& scores,
                                                 c10::string_view normalize, double temperature);
void check_soft_attention_pool_args(const at::Tensor& x, const at::Tensor& scores,
                                    double temperature);
void check_soft_attention_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& scores, double temperature);
HardAttentionModes check_hard_attention_args(const at::Tensor& x, const at::Tensor& scores,
                                             c10::string_view mode, double threshold, int64_t k,
                                             c10::string_view estimator, double temperature);
HardAttentionModes check_hard_attention_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& scores,
                                                      const std::optional<at::Tensor>& mask,
                                                      c10::string_view mode, double threshold,
                                                      c10::string_view estimator,
                                                      double temperature);

// The checks of the options that the modules share with the operators: each names `op` (the
// operator or the module whose option it is) and, for strings, the accepted values.
void check_temperature(const char* op, double temperature);
SoftNormalize parse_normalize(const char* op, c10::string_view normalize);
HardMode parse_mode(const char* op, c10::string_view mode);
HardEstimator parse_estimator(const char* op, c10::string_view estimator);

// Sizes of a sweep: x is (N, C, P) (channels first) or (N, P, C) (channels last), the
// weights (N, Cs, P) with Cs = 1 or C (one (N, P) array when Cs = 1).
struct SweepExtent {
  int64_t batch, channels, positions, score_channels;
  int64_t numel() const { return batch * channels * positions; }
  bool shared() const { return score_channels == 1; }
};

inline SweepExtent sweep_extent_of(const at::Tensor& x, const at::Tensor& weights) {
  return {x.size(0), x.size(1), num_positions(x), weights.size(1)};
}

// Results laid out like x (and score-shaped results in the same layout), for every backend.
at::Tensor spatial_attention_output_like(const at::Tensor& x);
at::Tensor spatial_attention_scores_like(const at::Tensor& scores, const at::Tensor& x);
at::Tensor soft_attention_pool_output_like(const at::Tensor& x);

// With a score map of C channels the weights are as large as x, so rather than storing
// them a backend may compute each from its score on the fly (SpatialAttentionBackend::
// scale_by_scores): the forward weight a(s) and, in the backward, the factor b(s) of the
// score gradient, grad_scores = grad * x * b.
struct ElementwiseWeights {
  enum class Weight { Sigmoid, Threshold, Mask };  // sigmoid(s / T), sigmoid(s / T) > t, mask
  enum class ScoreFactor { Sigmoid, Identity };    // sigmoid'(s / T) / T, 1
  Weight weight;
  ScoreFactor score_factor;
  double temperature, threshold;
};

// Weights are (N, Cs, *S) in the accumulation dtype (float32 for half types, else the
// dtype of x), stored densely in the kernel layout of x: for Cs == 1 both layouts are the
// same (N, P) array; for Cs == C the weights line up element for element with x.
// What a backend supplies.
struct SpatialAttentionBackend {
  // y = x * w, w broadcast over the channels when Cs == 1.
  void (*scale)(const at::Tensor& x, const at::Tensor& weights, at::Tensor& y, Layout layout);
  // grad_x = grad * w and grad_w = sum over the broadcast channels of grad * x, in one
  // read of grad and x. grad is laid out like x, or is (N, C) (constant over positions:
  // the gradient of an attention pooling).
  void (*scale_backward)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weights,
                         at::Tensor& grad_x, at::Tensor& grad_weights, Layout layout);
  // out (N, C) = sum over positions of x * w.
  void (*pool)(const at::Tensor& x, const at::Tensor& weights, at::Tensor& out, Layout layout);
  // The 0/1 mask of the k largest scores of each sample and score channel, ties to the
  // lower index, NaN ranked as +inf; `scores` (accumulation dtype) and the mask are stored
  // like the weights.
  at::Tensor (*top_k_mask)(const at::Tensor& scores, int64_t k, Layout layout);
  // sigmoid(s / T) of a map `s` in the accumulation dtype, a new tensor stored like `s`.
  at::Tensor (*position_sigmoid)(const at::Tensor& s, double temperature);
  // factor * softmax(s / T) over the positions of each sample and score channel, and its
  // backward (factor * d loss / d s from d loss / d p and the probabilities p, factor 1):
  // `s`, `p` and `grad_p` in the accumulation dtype, stored like the weights, and so are the
  // results. Each result is rounded as the softmax's (its backward's) result times `factor`
  // in a second step would be (factor P: the weights P p of soft_attention without a pass of
  // their own). The sum over a row of any length must not stall (a float sum stops growing at
  // 2^24 times its terms).
  at::Tensor (*position_softmax)(const at::Tensor& s, double temperature, double factor,
                                 Layout layout);
  at::Tensor (*position_softmax_backward)(const at::Tensor& grad_p, const at::Tensor& p,
                                          double temperature, double factor, Layout layout);
  // Whether x and grad may come with strided row starts (see row_strides); if not, they
  // arrive dense in `layout`. Everything else (weights, outputs) is always dense.
  bool reads_strided_rows;
  // Optional (nullptr: the weights are stored): for Cs == C, every tensor dense in one layout
  // and of the dtype of x. Forward: y = x * a(s), and mask = a(s) when mask is defined.
  void (*scale_by_scores)(const at::Tensor& x, const at::Tensor& scores,
                          const ElementwiseWeights& how, at::Tensor& y, at::Tensor& mask);
  // Backward: grad_x = grad * a, grad_scores = grad * x * b(s); `mask` is a for Weight::Mask
  // (undefined otherwise: a is recomputed from s).
  void (*scale_by_scores_backward)(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& scores, const at::Tensor& mask,
                                   const ElementwiseWeights& how, at::Tensor& grad_x,
                                   at::Tensor& grad_scores);
  // Optional as well, same conditions: the softmax weights w = P * softmax(s / T over the
  // positions of each sample and channel), computed from the scores where they are used
  // instead of stored. Forward: y = x * w. Backward: grad_x = grad * w, grad_scores =
  // w * (grad * x - sum over positions of grad * x * w / P) / T. Each recomputes the rows'
  // maximum and sum of exponentials from s, so x-sized maps are read a few times and written
  // once, where the stored weights take a write and a read of their own at every step.
  // soft_attention_pool's as well: where y is (N, C) the forward gives the mean over the
  // positions of x * w (the sum of x * softmax), and where grad is (N, C) the backward takes
  // it as that mean's gradient (grad / P at every position).
  void (*softmax_scale_by_scores)(const at::Tensor& x, const at::Tensor& scores,
                                  double temperature, at::Tensor& y, Layout layout);
  void (*softmax_scale_by_scores_backward)(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& scores, double temperature,
                                           at::Tensor& grad_x, at::Tensor& grad_scores,
                                           Layout layout);
};

// position_sigmoid with ATen's sigmoid (any device whose sigmoid does not depend on the
// thread count; ATen's CPU kernel does).
at::Tensor aten_position_sigmoid(const at::Tensor& s, double temperature);

// position_softmax and its backward with ATen's softmax (any device whose softmax sums long
// rows exactly enough; ATen's CPU kernels do not: their vector sums stall at 2^24 per lane).
at::Tensor aten_position_softmax(const at::Tensor& s, double temperature, double factor,
                                 Layout layout);
at::Tensor aten_position_softmax_backward(const at::Tensor& grad_p, const at::Tensor& p,
                                          double temperature, double factor, Layout layout);

// top_k_mask with ATen calls only (any device): the k-th largest value of each row by
// selection, then everything above it and the first ties by index.
at::Tensor top_k_mask_by_kthvalue(const at::Tensor& scores, int64_t k, Layout layout);

at::Tensor soft_attention_forward(const SpatialAttentionBackend& backend, const at::Tensor& x,
                                  const at::Tensor& scores, c10::string_view normalize,
                                  double temperature);
std::tuple<at::Tensor, at::Tensor> soft_attention_backward(
    const SpatialAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& scores, c10::string_view normalize, double temperature);

at::Tensor soft_attention_pool_forward(const SpatialAttentionBackend& backend, const at::Tensor& x,
                                       const at::Tensor& scores, double temperature);
std::tuple<at::Tensor, at::Tensor> soft_attention_pool_backward(
    const SpatialAttentionBackend& backend, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& scores, double temperature);

std::tuple<at::Tensor, at::Tensor> hard_attention_forward(const SpatialAttentionBackend& backend,
                                                          const at::Tensor& x,
                                                          const at::Tensor& scores,
                                                          c10::string_view mode, double threshold,
                                                          int64_t k, c10::string_view estimator,
                                                          double temperature);
std::tuple<at::Tensor, at::Tensor> hard_attention_backward(
    const SpatialAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& scores, const std::optional<at::Tensor>& mask, c10::string_view mode,
    double threshold, c10::string_view estimator, double temperature);

// The operators' kernels on one backend: TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) calls
// register_spatial_attention_kernels<kCpuBackend>(m).
template <const SpatialAttentionBackend& kBackend>
void register_spatial_attention_kernels(torch::Library& m) {
  m.impl("soft_attention", TORCH_FN((OnBackend<soft_attention_forward, kBackend>::kernel)));
  m.impl("_soft_attention_backward",
         TORCH_FN((OnBackend<soft_attention_backward, kBackend>::kernel)));
  m.impl("soft_attention_pool",
         TORCH_FN((OnBackend<soft_attention_pool_forward, kBackend>::kernel)));
  m.impl("_soft_attention_pool_backward",
         TORCH_FN((OnBackend<soft_attention_pool_backward, kBackend>::kernel)));
  m.impl("hard_attention", TORCH_FN((OnBackend<hard_attention_forward, kBackend>::kernel)));
  m.impl("_hard_attention_backward",
         TORCH_FN((OnBackend<hard_attention_backward, kBackend>::kernel)));
}

}  // namespace ops
}  // namespace cnn_attention
