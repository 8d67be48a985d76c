// One model shared by 8 threads, as a C++ service runs it: every concurrent output must equal
// the serial one bit for bit (an eval forward writes no module state, and the kernels'
// results do not depend on what else runs).
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "model_files.h"

namespace {

constexpr int kThreads = 8;
constexpr int kCallsPerThread = 12;

// Inputs of a few sizes: thread t's call i runs inputs[(t + i) % size], so that threads run
// different inputs at the same moment.
std::vector<torch::Tensor> make_inputs(int64_t channels) {
  torch::manual_seed(3);
  std::vector<torch::Tensor> inputs;
  for (int64_t side : {16, 20, 24, 12}) {
    inputs.push_back(torch::randn({2, channels, side, side}));
    inputs.push_back(
        torch::randn({1, channels, side + 1, side - 1}).contiguous(at::MemoryFormat::ChannelsLast));
  }
  return inputs;
}

// Runs `forward` on every input serially, then from kThreads threads started together, and
// returns how many concurrent outputs differ from the serial ones. Half of the threads run in
// inference mode, half with gradients enabled (they record autograd graphs concurrently).
int concurrent_mismatches(const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                          const std::vector<torch::Tensor>& inputs) {
  std::vector<torch::Tensor> serial;
  {
    c10::InferenceMode inference;
    for (const auto& x : inputs) serial.push_back(forward(x));
  }
  std::atomic<int> ready{0};
  std::atomic<int> mismatches{0};
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int i = 0; i < kCallsPerThread; ++i) {
        const size_t which = (t + i) % inputs.size();
        torch::Tensor y;
        if (t % 2 == 0) {
          c10::InferenceMode inference;
          y = forward(inputs[which]);
        } else {
          y = forward(inputs[which]).detach();
        }
        if (!torch::equal(y, serial[which])) ++mismatches;
        ++calls;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(calls.load(), kThreads * kCallsPerThread);
  return mismatches.load();
}

TEST(Threads, LoadedTorchScriptModelWithEveryModuleFromEightThreads) {
  const std::string dir = cnn_attention_test::models_dir();
  ASSERT_FALSE(dir.empty()) << "CNN_ATTENTION_TEST_MODELS is not set (ctest sets it)";
  // ChannelAttention, CBAM (its ChannelAttention and SoftAttention), HardAttention, SelfAttention
  // (two heads) and soft attention pooling: every module and operator.
  auto model = torch::jit::load(dir + "/all_model.pt");
  model.eval();
  auto forward = [&model](const torch::Tensor& x) { return model.forward({x}).toTensor(); };
  EXPECT_EQ(concurrent_mismatches(forward, make_inputs(3)), 0);
  // The eval forwards left no mask behind.
  EXPECT_TRUE(model.attr("hard_attention").toModule().attr("last_mask").isNone());
}

TEST(Threads, CppModulesFromEightThreads) {
  namespace nn = cnn_attention::nn;
  torch::manual_seed(5);
  torch::nn::Sequential model(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 8, 3).padding(1)),
      nn::ChannelAttention(
          nn::ChannelAttentionOptions(8).reduction(2).pool("avgmax").gate("softmax")),
      nn::CBAM(nn::CBAMOptions(8).reduction(2)),
      nn::SoftAttention(nn::SoftAttentionOptions().kernel_size(3).normalize("softmax")),
      nn::HardAttention(nn::HardAttentionOptions().mode("topk").keep_ratio(0.5)),
      nn::SelfAttention(
          nn::SelfAttentionOptions(8).num_heads(2).qk_reduction(2).kv_stride(2).gamma_init(0.5)));
  model->eval();
  auto forward = [&model](const torch::Tensor& x) { return model->forward(x); };
  EXPECT_EQ(concurrent_mismatches(forward, make_inputs(3)), 0);
}

}  // namespace
