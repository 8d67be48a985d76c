#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "errors.h"

namespace {

using cnn_attention::ops::channel_attention;

// The float64 reference of docs/design.md section 1 with the max's gradient sent to the first
// maximum (torch::argmax returns the first).
torch::Tensor reference(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& b1,
                        const torch::Tensor& w2, const torch::Tensor& b2, const std::string& pool,
                        const std::string& gate) {
  const auto flat = x.flatten(2);
  const auto avg = flat.mean(2);
  const auto mx = flat.gather(2, flat.argmax(2, true)).squeeze(2);
  auto mlp = [&](const torch::Tensor& p) {
    return torch::nn::functional::linear(torch::relu(torch::nn::functional::linear(p, w1, b1)), w2, b2);
  };
  const auto z = pool == "avg" ? mlp(avg) : pool == "max" ? mlp(mx) : mlp(avg) + mlp(mx);
  auto w = gate == "sigmoid" ? torch::sigmoid(z) : torch::softmax(z, 1) * x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) w = w.unsqueeze(-1);
  return x * w;
}

std::vector<torch::Tensor> params(int64_t channels, int64_t hidden, torch::Dtype dtype) {
  const auto o = torch::TensorOptions().dtype(dtype);
  return {torch::randn({hidden, channels}, o).requires_grad_(), torch::randn({hidden}, o).requires_grad_(),
          torch::randn({channels, hidden}, o).requires_grad_(), torch::randn({channels}, o).requires_grad_()};
}

using cnn_attention_test::error_of;

class ChannelAttentionTest
    : public ::testing::TestWithParam<std::tuple<std::string, std::string, bool>> {};

TEST_P(ChannelAttentionTest, ForwardAndBackwardMatchFloat64Reference) {
  const auto [pool, gate, channels_last] = GetParam();
  torch::manual_seed(1);
  auto x = torch::randn({3, 12, 7, 9}, torch::kDouble);
  if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  x.requires_grad_();
  const auto p = params(12, 4, torch::kDouble);
  const auto y = channel_attention(x, p[0], p[1], p[2], p[3], pool, gate);
  const auto expected = reference(x, p[0], p[1], p[2], p[3], pool, gate);
  EXPECT_TRUE(torch::allclose(y, expected, 1e-10, 1e-12));
  EXPECT_EQ(y.strides(), x.strides());

  // Autograd runs in C++ (no Python): the registered torch::autograd::Function.
  const auto grad = torch::randn_like(y);
  const std::vector<torch::Tensor> inputs{x, p[0], p[1], p[2], p[3]};
  const auto actual = torch::autograd::grad({y}, inputs, {grad});
  const auto wanted = torch::autograd::grad({expected}, inputs, {grad});
  for (size_t i = 0; i < inputs.size(); ++i) {
    EXPECT_TRUE(torch::allclose(actual[i], wanted[i], 1e-9, 1e-11)) << "gradient " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    PoolsGatesLayouts, ChannelAttentionTest,
    ::testing::Combine(::testing::Values("avg", "max", "avgmax"),
                       ::testing::Values("sigmoid", "softmax"), ::testing::Bool()));

TEST(ChannelAttention, Float32AndHalfTypes) {
  torch::manual_seed(2);
  const auto x = torch::randn({2, 8, 33});
  const auto p = params(8, 4, torch::kFloat);
  const auto expected = reference(x.to(torch::kDouble), p[0].to(torch::kDouble), p[1].to(torch::kDouble),
                                  p[2].to(torch::kDouble), p[3].to(torch::kDouble), "avgmax", "sigmoid");
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(channel_attention(x, p[0], p[1], p[2], p[3], "avgmax", "sigmoid").to(torch::kDouble),
                              expected, 1e-4, 1e-5));
  for (auto dtype : {torch::kHalf, torch::kBFloat16}) {
    const auto xh = x.to(dtype);
    const auto y = channel_attention(xh, p[0].to(dtype), p[1].to(dtype), p[2].to(dtype), p[3].to(dtype),
                                     "avgmax", "sigmoid");
    const auto exp_h = reference(xh.to(torch::kDouble), p[0].to(dtype).to(torch::kDouble),
                                 p[1].to(dtype).to(torch::kDouble), p[2].to(dtype).to(torch::kDouble),
                                 p[3].to(dtype).to(torch::kDouble), "avgmax", "sigmoid");
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_TRUE(torch::allclose(y.to(torch::kDouble), exp_h, 3e-2, 3e-2));
  }
}

TEST(ChannelAttention, BadInputsNameOperatorAndArgument) {
  const auto x = torch::randn({2, 8, 5, 5});
  const auto p = params(8, 4, torch::kFloat);
  EXPECT_EQ(error_of([&] { channel_attention(x, p[0], p[1], p[2], p[3], "mean", "sigmoid"); }),
            "channel_attention: pool must be one of \"avg\", \"max\", \"avgmax\", got \"mean\"");
  EXPECT_EQ(error_of([&] { channel_attention(x, p[0], p[1], torch::randn({8, 3}), p[3], "avg", "sigmoid"); }),
            "channel_attention: fc2_weight must be (C, R) = (8, 4), got (8, 3)");
  EXPECT_EQ(error_of([&] { channel_attention(x.to(torch::kInt), p[0], p[1], p[2], p[3], "avg", "sigmoid"); }),
            "channel_attention: x must have a floating dtype (float16, bfloat16, float32, float64), got Int");
}

TEST(ChannelAttentionModule, MatchesOperatorAndTrainsFromCpp) {
  torch::manual_seed(3);
  cnn_attention::nn::ChannelAttention m(cnn_attention::nn::ChannelAttentionOptions(32).reduction(4).pool("avgmax"));
  EXPECT_EQ(m->hidden, 8);
  const auto names = m->named_parameters().keys();
  EXPECT_EQ(names, (std::vector<std::string>{"fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}));
  const auto x = torch::randn({4, 32, 6, 6});
  const auto y = m(x);
  EXPECT_TRUE(torch::allclose(
      y, channel_attention(x, m->fc1_weight, m->fc1_bias, m->fc2_weight, m->fc2_bias, "avgmax", "sigmoid")));

  // A few steps of SGD pull the output towards a target: gradients reach every parameter.
  const auto target = x * 0.25;
  torch::optim::SGD opt(m->parameters(), 0.5);
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    const auto loss = torch::mse_loss(m(x), target);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first);
  EXPECT_THROW(cnn_attention::nn::ChannelAttention(cnn_attention::nn::ChannelAttentionOptions(8).gate("relu")),
               c10::Error);
}

TEST(ChannelGate, MatchesFloat64ReferenceAndTrainsFromCpp) {
  torch::manual_seed(4);
  for (const std::string gate : {"sigmoid", "hard_sigmoid", "softmax"}) {
    for (const bool channels_last : {false, true}) {
      auto x = torch::randn({3, 16, 5, 7});
      if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
      x.requires_grad_();
      const auto logits = (2 * torch::randn({3, 16})).requires_grad_();
      cnn_attention::nn::ChannelGate module(cnn_attention::nn::ChannelGateOptions().gate(gate));
      const auto y = module(x, logits);
      EXPECT_EQ(y.is_contiguous(torch::MemoryFormat::ChannelsLast), channels_last);
      const auto grad = torch::randn_like(y);
      const auto grads = torch::autograd::grad({y}, {x, logits}, {grad});

      const auto x64 = x.detach().to(torch::kDouble).requires_grad_();
      const auto z64 = logits.detach().to(torch::kDouble).requires_grad_();
      auto w = gate == "sigmoid"        ? torch::sigmoid(z64)
               : gate == "hard_sigmoid" ? torch::hardsigmoid(z64)
                                        : torch::softmax(z64, 1) * 16;
      const auto expected = x64 * w.unsqueeze(-1).unsqueeze(-1);
      const auto expected_grads = torch::autograd::grad({expected}, {x64, z64}, {grad.to(torch::kDouble)});
      EXPECT_TRUE(torch::allclose(y.to(torch::kDouble), expected, 1e-5, 1e-6)) << gate;
      EXPECT_TRUE(torch::allclose(grads[0].to(torch::kDouble), expected_grads[0], 1e-5, 1e-6)) << gate;
      EXPECT_TRUE(torch::allclose(grads[1].to(torch::kDouble), expected_grads[1], 1e-4, 1e-5)) << gate;
    }
  }
  EXPECT_EQ(error_of([] { cnn_attention::ops::channel_gate(torch::randn({2, 8, 4}), torch::randn({2, 6})); }),
            "channel_gate: logits must be (N, C) = (2, 8), got (2, 6)");
  EXPECT_EQ(error_of([] { cnn_attention::nn::ChannelGate(cnn_attention::nn::ChannelGateOptions().gate("relu")); }),
            "ChannelGate: gate must be one of \"sigmoid\", \"softmax\", \"hard_sigmoid\", got \"relu\"");
}

// cbam against its steps one after the other (channel attention, the score convolution of the
// channel pool, the sigmoid gate), in float64, from C++ with C++ autograd; both layouts.
TEST(Cbam, MatchesItsStepsAndTrainsFromCpp) {
  for (const bool channels_last : {false, true}) {
    torch::manual_seed(5);
    auto x = torch::randn({2, 12, 7, 9}, torch::kDouble);
    if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    x.requires_grad_();
    const auto p = params(12, 4, torch::kDouble);
    const auto conv_weight = torch::randn({1, 2, 3, 3}, torch::kDouble).requires_grad_();
    const auto conv_bias = torch::randn({1}, torch::kDouble).requires_grad_();
    const auto y = cnn_attention::ops::cbam(x, p[0], p[1], p[2], p[3], conv_weight, conv_bias);
    const auto x1 = reference(x, p[0], p[1], p[2], p[3], "avgmax", "sigmoid");
    const auto pooled = torch::cat({x1.mean(1, true), std::get<0>(x1.max(1, true))}, 1);
    const auto expected =
        x1 * torch::sigmoid(torch::conv2d(pooled, conv_weight, conv_bias, 1, 1));
    EXPECT_TRUE(torch::allclose(y, expected, 1e-10, 1e-12));
    EXPECT_EQ(y.strides(), x.strides());

    const auto grad = torch::randn_like(y);
    const std::vector<torch::Tensor> inputs{x, p[0], p[1], p[2], p[3], conv_weight, conv_bias};
    const auto actual = torch::autograd::grad({y}, inputs, {grad});
    const auto wanted = torch::autograd::grad({expected}, inputs, {grad});
    for (size_t i = 0; i < inputs.size(); ++i) {
      EXPECT_TRUE(torch::allclose(actual[i], wanted[i], 1e-9, 1e-11)) << "gradient " << i;
    }
  }
}

// cbam_spatial (the SoftAttention module's operator) against its steps, channel_pool's mean
// and max, the score convolution and the normalization, in float64 with C++ autograd; both
// normalizations and layouts.
TEST(CbamSpatial, MatchesItsStepsAndTrainsFromCpp) {
  for (const bool channels_last : {false, true}) {
    for (const std::string normalize : {"sigmoid", "softmax"}) {
      torch::manual_seed(6);
      auto x = torch::randn({2, 10, 6, 7}, torch::kDouble);
      if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
      x.requires_grad_();
      const auto conv_weight = torch::randn({1, 2, 5, 5}, torch::kDouble).requires_grad_();
      const auto conv_bias = torch::randn({1}, torch::kDouble).requires_grad_();
      const double temperature = 0.8;
      const auto y =
          cnn_attention::ops::cbam_spatial(x, conv_weight, conv_bias, normalize, temperature);
      const auto pooled = torch::cat({x.mean(1, true), std::get<0>(x.max(1, true))}, 1);
      const auto scores = torch::conv2d(pooled, conv_weight, conv_bias, 1, 2) / temperature;
      const auto weights =
          normalize == "sigmoid"
              ? torch::sigmoid(scores)
              : torch::softmax(scores.flatten(2), 2).view_as(scores) * double(6 * 7);
      const auto expected = x * weights;
      EXPECT_TRUE(torch::allclose(y, expected, 1e-10, 1e-12)) << normalize;
      EXPECT_EQ(y.strides(), x.strides());

      const auto grad = torch::randn_like(y);
      const std::vector<torch::Tensor> inputs{x, conv_weight, conv_bias};
      const auto actual = torch::autograd::grad({y}, inputs, {grad});
      const auto wanted = torch::autograd::grad({expected}, inputs, {grad});
      for (size_t i = 0; i < inputs.size(); ++i) {
        EXPECT_TRUE(torch::allclose(actual[i], wanted[i], 1e-9, 1e-11))
            << normalize << ", gradient " << i;
      }
    }
  }
  EXPECT_EQ(error_of([] {
              cnn_attention::ops::cbam_spatial(torch::randn({2, 8, 4, 4}), torch::randn({1, 2, 3}),
                                               std::nullopt);
            }),
            "cbam_spatial: conv_weight must be (1, 2, k, k) with k odd, one k per spatial dim "
            "of x, got (1, 2, 3)");
}

TEST(BuildInfo, NamesVersionAndTorch) {
  const std::string info = cnn_attention::build_info();
  EXPECT_NE(info.find("version=0.1.0"), std::string::npos) << info;
  EXPECT_NE(info.find(";torch="), std::string::npos) << info;
}

}  // namespace
