#pragma once

// CPU kernels built once per x86-64 vector instruction set. The library is compiled for AVX2;
// the sources under cpu/per_isa/ are compiled twice, for AVX2 and AVX-512 (CMake's
// cnn_attention_avx2 and cnn_attention_avx512 archives), each build in the namespace its
// CPU_CAPABILITY macro names (cpu::AVX2, cpu::AVX512, as ATen's vector types are), and
// vector_isa() picks one at run time.
//
// Only kernels that reduce nothing across vector lanes are built per instruction set: every
// element then gets the same operations in the same order at either width, so the AVX-512
// build returns the AVX2 build's bits and results do not depend on the CPU
// (tests/python/test_vector_isa.py compares the two bit for bit and checks that no code
// outside the AVX512 namespaces uses AVX-512 instructions).

#include <ATen/core/Tensor.h>

#include "../spatial_attention_impl.h"

namespace cnn_attention {
namespace ops {
namespace cpu {

// This build's own namespace is inline, as in vec.h (ATen's vector types do the same), and
// must be declared so before the declarations below reopen it.
inline namespace CPU_CAPABILITY {}

enum class VectorIsa { kAvx2, kAvx512 };

// AVX-512 where this library has an AVX-512 build and ATen runs its own AVX-512 kernels (the
// CPU has avx512f/bw/vl/dq and ATEN_CPU_CAPABILITY does not lower it); AVX2 otherwise.
VectorIsa vector_isa();

// "AVX2" or "AVX512" ("DEFAULT" off x86-64), for build_info and the tests.
const char* vector_isa_name();

// The kernels of cpu/per_isa/, declared once for each build.
#define CNN_ATTENTION_PER_ISA_KERNELS                                                            \
  /* y = x * w with w = sigmoid(s / T), or (threshold) its 0/1 step, also stored in `mask`. */   \
  void scale_by_scores(const at::Tensor& x, const at::Tensor& scores,                            \
                       const ElementwiseWeights& how, at::Tensor& y, at::Tensor& mask);          \
  void scale_by_scores_backward(const at::Tensor& grad, const at::Tensor& x,                     \
                                const at::Tensor& scores, const at::Tensor& mask,                \
                                const ElementwiseWeights& how, at::Tensor& grad_x,               \
                                at::Tensor& grad_scores);                                        \
  /* On the calling thread: out[i] = exp(s[i] / T - best) for i < count (exp_u20, as       */    \
  /* ../vec.h's exp_u20_nonfinite; s / T only with `divide`), the exponentials of a row of a */  \
  /* softmax over positions; the non-null rows of prefetch[0..2] are prefetched meanwhile.  */   \
  void shifted_exps(const float* s, int64_t count, float temperature, bool divide, float best,   \
                    const float* const* prefetch, float* out);                                   \
  /* One thread's fixed-order matrix product (../gemm.h), for float and double. */               \
  template <typename T>                                                                          \
  void block_product_kernel(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row, \
                            int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,       \
                            int64_t ldc);

#if defined(CNN_ATTENTION_AVX512_KERNELS)
namespace AVX2 {
CNN_ATTENTION_PER_ISA_KERNELS
}
namespace AVX512 {
CNN_ATTENTION_PER_ISA_KERNELS
}
// The build of per-ISA kernel `fn` that vector_isa() chose.
#define CNN_ATTENTION_PER_ISA(fn)                                                           \
  (::cnn_attention::ops::cpu::vector_isa() == ::cnn_attention::ops::cpu::VectorIsa::kAvx512 \
       ? &::cnn_attention::ops::cpu::AVX512::fn                                             \
       : &::cnn_attention::ops::cpu::AVX2::fn)
#else
// One build (a CPU other than x86-64), compiled with CPU_CAPABILITY=DEFAULT.
namespace DEFAULT {
CNN_ATTENTION_PER_ISA_KERNELS
}
#define CNN_ATTENTION_PER_ISA(fn) (&::cnn_attention::ops::cpu::DEFAULT::fn)
#endif

}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
