#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../channel_pool_impl.h"
#include "../common.h"
#include "reduce.cuh"

namespace cnn_attention {
namespace ops {

namespace {

using cuda::ArgMax;
using cuda::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

// (N, C, P): one thread per (n, position) walks the channels; neighbouring threads read
// neighbouring positions, so every load of the walk is coalesced.
template <typename scalar_t, typename acc_t>
__global__ void forward_channels_first_kernel(const scalar_t* __restrict__ x,
                                              scalar_t* __restrict__ out, int64_t pixels,
                                              int64_t channels, int64_t positions) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t pixel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; pixel < pixels;
       pixel += stride) {
    const int64_t n = pixel / positions, p = pixel - n * positions;
    const scalar_t* xp = x + n * channels * positions + p;
    acc_t sum = 0;
    ArgMax<acc_t> best = ArgMax<acc_t>::identity();
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t v = static_cast<acc_t>(xp[c * positions]);
      sum += v;
      best.update(v, c);
    }
    scalar_t* o = out + n * 2 * positions + p;
    o[0] = static_cast<scalar_t>(sum / static_cast<acc_t>(channels));
    o[positions] = static_cast<scalar_t>(best.value);
  }
}

// (N, P, C): one warp per pixel reads its C contiguous channels.
template <typename scalar_t, typename acc_t>
__global__ void forward_channels_last_kernel(const scalar_t* __restrict__ x,
                                             scalar_t* __restrict__ out, int64_t pixels,
                                             int64_t channels) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       pixel < pixels; pixel += warps) {
    const scalar_t* xp = x + pixel * channels;
    acc_t sum = 0;
    ArgMax<acc_t> best = ArgMax<acc_t>::identity();
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const acc_t v = static_cast<acc_t>(xp[c]);
      sum += v;
      best.update(v, c);
    }
    sum = cuda::warp_sum(sum);
    best = cuda::warp_argmax(best);
    if (lane == 0) {
      out[pixel * 2] = static_cast<scalar_t>(sum / static_cast<acc_t>(channels));
      out[pixel * 2 + 1] = static_cast<scalar_t>(best.value);
    }
  }
}

// grad_x = grad_mean / C, plus grad_max at the first channel attaining the max.
template <typename scalar_t, typename acc_t>
__global__ void backward_channels_first_kernel(const scalar_t* __restrict__ grad,
                                               const scalar_t* __restrict__ x,
                                               scalar_t* __restrict__ grad_x, int64_t pixels,
                                               int64_t channels, int64_t positions) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t pixel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; pixel < pixels;
       pixel += stride) {
    const int64_t n = pixel / positions, p = pixel - n * positions;
    const int64_t base = n * channels * positions + p;
    ArgMax<acc_t> best = ArgMax<acc_t>::identity();
    for (int64_t c = 0; c < channels; ++c) {
      best.update(static_cast<acc_t>(x[base + c * positions]), c);
    }
    const scalar_t* g = grad + n * 2 * positions + p;
    const acc_t grad_mean = static_cast<acc_t>(g[0]) / static_cast<acc_t>(channels);
    const acc_t grad_max = static_cast<acc_t>(g[positions]);
    for (int64_t c = 0; c < channels; ++c) {
      grad_x[base + c * positions] =
          static_cast<scalar_t>(c == best.index ? grad_mean + grad_max : grad_mean);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_channels_last_kernel(const scalar_t* __restrict__ grad,
                                              const scalar_t* __restrict__ x,
                                              scalar_t* __restrict__ grad_x, int64_t pixels,
                                              int64_t channels) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       pixel < pixels; pixel += warps) {
    const scalar_t* xp = x + pixel * channels;
    ArgMax<acc_t> best = ArgMax<acc_t>::identity();
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      best.update(static_cast<acc_t>(xp[c]), c);
    }
    best = cuda::warp_argmax(best);
    const int64_t where = __shfl_sync(0xffffffffu, best.index, 0);
    const acc_t grad_mean = static_cast<acc_t>(grad[pixel * 2]) / static_cast<acc_t>(channels);
    const acc_t grad_max = static_cast<acc_t>(grad[pixel * 2 + 1]);
    scalar_t* gp = grad_x + pixel * channels;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      gp[c] = static_cast<scalar_t>(c == where ? grad_mean + grad_max : grad_mean);
    }
  }
}

void pool_cuda(const at::Tensor& x, at::Tensor& out, Layout layout) {
  const int64_t channels = x.size(1), positions = num_positions(x);
  const int64_t pixels = x.size(0) * positions;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (layout == Layout::ChannelsFirst) {
          forward_channels_first_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kThreads), kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pixels, channels,
                  positions);
        } else {
          forward_channels_last_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kWarpsPerBlock), kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pixels, channels);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& grad_x,
                        Layout layout) {
  const int64_t channels = x.size(1), positions = num_positions(x);
  const int64_t pixels = x.size(0) * positions;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_pool_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (layout == Layout::ChannelsFirst) {
          backward_channels_first_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kThreads), kThreads, 0, stream>>>(
                  grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  grad_x.data_ptr<scalar_t>(), pixels, channels, positions);
        } else {
          backward_channels_last_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kWarpsPerBlock), kThreads, 0, stream>>>(
                  grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                  grad_x.data_ptr<scalar_t>(), pixels, channels);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

constexpr ChannelPoolBackend kCudaBackend{pool_cuda, pool_backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CUDA, m) { register_channel_pool_kernels<kCudaBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
