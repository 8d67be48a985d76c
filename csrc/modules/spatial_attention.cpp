#include "spatial_attention.h"

#include <torch/nn/init.h>

#include <cmath>

#include "../ops/channel_attention.h"
#include "../ops/channel_pool.h"
#include "../ops/spatial_attention.h"
#include "../ops/spatial_attention_impl.h"

namespace cnn_attention {
namespace nn {

SpatialScoresImpl::SpatialScoresImpl(SpatialScoresOptions options_, std::string owner_)
    : options(options_), owner(std::move(owner_)) {
  reset();
}

void SpatialScoresImpl::reset() {
  const int64_t k = options.kernel_size(), dims = options.spatial_dims();
  TORCH_CHECK(k >= 1 && k % 2 == 1, owner, ": kernel_size must be odd and positive, got ", k);
  TORCH_CHECK(dims >= 1 && dims <= 3, owner, ": spatial_dims must be 1, 2 or 3, got ", dims);
  std::vector<int64_t> sizes{1, 2};
  sizes.insert(sizes.end(), dims, k);
  weight = register_parameter("weight", torch::empty(sizes));
  bias = register_parameter("bias", torch::empty({1}));
  reset_parameters();
}

void SpatialScoresImpl::reset_parameters() {
  // As torch::nn::Conv2d initialises (and the Python module).
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  const double bound = 1.0 / std::sqrt(double(weight.numel()));
  bias.uniform_(-bound, bound);
}

torch::Tensor SpatialScoresImpl::forward(const torch::Tensor& x) {
  const int64_t dims = options.spatial_dims();
  TORCH_CHECK(x.dim() == dims + 2, owner, ": x must be (N, C, *S) with ", dims,
              " spatial dims (spatial_dims), got ", x.dim(), " dims");
  torch::Tensor pooled = ops::channel_pool(x);
  const int64_t padding = options.kernel_size() / 2;
  if (dims == 1) return at::conv1d(pooled, weight, bias, 1, padding);
  // oneDNN convolves 2 -> 1 channels several times faster channels-last (see the Python
  // module); the pooled map is small, so the copy is cheap.
  if (pooled.is_cpu()) {
    pooled = pooled.contiguous(dims == 2 ? at::MemoryFormat::ChannelsLast
                                         : at::MemoryFormat::ChannelsLast3d);
  }
  if (dims == 2) return at::conv2d(pooled, weight, bias, 1, padding);
  return at::conv3d(pooled, weight, bias, 1, padding);
}

void SpatialScoresImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::SpatialScores(kernel_size=" << options.kernel_size()
         << ", spatial_dims=" << options.spatial_dims() << ")";
}

SoftAttentionImpl::SoftAttentionImpl(SoftAttentionOptions options_) : options(std::move(options_)) {
  reset();
}

void SoftAttentionImpl::reset() {
  ops::parse_normalize("SoftAttention", options.normalize());
  ops::check_temperature("SoftAttention", options.temperature());
  scores = register_module("scores", SpatialScores(SpatialScoresOptions()
                                                       .kernel_size(options.kernel_size())
                                                       .spatial_dims(options.spatial_dims()),
                                                   "SoftAttention"));
}

torch::Tensor SoftAttentionImpl::forward(const torch::Tensor& x) {
  // One operator for the whole branch: the score head's pooling and convolution and the
  // weighting, with one gradient of x (`scores` computes the scores alone).
  const int64_t dims = options.spatial_dims();
  TORCH_CHECK(x.dim() == dims + 2, "SoftAttention: x must be (N, C, *S) with ", dims,
              " spatial dims (spatial_dims), got ", x.dim(), " dims");
  return ops::cbam_spatial(x, scores->weight, scores->bias, options.normalize(),
                           options.temperature());
}

void SoftAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::SoftAttention(normalize=" << options.normalize()
         << ", temperature=" << options.temperature() << ")";
}

HardAttentionImpl::HardAttentionImpl(HardAttentionOptions options_) : options(std::move(options_)) {
  reset();
}

void HardAttentionImpl::reset() {
  const std::string& mode = options.mode();
  ops::parse_mode("HardAttention", mode);
  ops::parse_estimator("HardAttention", options.estimator());
  ops::check_temperature("HardAttention", options.temperature());
  const double threshold = options.threshold();
  TORCH_CHECK(std::isfinite(threshold) && threshold >= 0 && threshold <= 1,
              "HardAttention: threshold must be finite and in [0, 1], got ", threshold);
  if (options.keep_ratio().has_value()) {
    const double ratio = *options.keep_ratio();
    TORCH_CHECK(mode == "topk", "HardAttention: keep_ratio needs mode='topk', got mode='", mode,
                "'");
    TORCH_CHECK(ratio > 0 && ratio <= 1, "HardAttention: keep_ratio must be in (0, 1], got ",
                ratio);
  }
  TORCH_CHECK(options.k() >= 1, "HardAttention: k must be >= 1, got ", options.k());
  TORCH_CHECK(std::isfinite(options.noise()) && options.noise() >= 0,
              "HardAttention: noise must be finite and >= 0, got ", options.noise());
  scores = register_module("scores", SpatialScores(SpatialScoresOptions()
                                                       .kernel_size(options.kernel_size())
                                                       .spatial_dims(options.spatial_dims()),
                                                   "HardAttention"));
  last_mask = torch::Tensor();
}

int64_t HardAttentionImpl::positions_kept(int64_t positions) const {
  if (!options.keep_ratio().has_value()) return options.k();
  const auto wanted = static_cast<int64_t>(std::ceil(*options.keep_ratio() * double(positions)));
  return std::max<int64_t>(1, std::min(positions, wanted));
}

torch::Tensor HardAttentionImpl::forward(const torch::Tensor& x) {
  torch::Tensor s = scores->forward(x);
  if (is_training() && options.noise() > 0) {
    // Logistic noise: sigmoid(s + noise) is a binary concrete sample (see the Python module).
    const torch::Tensor u = torch::rand_like(s).clamp_(1e-6, 1.0 - 1e-6);
    s = s + options.noise() * (torch::log(u) - torch::log1p(-u));
  }
  auto [y, mask] = ops::hard_attention(x, s, options.mode(), options.threshold(),
                                       positions_kept(ops::num_positions(x)), options.estimator(),
                                       options.temperature());
  if (is_training() || options.keep_mask()) last_mask = mask;
  return y;
}

void HardAttentionImpl::train(bool on) {
  if (on != is_training()) last_mask = torch::Tensor();
  torch::nn::Module::train(on);
}

std::optional<double> HardAttentionImpl::kept_fraction() const {
  if (!last_mask.defined()) return std::nullopt;
  return last_mask.to(torch::kFloat).mean().item<double>();
}

void HardAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::HardAttention(mode=" << options.mode()
         << ", threshold=" << options.threshold();
  if (options.keep_ratio().has_value()) {
    stream << ", keep_ratio=" << *options.keep_ratio();
  } else {
    stream << ", k=" << options.k();
  }
  stream << ", estimator=" << options.estimator() << ", temperature=" << options.temperature()
         << ", noise=" << options.noise();
  if (options.keep_mask()) stream << ", keep_mask=true";
  stream << ")";
}

}  // namespace nn
}  // namespace cnn_attention
