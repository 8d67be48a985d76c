#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "build_info.h"
#include "ops/cpu/vector_isa.h"

#ifndef CNN_ATTENTION_VERSION
#define CNN_ATTENTION_VERSION "unknown"
#endif
#ifndef CNN_ATTENTION_CUDA_VERSION
#define CNN_ATTENTION_CUDA_VERSION ""
#endif
#ifndef CNN_ATTENTION_CUDA_ARCHS
#define CNN_ATTENTION_CUDA_ARCHS ""
#endif

namespace cnn_attention {

std::string build_info() {
  std::string info = "version=" CNN_ATTENTION_VERSION ";torch=" TORCH_VERSION;
#ifdef CNN_ATTENTION_WITH_CUDA
  info += ";cuda=" CNN_ATTENTION_CUDA_VERSION ";cuda_archs=" CNN_ATTENTION_CUDA_ARCHS;
#else
  info += ";cuda=;cuda_archs=";
#endif
#if defined(CNN_ATTENTION_AVX512_KERNELS)
  info += ";cpu_isas=AVX2,AVX512";
#else
  info += ";cpu_isas=DEFAULT";
#endif
  info += std::string(";cpu_isa=") + ops::cpu::vector_isa_name();
  return info;
}

// The one TORCH_LIBRARY block of the namespace; every operator adds its schema with
// TORCH_LIBRARY_FRAGMENT in its own file.
TORCH_LIBRARY(cnn_attention, m) {
  m.def("_build_info() -> str", &build_info);
}

}  // namespace cnn_attention
