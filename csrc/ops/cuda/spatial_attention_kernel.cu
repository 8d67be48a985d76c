#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "../spatial_attention_impl.h"
#include "reduce.cuh"

namespace cnn_attention {
namespace ops {

namespace {

using cuda::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
static_assert(kSumBlock % kThreads == 0, "a sum block is whole rounds of the threads");

// Where the weight (and, for a pooling gradient, the (N, C) gradient) of element i of x
// lives. x is (N, C, P) or (N, P, C); the weights (N, Cs, P) in the same layout.
enum class Indexing { Elementwise, SharedChannelsFirst, SharedChannelsLast };

template <Indexing indexing>
__device__ __forceinline__ int64_t weight_index(int64_t i, int64_t channels, int64_t positions) {
  if constexpr (indexing == Indexing::SharedChannelsFirst) {
    return i / (channels * positions) * positions + i % positions;
  } else if constexpr (indexing == Indexing::SharedChannelsLast) {
    return i / channels;
  } else {
    return i;
  }
}

// Index of element i's (n, c) in an (N, C) gradient.
__device__ __forceinline__ int64_t pooled_index(int64_t i, int64_t channels, int64_t positions,
                                                bool channels_last) {
  return channels_last ? i / (channels * positions) * channels + i % channels : i / positions;
}

template <typename scalar_t, typename acc_t, Indexing indexing>
__global__ void scale_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                             scalar_t* __restrict__ y, int64_t numel, int64_t channels,
                             int64_t positions) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) *
                                 w[weight_index<indexing>(i, channels, positions)]);
  }
}

// Weights not shared (Cs = C): everything is elementwise.
template <typename scalar_t, typename acc_t>
__global__ void scale_backward_elementwise_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_w, int64_t numel, int64_t channels,
    int64_t positions, bool pooled, bool channels_last) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t g =
        static_cast<acc_t>(grad[pooled ? pooled_index(i, channels, positions, channels_last) : i]);
    grad_x[i] = static_cast<scalar_t>(g * w[i]);
    grad_w[i] = g * static_cast<acc_t>(x[i]);
  }
}

// Shared weights, (N, C, P): one thread per (n, position) walks the channels, so the sum
// over channels needs no communication and neighbouring threads read neighbouring
// positions (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void scale_backward_shared_channels_first_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_w, int64_t pixels, int64_t channels,
    int64_t positions, bool pooled) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t pixel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; pixel < pixels;
       pixel += stride) {
    const int64_t n = pixel / positions, p = pixel - n * positions;
    const acc_t weight = w[pixel];
    acc_t sum = 0;
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t row = n * channels + c, i = row * positions + p;
      const acc_t g = static_cast<acc_t>(grad[pooled ? row : i]);
      grad_x[i] = static_cast<scalar_t>(g * weight);
      sum += g * static_cast<acc_t>(x[i]);
    }
    grad_w[pixel] = sum;
  }
}

// Shared weights, (N, P, C): one warp per pixel reads its C contiguous channels.
template <typename scalar_t, typename acc_t>
__global__ void scale_backward_shared_channels_last_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_w, int64_t pixels, int64_t channels,
    int64_t positions, bool pooled) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       pixel < pixels; pixel += warps) {
    const scalar_t* g_row = grad + (pooled ? pixel / positions : pixel) * channels;
    const int64_t base = pixel * channels;
    const acc_t weight = w[pixel];
    acc_t sum = 0;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const acc_t g = static_cast<acc_t>(g_row[c]);
      grad_x[base + c] = static_cast<scalar_t>(g * weight);
      sum += g * static_cast<acc_t>(x[base + c]);
    }
    sum = cuda::warp_sum(sum);
    if (lane == 0) grad_w[pixel] = sum;
  }
}

// (N, C, P): one block per (n, c) sums its row.
template <typename scalar_t, typename acc_t>
__global__ void pool_channels_first_kernel(const scalar_t* __restrict__ x,
                                           const acc_t* __restrict__ w, scalar_t* __restrict__ out,
                                           int64_t rows, int64_t channels, int64_t positions,
                                           int64_t score_channels) {
  __shared__ acc_t scratch[kThreads / kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / channels, c = row - n * channels;
    const scalar_t* x_row = x + row * positions;
    const acc_t* w_row = w + (n * score_channels + (score_channels == 1 ? 0 : c)) * positions;
    // In blocks of kSumBlock positions: past 2^32 positions a thread's sum would stall.
    acc_t sum = 0;
    for (int64_t p0 = 0; p0 < positions; p0 += kSumBlock) {
      const int64_t p1 = std::min(positions, p0 + kSumBlock);
      acc_t part = 0;
      for (int64_t p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
        part += static_cast<acc_t>(x_row[p]) * w_row[p];
      }
      sum += part;
    }
    sum = cuda::block_sum(sum, scratch);
    if (threadIdx.x == 0) out[row] = static_cast<scalar_t>(sum);
  }
}

// (N, P, C): one thread per (n, c) walks the positions; neighbouring threads read
// neighbouring channels.
template <typename scalar_t, typename acc_t>
__global__ void pool_channels_last_kernel(const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ w, scalar_t* __restrict__ out,
                                          int64_t rows, int64_t channels, int64_t positions,
                                          int64_t score_channels) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += stride) {
    const int64_t n = row / channels, c = row - n * channels;
    // In blocks of kSumBlock positions: past 2^24 positions the thread's sum would stall.
    acc_t sum = 0;
    for (int64_t p0 = 0; p0 < positions; p0 += kSumBlock) {
      const int64_t p1 = std::min(positions, p0 + kSumBlock);
      acc_t part = 0;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t pixel = n * positions + p;
        const acc_t weight = w[score_channels == 1 ? pixel : pixel * channels + c];
        part += static_cast<acc_t>(x[pixel * channels + c]) * weight;
      }
      sum += part;
    }
    out[row] = static_cast<scalar_t>(sum);
  }
}

void scale_cuda(const at::Tensor& x, const at::Tensor& weights, at::Tensor& y, Layout layout) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const SweepExtent e = sweep_extent_of(x, weights);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = cuda::grid_size(e.numel(), kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_scale_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto launch = [&](auto kernel) {
          kernel<<<blocks, kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(), y.data_ptr<scalar_t>(),
              e.numel(), e.channels, e.positions);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (!e.shared()) {
          launch(scale_kernel<scalar_t, acc_t, Indexing::Elementwise>);
        } else if (layout == Layout::ChannelsFirst) {
          launch(scale_kernel<scalar_t, acc_t, Indexing::SharedChannelsFirst>);
        } else {
          launch(scale_kernel<scalar_t, acc_t, Indexing::SharedChannelsLast>);
        }
      });
}

void scale_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weights,
                         at::Tensor& grad_x, at::Tensor& grad_weights, Layout layout) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const SweepExtent e = sweep_extent_of(x, weights);
  const bool pooled = grad.dim() == 2;
  const int64_t pixels = e.batch * e.positions;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_scale_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad.const_data_ptr<scalar_t>();
        const scalar_t* in = x.const_data_ptr<scalar_t>();
        const acc_t* w = weights.const_data_ptr<acc_t>();
        scalar_t* gx = grad_x.data_ptr<scalar_t>();
        acc_t* gw = grad_weights.data_ptr<acc_t>();
        if (!e.shared()) {
          scale_backward_elementwise_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(e.numel(), kThreads), kThreads, 0, stream>>>(
                  g, in, w, gx, gw, e.numel(), e.channels, e.positions, pooled,
                  layout == Layout::ChannelsLast);
        } else if (layout == Layout::ChannelsFirst) {
          scale_backward_shared_channels_first_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kThreads), kThreads, 0, stream>>>(
                  g, in, w, gx, gw, pixels, e.channels, e.positions, pooled);
        } else {
          scale_backward_shared_channels_last_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(pixels, kWarpsPerBlock), kThreads, 0, stream>>>(
                  g, in, w, gx, gw, pixels, e.channels, e.positions, pooled);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void pool_cuda(const at::Tensor& x, const at::Tensor& weights, at::Tensor& out, Layout layout) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const SweepExtent e = sweep_extent_of(x, weights);
  const int64_t rows = e.batch * e.channels;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "soft_attention_pool_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (layout == Layout::ChannelsFirst) {
          pool_channels_first_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(rows, 1), kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(),
                  out.data_ptr<scalar_t>(), rows, e.channels, e.positions, e.score_channels);
        } else {
          pool_channels_last_kernel<scalar_t, acc_t>
              <<<cuda::grid_size(rows, kThreads), kThreads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(),
                  out.data_ptr<scalar_t>(), rows, e.channels, e.positions, e.score_channels);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// at::kthvalue is a radix selection on CUDA: exact, deterministic and O(P) per row; CUDA's
// softmax reduces each row in a tree of float sums, which does not stall on long rows.
// x and grad arrive dense (copied once if need be); weights of C-channel score maps are
// stored.
constexpr SpatialAttentionBackend kCudaBackend{scale_cuda,
                                               scale_backward_cuda,
                                               pool_cuda,
                                               top_k_mask_by_kthvalue,
                                               aten_position_sigmoid,
                                               aten_position_softmax,
                                               aten_position_softmax_backward,
                                               /*reads_strided_rows=*/false,
                                               /*scale_by_scores=*/nullptr,
                                               /*scale_by_scores_backward=*/nullptr,
                                               /*softmax_scale_by_scores=*/nullptr,
                                               /*softmax_scale_by_scores_backward=*/nullptr};

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, CUDA, m) { register_spatial_attention_kernels<kCudaBackend>(m); }

}  // namespace ops
}  // namespace cnn_attention
