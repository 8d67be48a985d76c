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
// backward: one read of x and grad_y for both gradients).
template <typename scalar_t, typename acc_t>
struct ScaledGrad {
  const acc_t* scale;  // (N, C), or null: nothing to write
  scalar_t* out;       // laid out like grad_y
};

// (N, C, P) input: block (row, split) reduces positions [split * span, ...) of one row.
template <typename scalar_t, typename acc_t>
__global__ void reduce_channels_first_kernel(const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ grad_y,
                                             int64_t positions, int64_t span,
                                             StatsOut<acc_t> out,
                                             ScaledGrad<scalar_t, acc_t> scaled) {
  __shared__ acc_t value_scratch[kThreads / kWarpSize];
  __shared__ int64_t index_scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t begin = blockIdx.y * span;
  const int64_t end = std::min(positions, begin + span);
  const scalar_t* xr = x + row * positions;
  const scalar_t* gr = grad_y ? grad_y + row * positions : nullptr;
  scalar_t* scaled_out = scaled.scale ? scaled.out + row * positions : nullptr;
  const acc_t scale = scaled.scale ? scaled.scale[row] : acc_t(0);
  acc_t sum = 0, dot = 0;
  ArgMax<acc_t> best = ArgMax<acc_t>::identity();
  for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[p]);
    sum += v;
    best.update(v, p);
    if (gr) {
      const acc_t g = static_cast<acc_t>(gr[p]);
      dot += v * g;
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
                                            const scalar_t* __restrict__ grad_y,
                                            int64_t channels, int64_t positions, int64_t span,
                                            int64_t tiles, StatsOut<acc_t> out,
                                            ScaledGrad<scalar_t, acc_t> scaled) {
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
        dot += v * g;
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

ChannelStats reduce_cuda(const at::Tensor& x, const at::Tensor& grad_y, bool with_argmax,
                         Layout layout, const at::Tensor& grad_scale, const at::Tensor& grad_x) {
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
              x.const_data_ptr<scalar_t>(), grad, positions, span, stats_out(partial), scaled);
        } else {
          reduce_channels_last_kernel<scalar_t, acc_t>
              <<<grid, dim3(kTileChannels, kTileRows), 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), grad, channels, positions, span, tiles,
                  stats_out(partial), scaled);
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

// out = in * scale[row] + shift[row] + (position == argmax[row]) * at_argmax[row]
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void apply_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                             const acc_t* __restrict__ at_argmax,
                             const int64_t* __restrict__ argmax, index_t numel, index_t channels,
                             index_t positions) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    index_t row, position;
    if constexpr (kChannelsLast) {
      const index_t pixel = i / channels;
      const index_t c = i - pixel * channels;
      const index_t n = pixel / positions;
      position = pixel - n * positions;
      row = n * channels + c;
    } else {
      row = i / positions;
      position = i - row * positions;
    }
    acc_t v = static_cast<acc_t>(in[i]) * scale[row];
    if (shift) v += shift[row];
    if (argmax && argmax[row] == static_cast<int64_t>(position)) v += at_argmax[row];
    out[i] = static_cast<scalar_t>(v);
  }
}

void apply_cuda(const at::Tensor& in, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& at_argmax, const at::Tensor& argmax, at::Tensor& out,
                Layout layout) {
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
                  scale.const_data_ptr<acc_t>(), shift_ptr, at_argmax_ptr, argmax_ptr,
                  static_cast<index_t>(numel), static_cast<index_t>(in.size(1)),
                  static_cast<index_t>(num_positions(in)));
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

// cbam's passes are ATen's calls on CUDA for now (correct, not fused).
constexpr ChannelAttentionBackend kCudaBackend{reduce_cuda,
                                               apply_cuda,
                                               blas_matmul,
                                               aten_weighted_channel_pool,
                                               aten_apply_with_positions,
                                               aten_reduce_with_positions,
                                               score_conv_cuda,
                                               score_conv_backward_cuda,
                                               sigmoid_cuda,
                                               aten_position_softmax,
                                               aten_position_softmax_backward};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CUDA, m) { register_channel_attention_kernels<kCudaBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
