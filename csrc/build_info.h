#pragma once

#include <string>

#include "macros.h"

namespace cnn_attention {

// "version=...;torch=...;cuda=...;cuda_archs=..." as the library was compiled
// (empty cuda fields for a CPU-only build). Also the operator cnn_attention::_build_info.
CNN_ATTENTION_API std::string build_info();

}  // namespace cnn_attention
