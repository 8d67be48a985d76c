#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../spatial_attention_impl.h"
#include "position_softmax.h"
#include "vec.h"
#include "vector_isa.h"

namespace cnn_attention {
namespace ops {

namespace {

using cpu::grain_for;
using cpu::interleaved_sum;
using cpu::kPositionBlock;
using cpu::lane_sum;
using cpu::load_partial;
using cpu::OpmathVec;
using cpu::store_partial;

// Channels handled together when positions are the outer dim of a reduction.
constexpr int64_t kChannelBlock = 256;

// Where the rows of an input (x, grad_y) start: row r of sample n (channel r channels
// first, position r channels last) at n * batch_stride + r * row_stride. The rows themselves
// are contiguous; their starts may be strided, so channel slices and expanded tensors are
// read in place (see row_strides). Outputs are dense.
struct Rows {
  int64_t batch_stride, row_stride;
  int64_t at(int64_t n, int64_t r) const { return n * batch_stride + r * row_stride; }
};

Rows rows_of(const at::Tensor& t, Layout layout) {
  const auto strides = row_strides(t, layout);
  TORCH_INTERNAL_ASSERT(strides.has_value(),
                        "spatial attention: an input with non-contiguous rows");
  return {strides->first, strides->second};
}

// One operand of a row operation: a row of `len` values, or one value for the whole row
// (a weight shared by all channels, a gradient constant over positions).
template <typename T>
struct Row {
  const T* data;
  bool splat;
};

template <typename scalar_t, typename T>
typename OpmathVec<scalar_t>::Chunk load_row(const Row<T>& row, int64_t j) {
  using V = OpmathVec<scalar_t>;
  if (row.splat) {
    typename V::Chunk chunk;
    chunk.fill(typename V::Vec(static_cast<typename V::opmath_t>(row.data[0])));
    return chunk;
  }
  if constexpr (std::is_same_v<T, scalar_t>) {
    return V::load(row.data + j);
  } else {
    return V::load_opmath(row.data + j);
  }
}

template <typename T>
at::opmath_type<T> row_value(const Row<T>& row, int64_t j) {
  return static_cast<at::opmath_type<T>>(row.data[row.splat ? 0 : j]);
}

// y = x * w over one row.
template <typename scalar_t, typename opmath_t>
void scale_row(const scalar_t* x, Row<opmath_t> w, scalar_t* y, int64_t len) {
  using V = OpmathVec<scalar_t>;
  int64_t j = 0;
  for (; j + V::size() <= len; j += V::size()) {
    auto xs = V::load(x + j);
    const auto ws = load_row<scalar_t>(w, j);
    for (int k = 0; k < V::kVecs; ++k) xs[k] = xs[k] * ws[k];
    V::store(y + j, xs);
  }
  for (; j < len; ++j) y[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) * row_value(w, j));
}

// grad_x = g * w and grad_w = g * x over one row (weights not shared: elementwise).
template <typename scalar_t, typename opmath_t>
void scale_backward_row(Row<scalar_t> g, const scalar_t* x, const opmath_t* w, scalar_t* grad_x,
                        opmath_t* grad_w, int64_t len) {
  using V = OpmathVec<scalar_t>;
  int64_t j = 0;
  for (; j + V::size() <= len; j += V::size()) {
    const auto gs = load_row<scalar_t>(g, j);
    const auto xs = V::load(x + j);
    const auto ws = V::load_opmath(w + j);
    typename V::Chunk gx;
    for (int k = 0; k < V::kVecs; ++k) {
      gx[k] = gs[k] * ws[k];
      (gs[k] * xs[k]).store(grad_w + j + k * V::Vec::size());
    }
    V::store(grad_x + j, gx);
  }
  for (; j < len; ++j) {
    const opmath_t gj = row_value(g, j);
    grad_x[j] = static_cast<scalar_t>(gj * w[j]);
    grad_w[j] = gj * static_cast<opmath_t>(x[j]);
  }
}

// grad_x = g * w for one shared weight w; returns sum of g * x over the row.
template <typename scalar_t, typename opmath_t>
opmath_t scale_backward_shared_row(const scalar_t* g, const scalar_t* x, opmath_t w,
                                   scalar_t* grad_x, int64_t len) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  const Vec wv(w);
  const int64_t vectors = len / V::size();
  const Vec dots = interleaved_sum(vectors, Vec(opmath_t(0)), [&](int64_t i, Vec dot) {
    const int64_t j = i * V::size();
    const auto gs = V::load(g + j);
    const auto xs = V::load(x + j);
    typename V::Chunk gx;
    for (int k = 0; k < V::kVecs; ++k) {
      gx[k] = gs[k] * wv;
      dot = at::vec::fmadd(gs[k], xs[k], dot);
    }
    V::store(grad_x + j, gx);
    return dot;
  });
  int64_t j = vectors * V::size();
  opmath_t total = lane_sum(dots);
  for (; j < len; ++j) {
    const opmath_t gj = static_cast<opmath_t>(g[j]);
    grad_x[j] = static_cast<scalar_t>(gj * w);
    total += gj * static_cast<opmath_t>(x[j]);
  }
  return total;
}

template <typename scalar_t>
void scale_typed(const scalar_t* x, Rows xr, const at::opmath_type<scalar_t>* w, scalar_t* y,
                 SweepExtent e, Layout layout) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (layout == Layout::ChannelsFirst) {
    at::parallel_for(
        0, e.batch * e.channels, grain_for(e.positions), [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t n = row / e.channels, c = row % e.channels;
            const opmath_t* w_row = w + (n * e.score_channels + (e.shared() ? 0 : c)) * e.positions;
            scale_row(x + xr.at(n, c), Row<opmath_t>{w_row, false}, y + row * e.positions,
                      e.positions);
          }
        });
  } else {
    at::parallel_for(
        0, e.batch * e.positions, grain_for(e.channels), [&](int64_t begin, int64_t end) {
          for (int64_t pixel = begin; pixel < end; ++pixel) {
            const Row<opmath_t> w_row{w + pixel * (e.shared() ? 1 : e.channels), e.shared()};
            const int64_t n = pixel / e.positions, p = pixel % e.positions;
            scale_row(x + xr.at(n, p), w_row, y + pixel * e.channels, e.channels);
          }
        });
  }
}

// `pooled`: grad is (N, C), constant over the positions.
template <typename scalar_t>
void scale_backward_typed(const scalar_t* grad, Rows gr, const scalar_t* x, Rows xr,
                          const at::opmath_type<scalar_t>* w, scalar_t* grad_x,
                          at::opmath_type<scalar_t>* grad_w, SweepExtent e, Layout layout,
                          bool pooled) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const int64_t C = e.channels, P = e.positions;
  if (layout == Layout::ChannelsLast) {
    at::parallel_for(0, e.batch * P, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t pixel = begin; pixel < end; ++pixel) {
        const int64_t n = pixel / P, p = pixel % P;
        const scalar_t* g_row = grad + (pooled ? n * C : gr.at(n, p));
        const scalar_t* x_row = x + xr.at(n, p);
        const int64_t at_pixel = pixel * C;
        if (e.shared()) {
          grad_w[pixel] = scale_backward_shared_row(g_row, x_row, w[pixel], grad_x + at_pixel, C);
        } else {
          scale_backward_row(Row<scalar_t>{g_row, false}, x_row, w + at_pixel, grad_x + at_pixel,
                             grad_w + at_pixel, C);
        }
      }
    });
  } else if (!e.shared()) {
    at::parallel_for(0, e.batch * C, grain_for(P), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / C, c = row % C;
        const Row<scalar_t> g_row =
            pooled ? Row<scalar_t>{grad + row, true} : Row<scalar_t>{grad + gr.at(n, c), false};
        scale_backward_row(g_row, x + xr.at(n, c), w + row * P, grad_x + row * P, grad_w + row * P,
                           P);
      }
    });
  } else {
    // One weight row shared by all channels: each block of positions keeps its running
    // sum over the channels in L1 while the channels stream through.
    const int64_t blocks = (P + kPositionBlock - 1) / kPositionBlock;
    at::parallel_for(
        0, e.batch * blocks, grain_for(kPositionBlock * C), [&](int64_t begin, int64_t end) {
          alignas(64) opmath_t sum[kPositionBlock];
          for (int64_t task = begin; task < end; ++task) {
            const int64_t n = task / blocks, p0 = (task % blocks) * kPositionBlock;
            const int64_t width = std::min(kPositionBlock, P - p0);
            const opmath_t* w_block = w + n * P + p0;
            std::fill_n(sum, width, opmath_t(0));
            for (int64_t c = 0; c < C; ++c) {
              const int64_t row = n * C + c, at_row = row * P + p0;
              const scalar_t* x_block = x + xr.at(n, c) + p0;
              const Row<scalar_t> g_row = pooled ? Row<scalar_t>{grad + row, true}
                                                 : Row<scalar_t>{grad + gr.at(n, c) + p0, false};
              int64_t j = 0;
              for (; j + V::size() <= width; j += V::size()) {
                const auto gs = load_row<scalar_t>(g_row, j);
                const auto xs = V::load(x_block + j);
                const auto ws = V::load_opmath(w_block + j);
                typename V::Chunk gx;
                for (int k = 0; k < V::kVecs; ++k) {
                  const int64_t at = j + k * Vec::size();
                  gx[k] = gs[k] * ws[k];
                  at::vec::fmadd(gs[k], xs[k], Vec::loadu(sum + at)).store(sum + at);
                }
                V::store(grad_x + at_row + j, gx);
              }
              for (; j < width; ++j) {
                const opmath_t gj = row_value(g_row, j);
                grad_x[at_row + j] = static_cast<scalar_t>(gj * w_block[j]);
                sum[j] = std::fma(gj, static_cast<opmath_t>(x_block[j]), sum[j]);
              }
            }
            std::copy_n(sum, width, grad_w + n * P + p0);
          }
        });
  }
}

template <typename scalar_t>
void pool_typed(const scalar_t* x, Rows xr, const at::opmath_type<scalar_t>* w, scalar_t* out,
                SweepExtent e, Layout layout) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const int64_t C = e.channels, P = e.positions;
  if (layout == Layout::ChannelsFirst) {
    at::parallel_for(0, e.batch * C, grain_for(P), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / C, c = row % C;
        const scalar_t* x_row = x + xr.at(n, c);
        const opmath_t* w_row = w + (n * e.score_channels + (e.shared() ? 0 : c)) * P;
        // Sums in blocks of kSumBlock positions (see common.h): rows of 2^27 positions and
        // more (2^24 terms per lane) would otherwise stall.
        Vec dot_total(opmath_t(0));
        int64_t j = 0;
        while (j + V::size() <= P) {
          const int64_t vectors = (std::min(P, j + kSumBlock) - j) / V::size();
          dot_total += interleaved_sum(vectors, Vec(opmath_t(0)), [&](int64_t i, Vec dot) {
            const auto xs = V::load(x_row + j + i * V::size());
            const auto ws = V::load_opmath(w_row + j + i * V::size());
            for (int k = 0; k < V::kVecs; ++k) dot = at::vec::fmadd(xs[k], ws[k], dot);
            return dot;
          });
          j += vectors * V::size();
        }
        opmath_t total = lane_sum(dot_total);
        for (; j < P; ++j) total += static_cast<opmath_t>(x_row[j]) * w_row[j];
        out[row] = static_cast<scalar_t>(total);
      }
    });
  } else {
    // Positions are the outer dim: each task sums a block of channels over all positions.
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(
        0, e.batch * blocks, grain_for(kChannelBlock * P), [&](int64_t begin, int64_t end) {
          alignas(64) opmath_t sum[kChannelBlock], total[kChannelBlock];
          for (int64_t task = begin; task < end; ++task) {
            const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
            const int64_t width = std::min(kChannelBlock, C - c0);
            std::fill_n(sum, width, opmath_t(0));
            std::fill_n(total, width, opmath_t(0));
            for (int64_t p = 0; p < P; ++p) {
              const int64_t pixel = n * P + p;
              const scalar_t* x_row = x + xr.at(n, p) + c0;
              const Row<opmath_t> w_row{w + (e.shared() ? pixel : pixel * C + c0), e.shared()};
              int64_t j = 0;
              for (; j + V::size() <= width; j += V::size()) {
                const auto xs = V::load(x_row + j);
                const auto ws = load_row<scalar_t>(w_row, j);
                for (int k = 0; k < V::kVecs; ++k) {
                  const int64_t at = j + k * Vec::size();
                  at::vec::fmadd(xs[k], ws[k], Vec::loadu(sum + at)).store(sum + at);
                }
              }
              for (; j < width; ++j) {
                sum[j] = std::fma(static_cast<opmath_t>(x_row[j]), row_value(w_row, j), sum[j]);
              }
              // Each channel sums every position in one lane: folded into `total` every
              // kSumBlock positions (see common.h), as past 2^24 positions it would stall.
              if ((p + 1) % kSumBlock == 0 || p + 1 == P) {
                for (j = 0; j < width; ++j) {
                  total[j] += sum[j];
                  sum[j] = opmath_t(0);
                }
              }
            }
            for (int64_t j = 0; j < width; ++j) {
              out[n * C + c0 + j] = static_cast<scalar_t>(total[j]);
            }
          }
        });
  }
}

// One row of P scores (element p at row[p * stride]) to its top-k mask: the k-th largest
// key by std::nth_element on a copy (O(P), no sort), then every key above it and the first
// keys equal to it by index.
template <typename T>
void top_k_row(const T* row, int64_t stride, int64_t positions, int64_t k, T* mask,
               std::vector<T>& keys, std::vector<T>& scratch) {
  for (int64_t p = 0; p < positions; ++p) {
    const T v = row[p * stride];
    keys[p] = std::isnan(v) ? std::numeric_limits<T>::infinity() : v;
  }
  scratch.assign(keys.begin(), keys.end());
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<T>());
  const T kth = scratch[k - 1];
  int64_t places_left = k;
  for (int64_t p = 0; p < positions; ++p) places_left -= keys[p] > kth;
  for (int64_t p = 0; p < positions; ++p) {
    const bool keep = keys[p] > kth || (keys[p] == kth && places_left-- > 0);
    mask[p * stride] = keep ? T(1) : T(0);
  }
}

at::Tensor top_k_mask_cpu(const at::Tensor& scores, int64_t k, Layout layout) {
  at::Tensor mask = at::empty_like(scores);
  const int64_t batch = scores.size(0), score_channels = scores.size(1);
  const int64_t positions = num_positions(scores);
  // Rows are (n, score channel); channels-last rows with several score channels are strided.
  const bool strided_rows = layout == Layout::ChannelsLast && score_channels > 1;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "hard_attention_top_k_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    scalar_t* m = mask.data_ptr<scalar_t>();
    at::parallel_for(0, batch * score_channels, grain_for(positions),
                     [&](int64_t begin, int64_t end) {
                       std::vector<scalar_t> keys(positions), scratch(positions);
                       for (int64_t row = begin; row < end; ++row) {
                         const int64_t n = row / score_channels, c = row % score_channels;
                         const int64_t offset =
                             strided_rows ? n * positions * score_channels + c : row * positions;
                         top_k_row(s + offset, strided_rows ? score_channels : 1, positions, k,
                                   m + offset, keys, scratch);
                       }
                     });
  });
  return mask;
}

// ---- Weights computed per element (score maps with C channels): cpu/per_isa/ ----

void scale_by_scores_cpu(const at::Tensor& x, const at::Tensor& scores,
                         const ElementwiseWeights& how, at::Tensor& y, at::Tensor& mask) {
  CNN_ATTENTION_PER_ISA(scale_by_scores)(x, scores, how, y, mask);
}

void scale_by_scores_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& scores, const at::Tensor& mask,
                                  const ElementwiseWeights& how, at::Tensor& grad_x,
                                  at::Tensor& grad_scores) {
  CNN_ATTENTION_PER_ISA(scale_by_scores_backward)(grad, x, scores, mask, how, grad_x, grad_scores);
}

void scale_cpu(const at::Tensor& x, const at::Tensor& weights, at::Tensor& y, Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_scale_cpu", [&] {
        scale_typed(x.const_data_ptr<scalar_t>(), rows_of(x, layout),
                    weights.const_data_ptr<at::opmath_type<scalar_t>>(), y.data_ptr<scalar_t>(),
                    sweep_extent_of(x, weights), layout);
      });
}

void scale_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weights,
                        at::Tensor& grad_x, at::Tensor& grad_weights, Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_scale_backward_cpu", [&] {
        const bool pooled = grad.dim() == 2;
        scale_backward_typed(
            grad.const_data_ptr<scalar_t>(), pooled ? Rows{0, 0} : rows_of(grad, layout),
            x.const_data_ptr<scalar_t>(), rows_of(x, layout),
            weights.const_data_ptr<at::opmath_type<scalar_t>>(), grad_x.data_ptr<scalar_t>(),
            grad_weights.data_ptr<at::opmath_type<scalar_t>>(), sweep_extent_of(x, weights), layout,
            pooled);
      });
}

void pool_cpu(const at::Tensor& x, const at::Tensor& weights, at::Tensor& out, Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "soft_attention_pool_cpu", [&] {
        pool_typed(x.const_data_ptr<scalar_t>(), rows_of(x, layout),
                   weights.const_data_ptr<at::opmath_type<scalar_t>>(), out.data_ptr<scalar_t>(),
                   sweep_extent_of(x, weights), layout);
      });
}

// Softmax over positions. A map stored like the weights is, for each of its `outer` rows,
// P positions of `inner` values each: (N * Cs, P, 1) when the score channels are the outer
// dim (channels first, or one score channel), (N, P, Cs) for channels last. Sums run in
// blocks of kSumBlock positions, each block's vector sum added to a double total, so rows
// of any length are summed correctly, in an order fixed by the shape.
struct SoftmaxRows {
  int64_t outer, positions, inner;
};

SoftmaxRows softmax_rows_of(const at::Tensor& s, Layout layout) {
  const int64_t batch = s.size(0), score_channels = s.size(1), positions = num_positions(s);
  if (layout == Layout::ChannelsFirst || score_channels == 1) {
    return {batch * score_channels, positions, 1};
  }
  return {batch, positions, score_channels};
}

// Calls body(offset of the first value, stride between positions, lanes) for each task: a
// contiguous row (inner == 1) is one task with lanes = 0, vectorized along its positions;
// strided rows are taken a vector of inner values at a time, `lanes` of them.
template <typename T, typename Body>
void for_softmax_tasks(const SoftmaxRows& rows, const Body& body) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  const int64_t chunks = rows.inner == 1 ? 1 : (rows.inner + kWidth - 1) / kWidth;
  at::parallel_for(
      0, rows.outer * chunks, grain_for(rows.positions * kWidth), [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t row = task / chunks, first = task % chunks * kWidth;
          const int64_t lanes = rows.inner == 1 ? 0 : std::min(kWidth, rows.inner - first);
          body(row * rows.positions * rows.inner + first, rows.inner, lanes);
        }
      });
}

// totals = the sums over the positions of a contiguous row (lanes == 0: vec_at(p) gives the
// values of positions p .. p + Vec::size() - 1, scalar_at(p) those of the last positions) or
// of `lanes` strided values at once (vec_at(p) gives position p of every lane). Each block of
// kSumBlock positions is summed in a vector, then added to a double total per lane.
template <typename T, typename VecAt, typename ScalarAt>
void blocked_sums(int64_t positions, int64_t lanes, const VecAt& vec_at, const ScalarAt& scalar_at,
                  double* totals) {
  using Vec = at::vec::Vectorized<T>;
  alignas(64) T block_lanes[Vec::size()];
  const int64_t width = lanes == 0 ? 1 : lanes;
  for (int64_t l = 0; l < width; ++l) totals[l] = 0;
  for (int64_t block = 0; block < positions; block += kSumBlock) {
    const int64_t block_end = std::min(positions, block + kSumBlock);
    if (lanes == 0) {
      const int64_t vectors = (block_end - block) / Vec::size();
      const Vec sum = interleaved_sum(vectors, Vec(T(0)), [&](int64_t i, const Vec& partial) {
        return partial + vec_at(block + i * Vec::size());
      });
      T tail = 0;
      for (int64_t p = block + vectors * Vec::size(); p < block_end; ++p) tail += scalar_at(p);
      totals[0] += static_cast<double>(lane_sum(sum)) + static_cast<double>(tail);
    } else {
      Vec sum(T(0));
      for (int64_t p = block; p < block_end; ++p) sum = sum + vec_at(p);
      sum.store(block_lanes);
      for (int64_t l = 0; l < lanes; ++l) totals[l] += static_cast<double>(block_lanes[l]);
    }
  }
}

template <typename T>
void position_softmax_typed(const T* s, T* out, const SoftmaxRows& rows, T temperature, T factor) {
  using Vec = at::vec::Vectorized<T>;
  const bool divide = temperature != T(1);
  const Vec temperature_vec(temperature), factor_vec(factor);
  for_softmax_tasks<T>(rows, [&](int64_t offset, int64_t stride, int64_t lanes) {
    const T* in = s + offset;
    T* o = out + offset;
    const int64_t positions = rows.positions;
    alignas(64) T buffer[Vec::size()];
    // One vector of `lanes` values at position p (the unused lanes are zero).
    auto load_lanes = [&](const T* base, int64_t p) {
      if (lanes == Vec::size()) return Vec::loadu(base + p * stride);
      return Vec::loadu(base + p * stride, static_cast<int>(lanes));
    };
    auto store_lanes = [&](T* base, int64_t p, const Vec& v) {
      if (lanes == Vec::size()) {
        v.store(base + p * stride);
      } else {
        v.store(base + p * stride, static_cast<int>(lanes));
      }
    };
    // o = s / T, then the maximum of each lane.
    if (lanes == 0) {
      Vec best_vec(-std::numeric_limits<T>::infinity());
      T best = -std::numeric_limits<T>::infinity();
      int64_t p = 0;
      for (; p + Vec::size() <= positions; p += Vec::size()) {
        Vec z = Vec::loadu(in + p);
        if (divide) z = z / temperature_vec;
        z.store(o + p);
        best_vec = at::vec::maximum(best_vec, z);
      }
      for (; p < positions; ++p) {
        o[p] = divide ? in[p] / temperature : in[p];
        best = cpu::nan_max(o[p], best);
      }
      best = cpu::nan_max(cpu::lane_max(best_vec), best);
      const Vec best_broadcast(best);
      double total;
      blocked_sums<T>(
          positions, 0,
          [&](int64_t q) {
            const Vec e = (Vec::loadu(o + q) - best_broadcast).exp();
            e.store(o + q);
            return e;
          },
          [&](int64_t q) {
            o[q] = std::exp(o[q] - best);
            return o[q];
          },
          &total);
      const Vec inverse(static_cast<T>(1.0 / total));
      p = 0;
      for (; p + Vec::size() <= positions; p += Vec::size()) {
        (Vec::loadu(o + p) * inverse * factor_vec).store(o + p);
      }
      for (; p < positions; ++p) o[p] = o[p] * static_cast<T>(1.0 / total) * factor;
      return;
    }
    Vec best(-std::numeric_limits<T>::infinity());
    for (int64_t p = 0; p < positions; ++p) {
      Vec z = load_lanes(in, p);
      if (divide) z = z / temperature_vec;
      store_lanes(o, p, z);
      best = at::vec::maximum(best, z);
    }
    double totals[Vec::size()];
    blocked_sums<T>(
        positions, lanes,
        [&](int64_t q) {
          const Vec e = (load_lanes(o, q) - best).exp();
          store_lanes(o, q, e);
          return e;
        },
        [](int64_t) { return T(0); }, totals);
    for (int64_t l = 0; l < Vec::size(); ++l) {
      buffer[l] = l < lanes ? static_cast<T>(1.0 / totals[l]) : T(0);
    }
    const Vec inverse = Vec::loadu(buffer);
    for (int64_t p = 0; p < positions; ++p) {
      store_lanes(o, p, load_lanes(o, p) * inverse * factor_vec);
    }
  });
}

// grad_s = p * (grad_p - sum over positions of grad_p * p) / T, times `factor`
template <typename T>
void position_softmax_backward_typed(const T* grad_p, const T* p, T* out, const SoftmaxRows& rows,
                                     T temperature, T factor) {
  using Vec = at::vec::Vectorized<T>;
  for_softmax_tasks<T>(rows, [&](int64_t offset, int64_t stride, int64_t lanes) {
    const T* g = grad_p + offset;
    const T* a = p + offset;
    T* o = out + offset;
    const int64_t positions = rows.positions;
    auto load_lanes = [&](const T* base, int64_t q) {
      if (lanes == Vec::size()) return Vec::loadu(base + q * stride);
      return Vec::loadu(base + q * stride, static_cast<int>(lanes));
    };
    if (lanes == 0) {
      double dot;
      blocked_sums<T>(
          positions, 0, [&](int64_t q) { return Vec::loadu(g + q) * Vec::loadu(a + q); },
          [&](int64_t q) { return g[q] * a[q]; }, &dot);
      const T dot_value = static_cast<T>(dot);
      const Vec dot_vec(dot_value), temperature_vec(temperature), factor_vec(factor);
      int64_t q = 0;
      for (; q + Vec::size() <= positions; q += Vec::size()) {
        (Vec::loadu(a + q) * (Vec::loadu(g + q) - dot_vec) / temperature_vec * factor_vec)
            .store(o + q);
      }
      for (; q < positions; ++q) o[q] = a[q] * (g[q] - dot_value) / temperature * factor;
      return;
    }
    double dots[Vec::size()];
    blocked_sums<T>(
        positions, lanes, [&](int64_t q) { return load_lanes(g, q) * load_lanes(a, q); },
        [](int64_t) { return T(0); }, dots);
    alignas(64) T dot_lanes[Vec::size()];
    for (int64_t l = 0; l < Vec::size(); ++l) {
      dot_lanes[l] = l < lanes ? static_cast<T>(dots[l]) : T(0);
    }
    const Vec dot_vec = Vec::loadu(dot_lanes), temperature_vec(temperature), factor_vec(factor);
    for (int64_t q = 0; q < positions; ++q) {
      const Vec result =
          load_lanes(a, q) * (load_lanes(g, q) - dot_vec) / temperature_vec * factor_vec;
      if (lanes == Vec::size()) {
        result.store(o + q * stride);
      } else {
        result.store(o + q * stride, static_cast<int>(lanes));
      }
    }
  });
}

}  // namespace

at::Tensor position_softmax_cpu(const at::Tensor& s, double temperature, double factor,
                                Layout layout) {
  const at::Tensor in = to_layout(s, layout);
  at::Tensor out = at::empty_like(in);
  if (in.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "position_softmax_cpu", [&] {
    position_softmax_typed<scalar_t>(
        in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), softmax_rows_of(in, layout),
        static_cast<scalar_t>(temperature), static_cast<scalar_t>(factor));
  });
  return out;
}

at::Tensor position_softmax_backward_cpu(const at::Tensor& grad_p, const at::Tensor& p,
                                         double temperature, double factor, Layout layout) {
  const at::Tensor probabilities = to_layout(p, layout);
  const at::Tensor grad = to_layout(grad_p, layout);
  at::Tensor out = at::empty_like(probabilities);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "position_softmax_backward_cpu", [&] {
    position_softmax_backward_typed<scalar_t>(
        grad.const_data_ptr<scalar_t>(), probabilities.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), softmax_rows_of(out, layout), static_cast<scalar_t>(temperature),
        static_cast<scalar_t>(factor));
  });
  return out;
}

namespace {

// ---- Softmax weights computed where they are used (score maps with C channels) ----
//
// The weights w = P * exp(z - max) / sum, z = s / T, of each (sample, channel) row are never
// stored: sweeps find the rows' maxima and their sums of exponentials, and the last sweeps
// compute w where they use it (each exponential computed again, except in rows short enough to
// keep them in a buffer, kStoredExpPositions). Channels first a task
// is a row, vectorized along its positions, whose sweeps reread it from cache; its sums are
// vector sums within blocks of kSumBlock positions added up in double, as the stored softmax
// sums. Channels last a task is a run of positions of one sample, vectorized along the
// channels: each run's maximum and sum come from one task, and the runs are combined in order
// in double. The results do not depend on the number of threads.

template <typename scalar_t>
struct SoftmaxTerms {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  using opmath_t = typename V::opmath_t;
  opmath_t temperature;
  bool divide;  // s / 1 is s: no division where it changes nothing

  explicit SoftmaxTerms(double t) : temperature(static_cast<opmath_t>(t)), divide(t != 1.0) {}
  Vec z(const Vec& s) const { return divide ? s / Vec(temperature) : s; }
  opmath_t z(opmath_t s) const { return divide ? s / temperature : s; }
  // exp(z - best), the exponential of exp_u20 (see cpu/vec.h; exp(-inf) = 0, NaN stays NaN).
  Vec shifted_exp(const Vec& s, const Vec& best) const {
    return cpu::exp_u20_nonfinite(z(s) - best);
  }
  // The gradient of a score from its weight w, the gradient g reaching w * x, x, and its row's
  // D (the mean over positions of g * x * w): w (g x - D) / T.
  Vec score_gradient(const Vec& w, const Vec& g, const Vec& x, const Vec& d) const {
    const Vec gs = w * (g * x - d);
    return divide ? gs / Vec(temperature) : gs;
  }
};

// Rows of at most this many positions keep the exponentials exp(z - maximum) of their whole
// vector chunks, computed for the sum, in a buffer of the task (128 KB of float, in cache) for
// the sweeps that use the weights: one exponential per element instead of two or three. The
// sweeps compute the same values either way, so the results do not change with it.
constexpr int64_t kStoredExpPositions = 32768;
static_assert(kStoredExpPositions <= kSumBlock, "a stored row is one block of the sum");

// Rows (positions long) that a task reads next, prefetched while the sum of a row computes its
// exponentials: that sweep is bound by arithmetic, the sweeps that read these rows first would
// otherwise wait on memory.
template <typename scalar_t>
using PrefetchRows = std::array<const scalar_t*, 3>;

// Maximum and sum of exp(z - maximum) of one contiguous row; `exps` (positions long, or null)
// receives the exponentials of the whole vector chunks; the non-null rows of `prefetch` are
// prefetched.
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, double> row_softmax_stats(
    const scalar_t* s, int64_t positions, const SoftmaxTerms<scalar_t>& t,
    at::opmath_type<scalar_t>* exps, const PrefetchRows<scalar_t>& prefetch) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  using opmath_t = typename V::opmath_t;
  Vec best_vec(-std::numeric_limits<opmath_t>::infinity());
  opmath_t best = -std::numeric_limits<opmath_t>::infinity();
  int64_t p = 0;
  for (; p + V::size() <= positions; p += V::size()) {
    const auto chunk = V::load(s + p);
    for (int k = 0; k < V::kVecs; ++k) best_vec = at::vec::maximum(best_vec, t.z(chunk[k]));
  }
  for (; p < positions; ++p) best = cpu::nan_max(t.z(static_cast<opmath_t>(s[p])), best);
  if (positions >= V::size()) best = cpu::nan_max(cpu::lane_max(best_vec), best);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (exps != nullptr) {
      // The exponentials, the cost of this sweep, at the widest vectors the CPU has (each is
      // the same bits at any width), then summed here in the order of the loop below.
      const int64_t whole = positions / V::size() * V::size();
      CNN_ATTENTION_PER_ISA(shifted_exps)
      (s, whole, t.temperature, t.divide, best, prefetch.data(), exps);
      const Vec sum =
          interleaved_sum(whole / V::size(), Vec(opmath_t(0)), [&](int64_t i, const Vec& partial) {
            return partial + Vec::loadu(exps + i * V::size());
          });
      opmath_t tail = 0;
      for (p = whole; p < positions; ++p) {
        tail += std::exp(t.z(static_cast<opmath_t>(s[p])) - best);
      }
      return {best, static_cast<double>(lane_sum(sum)) + static_cast<double>(tail)};
    }
  }
  const Vec best_broadcast(best);
  double total = 0;
  for (int64_t block = 0; block < positions; block += kSumBlock) {
    const int64_t block_end = std::min(positions, block + kSumBlock);
    const int64_t vectors = (block_end - block) / V::size();
    const Vec sum = interleaved_sum(vectors, Vec(opmath_t(0)), [&](int64_t i, Vec partial) {
      const int64_t q = block + i * V::size();
      const auto chunk = V::load(s + q);
      for (const scalar_t* row : prefetch) {
        if (row != nullptr) __builtin_prefetch(row + q, 0, 2);
      }
      for (int k = 0; k < V::kVecs; ++k) {
        const Vec e = t.shifted_exp(chunk[k], best_broadcast);
        if (exps != nullptr) e.store(exps + q + k * Vec::size());
        partial = partial + e;
      }
      return partial;
    });
    opmath_t tail = 0;
    for (p = block + vectors * V::size(); p < block_end; ++p) {
      tail += std::exp(t.z(static_cast<opmath_t>(s[p])) - best);
    }
    total += static_cast<double>(lane_sum(sum)) + static_cast<double>(tail);
  }
  return {best, total};
}

template <typename scalar_t>
typename OpmathVec<scalar_t>::Chunk load_opmath_partial(const at::opmath_type<scalar_t>* data,
                                                        int64_t count) {
  using V = OpmathVec<scalar_t>;
  if (count == V::size()) return V::load_opmath(data);
  alignas(64) at::opmath_type<scalar_t> buffer[V::size()];
  std::fill_n(buffer, V::size(), at::opmath_type<scalar_t>(0));
  std::copy_n(data, count, buffer);
  return V::load_opmath(buffer);
}

template <typename scalar_t>
void store_opmath_partial(at::opmath_type<scalar_t>* data,
                          const typename OpmathVec<scalar_t>::Chunk& chunk, int64_t count) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  if (count == V::size()) {
    for (int k = 0; k < V::kVecs; ++k) chunk[k].store(data + k * Vec::size());
    return;
  }
  alignas(64) at::opmath_type<scalar_t> buffer[V::size()];
  for (int k = 0; k < V::kVecs; ++k) chunk[k].store(buffer + k * Vec::size());
  std::copy_n(buffer, count, data);
}

// fn(p, count, w) over a contiguous row: the weights w of positions p .. p + count - 1, V::size()
// at a time, the last ones in a partial chunk (load_partial), so that every position's weight is
// the same arithmetic. `exps` (or null) holds row_softmax_stats' exponentials of the whole chunks.
template <typename scalar_t, typename Fn>
void for_row_weights(const scalar_t* s, int64_t positions, const SoftmaxTerms<scalar_t>& t,
                     at::opmath_type<scalar_t> best, at::opmath_type<scalar_t> scale,
                     const at::opmath_type<scalar_t>* exps, const Fn& fn) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  const Vec best_broadcast(best), scale_broadcast(scale);
  for (int64_t p = 0; p < positions; p += V::size()) {
    const int64_t count = std::min(V::size(), positions - p);
    typename V::Chunk w;
    if (exps != nullptr && count == V::size()) {
      for (int k = 0; k < V::kVecs; ++k) {
        w[k] = Vec::loadu(exps + p + k * Vec::size()) * scale_broadcast;
      }
      fn(p, count, w);
      continue;
    }
    w = load_partial(s + p, count);
    for (int k = 0; k < V::kVecs; ++k) {
      w[k] = t.shifted_exp(w[k], best_broadcast) * scale_broadcast;
    }
    if (count < V::size()) {
      // The lanes past the row hold exp(-maximum), infinite for a very negative maximum: zero, so
      // that a product with them (zero-filled x) is not NaN.
      alignas(64) at::opmath_type<scalar_t> lanes[V::size()];
      store_opmath_partial<scalar_t>(lanes, w, V::size());
      w = load_opmath_partial<scalar_t>(lanes, count);
    }
    fn(p, count, w);
  }
}

// Values per task when the channels are the inner dim: a run of positions of one sample, all
// channels, small enough for the run's second read to come from cache.
constexpr int64_t kSoftmaxRunValues = 16384;

int64_t softmax_run_length(int64_t channels) {
  return std::max<int64_t>(1, kSoftmaxRunValues / std::max<int64_t>(channels, 1));
}

int64_t softmax_runs(int64_t positions, int64_t channels) {
  const int64_t length = softmax_run_length(channels);
  return (positions + length - 1) / length;
}

// fn(n, run, first position, end position) for the runs of every sample, in parallel.
template <typename Fn>
void for_position_runs(int64_t batch, int64_t positions, int64_t channels, const Fn& fn) {
  const int64_t length = softmax_run_length(channels);
  const int64_t runs = softmax_runs(positions, channels);
  at::parallel_for(0, batch * runs, grain_for(length * channels), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / runs, run = task % runs;
      const int64_t first = run * length;
      fn(n, run, first, std::min(positions, first + length));
    }
  });
}

// fn(c, count) over the channels of a position, V::size() at a time (the last chunk partial).
template <typename scalar_t, typename Fn>
void for_channel_chunks(int64_t channels, const Fn& fn) {
  using V = OpmathVec<scalar_t>;
  for (int64_t c = 0; c < channels; c += V::size()) fn(c, std::min(V::size(), channels - c));
}

// Channels last: each (sample, channel)'s maximum of z and P / (sum of exp(z - maximum)), (N, C)
// each, so that w = exp(z - best) * scale. One sweep of tasks finds each run's maximum and its sum
// of exp(z - run maximum) (the run's second read comes from cache); the runs are then combined in
// order, each sum rescaled by exp(run maximum - maximum) in double.
template <typename scalar_t>
void channels_last_softmax(const scalar_t* s, int64_t batch, int64_t positions, int64_t channels,
                           const SoftmaxTerms<scalar_t>& t,
                           std::vector<at::opmath_type<scalar_t>>& best,
                           std::vector<at::opmath_type<scalar_t>>& scale) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  constexpr opmath_t kLowest = -std::numeric_limits<opmath_t>::infinity();
  const int64_t runs = softmax_runs(positions, channels);
  std::vector<opmath_t> run_best(batch * runs * channels), run_sum(batch * runs * channels);
  auto run_statistics = [&](int64_t n, int64_t run, int64_t first, int64_t last) {
    opmath_t* maxima = run_best.data() + (n * runs + run) * channels;
    opmath_t* sums = run_sum.data() + (n * runs + run) * channels;
    std::fill_n(maxima, channels, kLowest);
    std::fill_n(sums, channels, opmath_t(0));
    for (int64_t p = first; p < last; ++p) {
      const scalar_t* sp = s + (n * positions + p) * channels;
      for_channel_chunks<scalar_t>(channels, [&](int64_t c, int64_t count) {
        const auto chunk = load_partial(sp + c, count);
        auto m = load_opmath_partial<scalar_t>(maxima + c, count);
        for (int k = 0; k < V::kVecs; ++k) m[k] = at::vec::maximum(m[k], t.z(chunk[k]));
        store_opmath_partial<scalar_t>(maxima + c, m, count);
      });
    }
    for (int64_t p = first; p < last; ++p) {
      const scalar_t* sp = s + (n * positions + p) * channels;
      for_channel_chunks<scalar_t>(channels, [&](int64_t c, int64_t count) {
        const auto chunk = load_partial(sp + c, count);
        const auto m = load_opmath_partial<scalar_t>(maxima + c, count);
        auto sum = load_opmath_partial<scalar_t>(sums + c, count);
        for (int k = 0; k < V::kVecs; ++k) sum[k] = sum[k] + t.shifted_exp(chunk[k], m[k]);
        store_opmath_partial<scalar_t>(sums + c, sum, count);
      });
    }
  };
  for_position_runs(batch, positions, channels, run_statistics);
  best.resize(batch * channels);
  scale.resize(batch * channels);
  at::parallel_for(0, batch * channels, grain_for(runs), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / channels, c = row % channels;
      opmath_t m = kLowest;
      for (int64_t run = 0; run < runs; ++run) {
        m = cpu::nan_max(run_best[(n * runs + run) * channels + c], m);
      }
      double total = 0;
      for (int64_t run = 0; run < runs; ++run) {
        const int64_t i = (n * runs + run) * channels + c;
        // A run whose scores are all -inf adds nothing (its own sum, exp(-inf - -inf), is NaN);
        // with every score -inf the row stays NaN, as the two-sweep softmax gives.
        if (run_best[i] == kLowest && m != kLowest) continue;
        total += static_cast<double>(run_sum[i]) *
                 std::exp(static_cast<double>(run_best[i]) - static_cast<double>(m));
      }
      best[row] = m;
      scale[row] = static_cast<opmath_t>(static_cast<double>(positions) / total);
    }
  });
}

// Channels first: fn(offset of the row, best, scale, exps) for every row of s, in parallel, with
// the row's statistics, so that its weights are w = exp(z - best) * scale, and its stored
// exponentials (for for_row_weights; null for rows too long to keep them). `inputs` (null or
// laid out like s) are the other maps fn reads.
template <typename scalar_t, typename Fn>
void for_softmax_rows(const scalar_t* s, int64_t rows, int64_t positions,
                      const SoftmaxTerms<scalar_t>& t, const std::array<const scalar_t*, 2>& inputs,
                      const Fn& fn) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, grain_for(positions), [&](int64_t begin, int64_t end) {
    // A row that stays in cache: its exponentials stored, and while they are computed, fn's
    // rows of this row and the next row's scores prefetched.
    const bool short_rows = positions <= kStoredExpPositions;
    std::vector<opmath_t> stored(short_rows ? positions : 0);
    opmath_t* exps = short_rows ? stored.data() : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * positions;
      PrefetchRows<scalar_t> prefetch{};
      if (short_rows) {
        if (row + 1 < end) prefetch[0] = s + offset + positions;
        for (size_t i = 0; i < inputs.size(); ++i) {
          if (inputs[i] != nullptr) prefetch[i + 1] = inputs[i] + offset;
        }
      }
      const auto [best, total] = row_softmax_stats(s + offset, positions, t, exps, prefetch);
      fn(offset, best, static_cast<opmath_t>(static_cast<double>(positions) / total),
         static_cast<const opmath_t*>(exps));
    }
  });
}

// Channels last: the weights of the lane chunk at `offset` (channel c of sample n onwards).
// Forced inline: as a call per chunk of lanes it made the channels-last sweeps a quarter slower.
template <typename scalar_t>
C10_ALWAYS_INLINE typename OpmathVec<scalar_t>::Chunk channels_last_weights(
    const scalar_t* s, const SoftmaxTerms<scalar_t>& t,
    const std::vector<at::opmath_type<scalar_t>>& best,
    const std::vector<at::opmath_type<scalar_t>>& scale, int64_t row, int64_t offset,
    int64_t count) {
  using V = OpmathVec<scalar_t>;
  const auto b = load_opmath_partial<scalar_t>(best.data() + row, count);
  const auto f = load_opmath_partial<scalar_t>(scale.data() + row, count);
  auto w = load_partial(s + offset, count);
  for (int k = 0; k < V::kVecs; ++k) w[k] = t.shifted_exp(w[k], b[k]) * f[k];
  return w;
}

// Channels first: the sum over a row's positions of values(p, count) * w, vector sums within
// blocks of kSumBlock positions added up in double.
template <typename scalar_t, typename Values>
double row_weighted_sum(const scalar_t* s, int64_t positions, const SoftmaxTerms<scalar_t>& t,
                        at::opmath_type<scalar_t> best, at::opmath_type<scalar_t> scale,
                        const at::opmath_type<scalar_t>* exps, const Values& values) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  double total = 0;
  Vec sum(at::opmath_type<scalar_t>(0));
  for_row_weights(s, positions, t, best, scale, exps, [&](int64_t p, int64_t count, const auto& w) {
    const auto v = values(p, count);
    for (int k = 0; k < V::kVecs; ++k) sum = at::vec::fmadd(v[k], w[k], sum);
    if ((p + V::size()) % kSumBlock == 0) {
      total += static_cast<double>(lane_sum(sum));
      sum = Vec(at::opmath_type<scalar_t>(0));
    }
  });
  return total + static_cast<double>(lane_sum(sum));
}

// Channels first: y = x * w along one row, w from the row's softmax statistics. Like
// softmax_row_backward, the row's pointers are the function's own values.
template <typename scalar_t>
void softmax_row_scale(const scalar_t* s, const scalar_t* x, int64_t positions,
                       const SoftmaxTerms<scalar_t> t, at::opmath_type<scalar_t> best,
                       at::opmath_type<scalar_t> scale, const at::opmath_type<scalar_t>* exps,
                       scalar_t* y) {
  using V = OpmathVec<scalar_t>;
  for_row_weights(s, positions, t, best, scale, exps, [&](int64_t p, int64_t count, const auto& w) {
    auto values = load_partial(x + p, count);
    for (int k = 0; k < V::kVecs; ++k) values[k] = values[k] * w[k];
    store_partial(y + p, values, count);
  });
}

// Channels first: grad_x and grad_s of one row (see softmax_scale_by_scores_backward_typed) from
// its softmax statistics. `grad` is the row's gradient, or null where every position's is
// `pooled_grad`. The row's pointers and flags are this function's own values: reached through
// references into the caller's frame, they were loaded again after every vector store (a
// vector store may alias anything).
template <typename scalar_t>
void softmax_row_backward(const scalar_t* s, const scalar_t* x, const scalar_t* grad,
                          at::opmath_type<scalar_t> pooled_grad, int64_t positions,
                          const SoftmaxTerms<scalar_t> t, at::opmath_type<scalar_t> best,
                          at::opmath_type<scalar_t> scale, const at::opmath_type<scalar_t>* exps,
                          scalar_t* grad_x, scalar_t* grad_s) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  using opmath_t = typename V::opmath_t;
  // The gradient of positions p .. p + count - 1; lanes past `count` are zero.
  const auto grad_chunk = [grad, pooled_grad](int64_t p, int64_t count) {
    if (grad != nullptr) return load_partial(grad + p, count);
    typename V::Chunk g;
    g.fill(Vec(pooled_grad));
    if (count == V::size()) return g;
    alignas(64) opmath_t lanes[V::size()];
    std::fill_n(lanes, V::size(), pooled_grad);
    return load_opmath_partial<scalar_t>(lanes, count);
  };
  const double dot =
      row_weighted_sum(s, positions, t, best, scale, exps, [&](int64_t p, int64_t count) {
        auto g = grad_chunk(p, count);
        const auto values = load_partial(x + p, count);
        for (int k = 0; k < V::kVecs; ++k) g[k] = g[k] * values[k];
        return g;
      });
  // grad_x = grad * w; grad_s from SoftmaxTerms::score_gradient.
  const Vec d(static_cast<opmath_t>(dot / static_cast<double>(positions)));
  for_row_weights(s, positions, t, best, scale, exps, [&](int64_t p, int64_t count, const auto& w) {
    const auto g = grad_chunk(p, count);
    const auto values = load_partial(x + p, count);
    typename V::Chunk gx, gs;
    for (int k = 0; k < V::kVecs; ++k) {
      gx[k] = g[k] * w[k];
      gs[k] = t.score_gradient(w[k], g[k], values[k], d);
    }
    store_partial(grad_x + p, gx, count);
    store_partial(grad_s + p, gs, count);
  });
}

// Channels last: for each (sample, channel), the mean over positions of values(n, offset, c,
// count) * w (weights(n, offset, c, count)), each run's sums kept apart and combined in run
// order in double.
template <typename scalar_t, typename Weights, typename Values>
std::vector<at::opmath_type<scalar_t>> channels_last_weighted_means(int64_t batch,
                                                                    int64_t positions,
                                                                    int64_t channels,
                                                                    const Weights& weights,
                                                                    const Values& values) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  const int64_t runs = softmax_runs(positions, channels);
  std::vector<opmath_t> run_sums(batch * runs * channels);
  for_position_runs(batch, positions, channels,
                    [&](int64_t n, int64_t run, int64_t first, int64_t last) {
                      opmath_t* sums = run_sums.data() + (n * runs + run) * channels;
                      std::fill_n(sums, channels, opmath_t(0));
                      for (int64_t p = first; p < last; ++p) {
                        const int64_t offset = (n * positions + p) * channels;
                        for_channel_chunks<scalar_t>(channels, [&](int64_t c, int64_t count) {
                          const auto w = weights(n, offset, c, count);
                          const auto v = values(n, offset, c, count);
                          auto sum = load_opmath_partial<scalar_t>(sums + c, count);
                          for (int k = 0; k < V::kVecs; ++k)
                            sum[k] = at::vec::fmadd(v[k], w[k], sum[k]);
                          store_opmath_partial<scalar_t>(sums + c, sum, count);
                        });
                      }
                    });
  std::vector<opmath_t> means(batch * channels);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      double total = 0;
      for (int64_t run = 0; run < runs; ++run) {
        total += static_cast<double>(run_sums[(n * runs + run) * channels + c]);
      }
      means[n * channels + c] = static_cast<opmath_t>(total / static_cast<double>(positions));
    }
  }
  return means;
}

// y = x * w, or with `pooled` (y is (N, C)) the mean over the positions of x * w.
template <typename scalar_t>
void softmax_scale_by_scores_typed(const scalar_t* x, const scalar_t* s, scalar_t* y,
                                   const SweepExtent& e, double temperature, Layout layout,
                                   bool pooled) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  const SoftmaxTerms<scalar_t> t(temperature);
  const int64_t P = e.positions, C = e.channels;
  if (pooled) {
    if (layout == Layout::ChannelsFirst) {
      for_softmax_rows(
          s, e.batch * C, P, t, {x, nullptr},
          [&](int64_t offset, opmath_t best, opmath_t scale, const opmath_t* exps) {
            const double sum = row_weighted_sum(
                s + offset, P, t, best, scale, exps,
                [&](int64_t p, int64_t count) { return load_partial(x + offset + p, count); });
            y[offset / P] =
                static_cast<scalar_t>(static_cast<opmath_t>(sum / static_cast<double>(P)));
          });
      return;
    }
    std::vector<opmath_t> best, scale;
    channels_last_softmax(s, e.batch, P, C, t, best, scale);
    const std::vector<opmath_t> means = channels_last_weighted_means<scalar_t>(
        e.batch, P, C,
        [&](int64_t n, int64_t offset, int64_t c, int64_t count) {
          return channels_last_weights(s, t, best, scale, n * C + c, offset + c, count);
        },
        [&](int64_t, int64_t offset, int64_t c, int64_t count) {
          return load_partial(x + offset + c, count);
        });
    for (int64_t row = 0; row < e.batch * C; ++row) y[row] = static_cast<scalar_t>(means[row]);
    return;
  }
  if (layout == Layout::ChannelsFirst) {
    for_softmax_rows(s, e.batch * C, P, t, {x, nullptr},
                     [&](int64_t offset, opmath_t best, opmath_t scale, const opmath_t* exps) {
                       softmax_row_scale(s + offset, x + offset, P, t, best, scale, exps,
                                         y + offset);
                     });
    return;
  }
  std::vector<opmath_t> best, scale;
  channels_last_softmax(s, e.batch, P, C, t, best, scale);
  for_position_runs(e.batch, P, C, [&](int64_t n, int64_t, int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t offset = (n * P + p) * C;
      for_channel_chunks<scalar_t>(C, [&](int64_t c, int64_t count) {
        const auto w = channels_last_weights(s, t, best, scale, n * C + c, offset + c, count);
        auto values = load_partial(x + offset + c, count);
        for (int k = 0; k < V::kVecs; ++k) values[k] = values[k] * w[k];
        store_partial(y + offset + c, values, count);
      });
    }
  });
}

// With `pooled`, grad is (N, C), the gradient of the mean over the positions of x * w: grad / P
// at every position.
template <typename scalar_t>
void softmax_scale_by_scores_backward_typed(const scalar_t* grad, const scalar_t* x,
                                            const scalar_t* s, scalar_t* grad_x, scalar_t* grad_s,
                                            const SweepExtent& e, double temperature, Layout layout,
                                            bool pooled) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  const SoftmaxTerms<scalar_t> t(temperature);
  const int64_t P = e.positions, C = e.channels;
  std::vector<opmath_t> row_grad(pooled ? e.batch * C : 0);
  for (size_t row = 0; row < row_grad.size(); ++row) {
    row_grad[row] = static_cast<opmath_t>(grad[row]) / static_cast<opmath_t>(P);
  }
  if (layout == Layout::ChannelsFirst) {
    for_softmax_rows(s, e.batch * C, P, t, {pooled ? nullptr : grad, x},
                     [&](int64_t offset, opmath_t best, opmath_t scale, const opmath_t* exps) {
                       softmax_row_backward(s + offset, x + offset,
                                            pooled ? nullptr : grad + offset,
                                            pooled ? row_grad[offset / P] : opmath_t(0), P, t, best,
                                            scale, exps, grad_x + offset, grad_s + offset);
                     });
    return;
  }
  // Channels last: the gradient of the elements offset .. offset + count - 1, channels c onwards
  // of sample n; lanes past `count` are zero.
  auto grad_at = [&](int64_t n, int64_t c, int64_t offset, int64_t count) {
    if (!pooled) return load_partial(grad + offset, count);
    return load_opmath_partial<scalar_t>(row_grad.data() + n * C + c, count);
  };
  // grad_x = grad * w; grad_s = w * (grad * x - D) / T, D = sum over positions of grad * x * w / P.
  auto write = [&](int64_t n, int64_t c, int64_t offset, int64_t count, const typename V::Chunk& w,
                   const typename V::Chunk& d) {
    const auto g = grad_at(n, c, offset, count);
    const auto values = load_partial(x + offset, count);
    typename V::Chunk gx, gs;
    for (int k = 0; k < V::kVecs; ++k) {
      gx[k] = g[k] * w[k];
      gs[k] = t.score_gradient(w[k], g[k], values[k], d[k]);
    }
    store_partial(grad_x + offset, gx, count);
    store_partial(grad_s + offset, gs, count);
  };
  // grad * x, lanes past `count` zero.
  auto grad_times_x = [&](int64_t n, int64_t c, int64_t offset, int64_t count) {
    auto g = grad_at(n, c, offset, count);
    const auto values = load_partial(x + offset, count);
    for (int k = 0; k < V::kVecs; ++k) g[k] = g[k] * values[k];
    return g;
  };
  std::vector<opmath_t> best, scale;
  channels_last_softmax(s, e.batch, P, C, t, best, scale);
  auto weights_at = [&](int64_t n, int64_t offset, int64_t c, int64_t count) {
    return channels_last_weights(s, t, best, scale, n * C + c, offset + c, count);
  };
  const std::vector<opmath_t> mean_dot = channels_last_weighted_means<scalar_t>(
      e.batch, P, C, weights_at, [&](int64_t n, int64_t offset, int64_t c, int64_t count) {
        return grad_times_x(n, c, offset + c, count);
      });
  for_position_runs(e.batch, P, C, [&](int64_t n, int64_t, int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t offset = (n * P + p) * C;
      for_channel_chunks<scalar_t>(C, [&](int64_t c, int64_t count) {
        write(n, c, offset + c, count, weights_at(n, offset, c, count),
              load_opmath_partial<scalar_t>(mean_dot.data() + n * C + c, count));
      });
    }
  });
}

void softmax_scale_by_scores_cpu(const at::Tensor& x, const at::Tensor& scores, double temperature,
                                 at::Tensor& y, Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "soft_attention_softmax_by_scores_cpu", [&] {
        softmax_scale_by_scores_typed(x.const_data_ptr<scalar_t>(),
                                      scores.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                      sweep_extent_of(x, scores), temperature, layout,
                                      /*pooled=*/y.dim() == 2);
      });
}

void softmax_scale_by_scores_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& scores, double temperature,
                                          at::Tensor& grad_x, at::Tensor& grad_scores,
                                          Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "soft_attention_softmax_by_scores_backward_cpu",
      [&] {
        softmax_scale_by_scores_backward_typed(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            scores.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
            grad_scores.data_ptr<scalar_t>(), sweep_extent_of(x, scores), temperature, layout,
            /*pooled=*/grad.dim() == 2);
      });
}

// ATen's CPU sigmoid splits its work by the number of threads, and its vector and scalar
// paths round differently, so the weights would change in the last bit with the thread
// count. The batch is therefore cut into blocks whose size depends on the shape alone, each
// computed serially (ATen calls inside at::parallel_for do not fork again): the result depends
// on the input alone. The worker threads get the caller's thread-local state (below autograd,
// grad mode), as at::launch does.
at::Tensor position_sigmoid_cpu(const at::Tensor& s, double temperature) {
  const int64_t batch = s.size(0);
  if (batch == 0) return aten_position_sigmoid(s, temperature);
  constexpr int64_t kBlockElements = 32768;
  const int64_t per_sample = std::max<int64_t>(1, s.numel() / batch);
  const int64_t block = std::max<int64_t>(1, kBlockElements / per_sample);
  at::Tensor out = at::empty_like(s);
  const at::ThreadLocalState caller;
  at::parallel_for(0, (batch + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * block, count = std::min(batch, n0 + block) - n0;
      out.narrow(0, n0, count).copy_(aten_position_sigmoid(s.narrow(0, n0, count), temperature));
    }
  });
  return out;
}

constexpr SpatialAttentionBackend kCpuBackend{scale_cpu,
                                              scale_backward_cpu,
                                              pool_cpu,
                                              top_k_mask_cpu,
                                              position_sigmoid_cpu,
                                              position_softmax_cpu,
                                              position_softmax_backward_cpu,
                                              /*reads_strided_rows=*/true,
                                              scale_by_scores_cpu,
                                              scale_by_scores_backward_cpu,
                                              softmax_scale_by_scores_cpu,
                                              softmax_scale_by_scores_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) { register_spatial_attention_kernels<kCpuBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
