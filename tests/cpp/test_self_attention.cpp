// self_attention from C++ (no Python): results and gradients against a float64 reference
// written from docs/design.md section 1 (it builds the P x P matrix, so small inputs only), the
// error messages, and the SelfAttention module.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "errors.h"

namespace {

using cnn_attention::ops::self_attention;

using cnn_attention_test::error_of;

torch::Tensor max_pool(const torch::Tensor& maps, int64_t stride) {
  switch (maps.dim()) {
    case 3:
      return torch::max_pool1d(maps, {stride}, {stride});
    case 4:
      return torch::max_pool2d(maps, {stride, stride}, {stride, stride});
    default:
      return torch::max_pool3d(maps, {stride, stride, stride}, {stride, stride, stride});
  }
}

torch::Tensor reference(const torch::Tensor& x, const torch::Tensor& qkv_weight,
                        const torch::Tensor& qkv_bias, const torch::Tensor& out_weight,
                        const torch::Tensor& out_bias, const torch::Tensor& gamma, int64_t qk_dim,
                        int64_t heads, int64_t kv_stride) {
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t v_dim = qkv_weight.size(0) - 2 * qk_dim;
  const auto tokens = x.flatten(2).transpose(1, 2);                      // (N, P, C)
  auto qkv = torch::matmul(tokens, qkv_weight.t()) + qkv_bias;            // (N, P, R)
  auto maps = qkv.transpose(1, 2).reshape(
      [&] {
        std::vector<int64_t> sizes{batch, qkv_weight.size(0)};
        for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
        return sizes;
      }());
  auto q = maps.narrow(1, 0, qk_dim).flatten(2);
  auto kv = maps.narrow(1, qk_dim, qk_dim + v_dim);
  if (kv_stride > 1) kv = max_pool(kv, kv_stride);
  auto k = kv.narrow(1, 0, qk_dim).flatten(2);
  auto v = kv.narrow(1, qk_dim, v_dim).flatten(2);
  const int64_t dq = qk_dim / heads, dv = v_dim / heads;
  q = q.view({batch, heads, dq, -1}).transpose(2, 3);   // (N, H, P, dq)
  k = k.view({batch, heads, dq, -1});                   // (N, H, dq, Pk)
  v = v.view({batch, heads, dv, -1}).transpose(2, 3);   // (N, H, Pk, dv)
  const auto attn = torch::matmul(torch::softmax(torch::matmul(q, k) / std::sqrt(double(dq)), -1), v);
  const auto concat = attn.transpose(1, 2).reshape({batch, -1, v_dim});  // (N, P, v)
  const auto out = (torch::matmul(concat, out_weight.t()) + out_bias).transpose(1, 2);
  return x + gamma * out.reshape(x.sizes());
}

struct Case {
  std::vector<int64_t> shape;
  int64_t qk_dim, v_dim, heads, kv_stride;
  bool channels_last;
};

class SelfAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(SelfAttentionTest, ForwardAndBackwardMatchFloat64Reference) {
  const Case c = GetParam();
  torch::manual_seed(5);
  const auto options = torch::TensorOptions().dtype(torch::kDouble);
  const int64_t channels = c.shape[1], rows = 2 * c.qk_dim + c.v_dim;
  auto x = torch::randn(c.shape, options);
  if (c.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  std::vector<torch::Tensor> leaves{x,
                                    torch::randn({rows, channels}, options),
                                    torch::randn({rows}, options),
                                    torch::randn({channels, c.v_dim}, options),
                                    torch::randn({channels}, options),
                                    torch::full({1}, 0.7, options)};
  for (auto& t : leaves) t.requires_grad_();
  const auto y = self_attention(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5],
                                c.qk_dim, c.heads, c.kv_stride);
  const auto expected = reference(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], leaves[5],
                                  c.qk_dim, c.heads, c.kv_stride);
  EXPECT_TRUE(torch::allclose(y, expected, 1e-10, 1e-11)) << (y - expected).abs().max();
  EXPECT_EQ(y.strides(), x.strides());
  const auto grad = torch::randn_like(y);
  const auto actual = torch::autograd::grad({y}, leaves, {grad});
  const auto wanted = torch::autograd::grad({expected}, leaves, {grad});
  for (size_t i = 0; i < leaves.size(); ++i) {
    EXPECT_TRUE(torch::allclose(actual[i], wanted[i], 1e-9, 1e-10))
        << "input " << i << ": " << (actual[i] - wanted[i]).abs().max();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SelfAttentionTest,
    ::testing::Values(Case{{2, 6, 5, 7}, 4, 6, 2, 1, false}, Case{{2, 6, 5, 7}, 2, 6, 1, 2, true},
                      Case{{1, 4, 300}, 2, 4, 1, 1, false}, Case{{2, 3, 4, 5, 6}, 2, 4, 2, 2, false},
                      Case{{1, 8, 33, 17}, 2, 8, 1, 3, true}));

TEST(SelfAttentionErrors, NameTheOperatorAndTheArgument) {
  const auto x = torch::randn({2, 8, 4, 4});
  const auto w = torch::randn({2 * 2 + 8, 8}), b = torch::randn({12});
  const auto ow = torch::randn({8, 8}), ob = torch::randn({8}), gamma = torch::zeros({1});
  EXPECT_NE(error_of([&] { self_attention(x, torch::randn({12, 7}), b, ow, ob, gamma, 2); })
                .find("self_attention: qkv_weight must be (2 * qk_dim + v_dim, C) with C = 8"),
            std::string::npos);
  EXPECT_NE(error_of([&] { self_attention(x, w, b, ow, ob, gamma, 6); })
                .find("self_attention: qk_dim must be in [1, 5]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { self_attention(x, w, b, ow, ob, gamma, 2, 3); })
                .find("self_attention: num_heads must divide qk_dim = 2 and v_dim = 8, got 3"),
            std::string::npos);
  EXPECT_NE(error_of([&] { self_attention(x, w, b, torch::randn({8, 4}), ob, gamma, 2); })
                .find("self_attention: out_weight must be (C, v_dim) = (8, 8)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { self_attention(x, w, b, ow, ob, torch::zeros({2}), 2); })
                .find("self_attention: gamma must have one element"),
            std::string::npos);
  EXPECT_NE(error_of([&] { self_attention(x, w, b, ow, ob, gamma, 2, 1, 5); })
                .find("self_attention: kv_stride must be in [1, 4]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { self_attention(x, w.to(torch::kDouble), b, ow, ob, gamma, 2); })
                .find("self_attention: qkv_weight must have the dtype of x"),
            std::string::npos);
}

TEST(SelfAttentionModule, ParametersLikePythonAndTrains) {
  torch::manual_seed(0);
  cnn_attention::nn::SelfAttention module(
      cnn_attention::nn::SelfAttentionOptions(16).num_heads(2).kv_stride(2).gamma_init(0.5));
  EXPECT_EQ(module->qk_dim, 2);
  EXPECT_EQ(module->v_dim, 16);
  std::vector<std::string> names;
  for (const auto& p : module->named_parameters()) names.push_back(p.key());
  EXPECT_EQ(names, (std::vector<std::string>{"qkv_weight", "qkv_bias", "out_weight", "out_bias",
                                             "gamma"}));
  EXPECT_EQ(module->qkv_weight.sizes(), (std::vector<int64_t>{2 * 2 + 16, 16}));
  EXPECT_EQ(module->gamma.item<double>(), 0.5);
  const auto x = torch::randn({2, 16, 8, 8});
  torch::optim::SGD optimizer(module->parameters(), 0.01);
  const auto loss_before = module->forward(x).square().mean();
  loss_before.backward();
  for (const auto& p : module->parameters()) EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);
  optimizer.step();
  EXPECT_LT(module->forward(x).square().mean().item<double>(), loss_before.item<double>());
  EXPECT_NE(error_of([] {
              cnn_attention::nn::SelfAttention(
                  cnn_attention::nn::SelfAttentionOptions(16).num_heads(3));
            }).find("SelfAttention: num_heads = 3 must divide qk_dim = 3"),
            std::string::npos);
}

}  // namespace
