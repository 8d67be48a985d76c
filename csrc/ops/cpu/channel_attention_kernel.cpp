#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../channel_attention_impl.h"
#include "gemm.h"
#include "position_softmax.h"
#include "vec.h"

namespace cnn_attention {
namespace ops {

namespace {

using cpu::grain_for;
using cpu::interleaved_sum;
using cpu::kPositionBlock;
using cpu::lane_max;
using cpu::lane_sum;
using cpu::nan_max;
using cpu::OpmathVec;
using cpu::replaces_max;

// Positions per task when channels are the innermost dim.
constexpr int64_t kPositionChunk = 256;
// Independent accumulator vectors per row when positions are the inner dim.
constexpr int kChains = 4;

// The inverse of an (N, K) map of indices into [0, M): for sample n and value m, the k with
// map[n, k] == m, in ascending order. The argmax terms of a sweep use it to reach the elements
// they touch while the sweep holds that row in cache, instead of after it, in scattered order.
class InverseIndex {
 public:
  InverseIndex(const int64_t* map, int64_t batch, int64_t size, int64_t values)
      : values_(values), size_(size), offsets_(batch * (values + 1), 0), keys_(batch * size) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t* row = map + n * size;
        int64_t* offsets = offsets_.data() + n * (values + 1);
        for (int64_t k = 0; k < size; ++k) ++offsets[row[k] + 1];
        for (int64_t m = 0; m < values; ++m) offsets[m + 1] += offsets[m];
        std::vector<int64_t> next(offsets, offsets + values);
        int64_t* keys = keys_.data() + n * size;
        for (int64_t k = 0; k < size; ++k) keys[next[row[k]]++] = k;
      }
    });
  }

  // Calls f(k) for each k of sample n whose value is m, in ascending order.
  template <typename F>
  void for_each(int64_t n, int64_t m, F f) const {
    const int64_t* offsets = offsets_.data() + n * (values_ + 1);
    const int64_t* keys = keys_.data() + n * size_;
    for (int64_t i = offsets[m]; i < offsets[m + 1]; ++i) f(keys[i]);
  }

 private:
  int64_t values_, size_;
  std::vector<int64_t> offsets_, keys_;
};

// With `grad_scale`, also grad_x = grad_y * grad_scale[row] (the sweep reads grad_y anyway).
template <typename scalar_t>
struct ScaledGrad {
  const at::opmath_type<scalar_t>* scale;  // (N, C), or null: nothing to write
  scalar_t* out;                           // laid out like grad_y
};

// The vector part of one row's sweep in reduce_channels_first: the lanes' sums, maxima and
// (kWithGrad) dot products with grad_y over the row's first `end` positions (whole vectors),
// and (kWithOut) out = grad_y * scale there. A function of its own, with the row's options as
// template arguments: inlined into the parallel loop's body with run-time options, GCC kept
// the chains' accumulators on the stack, a store and a load on every add's dependency chain
// (the pooling pass ran at a third of ATen's mean).
template <typename scalar_t>
struct RowLanes {
  using Vec = typename OpmathVec<scalar_t>::Vec;
  Vec sum, max, dot;
  int64_t end;
};

template <typename scalar_t, bool kWithGrad, bool kWithOut>
C10_NOINLINE RowLanes<scalar_t> reduce_row_lanes(const scalar_t* xr, const scalar_t* gr,
                                                 scalar_t* out, at::opmath_type<scalar_t> scale,
                                                 int64_t positions) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  // kChains independent accumulators, so the adds are not one serial dependency chain.
  Vec vmax[kChains];
  for (int chain = 0; chain < kChains; ++chain) {
    vmax[chain] = Vec(-std::numeric_limits<opmath_t>::infinity());
  }
  Vec total_sum(opmath_t(0)), total_dot(opmath_t(0));
  int64_t p = 0;
  // Sums in blocks of kSumBlock positions (see common.h): rows of 2^29 positions and
  // more (2^24 per lane) would otherwise stall.
  while (p + kChains * V::size() <= positions) {
    const int64_t block_end = std::min(positions, p + kSumBlock);
    Vec vsum[kChains], vdot[kChains];
    for (int chain = 0; chain < kChains; ++chain) {
      vsum[chain] = Vec(opmath_t(0));
      vdot[chain] = Vec(opmath_t(0));
    }
    for (; p + kChains * V::size() <= block_end; p += kChains * V::size()) {
      for (int chain = 0; chain < kChains; ++chain) {
        const auto chunk = V::load(xr + p + chain * V::size());
        for (int k = 0; k < V::kVecs; ++k) {
          vsum[chain] += chunk[k];
          vmax[chain] = at::vec::maximum(vmax[chain], chunk[k]);
        }
        if constexpr (kWithGrad) {
          auto grad = V::load(gr + p + chain * V::size());
          for (int k = 0; k < V::kVecs; ++k) {
            vdot[chain] = at::vec::fmadd(chunk[k], grad[k], vdot[chain]);
          }
          if constexpr (kWithOut) {
            for (int k = 0; k < V::kVecs; ++k) grad[k] = grad[k] * Vec(scale);
            V::store(out + p + chain * V::size(), grad);
          }
        }
      }
    }
    for (int chain = 1; chain < kChains; ++chain) {
      vsum[0] += vsum[chain];
      vdot[0] += vdot[chain];
    }
    total_sum += vsum[0];
    total_dot += vdot[0];
  }
  for (int chain = 1; chain < kChains; ++chain) {
    vmax[0] = at::vec::maximum(vmax[0], vmax[chain]);
  }
  // The last vectors, fewer than the chains hold: rows of deep stages (16 or 49
  // positions) are shorter than one round of the chains.
  for (; p + V::size() <= positions; p += V::size()) {
    const auto chunk = V::load(xr + p);
    for (int k = 0; k < V::kVecs; ++k) {
      total_sum += chunk[k];
      vmax[0] = at::vec::maximum(vmax[0], chunk[k]);
    }
    if constexpr (kWithGrad) {
      auto grad = V::load(gr + p);
      for (int k = 0; k < V::kVecs; ++k) {
        total_dot = at::vec::fmadd(chunk[k], grad[k], total_dot);
      }
      if constexpr (kWithOut) {
        for (int k = 0; k < V::kVecs; ++k) grad[k] = grad[k] * Vec(scale);
        V::store(out + p, grad);
      }
    }
  }
  return {total_sum, vmax[0], total_dot, p};
}

// The sum and maximum of each of Vec::size() short rows (the maps of deep stages), float or
// double, the rows `positions` apart. A row's own sweep costs a call and two reductions across
// the lanes, which on rows of a few vectors took several times the time of reading them. Here
// the group's rows are transposed into `buffer`, so that one vector holds one position of every
// row, and each row's sum is made of exactly the adds its own sweep makes (reduce_row_lanes:
// each lane's kChains chains over the whole rounds, their sum, the vectors after the rounds;
// then the lanes in order, then the positions past the last vector): the same bits.
template <typename scalar_t>
void reduce_row_group(const scalar_t* x, int64_t positions, scalar_t* buffer, scalar_t* mean,
                      scalar_t* max) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  cpu::transpose_rows(x, positions, kLanes, positions, buffer, kLanes);
  const auto at_position = [buffer](int64_t p) { return Vec::loadu(buffer + p * kLanes); };
  constexpr int64_t kRound = kChains * kLanes;
  const int64_t rounds = positions / kRound;
  const int64_t vector_end = positions / kLanes * kLanes;
  Vec sum(scalar_t(0));
  for (int64_t lane = 0; vector_end > 0 && lane < kLanes; ++lane) {
    Vec lane_sum(scalar_t(0));
    if (rounds > 0) {
      static_assert(kChains == 4);
      Vec c0(scalar_t(0)), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t round = 0; round < rounds; ++round) {
        const int64_t p = round * kRound + lane;
        c0 = c0 + at_position(p);
        c1 = c1 + at_position(p + kLanes);
        c2 = c2 + at_position(p + 2 * kLanes);
        c3 = c3 + at_position(p + 3 * kLanes);
      }
      lane_sum = lane_sum + (((c0 + c1) + c2) + c3);
    }
    for (int64_t p = rounds * kRound + lane; p < vector_end; p += kLanes) {
      lane_sum = lane_sum + at_position(p);
    }
    sum = sum + lane_sum;
  }
  for (int64_t p = vector_end; p < positions; ++p) sum = sum + at_position(p);
  // A maximum is exact in any order: even and odd positions side by side.
  Vec even(-std::numeric_limits<scalar_t>::infinity()), odd = even;
  int64_t p = 0;
  for (; p + 1 < positions; p += 2) {
    even = at::vec::maximum(even, at_position(p));
    odd = at::vec::maximum(odd, at_position(p + 1));
  }
  if (p < positions) even = at::vec::maximum(even, at_position(p));
  (sum / Vec(static_cast<scalar_t>(positions))).store(mean);
  at::vec::maximum(even, odd).store(max);
}

// (N, C, P): one task per run of (n, c) rows, each row contiguous; short rows of float or
// double in groups (reduce_row_group) where the sweep reads x alone.
template <typename scalar_t>
void reduce_channels_first(const scalar_t* x, const scalar_t* grad_y, int64_t rows,
                           int64_t positions, bool with_argmax, ChannelStats& stats,
                           ScaledGrad<scalar_t> scaled) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  opmath_t* mean = stats.mean.data_ptr<opmath_t>();
  opmath_t* max = stats.max.data_ptr<opmath_t>();
  opmath_t* grad_dot = grad_y ? stats.grad_dot.data_ptr<opmath_t>() : nullptr;
  int64_t* argmax = with_argmax ? stats.argmax.data_ptr<int64_t>() : nullptr;
  // Rows [0, grouped) in groups, the rest (fewer than a group, or all) each on its own.
  int64_t grouped = 0;
  constexpr int64_t kGroupRows = at::vec::Vectorized<opmath_t>::size();
  // Up to two rounds of reduce_row_lanes's chains (64 floats, 32 doubles: maps of 8 x 8 and
  // smaller); longer rows measured no faster in groups (7 x 7: 0.9x of the row-by-row time
  // of an SE block's statistics and gate; 8 x 8: 0.98x; 9 x 9: 1.0x; 11 x 11: 1.2x).
  constexpr int64_t kShortRow = 2 * kChains * kGroupRows;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (grad_y == nullptr && positions <= kShortRow) {
      const int64_t groups = rows / kGroupRows;
      grouped = groups * kGroupRows;
      at::parallel_for(
          0, groups, grain_for(positions * kGroupRows), [&](int64_t begin, int64_t end) {
            std::vector<scalar_t> buffer(positions * kGroupRows);
            for (int64_t group = begin; group < end; ++group) {
              const int64_t first = group * kGroupRows;
              reduce_row_group(x + first * positions, positions, buffer.data(), mean + first,
                               max + first);
              for (int64_t row = first; argmax && row < first + kGroupRows; ++row) {
                argmax[row] = cpu::first_index_of(x + row * positions, positions, max[row]);
              }
            }
          });
    }
  }
  const int64_t grain = grain_for(positions);
  at::parallel_for(grouped, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * positions;
      const scalar_t* gr = grad_y ? grad_y + row * positions : nullptr;
      scalar_t* out = scaled.scale ? scaled.out + row * positions : nullptr;
      const opmath_t scale = scaled.scale ? scaled.scale[row] : opmath_t(0);
      const RowLanes<scalar_t> lanes =
          !gr    ? reduce_row_lanes<scalar_t, false, false>(xr, gr, out, scale, positions)
          : !out ? reduce_row_lanes<scalar_t, true, false>(xr, gr, out, scale, positions)
                 : reduce_row_lanes<scalar_t, true, true>(xr, gr, out, scale, positions);
      int64_t p = lanes.end;
      // Rows shorter than a vector (1x1 maps) skip the lane reductions of vectors never used.
      const bool vectors = p > 0;
      opmath_t sum = vectors ? lane_sum(lanes.sum) : opmath_t(0);
      opmath_t best = vectors ? lane_max(lanes.max) : -std::numeric_limits<opmath_t>::infinity();
      opmath_t dot = vectors && gr ? lane_sum(lanes.dot) : opmath_t(0);
      for (; p < positions; ++p) {
        const opmath_t v = static_cast<opmath_t>(xr[p]);
        sum += v;
        best = nan_max(best, v);
        if (gr) dot += v * static_cast<opmath_t>(gr[p]);
        if (out) out[p] = static_cast<scalar_t>(static_cast<opmath_t>(gr[p]) * scale);
      }
      mean[row] = sum / static_cast<opmath_t>(positions);
      max[row] = best;
      if (grad_dot) grad_dot[row] = dot;
      // The row was just read, so finding the first maximum costs a pass over cache.
      if (argmax) argmax[row] = cpu::first_index_of(xr, positions, best);
    }
  });
}

// (N, P, C): one task per (n, run of kPositionChunk positions) accumulates every channel
// of its positions into its own partial statistics (a row of C values, vectorized over the
// contiguous channels and kept in L1); the partials of a sample are then combined in chunk
// order, so the result does not depend on the number of threads.
template <typename scalar_t>
void reduce_channels_last(const scalar_t* x, const scalar_t* grad_y, int64_t batch,
                          int64_t channels, int64_t positions, bool with_argmax,
                          ChannelStats& stats, ScaledGrad<scalar_t> scaled) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  constexpr int64_t kLanes = Vec::size();
  constexpr int kAllLanes = (1 << kLanes) - 1;
  constexpr opmath_t kLowest = -std::numeric_limits<opmath_t>::infinity();
  const int64_t chunks = (positions + kPositionChunk - 1) / kPositionChunk;
  const int64_t parts = batch * chunks;
  std::vector<opmath_t> part_sum(parts * channels), part_best(parts * channels);
  std::vector<opmath_t> part_dot(grad_y ? parts * channels : 0);
  std::vector<int64_t> part_where(with_argmax ? parts * channels : 0);

  at::parallel_for(0, parts, grain_for(kPositionChunk * channels), [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t n = part / chunks;
      const int64_t p0 = (part % chunks) * kPositionChunk;
      const int64_t p1 = std::min(positions, p0 + kPositionChunk);
      opmath_t* sum = part_sum.data() + part * channels;
      opmath_t* best = part_best.data() + part * channels;
      opmath_t* dot = grad_y ? part_dot.data() + part * channels : nullptr;
      int64_t* where = with_argmax ? part_where.data() + part * channels : nullptr;
      std::fill_n(sum, channels, opmath_t(0));
      std::fill_n(best, channels, kLowest);
      if (dot) std::fill_n(dot, channels, opmath_t(0));
      if (where) std::fill_n(where, channels, p0);
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xp = x + (n * positions + p) * channels;
        const scalar_t* gp = grad_y ? grad_y + (n * positions + p) * channels : nullptr;
        scalar_t* out = scaled.scale ? scaled.out + (n * positions + p) * channels : nullptr;
        const opmath_t* scale = scaled.scale ? scaled.scale + n * channels : nullptr;
        int64_t c = 0;
        for (; c + V::size() <= channels; c += V::size()) {
          const auto chunk = V::load(xp + c);
          for (int k = 0; k < V::kVecs; ++k) {
            const int64_t at = c + k * kLanes;
            const Vec v = chunk[k];
            (Vec::loadu(sum + at) + v).store(sum + at);
            const Vec running = Vec::loadu(best + at);
            if (where) {
              // Lanes that beat the running maximum: rare after the first positions, so
              // the scalar update is cheap.
              const Vec improved = replaces_max(v, running);
              const int not_improved = improved.zero_mask();
              if (not_improved != kAllLanes) {
                for (int64_t lane = 0; lane < kLanes; ++lane) {
                  if (!(not_improved & (1 << lane))) where[at + lane] = p;
                }
                Vec::blendv(running, v, improved).store(best + at);
              }
            } else {
              at::vec::maximum(running, v).store(best + at);
            }
          }
          if (gp) {
            auto grad = V::load(gp + c);
            for (int k = 0; k < V::kVecs; ++k) {
              const int64_t at = c + k * kLanes;
              at::vec::fmadd(chunk[k], grad[k], Vec::loadu(dot + at)).store(dot + at);
            }
            if (out) {
              const auto s = V::load_opmath(scale + c);
              for (int k = 0; k < V::kVecs; ++k) grad[k] = grad[k] * s[k];
              V::store(out + c, grad);
            }
          }
        }
        for (; c < channels; ++c) {
          const opmath_t v = static_cast<opmath_t>(xp[c]);
          sum[c] += v;
          if (replaces_max(v, best[c])) {
            best[c] = v;
            if (where) where[c] = p;
          }
          if (gp) dot[c] += v * static_cast<opmath_t>(gp[c]);
          if (out) out[c] = static_cast<scalar_t>(static_cast<opmath_t>(gp[c]) * scale[c]);
        }
      }
    }
  });

  opmath_t* mean = stats.mean.data_ptr<opmath_t>();
  opmath_t* max = stats.max.data_ptr<opmath_t>();
  opmath_t* grad_dot = grad_y ? stats.grad_dot.data_ptr<opmath_t>() : nullptr;
  int64_t* argmax = with_argmax ? stats.argmax.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, batch * channels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / channels, c = row % channels;
      opmath_t sum = 0, best = kLowest, dot = 0;
      int64_t where = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t i = (n * chunks + chunk) * channels + c;
        sum += part_sum[i];
        if (grad_dot) dot += part_dot[i];
        // On a tie the earlier chunk (the lower position) keeps it.
        const opmath_t v = part_best[i];
        if (chunk == 0 || replaces_max(v, best)) {
          best = v;
          if (argmax) where = part_where[i];
        }
      }
      mean[row] = sum / static_cast<opmath_t>(positions);
      max[row] = best;
      if (grad_dot) grad_dot[row] = dot;
      if (argmax) argmax[row] = where;
    }
  });
}

ChannelStats reduce_cpu(const at::Tensor& x, const at::Tensor& grad_y, bool with_argmax,
                        Layout layout, const at::Tensor& grad_scale, const at::Tensor& grad_x) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  ChannelStats stats = empty_channel_stats(x, grad_y.defined(), with_argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_reduce_cpu", [&] {
        const scalar_t* grad = grad_y.defined() ? grad_y.const_data_ptr<scalar_t>() : nullptr;
        ScaledGrad<scalar_t> scaled{nullptr, nullptr};
        if (grad_scale.defined()) {
          scaled = {grad_scale.const_data_ptr<at::opmath_type<scalar_t>>(),
                    grad_x.data_ptr<scalar_t>()};
        }
        if (layout == Layout::ChannelsFirst) {
          reduce_channels_first(x.const_data_ptr<scalar_t>(), grad, batch * channels, positions,
                                with_argmax, stats, scaled);
        } else {
          reduce_channels_last(x.const_data_ptr<scalar_t>(), grad, batch, channels, positions,
                               with_argmax, stats, scaled);
        }
      });
  return stats;
}

template <typename scalar_t>
struct ApplyArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  scalar_t* out;
  const opmath_t* scale;
  const opmath_t* shift;      // may be null
  const opmath_t* at_argmax;  // may be null
  const int64_t* argmax;      // may be null
  int64_t batch, channels, positions;

  // The one element of channel `row` that receives the max-pool gradient; written with
  // a single rounding from the accumulation dtype.
  void fix_argmax(int64_t row, int64_t offset) const {
    const opmath_t value = static_cast<opmath_t>(in[offset]) * scale[row] +
                           (shift ? shift[row] : opmath_t(0)) + at_argmax[row];
    out[offset] = static_cast<scalar_t>(value);
  }
};

template <typename scalar_t>
void apply_channels_first(const ApplyArgs<scalar_t>& a) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const int64_t positions = a.positions;
  const int64_t grain = grain_for(positions);
  at::parallel_for(0, a.batch * a.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* in = a.in + row * positions;
      scalar_t* out = a.out + row * positions;
      const opmath_t s = a.scale[row];
      const opmath_t b = a.shift ? a.shift[row] : opmath_t(0);
      const Vec vs(s), vb(b);
      int64_t p = 0;
      for (; p + V::size() <= positions; p += V::size()) {
        auto chunk = V::load(in + p);
        for (int k = 0; k < V::kVecs; ++k) chunk[k] = at::vec::fmadd(chunk[k], vs, vb);
        V::store(out + p, chunk);
      }
      for (; p < positions; ++p) {
        out[p] = static_cast<scalar_t>(static_cast<opmath_t>(in[p]) * s + b);
      }
      if (a.argmax) a.fix_argmax(row, row * positions + a.argmax[row]);
    }
  });
}

template <typename scalar_t>
void apply_channels_last(const ApplyArgs<scalar_t>& a) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  const int64_t channels = a.channels, positions = a.positions;
  const int64_t grain = grain_for(channels);
  std::optional<InverseIndex> by_position;
  if (a.argmax) by_position.emplace(a.argmax, a.batch, channels, positions);
  at::parallel_for(0, a.batch * positions, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t n = pixel / positions;
      const scalar_t* in = a.in + pixel * channels;
      scalar_t* out = a.out + pixel * channels;
      const opmath_t* scale = a.scale + n * channels;
      const opmath_t* shift = a.shift ? a.shift + n * channels : nullptr;
      int64_t c = 0;
      for (; c + V::size() <= channels; c += V::size()) {
        auto chunk = V::load(in + c);
        const auto s = V::load_opmath(scale + c);
        if (shift) {
          const auto b = V::load_opmath(shift + c);
          for (int k = 0; k < V::kVecs; ++k) chunk[k] = at::vec::fmadd(chunk[k], s[k], b[k]);
        } else {
          for (int k = 0; k < V::kVecs; ++k) chunk[k] = chunk[k] * s[k];
        }
        V::store(out + c, chunk);
      }
      for (; c < channels; ++c) {
        out[c] = static_cast<scalar_t>(static_cast<opmath_t>(in[c]) * scale[c] +
                                       (shift ? shift[c] : opmath_t(0)));
      }
      if (by_position) {
        by_position->for_each(n, pixel - n * positions, [&](int64_t c) {
          a.fix_argmax(n * channels + c, pixel * channels + c);
        });
      }
    }
  });
}

void apply_cpu(const at::Tensor& in, const at::Tensor& scale, const at::Tensor& shift,
               const at::Tensor& at_argmax, const at::Tensor& argmax, at::Tensor& out,
               Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.scalar_type(), "channel_attention_apply_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const ApplyArgs<scalar_t> args{
            in.const_data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(),
            scale.const_data_ptr<opmath_t>(),
            shift.defined() ? shift.const_data_ptr<opmath_t>() : nullptr,
            at_argmax.defined() ? at_argmax.const_data_ptr<opmath_t>() : nullptr,
            at_argmax.defined() ? argmax.const_data_ptr<int64_t>() : nullptr,
            in.size(0),
            in.size(1),
            num_positions(in)};
        if (layout == Layout::ChannelsFirst) {
          apply_channels_first(args);
        } else {
          apply_channels_last(args);
        }
      });
}

// ---- cbam's passes ----

template <typename scalar_t>
struct WeightedPoolArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const opmath_t* weights;  // (N, C)
  const scalar_t* grad_y;   // may be null
  opmath_t* pooled;         // (N, 2, P)
  int64_t* argmax;          // (N, P), null without grad_y
  opmath_t* grad_dot;       // (N, P), null without grad_y
  int64_t batch, channels, positions;
};

// With grad_y (kWithGrad: the backward's pass) the argmax and the sums of grad_y * x * w too;
// without, the mean and the max alone.
//
// Vectorized over positions, each position's best channel held as a number in the
// accumulation dtype (exact below 2^24 channels; beyond that every position takes the scalar
// path, which keeps integers), as channel_pool's backward.
//
// Both layouts compare with `>` alone, so a NaN never becomes the maximum here, unlike
// channel_pool's rule, and nothing cbam returns can tell: where some x * w is NaN (or
// infinities of both signs meet) the mean over channels is NaN too, so every score that the
// position's maximum enters is NaN, and so is the position's gradient in every channel,
// whichever channel the maximum's term goes to.
//
// Channels first, one task: positions [block * kPositionBlock, ...) of sample n. The blocks
// start at multiples of every vector width, so a position takes the vector or the scalar path
// whatever the tasks around it.
template <bool kWithGrad, typename scalar_t>
void weighted_pool_block(const WeightedPoolArgs<scalar_t>& a, int64_t n, int64_t block) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  constexpr int64_t kLanes = Vec::size();
  const int64_t channels = a.channels, positions = a.positions;
  const bool exact_channel_numbers = channels < (int64_t(1) << 24);
  alignas(64) opmath_t sum[kPositionBlock], best[kPositionBlock], where[kPositionBlock];
  alignas(64) opmath_t dot[kPositionBlock];
  int64_t where_index[kPositionBlock];  // the scalar path's best channels
  const int64_t p0 = block * kPositionBlock;
  const int64_t width = std::min(kPositionBlock, positions - p0);
  const int64_t vector_width = exact_channel_numbers ? width / V::size() * V::size() : 0;
  std::fill_n(sum, width, opmath_t(0));
  std::fill_n(best, width, -std::numeric_limits<opmath_t>::infinity());
  if constexpr (kWithGrad) {
    std::fill_n(dot, width, opmath_t(0));
    std::fill_n(where, width, opmath_t(0));
    std::fill_n(where_index, width, int64_t(0));
  }
  // Channels `first` to `first + kChannels - 1` into the accumulators, in channel order for
  // every position (so any kChannels gives the same bits); several channels per load and
  // store of the accumulators.
  const auto add_channels = [&]<int kChannels>(int64_t first) {
    const scalar_t* xc[kChannels];
    const scalar_t* gc[kChannels];
    opmath_t w[kChannels];
    Vec vw[kChannels], channel[kChannels];
    for (int u = 0; u < kChannels; ++u) {
      const int64_t offset = (n * channels + first + u) * positions + p0;
      xc[u] = a.x + offset;
      gc[u] = kWithGrad ? a.grad_y + offset : nullptr;
      w[u] = a.weights[n * channels + first + u];
      vw[u] = Vec(w[u]);
      channel[u] = Vec(static_cast<opmath_t>(first + u));
    }
    int64_t j = 0;
    for (; j < vector_width; j += V::size()) {
      typename V::Chunk total, running, running_where, running_dot;
      for (int k = 0; k < V::kVecs; ++k) {
        const int64_t at = j + k * kLanes;
        total[k] = Vec::loadu(sum + at);
        running[k] = Vec::loadu(best + at);
        if constexpr (kWithGrad) {
          running_where[k] = Vec::loadu(where + at);
          running_dot[k] = Vec::loadu(dot + at);
        }
      }
      for (int u = 0; u < kChannels; ++u) {
        const auto chunk = V::load(xc[u] + j);
        typename V::Chunk grad;
        if constexpr (kWithGrad) grad = V::load(gc[u] + j);
        for (int k = 0; k < V::kVecs; ++k) {
          const Vec v = chunk[k] * vw[u];
          total[k] = total[k] + v;
          const Vec improved = v > running[k];
          running[k] = Vec::blendv(running[k], v, improved);
          if constexpr (kWithGrad) {
            running_where[k] = Vec::blendv(running_where[k], channel[u], improved);
            running_dot[k] = at::vec::fmadd(grad[k], v, running_dot[k]);
          }
        }
      }
      for (int k = 0; k < V::kVecs; ++k) {
        const int64_t at = j + k * kLanes;
        total[k].store(sum + at);
        running[k].store(best + at);
        if constexpr (kWithGrad) {
          running_where[k].store(where + at);
          running_dot[k].store(dot + at);
        }
      }
    }
    for (int u = 0; u < kChannels; ++u) {
      for (int64_t i = j; i < width; ++i) {
        const opmath_t v = static_cast<opmath_t>(xc[u][i]) * w[u];
        sum[i] += v;
        if (v > best[i]) {
          best[i] = v;
          if constexpr (kWithGrad) where_index[i] = first + u;
        }
        if constexpr (kWithGrad) dot[i] += static_cast<opmath_t>(gc[u][i]) * v;
      }
    }
  };
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) add_channels.template operator()<4>(c);
  for (; c < channels; ++c) add_channels.template operator()<1>(c);
  opmath_t* mean_out = a.pooled + n * 2 * positions + p0;
  opmath_t* max_out = mean_out + positions;
  for (int64_t j = 0; j < width; ++j) {
    mean_out[j] = sum[j] / static_cast<opmath_t>(channels);
    max_out[j] = best[j];
  }
  if constexpr (kWithGrad) {
    int64_t* argmax_out = a.argmax + n * positions + p0;
    for (int64_t j = 0; j < width; ++j) {
      argmax_out[j] = j < vector_width ? static_cast<int64_t>(where[j]) : where_index[j];
    }
    std::copy_n(dot, width, a.grad_dot + n * positions + p0);
  }
}

int64_t position_blocks(int64_t positions) {
  return (positions + kPositionBlock - 1) / kPositionBlock;
}

template <bool kWithGrad, typename scalar_t>
void weighted_pool_channels_first(const WeightedPoolArgs<scalar_t>& a) {
  const int64_t blocks = position_blocks(a.positions);
  at::parallel_for(0, a.batch * blocks, grain_for(kPositionBlock * a.channels),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t task = begin; task < end; ++task) {
                       weighted_pool_block<kWithGrad>(a, task / blocks, task % blocks);
                     }
                   });
}

// Channels last, one task: the position `pixel` (n * P + p).
template <bool kWithGrad, typename scalar_t>
void weighted_pool_pixel(const WeightedPoolArgs<scalar_t>& a, int64_t pixel) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const int64_t channels = a.channels, positions = a.positions;
  const int64_t n = pixel / positions, p = pixel % positions;
  const scalar_t* xp = a.x + pixel * channels;
  const scalar_t* gp = kWithGrad ? a.grad_y + pixel * channels : nullptr;
  const opmath_t* w = a.weights + n * channels;
  // Each lane keeps the first maximum of its channels and that channel's number (exact
  // below 2^24 channels; beyond, the scalar loop takes every channel).
  Vec vsum(opmath_t(0)), vmax(-std::numeric_limits<opmath_t>::infinity()), vdot(opmath_t(0));
  Vec vwhere(opmath_t(0));
  const Vec lane_offset = Vec::arange(opmath_t(0), opmath_t(1));
  const bool exact_channel_numbers = channels < (int64_t(1) << 24);
  const int64_t vector_channels = exact_channel_numbers ? channels / V::size() * V::size() : 0;
  int64_t c = 0;
  for (; c < vector_channels; c += V::size()) {
    const auto chunk = V::load(xp + c);
    const auto weight = V::load_opmath(w + c);
    typename V::Chunk grad;
    if constexpr (kWithGrad) grad = V::load(gp + c);
    for (int k = 0; k < V::kVecs; ++k) {
      const Vec v = chunk[k] * weight[k];
      vsum += v;
      const Vec improved = v > vmax;
      vmax = Vec::blendv(vmax, v, improved);
      if constexpr (kWithGrad) {
        vwhere = Vec::blendv(vwhere, lane_offset + Vec(static_cast<opmath_t>(c + k * Vec::size())),
                             improved);
        vdot = at::vec::fmadd(grad[k], v, vdot);
      }
    }
  }
  opmath_t sum = 0, best = -std::numeric_limits<opmath_t>::infinity(), dot = 0;
  int64_t where = 0;
  if (c > 0) {
    sum = lane_sum(vsum);
    // No lane holds a NaN (`>` never takes one), so the maximum is exact; among the lanes
    // that hold it the lowest channel wins, without a branch per lane.
    best = lane_max(vmax);
    if constexpr (kWithGrad) {
      dot = lane_sum(vdot);
      const Vec no_channel(std::numeric_limits<opmath_t>::infinity());
      where =
          static_cast<int64_t>(-lane_max(Vec::blendv(no_channel, vwhere, vmax == Vec(best)).neg()));
    }
  }
  for (; c < channels; ++c) {
    const opmath_t v = static_cast<opmath_t>(xp[c]) * w[c];
    sum += v;
    if (v > best) {
      best = v;
      if constexpr (kWithGrad) where = c;
    }
    if constexpr (kWithGrad) dot += static_cast<opmath_t>(gp[c]) * v;
  }
  a.pooled[n * 2 * positions + p] = sum / static_cast<opmath_t>(channels);
  a.pooled[(n * 2 + 1) * positions + p] = best;
  if constexpr (kWithGrad) {
    a.argmax[pixel] = where;
    a.grad_dot[pixel] = dot;
  }
}

template <bool kWithGrad, typename scalar_t>
void weighted_pool_channels_last(const WeightedPoolArgs<scalar_t>& a) {
  at::parallel_for(0, a.batch * a.positions, grain_for(a.channels),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t pixel = begin; pixel < end; ++pixel) {
                       weighted_pool_pixel<kWithGrad>(a, pixel);
                     }
                   });
}

WeightedChannelPool weighted_channel_pool_cpu(const at::Tensor& x, const at::Tensor& weights,
                                              const at::Tensor& grad_y, Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  const auto options = weights.options();
  WeightedChannelPool out{at::empty({batch, 2, positions}, options)};
  if (grad_y.defined()) {
    out.argmax = at::empty({batch, positions}, options.dtype(at::kLong));
    out.grad_dot = at::empty({batch, positions}, options);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_weighted_channel_pool_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const WeightedPoolArgs<scalar_t> args{
            x.const_data_ptr<scalar_t>(),
            weights.const_data_ptr<opmath_t>(),
            grad_y.defined() ? grad_y.const_data_ptr<scalar_t>() : nullptr,
            out.pooled.data_ptr<opmath_t>(),
            grad_y.defined() ? out.argmax.data_ptr<int64_t>() : nullptr,
            grad_y.defined() ? out.grad_dot.data_ptr<opmath_t>() : nullptr,
            batch,
            channels,
            positions};
        if (layout == Layout::ChannelsFirst) {
          grad_y.defined() ? weighted_pool_channels_first<true>(args)
                           : weighted_pool_channels_first<false>(args);
        } else {
          grad_y.defined() ? weighted_pool_channels_last<true>(args)
                           : weighted_pool_channels_last<false>(args);
        }
      });
  return out;
}

// PositionTerms as raw (N, P) arrays; a missing term is null.
template <typename opmath_t>
struct RawTerms {
  const opmath_t* scale;
  const opmath_t* shift;
  const opmath_t* at_argmax;
  const int64_t* argmax;

  explicit RawTerms(const PositionTerms& t)
      : scale(t.scale.defined() ? t.scale.const_data_ptr<opmath_t>() : nullptr),
        shift(t.shift.defined() ? t.shift.const_data_ptr<opmath_t>() : nullptr),
        at_argmax(t.at_argmax.defined() ? t.at_argmax.const_data_ptr<opmath_t>() : nullptr),
        argmax(t.at_argmax.defined() ? t.argmax.const_data_ptr<int64_t>() : nullptr) {}
  // The scale alone (cbam's forward).
  explicit RawTerms(const opmath_t* scale)
      : scale(scale), shift(nullptr), at_argmax(nullptr), argmax(nullptr) {}

  // The terms of one element of channel c at flat (n, p) index `i`.
  opmath_t element(opmath_t in, int64_t c, int64_t i) const {
    opmath_t t = in * (scale ? scale[i] : opmath_t(1)) + (shift ? shift[i] : opmath_t(0));
    if (argmax && argmax[i] == c) t += at_argmax[i];
    return t;
  }
};

template <typename scalar_t>
struct ApplyWithPositionsArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  scalar_t* out;
  RawTerms<opmath_t> terms;
  const opmath_t* scale;      // (N, C)
  const opmath_t* shift;      // may be null
  const opmath_t* at_argmax;  // may be null
  const int64_t* argmax;      // may be null
  int64_t batch, channels, positions;
  Layout layout;

  int64_t offset(int64_t n, int64_t c, int64_t p) const {
    return layout == Layout::ChannelsFirst ? (n * channels + c) * positions + p
                                           : (n * positions + p) * channels + c;
  }
  // One element with every term, rounded once: the elements that receive an argmax term.
  void fix(int64_t n, int64_t c, int64_t p) const {
    const int64_t i = offset(n, c, p), row = n * channels + c;
    opmath_t value =
        terms.element(static_cast<opmath_t>(in[i]), c, n * positions + p) * scale[row] +
        (shift ? shift[row] : opmath_t(0));
    if (argmax && argmax[row] == p) value += at_argmax[row];
    out[i] = static_cast<scalar_t>(value);
  }
};

// Channels first, one row (n, c) without the argmax terms (ApplyWithPositionsArgs::fix adds them).
template <typename scalar_t>
void apply_row(const ApplyWithPositionsArgs<scalar_t>& a, int64_t row) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const int64_t positions = a.positions;
  const int64_t n = row / a.channels;
  const scalar_t* in = a.in + row * positions;
  scalar_t* out = a.out + row * positions;
  const opmath_t* rs = a.terms.scale ? a.terms.scale + n * positions : nullptr;
  const opmath_t* rb = a.terms.shift ? a.terms.shift + n * positions : nullptr;
  const opmath_t s = a.scale[row], b = a.shift ? a.shift[row] : opmath_t(0);
  const Vec vs(s), vb(b);
  int64_t p = 0;
  for (; p + V::size() <= positions; p += V::size()) {
    auto chunk = V::load(in + p);
    for (int k = 0; k < V::kVecs; ++k) {
      const int64_t at = p + k * Vec::size();
      Vec t = chunk[k];
      if (rs) t = t * Vec::loadu(rs + at);
      if (rb) t = t + Vec::loadu(rb + at);
      chunk[k] = at::vec::fmadd(t, vs, vb);
    }
    V::store(out + p, chunk);
  }
  for (; p < positions; ++p) {
    const opmath_t t =
        static_cast<opmath_t>(in[p]) * (rs ? rs[p] : opmath_t(1)) + (rb ? rb[p] : opmath_t(0));
    out[p] = static_cast<scalar_t>(t * s + b);
  }
}

// Channels last, one position `pixel` (n * P + p) without the argmax terms.
template <typename scalar_t>
void apply_pixel(const ApplyWithPositionsArgs<scalar_t>& a, int64_t pixel) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const int64_t channels = a.channels;
  const int64_t n = pixel / a.positions;
  const scalar_t* in = a.in + pixel * channels;
  scalar_t* out = a.out + pixel * channels;
  const opmath_t* scale = a.scale + n * channels;
  const opmath_t* shift = a.shift ? a.shift + n * channels : nullptr;
  const opmath_t ts = a.terms.scale ? a.terms.scale[pixel] : opmath_t(1);
  const opmath_t tb = a.terms.shift ? a.terms.shift[pixel] : opmath_t(0);
  const Vec vts(ts), vtb(tb);
  int64_t c = 0;
  for (; c + V::size() <= channels; c += V::size()) {
    auto chunk = V::load(in + c);
    const auto s = V::load_opmath(scale + c);
    for (int k = 0; k < V::kVecs; ++k) {
      const Vec t = at::vec::fmadd(chunk[k], vts, vtb);
      chunk[k] =
          shift ? at::vec::fmadd(t, s[k], Vec::loadu(shift + c + k * Vec::size())) : t * s[k];
    }
    V::store(out + c, chunk);
  }
  for (; c < channels; ++c) {
    const opmath_t t = static_cast<opmath_t>(in[c]) * ts + tb;
    out[c] = static_cast<scalar_t>(t * scale[c] + (shift ? shift[c] : opmath_t(0)));
  }
}

template <typename scalar_t>
void apply_with_positions_typed(const ApplyWithPositionsArgs<scalar_t>& a) {
  const int64_t channels = a.channels, positions = a.positions;
  if (a.layout == Layout::ChannelsFirst) {
    std::optional<InverseIndex> by_channel;
    if (a.terms.argmax) by_channel.emplace(a.terms.argmax, a.batch, positions, channels);
    at::parallel_for(0, a.batch * channels, grain_for(positions), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        apply_row(a, row);
        // Each fix computes its element whole, so one that both terms touch ends the same.
        const int64_t n = row / channels, c = row - n * channels;
        if (by_channel) by_channel->for_each(n, c, [&](int64_t at) { a.fix(n, c, at); });
        if (a.argmax) a.fix(n, c, a.argmax[row]);
      }
    });
  } else {
    std::optional<InverseIndex> by_position;
    if (a.argmax) by_position.emplace(a.argmax, a.batch, channels, positions);
    at::parallel_for(0, a.batch * positions, grain_for(channels), [&](int64_t begin, int64_t end) {
      for (int64_t pixel = begin; pixel < end; ++pixel) {
        apply_pixel(a, pixel);
        // Each fix computes its element whole, so one that both terms touch ends the same.
        const int64_t n = pixel / positions, p = pixel - n * positions;
        if (a.terms.argmax) a.fix(n, a.terms.argmax[pixel], p);
        if (by_position) by_position->for_each(n, p, [&](int64_t c) { a.fix(n, c, p); });
      }
    });
  }
}

void apply_with_positions_cpu(const at::Tensor& in, const PositionTerms& terms,
                              const at::Tensor& scale, const at::Tensor& shift,
                              const at::Tensor& at_argmax, const at::Tensor& argmax,
                              at::Tensor& out, Layout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.scalar_type(), "cbam_apply_with_positions_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const ApplyWithPositionsArgs<scalar_t> args{
            in.const_data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(),
            RawTerms<opmath_t>(terms),
            scale.const_data_ptr<opmath_t>(),
            shift.defined() ? shift.const_data_ptr<opmath_t>() : nullptr,
            at_argmax.defined() ? at_argmax.const_data_ptr<opmath_t>() : nullptr,
            at_argmax.defined() ? argmax.const_data_ptr<int64_t>() : nullptr,
            in.size(0),
            in.size(1),
            num_positions(in),
            layout};
        apply_with_positions_typed(args);
      });
}

// sum over positions of (grad * terms.scale + terms.shift) * x per (n, c), then the argmax
// terms, position by position.
template <typename scalar_t>
void reduce_with_positions_typed(const scalar_t* x, const scalar_t* grad,
                                 const RawTerms<at::opmath_type<scalar_t>>& terms,
                                 at::opmath_type<scalar_t>* out, int64_t batch, int64_t channels,
                                 int64_t positions, Layout layout) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  const opmath_t* ps = terms.scale;
  const opmath_t* pb = terms.shift;
  if (layout == Layout::ChannelsFirst) {
    std::optional<InverseIndex> by_channel;
    if (terms.argmax) by_channel.emplace(terms.argmax, batch, positions, channels);
    at::parallel_for(0, batch * channels, grain_for(positions), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / channels;
        const scalar_t* xr = x + row * positions;
        const scalar_t* gr = grad + row * positions;
        const opmath_t* rs = ps ? ps + n * positions : nullptr;
        const opmath_t* rb = pb ? pb + n * positions : nullptr;
        Vec total(opmath_t(0));
        int64_t p = 0;
        // acc plus the terms (grad * scale + shift) * x of the vector at position q.
        const auto plus_terms = [&](int64_t q, Vec acc) {
          const auto xs = V::load(xr + q);
          const auto gs = V::load(gr + q);
          for (int k = 0; k < V::kVecs; ++k) {
            const int64_t at = q + k * Vec::size();
            Vec t = gs[k];
            if (rs) t = t * Vec::loadu(rs + at);
            if (rb) t = t + Vec::loadu(rb + at);
            acc = at::vec::fmadd(t, xs[k], acc);
          }
          return acc;
        };
        // Blocks of kSumBlock positions (see common.h).
        while (p + V::size() <= positions) {
          const int64_t vectors = (std::min(positions, p + kSumBlock) - p) / V::size();
          total += interleaved_sum(vectors, Vec(opmath_t(0)), [&](int64_t i, const Vec& sum) {
            return plus_terms(p + i * V::size(), sum);
          });
          p += vectors * V::size();
        }
        opmath_t sum = p > 0 ? lane_sum(total) : opmath_t(0);
        for (; p < positions; ++p) {
          const opmath_t t = static_cast<opmath_t>(gr[p]) * (rs ? rs[p] : opmath_t(1)) +
                             (rb ? rb[p] : opmath_t(0));
          sum += t * static_cast<opmath_t>(xr[p]);
        }
        // The argmax terms after the row's sum, in the order of their positions.
        if (by_channel) {
          by_channel->for_each(n, row - n * channels, [&](int64_t at) {
            sum += terms.at_argmax[n * positions + at] * static_cast<opmath_t>(xr[at]);
          });
        }
        out[row] = sum;
      }
    });
    return;
  }
  // Channels last: partial sums per (n, run of kPositionChunk positions), combined in order.
  const int64_t chunks = (positions + kPositionChunk - 1) / kPositionChunk;
  const int64_t parts = batch * chunks;
  std::vector<opmath_t> partial(parts * channels);
  at::parallel_for(0, parts, grain_for(kPositionChunk * channels), [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t n = part / chunks;
      const int64_t p0 = (part % chunks) * kPositionChunk;
      const int64_t p1 = std::min(positions, p0 + kPositionChunk);
      opmath_t* dot = partial.data() + part * channels;
      std::fill_n(dot, channels, opmath_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t pixel = n * positions + p;
        const scalar_t* xp = x + pixel * channels;
        const scalar_t* gp = grad + pixel * channels;
        const opmath_t ts = ps ? ps[pixel] : opmath_t(1), tb = pb ? pb[pixel] : opmath_t(0);
        const Vec vts(ts), vtb(tb);
        int64_t c = 0;
        for (; c + V::size() <= channels; c += V::size()) {
          const auto xs = V::load(xp + c);
          const auto gs = V::load(gp + c);
          for (int k = 0; k < V::kVecs; ++k) {
            const int64_t at = c + k * Vec::size();
            const Vec t = at::vec::fmadd(gs[k], vts, vtb);
            at::vec::fmadd(t, xs[k], Vec::loadu(dot + at)).store(dot + at);
          }
        }
        for (; c < channels; ++c) {
          dot[c] += (static_cast<opmath_t>(gp[c]) * ts + tb) * static_cast<opmath_t>(xp[c]);
        }
        if (terms.argmax) {
          const int64_t where = terms.argmax[pixel];
          dot[where] += terms.at_argmax[pixel] * static_cast<opmath_t>(xp[where]);
        }
      }
    }
  });
  at::parallel_for(0, batch * channels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / channels, c = row % channels;
      opmath_t sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        sum += partial[(n * chunks + chunk) * channels + c];
      }
      out[row] = sum;
    }
  });
}

at::Tensor reduce_with_positions_cpu(const at::Tensor& x, const at::Tensor& grad_y,
                                     const PositionTerms& terms, Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1);
  at::Tensor out =
      at::empty({batch, channels}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_reduce_with_positions_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        reduce_with_positions_typed(x.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(),
                                    RawTerms<opmath_t>(terms), out.data_ptr<opmath_t>(), batch,
                                    channels, num_positions(x), layout);
      });
  return out;
}

// ---- cbam's score head: a 2 -> 1 channel convolution, k x ... x k, same padding ----
//
// Written out for the one shape it has, instead of a general convolution built for many
// channels: every output row (n, d, h) is the bias plus k^dims x 2 shifted rows of the pooled
// map, each element summed in the same order on any number of threads.

// The spatial dims as (D, H, W) (leading sizes 1), the kernel as (KD, KH, KW).
struct ScoreConvShape {
  int64_t batch, d, h, w, kd, kh, kw;

  ScoreConvShape(int64_t batch, at::IntArrayRef sizes, int64_t k) : batch(batch) {
    const int64_t dims = static_cast<int64_t>(sizes.size());
    d = dims == 3 ? sizes[0] : 1;
    h = dims >= 2 ? sizes[dims - 2] : 1;
    w = sizes[dims - 1];
    kd = dims == 3 ? k : 1;
    kh = dims >= 2 ? k : 1;
    kw = k;
  }
  int64_t positions() const { return d * h * w; }
  int64_t taps() const { return 2 * kd * kh * kw; }
  // Sizes of the zero-padded map.
  int64_t pd() const { return d + kd - 1; }
  int64_t ph() const { return h + kh - 1; }
  int64_t pw() const { return w + kw - 1; }
};

// The pooled map (N, 2, P) with kernel / 2 zeros on every side: (N, 2, D', H', W'), and a
// vector of zeros after it, so that a vector load may start at any element.
template <typename T>
std::vector<T> zero_padded(const T* pooled, const ScoreConvShape& g) {
  std::vector<T> padded(g.batch * 2 * g.pd() * g.ph() * g.pw() + at::vec::Vectorized<T>::size(),
                        T(0));
  for (int64_t plane = 0; plane < g.batch * 2; ++plane) {
    for (int64_t z = 0; z < g.d; ++z) {
      for (int64_t y = 0; y < g.h; ++y) {
        const T* from = pooled + ((plane * g.d + z) * g.h + y) * g.w;
        T* to = padded.data() + ((plane * g.pd() + z + g.kd / 2) * g.ph() + y + g.kh / 2) * g.pw() +
                g.kw / 2;
        std::copy_n(from, g.w, to);
      }
    }
  }
  return padded;
}

// out[x] = start + sum over lines r and taps l of taps[r * kw + l] * lines[r][x + l], for x in
// [0, width): each element sums its terms in that order, kVecs vectors of them held in
// registers over all the terms. The lines must be readable a vector past x + l.
template <typename T>
void correlate_lines(const std::vector<const T*>& lines, const T* taps, int64_t kw, T start, T* out,
                     int64_t width) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kLanes = Vec::size();
  const auto block = [&]<int kVecs>(int64_t x0) {
    Vec acc[kVecs];
    std::fill_n(acc, kVecs, Vec(start));
    const T* tap = taps;
    for (const T* line : lines) {
      for (int64_t l = 0; l < kw; ++l, ++tap) {
        const Vec wt(*tap);
        for (int k = 0; k < kVecs; ++k) {
          acc[k] = at::vec::fmadd(wt, Vec::loadu(line + x0 + l + k * kLanes), acc[k]);
        }
      }
    }
    for (int k = 0; k < kVecs; ++k) {
      const int64_t at = x0 + k * kLanes;
      acc[k].store(out + at, static_cast<int>(std::min(kLanes, width - at)));
    }
  };
  int64_t x0 = 0;
  for (; x0 + 4 * kLanes <= width; x0 += 4 * kLanes) block.template operator()<4>(x0);
  for (; x0 < width; x0 += kLanes) block.template operator()<1>(x0);
}

// Output row `row` = (n, z, y) of the scores from zero_padded's map. `lines` holds the row's
// 2 * KD * KH padded input lines, in the weight's (channel, i, j) order.
template <typename T>
void score_conv_row(const T* padded, const T* weight, const T* bias, T* scores,
                    const ScoreConvShape& g, int64_t row, std::vector<const T*>& lines) {
  const int64_t n = row / (g.d * g.h), z = row / g.h % g.d, y = row % g.h;
  for (int64_t channel = 0, r = 0; channel < 2; ++channel) {
    for (int64_t i = 0; i < g.kd; ++i) {
      for (int64_t j = 0; j < g.kh; ++j, ++r) {
        lines[r] = padded + (((n * 2 + channel) * g.pd() + z + i) * g.ph() + y + j) * g.pw();
      }
    }
  }
  correlate_lines(lines, weight, g.kw, bias ? bias[0] : T(0), scores + row * g.w, g.w);
}

template <typename T>
void score_conv_typed(const T* pooled, const T* weight, const T* bias, T* scores,
                      const ScoreConvShape& g) {
  const std::vector<T> padded = zero_padded(pooled, g);
  const int64_t rows = g.batch * g.d * g.h;
  at::parallel_for(0, rows, grain_for(g.w * g.taps()), [&](int64_t begin, int64_t end) {
    std::vector<const T*> lines(2 * g.kd * g.kh);
    for (int64_t row = begin; row < end; ++row) {
      score_conv_row(padded.data(), weight, bias, scores, g, row, lines);
    }
  });
}

at::Tensor score_conv_cpu(const at::Tensor& pooled, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef sizes) {
  const ScoreConvShape g(pooled.size(0), sizes, weight.size(2));
  at::Tensor scores = at::empty({g.batch, g.positions()}, pooled.options());
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "cbam_score_conv_cpu", [&] {
    score_conv_typed(pooled.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                     bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                     scores.data_ptr<scalar_t>(), g);
  });
  return scores;
}

// sum of a[i] * b[i] over `size` elements, in a fixed order (vectors, then the tail).
template <typename T>
T fixed_order_dot(const T* a, const T* b, int64_t size) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t vectors = size / Vec::size();
  const Vec total = interleaved_sum(vectors, Vec(T(0)), [&](int64_t k, const Vec& partial) {
    return at::vec::fmadd(Vec::loadu(a + k * Vec::size()), Vec::loadu(b + k * Vec::size()),
                          partial);
  });
  int64_t i = vectors * Vec::size();
  T sum = i > 0 ? lane_sum(total) : T(0);
  for (; i < size; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
void score_conv_backward_typed(const T* grad, const T* pooled, const T* weight, T* grad_pooled,
                               T* grad_weight, T* grad_bias, const ScoreConvShape& g) {
  // The weights' gradient, one task per tap: the dot of the score gradient with the padded
  // map shifted by the tap (padding zeros included, as the convolution's own backward does).
  const std::vector<T> padded = zero_padded(pooled, g);
  const int64_t taps = g.taps(), rows = g.batch * g.d * g.h;
  at::parallel_for(0, taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t channel = t / (g.kd * g.kh * g.kw), i = t / (g.kh * g.kw) % g.kd;
      const int64_t j = t / g.kw % g.kh, l = t % g.kw;
      // Rows are summed in double: N x D x H of them must not stall a float sum.
      double total = 0;
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t n = row / (g.d * g.h), z = row / g.h % g.d, y = row % g.h;
        const T* in =
            padded.data() + (((n * 2 + channel) * g.pd() + z + i) * g.ph() + y + j) * g.pw() + l;
        total += static_cast<double>(fixed_order_dot(grad + row * g.w, in, g.w));
      }
      grad_weight[t] = static_cast<T>(total);
    }
  });
  double bias_total = 0;
  for (int64_t row = 0; row < rows; ++row) {
    T row_sum = 0;
    for (int64_t x = 0; x < g.w; ++x) row_sum += grad[row * g.w + x];
    bias_total += static_cast<double>(row_sum);
  }
  grad_bias[0] = static_cast<T>(bias_total);

  // The pooled map's gradient: each input row gathers the score gradient of the outputs its
  // taps reach (outputs only: padding has no gradient).
  const int64_t input_rows = g.batch * 2 * g.d * g.h;
  at::parallel_for(0, input_rows, grain_for(g.w * taps / 2), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / (g.d * g.h), z = row / g.h % g.d, y = row % g.h;
      const int64_t n = plane / 2, channel = plane % 2;
      T* out = grad_pooled + row * g.w;
      std::fill_n(out, g.w, T(0));
      for (int64_t i = 0; i < g.kd; ++i) {
        const int64_t oz = z - i + g.kd / 2;
        if (oz < 0 || oz >= g.d) continue;
        for (int64_t j = 0; j < g.kh; ++j) {
          const int64_t oy = y - j + g.kh / 2;
          if (oy < 0 || oy >= g.h) continue;
          const T* from = grad + ((n * g.d + oz) * g.h + oy) * g.w;
          const T* tap = weight + ((channel * g.kd + i) * g.kh + j) * g.kw;
          for (int64_t l = 0; l < g.kw; ++l) {
            // out[x] += tap[l] * from[x - l + kw / 2] where the output exists.
            const int64_t shift = g.kw / 2 - l;
            const int64_t lo = std::max<int64_t>(0, -shift), hi = std::min(g.w, g.w - shift);
            const T wt = tap[l];
            for (int64_t x = lo; x < hi; ++x) out[x] += wt * from[x + shift];
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_conv_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& pooled, const at::Tensor& weight,
    at::IntArrayRef sizes) {
  const ScoreConvShape g(pooled.size(0), sizes, weight.size(2));
  at::Tensor grad_pooled = at::empty({g.batch, 2, g.positions()}, pooled.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty({1}, weight.options());
  const at::Tensor w = weight.contiguous();
  const at::Tensor grad = grad_scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "cbam_score_conv_backward_cpu", [&] {
    score_conv_backward_typed(grad.const_data_ptr<scalar_t>(), pooled.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(), grad_pooled.data_ptr<scalar_t>(),
                              grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(), g);
  });
  return {grad_pooled, grad_weight, grad_bias};
}

// sigmoid of channel_attention's and cbam's gate logits and of cbam's scores, 1 / (1 + exp(-s)), in
// vectors with the last one partial, so that every element gets the same instructions whatever the
// thread split; this code is built for AVX2 only, so every CPU runs the same instructions
// (ATen's vectorized sigmoid rounds float64 differently in its AVX2 and AVX-512 kernels). Here
// w = sigmoid(s) for the vectors [begin, end) of a map of `numel` values (`w` may be `s`).
template <typename T>
void sigmoid_vectors(const T* s, T* w, int64_t numel, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kSize = Vec::size();
  const Vec one(T(1));
  for (int64_t v = begin; v < end; ++v) {
    const int64_t count = std::min(kSize, numel - v * kSize);
    const Vec z = Vec::loadu(s + v * kSize, count);
    (one / (one + z.neg().exp())).store(w + v * kSize, count);
  }
}

template <typename T>
int64_t vectors_of(int64_t numel) {
  return (numel + at::vec::Vectorized<T>::size() - 1) / at::vec::Vectorized<T>::size();
}

at::Tensor sigmoid_cpu(const at::Tensor& scores) {
  at::Tensor out = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "sigmoid_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    scalar_t* w = out.data_ptr<scalar_t>();
    const int64_t numel = scores.numel();
    at::parallel_for(0, vectors_of<scalar_t>(numel),
                     grain_for(at::vec::Vectorized<scalar_t>::size()),
                     [&](int64_t begin, int64_t end) { sigmoid_vectors(s, w, numel, begin, end); });
  });
  return out;
}

// Samples of x up to this size take spatial_half_cpu's one task per sample.
constexpr int64_t kSampleTaskBytes = 512 * 1024;

// cbam's forward after the channel weights, and cbam_spatial's with the sigmoid (weights of one):
// y = x * w[n, c] * sigmoid(conv(pool(x * w)) / T)[n, p]. Where the samples are small (the deep
// stages' maps) and each thread gets one or more, one task per sample pools it, runs the score
// head and writes its y: the last step rereads the sample's x from cache, and one parallel region
// replaces four. Larger samples gain nothing from it (the whole x is then read from the
// last-level cache either way: see docs/benchmarks.md), and each step runs over the batch in
// parallel. Either way each value is computed by the same code on the same position blocks,
// rows and vectors, so the result does not depend on the number of threads.
void spatial_half_cpu(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& conv_weight,
                      const std::optional<at::Tensor>& conv_bias, double temperature,
                      at::Tensor& out, Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  if (batch < at::get_num_threads() ||
      channels * positions * static_cast<int64_t>(x.element_size()) > kSampleTaskBytes) {
    at::Tensor scores =
        score_conv_cpu(weighted_channel_pool_cpu(x, weights, at::Tensor(), layout).pooled,
                       conv_weight, conv_bias, x.sizes().slice(2));
    if (temperature != 1.0) scores = scores / temperature;
    apply_with_positions_cpu(x, PositionTerms{sigmoid_cpu(scores)}, weights, at::Tensor(),
                             at::Tensor(), at::Tensor(), out, layout);
    return;
  }
  const at::Tensor w = conv_weight.contiguous();
  // One sample's geometry: its rows are those of sample 0.
  const ScoreConvShape sample(1, x.sizes().slice(2), conv_weight.size(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_spatial_half_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t* conv = w.const_data_ptr<opmath_t>();
        const opmath_t* bias = conv_bias ? conv_bias->const_data_ptr<opmath_t>() : nullptr;
        const opmath_t divisor = static_cast<opmath_t>(temperature);
        at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
          // The pooled map, then the spatial weights, of one sample at a time.
          std::vector<opmath_t> pooled(2 * positions), spatial(positions);
          std::vector<const opmath_t*> lines(2 * sample.kd * sample.kh);
          for (int64_t n = begin; n < end; ++n) {
            // The passes' arguments for sample n alone (a batch of one at its offset).
            const WeightedPoolArgs<scalar_t> pool{
                x.const_data_ptr<scalar_t>() + n * channels * positions,
                weights.const_data_ptr<opmath_t>() + n * channels,
                nullptr,
                pooled.data(),
                nullptr,
                nullptr,
                1,
                channels,
                positions};
            if (layout == Layout::ChannelsFirst) {
              for (int64_t block = 0; block < position_blocks(positions); ++block) {
                weighted_pool_block<false>(pool, 0, block);
              }
            } else {
              for (int64_t p = 0; p < positions; ++p) weighted_pool_pixel<false>(pool, p);
            }
            const std::vector<opmath_t> padded = zero_padded(pooled.data(), sample);
            for (int64_t row = 0; row < sample.d * sample.h; ++row) {
              score_conv_row(padded.data(), conv, bias, spatial.data(), sample, row, lines);
            }
            if (temperature != 1.0) {
              for (opmath_t& score : spatial) score /= divisor;
            }
            sigmoid_vectors(spatial.data(), spatial.data(), positions, 0,
                            vectors_of<opmath_t>(positions));
            const ApplyWithPositionsArgs<scalar_t> apply{
                pool.x,
                out.data_ptr<scalar_t>() + n * channels * positions,
                RawTerms<opmath_t>(static_cast<const opmath_t*>(spatial.data())),
                pool.weights,
                nullptr,
                nullptr,
                nullptr,
                1,
                channels,
                positions,
                layout};
            if (layout == Layout::ChannelsFirst) {
              for (int64_t c = 0; c < channels; ++c) apply_row(apply, c);
            } else {
              for (int64_t p = 0; p < positions; ++p) apply_pixel(apply, p);
            }
          }
        });
      });
}

constexpr ChannelAttentionBackend kCpuBackend{reduce_cpu,
                                              apply_cpu,
                                              cpu::fixed_order_matmul,
                                              weighted_channel_pool_cpu,
                                              apply_with_positions_cpu,
                                              reduce_with_positions_cpu,
                                              spatial_half_cpu,
                                              score_conv_cpu,
                                              score_conv_backward_cpu,
                                              sigmoid_cpu,
                                              position_softmax_cpu,
                                              position_softmax_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) { register_channel_attention_kernels<kCpuBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
