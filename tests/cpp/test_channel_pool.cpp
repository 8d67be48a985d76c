#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

TEST(ChannelPool, ForwardAndBackwardMatchFloat64Reference) {
  torch::manual_seed(4);
  for (bool channels_last : {false, true}) {
    auto x = torch::randn({2, 9, 5, 6}, torch::kDouble);
    if (channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    x.requires_grad_();
    const auto y = cnn_attention::ops::channel_pool(x);
    const auto expected =
        torch::stack({x.mean(1), x.gather(1, x.argmax(1, true)).squeeze(1)}, 1);
    EXPECT_TRUE(torch::allclose(y, expected, 1e-12, 1e-12));
    const auto grad = torch::randn_like(y);
    const auto actual = torch::autograd::grad({y}, {x}, {grad});
    const auto wanted = torch::autograd::grad({expected}, {x}, {grad});
    EXPECT_TRUE(torch::allclose(actual[0], wanted[0], 1e-12, 1e-12));
  }
}

TEST(ChannelPool, RejectsWrongRank) {
  try {
    cnn_attention::ops::channel_pool(torch::randn({3, 4}));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_EQ(std::string(e.what_without_backtrace()),
              "channel_pool: x must be (N, C, *S) with 1 to 3 spatial dims, got 2 dims with sizes (3, 4)");
  }
}

}  // namespace
