#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <optional>
#include <string>

#include "../macros.h"

namespace cnn_attention {
namespace nn {

// CBAM's score head: conv(channel_pool(x)), one convolution from the 2 pooled channels
// (mean and max over channels) to 1 score channel, `kernel_size` wide with same padding, in
// `spatial_dims` (1 to 3) dimensions. Parameters `weight` (1, 2, k, ..) and `bias` (1).
struct CNN_ATTENTION_API SpatialScoresOptions {
  TORCH_ARG(int64_t, kernel_size) = 7;
  TORCH_ARG(int64_t, spatial_dims) = 2;
};

class CNN_ATTENTION_API SpatialScoresImpl : public torch::nn::Cloneable<SpatialScoresImpl> {
 public:
  explicit SpatialScoresImpl(SpatialScoresOptions options = {},
                             std::string owner = "SpatialScores");

  void reset() override;
  void reset_parameters();
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  SpatialScoresOptions options;
  std::string owner;
  torch::Tensor weight, bias;
};

TORCH_MODULE(SpatialScores);

// SoftAttention(SoftAttentionOptions().kernel_size(3).normalize("softmax")), with the
// defaults of the Python module.
struct CNN_ATTENTION_API SoftAttentionOptions {
  TORCH_ARG(int64_t, kernel_size) = 7;
  TORCH_ARG(std::string, normalize) = "sigmoid";
  TORCH_ARG(double, temperature) = 1.0;
  TORCH_ARG(int64_t, spatial_dims) = 2;
};

// y = x * w, one weight per position from the score head; see ops::soft_attention.
class CNN_ATTENTION_API SoftAttentionImpl : public torch::nn::Cloneable<SoftAttentionImpl> {
 public:
  explicit SoftAttentionImpl(SoftAttentionOptions options = {});

  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;

  SoftAttentionOptions options;
  SpatialScores scores{nullptr};
};

TORCH_MODULE(SoftAttention);

struct CNN_ATTENTION_API HardAttentionOptions {
  TORCH_ARG(int64_t, kernel_size) = 7;
  TORCH_ARG(std::string, mode) = "threshold";
  TORCH_ARG(double, threshold) = 0.5;
  TORCH_ARG(int64_t, k) = 1;
  // Keep k = ceil(keep_ratio * P) positions of the input at hand (needs mode "topk").
  TORCH_ARG(std::optional<double>, keep_ratio) = std::nullopt;
  TORCH_ARG(std::string, estimator) = "sigmoid";
  TORCH_ARG(double, temperature) = 1.0;
  // Scale of the logistic noise added to the scores in training (0: none).
  TORCH_ARG(double, noise) = 0.0;
  TORCH_ARG(int64_t, spatial_dims) = 2;
  // Keep the mask in eval mode too (it is always kept in training).
  TORCH_ARG(bool, keep_mask) = false;
};

// y = x * mask with a 0/1 mask from the score head, trained straight through; see
// ops::hard_attention. A forward in training mode (or any forward with keep_mask) keeps its
// mask in last_mask; switching modes clears it. An eval forward without keep_mask writes no
// module state, so one module can serve many threads at once.
class CNN_ATTENTION_API HardAttentionImpl : public torch::nn::Cloneable<HardAttentionImpl> {
 public:
  explicit HardAttentionImpl(HardAttentionOptions options = {});

  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // Clears last_mask when the mode changes: a mask from the other mode would be mistaken for
  // one of the next forward.
  void train(bool on = true) override;

  // k for an input with `positions` positions.
  int64_t positions_kept(int64_t positions) const;
  // Fraction of the positions the last forward kept; nullopt before the first forward.
  std::optional<double> kept_fraction() const;

  HardAttentionOptions options;
  SpatialScores scores{nullptr};
  torch::Tensor last_mask;
};

TORCH_MODULE(HardAttention);

}  // namespace nn
}  // namespace cnn_attention
