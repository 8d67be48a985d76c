// Weights computed per element of x (score maps with a score channel per channel of x):
// built once per vector instruction set (see ../vector_isa.h). Compute-bound at the sizes
// that matter (an exponential and a division per element), so vector width is their speed.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../vec.h"
#include "../vector_isa.h"

namespace cnn_attention {
namespace ops {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

// body(offset, count) over [0, numel) in vectors of OpmathVec<scalar_t>::size() elements
// (count is smaller only for the last), in parallel. A partial vector goes through the
// vector code too (load_partial / store_partial), so every element gets the same arithmetic
// whatever the split: results do not depend on the number of threads.
//
// Each task makes its own body (make_body() returns it, capturing by value): the body's
// pointers and constants are then locals of the task that nothing else can reach. Captured by
// reference they would be loaded again after every vector store, which the compiler must assume
// may write anywhere (the intrinsics' vector types may alias any object).
template <typename scalar_t, typename MakeBody>
void for_each_vector(int64_t numel, const MakeBody& make_body) {
  constexpr int64_t kSize = OpmathVec<scalar_t>::size();
  const int64_t vectors = (numel + kSize - 1) / kSize;
  at::parallel_for(0, vectors, grain_for(kSize), [&](int64_t begin, int64_t end) {
    const auto body = make_body();
    for (int64_t v = begin; v < end; ++v) body(v * kSize, std::min(kSize, numel - v * kSize));
  });
}

template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> vec_sigmoid(const at::vec::Vectorized<T>& z) {
  const at::vec::Vectorized<T> one(T(1));
  // exp_u20 (see cpu/vec.h) is faster than exp and accurate enough for a weight in (0, 1);
  // sigmoid(NaN) = NaN, sigmoid(-inf) = 0 exactly.
  return one / (one + cpu::exp_u20_nonfinite(z.neg()));
}

// The per-element weight a(s) of ElementwiseWeights, one definition for the forward and the
// backward, so that the backward's recomputed threshold mask is the forward's bit for bit.
template <typename T>
struct ScoreWeight {
  using Vec = at::vec::Vectorized<T>;
  Vec temperature, threshold;
  bool divide, hard;

  explicit ScoreWeight(const ElementwiseWeights& how)
      : temperature(static_cast<T>(how.temperature)),
        threshold(static_cast<T>(how.threshold)),
        // s / 1 is s: the division, the costliest instruction here, only where it changes a value.
        divide(how.temperature != 1.0),
        hard(how.weight == ElementwiseWeights::Weight::Threshold) {}

  // sigmoid(s / T).
  C10_ALWAYS_INLINE Vec soft(const Vec& s) const {
    return vec_sigmoid(divide ? s / temperature : s);
  }
  // From soft = sigmoid(s / T): the 0/1 step soft > t for Weight::Threshold, else soft.
  C10_ALWAYS_INLINE Vec weight(const Vec& soft) const {
    return hard ? Vec::blendv(Vec(T(0)), Vec(T(1)), soft > threshold) : soft;
  }
};

template <typename scalar_t>
void scale_by_scores_typed(const scalar_t* x, const scalar_t* s, scalar_t* y, scalar_t* mask,
                           int64_t numel, const ElementwiseWeights& how) {
  using V = OpmathVec<scalar_t>;
  const ScoreWeight<typename V::opmath_t> a(how);
  for_each_vector<scalar_t>(numel, [&] {
    return [=](int64_t at, int64_t count) C10_ALWAYS_INLINE_ATTRIBUTE {
      const auto xs = load_partial(x + at, count);
      const auto ss = load_partial(s + at, count);
      typename V::Chunk ys, weights;
      for (int k = 0; k < V::kVecs; ++k) {
        weights[k] = a.weight(a.soft(ss[k]));
        ys[k] = xs[k] * weights[k];
      }
      store_partial(y + at, ys, count);
      if (mask != nullptr) store_partial(mask + at, weights, count);
    };
  });
}

template <typename scalar_t>
void scale_by_scores_backward_typed(const scalar_t* grad, const scalar_t* x, const scalar_t* s,
                                    const scalar_t* mask, scalar_t* grad_x, scalar_t* grad_scores,
                                    int64_t numel, const ElementwiseWeights& how) {
  using V = OpmathVec<scalar_t>;
  using Vec = typename V::Vec;
  const ScoreWeight<typename V::opmath_t> a(how);
  const Vec one(1);
  const bool given_mask = how.weight == ElementwiseWeights::Weight::Mask;
  const bool sigmoid_factor = how.score_factor == ElementwiseWeights::ScoreFactor::Sigmoid;
  for_each_vector<scalar_t>(numel, [&] {
    return [=](int64_t at, int64_t count) C10_ALWAYS_INLINE_ATTRIBUTE {
      const auto gs = load_partial(grad + at, count);
      const auto xs = load_partial(x + at, count);
      const auto ss = load_partial(s + at, count);
      typename V::Chunk masks;
      if (given_mask) masks = load_partial(mask + at, count);
      typename V::Chunk gx, gscores;
      for (int k = 0; k < V::kVecs; ++k) {
        const Vec soft = a.soft(ss[k]);
        gx[k] = gs[k] * (given_mask ? masks[k] : a.weight(soft));
        Vec factor = one;
        if (sigmoid_factor) {
          factor = soft * (one - soft);
          if (a.divide) factor = factor / a.temperature;
        }
        gscores[k] = gs[k] * xs[k] * factor;
      }
      store_partial(grad_x + at, gx, count);
      store_partial(grad_scores + at, gscores, count);
    };
  });
}

}  // namespace

void shifted_exps(const float* s, int64_t count, float temperature, bool divide, float best,
                  const float* const* prefetch, float* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int kPrefetchRows = 3;
  const Vec t(temperature), b(best);
  for (int64_t p = 0; p < count; p += Vec::size()) {
    // A prefetch per row and vector: one per cache line at AVX-512's width.
    for (int r = 0; r < kPrefetchRows; ++r) {
      if (prefetch[r] != nullptr) __builtin_prefetch(prefetch[r] + p, 0, 2);
    }
    const int lanes = static_cast<int>(std::min<int64_t>(Vec::size(), count - p));
    Vec z = Vec::loadu(s + p, lanes);
    if (divide) z = z / t;
    cpu::exp_u20_nonfinite(z - b).store(out + p, lanes);
  }
}

void scale_by_scores(const at::Tensor& x, const at::Tensor& scores, const ElementwiseWeights& how,
                     at::Tensor& y, at::Tensor& mask) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "per-element score weights (cpu)", [&] {
        scale_by_scores_typed(x.const_data_ptr<scalar_t>(), scores.const_data_ptr<scalar_t>(),
                              y.data_ptr<scalar_t>(),
                              mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, x.numel(), how);
      });
}

void scale_by_scores_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scores,
                              const at::Tensor& mask, const ElementwiseWeights& how,
                              at::Tensor& grad_x, at::Tensor& grad_scores) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "per-element score weights backward (cpu)", [&] {
        scale_by_scores_backward_typed(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            scores.const_data_ptr<scalar_t>(),
            mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr, grad_x.data_ptr<scalar_t>(),
            grad_scores.data_ptr<scalar_t>(), x.numel(), how);
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
