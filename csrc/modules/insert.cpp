#include "insert.h"

#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

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

using ModulePtr = std::shared_ptr<torch::nn::Module>;

int64_t positions_of(const std::vector<int64_t>& spatial) {
  int64_t count = 1;
  for (int64_t size : spatial) count *= size;
  return count;
}

// Channels and spatial size of an (N, C, *S) output with 1 to 3 spatial dims and more
// than one position.
std::optional<std::pair<int64_t, std::vector<int64_t>>> feature_map(const torch::Tensor& t) {
  if (!t.defined() || t.dim() < 3 || t.dim() > 5) return std::nullopt;
  std::vector<int64_t> spatial(t.sizes().begin() + 2, t.sizes().end());
  if (positions_of(spatial) <= 1) return std::nullopt;
  return std::make_pair(t.size(1), spatial);
}

bool is_inserted(const ModulePtr& module) {
  return std::dynamic_pointer_cast<AttentionAfterImpl>(module) != nullptr;
}

// A Sequential of the model's own (not an AttentionAfter); null for anything else.
std::shared_ptr<torch::nn::SequentialImpl> as_sequential(const ModulePtr& module) {
  if (is_inserted(module)) return nullptr;
  return std::dynamic_pointer_cast<torch::nn::SequentialImpl>(module);
}

// The model's own module behind a unit: the block inside a BlockThenAttention.
ModulePtr own_module(const ModulePtr& module) {
  if (auto wrapped = std::dynamic_pointer_cast<BlockThenAttentionImpl>(module)) {
    return wrapped->block().ptr();
  }
  return module;
}

std::vector<ModulePtr> own_children(const ModulePtr& module) {
  std::vector<ModulePtr> children;
  for (const auto& child : own_module(module)->children()) {
    if (!is_inserted(child)) children.push_back(child);
  }
  return children;
}

template <typename Visit>
bool any_own(const ModulePtr& module, const Visit& visit) {
  if (visit(own_module(module))) return true;
  for (const auto& child : own_children(module)) {
    if (any_own(child, visit)) return true;
  }
  return false;
}

int64_t weighted_layers(const ModulePtr& module) {
  const auto own = own_module(module);
  int64_t count = (own->as<torch::nn::Conv1d>() || own->as<torch::nn::Conv2d>() ||
                   own->as<torch::nn::Conv3d>() || own->as<torch::nn::Linear>())
                      ? 1
                      : 0;
  for (const auto& child : own_children(module)) count += weighted_layers(child);
  return count;
}

bool is_activation(const ModulePtr& m) {
  return m->as<torch::nn::ReLU>() || m->as<torch::nn::ReLU6>() || m->as<torch::nn::LeakyReLU>() ||
         m->as<torch::nn::PReLU>() || m->as<torch::nn::ELU>() || m->as<torch::nn::SELU>() ||
         m->as<torch::nn::CELU>() || m->as<torch::nn::GELU>() || m->as<torch::nn::SiLU>() ||
         m->as<torch::nn::Mish>() || m->as<torch::nn::Hardtanh>() || m->as<torch::nn::Tanh>() ||
         m->as<torch::nn::Sigmoid>();
}

// Whether to descend into a nested Sequential: it holds modules with children, or two or more
// weighted layers (not a convolution with its norm and activation).
bool opens(const std::shared_ptr<torch::nn::SequentialImpl>& sequential) {
  for (const auto& child : own_children(sequential)) {
    if (!own_children(child).empty()) return true;
  }
  return weighted_layers(sequential) >= 2;
}

// A building block: two or more weighted layers, or one inside a module with children of its
// own (no Sequential); anything else is a layer.
bool is_block(const ModulePtr& module) {
  const int64_t weighted = weighted_layers(module);
  return weighted >= 2 ||
         (weighted == 1 && !own_children(module).empty() && !as_sequential(own_module(module)));
}

// A module the forward ran, with its output. The model's stages are made of the units that were
// not descended; a descended nested Sequential can still be named as a place to insert after.
struct Unit {
  std::string name;
  ModulePtr module;
  torch::Tensor output;
  bool descended;
};

// Runs `sequential` on x, descending the nested Sequentials that `opens` accepts, and records
// every child with its output.
torch::Tensor run(torch::nn::SequentialImpl& sequential, const std::string& prefix, torch::Tensor x,
                  std::vector<Unit>& units) {
  const auto named = sequential.named_children();
  size_t index = 0;
  for (auto& child : sequential) {
    const std::string name = prefix + named[index++].key();
    const auto nested = as_sequential(child.ptr());
    const bool descended = nested && opens(nested);
    x = descended ? run(*nested, name + ".", x, units) : child.forward<torch::Tensor>(x);
    if (!is_inserted(child.ptr())) units.push_back(Unit{name, child.ptr(), x, descended});
  }
  return x;
}

// The units of one forward (eval mode, no gradients; the mode is restored).
std::vector<Unit> units_of(torch::nn::Sequential model, const torch::Tensor& example_input) {
  const bool was_training = model->is_training();
  model->eval();
  std::vector<Unit> units;
  try {
    torch::NoGradGuard no_grad;
    run(*model, "", example_input, units);
  } catch (const c10::Error& error) {
    model->train(was_training);
    TORCH_CHECK(false,
                "insert: the model failed on example_input: ", error.what_without_backtrace());
  }
  model->train(was_training);
  return units;
}

// The blocks of a resolution only layers reach: each activation ends one, and so does the last
// layer with parameters after the last activation; poolings alone are one block, the first.
std::vector<std::string> layer_block_ends(const std::vector<const Unit*>& layers) {
  std::vector<std::string> ends;
  size_t after_last_activation = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (any_own(layers[i]->module, is_activation)) {
      ends.push_back(layers[i]->name);
      after_last_activation = i + 1;
    }
  }
  const auto has_parameters = [](const ModulePtr& m) { return !m->parameters(false).empty(); };
  for (size_t i = layers.size(); i > after_last_activation; --i) {
    if (any_own(layers[i - 1]->module, has_parameters)) {
      ends.push_back(layers[i - 1]->name);
      break;
    }
  }
  if (ends.empty()) ends.push_back(layers.front()->name);
  return ends;
}

std::vector<Stage> stages_from(const std::vector<Unit>& units) {
  std::vector<std::pair<std::vector<int64_t>, std::vector<const Unit*>>> groups;
  for (const auto& unit : units) {
    const auto found = feature_map(unit.output);
    if (!found || unit.descended) continue;
    if (!groups.empty() && groups.back().first == found->second) {
      groups.back().second.push_back(&unit);
    } else if (groups.empty() || positions_of(found->second) < positions_of(groups.back().first)) {
      groups.push_back({found->second, {&unit}});
    }  // A resolution not lower than the last one (an upsampling head) is no stage.
  }
  std::vector<Stage> stages;
  for (const auto& [spatial, members] : groups) {
    Stage stage{{}, 0, spatial};
    for (const Unit* unit : members) {
      if (is_block(unit->module)) stage.blocks.push_back(unit->name);
    }
    if (stage.blocks.empty()) stage.blocks = layer_block_ends(members);
    for (const Unit* unit : members) {
      if (unit->name == stage.blocks.back()) stage.channels = unit->output.size(1);
    }
    stages.push_back(std::move(stage));
  }
  return stages;
}

// `block` followed by `modules`, keeping the block's state dict keys: a Sequential gets them
// appended (to its trailing AttentionAfter if it has one), a BlockThenAttention gets them added
// to its attention, anything else is wrapped in a BlockThenAttention.
torch::nn::AnyModule followed_by(const torch::nn::AnyModule& block,
                                 const std::vector<torch::nn::AnyModule>& modules) {
  // The modules of `existing` (when there is one), then the new ones.
  const auto extended = [&](const std::shared_ptr<AttentionAfterImpl>& existing) {
    AttentionAfter attention;
    if (existing) {
      for (const auto& module : *existing) attention->push_back(module);
    }
    for (const auto& module : modules) attention->push_back(module);
    return attention;
  };
  if (auto wrapped = std::dynamic_pointer_cast<BlockThenAttentionImpl>(block.ptr())) {
    return torch::nn::AnyModule(
        BlockThenAttention(wrapped->block(), extended(wrapped->attention().ptr())));
  }
  if (auto sequential = as_sequential(block.ptr())) {
    TensorSequential result;
    const auto named = sequential->named_children();
    size_t index = 0;
    bool extended_trailing = false;
    for (const auto& child : *sequential) {
      const auto& name = named[index++].key();
      const auto trailing = index == named.size()
                                ? std::dynamic_pointer_cast<AttentionAfterImpl>(child.ptr())
                                : nullptr;
      if (trailing) {
        result->push_back(name, torch::nn::AnyModule(extended(trailing)));
        extended_trailing = true;
      } else {
        result->push_back(name, child);
      }
    }
    if (!extended_trailing) result->push_back(std::to_string(named.size()), extended(nullptr));
    return torch::nn::AnyModule(result);
  }
  return torch::nn::AnyModule(BlockThenAttention(block, extended(nullptr)));
}

// A copy of `sequential` (same child names) in which the modules named in `targets` are
// followed by their attention; nested Sequentials on the way to a target are rebuilt.
template <typename SequentialType>
SequentialType rebuilt(torch::nn::SequentialImpl& sequential, const std::string& prefix,
                       const std::map<std::string, std::vector<torch::nn::AnyModule>>& targets) {
  SequentialType result;
  const auto named = sequential.named_children();
  size_t index = 0;
  for (const auto& child : sequential) {
    const auto& name = named[index++].key();
    const std::string qualified = prefix + name;
    torch::nn::AnyModule module = child;
    const auto nested = as_sequential(child.ptr());
    const auto inside = targets.lower_bound(qualified + ".");
    if (nested && inside != targets.end() && inside->first.rfind(qualified + ".", 0) == 0) {
      module = torch::nn::AnyModule(rebuilt<TensorSequential>(*nested, qualified + ".", targets));
    }
    const auto target = targets.find(qualified);
    if (target != targets.end()) module = followed_by(module, target->second);
    result->push_back(name, module);
  }
  return result;
}

torch::nn::Sequential insert_after(torch::nn::Sequential model, const AttentionFactory& attention,
                                   const std::vector<std::string>& names,
                                   const std::vector<Unit>& units) {
  // Build every module first, so that a failing factory changes nothing.
  std::map<std::string, std::vector<torch::nn::AnyModule>> built;
  for (const auto& name : names) {
    const auto unit =
        std::find_if(units.begin(), units.end(), [&](const Unit& u) { return u.name == name; });
    TORCH_CHECK(unit != units.end(), "insert: the model has no block \"", name,
                "\" (a module of the model or of its nested Sequentials)");
    const auto found = feature_map(unit->output);
    TORCH_CHECK(found, "insert: block \"", name,
                "\" does not produce a feature map (N, C, *S) with more than one position");
    torch::nn::AnyModule module =
        attention(found->first, static_cast<int64_t>(found->second.size()));
    module.ptr()->to(unit->output.device(), unit->output.scalar_type());
    built[name].push_back(std::move(module));
  }
  return rebuilt<torch::nn::Sequential>(*model, "", built);
}

}  // namespace

BlockThenAttentionImpl::BlockThenAttentionImpl(torch::nn::AnyModule block, AttentionAfter attention)
    : block_(std::move(block)), attention_(std::move(attention)) {
  const auto& own = *block_.ptr();
  for (const auto& parameter : own.named_parameters(/*recurse=*/false)) {
    register_parameter(parameter.key(), parameter.value(), parameter.value().requires_grad());
  }
  for (const auto& buffer : own.named_buffers(/*recurse=*/false)) {
    register_buffer(buffer.key(), buffer.value());
  }
  for (const auto& child : own.named_children()) register_module(child.key(), child.value());
  register_module("inserted_attention", attention_);
}

torch::Tensor BlockThenAttentionImpl::forward(const torch::Tensor& x) {
  return attention_->forward(block_.forward<torch::Tensor>(x));
}

void BlockThenAttentionImpl::train(bool on) {
  torch::nn::Module::train(on);
  block_.ptr()->train(on);
}

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
  return stages_from(units_of(model, example_input));
}

torch::nn::Sequential insert(torch::nn::Sequential model, const AttentionFactory& attention,
                             const std::string& where, const torch::Tensor& example_input) {
  TORCH_CHECK(where == "shallow" || where == "deep" || where == "all",
              "insert: where must be one of \"shallow\", \"deep\", \"all\", got \"", where, "\"");
  const auto units = units_of(model, example_input);
  const auto stages = stages_from(units);
  TORCH_CHECK(!stages.empty(),
              "insert: the model produces no feature map with more than one position");
  // Stages run from high to low resolution.
  std::vector<std::string> blocks;
  if (where == "all") {
    for (const auto& stage : stages) blocks.push_back(stage.blocks.back());
  } else {
    blocks.push_back((where == "shallow" ? stages.front() : stages.back()).blocks.back());
  }
  return insert_after(model, attention, blocks, units);
}

torch::nn::Sequential insert(torch::nn::Sequential model, const std::string& family,
                             const std::string& where, const torch::Tensor& example_input) {
  return insert(model, attention_family(family), where, example_input);
}

torch::nn::Sequential insert(torch::nn::Sequential model, const AttentionFactory& attention,
                             const std::vector<int64_t>& blocks,
                             const torch::Tensor& example_input) {
  const int64_t size = static_cast<int64_t>(model->size());
  std::vector<std::string> names;
  const auto children = model->named_children();
  for (int64_t index : blocks) {
    TORCH_CHECK(index >= 0 && index < size, "insert: the model has no block ", index, " (it has ",
                size, ")");
    names.push_back(children[index].key());
  }
  return insert(model, attention, names, example_input);
}

torch::nn::Sequential insert(torch::nn::Sequential model, const AttentionFactory& attention,
                             const std::vector<std::string>& names,
                             const torch::Tensor& example_input) {
  return insert_after(model, attention, names, units_of(model, example_input));
}

}  // namespace nn
}  // namespace cnn_attention
