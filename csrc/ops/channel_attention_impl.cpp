#include "channel_attention_impl.h"

#include <vector>

namespace cnn_attention {
namespace ops {

namespace {

// fc2(relu(fc1(p))) in the accumulation dtype, whatever the dtype of the parameters.
struct Mlp {
  at::Tensor fc1_weight, fc2_weight;
  std::optional<at::Tensor> fc1_bias, fc2_bias;

  Mlp(const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
      const std::optional<at::Tensor>& b2, at::ScalarType dtype)
      : fc1_weight(w1.to(dtype)), fc2_weight(w2.to(dtype)) {
    if (b1.has_value()) fc1_bias = b1->to(dtype);
    if (b2.has_value()) fc2_bias = b2->to(dtype);
  }

  at::Tensor hidden(const at::Tensor& pooled) const {
    return at::relu(at::linear(pooled, fc1_weight, fc1_bias));
  }
  at::Tensor logits(const at::Tensor& hidden) const {
    return at::linear(hidden, fc2_weight, fc2_bias);
  }
};

// The pooled statistics the MLP sees, one per branch: [mean], [max] or [mean, max].
std::vector<at::Tensor> pooled_branches(const ChannelStats& stats, ChannelPool pool) {
  std::vector<at::Tensor> branches;
  if (pool != ChannelPool::Max) branches.push_back(stats.mean);
  if (pool != ChannelPool::Avg) branches.push_back(stats.max);
  return branches;
}

// Sum over the pooled branches of fc2(relu(fc1(p))); each branch's hidden activation is
// appended to `hidden` when it is given (the backward needs them).
at::Tensor mlp_logits(const Mlp& mlp, const std::vector<at::Tensor>& pooled,
                      std::vector<at::Tensor>* hidden = nullptr) {
  at::Tensor logits;
  for (const at::Tensor& p : pooled) {
    const at::Tensor h = mlp.hidden(p);
    if (hidden) hidden->push_back(h);
    const at::Tensor branch = mlp.logits(h);
    logits = logits.defined() ? logits + branch : branch;
  }
  return logits;
}

at::Tensor apply_gate(const at::Tensor& logits, ChannelGate gate) {
  if (gate == ChannelGate::Sigmoid) return at::sigmoid(logits);
  // C * softmax keeps uniform weights equal to one (the identity).
  return at::softmax(logits, 1) * static_cast<double>(logits.size(1));
}

}  // namespace

at::Tensor channel_attention_output_like(const at::Tensor& x) {
  return empty_in_layout(x.sym_sizes(), x.options(), choose_layout(x));
}

at::Tensor channel_attention_forward(
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    const ChannelAttentionSweeps& sweeps) {
  const auto [pool_mode, gate_mode] =
      check_channel_attention_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate);
  const Layout layout = choose_layout(x);
  at::Tensor y = empty_in_layout(x.sym_sizes(), x.options(), layout);
  if (y.numel() == 0) return y;

  const at::Tensor input = to_layout(x, layout);
  const ChannelStats stats = sweeps.reduce(input, at::Tensor(), false, layout);
  const Mlp mlp(fc1_weight, fc1_bias, fc2_weight, fc2_bias, stats.mean.scalar_type());
  const at::Tensor logits = mlp_logits(mlp, pooled_branches(stats, pool_mode));
  sweeps.apply(input, apply_gate(logits, gate_mode), at::Tensor(), at::Tensor(), at::Tensor(), y,
               layout);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
channel_attention_backward(
    const at::Tensor& grad_y,
    const at::Tensor& x,
    const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias,
    c10::string_view pool,
    c10::string_view gate,
    const ChannelAttentionSweeps& sweeps) {
  const auto [pool_mode, gate_mode] = check_channel_attention_backward_args(
      grad_y, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate);
  const Layout layout = choose_layout(x);
  at::Tensor grad_x = empty_in_layout(x.sym_sizes(), x.options(), layout);
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
  const ChannelStats stats =
      sweeps.reduce(input, grad_out, pool_mode != ChannelPool::Avg, layout);
  const Mlp mlp(fc1_weight, fc1_bias, fc2_weight, fc2_bias, stats.mean.scalar_type());

  // Recompute the (N, C)-sized forward: cheaper than saving it, and it keeps the
  // operator's forward a plain function of its inputs.
  const std::vector<at::Tensor> pooled = pooled_branches(stats, pool_mode);
  std::vector<at::Tensor> hidden;
  const at::Tensor weights = apply_gate(mlp_logits(mlp, pooled, &hidden), gate_mode);

  // d loss / d weights[n, c] = sum over positions of grad_y * x.
  const at::Tensor& grad_weights = stats.grad_dot;
  at::Tensor grad_logits;
  if (gate_mode == ChannelGate::Sigmoid) {
    grad_logits = grad_weights * weights * (1 - weights);
  } else {
    // w = C softmax(z): dz_j = w_j (g_j - sum_i g_i w_i / C).
    grad_logits = weights * (grad_weights - (grad_weights * weights).sum(1, true) /
                                                static_cast<double>(channels));
  }

  at::Tensor grad_fc1_weight = at::zeros({hidden_size, channels}, mlp.fc1_weight.options());
  at::Tensor grad_fc1_bias = at::zeros({hidden_size}, mlp.fc1_weight.options());
  at::Tensor grad_fc2_weight = at::zeros({channels, hidden_size}, mlp.fc2_weight.options());
  at::Tensor grad_fc2_bias = at::zeros({channels}, mlp.fc2_weight.options());
  std::vector<at::Tensor> grad_pooled;
  for (size_t i = 0; i < pooled.size(); ++i) {
    grad_fc2_weight += grad_logits.t().mm(hidden[i]);
    grad_fc2_bias += grad_logits.sum(0);
    const at::Tensor grad_hidden = grad_logits.mm(mlp.fc2_weight) * (hidden[i] > 0);
    grad_fc1_weight += grad_hidden.t().mm(pooled[i]);
    grad_fc1_bias += grad_hidden.sum(0);
    grad_pooled.push_back(grad_hidden.mm(mlp.fc1_weight));
  }

  // The mean spreads its gradient evenly over the P positions; the max sends it to the
  // first position that attains it.
  at::Tensor shift, at_argmax;
  if (pool_mode != ChannelPool::Max) {
    shift = grad_pooled.front() / static_cast<double>(num_positions(x));
  }
  if (pool_mode != ChannelPool::Avg) at_argmax = grad_pooled.back();
  sweeps.apply(grad_out, weights, shift, at_argmax, stats.argmax, grad_x, layout);

  return {grad_x, grad_fc1_weight.to(fc1_weight.scalar_type()),
          grad_fc1_bias.to(fc1_weight.scalar_type()),
          grad_fc2_weight.to(fc2_weight.scalar_type()),
          grad_fc2_bias.to(fc2_weight.scalar_type())};
}

}  // namespace ops
}  // namespace cnn_attention
