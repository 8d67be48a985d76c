#include "vector_isa.h"

#include <ATen/Version.h>

namespace cnn_attention {
namespace ops {
namespace cpu {

VectorIsa vector_isa() {
#if defined(CNN_ATTENTION_AVX512_KERNELS)
  // ATen's choice, made once per process: the same CPU features our AVX-512 objects are
  // compiled for (-mavx512f -mavx512bw -mavx512vl -mavx512dq), and ATEN_CPU_CAPABILITY=avx2
  // lowers ours with ATen's.
  static const VectorIsa isa =
      at::get_cpu_capability() == "AVX512" ? VectorIsa::kAvx512 : VectorIsa::kAvx2;
  return isa;
#else
  return VectorIsa::kAvx2;
#endif
}

const char* vector_isa_name() {
#if defined(CNN_ATTENTION_AVX512_KERNELS)
  return vector_isa() == VectorIsa::kAvx512 ? "AVX512" : "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
