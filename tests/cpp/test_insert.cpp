// cnn_attention::nn::insert for torch::nn::Sequential models: stages, the shallow, deep and
// all insertion points, named blocks, inserting again, and the errors.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace {

namespace cnn = cnn_attention::nn;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

// Stages: 16x16 with 8 channels (blocks 0, 1), 8x8 with 16 (2, 3); a global pool (one
// position: no stage), then the head.
torch::nn::Sequential small_cnn() {
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)), torch::nn::ReLU(),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 16, 3).stride(2).padding(1)), torch::nn::ReLU(),
      torch::nn::AdaptiveAvgPool2d(1), torch::nn::Flatten(), torch::nn::Linear(16, 10));
}

std::shared_ptr<cnn::AttentionAfterImpl> wrapper(const torch::nn::Sequential& model, size_t i) {
  return std::dynamic_pointer_cast<cnn::AttentionAfterImpl>(model->ptr(i));
}

TEST(Insert, FindsStages) {
  const auto stages = cnn::find_stages(small_cnn(), torch::randn({1, 3, 16, 16}));
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages[0].blocks, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(stages[0].channels, 8);
  EXPECT_EQ(stages[0].spatial, (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(stages[1].blocks, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(stages[1].channels, 16);
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
  model = cnn::insert(model, "soft", "deep", x);  // the deep stage now ends with block 3
  model = cnn::insert(model, "self", "deep", x);
  ASSERT_TRUE(wrapper(model, 3));
  EXPECT_EQ(wrapper(model, 3)->size(), 3u);  // ReLU, SoftAttention, SelfAttention
  ASSERT_TRUE(wrapper(model, 0));
  EXPECT_EQ(model->forward(x).sizes(), (std::vector<int64_t>{1, 10}));
  // Parameter names as in Python's AttentionAfter: the block is ".0".
  const auto names = model->named_parameters().keys();
  EXPECT_NE(std::find(names.begin(), names.end(), "0.0.weight"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "0.1.fc1_weight"), names.end());
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
            }).find("insert: block 6 does not produce a feature map"),
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
