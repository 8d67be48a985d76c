#pragma once

// Matrix products whose every element is summed in a fixed order, the same for any thread
// count and any CPU model. BLAS libraries promise neither: on AMD processors MKL's sgemm
// splits a product among threads in two dimensions and computes the edge tiles (widths that
// are not a multiple of 16 floats) with a kernel that rounds the multiply and the add
// separately, while its one-thread path uses FMA; a call inside a parallel region is one
// thread or several depending on how many tasks the region has. Every product that a
// reproducible result depends on (the channel MLP, self attention's projections and its
// block products) is computed here instead: element (i, j) is
// fma(a(i, K-1), b(K-1, j), ... fma(a(i, 0), b(0, j), 0)), in registers, whatever rows or
// columns a thread is given.

#include <ATen/ATen.h>

#include <cstdint>

#include "vector_isa.h"

namespace cnn_attention {
namespace ops {
namespace cpu {

// One thread's product: c (m x n) = alpha * sum over l of a(i, l) * b(l, :), stored into c or
// added to it, with a(i, l) = a[i * a_row + l * a_col] (any strides: a row-major block, or with
// a_row = 1 a transposed one) and b, c row-major with contiguous rows. Runs the build of
// per_isa/product_kernel.cpp for this CPU's vector instructions; every build gives the same bits.
template <typename T>
inline void block_product(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row,
                          int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,
                          int64_t ldc) {
  CNN_ATTENTION_PER_ISA(block_product_kernel<T>)
  (m, n, k, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

// out (M, N) = a (M, K) @ b (K, N), or out += a @ b with `accumulate`, for 2-D CPU tensors of
// one floating dtype with any strides. Sums run in the accumulation dtype (float32 for half
// types, whose inputs are widened first) and are rounded once into `out`. Blocks of rows and
// columns are shared among threads (fewer, larger blocks with fewer threads: the result is the
// same); a call inside a parallel region runs on its thread.
void fixed_order_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool accumulate);

// out (cols x rows, leading dim ld_out) = the transpose of `rows` rows of `cols` values (leading
// dim ld), on the calling thread, in 8 x 8 tiles (transposed in registers for float): the
// transposing copies of copy_matrix, and the key and value blocks self attention's kernels
// read by columns. float, double, Half and BFloat16.
template <typename T>
void transpose_rows(const T* in, int64_t ld, int64_t rows, int64_t cols, T* out, int64_t ld_out);

// dst.copy_(src) for 2-D CPU tensors of one shape; where one is stored by rows and the other by
// columns (and they share a floating dtype), by a transposing copy of ours in 8 x 8 tiles, shared
// among threads where it is large: ATen's transposing copy takes about 1 ns per value (35 us for
// 2048 x 16 floats, ours 3 us), on one thread.
void copy_matrix(const at::Tensor& dst, const at::Tensor& src);

}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
