#include "gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace cnn_attention {
namespace ops {
namespace cpu {

namespace {

// Output blocks per task: at most kMaxRowBlock x kMaxColumnBlock, halved (columns first) down
// to kRowBlock x kColumnBlock while the product has fewer than kTasksPerThread tasks per thread.
// Larger blocks read a and b fewer times (a once per column block, b once per row block, and
// copied by each task that packs it), smaller ones share a small product among the threads.
// Blocks are multiples of kRowUnit rows (the row tiles, 8 or 4) and kColumnUnit columns (the
// widest column tile, 3 vectors, of float or double in either build).
constexpr int64_t kRowBlock = 64;
constexpr int64_t kColumnBlock = 96;
constexpr int64_t kMaxRowBlock = 4 * kRowBlock;
constexpr int64_t kMaxColumnBlock = 4 * kColumnBlock;
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kRowUnit = 8;
constexpr int64_t kColumnUnit = 48;

int64_t blocks(int64_t size, int64_t block) { return (size + block - 1) / block; }

// The tiles of transposing copies: 8 x 8 values.
constexpr int64_t kTileSize = 8;

#if defined(CPU_CAPABILITY_AVX2)
// d[c * ld_d + r] = s[r * ld_s + c] for an 8 x 8 tile of floats, in registers.
inline void transpose_8x8(const float* s, int64_t ld_s, float* d, int64_t ld_d) {
  __m256 row[8], pair[8], quad[8];
  for (int r = 0; r < 8; ++r) row[r] = _mm256_loadu_ps(s + r * ld_s);
  for (int r = 0; r < 8; r += 2) {
    pair[r] = _mm256_unpacklo_ps(row[r], row[r + 1]);
    pair[r + 1] = _mm256_unpackhi_ps(row[r], row[r + 1]);
  }
  for (int r = 0; r < 8; r += 4) {
    quad[r] = _mm256_shuffle_ps(pair[r], pair[r + 2], _MM_SHUFFLE(1, 0, 1, 0));
    quad[r + 1] = _mm256_shuffle_ps(pair[r], pair[r + 2], _MM_SHUFFLE(3, 2, 3, 2));
    quad[r + 2] = _mm256_shuffle_ps(pair[r + 1], pair[r + 3], _MM_SHUFFLE(1, 0, 1, 0));
    quad[r + 3] = _mm256_shuffle_ps(pair[r + 1], pair[r + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(d + c * ld_d, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x20));
    _mm256_storeu_ps(d + (c + 4) * ld_d, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x31));
  }
}
#endif

// The size of `count` nearly equal blocks covering `size`, a multiple of `unit`: 392 rows in
// blocks of at most 256 are 200 + 192, not 256 + 136, which left one thread of two idle for a
// third of the product (at::parallel_for gives each thread a run of neighbouring tasks).
int64_t even_block(int64_t size, int64_t count, int64_t unit) {
  return blocks(blocks(size, count), unit) * unit;
}

// Row and column block sizes for a product of m x n outputs on `threads` threads.
std::pair<int64_t, int64_t> task_blocks(int64_t m, int64_t n, int64_t threads) {
  int64_t row_block = kMaxRowBlock, column_block = kMaxColumnBlock;
  while (blocks(m, row_block) * blocks(n, column_block) < kTasksPerThread * threads &&
         (row_block > kRowBlock || column_block > kColumnBlock)) {
    if (column_block > kColumnBlock) {
      column_block /= 2;
    } else {
      row_block /= 2;
    }
  }
  row_block = even_block(m, blocks(m, row_block), kRowUnit);
  // Of the column counts from the chosen one to threads - 1 more, the first whose tasks share
  // best among the threads (14 tasks on 2 threads, 7 each, rather than 13: 7 and 6).
  // A count's share is tasks / (threads * tasks per thread), compared as integers.
  const int64_t row_blocks = blocks(m, row_block), first_count = blocks(n, column_block);
  int64_t best_tasks = 0, best_slots = 1;
  for (int64_t count = first_count; count < first_count + threads; ++count) {
    const int64_t block = even_block(n, count, kColumnUnit);
    const int64_t tasks = row_blocks * blocks(n, block);
    const int64_t slots = threads * blocks(tasks, threads);
    if (tasks * best_slots > best_tasks * slots) {
      best_tasks = tasks;
      best_slots = slots;
      column_block = block;
    }
  }
  return {row_block, column_block};
}

// Whether one of two 2-D tensors is stored by rows and the other by columns.
bool transposed_to(const at::Tensor& dst, const at::Tensor& src) {
  return (dst.stride(1) == 1 && src.stride(0) == 1 && src.stride(1) != 1) ||
         (dst.stride(0) == 1 && src.stride(1) == 1 && dst.stride(1) != 1);
}

// dst = src (rows x cols) where one is stored by rows and the other by columns: the one stored
// by rows, or the transpose of the one stored by columns, is a row-major matrix s whose
// transpose is the other's storage. Runs of s's rows are shared among threads where the copy
// is large enough to pay for them.
template <typename T>
void transposing_copy(T* dst, int64_t dst_row, int64_t dst_col, const T* src, int64_t src_row,
                      int64_t src_col, int64_t rows, int64_t cols) {
  const bool src_by_rows = src_col == 1;
  const int64_t s_rows = src_by_rows ? rows : cols, s_cols = src_by_rows ? cols : rows;
  const int64_t ld_s = src_by_rows ? src_row : src_col;
  const int64_t ld_d = src_by_rows ? dst_col : dst_row;
  // Tasks of whole tiles' rows.
  const int64_t task_rows =
      kTileSize *
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / (kTileSize * std::max<int64_t>(s_cols, 1)));
  at::parallel_for(0, blocks(s_rows, task_rows), 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * task_rows;
    transpose_rows(src + first * ld_s, ld_s, std::min(s_rows, end * task_rows) - first, s_cols,
                   dst + first, ld_d);
  });
}

}  // namespace

template <typename T>
void transpose_rows(const T* in, int64_t ld, int64_t rows, int64_t cols, T* out, int64_t ld_out) {
  const auto tile = [&](int64_t r0, int64_t c0) {
    const int64_t r1 = std::min(rows, r0 + kTileSize), c1 = std::min(cols, c0 + kTileSize);
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      if (r1 - r0 == kTileSize && c1 - c0 == kTileSize) {
        transpose_8x8(in + r0 * ld + c0, ld, out + c0 * ld_out + r0, ld_out);
        return;
      }
    }
#endif
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = r0; r < r1; ++r) out[c * ld_out + r] = in[r * ld + c];
    }
  };
  // The tiles run along the lines of whichever matrix has them further apart, 8 of its lines
  // at a time: those lines are then read or written in long runs, and the other matrix's
  // lines, nearer each other, are the ones touched a few values at a time (lines a multiple of
  // 4 KiB apart share one set of L1's and would evict each other, so never more than 8 of
  // those at once).
  if (ld_out >= ld) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTileSize) {
      for (int64_t r0 = 0; r0 < rows; r0 += kTileSize) tile(r0, c0);
    }
  } else {
    for (int64_t r0 = 0; r0 < rows; r0 += kTileSize) {
      for (int64_t c0 = 0; c0 < cols; c0 += kTileSize) tile(r0, c0);
    }
  }
}

template void transpose_rows<float>(const float*, int64_t, int64_t, int64_t, float*, int64_t);
template void transpose_rows<double>(const double*, int64_t, int64_t, int64_t, double*, int64_t);
template void transpose_rows<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, c10::Half*,
                                        int64_t);
template void transpose_rows<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t,
                                            c10::BFloat16*, int64_t);

void copy_matrix(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.scalar_type() != src.scalar_type() || !at::isFloatingType(dst.scalar_type()) ||
      dst.dim() != 2 || src.dim() != 2 || !transposed_to(dst, src)) {
    dst.copy_(src);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "copy_matrix", [&] {
    transposing_copy<scalar_t>(dst.data_ptr<scalar_t>(), dst.stride(0), dst.stride(1),
                               src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1),
                               dst.size(0), dst.size(1));
  });
}

// The transposed form's tiles of out^T: at most kTileValues values (32 KiB in float32), in a
// buffer of each task's own, so that no out^T is held whole (a channels-first map's gradient,
// (C, P) from P tokens, would be one more map).
constexpr int64_t kTileValues = 1 << 13;
constexpr int64_t kMinBlockColumns = 64;

// out (m x n, a unit stride between its rows: out^T's rows are out's columns) = b_t (n x k, any
// strides) @ a_t (k x m, rows of unit stride) transposed, or out += it: the transposed form's
// product, all in one dtype T. Each task takes a block of out^T as the direct form's tasks do,
// forms it a tile of rows at a time in its buffer (with `accumulate`, from out's values copied in)
// and stores the tile's transpose into out: one parallel region, and each element the same chain
// of fused multiply-adds as the direct form's.
template <typename T>
void transposed_product(T* out, int64_t ld_out, const T* b_t, int64_t b_t_row, int64_t b_t_col,
                        const T* a_t, int64_t ld_a_t, int64_t m, int64_t n, int64_t k,
                        bool accumulate) {
  const auto [row_block, column_block] = task_blocks(n, m, at::get_num_threads());
  const int64_t row_blocks = blocks(n, row_block), column_blocks = blocks(m, column_block);
  const int64_t tile_columns = std::min(column_block, m);
  const int64_t tile_rows = std::min(
      row_block, std::max<int64_t>(kRowUnit, kTileValues / tile_columns / kRowUnit * kRowUnit));
  const int64_t task_work = row_block * column_block * std::max<int64_t>(k, 1);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / task_work);
  at::parallel_for(0, row_blocks * column_blocks, grain, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<T[]> tile(new T[tile_rows * tile_columns]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first_row = task / column_blocks * row_block;
      const int64_t first_column = task % column_blocks * column_block;
      const int64_t rows_end = std::min(first_row + row_block, n);
      const int64_t columns = std::min(column_block, m - first_column);
      for (int64_t row = first_row; row < rows_end; row += tile_rows) {
        const int64_t rows = std::min(tile_rows, rows_end - row);
        T* out_tile = out + first_column * ld_out + row;
        if (accumulate) transpose_rows(out_tile, ld_out, columns, rows, tile.get(), columns);
        block_product<T>(rows, columns, k, T(1), b_t + row * b_t_row, b_t_row, b_t_col,
                         a_t + first_column, ld_a_t, accumulate, tile.get(), columns);
        transpose_rows(tile.get(), columns, rows, columns, out_tile, ld_out);
      }
    }
  });
}

void fixed_order_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool accumulate) {
  TORCH_INTERNAL_ASSERT(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                        out.size(0) == a.size(0) && out.size(1) == b.size(1));
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  // The product reads b's rows and writes out's in place where they have a unit column stride
  // in the accumulation dtype; otherwise it packs b (k n values) or writes a result of its own
  // (m n). The transposed form, out^T = b^T a^T, reads b^T in place as the `a` operand (any
  // strides) and needs a^T's rows (m k values where a is stored by rows) and out^T's: it is
  // taken where it copies fewer values (a few tokens times a transposed weight; a weight
  // gradient from a channels-first map's tokens, whose columns are rows of the map; a
  // channels-first map from tokens, whose b, the tokens' transpose, it reads in place). Where
  // out is not stored by columns, out^T is formed a tile at a time in each task's buffer
  // (transposed_product: no copy of m n values), or in half dtypes in an out^T of its own,
  // whole or a block of out's columns at a time. Every element is the same chain of fused
  // multiply-adds over l whatever the form and the blocks (fma(x, y, s) = fma(y, x, s)), so the
  // result has the same bits.
  const auto rows_in_place = [&](const at::Tensor& t) {
    return t.scalar_type() == acc && (t.stride(1) == 1 || t.size(1) == 1);
  };
  const auto dense_copy = [&](const at::Tensor& t) {
    const at::Tensor widened = t.to(acc);
    if (widened.is_contiguous()) return widened;
    const at::Tensor dense = at::empty(t.sizes(), t.options().dtype(acc));
    copy_matrix(dense, widened);
    return dense;
  };
  const auto widened = [&](const at::Tensor& t) { return t.scalar_type() == acc ? 0 : t.numel(); };
  const int64_t direct_copies =
      widened(a) + (rows_in_place(b) ? 0 : k * n) + (rows_in_place(out) ? 0 : m * n);
  const bool out_in_tiles = out.scalar_type() == acc && out.stride(1) == 1;
  const int64_t transposed_copies = widened(b) + (rows_in_place(a.t()) ? 0 : m * k) +
                                    (rows_in_place(out.t()) || out_in_tiles ? 0 : m * n);
  if (n > 1 && transposed_copies < direct_copies) {
    if (rows_in_place(out.t())) {
      fixed_order_matmul(out.t(), b.t(), a.t(), accumulate);
      return;
    }
    const at::Tensor a_t = rows_in_place(a.t()) ? a.t() : dense_copy(a.t());
    if (out_in_tiles) {
      AT_DISPATCH_FLOATING_TYPES(acc, "fixed_order_matmul", [&] {
        transposed_product<scalar_t>(
            out.data_ptr<scalar_t>(), out.stride(0), b.const_data_ptr<scalar_t>(), b.stride(1),
            b.stride(0), a_t.const_data_ptr<scalar_t>(), a_t.stride(0), m, n, k, accumulate);
      });
      return;
    }
    // Half dtypes (and an out with no unit stride): out^T of its own, rounded once into out,
    // whole where it is at most half the size of b (m <= k / 2), else a block of out's columns
    // at a time (kTileValues values, at least kMinBlockColumns columns), b's columns widened.
    const int64_t block = 2 * m > k ? std::max(kMinBlockColumns, kTileValues / m) : n;
    for (int64_t first = 0; first < n; first += block) {
      const int64_t width = std::min(block, n - first);
      const at::Tensor out_block = out.narrow(1, first, width);
      const at::Tensor transposed = at::empty({width, m}, out.options().dtype(acc));
      if (accumulate) copy_matrix(transposed, out_block.t());
      fixed_order_matmul(transposed, b.narrow(1, first, width).t(), a_t, accumulate);
      copy_matrix(out_block, transposed.t());
    }
    return;
  }
  // b is read a row at a time by every tile: in place where its rows are, else packed by rows;
  // a is read in place when it is already in the accumulation dtype.
  const at::Tensor a_acc = a.scalar_type() == acc ? a : a.to(acc);
  const at::Tensor b_rows = rows_in_place(b) ? b : dense_copy(b);
  const bool direct = rows_in_place(out);
  at::Tensor result = direct       ? out
                      : accumulate ? dense_copy(out)
                                   : at::empty({m, n}, out.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "fixed_order_matmul", [&] {
    const scalar_t* a_data = a_acc.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b_rows.const_data_ptr<scalar_t>();
    scalar_t* c_data = result.data_ptr<scalar_t>();
    const int64_t a_row = a_acc.stride(0), a_col = a_acc.stride(1), ldc = result.stride(0);
    const int64_t ldb = b_rows.stride(0);
    const auto [row_block, column_block] = task_blocks(m, n, at::get_num_threads());
    const int64_t row_blocks = blocks(m, row_block), column_blocks = blocks(n, column_block);
    const int64_t task_work = row_block * column_block * std::max<int64_t>(k, 1);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / task_work);
    // Every element is computed the same way whichever task holds it (see gemm.h).
    at::parallel_for(0, row_blocks * column_blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first_row = task / column_blocks * row_block;
        const int64_t first_column = task % column_blocks * column_block;
        const int64_t rows = std::min(row_block, m - first_row);
        const int64_t columns = std::min(column_block, n - first_column);
        block_product<scalar_t>(rows, columns, k, scalar_t(1), a_data + first_row * a_row, a_row,
                                a_col, b_data + first_column, ldb, accumulate,
                                c_data + first_row * ldc + first_column, ldc);
      }
    });
  });
  if (!direct) copy_matrix(out, result);
}

}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
