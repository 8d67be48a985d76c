// Loads the TorchScript model that Python saved (tests/cpp/make_models.py) and checks that
// C++ reproduces Python's output and can train it: the deployment path without Python.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <string>

#include "model_files.h"

namespace {

using cnn_attention_test::load_tensor;
using cnn_attention_test::models_dir;

// The model saved by Python at `name` (eval mode), after checking that it reproduces Python's
// output `output_name` on the saved input.
torch::jit::Module load_and_check_output(const std::string& name, const std::string& output_name) {
  auto model = torch::jit::load(models_dir() + "/" + name);
  model.eval();
  const auto x = load_tensor(models_dir() + "/input.pt");
  const auto expected = load_tensor(models_dir() + "/" + output_name);
  torch::NoGradGuard no_grad;
  const auto y = model.forward({x}).toTensor();
  EXPECT_TRUE(torch::allclose(y, expected, 1e-5, 1e-6)) << (y - expected).abs().max();
  return model;
}

// One training step from C++; every parameter whose name contains one of `parts` must get a
// nonzero gradient. Returns how many did.
int trained_parameters(torch::jit::Module& model, const std::vector<std::string>& parts) {
  model.train();
  model.forward({load_tensor(models_dir() + "/input.pt")}).toTensor().sum().backward();
  int with_grad = 0;
  for (const auto& p : model.named_parameters()) {
    const bool selected = std::any_of(parts.begin(), parts.end(), [&](const std::string& part) {
      return p.name.find(part) != std::string::npos;
    });
    if (!selected) continue;
    EXPECT_TRUE(p.value.grad().defined()) << p.name;
    if (p.value.grad().defined()) {
      EXPECT_GT(p.value.grad().abs().sum().item<double>(), 0.0) << p.name;
    }
    ++with_grad;
  }
  return with_grad;
}

TEST(LoadModel, ReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty()) << "CNN_ATTENTION_TEST_MODELS is not set (ctest sets it)";
  auto model = load_and_check_output("model.pt", "output.pt");
  EXPECT_EQ(trained_parameters(model, {"attention"}), 8);  // 4 in each attention module
}

TEST(LoadModel, SpatialAttentionModelReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty());
  auto model = load_and_check_output("spatial_model.pt", "spatial_output.pt");
  // The scripted HardAttention kept its mask: a quarter of the 8 x 8 positions.
  const auto mask = model.attr("hard_attention").toModule().attr("last_mask").toTensor();
  EXPECT_EQ(mask.sizes(), (std::vector<int64_t>{2, 1, 8, 8}));
  EXPECT_EQ(mask.sum().item<double>(), 2 * 16);
  // Score heads of soft, hard and CBAM's spatial branch (2 each), CBAM's channel MLP (4).
  EXPECT_EQ(trained_parameters(model, {"attention", "cbam"}), 10);
}

TEST(LoadModel, SelfAttentionModelReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty());
  auto model = load_and_check_output("self_model.pt", "self_output.pt");
  // qkv and out weights and biases and gamma, in two modules.
  EXPECT_EQ(trained_parameters(model, {"attention"}), 10);
}

TEST(LoadModel, InsertedAttentionModelReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty());
  auto model = load_and_check_output("inserted_model.pt", "inserted_output.pt");
  // insert's forward hooks run in C++: CBAM (4 + 2) after bn2 in each of the three blocks and
  // self attention (5) after the last one, all under "inserted_attention".
  EXPECT_EQ(trained_parameters(model, {"inserted_attention"}), 23);
}

TEST(LoadModel, AllFamiliesModelReproducesPythonOutputAndTrains) {
  ASSERT_FALSE(models_dir().empty());
  auto model = load_and_check_output("all_model.pt", "all_output.pt");
  // Channel MLP (4), CBAM (4 + 2), hard attention's score head (2), self attention (5).
  EXPECT_EQ(trained_parameters(model, {"attention", "cbam"}), 17);
}

}  // namespace
