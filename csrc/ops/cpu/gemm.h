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
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace cnn_attention {
namespace ops {
namespace cpu {

// c (m x n) = alpha * sum over l of a(i, l) * b(l, :), stored into c or added to it, with
// a(i, l) = a[i * a_row + l * a_col] (any strides: a row-major block, or with a_row = 1 a
// transposed one) and b, c row-major with contiguous rows. Tiles of kRows rows by kVecs
// vectors of columns keep their sums in registers; b's vectors are loaded once per l for all
// kRows rows.
template <typename T, int kRows, int kVecs>
inline void product_tile(int64_t k, T alpha, const T* a, int64_t a_row, int64_t a_col, const T* b,
                         int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  Vec sums[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) sums[r][v] = Vec(T(0));
  }
  const T* a_rows[kRows];
  for (int r = 0; r < kRows; ++r) a_rows[r] = a + r * a_row;
  for (int64_t l = 0; l < k; ++l, b += ldb) {
    Vec columns[kVecs];
    for (int v = 0; v < kVecs; ++v) columns[v] = Vec::loadu(b + v * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec weight(*a_rows[r]);
      a_rows[r] += a_col;
      for (int v = 0; v < kVecs; ++v) sums[r][v] = at::vec::fmadd(weight, columns[v], sums[r][v]);
    }
  }
  const Vec alpha_vec(alpha);
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      T* out = c + r * ldc + v * Vec::size();
      const Vec result = sums[r][v] * alpha_vec;
      (accumulate ? result + Vec::loadu(out) : result).store(out);
    }
  }
}

// The last columns, fewer than a vector: the same fused multiply-adds in the same order as a
// vector lane, so a column's values do not depend on where the vectors end.
template <typename T, int kRows>
inline void product_tail(int64_t k, int64_t cols, T alpha, const T* a, int64_t a_row, int64_t a_col,
                         const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      T sum = 0;
      for (int64_t l = 0; l < k; ++l) sum = std::fma(a[r * a_row + l * a_col], b[l * ldb + j], sum);
      const T result = alpha * sum;
      c[r * ldc + j] = accumulate ? result + c[r * ldc + j] : result;
    }
  }
}

// One thread's product (see product_tile for the arguments).
template <typename T>
void block_product(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row,
                   int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  auto rows = [&](auto rows_tag, int64_t i) {
    constexpr int kRows = decltype(rows_tag)::value;
    const T* a_rows = a + i * a_row;
    T* c_rows = c + i * ldc;
    int64_t j = 0;
    for (; j + 3 * kWidth <= n; j += 3 * kWidth) {
      product_tile<T, kRows, 3>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc);
    }
    for (; j + 2 * kWidth <= n; j += 2 * kWidth) {
      product_tile<T, kRows, 2>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc);
    }
    for (; j + kWidth <= n; j += kWidth) {
      product_tile<T, kRows, 1>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc);
    }
    if (j < n) {
      product_tail<T, kRows>(k, n - j, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate,
                             c_rows + j, ldc);
    }
  };
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) rows(std::integral_constant<int, 4>{}, i);
  for (; i < m; ++i) rows(std::integral_constant<int, 1>{}, i);
}

// out (M, N) = a (M, K) @ b (K, N), or out += a @ b with `accumulate`, for 2-D CPU tensors of
// one floating dtype with any strides. Sums run in the accumulation dtype (float32 for half
// types, whose inputs are widened first) and are rounded once into `out`. Rows are shared
// among threads in fixed blocks; a call inside a parallel region runs on its thread.
void fixed_order_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool accumulate);

}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
