// The fixed-order matrix product of ../gemm.h, built once per vector instruction set (see
// ../vector_isa.h). Each element's sum runs along k inside one vector lane, so the AVX-512
// build (16 floats a vector) gives the AVX2 build's bits (8 floats) and is twice as wide.

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../vector_isa.h"

namespace cnn_attention {
namespace ops {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

#if defined(CPU_CAPABILITY_AVX512)
// 8 rows by 3 vectors: 24 of the 32 vector registers hold sums, and each load of b serves 8
// rows. The last columns, fewer than a vector, use masked loads and stores.
constexpr int kTileRows = 8;
constexpr bool kMaskedLastColumns = true;
#else
// 4 rows by 3 vectors: 12 of the 16 vector registers hold sums.
constexpr int kTileRows = 4;
constexpr bool kMaskedLastColumns = false;
#endif

// c (kRows x kVecs vectors) = alpha * sum over l of a(i, l) * b(l, :), stored into c or added
// to it, with a(i, l) = a[i * a_row + l * a_col] (any strides: a row-major block, or with
// a_row = 1 a transposed one) and b, c row-major with contiguous rows. The sums stay in
// registers; b's vectors are loaded once per l for all kRows rows. With `columns` below a
// vector (kVecs = 1), only that many columns are read and written.
template <typename T, int kRows, int kVecs>
C10_ALWAYS_INLINE void product_tile(int64_t k, T alpha, const T* a, int64_t a_row, int64_t a_col,
                                    const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc,
                                    int64_t columns = at::vec::Vectorized<T>::size()) {
  using Vec = at::vec::Vectorized<T>;
  Vec sums[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) sums[r][v] = Vec(T(0));
  }
  const T* a_rows[kRows];
  for (int r = 0; r < kRows; ++r) a_rows[r] = a + r * a_row;
  for (int64_t l = 0; l < k; ++l, b += ldb) {
    Vec b_columns[kVecs];
    for (int v = 0; v < kVecs; ++v) b_columns[v] = Vec::loadu(b + v * Vec::size(), columns);
    for (int r = 0; r < kRows; ++r) {
      const Vec weight(*a_rows[r]);
      a_rows[r] += a_col;
      for (int v = 0; v < kVecs; ++v) sums[r][v] = at::vec::fmadd(weight, b_columns[v], sums[r][v]);
    }
  }
  const Vec alpha_vec(alpha);
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      T* out = c + r * ldc + v * Vec::size();
      const Vec result = sums[r][v] * alpha_vec;
      (accumulate ? result + Vec::loadu(out, columns) : result).store(out, columns);
    }
  }
}

// The last columns, fewer than a vector, one at a time: the same fused multiply-adds in the
// same order as a vector lane, so a column's values do not depend on where the vectors end.
template <typename T, int kRows>
void product_tail(int64_t k, int64_t columns, T alpha, const T* a, int64_t a_row, int64_t a_col,
                  const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < columns; ++j) {
      T sum = 0;
      for (int64_t l = 0; l < k; ++l) sum = std::fma(a[r * a_row + l * a_col], b[l * ldb + j], sum);
      const T result = alpha * sum;
      c[r * ldc + j] = accumulate ? result + c[r * ldc + j] : result;
    }
  }
}

}  // namespace

template <typename T>
void block_product_kernel(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row,
                          int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,
                          int64_t ldc) {
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
    if (j == n) return;
    if constexpr (kMaskedLastColumns) {
      product_tile<T, kRows, 1>(k, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate, c_rows + j,
                                ldc, n - j);
    } else {
      product_tail<T, kRows>(k, n - j, alpha, a_rows, a_row, a_col, b + j, ldb, accumulate,
                             c_rows + j, ldc);
    }
  };
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) rows(std::integral_constant<int, kTileRows>{}, i);
  if constexpr (kTileRows > 4) {
    for (; i + 4 <= m; i += 4) rows(std::integral_constant<int, 4>{}, i);
  }
  for (; i < m; ++i) rows(std::integral_constant<int, 1>{}, i);
}

template void block_product_kernel<float>(int64_t, int64_t, int64_t, float, const float*, int64_t,
                                          int64_t, const float*, int64_t, bool, float*, int64_t);
template void block_product_kernel<double>(int64_t, int64_t, int64_t, double, const double*,
                                           int64_t, int64_t, const double*, int64_t, bool, double*,
                                           int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
