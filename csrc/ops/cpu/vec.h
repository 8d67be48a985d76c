#pragma once

// Helpers shared by the CPU kernels: loads and stores of Vectorized<scalar_t>::size()
// elements as vectors of the accumulation dtype (float32 for float16 / bfloat16), so each
// kernel is written once for every dtype; the running-maximum rules; task sizes.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace cnn_attention {
namespace ops {
namespace cpu {
// The instruction set's own namespace, as ATen's vector types have (see vector_isa.h): this
// header is compiled once per instruction set, and its inline functions must not be merged
// across the builds.
inline namespace CPU_CAPABILITY {

template <typename scalar_t>
struct OpmathVec {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  using Chunk = std::array<Vec, kVecs>;

  // Elements of scalar_t in one chunk.
  static constexpr int64_t size() { return at::vec::Vectorized<scalar_t>::size(); }

  static Chunk load(const scalar_t* data) {
    if constexpr (kReduced) {
      auto [low, high] =
          at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(data));
      return {low, high};
    } else {
      return {Vec::loadu(data)};
    }
  }

  // A chunk of values that are already in the accumulation dtype (per-channel weights).
  static Chunk load_opmath(const opmath_t* data) {
    Chunk chunk;
    for (int k = 0; k < kVecs; ++k) chunk[k] = Vec::loadu(data + k * Vec::size());
    return chunk;
  }

  static void store(scalar_t* data, const Chunk& chunk) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(chunk[0], chunk[1]).store(data);
    } else {
      chunk[0].store(data);
    }
  }
};

// The first `count` elements at `data` as a chunk (count <= size(); the rest of the chunk is
// zero), and their store: the last elements of a row go through the same vector code as the
// others, so each element gets the same arithmetic wherever a split puts it.
template <typename scalar_t>
typename OpmathVec<scalar_t>::Chunk load_partial(const scalar_t* data, int64_t count) {
  using V = OpmathVec<scalar_t>;
  if (count == V::size()) return V::load(data);
  alignas(64) scalar_t buffer[V::size()];
  std::fill_n(buffer, V::size(), scalar_t(0));
  std::copy_n(data, count, buffer);
  return V::load(buffer);
}

template <typename scalar_t>
void store_partial(scalar_t* data, const typename OpmathVec<scalar_t>::Chunk& chunk,
                   int64_t count) {
  using V = OpmathVec<scalar_t>;
  if (count == V::size()) return V::store(data, chunk);
  alignas(64) scalar_t buffer[V::size()];
  V::store(buffer, chunk);
  std::copy_n(buffer, count, data);
}

// max that propagates NaN, as torch.amax does.
template <typename T>
inline T nan_max(T a, T b) {
  return (std::isnan(a) || a > b) ? a : b;
}

// Whether `value` replaces the running maximum `best`: strictly greater keeps the first
// maximum; the first NaN wins and stays.
template <typename T>
inline bool replaces_max(T value, T best) {
  return value > best || (std::isnan(value) && !std::isnan(best));
}

// The same rule lane by lane: a mask of the lanes of `value` that replace `best`.
template <typename T>
inline at::vec::Vectorized<T> replaces_max(const at::vec::Vectorized<T>& value,
                                           const at::vec::Vectorized<T>& best) {
  return (value > best) | ((value != value) & (best == best));
}

// at::parallel_for grain for work items of `item_size` elements each.
inline int64_t grain_for(int64_t item_size) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / item_size);
}

// Positions a task handles together where channels are the outer dim and the sweep runs over
// the channels for each position (sums, maxima over channels): each channel's stretch of the
// block is read as one long stream (stretches a few cache lines long, of many channels by
// turns, kept the hardware prefetchers from running ahead), while the block's accumulators stay
// in L1 or L2. The sums over channels go in channel order whatever the block, and a multiple
// of every vector width keeps each position on the same vector or scalar path: the block
// changes no bit.
constexpr int64_t kPositionBlock = 4096;

// Sum of the lanes of a vector in a fixed order (deterministic).
template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int i = 0; i < at::vec::Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

// The sum over a row's `count` vectors of their terms, step(k, sum) returning sum plus the
// terms of vector k, in four accumulators that take the vectors in turn (vectors k, k + 4,
// ... in one), where one accumulator would make every add wait for the one before it (a chain
// of dependent adds runs at their latency, not their throughput). The loop is unrolled by
// hand into named accumulators: GCC keeps an array of vectors in memory (a store and a load
// in every step), and accumulators moved round in a rolled loop put register moves on the
// chains. The order of the sums depends on `count` alone.
template <typename Vec, typename Step>
Vec interleaved_sum(int64_t count, const Vec& zero, const Step& step) {
  Vec first = zero, second = zero, third = zero, fourth = zero;
  int64_t k = 0;
  for (; k + 4 <= count; k += 4) {
    first = step(k, first);
    second = step(k + 1, second);
    third = step(k + 2, third);
    fourth = step(k + 3, fourth);
  }
  for (; k < count; ++k) first = step(k, first);
  return (first + second) + (third + fourth);
}

template <typename T>
inline T lane_max(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T best = lanes[0];
  for (int i = 1; i < at::vec::Vectorized<T>::size(); ++i) best = nan_max(best, lanes[i]);
  return best;
}

// First index of a contiguous row whose value equals `best` (the row's maximum, so ties go
// to the lowest index; a NaN maximum matches the first NaN).
template <typename scalar_t>
int64_t first_index_of(const scalar_t* row, int64_t size, at::opmath_type<scalar_t> best) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  int64_t p = 0;
  if (!std::isnan(best)) {
    const Vec target(best);
    constexpr int kLanes = Vec::size();
    constexpr int kAllLanes = (1 << kLanes) - 1;
    const int64_t vector_end = size / V::size() * V::size();
    if (vector_end <= 64) {
      // Rows of up to 64 positions (deep stages: 16, 49, 64): the lanes equal to best gathered
      // into one mask before one branch. Which vector holds a row's maximum is random, and a
      // branch per vector mispredicted on most such rows: a third of cbam's forward at 4 x 4.
      uint64_t equal = 0;
      for (; p < vector_end; p += V::size()) {
        const auto chunk = V::load(row + p);
        for (int k = 0; k < V::kVecs; ++k) {
          const int differs = (chunk[k] == target).zero_mask();  // bit set: lane != best
          equal |= static_cast<uint64_t>(~differs & kAllLanes) << (p + k * kLanes);
        }
      }
      if (equal != 0) return __builtin_ctzll(equal);
    } else {
      for (; p < vector_end; p += V::size()) {
        const auto chunk = V::load(row + p);
        for (int k = 0; k < V::kVecs; ++k) {
          const int differs = (chunk[k] == target).zero_mask();
          if (differs != kAllLanes) return p + k * Vec::size() + __builtin_ctz(~differs);
        }
      }
    }
  }
  for (; p < size; ++p) {
    const auto v = static_cast<at::opmath_type<scalar_t>>(row[p]);
    if (v == best || (std::isnan(best) && std::isnan(v))) return p;
  }
  return 0;  // unreachable for a maximum taken from this row; never an out-of-range index
}

// exp with at::vec's exp_u20 (20 ulp, the exp torch.compile's CPU code uses; faster than exp
// and more accurate than softmax or sigmoid weights need), except that exp_u20 clamps its
// argument, turning NaN and +inf into 3.4e38: those pass through unchanged here (exp(NaN) =
// NaN, exp(inf) = inf), so non-finite values propagate as in eager PyTorch.
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> exp_u20_nonfinite(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  const Vec passthrough = v.isnan() | (v == Vec(std::numeric_limits<T>::infinity()));
  return Vec::blendv(v.exp_u20(), v, passthrough);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
