#include "gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace cnn_attention {
namespace ops {
namespace cpu {

namespace {

// Output tiles per task: rows a multiple of the row tiles (8 or 4), columns a multiple of the
// widest column tile (3 vectors) for float and double. A product as short as a batch of channel
// statistics (32 rows) and as wide as 2048 channels is split along its columns too.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kColumnBlock = 96;

}  // namespace

void fixed_order_matmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool accumulate) {
  TORCH_INTERNAL_ASSERT(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                        out.size(0) == a.size(0) && out.size(1) == b.size(1));
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  const at::ScalarType acc = at::toOpMathType(a.scalar_type());
  // b stored column by column (a transposed weight) would be packed into rows below: a copy of
  // all of b, on one thread. With fewer rows than columns in out (a few tokens times a wide
  // weight), out^T = b^T a^T reads b^T in place as the `a` operand (any strides) and packs the
  // smaller a^T instead. Every element is the same chain of fused multiply-adds over l either
  // way (fma(x, y, s) = fma(y, x, s)), so the result has the same bits.
  if (b.stride(0) == 1 && n > 1 && m < n) {
    at::Tensor transposed = at::empty({n, m}, out.options().dtype(acc));
    if (accumulate) transposed.copy_(out.t());
    fixed_order_matmul(transposed, b.t(), a.t(), accumulate);
    out.copy_(transposed.t());
    return;
  }
  // b is read a row at a time by every tile: packed dense; a is read in place when it is
  // already in the accumulation dtype.
  const at::Tensor a_acc = a.scalar_type() == acc ? a : a.to(acc);
  const at::Tensor b_rows = b.to(acc).contiguous();
  const bool direct = out.scalar_type() == acc && out.stride(1) == 1;
  at::Tensor result = direct       ? out
                      : accumulate ? out.to(acc).contiguous()
                                   : at::empty({m, n}, out.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "fixed_order_matmul", [&] {
    const scalar_t* a_data = a_acc.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b_rows.const_data_ptr<scalar_t>();
    scalar_t* c_data = result.data_ptr<scalar_t>();
    const int64_t a_row = a_acc.stride(0), a_col = a_acc.stride(1), ldc = result.stride(0);
    const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
    const int64_t column_blocks = (n + kColumnBlock - 1) / kColumnBlock;
    const int64_t task_work = kRowBlock * kColumnBlock * std::max<int64_t>(k, 1);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / task_work);
    // Every element is computed the same way whichever task holds it (see gemm.h).
    at::parallel_for(0, row_blocks * column_blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first_row = task / column_blocks * kRowBlock;
        const int64_t first_column = task % column_blocks * kColumnBlock;
        const int64_t rows = std::min(kRowBlock, m - first_row);
        const int64_t columns = std::min(kColumnBlock, n - first_column);
        block_product<scalar_t>(rows, columns, k, scalar_t(1), a_data + first_row * a_row, a_row,
                                a_col, b_data + first_column, n, accumulate,
                                c_data + first_row * ldc + first_column, ldc);
      }
    });
  });
  if (!direct) out.copy_(result);
}

}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
