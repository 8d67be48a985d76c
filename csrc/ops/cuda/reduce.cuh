#pragma once

// Deterministic warp and block reductions shared by the CUDA kernels: every reduction runs
// in a fixed order (shuffles, then shared memory), never with atomics, so results are
// bitwise reproducible.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

namespace cnn_attention {
namespace ops {
namespace cuda {

constexpr int kWarpSize = 32;

// Running maximum that remembers the first (lowest) index attaining it; NaN counts as
// the largest value, as in torch.amax.
template <typename acc_t>
struct ArgMax {
  acc_t value;
  int64_t index;

  __device__ static ArgMax identity() {
    return {-std::numeric_limits<acc_t>::infinity(), std::numeric_limits<int64_t>::max()};
  }

  __device__ void update(acc_t v, int64_t i) {
    const bool v_nan = v != v, best_nan = value != value;
    const bool greater = v > value || (v_nan && !best_nan);
    const bool tie = (v == value || (v_nan && best_nan)) && i < index;
    if (greater || tie) {
      value = v;
      index = i;
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> warp_argmax(ArgMax<acc_t> m) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const acc_t v = __shfl_down_sync(0xffffffffu, m.value, offset);
    const int64_t i = __shfl_down_sync(0xffffffffu, m.index, offset);
    m.update(v, i);
  }
  return m;
}

// Block-wide reductions for blocks of up to 1024 threads (a multiple of 32); the result
// is valid in thread 0. `scratch` holds one value per warp.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
  v = threadIdx.x < warps ? scratch[threadIdx.x] : acc_t(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

template <typename acc_t>
__device__ ArgMax<acc_t> block_argmax(ArgMax<acc_t> m, acc_t* value_scratch,
                                      int64_t* index_scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  m = warp_argmax(m);
  __syncthreads();
  if (lane == 0) {
    value_scratch[warp] = m.value;
    index_scratch[warp] = m.index;
  }
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
  m = threadIdx.x < warps ? ArgMax<acc_t>{value_scratch[threadIdx.x], index_scratch[threadIdx.x]}
                          : ArgMax<acc_t>::identity();
  if (warp == 0) m = warp_argmax(m);
  return m;
}

inline int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Grid for a grid-stride loop over `work_items`, `items_per_block` at a time: enough
// blocks to fill the device, no more.
inline int64_t grid_size(int64_t work_items, int64_t items_per_block) {
  const int64_t wanted = (work_items + items_per_block - 1) / items_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(num_sms()) * 32));
}

}  // namespace cuda
}  // namespace ops
}  // namespace cnn_attention
