// The fixed-order matrix product of ../gemm.h, built once per vector instruction set (see
// ../vector_isa.h). Each element's sum runs along k inside one vector lane, so the AVX-512
// build (16 floats a vector) gives the AVX2 build's bits (8 floats) and is twice as wide.

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>

#include "../vector_isa.h"

namespace cnn_attention {
namespace ops {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

#if defined(CPU_CAPABILITY_AVX512)
// 8 rows by 3 vectors: 24 of the 32 vector registers hold sums, and each load of b serves 8
// rows.
constexpr int kTileRows = 8;
#else
// 4 rows by 3 vectors: 12 of the 16 vector registers hold sums.
constexpr int kTileRows = 4;
#endif
// The last columns, fewer than a vector, run as tiles of one vector (of half the width where they
// fit in it, HalfLanes) where the instruction set has masked stores: their b rows are read from
// a copy padded with zeros to whole vectors (pad_last_columns, or pack_b's last chunk) and only
// the tile's sums are stored or loaded with a mask. A column computed one at a time is a chain of dependent multiply-adds, bound by
// their latency: with products 49 columns wide (a 7 x 7 map's positions) the forward of a
// 2048-channel block took 110 ms that way, 77 ms with the mask. b itself read with masked
// loads along k ran at half the speed of whole vectors in the AVX-512 build: GCC cannot move
// the sums' stores out of a loop that holds AVX-512's masked-load builtin, and stored every sum
// to the stack at every step.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kMaskedLastColumns = true;
#else
constexpr bool kMaskedLastColumns = false;
#endif

// How a tile reads and writes the columns of its sums: all of a vector's lanes (WholeVectors),
// or only the first `count`, fewer than a vector (FirstLanes: the others load as zero, are
// never stored, and no memory beyond the first `count` elements is touched). b's rows are
// always read as whole vectors.
template <typename T>
struct WholeVectors {
  using Vec = at::vec::Vectorized<T>;
  Vec load(const T* p) const { return Vec::loadu(p); }
  void store(const Vec& v, T* p) const { v.store(p); }
};

template <typename T>
struct FirstLanes {
  using Vec = at::vec::Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX2)
  // AVX2's masked loads and stores, written out: at::vec's loadu(p, count) copies through a
  // stack buffer in older torch releases.
  __m256i mask;
  explicit FirstLanes(int64_t count)
      : mask(std::is_same_v<T, float>
                 ? _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
                 : _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3))) {}
  Vec load(const T* p) const {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_maskload_ps(p, mask);
    } else {
      return _mm256_maskload_pd(p, mask);
    }
  }
  void store(const Vec& v, T* p) const {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_maskstore_ps(p, mask, v);
    } else {
      _mm256_maskstore_pd(p, mask, v);
    }
  }
#else
  int64_t count;
  explicit FirstLanes(int64_t count) : count(count) {}
  Vec load(const T* p) const { return Vec::loadu(p, count); }
  void store(const Vec& v, T* p) const { v.store(p, count); }
#endif
};

#if defined(CPU_CAPABILITY_AVX512)
// A vector of AVX2's width (8 floats, 4 doubles) with what product_tile asks of a vector type.
template <typename T>
struct HalfNative {
  using type = __m256;
};
template <>
struct HalfNative<double> {
  using type = __m256d;
};

template <typename T>
struct HalfVector {
  using Native = typename HalfNative<T>::type;
  Native v;

  HalfVector() = default;
  HalfVector(Native v) : v(v) {}
  explicit HalfVector(T value) {
    if constexpr (std::is_same_v<T, float>) {
      v = _mm256_set1_ps(value);
    } else {
      v = _mm256_set1_pd(value);
    }
  }
  static constexpr int64_t size() { return 32 / sizeof(T); }
  static HalfVector loadu(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_loadu_ps(p);
    } else {
      return _mm256_loadu_pd(p);
    }
  }
  HalfVector operator*(const HalfVector& other) const {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_mul_ps(v, other.v);
    } else {
      return _mm256_mul_pd(v, other.v);
    }
  }
  HalfVector operator+(const HalfVector& other) const {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_add_ps(v, other.v);
    } else {
      return _mm256_add_pd(v, other.v);
    }
  }
};

template <typename T>
HalfVector<T> fmadd(const HalfVector<T>& a, const HalfVector<T>& b, const HalfVector<T>& c) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_fmadd_ps(a.v, b.v, c.v);
  } else {
    return _mm256_fmadd_pd(a.v, b.v, c.v);
  }
}

// The first `count` columns, at most half a vector, in vectors of half the width, with
// AVX-512VL's masks: a 512-bit multiply-add with half its lanes masked off costs what a whole
// one does (on AMD's Zen 4, which runs it as two 256-bit halves, twice what a 256-bit one
// does), and products a few columns wide are common (the channel MLP's forward has one column
// per sample). Each lane's chain of fused multiply-adds is the same at either width.
template <typename T>
struct HalfLanes {
  using Vec = HalfVector<T>;
  __mmask8 mask;
  explicit HalfLanes(int64_t count) : mask(static_cast<__mmask8>((1u << count) - 1)) {}
  Vec load(const T* p) const {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_maskz_loadu_ps(mask, p);
    } else {
      return _mm256_maskz_loadu_pd(mask, p);
    }
  }
  void store(const Vec& v, T* p) const {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_mask_storeu_ps(p, mask, v.v);
    } else {
      _mm256_mask_storeu_pd(p, mask, v.v);
    }
  }
};
#endif

// A b of at most this many bytes (its rows counted as read_width) stays in a core's L2 cache
// (512 KiB on the AMD EPYC measured, more on Intel's) while each row group streams all of it:
// one pass over k, nothing copied but the last columns' padded rows.
constexpr int64_t kOnePassBytes = 256 * 1024;
// A larger b runs in blocks: depth blocks of kDepthBlock steps along k, each in panels of b's
// columns (kPanelBytes of b rows), each panel copied into a buffer tile by tile (pack_b) where
// several row groups read it. A tile then reads its b rows one after another, instead of a few
// vectors from each of `depth` rows in place (rows that, in a wide b, lie a multiple of 4 KiB
// apart and compete for the same L1 cache sets). a is read once per panel; between depth
// blocks each element's running sum is stored as it is and loaded again, so its chain of fused
// multiply-adds is that of one pass over k.
constexpr int64_t kDepthBlock = 512;
constexpr int64_t kPanelBytes = 128 * 1024;

// Where a tile's sums begin and end, for a product in one pass over k (kWhole) or a depth block
// of it (the first, a middle one, the last): they begin at zero or at the running sums of the
// previous block, and end as running sums (stored as they are) or as alpha * sum, stored into
// c or, with `accumulate`, added to it.
enum class DepthStage { kWhole, kFirst, kMiddle, kLast };

constexpr bool continues(DepthStage stage) {
  return stage == DepthStage::kMiddle || stage == DepthStage::kLast;
}
constexpr bool ends_running(DepthStage stage) {
  return stage == DepthStage::kFirst || stage == DepthStage::kMiddle;
}

// A tile's running sums (m x n, row-major, rows `ld` apart), c, and how c is written.
template <typename T>
struct Sums {
  T* running;
  int64_t running_ld;
  T* c;
  int64_t ldc;
  T alpha;
  bool accumulate;

  // The same for the tile whose first element is (i, j). (A product in one pass has no
  // running sums: null, not offset.)
  Sums at(int64_t i, int64_t j) const {
    T* tile_running = running == nullptr ? nullptr : running + i * running_ld + j;
    return {tile_running, running_ld, c + i * ldc + j, ldc, alpha, accumulate};
  }
};

// The sums of a (kRows x kVecs vectors) tile over l < k of a(i, l) * b(l, :), with
// a(i, l) = a[i * a_row + l * a_col] (any strides: a row-major block, or with a_row = 1 a
// transposed one) and b row-major with contiguous rows of whole vectors. The sums stay in
// registers; b's vectors are loaded once per l for all kRows rows. `lanes` gives the vector type
// and reads and writes the sums' columns (all, or the first few with kVecs = 1).
template <DepthStage kStage, typename T, int kRows, int kVecs, typename Lanes>
C10_ALWAYS_INLINE void product_tile(int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b,
                                    int64_t ldb, const Sums<T>& ends, const Lanes& lanes) {
  using Vec = typename Lanes::Vec;
  using at::vec::fmadd;
  Vec sums[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      if constexpr (continues(kStage)) {
        sums[r][v] = lanes.load(ends.running + r * ends.running_ld + v * Vec::size());
      } else {
        sums[r][v] = Vec(T(0));
      }
    }
  }
  const T* a_rows[kRows];
  for (int r = 0; r < kRows; ++r) a_rows[r] = a + r * a_row;
  for (int64_t l = 0; l < k; ++l, b += ldb) {
    Vec b_columns[kVecs];
    for (int v = 0; v < kVecs; ++v) b_columns[v] = Vec::loadu(b + v * Vec::size());
    for (int r = 0; r < kRows; ++r) {
      const Vec weight(*a_rows[r]);
      a_rows[r] += a_col;
      for (int v = 0; v < kVecs; ++v) sums[r][v] = fmadd(weight, b_columns[v], sums[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      if constexpr (ends_running(kStage)) {
        lanes.store(sums[r][v], ends.running + r * ends.running_ld + v * Vec::size());
      } else {
        T* out = ends.c + r * ends.ldc + v * Vec::size();
        const Vec result = sums[r][v] * Vec(ends.alpha);
        lanes.store(ends.accumulate ? result + lanes.load(out) : result, out);
      }
    }
  }
}

// The last columns, fewer than a vector, one at a time: the same fused multiply-adds in the
// same order as a vector lane, so a column's values do not depend on where the vectors end.
template <DepthStage kStage, typename T, int kRows>
void product_tail(int64_t k, int64_t columns, const T* a, int64_t a_row, int64_t a_col, const T* b,
                  int64_t ldb, const Sums<T>& ends) {
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < columns; ++j) {
      T sum = continues(kStage) ? ends.running[r * ends.running_ld + j] : T(0);
      for (int64_t l = 0; l < k; ++l) sum = std::fma(a[r * a_row + l * a_col], b[l * ldb + j], sum);
      if constexpr (ends_running(kStage)) {
        ends.running[r * ends.running_ld + j] = sum;
      } else {
        T& out = ends.c[r * ends.ldc + j];
        const T result = ends.alpha * sum;
        out = ends.accumulate ? result + out : result;
      }
    }
  }
}

// The column tiles of a row of n: 3 vectors wide while they fit, then 2, then 1, then the last
// columns, fewer than a vector: visit(j, vectors tag) for each, or visit(j, columns) for the last.
template <typename T, typename Visit>
C10_ALWAYS_INLINE void for_each_column_tile(int64_t n, const Visit& visit) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  int64_t j = 0;
  for (; j + 3 * kWidth <= n; j += 3 * kWidth) visit(j, std::integral_constant<int, 3>{});
  for (; j + 2 * kWidth <= n; j += 2 * kWidth) visit(j, std::integral_constant<int, 2>{});
  for (; j + kWidth <= n; j += kWidth) visit(j, std::integral_constant<int, 1>{});
  if (j < n) visit(j, n - j);
}

// Rows in groups of kTileRows, then 4, then 1: visit(i, rows tag) for each group.
template <typename Visit>
C10_ALWAYS_INLINE void for_each_row_group(int64_t m, const Visit& visit) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) visit(i, std::integral_constant<int, kTileRows>{});
  if constexpr (kTileRows > 4) {
    for (; i + 4 <= m; i += 4) visit(i, std::integral_constant<int, 4>{});
  }
  for (; i < m; ++i) visit(i, std::integral_constant<int, 1>{});
}

// The a operand of one depth block: a(i, l) = data[i * row + l * col], read in place, or
// packed: each row group of R rows stored l-major from element i * depth on, so that a tile's
// loads of a(i + r, l) follow each other in memory (a(i + r, l) = data[i * depth + l * R + r]).
template <typename T>
struct AOperand {
  const T* data;
  int64_t row, col, depth;
  bool packed;

  // Rows [i, i + rows) as the tile functions read them: first element, row and column strides.
  std::tuple<const T*, int64_t, int64_t> group(int64_t i, int64_t rows) const {
    if (packed) return {data + i * depth, 1, rows};
    return {data + i * row, row, col};
  }
};

// Copies a depth block of a, (m x depth) from column `first` on, into `packed` (AOperand).
template <typename T>
void pack_a(int64_t m, int64_t first, int64_t depth, const T* a, int64_t a_row, int64_t a_col,
            T* packed) {
  for_each_row_group(m, [&](int64_t i, auto rows_tag) {
    constexpr int kRows = decltype(rows_tag)::value;
    T* group = packed + i * depth;
    if (a_row == 1) {
      // A transposed a: the group's kRows values of each step along k are neighbours, one load.
      for (int64_t l = 0; l < depth; ++l) {
        std::memcpy(group + l * kRows, a + i + (first + l) * a_col, kRows * sizeof(T));
      }
      return;
    }
    for (int64_t l = 0; l < depth; ++l) {
      for (int r = 0; r < kRows; ++r) {
        group[l * kRows + r] = a[(i + r) * a_row + (first + l) * a_col];
      }
    }
  });
}

// The width of the rows in which tiles read `columns` columns of b: with masked last columns,
// rounded up to whole vectors (the last ones from a copy padded with zeros).
template <typename T>
constexpr int64_t read_width(int64_t columns) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  return kMaskedLastColumns ? (columns + kWidth - 1) / kWidth * kWidth : columns;
}

// Copies `depth` rows of `count` columns of b (fewer than a vector) into `padded`, one vector
// per row, the lanes past `count` zero.
template <typename T>
void pad_last_columns(int64_t depth, int64_t count, const T* b, int64_t ldb, T* padded) {
  using Vec = at::vec::Vectorized<T>;
  const FirstLanes<T> lanes(count);
  for (int64_t l = 0; l < depth; ++l) lanes.load(b + l * ldb).store(padded + l * Vec::size());
}

// The tile of the row group of kRows rows from i (rows_tag) and the column tile from j
// (vectors tag, or a count of columns fewer than a vector), whose b columns begin at b_tile:
// with a count and masked last columns, rows of whole vectors (padded).
template <DepthStage kStage, typename T, typename RowsTag, typename Width>
C10_ALWAYS_INLINE void tile(int64_t i, RowsTag, int64_t j, Width width, const AOperand<T>& a,
                            const T* b_tile, int64_t ldb, const Sums<T>& sums) {
  constexpr int kRows = RowsTag::value;
  const auto [a_rows, a_row, a_col] = a.group(i, kRows);
  const Sums<T> ends = sums.at(i, j);
  if constexpr (!std::is_integral_v<Width>) {
    product_tile<kStage, T, kRows, Width::value>(a.depth, a_rows, a_row, a_col, b_tile, ldb, ends,
                                                 WholeVectors<T>{});
  } else if constexpr (kMaskedLastColumns) {
#if defined(CPU_CAPABILITY_AVX512)
    if (width <= HalfVector<T>::size()) {
      product_tile<kStage, T, kRows, 1>(a.depth, a_rows, a_row, a_col, b_tile, ldb, ends,
                                        HalfLanes<T>(width));
      return;
    }
#endif
    product_tile<kStage, T, kRows, 1>(a.depth, a_rows, a_row, a_col, b_tile, ldb, ends,
                                      FirstLanes<T>(width));
  } else {
    product_tail<kStage, T, kRows>(a.depth, width, a_rows, a_row, a_col, b_tile, ldb, ends);
  }
}

// Every tile of one pass over (a depth block of) k, row group by row group, each along all
// column tiles. This and tiles_of_packed_panel are kept out of their callers: inlined into
// block_product_kernel, GCC kept a tile's sums on the stack instead of in registers (a third of
// the speed).
template <DepthStage kStage, typename T>
C10_NOINLINE void tiles_by_rows(int64_t m, int64_t n, const AOperand<T>& a, const T* b, int64_t ldb,
                                const Sums<T>& sums) {
  constexpr int64_t kWidth = at::vec::Vectorized<T>::size();
  const int64_t whole = n / kWidth * kWidth;
  const bool padded = kMaskedLastColumns && whole < n;
  const std::unique_ptr<T[]> last_columns(padded ? new T[a.depth * kWidth] : nullptr);
  if (padded) pad_last_columns(a.depth, n - whole, b + whole, ldb, last_columns.get());
  for_each_row_group(m, [&](int64_t i, auto rows_tag) {
    for_each_column_tile<T>(n, [&](int64_t j, auto width) {
      if constexpr (kMaskedLastColumns && std::is_integral_v<decltype(width)>) {
        tile<kStage>(i, rows_tag, j, width, a, last_columns.get(), kWidth, sums);
      } else {
        tile<kStage>(i, rows_tag, j, width, a, b + j, ldb, sums);
      }
    });
  });
}

// The width of the column chunks that pack_b stores b's panels in: a tile of 3 vectors.
template <typename T>
constexpr int64_t kChunkColumns = 3 * at::vec::Vectorized<T>::size();

// Copies the first `depth` rows of b's columns [0, width) into `packed`, in chunks of
// kChunkColumns columns: chunk c is the `depth` rows of its columns (fewer in the last chunk,
// its rows read_width apart, padded with zeros), one after another.
template <typename T>
void pack_b(int64_t depth, int64_t width, const T* b, int64_t ldb, T* packed) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < width; j += kChunkColumns<T>) {
    const int64_t columns = std::min(kChunkColumns<T>, width - j);
    if (columns == kChunkColumns<T>) {
      // Whole chunks by vectors: a memcpy of a size known only at run time is a `rep movs`
      // here, whose start-up cost per row made the packing a third of the product's time.
      for (int64_t l = 0; l < depth; ++l) {
        for (int64_t v = 0; v < kChunkColumns<T> / Vec::size(); ++v) {
          Vec::loadu(b + l * ldb + j + v * Vec::size())
              .store(packed + l * columns + v * Vec::size());
        }
      }
    } else {
      const int64_t stride = read_width<T>(columns);
      for (int64_t l = 0; l < depth; ++l) {
        std::memcpy(packed + l * stride, b + l * ldb + j, columns * sizeof(T));
        std::memset(packed + l * stride + columns, 0, (stride - columns) * sizeof(T));
      }
    }
    packed += depth * read_width<T>(columns);
  }
}

// Every tile of a panel of `width` columns packed by pack_b: row group by row group, each along
// the chunks (a chunk is one tile of 3 vectors, or the tiles of the last columns).
template <DepthStage kStage, typename T>
C10_NOINLINE void tiles_of_packed_panel(int64_t m, int64_t width, const AOperand<T>& a,
                                        const T* packed, const Sums<T>& sums) {
  for_each_row_group(m, [&](int64_t i, auto rows_tag) {
    const T* chunk = packed;
    for (int64_t j = 0; j < width; j += kChunkColumns<T>) {
      const int64_t columns = std::min(kChunkColumns<T>, width - j);
      const int64_t stride = read_width<T>(columns);
      const Sums<T> chunk_sums = sums.at(0, j);
      for_each_column_tile<T>(columns, [&](int64_t jj, auto tile_width) {
        tile<kStage>(i, rows_tag, jj, tile_width, a, chunk + jj, stride, chunk_sums);
      });
      chunk += a.depth * stride;
    }
  });
}

// The tiles of one depth block of the blocked product, panel by panel of `panel` columns: the
// panel's b rows (packed into `packed_b` where given) stay in the cache while every row group
// runs along the panel, and each row group's a stays in the L1 cache along it.
template <DepthStage kStage, typename T>
void tiles_by_panels(int64_t m, int64_t n, int64_t panel, const AOperand<T>& a, const T* b,
                     int64_t ldb, T* packed_b, const Sums<T>& sums) {
  for (int64_t j = 0; j < n; j += panel) {
    const int64_t width = std::min(panel, n - j);
    if (packed_b != nullptr) {
      pack_b(a.depth, width, b + j, ldb, packed_b);
      tiles_of_packed_panel<kStage>(m, width, a, packed_b, sums.at(0, j));
    } else {
      tiles_by_rows<kStage>(m, width, a, b + j, ldb, sums.at(0, j));
    }
  }
}

}  // namespace

template <typename T>
void block_product_kernel(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_row,
                          int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,
                          int64_t ldc) {
  const Sums<T> into_c{nullptr, 0, c, ldc, alpha, accumulate};
  if (k * read_width<T>(n) * static_cast<int64_t>(sizeof(T)) <= kOnePassBytes) {
    // One pass, row group by row group (all of b stays in the cache), reading a in place.
    tiles_by_rows<DepthStage::kWhole, T>(m, n, AOperand<T>{a, a_row, a_col, k, false}, b, ldb,
                                         into_c);
    return;
  }
  // The blocked product. A transposed a (each step along k a new cache line for a row group)
  // read by several chunks is packed block by block; b is packed where more than two row
  // groups read it.
  const int64_t depth_block = std::min(k, kDepthBlock);
  const int64_t panel =
      std::max<int64_t>(kChunkColumns<T>, kPanelBytes / (depth_block * sizeof(T)) /
                                              kChunkColumns<T> * kChunkColumns<T>);
  const bool pack_a_blocks = a_col != 1 && n > kChunkColumns<T>;
  const bool pack_b_panels = m > 2 * kTileRows;
  // Scratch left uninitialized (each element is written before it is read) and not a
  // std::vector: its constructor, a std:: function compiled into both builds, could be kept
  // from this build with AVX-512 instructions (tests/python/test_vector_isa.py).
  const std::unique_ptr<T[]> packed_a(pack_a_blocks ? new T[m * depth_block] : nullptr);
  const std::unique_ptr<T[]> packed_b(pack_b_panels ? new T[depth_block * panel] : nullptr);
  const std::unique_ptr<T[]> running(k > depth_block ? new T[m * n] : nullptr);
  const Sums<T> sums{running.get(), n, c, ldc, alpha, accumulate};
  for (int64_t first = 0; first < k; first += depth_block) {
    const int64_t depth = std::min(depth_block, k - first);
    if (pack_a_blocks) pack_a(m, first, depth, a, a_row, a_col, packed_a.get());
    const AOperand<T> block = pack_a_blocks
                                  ? AOperand<T>{packed_a.get(), 0, 0, depth, true}
                                  : AOperand<T>{a + first * a_col, a_row, a_col, depth, false};
    const T* b_block = b + first * ldb;
    if (depth == k) {
      tiles_by_panels<DepthStage::kWhole>(m, n, panel, block, b_block, ldb, packed_b.get(), into_c);
    } else if (first == 0) {
      tiles_by_panels<DepthStage::kFirst>(m, n, panel, block, b_block, ldb, packed_b.get(), sums);
    } else if (first + depth < k) {
      tiles_by_panels<DepthStage::kMiddle>(m, n, panel, block, b_block, ldb, packed_b.get(), sums);
    } else {
      tiles_by_panels<DepthStage::kLast>(m, n, panel, block, b_block, ldb, packed_b.get(), sums);
    }
  }
}

template void block_product_kernel<float>(int64_t, int64_t, int64_t, float, const float*, int64_t,
                                          int64_t, const float*, int64_t, bool, float*, int64_t);
template void block_product_kernel<double>(int64_t, int64_t, int64_t, double, const double*,
                                           int64_t, int64_t, const double*, int64_t, bool, double*,
                                           int64_t);

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ops
}  // namespace cnn_attention
