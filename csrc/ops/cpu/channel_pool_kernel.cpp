#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>

#include "../channel_pool_impl.h"
#include "../common.h"
#include "vec.h"

namespace cnn_attention {
namespace ops {

namespace {

using cpu::grain_for;
using cpu::kPositionBlock;
using cpu::lane_max;
using cpu::lane_sum;
using cpu::nan_max;
using cpu::OpmathVec;
using cpu::replaces_max;

template <typename scalar_t>
void forward_channels_first(const scalar_t* x, scalar_t* out, int64_t batch, int64_t channels,
                            int64_t positions) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  const int64_t blocks = (positions + kPositionBlock - 1) / kPositionBlock;
  at::parallel_for(
      0, batch * blocks, grain_for(kPositionBlock * channels), [&](int64_t begin, int64_t end) {
        opmath_t sum[kPositionBlock], best[kPositionBlock];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks;
          const int64_t p0 = (task % blocks) * kPositionBlock;
          const int64_t width = std::min(kPositionBlock, positions - p0);
          std::fill_n(sum, width, opmath_t(0));
          std::fill_n(best, width, -std::numeric_limits<opmath_t>::infinity());
          // Channels `first` to `first + kChannels - 1`, in channel order for every position (any
          // kChannels gives the same bits), several per load and store of the accumulators.
          const auto add_channels = [&]<int kChannels>(int64_t first) {
            const scalar_t* xc[kChannels];
            for (int u = 0; u < kChannels; ++u)
              xc[u] = x + (n * channels + first + u) * positions + p0;
            int64_t j = 0;
            for (; j + V::size() <= width; j += V::size()) {
              auto s = V::load_opmath(sum + j);
              auto m = V::load_opmath(best + j);
              for (int u = 0; u < kChannels; ++u) {
                const auto chunk = V::load(xc[u] + j);
                for (int k = 0; k < V::kVecs; ++k) {
                  s[k] = s[k] + chunk[k];
                  m[k] = at::vec::maximum(m[k], chunk[k]);
                }
              }
              for (int k = 0; k < V::kVecs; ++k) {
                const int64_t at = j + k * V::Vec::size();
                s[k].store(sum + at);
                m[k].store(best + at);
              }
            }
            for (int u = 0; u < kChannels; ++u) {
              for (int64_t i = j; i < width; ++i) {
                const opmath_t v = static_cast<opmath_t>(xc[u][i]);
                sum[i] += v;
                best[i] = nan_max(best[i], v);
              }
            }
          };
          int64_t c = 0;
          for (; c + 4 <= channels; c += 4) add_channels.template operator()<4>(c);
          for (; c < channels; ++c) add_channels.template operator()<1>(c);
          scalar_t* mean_out = out + n * 2 * positions + p0;
          scalar_t* max_out = mean_out + positions;
          for (int64_t j = 0; j < width; ++j) {
            mean_out[j] = static_cast<scalar_t>(sum[j] / static_cast<opmath_t>(channels));
            max_out[j] = static_cast<scalar_t>(best[j]);
          }
        }
      });
}

// The sum (when kWithSum) and the max over the C contiguous values of one channels-last pixel.
template <bool kWithSum, typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> pixel_sum_and_max(
    const scalar_t* xp, int64_t channels) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  Vec vsum(opmath_t(0)), vmax(-std::numeric_limits<opmath_t>::infinity());
  int64_t c = 0;
  for (; c + V::size() <= channels; c += V::size()) {
    const auto chunk = V::load(xp + c);
    for (int k = 0; k < V::kVecs; ++k) {
      if constexpr (kWithSum) vsum += chunk[k];
      vmax = at::vec::maximum(vmax, chunk[k]);
    }
  }
  opmath_t sum = kWithSum ? lane_sum(vsum) : opmath_t(0), best = lane_max(vmax);
  for (; c < channels; ++c) {
    const opmath_t v = static_cast<opmath_t>(xp[c]);
    if constexpr (kWithSum) sum += v;
    best = nan_max(best, v);
  }
  return {sum, best};
}

template <typename scalar_t>
void forward_channels_last(const scalar_t* x, scalar_t* out, int64_t pixels, int64_t channels) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, pixels, grain_for(channels), [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const auto [sum, best] = pixel_sum_and_max<true>(x + pixel * channels, channels);
      out[pixel * 2] = static_cast<scalar_t>(sum / static_cast<opmath_t>(channels));
      out[pixel * 2 + 1] = static_cast<scalar_t>(best);
    }
  });
}

// grad_x = grad_mean / C everywhere, plus grad_max at the first channel attaining the max.
// Vectorized over positions, with each position's best channel held as a number in the
// accumulation dtype (exact below 2^24 channels; beyond that every position takes the
// scalar path). The scalar path keeps its best channels as integers: float32(c) rounds
// above 2^24, which would send grad_max to two channels.
template <typename scalar_t>
void backward_channels_first(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x,
                             int64_t batch, int64_t channels, int64_t positions) {
  using V = OpmathVec<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using Vec = typename V::Vec;
  constexpr int64_t kLanes = Vec::size();
  const int64_t blocks = (positions + kPositionBlock - 1) / kPositionBlock;
  const bool exact_channel_numbers = channels < (int64_t(1) << 24);
  const opmath_t inv_channels = opmath_t(1) / static_cast<opmath_t>(channels);
  at::parallel_for(
      0, batch * blocks, grain_for(kPositionBlock * channels), [&](int64_t begin, int64_t end) {
        alignas(64) opmath_t best[kPositionBlock], where[kPositionBlock];
        alignas(64) opmath_t grad_mean[kPositionBlock], grad_max[kPositionBlock];
        int64_t where_index[kPositionBlock];  // the scalar path's best channels
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks;
          const int64_t p0 = (task % blocks) * kPositionBlock;
          const int64_t width = std::min(kPositionBlock, positions - p0);
          const int64_t vector_width = exact_channel_numbers ? width / V::size() * V::size() : 0;
          std::fill_n(best, width, -std::numeric_limits<opmath_t>::infinity());
          std::fill_n(where, width, opmath_t(0));
          std::fill_n(where_index, width, int64_t(0));
          // As the forward's add_channels: the first maximum's channel, several channels per load
          // and store of the running maxima.
          const auto find_channels = [&]<int kChannels>(int64_t first) {
            const scalar_t* xc[kChannels];
            Vec channel[kChannels];
            for (int u = 0; u < kChannels; ++u) {
              xc[u] = x + (n * channels + first + u) * positions + p0;
              channel[u] = Vec(static_cast<opmath_t>(first + u));
            }
            int64_t j = 0;
            for (; j < vector_width; j += V::size()) {
              typename V::Chunk running, running_where;
              for (int k = 0; k < V::kVecs; ++k) {
                running[k] = Vec::loadu(best + j + k * kLanes);
                running_where[k] = Vec::loadu(where + j + k * kLanes);
              }
              for (int u = 0; u < kChannels; ++u) {
                const auto chunk = V::load(xc[u] + j);
                for (int k = 0; k < V::kVecs; ++k) {
                  const Vec improved = replaces_max(chunk[k], running[k]);
                  running[k] = Vec::blendv(running[k], chunk[k], improved);
                  running_where[k] = Vec::blendv(running_where[k], channel[u], improved);
                }
              }
              for (int k = 0; k < V::kVecs; ++k) {
                running[k].store(best + j + k * kLanes);
                running_where[k].store(where + j + k * kLanes);
              }
            }
            for (int u = 0; u < kChannels; ++u) {
              for (int64_t i = j; i < width; ++i) {
                const opmath_t v = static_cast<opmath_t>(xc[u][i]);
                if (replaces_max(v, best[i])) {
                  best[i] = v;
                  where_index[i] = first + u;
                }
              }
            }
          };
          int64_t c = 0;
          for (; c + 4 <= channels; c += 4) find_channels.template operator()<4>(c);
          for (; c < channels; ++c) find_channels.template operator()<1>(c);
          const scalar_t* g = grad + n * 2 * positions + p0;
          for (int64_t j = 0; j < width; ++j) {
            grad_mean[j] = static_cast<opmath_t>(g[j]) * inv_channels;
            grad_max[j] = static_cast<opmath_t>(g[positions + j]);
          }
          for (int64_t c = 0; c < channels; ++c) {
            scalar_t* gc = grad_x + (n * channels + c) * positions + p0;
            const Vec channel(static_cast<opmath_t>(c)), zero(opmath_t(0));
            int64_t j = 0;
            for (; j < vector_width; j += V::size()) {
              typename V::Chunk out;
              for (int k = 0; k < V::kVecs; ++k) {
                const int64_t at = j + k * kLanes;
                const Vec hit = Vec::loadu(where + at) == channel;
                out[k] =
                    Vec::loadu(grad_mean + at) + Vec::blendv(zero, Vec::loadu(grad_max + at), hit);
              }
              V::store(gc + j, out);
            }
            for (; j < width; ++j) {
              const bool hit = where_index[j] == c;
              gc[j] = static_cast<scalar_t>(hit ? grad_mean[j] + grad_max[j] : grad_mean[j]);
            }
          }
        }
      });
}

template <typename scalar_t>
void backward_channels_last(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x,
                            int64_t pixels, int64_t channels) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, pixels, grain_for(channels), [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const scalar_t* xp = x + pixel * channels;
      const opmath_t best = pixel_sum_and_max<false>(xp, channels).second;
      // The pixel's C values were just read: finding the first maximum runs in cache.
      const int64_t where = cpu::first_index_of(xp, channels, best);
      const opmath_t g = static_cast<opmath_t>(grad[pixel * 2]) / static_cast<opmath_t>(channels);
      scalar_t* gp = grad_x + pixel * channels;
      std::fill_n(gp, channels, static_cast<scalar_t>(g));
      gp[where] = static_cast<scalar_t>(g + static_cast<opmath_t>(grad[pixel * 2 + 1]));
    }
  });
}

void pool_cpu(const at::Tensor& x, at::Tensor& out, Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_cpu", [&] {
        if (layout == Layout::ChannelsFirst) {
          forward_channels_first(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), batch,
                                 channels, positions);
        } else {
          forward_channels_last(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                batch * positions, channels);
        }
      });
}

void pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& grad_x,
                       Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_backward_cpu", [&] {
        if (layout == Layout::ChannelsFirst) {
          backward_channels_first(grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  grad_x.data_ptr<scalar_t>(), batch, channels, positions);
        } else {
          backward_channels_last(grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                 grad_x.data_ptr<scalar_t>(), batch * positions, channels);
        }
      });
}

constexpr ChannelPoolBackend kCpuBackend{pool_cpu, pool_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CPU, m) { register_channel_pool_kernels<kCpuBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
