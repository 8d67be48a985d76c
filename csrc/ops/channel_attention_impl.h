#pragma once

// The device-independent half of the channel attention kernels (see docs/design.md, "One
// pattern per operator"). A forward or backward pass is two sweeps over the feature map, which
// each backend implements (ChannelAttentionBackend), around a tiny MLP on (N, C) statistics
// that is the same on every device and is written here once in the accumulation dtype, with
// the backend's matrix product (ChannelAttentionBackend::matmul) and elementwise ATen calls.
//
// Forward:  stats = reduce(x);            w = gate(mlp(stats));       y = x * w
// Backward: stats = reduce(x, grad_y);    (w, dstats, dweights) = ...; grad_x = apply(...)
// so the forward moves 3|x| bytes and the backward 4|x| (the position of each channel's
// maximum is found in the backward reduction, so the second backward sweep needs no x).
// channel_gate is the same without the pooling and the MLP: its forward is one apply, its
// backward one reduce that also writes grad_x (3|x| bytes).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "channel_attention.h"
#include "common.h"
#include "dispatch.h"
#include "spatial_attention_impl.h"

namespace cnn_attention {
namespace ops {

// The private operators, the argument checks every backend shares, and the results' layouts
// (internal: the installed headers carry the public operators only).

namespace detail {

// Gradients (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias); the bias gradients are
// returned even when a bias is absent so that the schema has no optional outputs.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
_channel_attention_backward(const at::Tensor& grad_y, const at::Tensor& x,
                            const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                            const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                            c10::string_view pool, c10::string_view gate,
                            c10::string_view activation);

// Gradients (x, logits).
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor> _channel_gate_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& logits,
    c10::string_view gate);

// (y, channel_stats, channel_argmax): also what the backward needs besides the inputs, the
// channel statistics of x, channel_stats (2, N, C) in the accumulation dtype (the means, then
// the maxima over positions), and channel_argmax (N, C) int64 (the first position of each max).
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor> _cbam_forward(
    const at::Tensor& x, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    c10::string_view gate, c10::string_view activation);

// Gradients (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias) from the
// inputs and what _cbam_forward saved; the bias gradients are returned even when a bias is
// absent.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor>
_cbam_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& fc1_weight,
               const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
               const std::optional<at::Tensor>& fc2_bias, const at::Tensor& conv_weight,
               const std::optional<at::Tensor>& conv_bias, const at::Tensor& channel_stats,
               const at::Tensor& channel_argmax, c10::string_view gate,
               c10::string_view activation);

// Gradients (x, conv_weight, conv_bias) of cbam_spatial, recomputing its pooling and
// scores; the bias gradient is returned even when the bias is absent.
CNN_ATTENTION_API std::tuple<at::Tensor, at::Tensor, at::Tensor> _cbam_spatial_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view normalize, double temperature);

}  // namespace detail

enum class ChannelPool { Avg, Max, AvgMax };
enum class ChannelGate { Sigmoid, Softmax, HardSigmoid };
enum class ChannelActivation { Relu, Silu, Gelu, Identity };

struct ChannelAttentionModes {
  ChannelPool pool;
  ChannelGate gate;
  ChannelActivation activation;
};

// Every check of docs/design.md section 1 on the arguments; shared by every backend so that
// all raise the same messages.
ChannelAttentionModes check_channel_attention_args(const at::Tensor& x,
                                                   const at::Tensor& fc1_weight,
                                                   const std::optional<at::Tensor>& fc1_bias,
                                                   const at::Tensor& fc2_weight,
                                                   const std::optional<at::Tensor>& fc2_bias,
                                                   c10::string_view pool, c10::string_view gate,
                                                   c10::string_view activation);

// The same, plus grad_y, for _channel_attention_backward.
ChannelAttentionModes check_channel_attention_backward_args(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, c10::string_view pool, c10::string_view gate,
    c10::string_view activation);

// The checks of channel_gate and _channel_gate_backward.
ChannelGate check_channel_gate_args(const at::Tensor& x, const at::Tensor& logits,
                                    c10::string_view gate);
ChannelGate check_channel_gate_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                             const at::Tensor& logits, c10::string_view gate);

// The checks of cbam (and _cbam_forward) and _cbam_backward: those of channel_attention (pool
// "avgmax"), the score convolution's and, in the backward, the saved statistics' sizes, dtypes
// and device.
ChannelAttentionModes check_cbam_args(const at::Tensor& x, const at::Tensor& fc1_weight,
                                      const std::optional<at::Tensor>& fc1_bias,
                                      const at::Tensor& fc2_weight,
                                      const std::optional<at::Tensor>& fc2_bias,
                                      const at::Tensor& conv_weight,
                                      const std::optional<at::Tensor>& conv_bias,
                                      c10::string_view gate, c10::string_view activation);
ChannelAttentionModes check_cbam_backward_args(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& channel_stats,
    const at::Tensor& channel_argmax, c10::string_view gate, c10::string_view activation);
// The checks of cbam_spatial and _cbam_spatial_backward: the score convolution's (as
// cbam's), `normalize` and `temperature` (as soft_attention's).
SoftNormalize check_cbam_spatial_args(const at::Tensor& x, const at::Tensor& conv_weight,
                                      const std::optional<at::Tensor>& conv_bias,
                                      c10::string_view normalize, double temperature);
SoftNormalize check_cbam_spatial_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                               const at::Tensor& conv_weight,
                                               const std::optional<at::Tensor>& conv_bias,
                                               c10::string_view normalize, double temperature);
// That the saved positions of the maxima lie in [0, P) (reads their values: not on Meta).
void check_cbam_channel_argmax(const at::Tensor& x, const at::Tensor& channel_argmax);

// Per (n, c) statistics over the P positions, in the accumulation dtype
// (float32 for half types, else the dtype of x); `argmax` is int64.
struct ChannelStats {
  at::Tensor pooled;    // (2, N, C): the mean, then the max (one buffer, so that both MLP
                        // branches run as one batched product)
  at::Tensor mean;      // pooled[0]
  at::Tensor max;       // pooled[1]
  at::Tensor argmax;    // (N, C), first position of the maximum; only when asked for
  at::Tensor grad_dot;  // (N, C), sum over positions of grad_y * x; only in the backward
};

// Uninitialised statistics for `x`, for the device reductions to fill.
ChannelStats empty_channel_stats(const at::Tensor& x, bool with_grad, bool with_argmax);

// cbam's per-position terms, each (N, P) contiguous in the accumulation dtype (`argmax`
// int64), any of them undefined: a map `in` becomes
//   in * scale[n, p] + shift[n, p] + (c == argmax[n, p]) * at_argmax[n, p].
// In cbam's forward `scale` alone is defined (the spatial weights); in its backward all are,
// and the map is the gradient of the channel-weighted map x1 = x * w from grad_y.
struct PositionTerms {
  at::Tensor scale;
  at::Tensor shift;
  at::Tensor at_argmax;
  at::Tensor argmax;
};

// The channel statistics of the channel-weighted map x * w (w (N, C)), which is never written.
struct WeightedChannelPool {
  at::Tensor pooled;    // (N, 2, P) in the accumulation dtype: the mean, then the max over C
  at::Tensor argmax;    // (N, P) int64: the first channel attaining the max; may be undefined
                        // without grad_y (the forwards do not use it)
  at::Tensor grad_dot;  // (N, P): sum over channels of grad_y * x * w; only with grad_y
};

// What a backend supplies.
struct ChannelAttentionBackend {
  // Reads `x` (and `grad_y` when defined, laid out like `x`) once. When `grad_scale` (N, C)
  // is defined, the same sweep also writes grad_x = grad_y * grad_scale[n, c] (channel_gate's
  // backward: both gradients from one read of x and grad_y).
  ChannelStats (*reduce)(const at::Tensor& x, const at::Tensor& grad_y, bool with_argmax,
                         Layout layout, const at::Tensor& grad_scale, const at::Tensor& grad_x);
  // out = in * scale[n, c] + shift[n, c] + (position == argmax[n, c]) * at_argmax[n, c];
  // `shift`, `at_argmax` and `argmax` may be undefined (forward).
  void (*apply)(const at::Tensor& in, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& at_argmax, const at::Tensor& argmax, at::Tensor& out,
                Layout layout);
  // The MLP's products (see MatmulFn).
  MatmulFn matmul;
  // cbam's passes. One read of x (and of grad_y when defined): the statistics over the
  // channels of x * weights[n, c].
  WeightedChannelPool (*weighted_channel_pool)(const at::Tensor& x, const at::Tensor& weights,
                                               const at::Tensor& grad_y, Layout layout);
  // out = terms(in) * scale[n, c] + shift[n, c] + (position == argmax[n, c]) * at_argmax[n, c]
  // (PositionTerms; `shift`, `at_argmax` and `argmax` may be undefined), one read and one write.
  void (*apply_with_positions)(const at::Tensor& in, const PositionTerms& terms,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& at_argmax, const at::Tensor& argmax,
                               at::Tensor& out, Layout layout);
  // (N, C) in the accumulation dtype: sum over positions of terms(grad_y) * x, one read of each.
  at::Tensor (*reduce_with_positions)(const at::Tensor& x, const at::Tensor& grad_y,
                                      const PositionTerms& terms, Layout layout);
  // cbam's forward after the channel weights (and cbam_spatial's with the sigmoid, `weights`
  // all ones): out = x * weights[n, c] * sigmoid(score_conv(pooled) / temperature)[n, p], with
  // `pooled` weighted_channel_pool's of x * weights; `conv_weight` and `conv_bias` in the
  // accumulation dtype. Reads x twice and writes out once.
  void (*spatial_half)(const at::Tensor& x, const at::Tensor& weights,
                       const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                       double temperature, at::Tensor& out, Layout layout);
  // cbam's score head, in the accumulation dtype: scores (N, P) = the same-padded convolution
  // of the pooled map (N, 2, P), whose spatial sizes are `sizes`, with weight (1, 2, k, ..., k)
  // and bias; and its backward: (grad_pooled (N, 2, P), grad_weight, grad_bias) from
  // grad_scores (N, P). Padding takes part as zeros (0 * inf is NaN, as in torch's convolution).
  at::Tensor (*score_conv)(const at::Tensor& pooled, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef sizes);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*score_conv_backward)(
      const at::Tensor& grad_scores, const at::Tensor& pooled, const at::Tensor& weight,
      at::IntArrayRef sizes);
  // sigmoid of cbam's (N, P) scores and of channel_attention's and cbam's (N, C) gate logits,
  // contiguous, elementwise, the same at every thread count.
  at::Tensor (*sigmoid)(const at::Tensor& scores);
  // cbam_spatial's softmax over the positions of its (N, 1, P) scores and its backward:
  // those of the spatial attention backend (SpatialAttentionBackend::position_softmax).
  at::Tensor (*position_softmax)(const at::Tensor& s, double temperature, double factor,
                                 Layout layout);
  at::Tensor (*position_softmax_backward)(const at::Tensor& grad_p, const at::Tensor& p,
                                          double temperature, double factor, Layout layout);
};

// cbam's score head with ATen's convolution (any device).
at::Tensor aten_score_conv(const at::Tensor& pooled, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef sizes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> aten_score_conv_backward(
    const at::Tensor& grad_scores, const at::Tensor& pooled, const at::Tensor& weight,
    at::IntArrayRef sizes);

at::Tensor channel_attention_forward(const ChannelAttentionBackend& backend, const at::Tensor& x,
                                     const at::Tensor& fc1_weight,
                                     const std::optional<at::Tensor>& fc1_bias,
                                     const at::Tensor& fc2_weight,
                                     const std::optional<at::Tensor>& fc2_bias,
                                     c10::string_view pool, c10::string_view gate,
                                     c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward(
    const ChannelAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, c10::string_view pool,
    c10::string_view gate, c10::string_view activation);

at::Tensor channel_gate_forward(const ChannelAttentionBackend& backend, const at::Tensor& x,
                                const at::Tensor& logits, c10::string_view gate);

std::tuple<at::Tensor, at::Tensor> channel_gate_backward(const ChannelAttentionBackend& backend,
                                                         const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& logits,
                                                         c10::string_view gate);

// The kernels of _cbam_forward, cbam (its first result) and _cbam_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_forward(
    const ChannelAttentionBackend& backend, const at::Tensor& x, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view gate,
    c10::string_view activation);

at::Tensor cbam_result(const ChannelAttentionBackend& backend, const at::Tensor& x,
                       const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                       const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                       const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                       c10::string_view gate, c10::string_view activation);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_backward(const ChannelAttentionBackend& backend, const at::Tensor& grad_y,
              const at::Tensor& x, const at::Tensor& fc1_weight,
              const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
              const std::optional<at::Tensor>& fc2_bias, const at::Tensor& conv_weight,
              const std::optional<at::Tensor>& conv_bias, const at::Tensor& channel_stats,
              const at::Tensor& channel_argmax, c10::string_view gate,
              c10::string_view activation);

// The kernels of cbam_spatial and _cbam_spatial_backward.
at::Tensor cbam_spatial_forward(const ChannelAttentionBackend& backend, const at::Tensor& x,
                                const at::Tensor& conv_weight,
                                const std::optional<at::Tensor>& conv_bias,
                                c10::string_view normalize, double temperature);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_spatial_backward(
    const ChannelAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    c10::string_view normalize, double temperature);

// The operators' kernels on one backend: TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) calls
// register_channel_attention_kernels<kCpuBackend>(m).
template <const ChannelAttentionBackend& kBackend>
void register_channel_attention_kernels(torch::Library& m) {
  m.impl("channel_attention", TORCH_FN((OnBackend<channel_attention_forward, kBackend>::kernel)));
  m.impl("_channel_attention_backward",
         TORCH_FN((OnBackend<channel_attention_backward, kBackend>::kernel)));
  m.impl("channel_gate", TORCH_FN((OnBackend<channel_gate_forward, kBackend>::kernel)));
  m.impl("_channel_gate_backward",
         TORCH_FN((OnBackend<channel_gate_backward, kBackend>::kernel)));
  m.impl("cbam", TORCH_FN((OnBackend<cbam_result, kBackend>::kernel)));
  m.impl("_cbam_forward", TORCH_FN((OnBackend<cbam_forward, kBackend>::kernel)));
  m.impl("_cbam_backward", TORCH_FN((OnBackend<cbam_backward, kBackend>::kernel)));
  m.impl("cbam_spatial", TORCH_FN((OnBackend<cbam_spatial_forward, kBackend>::kernel)));
  m.impl("_cbam_spatial_backward", TORCH_FN((OnBackend<cbam_spatial_backward, kBackend>::kernel)));
}

// The modes a string argument names, or an error naming `op` (the operator or the module whose
// option it is) and the accepted values.
ChannelPool parse_channel_pool(const char* op, c10::string_view pool);
ChannelGate parse_channel_gate(const char* op, c10::string_view gate);
ChannelActivation parse_channel_activation(const char* op, c10::string_view activation);

}  // namespace ops
}  // namespace cnn_attention
