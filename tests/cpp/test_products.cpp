// The library's transposing copy (ops/cpu/gemm.h), behind the matrix products of the channel
// MLP and of self attention: every dtype, both orientations, sizes that are and are not whole
// 8 x 8 tiles, leading dims wider than the matrix, and copies large enough to be shared among
// threads. The copy must equal ATen's and leave every other element of the destination as it
// was.
#include <cnn_attention/ops/cpu/gemm.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace {

using cnn_attention::ops::cpu::copy_matrix;

// A (rows x cols) view into a larger buffer filled with `fill`: stored by rows, or by columns,
// with `pad` unused elements after each line.
torch::Tensor destination(int64_t rows, int64_t cols, bool by_rows, int64_t pad, double fill,
                          torch::ScalarType dtype) {
  if (by_rows) return torch::full({rows, cols + pad}, fill, dtype).narrow(1, 0, cols);
  return torch::full({cols, rows + pad}, fill, dtype).narrow(1, 0, rows).t();
}

torch::Tensor source(int64_t rows, int64_t cols, bool by_rows, int64_t pad,
                     torch::ScalarType dtype) {
  if (by_rows) return torch::randn({rows, cols + pad}).to(dtype).narrow(1, 0, cols);
  return torch::randn({cols, rows + pad}).to(dtype).narrow(1, 0, rows).t();
}

// The whole buffer behind a view.
torch::Tensor buffer_of(const torch::Tensor& view) {
  const int64_t size = static_cast<int64_t>(view.storage().nbytes()) / view.element_size();
  return view.as_strided({size}, {1}, 0);
}

// The elements of `view`'s buffer outside the view, compared with `before` (a copy of the
// buffer taken before `view` was written): nothing is written outside it.
void expect_only_view_written(const torch::Tensor& view, const torch::Tensor& before,
                              const std::string& where) {
  const torch::Tensor untouched = torch::ones_like(before, torch::kBool);
  untouched.as_strided(view.sizes(), view.strides(), 0).fill_(false);
  EXPECT_TRUE(
      torch::equal(buffer_of(view).masked_select(untouched), before.masked_select(untouched)))
      << where;
}

TEST(CopyMatrix, TransposingCopiesEqualATensAndWriteNothingElse) {
  torch::manual_seed(0);
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    for (int64_t rows : {1, 3, 8, 9, 17, 64, 392}) {
      for (int64_t cols : {1, 7, 8, 16, 49, 130, 2048}) {
        for (bool dst_by_rows : {true, false}) {
          for (int64_t pad : {0, 5}) {
            const std::string where = std::string(c10::toString(dtype)) + " " +
                                      std::to_string(rows) + "x" + std::to_string(cols) +
                                      (dst_by_rows ? " into rows" : " into columns") + " pad " +
                                      std::to_string(pad);
            const torch::Tensor src = source(rows, cols, !dst_by_rows, pad, dtype);
            const torch::Tensor dst = destination(rows, cols, dst_by_rows, pad, -7.0, dtype);
            const torch::Tensor before = buffer_of(dst).clone();
            copy_matrix(dst, src);
            EXPECT_TRUE(torch::equal(dst, src)) << where;
            expect_only_view_written(dst, before, where);
          }
        }
      }
    }
  }
}

// Copies that are not a transposition take ATen's copy.
TEST(CopyMatrix, OtherLayoutsAndDtypesCopyAsATen) {
  torch::manual_seed(1);
  const torch::Tensor src = torch::randn({5, 9});
  const torch::Tensor same_layout = torch::empty({5, 9});
  copy_matrix(same_layout, src);
  EXPECT_TRUE(torch::equal(same_layout, src));
  const torch::Tensor widened = torch::empty({9, 5}, torch::kDouble).t();
  copy_matrix(widened, src);
  EXPECT_TRUE(torch::equal(widened, src.to(torch::kDouble)));
}

}  // namespace

namespace {

using cnn_attention::ops::cpu::fixed_order_matmul;

// out = a @ b (or out += it) through fixed_order_matmul with every operand stored by rows or by
// columns, with padded lines: every layout takes a form of the product (in place, packed,
// transposed with out^T written in place, formed a tile at a time in each task's buffer, or in
// half dtypes and for an out with no unit stride a block of out's columns at a time) whose every
// element is the same chain of fused multiply-adds, so the result has the bits of the product
// of dense operands, and it writes nothing outside out's view.
TEST(FixedOrderMatmul, EveryLayoutGivesTheBitsOfDenseOperands) {
  torch::manual_seed(2);
  struct Shape {
    int64_t m, k, n;
  };
  // (64, 80, 1000): a channels-first map's gradient from its tokens' projection gradient (out^T
  // in several tiles a task); (16, 128, 2048): an MLP's second product; (80, 1000, 64): a
  // weight gradient; one row, one column, one term.
  for (const Shape shape : {Shape{64, 80, 1000}, Shape{16, 128, 2048}, Shape{80, 1000, 64},
                            Shape{1, 300, 70}, Shape{70, 300, 1}, Shape{33, 1, 40}}) {
    for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
      const torch::Tensor a_dense = torch::randn({shape.m, shape.k}).to(dtype);
      const torch::Tensor b_dense = torch::randn({shape.k, shape.n}).to(dtype);
      const torch::Tensor start = torch::randn({shape.m, shape.n}).to(dtype);
      for (bool accumulate : {false, true}) {
        torch::Tensor expected = start.clone();
        fixed_order_matmul(expected, a_dense, b_dense, accumulate);
        const torch::Tensor exact =
            (accumulate ? start.to(torch::kDouble)
                        : torch::zeros({shape.m, shape.n}, torch::kDouble)) +
            torch::matmul(a_dense.to(torch::kDouble), b_dense.to(torch::kDouble));
        const double tolerance = dtype == torch::kBFloat16 ? 0.1
                                 : dtype == torch::kHalf   ? 0.05
                                 : dtype == torch::kFloat  ? 1e-3
                                                           : 1e-10;
        EXPECT_TRUE(torch::allclose(expected.to(torch::kDouble), exact, tolerance, tolerance))
            << c10::toString(dtype);
        for (int layout = 0; layout < 8; ++layout) {
          const bool out_rows = layout & 1, a_rows = layout & 2, b_rows = layout & 4;
          const std::string where = std::string(c10::toString(dtype)) + " " +
                                    std::to_string(shape.m) + "x" + std::to_string(shape.k) + "x" +
                                    std::to_string(shape.n) + " layout " + std::to_string(layout) +
                                    (accumulate ? " accumulate" : "");
          const torch::Tensor a = source(shape.m, shape.k, a_rows, 3, dtype).copy_(a_dense);
          const torch::Tensor b = source(shape.k, shape.n, b_rows, 3, dtype).copy_(b_dense);
          const torch::Tensor out = destination(shape.m, shape.n, out_rows, 3, -7.0, dtype);
          out.copy_(start);
          const torch::Tensor before = buffer_of(out).clone();
          fixed_order_matmul(out, a, b, accumulate);
          EXPECT_TRUE(torch::equal(out, expected)) << where;
          expect_only_view_written(out, before, where);
        }
        // An out with no unit stride (every other column of a padded buffer), of operands
        // stored by columns: the transposed form, a block of out's columns at a time.
        const std::string where = std::string(c10::toString(dtype)) + " " +
                                  std::to_string(shape.m) + "x" + std::to_string(shape.k) + "x" +
                                  std::to_string(shape.n) + " strided out" +
                                  (accumulate ? " accumulate" : "");
        const torch::Tensor out =
            torch::full({shape.m, 2 * shape.n + 3}, -7.0, dtype).slice(1, 0, 2 * shape.n, 2);
        out.copy_(start);
        const torch::Tensor before = buffer_of(out).clone();
        fixed_order_matmul(out, source(shape.m, shape.k, false, 3, dtype).copy_(a_dense),
                           source(shape.k, shape.n, false, 3, dtype).copy_(b_dense), accumulate);
        EXPECT_TRUE(torch::equal(out, expected)) << where;
        expect_only_view_written(out, before, where);
      }
    }
  }
}

}  // namespace
