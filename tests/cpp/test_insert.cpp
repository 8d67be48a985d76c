// cnn_attention::nn::insert for torch::nn::Sequential models: stages (nested Sequentials
// descended), the shallow, deep and all insertion points, named blocks, inserting again, the
// state dict keys kept, and the errors.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "errors.h"

namespace {

namespace cnn = cnn_attention::nn;

using cnn_attention_test::error_of;

// Stages: 16x16 with 8 channels (layers 0, 1: the ReLU ends the block), 8x8 with 16 (2, 3); a
// global pool (one position: no stage), then the head.
torch::nn::Sequential small_cnn() {
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)), torch::nn::ReLU(),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 16, 3).stride(2).padding(1)), torch::nn::ReLU(),
      torch::nn::AdaptiveAvgPool2d(1), torch::nn::Flatten(), torch::nn::Linear(16, 10));
}

std::shared_ptr<cnn::BlockThenAttentionImpl> wrapper(const torch::nn::Sequential& model, size_t i) {
  return std::dynamic_pointer_cast<cnn::BlockThenAttentionImpl>(model->ptr(i));
}

bool has_key(const torch::nn::Module& model, const std::string& key) {
  const auto keys = model.named_parameters().keys();
  return std::find(keys.begin(), keys.end(), key) != keys.end();
}

// A residual block: two convolutions, so a block of its own.
struct ResidualImpl : torch::nn::Module {
  explicit ResidualImpl(int64_t c)
      : conv1(register_module("conv1",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(c, c, 3).padding(1)))),
        conv2(register_module("conv2",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(c, c, 3).padding(1)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return x + conv2(torch::relu(conv1(x))); }
  torch::nn::Conv2d conv1, conv2;
};
TORCH_MODULE(Residual);

// A stem (conv, norm, ReLU: one layer), a stage of two residual blocks at 16x16, a max pool
// (a layer), a stage of two at 8x8, the head.
torch::nn::Sequential nested_cnn() {
  return torch::nn::Sequential(
      cnn::TensorSequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)),
                            torch::nn::BatchNorm2d(8), torch::nn::ReLU()),
      cnn::TensorSequential(Residual(8), Residual(8)), torch::nn::MaxPool2d(2),
      cnn::TensorSequential(Residual(8), Residual(8)), torch::nn::AdaptiveAvgPool2d(1),
      torch::nn::Flatten(), torch::nn::Linear(8, 10));
}

TEST(Insert, FindsStages) {
  const auto stages = cnn::find_stages(small_cnn(), torch::randn({1, 3, 16, 16}));
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[0].blocks, (std::vector<std::string>{"1"}));
  EXPECT_EQ(stages[0].channels, 8);
  EXPECT_EQ(stages[0].spatial, (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(stages[1].blocks, (std::vector<std::string>{"3"}));
  EXPECT_EQ(stages[1].channels, 16);
}

TEST(Insert, DescendsNestedSequentials) {
  const auto stages = cnn::find_stages(nested_cnn(), torch::randn({1, 3, 16, 16}));
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[0].blocks, (std::vector<std::string>{"1.0", "1.1"}));
  EXPECT_EQ(stages[0].spatial, (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(stages[1].blocks, (std::vector<std::string>{"3.0", "3.1"}));
  EXPECT_EQ(stages[1].spatial, (std::vector<int64_t>{8, 8}));
}

TEST(Insert, NestedBlocksKeepTheirStateDictKeys) {
  const auto x = torch::randn({2, 3, 16, 16});
  auto model = nested_cnn();
  const auto before = model->named_parameters().keys();
  auto result = cnn::insert(model, "cbam", "all", x);
  result =
      cnn::insert(result, cnn::attention_family("channel"), std::vector<std::string>{"0", "1"}, x);
  for (const auto& key : before) EXPECT_TRUE(has_key(*result, key)) << key;
  for (const auto& key : result->named_parameters().keys()) {
    const bool own = std::find(before.begin(), before.end(), key) != before.end();
    EXPECT_TRUE(own || key.rfind("1.1.inserted_attention.0.", 0) == 0 ||
                key.rfind("3.1.inserted_attention.0.", 0) == 0 || key.rfind("0.3.0.", 0) == 0 ||
                key.rfind("1.2.0.", 0) == 0)
        << key;
  }
  EXPECT_TRUE(has_key(*result, "1.1.inserted_attention.0.channel.fc1_weight"));
  EXPECT_TRUE(has_key(*result, "0.3.0.fc1_weight"));  // appended to the stem Sequential
  EXPECT_TRUE(has_key(*result, "1.2.0.fc1_weight"));  // appended to the stage Sequential
  EXPECT_EQ(result->forward(x).sizes(), (std::vector<int64_t>{2, 10}));
  // The model passed in is unchanged; its blocks are shared.
  const auto stage = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->ptr(1));
  EXPECT_EQ(stage->size(), 2u);
  EXPECT_TRUE(stage->ptr(1)->as<ResidualImpl>());
  EXPECT_EQ(model->named_parameters().keys(), before);
  // The block inside the wrapper is the model's own, and the wrapper trains with it.
  const auto changed = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(result->ptr(1));
  const auto wrapped = std::dynamic_pointer_cast<cnn::BlockThenAttentionImpl>(changed->ptr(1));
  ASSERT_TRUE(wrapped);
  EXPECT_EQ(wrapped->block().ptr(), stage->ptr(1));
  result->eval();
  EXPECT_FALSE(wrapped->block().ptr()->is_training());
  result->train();
  EXPECT_TRUE(wrapped->block().ptr()->is_training());
  // Stages of the changed model are the same blocks.
  const auto again = cnn::find_stages(result, x);
  ASSERT_EQ(again.size(), 2u);
  EXPECT_EQ(again[0].blocks, (std::vector<std::string>{"1.0", "1.1"}));
}

TEST(Insert, ShallowDeepAndAll) {
  const auto x = torch::randn({2, 3, 16, 16});
  for (const std::string family : {"channel", "soft", "hard", "self", "cbam"}) {
    auto model = small_cnn();
    auto shallow = cnn::insert(model, family, "shallow", x);
    EXPECT_TRUE(wrapper(shallow, 1) && !wrapper(shallow, 3)) << family;
    auto deep = cnn::insert(model, family, "deep", x);
    EXPECT_TRUE(!wrapper(deep, 1) && wrapper(deep, 3)) << family;
    auto all = cnn::insert(model, family, "all", x);
    EXPECT_TRUE(wrapper(all, 1) && wrapper(all, 3)) << family;
    EXPECT_EQ(all->forward(x).sizes(), (std::vector<int64_t>{2, 10})) << family;
    EXPECT_FALSE(wrapper(model, 1) || wrapper(model, 3)) << "the model passed in is unchanged";
  }
}

TEST(Insert, AfterBlocksWithTheirChannelsAndAgain) {
  const auto x = torch::randn({1, 3, 16, 16});
  std::vector<int64_t> channels;
  const cnn::AttentionFactory factory = [&](int64_t c, int64_t dims) {
    channels.push_back(c);
    EXPECT_EQ(dims, 2);
    return torch::nn::AnyModule(
        cnn::ChannelAttention(cnn::ChannelAttentionOptions(c).reduction(2)));
  };
  auto model = cnn::insert(small_cnn(), factory, std::vector<int64_t>{0, 2}, x);
  EXPECT_EQ(channels, (std::vector<int64_t>{8, 16}));
  model = cnn::insert(model, "soft", "deep", x);  // the deep stage ends with block 3
  model = cnn::insert(model, "self", "deep", x);
  ASSERT_TRUE(wrapper(model, 3));
  EXPECT_EQ(wrapper(model, 3)->attention()->size(), 2u);  // SoftAttention, SelfAttention
  ASSERT_TRUE(wrapper(model, 0));
  EXPECT_EQ(model->forward(x).sizes(), (std::vector<int64_t>{1, 10}));
  // Parameter names as in Python: the block's own stay, the attention's are added under
  // "inserted_attention".
  EXPECT_TRUE(has_key(*model, "0.weight"));
  EXPECT_TRUE(has_key(*model, "0.inserted_attention.0.fc1_weight"));
}

TEST(Insert, NewModulesTakeTheOutputDtype) {
  auto model = small_cnn();
  model->to(torch::kDouble);
  auto result = cnn::insert(model, "cbam", "all", torch::randn({1, 3, 16, 16}, torch::kDouble));
  for (const auto& p : result->parameters()) EXPECT_EQ(p.scalar_type(), torch::kDouble);
}

TEST(Insert, Errors) {
  auto model = small_cnn();
  const auto x = torch::randn({1, 3, 16, 16});
  EXPECT_NE(error_of([&] {
              cnn::insert(model, "sparse", "deep", x);
            }).find("insert: attention must be one of \"channel\""),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cnn::insert(model, "cbam", "middle", x);
            }).find("insert: where must be one of \"shallow\", \"deep\", \"all\", got \"middle\""),
            std::string::npos);
  const auto factory = cnn::attention_family("channel");
  EXPECT_NE(error_of([&] {
              cnn::insert(model, factory, std::vector<int64_t>{9}, x);
            }).find("insert: the model has no block 9 (it has 7)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cnn::insert(model, factory, std::vector<int64_t>{6}, x);
            }).find("insert: block \"6\" does not produce a feature map"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cnn::insert(model, factory, std::vector<std::string>{"1.0"}, x);
            }).find("insert: the model has no block \"1.0\""),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              cnn::insert(model, "cbam", "deep", torch::randn({1, 5, 16, 16}));
            }).find("insert: the model failed on example_input"),
            std::string::npos);
  torch::nn::Sequential flat(torch::nn::Linear(4, 4));
  EXPECT_NE(error_of([&] {
              cnn::insert(flat, "cbam", "deep", torch::randn({2, 4}));
            }).find("insert: the model produces no feature map"),
            std::string::npos);
}

}  // namespace
