#include "insert.h"

#include <torch/nn/module.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>

#include "cbam.h"
#include "channel_attention.h"
#include "self_attention.h"
#include "spatial_attention.h"

namespace cnn_attention {
namespace nn {

namespace {

int64_t positions_of(const std::vector<int64_t>& spatial) {
  int64_t count = 1;
  for (int64_t size : spatial) count *= size;
  return count;
}

// Channels and spatial size of an (N, C, *S) output with 1 to 3 spatial dims and more
// than one position.
std::optional<std::pair<int64_t, std::vector<int64_t>>> feature_map(const torch::Tensor& t) {
  if (t.dim() < 3 || t.dim() > 5) return std::nullopt;
  std::vector<int64_t> spatial(t.sizes().begin() + 2, t.sizes().end());
  if (positions_of(spatial) <= 1) return std::nullopt;
  return std::make_pair(t.size(1), spatial);
}

// The output of every block in one forward (eval mode, no gradients; the mode is restored).
std::vector<torch::Tensor> block_outputs(torch::nn::Sequential model,
                                         const torch::Tensor& example_input) {
  const bool was_training = model->is_training();
  model->eval();
  std::vector<torch::Tensor> outputs;
  try {
    torch::NoGradGuard no_grad;
    torch::Tensor x = example_input;
    for (auto& block : *model) {
      x = block.forward<torch::Tensor>(x);
      outputs.push_back(x);
    }
  } catch (const c10::Error& error) {
    model->train(was_training);
    TORCH_CHECK(false,
                "insert: the model failed on example_input: ", error.what_without_backtrace());
  }
  model->train(was_training);
  return outputs;
}

std::vector<Stage> stages_from(const std::vector<torch::Tensor>& outputs) {
  std::vector<Stage> stages;
  std::optional<Stage> run;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto found = feature_map(outputs[i]);
    if (found && run && found->second == run->spatial) {
      run->blocks.push_back(static_cast<int64_t>(i));
      run->channels = found->first;
      continue;
    }
    if (run) stages.push_back(*run);
    run.reset();
    if (found) run = Stage{{static_cast<int64_t>(i)}, found->first, found->second};
  }
  if (run) stages.push_back(*run);
  return stages;
}

torch::nn::Sequential insert_after(torch::nn::Sequential model, const AttentionFactory& attention,
                                   const std::vector<int64_t>& blocks,
                                   const std::vector<torch::Tensor>& outputs) {
  // Build every module first, so that a failing factory changes nothing.
  std::map<int64_t, torch::nn::AnyModule> built;
  for (int64_t index : blocks) {
    const auto found = feature_map(outputs[index]);
    TORCH_CHECK(found, "insert: block ", index,
                " does not produce a feature map (N, C, *S) with more than one position");
    torch::nn::AnyModule module =
        attention(found->first, static_cast<int64_t>(found->second.size()));
    const auto& like = outputs[index];
    module.ptr()->to(like.device(), like.scalar_type());
    built.emplace(index, std::move(module));
  }
  torch::nn::Sequential result;
  int64_t index = 0;
  for (const auto& block : *model) {
    auto it = built.find(index++);
    if (it == built.end()) {
      result->push_back(block);
      continue;
    }
    if (auto existing = std::dynamic_pointer_cast<AttentionAfterImpl>(block.ptr())) {
      existing->push_back(it->second);
      result->push_back(block);
    } else {
      AttentionAfter wrapped;
      wrapped->push_back(block);
      wrapped->push_back(it->second);
      result->push_back(wrapped);
    }
  }
  return result;
}

}  // namespace

AttentionFactory attention_family(const std::string& family) {
  if (family == "channel") {
    return [](int64_t c, int64_t) { return torch::nn::AnyModule(ChannelAttention(c)); };
  }
  if (family == "soft") {
    return [](int64_t, int64_t d) {
      return torch::nn::AnyModule(SoftAttention(SoftAttentionOptions().spatial_dims(d)));
    };
  }
  if (family == "hard") {
    return [](int64_t, int64_t d) {
      return torch::nn::AnyModule(
          HardAttention(HardAttentionOptions().mode("topk").keep_ratio(0.5).spatial_dims(d)));
    };
  }
  if (family == "self") {
    return [](int64_t c, int64_t) { return torch::nn::AnyModule(SelfAttention(c)); };
  }
  if (family == "cbam") {
    return [](int64_t c, int64_t d) {
      return torch::nn::AnyModule(CBAM(CBAMOptions(c).spatial_dims(d)));
    };
  }
  TORCH_CHECK(false,
              "insert: attention must be one of \"channel\", \"soft\", \"hard\", \"self\", "
              "\"cbam\", got \"",
              family, "\"");
}

std::vector<Stage> find_stages(torch::nn::Sequential model, const torch::Tensor& example_input) {
  return stages_from(block_outputs(model, example_input));
}

torch::nn::Sequential insert(torch::nn::Sequential model, const AttentionFactory& attention,
                             const std::string& where, const torch::Tensor& example_input) {
  TORCH_CHECK(where == "shallow" || where == "deep" || where == "all",
              "insert: where must be one of \"shallow\", \"deep\", \"all\", got \"", where, "\"");
  const auto outputs = block_outputs(model, example_input);
  const auto stages = stages_from(outputs);
  TORCH_CHECK(!stages.empty(),
              "insert: the model produces no feature map with more than one position");
  std::vector<int64_t> blocks;
  if (where == "all") {
    for (const auto& stage : stages) blocks.push_back(stage.blocks.back());
  } else if (where == "shallow") {
    // The highest resolution; the first such stage on a tie.
    const auto best =
        std::max_element(stages.begin(), stages.end(), [](const auto& a, const auto& b) {
          return positions_of(a.spatial) < positions_of(b.spatial);
        });
    blocks.push_back(best->blocks.back());
  } else {
    // The lowest resolution; the last such stage on a tie.
    const Stage* best = &stages.front();
    for (const auto& stage : stages) {
      if (positions_of(stage.spatial) <= positions_of(best->spatial)) best = &stage;
    }
    blocks.push_back(best->blocks.back());
  }
  return insert_after(model, attention, blocks, outputs);
}

torch::nn::Sequential insert(torch::nn::Sequential model, const std::string& family,
                             const std::string& where, const torch::Tensor& example_input) {
  return insert(model, attention_family(family), where, example_input);
}

torch::nn::Sequential insert(torch::nn::Sequential model, const AttentionFactory& attention,
                             const std::vector<int64_t>& blocks,
                             const torch::Tensor& example_input) {
  const int64_t size = static_cast<int64_t>(model->size());
  for (int64_t index : blocks) {
    TORCH_CHECK(index >= 0 && index < size, "insert: the model has no block ", index, " (it has ",
                size, ")");
  }
  return insert_after(model, attention, blocks, block_outputs(model, example_input));
}

}  // namespace nn
}  // namespace cnn_attention
