#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../channel_attention_impl.h"
#include "gemm.h"
#include "vec.h"

namespace cnn_attention {
namespace ops {

namespace {

using cpu::lane_max;
using cpu::lane_sum;
using cpu::grain_for;
using cpu::nan_max;
using cpu::OpmathVec;
using cpu::replaces_max;

// Positions per task when channels are the innermost dim.
constexpr int64_t kPositionChunk = 256;
// Independent accumulator vectors per row when positions are the inner dim.
constexpr int kChains = 4;

// With `grad_scale`, also grad_x = grad_y * grad_scale[row] (the sweep reads grad_y anyway).
template <typename scalar_t>
struct ScaledGrad {
  const at::opmath_type<scalar_t>* scale;  // (N, C), or null: nothing to write
  scalar_t* out;                           // laid out like grad_y
};

// (N, C, P): one task per run of (n, c) rows, each row contiguous.
template <typename scalar_t>
void reduce_channels_first(const scalar_t* x, const scalar_t* grad_y, int64_t rows,
                           int64_t positions, bool with_argmax, ChannelStats& stats,
                           ScaledGrad<scalar_t> scaled) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  opmath_t* mean = stats.mean.data_ptr<opmath_t>();
  opmath_t* max = stats.max.data_ptr<opmath_t>();
  opmath_t* grad_dot = grad_y ? stats.grad_dot.data_ptr<opmath_t>() : nullptr;
  int64_t* argmax = with_argmax ? stats.argmax.data_ptr<int64_t>() : nullptr;
  const int64_t grain = grain_for(positions);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * positions;
      const scalar_t* gr = grad_y ? grad_y + row * positions : nullptr;
      scalar_t* out = scaled.scale ? scaled.out + row * positions : nullptr;
      const opmath_t scale = scaled.scale ? scaled.scale[row] : opmath_t(0);
      // kChains independent accumulators, so the adds are not one serial dependency chain.
      Vec vmax[kChains];
      std::fill_n(vmax, kChains, Vec(-std::numeric_limits<opmath_t>::infinity()));
      Vec total_sum(opmath_t(0)), total_dot(opmath_t(0));
      int64_t p = 0;
      // Sums in blocks of kSumBlock positions (see common.h): rows of 2^29 positions and
      // more (2^24 per lane) would otherwise stall.
      while (p + kChains * V::size() <= positions) {
        const int64_t block_end = std::min(positions, p + kSumBlock);
        Vec vsum[kChains], vdot[kChains];
        std::fill_n(vsum, kChains, Vec(opmath_t(0)));
        std::fill_n(vdot, kChains, Vec(opmath_t(0)));
        for (; p + kChains * V::size() <= block_end; p += kChains * V::size()) {
          for (int chain = 0; chain < kChains; ++chain) {
            const auto chunk = V::load(xr + p + chain * V::size());
            for (int k = 0; k < V::kVecs; ++k) {
              vsum[chain] += chunk[k];
              vmax[chain] = at::vec::maximum(vmax[chain], chunk[k]);
            }
            if (gr) {
              auto grad = V::load(gr + p + chain * V::size());
              for (int k = 0; k < V::kVecs; ++k) {
                vdot[chain] = at::vec::fmadd(chunk[k], grad[k], vdot[chain]);
              }
              if (out) {
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
        if (gr) {
          auto grad = V::load(gr + p);
          for (int k = 0; k < V::kVecs; ++k) {
            total_dot = at::vec::fmadd(chunk[k], grad[k], total_dot);
          }
          if (out) {
            for (int k = 0; k < V::kVecs; ++k) grad[k] = grad[k] * Vec(scale);
            V::store(out + p, grad);
          }
        }
      }
      // Rows shorter than a vector (1x1 maps) skip the lane reductions of vectors never used.
      const bool vectors = p > 0;
      opmath_t sum = vectors ? lane_sum(total_sum) : opmath_t(0);
      opmath_t best = vectors ? lane_max(vmax[0]) : -std::numeric_limits<opmath_t>::infinity();
      opmath_t dot = vectors && gr ? lane_sum(total_dot) : opmath_t(0);
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
    }
  });
  if (a.argmax) {
    // After the sweep, so that no task overwrites a fixed element.
    at::parallel_for(0, a.batch * channels, at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t n = row / channels, c = row % channels;
        a.fix_argmax(row, (n * positions + a.argmax[row]) * channels + c);
      }
    });
  }
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

constexpr ChannelAttentionBackend kCpuBackend{reduce_cpu, apply_cpu, cpu::fixed_order_matmul};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) { register_channel_attention_kernels<kCpuBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
