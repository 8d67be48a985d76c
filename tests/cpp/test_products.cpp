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
            const torch::Tensor untouched = torch::ones_like(before, torch::kBool);
            untouched.as_strided(dst.sizes(), dst.strides(), 0).fill_(false);
            EXPECT_TRUE(torch::equal(buffer_of(dst).masked_select(untouched),
                                     before.masked_select(untouched)))
                << where;
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
