#pragma once

// insert: attention into a torch::nn::Sequential CNN at its shallow stage, its deep stage,
// every stage or after given blocks; the C++ counterpart of cnn_attention.insert.

#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <functional>
#include <string>
#include <vector>

#include "../macros.h"

namespace cnn_attention {
namespace nn {

// A block followed by the attention modules inserted after it: (block, attention, ...).
// Inserting again after the same block appends to it. Its children are named "0", "1", ...
// as in the Python AttentionAfter, so state dicts carry over.
class CNN_ATTENTION_API AttentionAfterImpl : public torch::nn::SequentialImpl {
 public:
  using SequentialImpl::SequentialImpl;
  // A non-template forward, so that it can sit in a Sequential (AnyModule) itself.
  torch::Tensor forward(const torch::Tensor& x) {
    return SequentialImpl::forward<torch::Tensor>(x);
  }
};

TORCH_MODULE(AttentionAfter);

// A maximal run of consecutive blocks whose outputs are feature maps (N, C, *S) of one
// spatial size with more than one position: the blocks' indices, the last block's output
// channels, the spatial size.
struct CNN_ATTENTION_API Stage {
  std::vector<int64_t> blocks;
  int64_t channels;
  std::vector<int64_t> spatial;
};

// (channels, spatial dims) -> a new attention module.
using AttentionFactory =
    std::function<torch::nn::AnyModule(int64_t channels, int64_t spatial_dims)>;

// "channel", "soft", "hard" (top-k keeping half the positions), "self" (starting as the
// identity) or "cbam", as in Python.
CNN_ATTENTION_API AttentionFactory attention_family(const std::string& family);

// The stages of `model`, from one forward of `example_input` (eval mode, no gradients; the
// mode is restored).
CNN_ATTENTION_API std::vector<Stage> find_stages(torch::nn::Sequential model,
                                                 const torch::Tensor& example_input);

// A new Sequential whose block i, for each target, is AttentionAfter(block, attention) (the
// model passed in is not changed; the blocks are shared). `where` is "shallow" (after the
// last block of the highest-resolution stage), "deep" (of the lowest) or "all" (every
// stage). The new modules take the device and dtype of the block's output. Throws a
// c10::Error naming the problem (an unknown family or `where`, no feature map).
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const AttentionFactory& attention,
                                               const std::string& where,
                                               const torch::Tensor& example_input);
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const std::string& family, const std::string& where,
                                               const torch::Tensor& example_input);
// After the blocks with the given indices, each with its output channels.
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const AttentionFactory& attention,
                                               const std::vector<int64_t>& blocks,
                                               const torch::Tensor& example_input);

}  // namespace nn
}  // namespace cnn_attention
