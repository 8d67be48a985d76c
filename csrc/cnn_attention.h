#pragma once

// Umbrella header for C++ users: the operators (cnn_attention::ops) and the modules
// (cnn_attention::nn). Link CNNAttention::cnn_attention (see README).

#include "build_info.h"
#include "macros.h"
#include "modules/cbam.h"
#include "modules/channel_attention.h"
#include "modules/insert.h"
#include "modules/self_attention.h"
#include "modules/spatial_attention.h"
#include "ops/channel_attention.h"
#include "ops/channel_pool.h"
#include "ops/self_attention.h"
#include "ops/spatial_attention.h"

namespace cnn_attention {

// Every program that includes this header refers to a symbol of the library, so the
// linker keeps the library, and with it the operator registrations that TorchScript
// models need, even under --as-needed. Weak: one definition however many files include it.
extern "C" {
__attribute__((weak)) std::string (*cnn_attention_keep_linked)() = &build_info;
}

}  // namespace cnn_attention
