#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../channel_attention_impl.h"
#include "reduce.cuh"

namespace cnn_attention {
namespace ops {

namespace {

using cuda::ArgMax;
using cuda::kWarpSize;

constexpr int kThreads = 256;
// Channels-last reductions: 32 channels side by side (one coalesced row segment per warp),
// 8 rows of positions per block.
constexpr int kTileChannels = kWarpSize;
constexpr int kTileRows = kThreads / kTileChannels;

// cbam's PositionTerms on the device: element (n, c, p) of a map `in` becomes
// in * scale[n, p] + shift[n, p] + (c == argmax[n, p]) * at_argmax[n, p], each term only where
// it is defined (none: `in` itself). The saved positions are compared, never used as indices.
template <typename acc_t>
struct DeviceTerms {
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;
  const acc_t* at_argmax = nullptr;
  const int64_t* argmax = nullptr;

  DeviceTerms() = default;
  explicit DeviceTerms(const PositionTerms& t)
      : scale(t.scale.defined() ? t.scale.const_data_ptr<acc_t>() : nullptr),
        shift(t.shift.defined() ? t.shift.const_data_ptr<acc_t>() : nullptr),
        at_argmax(t.at_argmax.defined() ? t.at_argmax.const_data_ptr<acc_t>() : nullptr),
        argmax(t.at_argmax.defined() ? t.argmax.const_data_ptr<int64_t>() : nullptr) {}

  __host__ __device__ bool any() const { return scale || shift || argmax; }
  // `pixel` = n * P + p.
  __device__ acc_t operator()(acc_t in, int64_t c, int64_t pixel) const {
    if (scale) in *= scale[pixel];
    if (shift) in += shift[pixel];
    if (argmax && argmax[pixel] == c) in += at_argmax[pixel];
    return in;
  }
};

// Outputs of the reduction. With one split per row the kernel writes the final statistics;
// with several it writes partial ones (`sum` in place of the mean) for finalize_kernel.
template <typename acc_t>
struct StatsOut {
  acc_t* mean;      // (splits, rows)
  acc_t* max;       // (splits, rows)
  int64_t* argmax;  // (splits, rows) or null
  acc_t* grad_dot;  // (splits, rows) or null
  acc_t inv_positions;

  __device__ void write(int64_t slot, acc_t sum, ArgMax<acc_t> best, acc_t dot, bool final) {
    mean[slot] = final ? sum * inv_positions : sum;
    max[slot] = best.value;
    if (argmax) argmax[slot] = best.index;
    if (grad_dot) grad_dot[slot] = dot;
  }
};

// With `scale`, the reductions also write grad_x = grad_y * scale[row] (channel_gate's
// backward: one read of x and grad_y for both gradients). The sums of grad_y * x take grad_y
// through the position terms (cbam's backward: reduce_with_positions); the scaled grad_x takes
// grad_y itself.
template <typename scalar_t, typename acc_t>
struct ScaledGrad {
  const acc_t* scale;  // (N, C), or null: nothing to write
  scalar_t* out;       // laid out like grad_y
};

// (N, C, P) input: block (row, split) reduces positions [split * span, ...) of one row.
template <typename scalar_t, typename acc_t>
__global__ void reduce_channels_first_kernel(const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ grad_y, int64_t channels,
                                             int64_t positions, int64_t span, StatsOut<acc_t> out,
                                             ScaledGrad<scalar_t, acc_t> scaled,
                                             DeviceTerms<acc_t> terms) {
  __shared__ acc_t value_scratch[kThreads / kWarpSize];
  __shared__ int64_t index_scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t begin = blockIdx.y * span;
  const int64_t end = std::min(positions, begin + span);
  const scalar_t* xr = x + row * positions;
  const scalar_t* gr = grad_y ? grad_y + row * positions : nullptr;
  scalar_t* scaled_out = scaled.scale ? scaled.out + row * positions : nullptr;
  const acc_t scale = scaled.scale ? scaled.scale[row] : acc_t(0);
  const int64_t n = row / channels, c = row - n * channels;
  acc_t sum = 0, dot = 0;
  ArgMax<acc_t> best = ArgMax<acc_t>::identity();
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[p]);
    sum += v;
    best.update(v, p);
    if (gr) {
      const acc_t g = static_cast<acc_t>(gr[p]);
      dot += v * terms(g, c, n * positions + p);
      if (scaled_out) scaled_out[p] = static_cast<scalar_t>(g * scale);
    }
  }
  sum = cuda::block_sum(sum, value_scratch);
  dot = gr ? cuda::block_sum(dot, value_scratch) : acc_t(0);
  best = cuda::block_argmax(best, value_scratch, index_scratch);
  if (threadIdx.x == 0) {
    // In 64 bits: blockIdx.y * gridDim.x alone is an unsigned 32-bit product.
    out.write(int64_t(blockIdx.y) * gridDim.x + row, sum, best, dot, gridDim.y == 1);
  }
}

// (N, P, C) input: block (n, channel tile, split); threadIdx.x walks channels (coalesced),
// threadIdx.y strides over positions, then the kTileRows partials are combined in order.
template <typename scalar_t, typename acc_t>
__global__ void reduce_channels_last_kernel(const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ grad_y, int64_t channels,
                                            int64_t positions, int64_t span, int64_t tiles,
                                            StatsOut<acc_t> out, ScaledGrad<scalar_t, acc_t> scaled,
                                            DeviceTerms<acc_t> terms) {
  __shared__ acc_t sums[kTileRows][kTileChannels];
  __shared__ acc_t dots[kTileRows][kTileChannels];
  __shared__ acc_t values[kTileRows][kTileChannels];
  __shared__ int64_t indices[kTileRows][kTileChannels];
  const int64_t n = blockIdx.x / tiles;
  const int64_t c = (blockIdx.x % tiles) * kTileChannels + threadIdx.x;
  const int64_t begin = blockIdx.y * span;
  const int64_t end = std::min(positions, begin + span);
  acc_t sum = 0, dot = 0;
  ArgMax<acc_t> best = ArgMax<acc_t>::identity();
  if (c < channels) {
    for (int64_t p = begin + threadIdx.y; p < end; p += kTileRows) {
      const int64_t offset = (n * positions + p) * channels + c;
      const acc_t v = static_cast<acc_t>(x[offset]);
      sum += v;
      best.update(v, p);
      if (grad_y) {
        const acc_t g = static_cast<acc_t>(grad_y[offset]);
        dot += v * terms(g, c, n * positions + p);
        if (scaled.scale) {
          scaled.out[offset] = static_cast<scalar_t>(g * scaled.scale[n * channels + c]);
        }
      }
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  dots[threadIdx.y][threadIdx.x] = dot;
  values[threadIdx.y][threadIdx.x] = best.value;
  indices[threadIdx.y][threadIdx.x] = best.index;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int r = 1; r < kTileRows; ++r) {
      sum += sums[r][threadIdx.x];
      dot += dots[r][threadIdx.x];
      best.update(values[r][threadIdx.x], indices[r][threadIdx.x]);
    }
    const int64_t rows = gridDim.x / tiles * channels;
    out.write(blockIdx.y * rows + n * channels + c, sum, best, dot, gridDim.y == 1);
  }
}

// Combines the partial statistics of several splits per row, in split order.
template <typename acc_t>
__global__ void finalize_kernel(StatsOut<acc_t> partial, int64_t rows, int64_t splits,
                                StatsOut<acc_t> out) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  acc_t sum = 0, dot = 0;
  ArgMax<acc_t> best = ArgMax<acc_t>::identity();
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t slot = s * rows + row;
    sum += partial.mean[slot];
    best.update(partial.max[slot], partial.argmax ? partial.argmax[slot] : 0);
    if (partial.grad_dot) dot += partial.grad_dot[slot];
  }
  out.write(row, sum, best, dot, true);
}

// Splits per row so that the grid has a few blocks per SM, each still reading a long run.
int64_t choose_splits(int64_t blocks_per_split, int64_t positions, int64_t min_span) {
  const int64_t target = int64_t(cuda::num_sms()) * 4;
  const int64_t wanted = (target + blocks_per_split - 1) / blocks_per_split;
  const int64_t most = std::max<int64_t>(1, positions / min_span);
  return std::clamp<int64_t>(wanted, 1, std::min<int64_t>(most, 1024));
}

// reduce_cuda, with the sums of grad_y * x taking grad_y through `terms`.
ChannelStats reduce_stats(const at::Tensor& x, const at::Tensor& grad_y, bool with_argmax,
                          Layout layout, const at::Tensor& grad_scale, const at::Tensor& grad_x,
                          const PositionTerms& terms) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  const int64_t rows = batch * channels;
  ChannelStats stats = empty_channel_stats(x, grad_y.defined(), with_argmax);
  const auto stat_options = stats.mean.options();

  const int64_t tiles = (channels + kTileChannels - 1) / kTileChannels;
  const bool first = layout == Layout::ChannelsFirst;
  const int64_t blocks = first ? rows : batch * tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "channel_attention: x has too many channels for one CUDA grid, got ", rows);
  int64_t splits = choose_splits(blocks, positions, first ? 4 * kThreads : 4 * kTileRows);
  const int64_t span = (positions + splits - 1) / splits;
  splits = (positions + span - 1) / span;  // no split left without positions
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_attention_reduce_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto stats_out = [&](const ChannelStats& s) {
          return StatsOut<acc_t>{s.mean.data_ptr<acc_t>(), s.max.data_ptr<acc_t>(),
                                 s.argmax.defined() ? s.argmax.data_ptr<int64_t>() : nullptr,
                                 s.grad_dot.defined() ? s.grad_dot.data_ptr<acc_t>() : nullptr,
                                 acc_t(1) / static_cast<acc_t>(positions)};
        };
        ChannelStats partial = stats;
        if (splits > 1) {
          // The split kernels must always record the argmax of each part when it is wanted.
          partial.mean = at::empty({splits, rows}, stat_options);
          partial.max = at::empty({splits, rows}, stat_options);
          if (grad_y.defined()) partial.grad_dot = at::empty({splits, rows}, stat_options);
          if (with_argmax) partial.argmax = at::empty({splits, rows}, x.options().dtype(at::kLong));
        }
        const scalar_t* grad = grad_y.defined() ? grad_y.const_data_ptr<scalar_t>() : nullptr;
        ScaledGrad<scalar_t, acc_t> scaled{nullptr, nullptr};
        if (grad_scale.defined()) {
          scaled = {grad_scale.const_data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>()};
        }
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
        if (first) {
          reduce_channels_first_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), grad, channels, positions, span, stats_out(partial),
              scaled, DeviceTerms<acc_t>(terms));
        } else {
          reduce_channels_last_kernel<scalar_t, acc_t>
              <<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), grad, channels, positions, span, tiles,
                  stats_out(partial), scaled, DeviceTerms<acc_t>(terms));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (splits > 1) {
          const int64_t finalize_blocks = (rows + kThreads - 1) / kThreads;
          finalize_kernel<acc_t><<<finalize_blocks, kThreads, 0, stream>>>(
              stats_out(partial), rows, splits, stats_out(stats));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return stats;
}

ChannelStats reduce_cuda(const at::Tensor& x, const at::Tensor& grad_y, bool with_argmax,
                         Layout layout, const at::Tensor& grad_scale, const at::Tensor& grad_x) {
  return reduce_stats(x, grad_y, with_argmax, layout, grad_scale, grad_x, PositionTerms{});
}

// (N, C): sum over positions of terms(grad_y) * x, from the reduction's sums of grad_y * x.
at::Tensor reduce_with_positions_cuda(const at::Tensor& x, const at::Tensor& grad_y,
                                      const PositionTerms& terms, Layout layout) {
  return reduce_stats(x, grad_y, false, layout, at::Tensor(), at::Tensor(), terms).grad_dot;
}

// out = terms(in) * scale[row] + shift[row] + (position == argmax[row]) * at_argmax[row]
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void apply_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                             DeviceTerms<acc_t> terms, const acc_t* __restrict__ scale,
                             const acc_t* __restrict__ shift, const acc_t* __restrict__ at_argmax,
                             const int64_t* __restrict__ argmax, index_t numel, index_t channels,
                             index_t positions) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  const bool with_terms = terms.any();
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    index_t row, position, pixel, c;  // pixel = n * P + position
    if constexpr (kChannelsLast) {
      pixel = i / channels;
      c = i - pixel * channels;
      const index_t n = pixel / positions;
      position = pixel - n * positions;
      row = n * channels + c;
    } else {
      row = i / positions;
      position = i - row * positions;
      const index_t n = with_terms ? row / channels : 0;
      c = row - n * channels;
      pixel = n * positions + position;
    }
    acc_t v = static_cast<acc_t>(in[i]);
    if (with_terms) v = terms(v, c, pixel);
    v *= scale[row];
    if (shift) v += shift[row];
    if (argmax && argmax[row] == static_cast<int64_t>(position)) v += at_argmax[row];
    out[i] = static_cast<scalar_t>(v);
  }
}

void apply_with_positions_cuda(const at::Tensor& in, const PositionTerms& terms,
                               const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& at_argmax, const at::Tensor& argmax,
                               at::Tensor& out, Layout layout) {
  const int64_t numel = in.numel();
  const int64_t blocks = cuda::grid_size(numel, kThreads);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.scalar_type(), "channel_attention_apply_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* shift_ptr = shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr;
        const acc_t* at_argmax_ptr =
            at_argmax.defined() ? at_argmax.const_data_ptr<acc_t>() : nullptr;
        const int64_t* argmax_ptr = at_argmax.defined() ? argmax.const_data_ptr<int64_t>() : nullptr;
        auto launch = [&](auto index_zero, auto channels_last) {
          using index_t = decltype(index_zero);
          apply_kernel<scalar_t, acc_t, index_t, decltype(channels_last)::value>
              <<<blocks, kThreads, 0, stream>>>(
                  in.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                  DeviceTerms<acc_t>(terms), scale.const_data_ptr<acc_t>(), shift_ptr,
                  at_argmax_ptr, argmax_ptr, static_cast<index_t>(numel),
                  static_cast<index_t>(in.size(1)), static_cast<index_t>(num_positions(in)));
        };
        // 32-bit index arithmetic when it cannot overflow (the common case, and faster).
        const bool small = numel <= std::numeric_limits<int32_t>::max() - int64_t(blocks) * kThreads;
        if (layout == Layout::ChannelsLast) {
          small ? launch(int32_t(0), std::true_type{}) : launch(int64_t(0), std::true_type{});
        } else {
          small ? launch(int32_t(0), std::false_type{}) : launch(int64_t(0), std::false_type{});
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void apply_cuda(const at::Tensor& in, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& at_argmax, const at::Tensor& argmax, at::Tensor& out,
                Layout layout) {
  apply_with_positions_cuda(in, PositionTerms{}, scale, shift, at_argmax, argmax, out, layout);
}

// ---- cbam's pooling of x * w over the channels ----

// The first channel whose value is strictly greater than every earlier one's, as the CPU's
// sweep finds it: a NaN never becomes the maximum, and where no value beats -inf the channel
// is 0. Partial results over interleaved channel slices combine to the same channel: the
// greatest value, at the lowest channel holding it (kNone: the slice had no such value).
template <typename acc_t>
struct FirstGreater {
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  acc_t value;
  int64_t index;

  __device__ static FirstGreater none() { return {-std::numeric_limits<acc_t>::infinity(), kNone}; }
  // Channels in increasing order within one slice.
  __device__ void update(acc_t v, int64_t c) {
    if (v > value) {
      value = v;
      index = c;
    }
  }
  __device__ void combine(acc_t v, int64_t c) {
    if (v > value || (v == value && c < index)) {
      value = v;
      index = c;
    }
  }
  __device__ int64_t channel() const { return index == kNone ? 0 : index; }
};

template <typename acc_t>
struct WeightedPoolOut {
  acc_t* pooled;    // (N, 2, P)
  int64_t* argmax;  // (N, P), or null without grad_y
  acc_t* grad_dot;  // (N, P), or null without grad_y
  acc_t channels;

  __device__ void write(int64_t n, int64_t p, int64_t positions, acc_t sum,
                        FirstGreater<acc_t> best, acc_t dot) const {
    pooled[(2 * n) * positions + p] = sum / channels;
    pooled[(2 * n + 1) * positions + p] = best.value;
    if (argmax) {
      argmax[n * positions + p] = best.channel();
      grad_dot[n * positions + p] = dot;
    }
  }
};

// (N, C, P): block (32 positions) x (8 channel slices); thread (x, y) sums channels y, y + 8, ...
// of its position (neighbouring threads read neighbouring positions), then the slices are
// combined in order.
template <typename scalar_t, typename acc_t>
__global__ void weighted_pool_channels_first_kernel(const scalar_t* __restrict__ x,
                                                    const acc_t* __restrict__ weights,
                                                    const scalar_t* __restrict__ grad_y,
                                                    int64_t pixels, int64_t channels,
                                                    int64_t positions, WeightedPoolOut<acc_t> out) {
  __shared__ acc_t sums[kTileRows][kTileChannels];
  __shared__ acc_t dots[kTileRows][kTileChannels];
  __shared__ acc_t values[kTileRows][kTileChannels];
  __shared__ int64_t indices[kTileRows][kTileChannels];
  const int64_t pixel = int64_t(blockIdx.x) * kTileChannels + threadIdx.x;
  const int64_t n = pixel / positions, p = pixel - n * positions;
  acc_t sum = 0, dot = 0;
  FirstGreater<acc_t> best = FirstGreater<acc_t>::none();
  if (pixel < pixels) {
    for (int64_t c = threadIdx.y; c < channels; c += kTileRows) {
      const int64_t offset = (n * channels + c) * positions + p;
      const acc_t v = static_cast<acc_t>(x[offset]) * weights[n * channels + c];
      sum += v;
      best.update(v, c);
      if (grad_y) dot += static_cast<acc_t>(grad_y[offset]) * v;
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  dots[threadIdx.y][threadIdx.x] = dot;
  values[threadIdx.y][threadIdx.x] = best.value;
  indices[threadIdx.y][threadIdx.x] = best.index;
  __syncthreads();
  if (threadIdx.y == 0 && pixel < pixels) {
    for (int r = 1; r < kTileRows; ++r) {
      sum += sums[r][threadIdx.x];
      dot += dots[r][threadIdx.x];
      best.combine(values[r][threadIdx.x], indices[r][threadIdx.x]);
    }
    out.write(n, p, positions, sum, best, dot);
  }
}

// (N, P, C): one warp per position reads its C contiguous channels.
template <typename scalar_t, typename acc_t>
__global__ void weighted_pool_channels_last_kernel(const scalar_t* __restrict__ x,
                                                   const acc_t* __restrict__ weights,
                                                   const scalar_t* __restrict__ grad_y,
                                                   int64_t pixels, int64_t channels,
                                                   int64_t positions, WeightedPoolOut<acc_t> out) {
  constexpr int kWarpsPerBlock = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       pixel < pixels; pixel += warps) {
    const int64_t n = pixel / positions;
    acc_t sum = 0, dot = 0;
    FirstGreater<acc_t> best = FirstGreater<acc_t>::none();
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const int64_t offset = pixel * channels + c;
      const acc_t v = static_cast<acc_t>(x[offset]) * weights[n * channels + c];
      sum += v;
      best.update(v, c);
      if (grad_y) dot += static_cast<acc_t>(grad_y[offset]) * v;
    }
    sum = cuda::warp_sum(sum);
    dot = cuda::warp_sum(dot);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const acc_t v = __shfl_down_sync(0xffffffffu, best.value, offset);
      const int64_t c = __shfl_down_sync(0xffffffffu, best.index, offset);
      best.combine(v, c);
    }
    if (lane == 0) out.write(n, pixel - n * positions, positions, sum, best, dot);
  }
}

WeightedChannelPool weighted_channel_pool_cuda(const at::Tensor& x, const at::Tensor& weights,
                                               const at::Tensor& grad_y, Layout layout) {
  const int64_t batch = x.size(0), channels = x.size(1), positions = num_positions(x);
  const int64_t pixels = batch * positions;
  const auto options = weights.options();
  WeightedChannelPool result{at::empty({batch, 2, positions}, options)};
  if (grad_y.defined()) {
    result.argmax = at::empty({batch, positions}, options.dtype(at::kLong));
    result.grad_dot = at::empty({batch, positions}, options);
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cbam_weighted_channel_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const WeightedPoolOut<acc_t> out{
            result.pooled.data_ptr<acc_t>(),
            grad_y.defined() ? result.argmax.data_ptr<int64_t>() : nullptr,
            grad_y.defined() ? result.grad_dot.data_ptr<acc_t>() : nullptr,
            static_cast<acc_t>(channels)};
        const scalar_t* grad = grad_y.defined() ? grad_y.const_data_ptr<scalar_t>() : nullptr;
        if (layout == Layout::ChannelsFirst) {
          const int64_t blocks = (pixels + kTileChannels - 1) / kTileChannels;
          TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
                      "cbam: x has too many positions for one CUDA grid, got ", pixels);
          weighted_pool_channels_first_kernel<scalar_t, acc_t>
              <<<blocks, dim3(kTileChannels, kTileRows), 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(), grad, pixels,
                  channels, positions, out);
        } else {
          weighted_pool_channels_last_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kThreads / kWarpSize), kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(), grad, pixels,
                  channels, positions, out);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return result;
}

// cbam's scores (N x P) and the gate's logits (N x C) are few: ATen's sigmoid, which does not
// depend on a thread split here.
at::Tensor sigmoid_cuda(const at::Tensor& scores) { return at::sigmoid(scores); }

// cbam's score head in float64: cuDNN computes float32 convolutions in TF32 by default
// (torch.backends.cudnn.allow_tf32), which rounds the pooled map and the weight to 10-bit
// mantissas (the weight's gradient was off by 0.5% to 7% on an H200). Two input channels and one
// output channel make the float64 convolution a small cost next to the passes over x.
std::optional<at::Tensor> to_double(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kDouble)) : std::nullopt;
}

at::Tensor score_conv_cuda(const at::Tensor& pooled, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef sizes) {
  return aten_score_conv(pooled.to(at::kDouble), weight.to(at::kDouble), to_double(bias), sizes)
      .to(pooled.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_conv_backward_cuda(
    const at::Tensor& grad_scores, const at::Tensor& pooled, const at::Tensor& weight,
    at::IntArrayRef sizes) {
  auto [grad_pooled, grad_weight, grad_bias] = aten_score_conv_backward(
      grad_scores.to(at::kDouble), pooled.to(at::kDouble), weight.to(at::kDouble), sizes);
  return {grad_pooled.to(pooled.scalar_type()), grad_weight.to(weight.scalar_type()),
          grad_bias.to(weight.scalar_type())};
}

// The spatial half's steps one after the other over the whole batch.
void spatial_half_cuda(const at::Tensor& x, const at::Tensor& weights,
                       const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
                       double temperature, at::Tensor& out, Layout layout) {
  at::Tensor scores =
      score_conv_cuda(weighted_channel_pool_cuda(x, weights, at::Tensor(), layout).pooled,
                      conv_weight, conv_bias, x.sizes().slice(2));
  if (temperature != 1.0) scores = scores / temperature;
  apply_with_positions_cuda(x, PositionTerms{sigmoid_cuda(scores)}, weights, at::Tensor(),
                            at::Tensor(), at::Tensor(), out, layout);
}

constexpr ChannelAttentionBackend kCudaBackend{reduce_cuda,
                                               apply_cuda,
                                               blas_matmul,
                                               weighted_channel_pool_cuda,
                                               apply_with_positions_cuda,
                                               reduce_with_positions_cuda,
                                               spatial_half_cuda,
                                               score_conv_cuda,
                                               score_conv_backward_cuda,
                                               sigmoid_cuda,
                                               aten_position_softmax,
                                               aten_position_softmax_backward};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CUDA, m) { register_channel_attention_kernels<kCudaBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
