// soft_attention, soft_attention_pool and hard_attention from C++ (no Python): results and
// gradients against float64 references written from docs/design.md section 1, and the modules.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "errors.h"

namespace {

using cnn_attention::ops::hard_attention;
using cnn_attention::ops::soft_attention;
using cnn_attention::ops::soft_attention_pool;

using cnn_attention_test::error_of;

// softmax over the positions of each (sample, score channel), shaped like `scores`.
torch::Tensor position_softmax(const torch::Tensor& scores, double temperature) {
  return torch::softmax((scores / temperature).flatten(2), -1).view_as(scores);
}

torch::Tensor soft_reference(const torch::Tensor& x, const torch::Tensor& scores,
                             const std::string& normalize, double temperature) {
  const int64_t positions = x.flatten(2).size(2);
  const auto w = normalize == "sigmoid" ? torch::sigmoid(scores / temperature)
                                        : position_softmax(scores, temperature) * positions;
  return x * w;
}

class SoftAttentionTest : public ::testing::TestWithParam<std::tuple<std::string, bool, bool>> {};

TEST_P(SoftAttentionTest, ForwardAndBackwardMatchFloat64Reference) {
  const auto [normalize, shared, channels_last] = GetParam();
  torch::manual_seed(3);
  auto x = torch::randn({2, 6, 5, 7}, torch::kDouble);
  auto scores = torch::randn({2, shared ? 1 : 6, 5, 7}, torch::kDouble);
  if (channels_last) {
    x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    scores = scores.contiguous(torch::MemoryFormat::ChannelsLast);
  }
  x.requires_grad_();
  scores.requires_grad_();
  const auto y = soft_attention(x, scores, normalize, 0.7);
  const auto expected = soft_reference(x, scores, normalize, 0.7);
  EXPECT_TRUE(torch::allclose(y, expected, 1e-10, 1e-12));
  EXPECT_EQ(y.strides(), x.strides());
  const auto grad = torch::randn_like(y);
  const auto actual = torch::autograd::grad({y}, {x, scores}, {grad});
  const auto wanted = torch::autograd::grad({expected}, {x, scores}, {grad});
  EXPECT_TRUE(torch::allclose(actual[0], wanted[0], 1e-9, 1e-11));
  EXPECT_TRUE(torch::allclose(actual[1], wanted[1], 1e-9, 1e-11));
}

INSTANTIATE_TEST_SUITE_P(NormalizeScoresLayouts, SoftAttentionTest,
                         ::testing::Combine(::testing::Values("sigmoid", "softmax"),
                                            ::testing::Bool(), ::testing::Bool()));

TEST(SoftAttentionPool, MatchesFloat64Reference) {
  torch::manual_seed(4);
  for (const int64_t score_channels : {1, 6}) {
    const auto x = torch::randn({3, 6, 9}, torch::kDouble).requires_grad_();
    const auto scores = torch::randn({3, score_channels, 9}, torch::kDouble).requires_grad_();
    const auto out = soft_attention_pool(x, scores, 2.0);
    const auto expected = (position_softmax(scores, 2.0) * x).sum(2);
    EXPECT_TRUE(torch::allclose(out, expected, 1e-10, 1e-12));
    const auto grad = torch::randn_like(out);
    const auto actual = torch::autograd::grad({out}, {x, scores}, {grad});
    const auto wanted = torch::autograd::grad({expected}, {x, scores}, {grad});
    EXPECT_TRUE(torch::allclose(actual[0], wanted[0], 1e-9, 1e-11));
    EXPECT_TRUE(torch::allclose(actual[1], wanted[1], 1e-9, 1e-11));
  }
}

TEST(HardAttention, TopKMaskAndStraightThroughGradients) {
  torch::manual_seed(5);
  const auto x = torch::randn({2, 4, 6, 6}, torch::kDouble).requires_grad_();
  const auto scores = torch::randn({2, 1, 6, 6}, torch::kDouble).requires_grad_();
  const double temperature = 0.5;
  auto [y, mask] = hard_attention(x, scores, "topk", 0.5, 5, "sigmoid", temperature);
  EXPECT_FALSE(mask.requires_grad());
  // The mask is 1 exactly at the 5 largest scores of each sample.
  const auto top = std::get<1>(scores.detach().flatten(1).topk(5, 1));
  const auto expected_mask = torch::zeros({2, 36}, torch::kDouble).scatter_(1, top, 1.0);
  EXPECT_TRUE(torch::equal(mask.flatten(1), expected_mask));
  EXPECT_TRUE(torch::equal(y, x * mask));

  const auto grad = torch::randn_like(y);
  const auto grads = torch::autograd::grad({y}, {x, scores}, {grad});
  const auto soft = torch::sigmoid(scores.detach() / temperature);
  const auto expected_grad_scores =
      (grad * x.detach()).sum(1, true) * soft * (1 - soft) / temperature;
  EXPECT_TRUE(torch::allclose(grads[0], grad * mask, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(grads[1], expected_grad_scores, 1e-10, 1e-12));
}

TEST(HardAttention, ThresholdModeAndIdentityEstimator) {
  torch::manual_seed(6);
  const auto x = torch::randn({2, 3, 17}, torch::kDouble).requires_grad_();
  const auto scores = torch::randn({2, 3, 17}, torch::kDouble).requires_grad_();
  auto [y, mask] = hard_attention(x, scores, "threshold", 0.3, 1, "identity", 1.0);
  EXPECT_TRUE(torch::equal(mask, (torch::sigmoid(scores.detach()) > 0.3).to(torch::kDouble)));
  const auto grad = torch::randn_like(y);
  const auto grads = torch::autograd::grad({y}, {x, scores}, {grad});
  EXPECT_TRUE(torch::allclose(grads[1], grad * x.detach(), 1e-12, 1e-12));
}

TEST(SpatialAttention, BadInputNamesOperatorAndArgument) {
  const auto x = torch::randn({2, 4, 5, 5});
  EXPECT_NE(error_of([&] {
              soft_attention(x, torch::randn({2, 3, 5, 5}));
            })
                .find("soft_attention: scores must be (N, 1, *S) or (N, C, *S) = (2, 1 or 4, 5, "
                      "5), got (2, 3, 5, 5)"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] {
        soft_attention(x, torch::randn({2, 1, 5, 5}), "tanh");
      }).find("soft_attention: normalize must be one of \"sigmoid\", \"softmax\", got \"tanh\""),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              soft_attention_pool(x, torch::randn({2, 1, 5, 5}), 0.0);
            }).find("soft_attention_pool: temperature must be finite and positive, got 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              hard_attention(x, torch::randn({2, 1, 5, 5}), "topk", 0.5, 26);
            }).find("hard_attention: k must be in [1, P] with P = 25 in top-k mode, got 26"),
            std::string::npos);
}

TEST(SpatialAttentionModules, ParametersAndForward) {
  torch::manual_seed(7);
  cnn_attention::nn::SoftAttention soft(cnn_attention::nn::SoftAttentionOptions().kernel_size(3));
  cnn_attention::nn::HardAttention hard(
      cnn_attention::nn::HardAttentionOptions().mode("topk").keep_ratio(0.25).noise(1.0));
  cnn_attention::nn::CBAM cbam(cnn_attention::nn::CBAMOptions(8).reduction(2));
  // The parameter names of the Python modules, so that state dicts carry over.
  std::vector<std::string> names;
  for (const auto& p : cbam->named_parameters()) names.push_back(p.key());
  EXPECT_EQ(names, (std::vector<std::string>{"channel.fc1_weight", "channel.fc1_bias",
                                             "channel.fc2_weight", "channel.fc2_bias",
                                             "spatial.scores.weight", "spatial.scores.bias"}));
  EXPECT_EQ(soft->scores->weight.sizes(), (std::vector<int64_t>{1, 2, 3, 3}));

  const auto x = torch::randn({2, 8, 8, 8});
  const auto scores = soft->scores->forward(x);
  EXPECT_TRUE(torch::allclose(soft->forward(x), x * torch::sigmoid(scores)));
  EXPECT_FALSE(hard->kept_fraction().has_value());
  hard->forward(x);
  EXPECT_EQ(hard->kept_fraction().value(), 0.25);  // ceil(0.25 * 64) = 16 of 64 positions
  // Switching to eval clears the mask, and an eval forward keeps none unless asked to.
  hard->eval();
  EXPECT_FALSE(hard->last_mask.defined());
  const auto y = hard->forward(x);
  EXPECT_FALSE(hard->last_mask.defined());
  hard->options.keep_mask(true);
  EXPECT_TRUE(torch::equal(hard->forward(x), y));
  EXPECT_EQ(hard->kept_fraction().value(), 0.25);
  EXPECT_TRUE(torch::equal(y, x * hard->last_mask));
  EXPECT_EQ(cbam->forward(x).sizes(), x.sizes());

  // A training step reaches every parameter.
  hard->train();
  EXPECT_FALSE(hard->last_mask.defined());
  (hard->forward(x).square().sum() + cbam->forward(x).square().sum()).backward();
  for (const auto& p : hard->parameters()) EXPECT_TRUE(p.grad().defined());
  for (const auto& p : cbam->parameters()) EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);

  EXPECT_NE(
      error_of([] {
        cnn_attention::nn::SoftAttention(cnn_attention::nn::SoftAttentionOptions().kernel_size(4));
      }).find("SoftAttention: kernel_size must be odd and positive, got 4"),
      std::string::npos);
  EXPECT_NE(
      error_of([] {
        cnn_attention::nn::HardAttention(cnn_attention::nn::HardAttentionOptions().keep_ratio(0.5));
      }).find("HardAttention: keep_ratio needs mode='topk', got mode='threshold'"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] {
        soft->forward(torch::randn({2, 8, 8}));
      }).find("SoftAttention: x must be (N, C, *S) with 2 spatial dims (spatial_dims), got 3 dims"),
      std::string::npos);
}

}  // namespace
