#pragma once

#include <string>

#include "macros.h"

namespace cnn_attention {

// "version=...;torch=...;cuda=...;cuda_archs=...;cpu_isas=...;cpu_isa=..." as the library was
// compiled (empty cuda fields for a CPU-only build; cpu_isas: the vector instruction sets its
// per-ISA CPU kernels are built for), and cpu_isa, the one this process runs (chosen once, from
// the CPU and ATEN_CPU_CAPABILITY). Also the operator cnn_attention::_build_info.
CNN_ATTENTION_API std::string build_info();

}  // namespace cnn_attention
