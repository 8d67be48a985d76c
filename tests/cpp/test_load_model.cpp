// Loads the TorchScript model that Python saved (tests/cpp/make_models.py) and checks that
// C++ reproduces Python's output and can train it: the deployment path without Python.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

namespace {

std::string models_dir() {
  const char* dir = std::getenv("CNN_ATTENTION_TEST_MODELS");
  return dir ? dir : "";
}

torch::Tensor load_tensor(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  EXPECT_TRUE(file.good()) << "missing " << path;
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

TEST(LoadModel, ReproducesPythonOutput) {
  ASSERT_FALSE(models_dir().empty()) << "CNN_ATTENTION_TEST_MODELS is not set (ctest sets it)";
  auto model = torch::jit::load(models_dir() + "/model.pt");
  model.eval();
  const auto x = load_tensor(models_dir() + "/input.pt");
  const auto expected = load_tensor(models_dir() + "/output.pt");
  torch::NoGradGuard no_grad;
  const auto y = model.forward({x}).toTensor();
  EXPECT_TRUE(torch::allclose(y, expected, 1e-5, 1e-6)) << (y - expected).abs().max();
}

TEST(LoadModel, TrainsFromCpp) {
  ASSERT_FALSE(models_dir().empty());
  auto model = torch::jit::load(models_dir() + "/model.pt");
  model.train();
  const auto x = load_tensor(models_dir() + "/input.pt");
  model.forward({x}).toTensor().sum().backward();
  int with_grad = 0;
  for (const auto& p : model.named_parameters()) {
    if (p.name.find("attention") != std::string::npos) {
      ASSERT_TRUE(p.value.grad().defined()) << p.name;
      EXPECT_GT(p.value.grad().abs().sum().item<double>(), 0.0) << p.name;
      ++with_grad;
    }
  }
  EXPECT_EQ(with_grad, 8);  // 4 parameters in each of the two attention modules
}

TEST(LoadModel, SpatialAttentionModelReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty());
  auto model = torch::jit::load(models_dir() + "/spatial_model.pt");
  model.eval();
  const auto x = load_tensor(models_dir() + "/input.pt");
  const auto expected = load_tensor(models_dir() + "/spatial_output.pt");
  {
    torch::NoGradGuard no_grad;
    const auto y = model.forward({x}).toTensor();
    EXPECT_TRUE(torch::allclose(y, expected, 1e-5, 1e-6)) << (y - expected).abs().max();
  }
  // The scripted HardAttention kept its mask: a quarter of the 8 x 8 positions.
  const auto mask = model.attr("hard_attention").toModule().attr("last_mask").toTensor();
  EXPECT_EQ(mask.sizes(), (std::vector<int64_t>{2, 1, 8, 8}));
  EXPECT_EQ(mask.sum().item<double>(), 2 * 16);

  model.train();
  model.forward({x}).toTensor().sum().backward();
  int with_grad = 0;
  for (const auto& p : model.named_parameters()) {
    if (p.name.find("attention") != std::string::npos || p.name.find("cbam") != std::string::npos) {
      ASSERT_TRUE(p.value.grad().defined()) << p.name;
      EXPECT_GT(p.value.grad().abs().sum().item<double>(), 0.0) << p.name;
      ++with_grad;
    }
  }
  // Score heads of soft, hard and CBAM's spatial branch (2 each), CBAM's channel MLP (4).
  EXPECT_EQ(with_grad, 10);
}

TEST(LoadModel, SelfAttentionModelReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty());
  auto model = torch::jit::load(models_dir() + "/self_model.pt");
  model.eval();
  const auto x = load_tensor(models_dir() + "/input.pt");
  const auto expected = load_tensor(models_dir() + "/self_output.pt");
  {
    torch::NoGradGuard no_grad;
    const auto y = model.forward({x}).toTensor();
    EXPECT_TRUE(torch::allclose(y, expected, 1e-5, 1e-6)) << (y - expected).abs().max();
  }
  model.train();
  model.forward({x}).toTensor().sum().backward();
  int with_grad = 0;
  for (const auto& p : model.named_parameters()) {
    if (p.name.find("attention") != std::string::npos) {
      ASSERT_TRUE(p.value.grad().defined()) << p.name;
      EXPECT_GT(p.value.grad().abs().sum().item<double>(), 0.0) << p.name;
      ++with_grad;
    }
  }
  EXPECT_EQ(with_grad, 10);  // qkv and out weights and biases and gamma, in two modules
}

}  // namespace
