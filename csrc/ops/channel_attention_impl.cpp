#include "channel_attention_impl.h"

#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <utility>
#include <vector>

namespace cnn_attention {
namespace ops {

namespace {

// out (M, N) = a (M, K) @ b (K, N) through the backend's product.
at::Tensor product(MatmulFn matmul, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  matmul(out, a, b, false);
  return out;
}

// Sums over dim 0 of (M, C), (C,), or over dim 1 of (N, C), (N, 1), as products with ones: the
// backend's product fixes the order of the sum (ATen's reductions may split it by thread).
at::Tensor column_sums(MatmulFn matmul, const at::Tensor& t) {
  return product(matmul, at::ones({1, t.size(0)}, t.options()), t).view({t.size(1)});
}
at::Tensor row_sums(MatmulFn matmul, const at::Tensor& t) {
  return product(matmul, t, at::ones({t.size(1), 1}, t.options()));
}

// fc2(activation(fc1(p))) in the accumulation dtype, whatever the dtype of the parameters.
struct Mlp {
  at::Tensor fc1_weight, fc2_weight;
  std::optional<at::Tensor> fc1_bias, fc2_bias;
  ChannelActivation activation;
  MatmulFn matmul;

  Mlp(const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
      const std::optional<at::Tensor>& b2, ChannelActivation activation, at::ScalarType dtype,
      MatmulFn matmul)
      : fc1_weight(w1.to(dtype)), fc2_weight(w2.to(dtype)), activation(activation), matmul(matmul) {
    if (b1.has_value()) fc1_bias = b1->to(dtype);
    if (b2.has_value()) fc2_bias = b2->to(dtype);
  }

  // input @ weight^T + bias. With fewer samples than weight rows it is computed as
  // (weight @ input^T)^T: a product packs its right operand into rows, which is input^T
  // (N x K) there and weight^T (K x R, all of the layer's weights) in the direct form, on
  // every call. Each element is the same chain of fused multiply-adds either way.
  at::Tensor linear(const at::Tensor& input, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias) const {
    at::Tensor out = at::empty({input.size(0), weight.size(0)}, input.options());
    if (bias.has_value()) out.copy_(bias->expand_as(out));
    if (input.size(0) < weight.size(0)) {
      matmul(out.t(), weight, input.t(), bias.has_value());
    } else {
      matmul(out, input, weight.t(), bias.has_value());
    }
    return out;
  }
  // fc1's output, before the activation.
  at::Tensor preactivation(const at::Tensor& pooled) const {
    return linear(pooled, fc1_weight, fc1_bias);
  }
  at::Tensor activate(const at::Tensor& z) const {
    switch (activation) {
      case ChannelActivation::Relu:
        return at::relu(z);
      case ChannelActivation::Silu:
        return at::silu(z);
      case ChannelActivation::Gelu:
        // gelu(+inf) = +inf, as ATen's float64 GELU gives; its vectorized float32 one gives NaN.
        return at::where(at::isposinf(z), z, at::gelu(z));
      case ChannelActivation::Identity:
        return z;
    }
    return z;
  }
  // The gradient through the activation, as its eager backward computes it: ReLU selects (a
  // unit that is off passes no gradient, even a NaN or infinite one, and a NaN unit passes it),
  // SiLU and GELU (exact, erf) are ATen's own backward formulas.
  at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& z,
                                 const at::Tensor& hidden) const {
    switch (activation) {
      case ChannelActivation::Relu:
        return at::where(hidden <= 0, 0, grad);
      case ChannelActivation::Silu:
        return at::silu_backward(grad, z);
      case ChannelActivation::Gelu:
        return at::gelu_backward(grad, z);
      case ChannelActivation::Identity:
        return grad;
    }
    return grad;
  }
  at::Tensor logits(const at::Tensor& hidden) const { return linear(hidden, fc2_weight, fc2_bias); }
};

// The pooled statistics the MLP sees, stacked as (B, N, C): [mean], [max] or [mean, max].
at::Tensor pooled_branches(const ChannelStats& stats, ChannelPool pool) {
  if (pool == ChannelPool::Avg) return stats.pooled.narrow(0, 0, 1);
  if (pool == ChannelPool::Max) return stats.pooled.narrow(0, 1, 1);
  return stats.pooled;
}

// The MLP on every branch at once (one product per layer for both branches).
struct MlpResult {
  at::Tensor logits;         // (N, C), summed over the branches
  at::Tensor preactivation;  // (B * N, R), fc1's output
  at::Tensor hidden;         // (B * N, R), after the activation
};

MlpResult mlp_forward(const Mlp& mlp, const at::Tensor& branches) {
  const int64_t count = branches.size(0), batch = branches.size(1);
  const at::Tensor z = mlp.preactivation(branches.reshape({count * batch, branches.size(2)}));
  const at::Tensor hidden = mlp.activate(z);
  const at::Tensor logits = mlp.logits(hidden);
  return {count == 1 ? logits : logits.view({count, batch, -1}).sum(0), z, hidden};
}

using SigmoidFn = at::Tensor (*)(const at::Tensor& logits);

at::Tensor aten_sigmoid(const at::Tensor& logits) { return at::sigmoid(logits); }

// The gate's weights from its logits. The fused operators (channel_attention, cbam) take the
// backend's sigmoid, which gives the same bits on every CPU as their MLP does; channel_gate,
// whose logits come from the caller's PyTorch layers, takes ATen's, so that a converted
// block's weights are the eager block's bit for bit (a BatchNorm over two samples in the
// caller's MLP amplifies a last-bit difference into a different gradient).
at::Tensor apply_gate(const at::Tensor& logits, ChannelGate gate, SigmoidFn sigmoid) {
  switch (gate) {
    case ChannelGate::Sigmoid:
      return sigmoid(logits.contiguous());
    case ChannelGate::HardSigmoid:
      // relu6(z + 3) / 6, as torch.nn.Hardsigmoid.
      return at::hardsigmoid(logits);
    case ChannelGate::Softmax:
      // C * softmax keeps uniform weights equal to one (the identity).
      return at::softmax(logits, 1) * static_cast<double>(logits.size(1));
  }
  return logits;
}

// d loss / d logits from d loss / d weights, for weights = apply_gate(logits, gate).
at::Tensor gate_backward(const at::Tensor& grad_weights, const at::Tensor& logits,
                         const at::Tensor& weights, ChannelGate gate, MatmulFn matmul) {
  switch (gate) {
    case ChannelGate::Sigmoid:
      return grad_weights * weights * (1 - weights);
    case ChannelGate::HardSigmoid:
      // 1/6 strictly inside (-3, 3), 0 elsewhere, as torch.nn.Hardsigmoid's backward.
      return at::hardsigmoid_backward(grad_weights, logits);
    case ChannelGate::Softmax:
      // w = C softmax(z): dz_j = w_j (g_j - sum_i g_i w_i / C).
      return weights * (grad_weights - row_sums(matmul, grad_weights * weights) /
                                           static_cast<double>(logits.size(1)));
  }
  return grad_weights;
}

// The MLP's gradients from d loss / d logits: its parameters' (in the accumulation dtype) and
// that of its (B, N, C) input.
struct MlpGradients {
  at::Tensor fc1_weight, fc1_bias, fc2_weight, fc2_bias;
  at::Tensor pooled;  // (B, N, C)
};

MlpGradients mlp_backward(const Mlp& mlp, const at::Tensor& branches,
                          const at::Tensor& preactivation, const at::Tensor& hidden,
                          const at::Tensor& grad_logits, int64_t channels) {
  const int64_t count = branches.size(0), batch = branches.size(1);
  const int64_t hidden_size = hidden.size(1);
  // Every branch receives the same grad_logits, so the sums over branches fold into
  // one product per parameter.
  const at::Tensor hidden_by_branch = hidden.view({count, batch, hidden_size});
  // One product per branch, added, as eager: summing the branches' hidden units first would
  // turn an infinite grad_logits times a unit that is off in one branch (NaN in eager) into
  // an infinity.
  at::Tensor grad_fc2_weight = product(mlp.matmul, grad_logits.t(), hidden_by_branch.select(0, 0));
  for (int64_t branch = 1; branch < count; ++branch) {
    mlp.matmul(grad_fc2_weight, grad_logits.t(), hidden_by_branch.select(0, branch), true);
  }
  const at::Tensor grad_fc2_bias =
      column_sums(mlp.matmul, grad_logits) * static_cast<double>(count);
  const at::Tensor grad_activation = product(mlp.matmul, grad_logits, mlp.fc2_weight)
                                         .unsqueeze(0)
                                         .expand({count, batch, hidden_size});
  const at::Tensor grad_hidden =
      mlp.activation_backward(grad_activation, preactivation.view({count, batch, hidden_size}),
                              hidden_by_branch)
          .reshape({count * batch, hidden_size});
  const at::Tensor grad_fc1_weight =
      product(mlp.matmul, grad_hidden.t(), branches.reshape({count * batch, channels}));
  const at::Tensor grad_fc1_bias = column_sums(mlp.matmul, grad_hidden);
  const at::Tensor grad_pooled =
      product(mlp.matmul, grad_hidden, mlp.fc1_weight).view({count, batch, channels});

  return {grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias, grad_pooled};
}

}  // namespace

ChannelStats empty_channel_stats(const at::Tensor& x, bool with_grad, bool with_argmax) {
  const int64_t batch = x.size(0), channels = x.size(1);
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  ChannelStats stats;
  stats.pooled = at::empty({2, batch, channels}, options);
  stats.mean = stats.pooled[0];
  stats.max = stats.pooled[1];
  if (with_grad) stats.grad_dot = at::empty({batch, channels}, options);
  if (with_argmax) stats.argmax = at::empty({batch, channels}, x.options().dtype(at::kLong));
  return stats;
}

at::Tensor channel_attention_forward(const ChannelAttentionBackend& backend, const at::Tensor& x,
                                     const at::Tensor& fc1_weight,
                                     const std::optional<at::Tensor>& fc1_bias,
                                     const at::Tensor& fc2_weight,
                                     const std::optional<at::Tensor>& fc2_bias,
                                     c10::string_view pool, c10::string_view gate,
                                     c10::string_view activation) {
  const auto [pool_mode, gate_mode, activation_mode] = check_channel_attention_args(
      x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor y = feature_map_like(x);
  if (y.numel() == 0) return y;

  const at::Tensor input = to_layout(x, layout);
  const ChannelStats stats =
      backend.reduce(input, at::Tensor(), false, layout, at::Tensor(), at::Tensor());
  const Mlp mlp(fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation_mode,
                stats.mean.scalar_type(), backend.matmul);
  const at::Tensor logits = mlp_forward(mlp, pooled_branches(stats, pool_mode)).logits;
  backend.apply(input, apply_gate(logits, gate_mode, backend.sigmoid), at::Tensor(), at::Tensor(),
                at::Tensor(), y, layout);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward(
    const ChannelAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, c10::string_view pool,
    c10::string_view gate, c10::string_view activation) {
  const auto [pool_mode, gate_mode, activation_mode] = check_channel_attention_backward_args(
      grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor grad_x = feature_map_like(x);
  const int64_t hidden_size = fc1_weight.size(0);
  const int64_t channels = x.size(1);
  if (x.numel() == 0) {
    // No position contributes, so the parameters get exactly zero gradient.
    return {grad_x, at::zeros({hidden_size, channels}, fc1_weight.options()),
            at::zeros({hidden_size}, fc1_weight.options()),
            at::zeros({channels, hidden_size}, fc2_weight.options()),
            at::zeros({channels}, fc2_weight.options())};
  }

  const at::Tensor input = to_layout(x, layout);
  const at::Tensor grad_out = to_layout(grad_y, layout);
  const ChannelStats stats = backend.reduce(input, grad_out, pool_mode != ChannelPool::Avg, layout,
                                            at::Tensor(), at::Tensor());
  const Mlp mlp(fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation_mode,
                stats.mean.scalar_type(), backend.matmul);

  // Recompute the (N, C)-sized forward: cheaper than saving it, and it keeps the
  // operator's forward a plain function of its inputs.
  const at::Tensor branches = pooled_branches(stats, pool_mode);  // (B, N, C)
  const int64_t count = branches.size(0);
  const auto [logits, preactivation, hidden] = mlp_forward(mlp, branches);
  const at::Tensor weights = apply_gate(logits, gate_mode, backend.sigmoid);

  // d loss / d weights[n, c] = sum over positions of grad_y * x.
  const at::Tensor grad_logits =
      gate_backward(stats.grad_dot, logits, weights, gate_mode, backend.matmul);

  const MlpGradients grads =
      mlp_backward(mlp, branches, preactivation, hidden, grad_logits, channels);
  const at::Tensor& grad_pooled = grads.pooled;

  // The mean spreads its gradient evenly over the P positions; the max sends it to the
  // first position that attains it.
  at::Tensor shift, at_argmax;
  if (pool_mode != ChannelPool::Max) {
    shift = grad_pooled[0] / static_cast<double>(num_positions(x));
  }
  if (pool_mode != ChannelPool::Avg) at_argmax = grad_pooled[count - 1];
  backend.apply(grad_out, weights, shift, at_argmax, stats.argmax, grad_x, layout);

  return {grad_x, grads.fc1_weight.to(fc1_weight.scalar_type()),
          grads.fc1_bias.to(fc1_weight.scalar_type()),
          grads.fc2_weight.to(fc2_weight.scalar_type()),
          grads.fc2_bias.to(fc2_weight.scalar_type())};
}

namespace {

// The gate's weights in the accumulation dtype of x, (N, C) contiguous as the sweeps read them.
at::Tensor gate_weights(const at::Tensor& x, const at::Tensor& logits, ChannelGate gate) {
  return apply_gate(logits.to(at::toOpMathType(x.scalar_type())), gate, aten_sigmoid).contiguous();
}

}  // namespace

at::Tensor channel_gate_forward(const ChannelAttentionBackend& backend, const at::Tensor& x,
                                const at::Tensor& logits, c10::string_view gate) {
  const ChannelGate gate_mode = check_channel_gate_args(x, logits, gate);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor y = feature_map_like(x);
  if (y.numel() == 0) return y;
  backend.apply(to_layout(x, layout), gate_weights(x, logits, gate_mode), at::Tensor(),
                at::Tensor(), at::Tensor(), y, layout);
  return y;
}

std::tuple<at::Tensor, at::Tensor> channel_gate_backward(const ChannelAttentionBackend& backend,
                                                         const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& logits,
                                                         c10::string_view gate) {
  const ChannelGate gate_mode = check_channel_gate_backward_args(grad_y, x, logits, gate);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor grad_x = feature_map_like(x);
  // No position contributes: the logits get exactly zero gradient.
  if (x.numel() == 0) return {grad_x, at::zeros(logits.sizes(), logits.options())};

  const at::Tensor weights = gate_weights(x, logits, gate_mode);
  const ChannelStats stats = backend.reduce(to_layout(x, layout), to_layout(grad_y, layout), false,
                                            layout, weights, grad_x);
  const at::Tensor grad_logits = gate_backward(stats.grad_dot, logits.to(weights.scalar_type()),
                                               weights, gate_mode, backend.matmul);
  return {grad_x, grad_logits.to(logits.scalar_type())};
}

// ---- cbam: channel attention, then spatial attention on x1 = x * w, without writing x1 ----
//
// Forward:  stats = reduce(x); w = gate(mlp(stats)); then the backend's spatial_half:
//           pooled = weighted_channel_pool(x, w); ws = sigmoid(conv(pooled)); y = x * w * ws
//           (4|x| bytes; on the CPU, where the samples are small, one task per sample rereads
//           its x from cache)
// Backward: the forward's channel statistics (mean, max and its position per channel, saved
//           by _cbam_forward); the same pooling (which also sums grad_y * x * w over the
//           channels: d loss / d ws); the convolution's backward gives the gradient of the
//           pooled map, hence that of x1 (PositionTerms g1 = grad_y * ws + d mean / C + d max at
//           the channel of the max); d loss / d w = sum over positions of g1 * x; the MLP's
//           backward; grad_x = g1 * w + d avg / P + d max at the position of the max  (6|x|)
// where channel_attention, channel_pool and soft_attention in turn move 6|x| and 12|x|.

namespace {

// The gradient of the map that cbam's spatial half weights (x1, or x itself in cbam_spatial)
// from grad_y, as PositionTerms: grad_y * w (the spatial weights), the pooled mean's gradient
// spread over the C channels, the max's at the first channel attaining it.
PositionTerms gradient_terms(const at::Tensor& spatial_weights, const at::Tensor& grad_pooled_map,
                             const at::Tensor& channel_argmax, int64_t channels) {
  return {spatial_weights,
          (grad_pooled_map.select(1, 0) / static_cast<double>(channels)).contiguous(),
          grad_pooled_map.select(1, 1).contiguous(), channel_argmax};
}

// An optional tensor in `dtype`.
std::optional<at::Tensor> converted(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t ? std::optional<at::Tensor>(t->to(dtype)) : std::nullopt;
}

// What cbam's forward and backward both compute before their last passes.
struct CbamWeights {
  ChannelStats stats;
  MlpResult mlp;
  at::Tensor channel_weights;  // (N, C), the accumulation dtype
  WeightedChannelPool pool;
  at::Tensor conv_weight;  // in the accumulation dtype
  std::optional<at::Tensor> conv_bias;
  at::Tensor spatial_weights;  // (N, P)
};

CbamWeights cbam_weights(const ChannelAttentionBackend& backend, const at::Tensor& input,
                         const at::Tensor& grad_out, const Mlp& mlp, ChannelStats stats,
                         ChannelGate gate, const at::Tensor& conv_weight,
                         const std::optional<at::Tensor>& conv_bias, Layout layout) {
  CbamWeights out{std::move(stats)};
  out.mlp = mlp_forward(mlp, out.stats.pooled);
  out.channel_weights = apply_gate(out.mlp.logits, gate, backend.sigmoid).contiguous();
  out.pool = backend.weighted_channel_pool(input, out.channel_weights, grad_out, layout);

  const at::ScalarType acc = out.channel_weights.scalar_type();
  out.conv_weight = conv_weight.to(acc);
  out.conv_bias = converted(conv_bias, acc);
  const at::Tensor scores =
      backend.score_conv(out.pool.pooled, out.conv_weight, out.conv_bias, input.sizes().slice(2));
  out.spatial_weights = backend.sigmoid(scores);
  return out;
}

// (y, channel_stats, channel_argmax). With `for_backward` the statistics pass also finds each
// channel's argmax, and both are returned for the backward (the public cbam leaves them out).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_pass(
    const ChannelAttentionBackend& backend, const at::Tensor& x, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view gate, c10::string_view activation,
    bool for_backward) {
  const auto modes = check_cbam_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight,
                                     conv_bias, gate, activation);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor y = feature_map_like(x);
  if (y.numel() == 0) {
    if (!for_backward) return {y, at::Tensor(), at::Tensor()};
    // No position: statistics of nothing, which no backward reads.
    const ChannelStats none = empty_channel_stats(x, false, true);
    return {y, none.pooled.zero_(), none.argmax.zero_()};
  }

  const at::Tensor input = to_layout(x, layout);
  ChannelStats stats =
      backend.reduce(input, at::Tensor(), for_backward, layout, at::Tensor(), at::Tensor());
  at::Tensor pooled = stats.pooled, argmax = stats.argmax;
  const at::ScalarType acc = stats.mean.scalar_type();
  const Mlp mlp(fc1_weight, fc1_bias, fc2_weight, fc2_bias, modes.activation, acc, backend.matmul);
  const at::Tensor channel_weights =
      apply_gate(mlp_forward(mlp, stats.pooled).logits, modes.gate, backend.sigmoid).contiguous();
  backend.spatial_half(input, channel_weights, conv_weight.to(acc), converted(conv_bias, acc), 1.0,
                       y, layout);
  return {y, pooled, argmax};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_forward(
    const ChannelAttentionBackend& backend, const at::Tensor& x, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, c10::string_view gate,
    c10::string_view activation) {
  return cbam_pass(backend, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias,
                   gate, activation, /*for_backward=*/true);
}

at::Tensor cbam_result(const ChannelAttentionBackend& backend, const at::Tensor& x,
                       const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                       const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                       const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                       c10::string_view gate, c10::string_view activation) {
  return std::get<0>(cbam_pass(backend, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight,
                               conv_bias, gate, activation, /*for_backward=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_backward(const ChannelAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
              const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
              const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
              const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
              const at::Tensor& channel_stats, const at::Tensor& channel_argmax,
              c10::string_view gate, c10::string_view activation) {
  const auto modes =
      check_cbam_backward_args(grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight,
                               conv_bias, channel_stats, channel_argmax, gate, activation);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor grad_x = feature_map_like(x);
  if (x.numel() == 0) {
    // No position contributes, so the parameters get exactly zero gradient.
    return {grad_x,
            at::zeros(fc1_weight.sizes(), fc1_weight.options()),
            at::zeros({fc1_weight.size(0)}, fc1_weight.options()),
            at::zeros(fc2_weight.sizes(), fc2_weight.options()),
            at::zeros({fc2_weight.size(0)}, fc2_weight.options()),
            at::zeros(conv_weight.sizes(), conv_weight.options()),
            at::zeros({1}, conv_weight.options())};
  }

  const at::Tensor input = to_layout(x, layout);
  const at::Tensor grad_out = to_layout(grad_y, layout);
  // The forward's channel statistics. The CPU kernels write at the saved positions, so those
  // are checked there (other devices compare positions with them and never index).
  if (x.is_cpu()) check_cbam_channel_argmax(x, channel_argmax);
  ChannelStats stats;
  stats.pooled = channel_stats.contiguous();
  stats.mean = stats.pooled[0];
  stats.max = stats.pooled[1];
  const at::Tensor argmax = channel_argmax.contiguous();
  const Mlp mlp(fc1_weight, fc1_bias, fc2_weight, fc2_bias, modes.activation,
                stats.mean.scalar_type(), backend.matmul);
  const CbamWeights w = cbam_weights(backend, input, grad_out, mlp, std::move(stats), modes.gate,
                                     conv_weight, conv_bias, layout);

  // Through the spatial sigmoid and the score convolution to the pooled map.
  const at::Tensor grad_scores = w.pool.grad_dot * w.spatial_weights * (1 - w.spatial_weights);
  const auto [grad_pooled_map, grad_conv_weight, grad_conv_bias] =
      backend.score_conv_backward(grad_scores, w.pool.pooled, w.conv_weight, x.sizes().slice(2));

  const PositionTerms grad_x1 =
      gradient_terms(w.spatial_weights, grad_pooled_map, w.pool.argmax, x.size(1));
  const at::Tensor grad_channel_weights =
      backend.reduce_with_positions(input, grad_out, grad_x1, layout);

  const at::Tensor grad_logits = gate_backward(grad_channel_weights, w.mlp.logits,
                                               w.channel_weights, modes.gate, backend.matmul);
  const MlpGradients grads =
      mlp_backward(mlp, w.stats.pooled, w.mlp.preactivation, w.mlp.hidden, grad_logits, x.size(1));
  backend.apply_with_positions(
      grad_out, grad_x1, w.channel_weights,
      (grads.pooled[0] / static_cast<double>(num_positions(x))).contiguous(),
      grads.pooled[1].contiguous(), argmax, grad_x, layout);

  return {grad_x,
          grads.fc1_weight.to(fc1_weight.scalar_type()),
          grads.fc1_bias.to(fc1_weight.scalar_type()),
          grads.fc2_weight.to(fc2_weight.scalar_type()),
          grads.fc2_bias.to(fc2_weight.scalar_type()),
          grad_conv_weight.to(conv_weight.scalar_type()).contiguous(),
          grad_conv_bias.to(conv_weight.scalar_type())};
}

// ---- cbam_spatial: cbam's spatial half alone, on x itself ----
//
// Forward:  pooled = weighted_channel_pool(x, 1); w = normalize(conv(pooled)); y = x * w  (3|x|;
//           with the sigmoid, the backend's spatial_half with channel weights of one)
// Backward: the same pooling, which also sums grad_y * x over the channels (d loss / d w);
//           the normalization's and the convolution's backward give the gradient of the pooled
//           map; grad_x = grad_y * w + d mean / C + d max at the channel of the max   (4|x|)
// where channel_pool, the convolution and soft_attention in turn move 3|x| and, with autograd's
// sum of their two gradients of x, 7|x|. The channel weights of cbam's passes are all ones here
// (a product by one is exact).

namespace {

struct SpatialWeights {
  at::Tensor conv_weight;  // in the accumulation dtype
  std::optional<at::Tensor> conv_bias;
  at::Tensor probabilities;  // (N, 1, P) softmax(scores / T) for "softmax", else undefined
  at::Tensor weights;        // (N, P)
};

SpatialWeights spatial_weights(const ChannelAttentionBackend& backend, const at::Tensor& pooled,
                               const at::Tensor& conv_weight,
                               const std::optional<at::Tensor>& conv_bias, SoftNormalize mode,
                               double temperature, at::IntArrayRef sizes) {
  SpatialWeights out;
  const at::ScalarType acc = pooled.scalar_type();
  out.conv_weight = conv_weight.to(acc);
  out.conv_bias = converted(conv_bias, acc);
  const at::Tensor scores = backend.score_conv(pooled, out.conv_weight, out.conv_bias, sizes);
  if (mode == SoftNormalize::Sigmoid) {
    out.weights = backend.sigmoid(temperature == 1.0 ? scores : scores / temperature);
    return out;
  }
  // P * softmax keeps the mean weight 1, as in soft_attention.
  const int64_t batch = scores.size(0), positions = scores.size(1);
  out.probabilities = backend.position_softmax(scores.view({batch, 1, positions}), temperature, 1.0,
                                               Layout::ChannelsFirst);
  out.weights = (out.probabilities * static_cast<double>(positions)).view({batch, positions});
  return out;
}

// The channel weights of cbam's passes that leave x as it is.
at::Tensor unit_channel_weights(const at::Tensor& x) {
  return at::ones({x.size(0), x.size(1)}, x.options().dtype(at::toOpMathType(x.scalar_type())));
}

}  // namespace

at::Tensor cbam_spatial_forward(const ChannelAttentionBackend& backend, const at::Tensor& x,
                                const at::Tensor& conv_weight,
                                const std::optional<at::Tensor>& conv_bias,
                                c10::string_view normalize, double temperature) {
  const SoftNormalize mode =
      check_cbam_spatial_args(x, conv_weight, conv_bias, normalize, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor y = feature_map_like(x);
  if (y.numel() == 0) return y;

  const at::Tensor input = to_layout(x, layout);
  const at::Tensor ones = unit_channel_weights(x);
  if (mode == SoftNormalize::Sigmoid) {
    const at::ScalarType acc = ones.scalar_type();
    backend.spatial_half(input, ones, conv_weight.to(acc), converted(conv_bias, acc), temperature,
                         y, layout);
    return y;
  }
  const WeightedChannelPool pool = backend.weighted_channel_pool(input, ones, at::Tensor(), layout);
  const SpatialWeights w = spatial_weights(backend, pool.pooled, conv_weight, conv_bias, mode,
                                           temperature, x.sizes().slice(2));
  backend.apply_with_positions(input, PositionTerms{w.weights}, ones, at::Tensor(), at::Tensor(),
                               at::Tensor(), y, layout);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_spatial_backward(
    const ChannelAttentionBackend& backend, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    c10::string_view normalize, double temperature) {
  const SoftNormalize mode =
      check_cbam_spatial_backward_args(grad_y, x, conv_weight, conv_bias, normalize, temperature);
  const c10::DeviceGuard device_guard(x.device());
  const Layout layout = choose_layout(x);
  at::Tensor grad_x = feature_map_like(x);
  if (x.numel() == 0) {
    // No position contributes, so the parameters get exactly zero gradient.
    return {grad_x, at::zeros(conv_weight.sizes(), conv_weight.options()),
            at::zeros({1}, conv_weight.options())};
  }

  const at::Tensor input = to_layout(x, layout);
  const at::Tensor grad_out = to_layout(grad_y, layout);
  const at::Tensor ones = unit_channel_weights(x);
  const WeightedChannelPool pool = backend.weighted_channel_pool(input, ones, grad_out, layout);
  const SpatialWeights w = spatial_weights(backend, pool.pooled, conv_weight, conv_bias, mode,
                                           temperature, x.sizes().slice(2));

  // pool.grad_dot is d loss / d w; through the normalization to the scores.
  const int64_t batch = x.size(0), positions = num_positions(x);
  at::Tensor grad_scores;
  if (mode == SoftNormalize::Sigmoid) {
    grad_scores = (pool.grad_dot * w.weights * (1 - w.weights)).div_(temperature);
  } else {
    // w = P a, so d loss / d a = P d loss / d w.
    grad_scores = backend
                      .position_softmax_backward(
                          pool.grad_dot.view({batch, 1, positions}), w.probabilities, temperature,
                          static_cast<double>(positions), Layout::ChannelsFirst)
                      .view({batch, positions});
  }
  const auto [grad_pooled_map, grad_conv_weight, grad_conv_bias] =
      backend.score_conv_backward(grad_scores, pool.pooled, w.conv_weight, x.sizes().slice(2));

  backend.apply_with_positions(grad_out,
                               gradient_terms(w.weights, grad_pooled_map, pool.argmax, x.size(1)),
                               ones, at::Tensor(), at::Tensor(), at::Tensor(), grad_x, layout);
  return {grad_x, grad_conv_weight.to(conv_weight.scalar_type()).contiguous(),
          grad_conv_bias.to(conv_weight.scalar_type())};
}

// ---- cbam's score head with ATen calls ----

namespace {

// The convolution's arguments for a same-padded k x ... x k kernel over `dims` spatial dims.
struct SameConv {
  std::vector<int64_t> ones, padding, zeros;
  explicit SameConv(const at::Tensor& weight)
      : ones(weight.dim() - 2, 1),
        padding(weight.dim() - 2, weight.size(2) / 2),
        zeros(weight.dim() - 2, 0) {}
};

std::vector<int64_t> map_sizes(int64_t batch, int64_t channels, at::IntArrayRef sizes) {
  std::vector<int64_t> out{batch, channels};
  out.insert(out.end(), sizes.begin(), sizes.end());
  return out;
}

}  // namespace

at::Tensor aten_score_conv(const at::Tensor& pooled, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef sizes) {
  const SameConv conv(weight);
  const int64_t batch = pooled.size(0);
  return at::convolution(pooled.view(map_sizes(batch, 2, sizes)), weight, bias, conv.ones,
                         conv.padding, conv.ones, false, conv.zeros, 1)
      .reshape({batch, -1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aten_score_conv_backward(
    const at::Tensor& grad_scores, const at::Tensor& pooled, const at::Tensor& weight,
    at::IntArrayRef sizes) {
  const SameConv conv(weight);
  const int64_t batch = pooled.size(0);
  const std::vector<int64_t> bias_sizes{1};
  auto [grad_map, grad_weight, grad_bias] = at::convolution_backward(
      grad_scores.view(map_sizes(batch, 1, sizes)), pooled.view(map_sizes(batch, 2, sizes)), weight,
      bias_sizes, conv.ones, conv.padding, conv.ones, false, conv.zeros, 1, {true, true, true});
  return {grad_map.reshape({batch, 2, -1}), grad_weight, grad_bias};
}

}  // namespace ops
}  // namespace cnn_attention
