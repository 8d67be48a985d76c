#include "spatial_attention_impl.h"

#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace cnn_attention {
namespace ops {

namespace {

// x or grad_y as the sweeps read it: in place when they can, else dense in `layout`.
at::Tensor sweep_input(const at::Tensor& t, Layout layout, const SpatialAttentionBackend& backend) {
  return backend.reads_strided_rows && row_strides(t, layout) ? t : to_layout(t, layout);
}

// The score map in the accumulation dtype, stored like the weights.
at::Tensor scores_for_weights(const at::Tensor& scores, const at::Tensor& x, Layout layout) {
  return to_layout(scores, layout).to(at::toOpMathType(x.scalar_type()));
}

at::Tensor divided(const at::Tensor& s, double temperature) {
  return temperature == 1.0 ? s : s / temperature;
}

// A map stored like the weights, seen without a copy as rows of positions for a softmax:
// (N, Cs, P) with positions in dim 2 (channels first, or one score channel), or (N, P, Cs)
// with positions in dim 1 (channels last with Cs = C, so the softmax runs across
// contiguous channels). Returns the view and the dim of the positions.
std::pair<at::Tensor, int64_t> positions_view(const at::Tensor& t, Layout layout) {
  if (layout == Layout::ChannelsFirst || t.size(1) == 1) return {t.flatten(2), 2};
  return {t.permute(channels_last_order(t.dim())).flatten(1, -2), 1};
}

// A result on positions_view(like) back to the shape and layout of `like`.
at::Tensor from_positions_view(const at::Tensor& rows, const at::Tensor& like, Layout layout) {
  if (layout == Layout::ChannelsFirst || like.size(1) == 1) {
    return to_layout(rows.reshape(like.sizes()), layout);
  }
  const auto order = channels_last_order(like.dim());
  std::vector<int64_t> permuted_sizes, inverse(order.size());
  for (size_t i = 0; i < order.size(); ++i) {
    permuted_sizes.push_back(like.size(order[i]));
    inverse[order[i]] = static_cast<int64_t>(i);
  }
  return to_layout(rows.reshape(permuted_sizes).permute(inverse), layout);
}

}  // namespace

at::Tensor aten_position_sigmoid(const at::Tensor& s, double temperature) {
  return at::sigmoid(divided(s, temperature));
}

at::Tensor aten_position_softmax(const at::Tensor& s, double temperature, double factor,
                                 Layout layout) {
  const at::Tensor part = divided(s, temperature);
  const auto [rows, dim] = positions_view(part, layout);
  const at::Tensor p = from_positions_view(at::_softmax(rows, dim, false), part, layout);
  return factor == 1.0 ? p : p.mul_(factor);
}

at::Tensor aten_position_softmax_backward(const at::Tensor& grad_p, const at::Tensor& p,
                                          double temperature, double factor, Layout layout) {
  const auto [rows, dim] = positions_view(p, layout);
  const auto grad_rows = positions_view(grad_p, layout).first;
  const at::Tensor grad_s =
      from_positions_view(at::_softmax_backward_data(grad_rows, rows, dim, p.scalar_type()), p,
                          layout)
          .div_(temperature);
  return factor == 1.0 ? grad_s : grad_s.mul_(factor);
}

namespace {

// Whether the weights are computed per element by the backend instead of stored (see
// ElementwiseWeights): a score channel per channel of x and a backend that can.
bool elementwise(const at::Tensor& x, const at::Tensor& scores,
                 const SpatialAttentionBackend& backend) {
  return backend.scale_by_scores != nullptr && scores.size(1) == x.size(1) && x.size(1) > 1;
}

// The same for softmax weights (SpatialAttentionBackend::softmax_scale_by_scores).
bool elementwise_softmax(const at::Tensor& x, const at::Tensor& scores,
                         const SpatialAttentionBackend& backend) {
  return backend.softmax_scale_by_scores != nullptr && scores.size(1) == x.size(1) &&
         x.size(1) > 1;
}

at::Tensor threshold_mask(const SpatialAttentionBackend& backend, const at::Tensor& s,
                          double threshold, double temperature) {
  return backend.position_sigmoid(s, temperature).gt_(threshold);
}

}  // namespace

// The k largest of each row, ties to the lower index: the k-th largest value is found by
// selection (at::kthvalue, not a sort), everything above it is kept, and of the values equal
// to it the first ones by index fill the remaining places. NaN ranks as +inf.
at::Tensor top_k_mask_by_kthvalue(const at::Tensor& s, int64_t k, Layout layout) {
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor rows = at::nan_to_num(s.flatten(2), inf, inf, -inf);
  const int64_t positions = rows.size(-1);
  const at::Tensor kth = std::get<0>(at::kthvalue(rows, positions - k + 1, -1, /*keepdim=*/true));
  const at::Tensor above = rows > kth;
  const at::Tensor tied = rows == kth;
  const at::Tensor places_left = above.sum(-1, /*keepdim=*/true, at::kLong).neg_().add_(k);
  const at::Tensor first_tied = tied.logical_and(at::cumsum(tied, -1, at::kLong) <= places_left);
  return to_layout(above.logical_or_(first_tied).to(s.scalar_type()).reshape(s.sizes()), layout);
}

at::Tensor soft_attention_forward(const SpatialAttentionBackend& backend, const at::Tensor& x,
                                  const at::Tensor& scores, c10::string_view normalize,
                                  double temperature) {
  const SoftNormalize mode = check_soft_attention_args(x, scores, normalize, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_row_layout(x);
  at::Tensor y = spatial_attention_output_like(x);
  if (y.numel() == 0) return y;
  if (mode == SoftNormalize::Sigmoid && elementwise(x, scores, backend)) {
    const ElementwiseWeights how{ElementwiseWeights::Weight::Sigmoid,
                                 ElementwiseWeights::ScoreFactor::Sigmoid, temperature, 0.0};
    at::Tensor no_mask;
    backend.scale_by_scores(to_layout(x, layout), to_layout(scores, layout), how, y, no_mask);
    return y;
  }
  if (mode == SoftNormalize::Softmax && elementwise_softmax(x, scores, backend)) {
    backend.softmax_scale_by_scores(to_layout(x, layout), to_layout(scores, layout), temperature,
                                    y, layout);
    return y;
  }
  const at::Tensor s = scores_for_weights(scores, x, layout);
  at::Tensor weights;
  if (mode == SoftNormalize::Sigmoid) {
    weights = backend.position_sigmoid(s, temperature);
  } else {
    // P * softmax keeps the mean weight 1 (uniform scores are the identity).
    weights =
        backend.position_softmax(s, temperature, static_cast<double>(num_positions(x)), layout);
  }
  backend.scale(sweep_input(x, layout, backend), weights, y, layout);
  return y;
}

std::tuple<at::Tensor, at::Tensor> soft_attention_backward(
    const SpatialAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& scores, c10::string_view normalize, double temperature) {
  const SoftNormalize mode =
      check_soft_attention_backward_args(grad_y, x, scores, normalize, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_row_layout(x);
  at::Tensor grad_x = spatial_attention_output_like(x);
  at::Tensor grad_scores = spatial_attention_scores_like(scores, x);
  if (x.numel() == 0) return {grad_x, grad_scores.zero_()};
  if (mode == SoftNormalize::Sigmoid && elementwise(x, scores, backend)) {
    const ElementwiseWeights how{ElementwiseWeights::Weight::Sigmoid,
                                 ElementwiseWeights::ScoreFactor::Sigmoid, temperature, 0.0};
    backend.scale_by_scores_backward(to_layout(grad_y, layout), to_layout(x, layout),
                                     to_layout(scores, layout), at::Tensor(), how, grad_x,
                                     grad_scores);
    return {grad_x, grad_scores};
  }
  if (mode == SoftNormalize::Softmax && elementwise_softmax(x, scores, backend)) {
    backend.softmax_scale_by_scores_backward(to_layout(grad_y, layout), to_layout(x, layout),
                                             to_layout(scores, layout), temperature, grad_x,
                                             grad_scores, layout);
    return {grad_x, grad_scores};
  }

  const at::Tensor s = scores_for_weights(scores, x, layout);
  at::Tensor weights, probabilities;
  if (mode == SoftNormalize::Sigmoid) {
    weights = backend.position_sigmoid(s, temperature);
  } else {
    probabilities = backend.position_softmax(s, temperature, 1.0, layout);
    weights = probabilities * static_cast<double>(num_positions(x));
  }
  at::Tensor grad_weights = at::empty_like(weights);
  backend.scale_backward(sweep_input(grad_y, layout, backend), sweep_input(x, layout, backend),
                         weights, grad_x, grad_weights, layout);
  if (mode == SoftNormalize::Sigmoid) {
    grad_scores.copy_(grad_weights.mul_(weights * (1 - weights)).div_(temperature));
  } else {
    // w = P a, so d loss / d a = P d loss / d w.
    grad_scores.copy_(backend.position_softmax_backward(
        grad_weights, probabilities, temperature, static_cast<double>(num_positions(x)), layout));
  }
  return {grad_x, grad_scores};
}

at::Tensor soft_attention_pool_forward(const SpatialAttentionBackend& backend, const at::Tensor& x,
                                       const at::Tensor& scores, double temperature) {
  check_soft_attention_pool_args(x, scores, temperature);
  const c10::DeviceGuard device_guard(x.device());
  at::Tensor out = soft_attention_pool_output_like(x);
  if (out.numel() == 0) return out;
  // A sum over no positions.
  if (num_positions(x) == 0) return out.zero_();
  const Layout layout = choose_row_layout(x);
  if (elementwise_softmax(x, scores, backend)) {
    // The mean over positions of x * P softmax is the sum of x * softmax.
    backend.softmax_scale_by_scores(to_layout(x, layout), to_layout(scores, layout), temperature,
                                    out, layout);
    return out;
  }
  const at::Tensor probabilities =
      backend.position_softmax(scores_for_weights(scores, x, layout), temperature, 1.0, layout);
  backend.pool(sweep_input(x, layout, backend), probabilities, out, layout);
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_attention_pool_backward(
    const SpatialAttentionBackend& backend, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& scores, double temperature) {
  check_soft_attention_pool_backward_args(grad_out, x, scores, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_row_layout(x);
  at::Tensor grad_x = spatial_attention_output_like(x);
  at::Tensor grad_scores = spatial_attention_scores_like(scores, x);
  if (x.numel() == 0) return {grad_x, grad_scores.zero_()};
  if (elementwise_softmax(x, scores, backend)) {
    backend.softmax_scale_by_scores_backward(grad_out.contiguous(), to_layout(x, layout),
                                             to_layout(scores, layout), temperature, grad_x,
                                             grad_scores, layout);
    return {grad_x, grad_scores};
  }

  const at::Tensor probabilities =
      backend.position_softmax(scores_for_weights(scores, x, layout), temperature, 1.0, layout);
  at::Tensor grad_probabilities = at::empty_like(probabilities);
  // out[n, c] = sum_p a[p] x[n, c, p]: the gradient reaching every position is grad_out[n, c].
  backend.scale_backward(grad_out.contiguous(), sweep_input(x, layout, backend), probabilities,
                         grad_x, grad_probabilities, layout);
  grad_scores.copy_(backend.position_softmax_backward(grad_probabilities, probabilities,
                                                      temperature, 1.0, layout));
  return {grad_x, grad_scores};
}

std::tuple<at::Tensor, at::Tensor> hard_attention_forward(const SpatialAttentionBackend& backend,
                                                          const at::Tensor& x,
                                                          const at::Tensor& scores,
                                                          c10::string_view mode, double threshold,
                                                          int64_t k, c10::string_view estimator,
                                                          double temperature) {
  const HardAttentionModes modes =
      check_hard_attention_args(x, scores, mode, threshold, k, estimator, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_row_layout(x);
  at::Tensor y = spatial_attention_output_like(x);
  at::Tensor mask = spatial_attention_scores_like(scores, x);
  if (mask.numel() == 0) return {y, mask};
  if (modes.mode == HardMode::Threshold && elementwise(x, scores, backend)) {
    const ElementwiseWeights how{ElementwiseWeights::Weight::Threshold,
                                 ElementwiseWeights::ScoreFactor::Identity, temperature,
                                 threshold};
    backend.scale_by_scores(to_layout(x, layout), to_layout(scores, layout), how, y, mask);
    return {y, mask};
  }
  const at::Tensor s = scores_for_weights(scores, x, layout);
  const at::Tensor weights = modes.mode == HardMode::TopK
                                 ? backend.top_k_mask(s, k, layout)
                                 : threshold_mask(backend, s, threshold, temperature);
  mask.copy_(weights);
  if (y.numel() > 0) backend.scale(sweep_input(x, layout, backend), weights, y, layout);
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> hard_attention_backward(
    const SpatialAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& scores, const std::optional<at::Tensor>& mask, c10::string_view mode,
    double threshold, c10::string_view estimator, double temperature) {
  const HardAttentionModes modes = check_hard_attention_backward_args(
      grad_y, x, scores, mask, mode, threshold, estimator, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_row_layout(x);
  at::Tensor grad_x = spatial_attention_output_like(x);
  at::Tensor grad_scores = spatial_attention_scores_like(scores, x);
  if (x.numel() == 0) return {grad_x, grad_scores.zero_()};

  // Straight through: the forward's 0/1 mask scales grad_x, the surrogate's derivative
  // scales grad_scores. A threshold mask is recomputed from the scores exactly as the
  // forward computed it (same code, same scores), so it is the forward's bit for bit.
  const bool threshold_mode = modes.mode == HardMode::Threshold;
  if (elementwise(x, scores, backend)) {
    const ElementwiseWeights how{
        threshold_mode ? ElementwiseWeights::Weight::Threshold : ElementwiseWeights::Weight::Mask,
        modes.estimator == HardEstimator::Sigmoid ? ElementwiseWeights::ScoreFactor::Sigmoid
                                                  : ElementwiseWeights::ScoreFactor::Identity,
        temperature, threshold};
    backend.scale_by_scores_backward(to_layout(grad_y, layout), to_layout(x, layout),
                                     to_layout(scores, layout),
                                     threshold_mode ? at::Tensor() : to_layout(*mask, layout), how,
                                     grad_x, grad_scores);
    return {grad_x, grad_scores};
  }
  const at::Tensor s = scores_for_weights(scores, x, layout);
  const at::Tensor weights =
      threshold_mode ? threshold_mask(backend, s, threshold, temperature)
                     : to_layout(*mask, layout).to(at::toOpMathType(x.scalar_type()));
  at::Tensor grad_weights = at::empty_like(weights);
  backend.scale_backward(sweep_input(grad_y, layout, backend), sweep_input(x, layout, backend),
                         weights, grad_x, grad_weights, layout);
  if (modes.estimator == HardEstimator::Sigmoid) {
    const at::Tensor soft = backend.position_sigmoid(s, temperature);
    grad_weights.mul_(soft * (1 - soft)).div_(temperature);
  }
  grad_scores.copy_(grad_weights);
  return {grad_x, grad_scores};
}

}  // namespace ops
}  // namespace cnn_attention
