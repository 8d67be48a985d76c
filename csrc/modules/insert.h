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

// A Sequential with a Tensor -> Tensor forward, so that it can sit in another Sequential (an
// AnyModule needs a forward that is not a template). insert rebuilds the nested Sequentials on
// the way to a changed block as these, with the same child names.
class CNN_ATTENTION_API TensorSequentialImpl : public torch::nn::SequentialImpl {
 public:
  using SequentialImpl::SequentialImpl;
  torch::Tensor forward(const torch::Tensor& x) {
    return SequentialImpl::forward<torch::Tensor>(x);
  }
};

TORCH_MODULE(TensorSequential);

// The attention modules inserted after one module, applied in order to its output; inserting
// again at the same place appends to it. As in Python, it is appended to a Sequential it
// follows (child "<n>"), or held as "inserted_attention" by a BlockThenAttention.
class CNN_ATTENTION_API AttentionAfterImpl : public TensorSequentialImpl {
 public:
  using TensorSequentialImpl::TensorSequentialImpl;
};

TORCH_MODULE(AttentionAfter);

// A module that is no Sequential, followed by attention. The module's own parameters, buffers
// and children are registered here under their own names and the attention as
// "inserted_attention", so the state dict keys are those of the module plus the attention's,
// as in Python (where a forward hook applies the attention the module holds).
class CNN_ATTENTION_API BlockThenAttentionImpl : public torch::nn::Module {
 public:
  BlockThenAttentionImpl(torch::nn::AnyModule block, AttentionAfter attention);
  torch::Tensor forward(const torch::Tensor& x);
  // The block is not a registered child (its parameters are), so its mode is set here.
  void train(bool on = true) override;
  const torch::nn::AnyModule& block() const { return block_; }
  AttentionAfter attention() const { return attention_; }

 private:
  torch::nn::AnyModule block_;
  AttentionAfter attention_;
};

TORCH_MODULE(BlockThenAttention);

// One resolution of the model's feature pyramid: the qualified names of its blocks in order
// ("3", or "1.2" inside nested Sequentials), the last block's output channels, the spatial size.
struct CNN_ATTENTION_API Stage {
  std::vector<std::string> blocks;
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
// mode is restored), by the rules of Python's find_stages: nested Sequentials holding modules
// with children or two or more convolutions/linear layers are descended; a block is a module
// with two or more of them, or a module with children and one (no Sequential); layers beside
// blocks at a resolution belong to no stage; a resolution only layers reach is a stage whose
// blocks end at each activation; a resolution not lower than the one before is no stage.
CNN_ATTENTION_API std::vector<Stage> find_stages(torch::nn::Sequential model,
                                                 const torch::Tensor& example_input);

// A new Sequential with attention after the last block of the chosen stages (the model passed
// in is not changed; the blocks are shared, the nested Sequentials on the way to a changed
// block are rebuilt as TensorSequential with the same names). `where` is "shallow" (after the
// last block of the highest-resolution stage), "deep" (of the lowest) or "all" (every stage).
// A Sequential block gets an AttentionAfter appended, any other block becomes
// BlockThenAttention(block, attention); the state dict keys of the model stay. The new modules
// take the device and dtype of the block's output. Throws a c10::Error naming the problem (an
// unknown family or `where`, no feature map).
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const AttentionFactory& attention,
                                               const std::string& where,
                                               const torch::Tensor& example_input);
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const std::string& family, const std::string& where,
                                               const torch::Tensor& example_input);
// After the top-level blocks with the given indices, each with its output channels.
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const AttentionFactory& attention,
                                               const std::vector<int64_t>& blocks,
                                               const torch::Tensor& example_input);
// After the modules with the given qualified names ("2", "1.0" inside a nested Sequential).
CNN_ATTENTION_API torch::nn::Sequential insert(torch::nn::Sequential model,
                                               const AttentionFactory& attention,
                                               const std::vector<std::string>& names,
                                               const torch::Tensor& example_input);

}  // namespace nn
}  // namespace cnn_attention
