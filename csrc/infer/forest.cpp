#include "infer/forest.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTML_FOREST_X86 1
#else
#define FASTML_FOREST_X86 0
#endif

#include "common/checksum.hpp"
#include "common/cpu_features.hpp"
#include "common/errors.hpp"
#include "common/thread_pool.hpp"
#include "infer/forest_binned.hpp"
#include "infer/forest_kernel.hpp"

namespace fastml::infer {

namespace {

constexpr int32_t kMaxTreeDepth = 4096;
constexpr int32_t kMaxOutputs = 1 << 20;
// Rows per block: a block walks every tree while the tree's nodes are hot in
// cache, so the model streams through the cache once per block.
constexpr int64_t kBlockRows = 128;
// Most bytes of per-thread scratch a prediction keeps (a block of rows as
// thresholds): rows per block shrink for models with many features (one row
// of a 4M-feature model is 16 MB), so memory follows the work, not the model.
constexpr int64_t kScratchBytes = int64_t{16} << 20;
// Independent walks interleaved in one loop, so their loads overlap.
constexpr int kLanes = 16;
// Lanes of the explicit-layout binned walk: lock-stepped lanes walk as deep as
// their deepest row, so fewer than kLanes here (measured on LightGBM default
// models: 8 lanes 1,049-1,092 us, 12: 1,067, 16: 1,144, 6: 1,242, 4: 1,363).
constexpr int kBinLanes = 8;
// Trees walked together for one row: more independent node loads in flight.
constexpr int kRowLanes = 16;
// Rows per block on the binned path (see BinNode): 2 * features * kBinRows
// uint16 bins per block.
constexpr int64_t kBinRows = 256;
// Perfect layout of the binned path: every tree padded to a complete tree of
// its depth D, stored level by level, so the children of local node i are
// 2i+1 and 2i+2 and a node is one uint32: threshold bin (low 16 bits) |
// column (high 16 bits). A leaf above depth D becomes a node that always
// goes left (threshold kBinTop) over copies of itself. Used while the padding
// costs at most kPerfectSlack times the real node count.
constexpr int32_t kMaxPerfectDepth = 16;
// Rows walked together by the scalar walk of the perfect layout (8, 12 and 16
// measured the same on the development machine).
constexpr int kPerfectLanes = 8;
// The scalar walk's lanes are independent scalar chains; GCC's partial
// vectorisation of their index updates costs more than it saves (measured).
#if defined(__GNUC__) && !defined(__clang__)
#define FASTML_FOREST_NO_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#else
#define FASTML_FOREST_NO_VECTORIZE
#endif
constexpr int64_t kPerfectSlack = 4;

// Levels walked with SIMD across rows (AVX2, see perfect_top_avx2): level d
// compares all 2^d candidate nodes of the level for 16 rows at once, which
// beats 16 scalar steps while 2^d is small. Measured on the development
// machine (AMD EPYC, Zen 3): 4 levels pay; gathering nodes and bins per row
// (8 rows per step with vpgatherdd) was slower than the scalar walk.
constexpr int32_t kSimdLevels = 4;

#if FASTML_FOREST_X86
// The first L (<= kSimdLevels) levels of one perfect tree for rows [0, nrows)
// of a block (nrows a multiple of 16; bins with column stride kBinRows):
// writes each row's local node index at depth L to idx[r].
__attribute__((target("avx2"))) void perfect_top_avx2(const uint32_t* nodes, int32_t L,
                                                      const Bin* bins, int64_t nrows,
                                                      uint32_t* idx) {
  const __m256i one = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < nrows; r += 16) {
    __m256i i = _mm256_setzero_si256();  // 16-bit node indices (< 2^kSimdLevels)
    for (int32_t d = 0; d < L; ++d) {
      const int32_t c0 = (1 << d) - 1;
      __m256i right = _mm256_setzero_si256();
      __m256i cv = _mm256_set1_epi16(static_cast<int16_t>(c0));
      for (int32_t c = c0; c <= 2 * c0; ++c) {
        const uint32_t nd = nodes[c];
        const __m256i x = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(bins + static_cast<int64_t>(nd >> 16) * kBinRows + r));
        // Signed compare of biased bins: "bin > threshold" sends the row right.
        const __m256i gt = _mm256_cmpgt_epi16(x, _mm256_set1_epi16(perfect_thr(nd)));
        right = _mm256_or_si256(right, _mm256_and_si256(gt, _mm256_cmpeq_epi16(i, cv)));
        cv = _mm256_add_epi16(cv, one);
      }
      i = _mm256_sub_epi16(_mm256_add_epi16(_mm256_add_epi16(i, i), one), right);  // right = -1
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + r),
                        _mm256_cvtepu16_epi32(_mm256_castsi256_si128(i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + r + 8),
                        _mm256_cvtepu16_epi32(_mm256_extracti128_si256(i, 1)));
  }
}

// QuickScorer over the binned explicit layout (Lucchese et al., SIGIR 2015,
// and its vectorised form, V-QuickScorer), for forests whose trees all have
// at most 32 leaves (LightGBM's defaults grow 31). Each tree's leaves are
// numbered left to right and its state is a 32-bit mask of leaves still
// reachable; a node that sends the row right clears the leaves of its left
// subtree, and the exit leaf is the lowest set bit left. The nodes of each
// bin column are sorted by threshold, so one scan per column visits exactly
// the nodes a row goes right at ("bin > thr") and stops at the first it does
// not. Sixteen (or eight) rows share a scan in the lanes of a vector (their
// masks are lanes too, per tree) until no lane goes right. No tree walk, no
// dependent loads: the cost is the number of nodes scanned.
//
// The QuickScorer tables of a forest (see Engine::build_qs): per bin column
// c, nodes [begin[c], begin[c + 1]) in thr / tree / lmask (lmask: the leaves
// of the node's left subtree), sorted by thr; cols[0..ncols) the columns with
// nodes; T trees.
struct QsTables {
  const int32_t* cols;
  int64_t ncols;
  const int32_t* begin;
  const int32_t* thr;
  const int32_t* tree;
  const uint32_t* lmask;
  int64_t T;
};

// qs_scan_avx2<Lanes>: rows [r, r + Lanes) of a block (bins with column
// stride kBinRows); masks[t * Lanes + lane] ends as tree t's remaining
// leaves. Lanes = 16 compares the bins as int16 (each node's loads,
// broadcast, compare and loop control shared by sixteen rows; the masks are
// two vectors per tree), Lanes = 8 as int32 (a block's last 8-15 rows).
template <int Lanes>
__attribute__((target("avx2"))) void qs_scan_avx2(const QsTables& q, const Bin* bins,
                                                  uint32_t* masks) {
  static_assert(Lanes == 8 || Lanes == 16, "8 or 16 rows per scan");
  const __m256i ones = _mm256_set1_epi32(-1);
  for (int64_t t = 0; t < q.T * Lanes / 8; ++t) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(masks + 8 * t), ones);
  }
  for (int64_t j = 0; j < q.ncols; ++j) {
    const int32_t c = q.cols[j];
    const Bin* col = bins + static_cast<int64_t>(c) * kBinRows;
    const __m256i x =
        Lanes == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col))
                    : _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col)));
    const int32_t end = q.begin[c + 1];  // a local: the mask stores may alias the int32 tables
    for (int32_t k = q.begin[c]; k < end; ++k) {
      const __m256i right =
          Lanes == 16 ? _mm256_cmpgt_epi16(x, _mm256_set1_epi16(static_cast<int16_t>(q.thr[k])))
                      : _mm256_cmpgt_epi32(x, _mm256_set1_epi32(q.thr[k]));
      if (_mm256_testz_si256(right, right)) break;  // thresholds ascend: no lane goes right again
      __m256i* m = reinterpret_cast<__m256i*>(masks + Lanes * static_cast<int64_t>(q.tree[k]));
      const __m256i lm = _mm256_set1_epi32(static_cast<int32_t>(q.lmask[k]));
      if constexpr (Lanes == 16) {
        const __m256i lo =
            _mm256_and_si256(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(right)), lm);
        const __m256i hi =
            _mm256_and_si256(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(right, 1)), lm);
        _mm256_storeu_si256(m, _mm256_andnot_si256(lo, _mm256_loadu_si256(m)));
        _mm256_storeu_si256(m + 1, _mm256_andnot_si256(hi, _mm256_loadu_si256(m + 1)));
      } else {
        _mm256_storeu_si256(
            m, _mm256_andnot_si256(_mm256_and_si256(right, lm), _mm256_loadu_si256(m)));
      }
    }
  }
}

// The exits of one output (K = 1) for eight rows of qs_scan_avx2: tree by
// tree, each row's lowest set mask bit (its bit index read off the exponent
// of the power of two as a float: exact for bits 0..31) selects the tree's
// leaf value (leaf_values[t * 32 + leaf]), gathered and added to the eight
// rows' sums in tree order: the same additions, in the same order, as the
// scalar add_leaf loop. out[0..8) holds the rows' base margins on entry.
__attribute__((target("avx2"))) inline __m256i qs_exit_index(const uint32_t* m, int64_t t,
                                                             int64_t stride) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + stride * t));
  const __m256i low = _mm256_and_si256(v, _mm256_sub_epi32(_mm256_setzero_si256(), v));
  const __m256i e = _mm256_and_si256(
      _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(low)), 23), _mm256_set1_epi32(0xFF));
  return _mm256_add_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(127)),
                          _mm256_set1_epi32(static_cast<int32_t>(32 * t)));
}

__attribute__((target("avx2"))) void qs_exits_avx2(const uint32_t* masks, int64_t stride, int64_t T,
                                                   const double* leaf_values, double* out) {
  __m256d a = _mm256_loadu_pd(out), b = _mm256_loadu_pd(out + 4);
  // The masked form with every lane on (the plain one leaves GCC warning
  // about its unused source operand).
  const __m256d zero = _mm256_setzero_pd();
  const __m256d all = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
  for (int64_t t = 0; t < T; ++t) {
    const __m256i i = qs_exit_index(masks, t, stride);
    a = _mm256_add_pd(
        a, _mm256_mask_i32gather_pd(zero, leaf_values, _mm256_castsi256_si128(i), all, 8));
    b = _mm256_add_pd(
        b, _mm256_mask_i32gather_pd(zero, leaf_values, _mm256_extracti128_si256(i, 1), all, 8));
  }
  _mm256_storeu_pd(out, a);
  _mm256_storeu_pd(out + 4, b);
}

__attribute__((target("avx2"))) void qs_exits_avx2(const uint32_t* masks, int64_t stride, int64_t T,
                                                   const float* leaf_values, float* out) {
  __m256 a = _mm256_loadu_ps(out);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t t = 0; t < T; ++t) {
    a = _mm256_add_ps(
        a, _mm256_mask_i32gather_ps(zero, leaf_values, qs_exit_index(masks, t, stride), all, 4));
  }
  _mm256_storeu_ps(out, a);
}

// Binning by compares instead of a search, for features with at most
// kSimdBinCuts cuts: `table` holds 16 fences (the last cut of each group of 16,
// +inf padded) and then the cuts in groups of 16 (+inf padded, one padded
// group more). The number of cuts below x is 16 * (fences below x) + (cuts of
// that group below x), each count one pair of vector compares and a popcount:
// about four cycles a value, against about 27 for eight interleaved binary
// searches (a third to a half of a default-parameter forest's predict).
// Ordered "<" compares: NaN counts 0 (its bins are set apart by the caller's
// rule), +inf padding never counts.
constexpr int32_t kSimdBinCuts = 256;

template <typename XT>
__attribute__((target("avx2,popcnt"))) void bin_simd_f32(const float* table, const char* src,
                                                         int64_t rs, int64_t n, Bin* lo, Bin* hi) {
  const __m256 f0 = _mm256_loadu_ps(table), f1 = _mm256_loadu_ps(table + 8);
  const float* groups = table + 16;
  for (int64_t r = 0; r < n; ++r) {
    const float x = static_cast<float>(*reinterpret_cast<const XT*>(src + r * rs));
    const __m256 xv = _mm256_set1_ps(x);
    const unsigned k = static_cast<unsigned>(
        __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(f0, xv, _CMP_LT_OQ)) |
                           (_mm256_movemask_ps(_mm256_cmp_ps(f1, xv, _CMP_LT_OQ)) << 8)));
    const float* g = groups + 16 * k;
    const int below =
        static_cast<int>(16 * k) +
        __builtin_popcount(
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g), xv, _CMP_LT_OQ)) |
            (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g + 8), xv, _CMP_LT_OQ)) << 8));
    const bool nan = x != x;
    const Bin b = static_cast<Bin>(below - kBinBias);
    lo[r] = nan ? kBinBottom : b;
    hi[r] = nan ? kBinTop : b;
  }
}

// How many of the 16 doubles in a..d are below x (xv: x broadcast).
__attribute__((target("avx2,popcnt"))) inline int below16_pd(__m256d a, __m256d b, __m256d c,
                                                             __m256d d, __m256d xv) {
  return __builtin_popcount(_mm256_movemask_pd(_mm256_cmp_pd(a, xv, _CMP_LT_OQ)) |
                            (_mm256_movemask_pd(_mm256_cmp_pd(b, xv, _CMP_LT_OQ)) << 4) |
                            (_mm256_movemask_pd(_mm256_cmp_pd(c, xv, _CMP_LT_OQ)) << 8) |
                            (_mm256_movemask_pd(_mm256_cmp_pd(d, xv, _CMP_LT_OQ)) << 12));
}

template <typename XT>
__attribute__((target("avx2,popcnt"))) void bin_simd_f64(const double* table, const char* src,
                                                         int64_t rs, int64_t n, Bin* lo, Bin* hi) {
  const __m256d f0 = _mm256_loadu_pd(table), f1 = _mm256_loadu_pd(table + 4);
  const __m256d f2 = _mm256_loadu_pd(table + 8), f3 = _mm256_loadu_pd(table + 12);
  const double* groups = table + 16;
  for (int64_t r = 0; r < n; ++r) {
    const double x = static_cast<double>(*reinterpret_cast<const XT*>(src + r * rs));
    const __m256d xv = _mm256_set1_pd(x);
    const int k = below16_pd(f0, f1, f2, f3, xv);
    const double* g = groups + 16 * k;
    const int below = 16 * k + below16_pd(_mm256_loadu_pd(g), _mm256_loadu_pd(g + 4),
                                          _mm256_loadu_pd(g + 8), _mm256_loadu_pd(g + 12), xv);
    const bool nan = x != x;
    const Bin b = static_cast<Bin>(below - kBinBias);
    lo[r] = nan ? kBinBottom : b;
    hi[r] = nan ? kBinTop : b;
  }
}
#endif

}  // namespace

// ------------------------------------------------------------------ engine

namespace {
std::atomic<bool> g_forest_simd{true};
}  // namespace

bool forest_cuda_general(int enable) {
  static std::atomic<bool> general{[] {
    const char* v = std::getenv("FASTML_FOREST_CUDA_KERNEL");
    return v != nullptr && std::strcmp(v, "general") == 0;
  }()};
  if (enable >= 0) general.store(enable != 0, std::memory_order_relaxed);
  return general.load(std::memory_order_relaxed);
}

bool forest_simd(int enable) {
  if (enable >= 0) g_forest_simd.store(enable != 0, std::memory_order_relaxed);
  return g_forest_simd.load(std::memory_order_relaxed) && cpu_features().avx2 && FASTML_FOREST_X86;
}

class ForestEngine {
 public:
  virtual ~ForestEngine() = default;
  virtual void predict(const ArrayView& X, bool apply_link, void* out) const = 0;
  // The binned layout for the CUDA kernel (cuts, nodes with device bin
  // columns, leaf values, per-tree first node and value shift), for a forest
  // whose binned_layout() is not General.
  virtual void binned_kernel_data(ForestKernelData& d) const = 0;
  // The binned layout the kernel takes (General: the forest is not binned).
  virtual ForestLayout binned_layout() const = 0;
  virtual const char* name() const = 0;
};

namespace {

template <typename T>
void link_rows(ForestLink link, int32_t k, int64_t rows, T* data) {
  const int64_t n = rows * k;
  switch (link) {
    case ForestLink::Identity: return;
    case ForestLink::Sigmoid:
      for (int64_t i = 0; i < n; ++i) data[i] = T(1) / (T(1) + std::exp(-data[i]));
      return;
    case ForestLink::Exp:
      for (int64_t i = 0; i < n; ++i) data[i] = std::exp(data[i]);
      return;
    case ForestLink::Hinge:
      for (int64_t i = 0; i < n; ++i) data[i] = data[i] > T(0) ? T(1) : T(0);
      return;
    case ForestLink::Softmax:
      for (int64_t r = 0; r < rows; ++r) {
        T* row = data + r * k;
        T mx = row[0];
        for (int32_t j = 1; j < k; ++j) mx = std::max(mx, row[j]);
        T sum = 0;
        for (int32_t j = 0; j < k; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        for (int32_t j = 0; j < k; ++j) row[j] /= sum;
      }
      return;
  }
}

// The general encoding of every node of `spec` (feature | flags, absolute
// children; a leaf loops on itself): the general CPU path and the CUDA
// kernel's General layout.
template <typename ThrT>
std::vector<ForestNode<ThrT>> general_nodes(const ForestSpec& spec) {
  std::vector<ForestNode<ThrT>> nodes(static_cast<size_t>(spec.num_nodes()));
  for (int64_t t = 0; t < spec.num_trees(); ++t) {
    const int64_t base = spec.tree_node_offsets[t];
    for (int64_t i = base; i < spec.tree_node_offsets[t + 1]; ++i) {
      ForestNode<ThrT>& nd = nodes[i];
      if (spec.node_left[i] < 0) {  // leaf: loops on itself
        nd.threshold = ThrT(0);
        nd.feature = 0;
        nd.child[0] = nd.child[1] = static_cast<int32_t>(i);
        continue;
      }
      nd.feature =
          static_cast<uint32_t>(spec.node_feature[i]) | (spec.node_flags[i] & ~kNodeFeatureMask);
      nd.threshold = static_cast<ThrT>(spec.node_threshold[i]);
      nd.child[0] = static_cast<int32_t>(base + spec.node_left[i]);
      nd.child[1] = static_cast<int32_t>(base + spec.node_right[i]);
    }
  }
  return nodes;
}

template <typename T>
void assign_bytes(std::vector<unsigned char>& dst, const T* src, size_t n) {
  const auto* b = reinterpret_cast<const unsigned char*>(src);
  dst.assign(b, b + n * sizeof(T));
}

template <typename ThrT, typename AccT>
class Engine final : public ForestEngine {
 public:
  using Node = ForestNode<ThrT>;

  Engine(const ForestSpec& spec, const std::vector<int32_t>& root,
         const std::vector<int32_t>& depth, const std::vector<int64_t>& value_shift,
         const std::vector<int64_t>& node_cat_offset, const std::vector<uint32_t>& node_cat_words)
      : spec_(spec),
        root_(root),
        depth_(depth),
        group_(spec.tree_group),
        shift_(value_shift),
        cat_offset_(node_cat_offset),
        cat_words_(node_cat_words) {
    const int64_t n = spec.num_nodes();
    nodes_ = general_nodes<ThrT>(spec);
    has_cat_ = false;
    has_zero_missing_ = false;
    for (int64_t i = 0; i < n; ++i) {
      if (spec.node_left[i] < 0) continue;
      has_cat_ |= (spec.node_flags[i] & kNodeCategorical) != 0;
      has_zero_missing_ |= (spec.node_flags[i] & kNodeZeroMissing) != 0;
    }
    values_.resize(spec.leaf_values.size());
    for (size_t i = 0; i < values_.size(); ++i) values_[i] = static_cast<AccT>(spec.leaf_values[i]);
    // The binned path (see BinNode) serves every forest it can.
    binned_ = !has_cat_ && !has_zero_missing_ && build_binned(spec);
    // The float fast path (forests the binned path cannot take, e.g. with
    // more than kMaxBinCuts thresholds on a feature) resolves missing values
    // without a NaN test: each block row is stored twice, NaN -> -inf (read
    // by default-left nodes) and NaN -> +inf (read by default-right nodes),
    // so one "x <= threshold" decides every numeric node. It needs no +inf
    // threshold (NaN -> +inf would then go left) and no categorical or
    // zero-as-missing node.
    // Its scratch is 2 * features * kBlockRows values per thread whatever the
    // batch: wide models (over ~16k features) take the general path instead,
    // whose scratch is sized by the block (kScratchBytes at most).
    fast_ = !binned_ && !has_cat_ && !has_zero_missing_ &&
            n * static_cast<int64_t>(sizeof(Node)) < (int64_t{1} << 31) &&
            2 * int64_t{spec.num_features} * kBlockRows * int64_t{sizeof(ThrT)} <= kScratchBytes;
    for (const Node& nd : nodes_)
      fast_ = fast_ && !(nd.threshold == std::numeric_limits<ThrT>::infinity());
    if (fast_) {
      const uint32_t F = static_cast<uint32_t>(spec.num_features);
      for (int64_t i = 0; i < n; ++i) {
        Node& nd = nodes_[i];
        if (nd.child[0] == i) {  // leaf: loops on itself (as a byte offset)
          nd.child[0] = nd.child[1] = static_cast<int32_t>(i * static_cast<int64_t>(sizeof(Node)));
          continue;
        }
        const uint32_t f = nd.feature & kNodeFeatureMask;
        // The block is stored feature-major (see rows_doubled): feature j of
        // row r is at j * kBlockRows + r.
        // Children as byte offsets: one add per step instead of a scale.
        nd.child[0] *= static_cast<int32_t>(sizeof(Node));
        nd.child[1] *= static_cast<int32_t>(sizeof(Node));
        nd.feature =
            ((nd.feature & kNodeDefaultLeft) ? f : f + F) * static_cast<uint32_t>(kBlockRows);
      }
    }
    base_.resize(spec.base_margin.size());
    for (size_t i = 0; i < base_.size(); ++i) base_[i] = static_cast<AccT>(spec.base_margin[i]);
    cat_bits_ = spec.cat_bits;
    cat_lo_ = static_cast<ThrT>(spec.cat_rule.lo);
    cat_hi_ = static_cast<ThrT>(spec.cat_rule.hi);
    if (binned_) {
      build_perfect(spec);
      if (!perfect_) {
        build_explicit(spec);
        build_explicit_tops();
        build_qs();
      }
      std::vector<uint32_t>().swap(node_word_);
      // The binned layouts hold their own copies of the leaf values.
      std::vector<Node>().swap(nodes_);
      std::vector<AccT>().swap(values_);
    }
  }

  // The binned path: every node numeric (no categorical or zero-as-missing
  // split), at most kMaxBinCuts distinct thresholds per feature and at most
  // 16384 features (the block of bins stays under 16 MB). Builds cuts_ and
  // cut_offset_ (the sorted distinct thresholds of each feature) and
  // node_word_ (each spec node as pack_perfect(threshold bin, column)), from
  // which build_perfect or build_explicit lay out the trees. Returns false,
  // keeping nothing, when the forest does not qualify.
  bool build_binned(const ForestSpec& spec) {
    const int64_t F = spec.num_features;
    const int64_t n = spec.num_nodes();
    if (2 * F > 65535 || 2 * F * kBinRows * int64_t{sizeof(Bin)} > (int64_t{16} << 20))
      return false;
    // Internal nodes bucketed by feature (counting sort), then each bucket
    // sorted by threshold: the distinct thresholds become the cuts and each
    // node's rank among them its threshold bin, with no search per node.
    std::vector<int32_t> offset(static_cast<size_t>(F + 1), 0);
    for (int64_t i = 0; i < n; ++i)
      if (spec.node_left[i] >= 0) ++offset[spec.node_feature[i] + 1];
    for (int64_t f = 0; f < F; ++f) offset[f + 1] += offset[f];
    std::vector<std::pair<ThrT, int32_t>> items(static_cast<size_t>(offset[F]));
    {
      std::vector<int32_t> fill(offset.begin(), offset.end() - 1);
      for (int64_t i = 0; i < n; ++i)
        if (spec.node_left[i] >= 0)
          items[fill[spec.node_feature[i]]++] = {static_cast<ThrT>(spec.node_threshold[i]),
                                                 static_cast<int32_t>(i)};
    }
    node_word_.assign(static_cast<size_t>(n), pack_perfect(kBinTop, 0));  // leaves: always left
    cuts_.clear();
    cut_offset_.assign(static_cast<size_t>(F + 1), 0);
    for (int64_t f = 0; f < F; ++f) {
      auto* first = items.data() + offset[f];
      auto* last = items.data() + offset[f + 1];
      std::sort(first, last, [](const auto& x, const auto& y) { return x.first < y.first; });
      int64_t count = 0;
      for (auto* it = first; it != last; ++it) {
        // Equal under "<" (0.0 and -0.0) is the same cut: one compare decides both.
        if (it == first || cuts_.back() < it->first) {
          if (++count > kMaxBinCuts) {
            std::vector<ThrT>().swap(cuts_);
            std::vector<uint32_t>().swap(node_word_);
            return false;
          }
          cuts_.push_back(it->first);
        }
        const int32_t i = it->second;
        const bool default_left = (spec.node_flags[i] & kNodeDefaultLeft) != 0;
        node_word_[i] = pack_perfect(static_cast<Bin>(count - 1 - kBinBias),
                                     static_cast<uint16_t>(default_left ? f : f + F));
      }
      cut_offset_[f + 1] = static_cast<int32_t>(cuts_.size());
    }
    build_simd_bins();
    return true;
  }

  // The compare tables of bin_simd_* for features with 2..kSimdBinCuts cuts
  // (offset -1: the search).
  void build_simd_bins() {
    const int64_t F = static_cast<int64_t>(cut_offset_.size()) - 1;
    simd_bins_.clear();
    simd_bin_off_.assign(static_cast<size_t>(F), -1);
#if FASTML_FOREST_X86
    const ThrT inf = std::numeric_limits<ThrT>::infinity();
    for (int64_t f = 0; f < F; ++f) {
      const int32_t count = cut_offset_[f + 1] - cut_offset_[f];
      if (count < 2 || count > kSimdBinCuts) continue;
      const ThrT* cuts = cuts_.data() + cut_offset_[f];
      const int32_t groups = (count + 15) / 16;
      simd_bin_off_[f] = static_cast<int64_t>(simd_bins_.size());
      for (int32_t g = 0; g < 16; ++g) {
        const int32_t last = 16 * g + 15;
        simd_bins_.push_back(g < groups && last < count ? cuts[last] : inf);
      }
      for (int32_t i = 0; i < 16 * (groups + 1); ++i)
        simd_bins_.push_back(i < count ? cuts[i] : inf);
    }
#endif
  }

  // The explicit-children layout (BinNode) of the binned path, for forests
  // the perfect layout does not take: each tree breadth-first from its root,
  // so the two children of a node are adjacent; leaf values in that order.
  void build_explicit(const ForestSpec& spec) {
    const int64_t n = spec.num_nodes();
    bin_nodes_.assign(static_cast<size_t>(n), BinNode{kBinTop, 0, 0});
    bin_values_.resize(values_.size());
    std::vector<int32_t> queue;
    for (int64_t t = 0; t < spec.num_trees(); ++t) {
      const int64_t base = spec.tree_node_offsets[t];
      const int64_t width = group_[t] >= 0 ? 1 : spec.num_outputs;
      // Node queue[q] gets index base + q; children are appended as a pair.
      // Build validated that this is a tree.
      queue.assign(1, 0);
      for (size_t q = 0; q < queue.size(); ++q) {
        const int64_t old = base + queue[q];
        const int64_t now = base + static_cast<int64_t>(q);
        for (int64_t k = 0; k < width; ++k)
          bin_values_[shift_[t] + now * width + k] = values_[shift_[t] + old * width + k];
        BinNode& nd = bin_nodes_[now];
        if (spec.node_left[old] < 0) {
          nd = BinNode{kBinTop, 0, static_cast<int32_t>(now)};
          continue;
        }
        nd.thr = perfect_thr(node_word_[old]);
        nd.col = static_cast<uint16_t>(node_word_[old] >> 16);
        nd.left = static_cast<int32_t>(base + static_cast<int64_t>(queue.size()));
        queue.push_back(spec.node_left[old]);
        queue.push_back(spec.node_right[old]);
      }
    }
  }

  // The first min(depth, kSimdLevels) levels of each explicit tree as a
  // perfect tree (a leaf above that depth becomes an always-left node over
  // copies of itself), so perfect_top_avx2 walks them for 16 rows at a time;
  // top_exit_ maps each position at that depth to the explicit node the walk
  // continues from (a leaf reached early maps to itself and stays there).
  static constexpr int kTopNodes = (1 << kSimdLevels) - 1;
  static constexpr int kTopExits = 1 << kSimdLevels;
  void build_explicit_tops() {
    const int64_t T = static_cast<int64_t>(root_.size());
    top_nodes_.assign(static_cast<size_t>(T * kTopNodes), pack_perfect(kBinTop, 0));
    top_exit_.assign(static_cast<size_t>(T * kTopExits), 0);
    top_levels_.assign(static_cast<size_t>(T), 0);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t L = std::min(depth_[t], kSimdLevels);
      top_levels_[t] = L;
      uint32_t* nodes = top_nodes_.data() + t * kTopNodes;
      int32_t* exits = top_exit_.data() + t * kTopExits;
      // (local index, depth, explicit node) breadth-first; L <= 4 keeps it tiny.
      struct Item {
        int32_t i, d, n;
      };
      Item stack[2 * kTopExits];
      int top = 0;
      stack[top++] = {0, 0, root_[t]};
      while (top > 0) {
        const Item it = stack[--top];
        if (it.d == L) {
          exits[it.i - ((1 << L) - 1)] = it.n;
          continue;
        }
        const BinNode& nd = bin_nodes_[static_cast<size_t>(it.n)];
        const bool leaf = nd.left == it.n;
        nodes[it.i] = leaf ? pack_perfect(kBinTop, 0) : pack_perfect(nd.thr, nd.col);
        stack[top++] = {2 * it.i + 2, it.d + 1, leaf ? it.n : nd.left + 1};
        stack[top++] = {2 * it.i + 1, it.d + 1, leaf ? it.n : nd.left};
      }
    }
  }

  // QuickScorer tables (see qs_scan_avx2) for explicit forests whose trees
  // all have at most kQsLeaves leaves: per bin column, its nodes sorted by
  // threshold (thr, tree, left-subtree leaf mask), and per tree the explicit
  // node of each leaf in left-to-right order. Nothing when a tree is larger.
  static constexpr int kQsLeaves = 32;
  void build_qs() {
    const int64_t T = static_cast<int64_t>(root_.size());
    const int64_t C = 2 * spec_.num_features;
    qs_ = false;
    qs_leaf_node_.assign(static_cast<size_t>(T * kQsLeaves), 0);
    struct Item {
      int32_t thr, tree, col;
      uint32_t lmask;
    };
    std::vector<Item> items;
    for (int64_t t = 0; t < T; ++t) {
      int32_t leaves = 0;
      bool fits = true;
      // In-order numbering of the leaves; returns the first leaf of n's subtree.
      auto walk = [&](auto&& self, int32_t n) -> int32_t {
        const BinNode nd = bin_nodes_[static_cast<size_t>(n)];
        if (nd.left == n) {  // a leaf
          if (leaves >= kQsLeaves) {
            fits = false;
            return leaves;
          }
          qs_leaf_node_[static_cast<size_t>(t * kQsLeaves + leaves)] = n;
          return leaves++;
        }
        const int32_t first = self(self, nd.left);
        const int32_t mid = leaves;  // the left subtree holds leaves [first, mid)
        self(self, nd.left + 1);
        if (fits) {
          uint32_t m = 0;
          for (int32_t b = first; b < mid; ++b) m |= uint32_t{1} << b;
          items.push_back({nd.thr, static_cast<int32_t>(t), nd.col, m});
        }
        return first;
      };
      // At most 32 leaves means at most 31 levels: the recursion is shallow
      // (a deeper tree stops counting at leaf 33 and the forest does not fit).
      if (depth_[t] > kQsLeaves) return;
      walk(walk, root_[t]);
      if (!fits) {
        std::vector<int32_t>().swap(qs_leaf_node_);
        return;
      }
    }
    // Counting sort by column, then each column by threshold.
    qs_begin_.assign(static_cast<size_t>(C + 1), 0);
    for (const Item& it : items) ++qs_begin_[static_cast<size_t>(it.col) + 1];
    for (int64_t c = 0; c < C; ++c) qs_begin_[c + 1] += qs_begin_[c];
    std::vector<Item> sorted(items.size());
    {
      std::vector<int32_t> fill(qs_begin_.begin(), qs_begin_.end() - 1);
      for (const Item& it : items) sorted[static_cast<size_t>(fill[it.col]++)] = it;
    }
    qs_cols_.clear();
    for (int64_t c = 0; c < C; ++c) {
      std::stable_sort(sorted.begin() + qs_begin_[c], sorted.begin() + qs_begin_[c + 1],
                       [](const Item& a, const Item& b) { return a.thr < b.thr; });
      if (qs_begin_[c + 1] > qs_begin_[c]) qs_cols_.push_back(static_cast<int32_t>(c));
    }
    // One output: every leaf's value by (tree, leaf), for the gathered exits.
    if (spec_.num_outputs == 1) {
      qs_leaf_value_.assign(static_cast<size_t>(T * kQsLeaves), AccT(0));
      for (int64_t t = 0; t < T; ++t) {
        for (int32_t j = 0; j < kQsLeaves; ++j) {
          qs_leaf_value_[static_cast<size_t>(t * kQsLeaves + j)] =
              bin_values_[static_cast<size_t>(shift_[t] + qs_leaf_node_[t * kQsLeaves + j])];
        }
      }
    }
    qs_thr_.resize(sorted.size());
    qs_tree_.resize(sorted.size());
    qs_lmask_.resize(sorted.size());
    for (size_t i = 0; i < sorted.size(); ++i) {
      qs_thr_[i] = sorted[i].thr;
      qs_tree_[i] = sorted[i].tree;
      qs_lmask_[i] = sorted[i].lmask;
    }
    qs_ = true;
  }

  // The perfect layout (see kMaxPerfectDepth), when the padding is cheap.
  void build_perfect(const ForestSpec& spec) {
    const int64_t T = spec.num_trees();
    int64_t padded = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (depth_[t] > kMaxPerfectDepth) return;
      padded += int64_t{1} << depth_[t];
    }
    if (padded > kPerfectSlack * spec.num_nodes() + 1024) return;
    const int32_t K = spec.num_outputs;
    p_node_off_.assign(static_cast<size_t>(T + 1), 0);
    p_leaf_off_.assign(static_cast<size_t>(T + 1), 0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t width = group_[t] >= 0 ? 1 : K;
      p_node_off_[t + 1] = p_node_off_[t] + (int64_t{1} << depth_[t]) - 1;
      p_leaf_off_[t + 1] = p_leaf_off_[t] + (int64_t{1} << depth_[t]) * width;
    }
    p_nodes_.assign(static_cast<size_t>(p_node_off_[T]) + 1, 0);  // + 1: never empty
    // The single-row copy: blocks of four levels, each block one 64-byte
    // line (see row_pos), trees aligned to lines.
    r_node_off_.assign(static_cast<size_t>(T + 1), 0);
    for (int64_t t = 0; t < T; ++t)
      r_node_off_[t + 1] = r_node_off_[t] + (row_tree_size(depth_[t]) + 15) / 16 * 16;
    r_nodes_.assign(static_cast<size_t>(r_node_off_[T]) + 16, pack_perfect(kBinTop, 0));
    r_align_ = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(r_nodes_.data()) % 64) % 64 /
                                    sizeof(uint32_t));
    p_values_.assign(static_cast<size_t>(p_leaf_off_[T]), AccT(0));
    struct Item {
      int32_t node;  // local index in the spec's tree
      int64_t pos;   // level-order position in the perfect tree
      int32_t level;
      int64_t path;  // the branches taken from the root, as bits (1 = right)
    };
    std::vector<Item> stack;
    stack.reserve(static_cast<size_t>(2 * kMaxPerfectDepth + 2));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t base = spec.tree_node_offsets[t];
      const int32_t D = depth_[t];
      const int64_t width = group_[t] >= 0 ? 1 : K;
      uint32_t* nodes = p_nodes_.data() + p_node_off_[t];
      uint32_t* rnodes = r_nodes_.data() + r_align_ + r_node_off_[t];
      AccT* leaves = p_values_.data() + p_leaf_off_[t];
      stack.assign(1, Item{0, 0, 0, 0});
      while (!stack.empty()) {
        const Item it = stack.back();
        stack.pop_back();
        const int64_t a = base + it.node;
        if (it.level == D) {  // a leaf slot
          const int64_t slot = it.pos - ((int64_t{1} << D) - 1);
          for (int64_t k = 0; k < width; ++k)
            leaves[slot * width + k] = values_[shift_[t] + a * width + k];
          continue;
        }
        const bool leaf = spec.node_left[a] < 0;  // a shallow leaf: always left, over copies
        const uint32_t word = leaf ? pack_perfect(kBinTop, 0) : node_word_[a];
        nodes[it.pos] = word;
        rnodes[row_pos(D, it.level, it.path)] = word;
        const int32_t l = leaf ? it.node : spec.node_left[a];
        const int32_t r = leaf ? it.node : spec.node_right[a];
        stack.push_back(Item{l, 2 * it.pos + 1, it.level + 1, 2 * it.path});
        stack.push_back(Item{r, 2 * it.pos + 2, it.level + 1, 2 * it.path + 1});
      }
    }
    perfect_ = true;
  }

  // The single-row layout of a perfect tree of depth D: levels in super-levels
  // of four (the last one m = D mod 4 levels, or four); super-level s holds
  // 16^s blocks, each the 2^m - 1 nodes of a complete subtree in level order
  // padded to 2^m slots (16 slots = one 64-byte line), so a walk touches one
  // line per four levels instead of one per level. All super-levels before
  // the last are full, so super-level s starts at 16 * (16^s - 1) / 15.
  static int64_t row_tree_size(int32_t D) {
    int64_t total = 0, blocks = 1;
    for (int32_t d = 0; d < D; d += 4) {
      const int32_t m = std::min(4, D - d);
      total += blocks << m;
      blocks <<= m;
    }
    return total;
  }
  static int64_t row_level_start(int32_t s) { return 16 * (((int64_t{1} << (4 * s)) - 1) / 15); }
  // The slot of the node reached from the root by `path` (d branches, most
  // significant first).
  static int64_t row_pos(int32_t D, int32_t d, int64_t path) {
    const int32_t s = d / 4, q = d % 4;
    const int32_t m = std::min(4, D - 4 * s);
    const int64_t block = path >> q;
    const int64_t j = ((int64_t{1} << q) - 1) + (path & ((int64_t{1} << q) - 1));
    return row_level_start(s) + (block << m) + j;
  }

  ForestLayout binned_layout() const override {
    if (!binned_) return ForestLayout::General;
    return perfect_ ? ForestLayout::Perfect : ForestLayout::Explicit;
  }

  void binned_kernel_data(ForestKernelData& d) const override {
    const int64_t T = static_cast<int64_t>(root_.size());
    const uint32_t F = static_cast<uint32_t>(spec_.num_features);
    const int32_t K = spec_.num_outputs;
    assign_bytes(d.cuts, cuts_.data(), cuts_.size());
    d.cut_offset = cut_offset_;
    d.tree_node.assign(static_cast<size_t>(T), 0);
    d.tree_vshift.assign(static_cast<size_t>(T), 0);
    if (perfect_) {
      std::vector<uint32_t> nodes(p_nodes_);
      for (uint32_t& nd : nodes) nd = pack_perfect(perfect_thr(nd), forest_device_col(nd >> 16, F));
      assign_bytes(d.nodes, nodes.data(), nodes.size());
      assign_bytes(d.values, p_values_.data(), p_values_.size());
      for (int64_t t = 0; t < T; ++t) {
        // The walk ends at local node i >= 2^D - 1, leaf slot i - (2^D - 1).
        const int64_t width = group_[t] >= 0 ? 1 : K;
        d.tree_node[t] = p_node_off_[t];
        d.tree_vshift[t] = p_leaf_off_[t] - ((int64_t{1} << depth_[t]) - 1) * width;
      }
    } else {
      std::vector<BinNode> nodes(bin_nodes_);
      for (BinNode& nd : nodes) nd.col = forest_device_col(nd.col, F);
      assign_bytes(d.nodes, nodes.data(), nodes.size());
      assign_bytes(d.values, bin_values_.data(), bin_values_.size());
      for (int64_t t = 0; t < T; ++t) {
        d.tree_node[t] = root_[t];
        d.tree_vshift[t] = shift_[t];
      }
    }
  }

  const char* name() const override {
    if (perfect_) return "binned-perfect";
    if (qs_) return "binned-qs";
    if (binned_) return "binned";
    if (fast_) return "float";
    return "general";
  }

  void predict(const ArrayView& X, bool apply_link, void* out_ptr) const override {
    AccT* out = static_cast<AccT*>(out_ptr);
    const int64_t rows = X.shape[0];
    if (rows == 0) return;
    if (binned_) {
      dispatch_binned(X, apply_link, out);
    } else if (fast_) {
      dispatch<true, false, false>(X, apply_link, out);
    } else if (has_cat_) {
      dispatch<false, true, true>(X, apply_link, out);
    } else if (has_zero_missing_) {
      dispatch<false, false, true>(X, apply_link, out);
    } else {
      dispatch<false, false, false>(X, apply_link, out);
    }
  }

 private:
  // fn(r0, r1) for each block of `block` rows, on the shared pool.
  template <typename F>
  static void for_row_blocks(int64_t rows, int64_t block, const F& fn) {
    const int64_t nblocks = (rows + block - 1) / block;
    auto run_blocks = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fn(b * block, std::min(rows, b * block + block));
    };
    if (nblocks == 1) {
      run_blocks(0, 1);  // one block (e.g. one row): no pool hand-off
    } else {
      ThreadPool::global().parallel_for(0, nblocks, 1, run_blocks);
    }
  }

  template <bool Fast, bool HasCat, bool HasZero>
  void dispatch(const ArrayView& X, bool apply_link, AccT* out) const {
    const int64_t row_bytes = std::max<int64_t>(1, spec_.num_features) * int64_t{sizeof(ThrT)};
    const int64_t block = std::clamp<int64_t>(kScratchBytes / row_bytes, 1, kBlockRows);
    for_row_blocks(X.shape[0], Fast ? kBlockRows : block, [&](int64_t r0, int64_t r1) {
      predict_block<Fast, HasCat, HasZero>(X, r0, r1, apply_link, out);
    });
  }

  // ---------------------------------------------------------------- binned path

  void dispatch_binned(const ArrayView& X, bool apply_link, AccT* out) const {
    for_row_blocks(X.shape[0], kBinRows,
                   [&](int64_t r0, int64_t r1) { binned_block(X, r0, r1, apply_link, out); });
  }

  // Rows [r0, r1) of X as bins, feature-major with row stride `S`: column f
  // (read by default-left nodes) has missing -> 0, column F + f
  // (default-right nodes) missing -> kBinTop; other values are the same
  // bin in both. Inputs are first rounded to ThrT, as the comparisons do.
  template <typename XT>
  void bin_rows(const ArrayView& X, int64_t r0, int64_t r1, int64_t S, Bin* bins) const {
    // Tiles of 64 rows: a tile of X stays in L1 while each feature's column
    // is read from it (reading a whole block column by column went to L2 for
    // every value: half the time of a shallow forest's predict).
    constexpr int64_t kTile = 64;
    for (int64_t t0 = r0; t0 < r1; t0 += kTile)
      bin_tile<XT>(X, t0, std::min(r1, t0 + kTile), r0, S, bins);
  }

  // Rows [t0, t1) of the block that starts at row r0.
  template <typename XT>
  void bin_tile(const ArrayView& X, int64_t t0, int64_t t1, int64_t r0, int64_t S,
                Bin* bins) const {
    const int64_t F = spec_.num_features;
    const char* base = static_cast<const char*>(X.data);
    const int64_t rs = X.strides[0], cs = X.strides[1];
#if FASTML_FOREST_X86
    const bool simd = forest_simd(-1);
#endif
    for (int64_t j = 0; j < F; ++j) {
      const ThrT* cuts = cuts_.data() + cut_offset_[j];
      const int32_t count = cut_offset_[j + 1] - cut_offset_[j];
      Bin* lo = bins + j * S;
      Bin* hi = bins + (F + j) * S;
      const char* src = base + j * cs;
#if FASTML_FOREST_X86
      if (simd && simd_bin_off_[j] >= 0) {
        const ThrT* table = simd_bins_.data() + simd_bin_off_[j];
        if constexpr (std::is_same_v<ThrT, float>) {
          bin_simd_f32<XT>(table, src + t0 * rs, rs, t1 - t0, lo + (t0 - r0), hi + (t0 - r0));
        } else {
          bin_simd_f64<XT>(table, src + t0 * rs, rs, t1 - t0, lo + (t0 - r0), hi + (t0 - r0));
        }
        continue;
      }
#endif
      auto load = [&](int64_t r) {
        return static_cast<ThrT>(*reinterpret_cast<const XT*>(src + r * rs));
      };
      auto store = [&](int64_t r, ThrT x, Bin b) {
        const bool nan = x != x;
        lo[r - r0] = nan ? kBinBottom : b;
        hi[r - r0] = nan ? kBinTop : b;
      };
      int64_t r = t0;
      if (count > 1) {
        // Eight rows' searches interleaved: each is a chain of dependent loads
        // and compares, so eight chains in flight take about the time of one
        // (the binning was a third of a LightGBM-default forest's predict).
        constexpr int kW = 8;
        for (; r + kW <= t1; r += kW) {
          ThrT x[kW];
          const ThrT* b[kW];
          for (int l = 0; l < kW; ++l) {
            x[l] = load(r + l);
            b[l] = cuts;
          }
          for (int32_t len = count; len > 1;) {
            const int32_t half = len / 2;
            for (int l = 0; l < kW; ++l) b[l] = (b[l][half] < x[l]) ? b[l] + half : b[l];
            len -= half;
          }
          for (int l = 0; l < kW; ++l) store(r + l, x[l], forest_bin_at(cuts, b[l], x[l]));
        }
      }
      for (; r < t1; ++r) {
        const ThrT x = load(r);
        store(r, x, forest_bin_of(cuts, count, x));
      }
    }
  }

  inline int32_t bin_step(int32_t n, const Bin* bins, int64_t S) const {
    const BinNode nd = bin_nodes_[n];
    // Indexing by the decision keeps the step branch-free.
    return nd.left + (bins[nd.col * S] > nd.thr ? 1 : 0);
  }

  void binned_block(const ArrayView& X, int64_t r0, int64_t r1, bool apply_link,
                    AccT* out_all) const {
    const int32_t K = spec_.num_outputs;
    const int64_t F = spec_.num_features;
    const int64_t nrows = r1 - r0;
    // One row is stored with stride 1 (2F bins); blocks with kBinRows.
    const int64_t S = nrows == 1 ? 1 : kBinRows;
    thread_local std::vector<Bin> buf;
    const size_t need = static_cast<size_t>(2 * F * S);
    if (buf.size() < need) buf.resize(need);
    if (X.dtype == DType::F32)
      bin_rows<float>(X, r0, r1, S, buf.data());
    else
      bin_rows<double>(X, r0, r1, S, buf.data());
    AccT* out = out_all + r0 * K;
    for (int64_t r = 0; r < nrows; ++r)
      for (int32_t k = 0; k < K; ++k) out[r * K + k] = base_[k];
    const int64_t T = static_cast<int64_t>(root_.size());
    if (perfect_ && nrows == 1) {
      perfect_one_row(buf.data(), out);
    } else if (perfect_) {
      perfect_block(buf.data(), nrows, out);
    } else if (nrows == 1) {
      binned_one_row(buf.data(), out);
#if FASTML_FOREST_X86
    } else if (qs_ && nrows >= 8 && forest_simd(-1)) {
      qs_block(buf.data(), nrows, out);
#endif
    } else {
      thread_local std::vector<uint32_t> top_buf;
      if (top_buf.size() < static_cast<size_t>(kBinRows)) top_buf.resize(kBinRows);
      const int64_t nvec = forest_simd(-1) ? nrows / 16 * 16 : 0;
      for (int64_t t = 0; t < T; ++t) binned_tree(t, buf.data(), nrows, nvec, top_buf.data(), out);
    }
    finish(out, nrows, apply_link);
  }

  void perfect_block(const Bin* bins, int64_t nrows, AccT* out) const {
    const int32_t K = spec_.num_outputs;
    const int64_t T = static_cast<int64_t>(root_.size());
    thread_local std::vector<uint32_t> idx_buf;
    if (idx_buf.size() < static_cast<size_t>(kBinRows)) idx_buf.resize(kBinRows);
    uint32_t* idx = idx_buf.data();
    const int64_t nvec = forest_simd(-1) ? nrows / 16 * 16 : 0;
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t* nodes = p_nodes_.data() + p_node_off_[t];
      const int32_t D = depth_[t];
      const int32_t L = nvec ? std::min(D, kSimdLevels) : 0;
#if FASTML_FOREST_X86
      if (L > 0) perfect_top_avx2(nodes, L, bins, nvec, idx);
#endif
      perfect_walk_scalar(nodes, L, D, bins, 0, L > 0 ? nvec : 0, idx);
      perfect_walk_scalar(nodes, 0, D, bins, L > 0 ? nvec : 0, nrows, idx);
      const AccT* values = p_values_.data() + p_leaf_off_[t];
      const uint32_t first_leaf = (uint32_t{1} << D) - 1u;
      const int32_t group = group_[t];
      if (group >= 0) {
        AccT* o = out + group;
        for (int64_t r = 0; r < nrows; ++r) o[r * K] += values[idx[r] - first_leaf];
      } else {
        for (int64_t r = 0; r < nrows; ++r)
          for (int32_t k = 0; k < K; ++k)
            out[r * K + k] += values[static_cast<int64_t>(idx[r] - first_leaf) * K + k];
      }
    }
  }

  // One row (bins with stride 1) on the single-row layout (row_pos):
  // kRowLanes trees walk together; leaves are added in tree order.
  void perfect_one_row(const Bin* bins, AccT* out) const {
    const int32_t K = spec_.num_outputs;
    const int64_t T = static_cast<int64_t>(root_.size());
    const uint32_t* rn = r_nodes_.data() + r_align_;
    auto add = [&](int64_t t, uint32_t slot) {
      const AccT* values = p_values_.data() + p_leaf_off_[t];
      if (group_[t] >= 0) {
        out[group_[t]] += values[slot];
      } else {
        for (int32_t k = 0; k < K; ++k) out[k] += values[static_cast<int64_t>(slot) * K + k];
      }
    };
    for (int64_t t = 0; t < T; t += kRowLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kRowLanes, T - t));
      uint32_t block[kRowLanes], j[kRowLanes];
      const uint32_t* nodes[kRowLanes];
      int32_t depth = 0;
      for (int l = 0; l < n; ++l) {
        nodes[l] = rn + r_node_off_[t + l];
        block[l] = j[l] = 0;
        depth = std::max(depth, depth_[t + l]);
      }
      bool same = n == kRowLanes;
      for (int l = 0; l < n; ++l) same = same && depth_[t + l] == depth;
      if (same) {  // the common case: one shape for all lanes, no per-lane tests
        for (int32_t d = 0; d < depth; d += 4) {
          const int32_t m = std::min(4, depth - d);
          const int64_t start = row_level_start(d / 4);
          const uint32_t* blk[kRowLanes];
          for (int l = 0; l < kRowLanes; ++l) {
            blk[l] = nodes[l] + start + (static_cast<int64_t>(block[l]) << m);
            j[l] = 0;
          }
          for (int32_t q = 0; q < m; ++q)
            for (int l = 0; l < kRowLanes; ++l) {
              const uint32_t nd = blk[l][j[l]];
              j[l] = 2 * j[l] + 1 + (bins[nd >> 16] > perfect_thr(nd) ? 1u : 0u);
            }
          for (int l = 0; l < kRowLanes; ++l) block[l] = (block[l] << m) + j[l] - ((1u << m) - 1u);
        }
        for (int l = 0; l < kRowLanes; ++l) add(t + l, block[l]);
        continue;
      }
      for (int32_t d = 0; d < depth; ++d) {
        const int32_t s = d / 4, q = d % 4;
        const int64_t start = row_level_start(s);
        for (int l = 0; l < n; ++l) {
          const int32_t D = depth_[t + l];
          if (d >= D) continue;  // a shallower tree is done
          const int32_t m = std::min(4, D - 4 * s);
          const uint32_t nd = nodes[l][start + (static_cast<int64_t>(block[l]) << m) + j[l]];
          j[l] = 2 * j[l] + 1 + (bins[nd >> 16] > perfect_thr(nd) ? 1u : 0u);
          if (q == m - 1) {  // leaving the block: the exit picks the next one
            block[l] = (block[l] << m) + j[l] - ((1u << m) - 1u);
            j[l] = 0;
          }
        }
      }
      for (int l = 0; l < n; ++l) add(t + l, block[l]);
    }
  }

  // Rows [r0, r1) of a block through one perfect tree; leaf slots to leaf[r].
  // Rows [r0, r1) of a block through levels [d0, D) of one perfect tree:
  // idx[r] is the row's local node at depth d0 (ignored and taken as the
  // root when d0 is 0) and becomes its node at depth D.
  FASTML_FOREST_NO_VECTORIZE
  static void perfect_walk_scalar(const uint32_t* nodes, int32_t d0, int32_t D, const Bin* bins,
                                  int64_t r0, int64_t r1, uint32_t* idx) {
    if (d0 == 0)
      for (int64_t r = r0; r < r1; ++r) idx[r] = 0;
    int64_t r = r0;
    for (; r + kPerfectLanes <= r1; r += kPerfectLanes) {
      uint32_t i[kPerfectLanes];
      for (int l = 0; l < kPerfectLanes; ++l) i[l] = idx[r + l];
      const Bin* x0 = bins + r;  // lane l reads at constant offset l
      for (int32_t d = d0; d < D; ++d)
        for (int l = 0; l < kPerfectLanes; ++l) {
          const uint32_t nd = nodes[i[l]];
          i[l] = 2 * i[l] + 1 + (x0[l + (nd >> 16) * kBinRows] > perfect_thr(nd) ? 1u : 0u);
        }
      for (int l = 0; l < kPerfectLanes; ++l) idx[r + l] = i[l];
    }
    for (; r < r1; ++r) {
      uint32_t i = idx[r];
      for (int32_t d = d0; d < D; ++d) {
        const uint32_t nd = nodes[i];
        i = 2 * i + 1 + (bins[r + (nd >> 16) * kBinRows] > perfect_thr(nd) ? 1u : 0u);
      }
      idx[r] = i;
    }
  }

#if FASTML_FOREST_X86
  // QuickScorer over a block (see qs_scan_avx2): eight rows at a time, then
  // each row's exit leaves added in tree order (the order binned_tree adds
  // them, so the sums are the same); rows past the last eight walk the trees.
  void qs_block(const Bin* bins, int64_t nrows, AccT* out) const {
    const int32_t K = spec_.num_outputs;
    const int64_t T = static_cast<int64_t>(root_.size());
    thread_local std::vector<uint32_t> masks;
    if (masks.size() < static_cast<size_t>(16 * T)) masks.resize(static_cast<size_t>(16 * T));
    // Exits of `lanes` rows from r whose masks sit at stride S per tree.
    auto exits = [&](int64_t r, int lanes, const uint32_t* m0, int64_t S) {
      if (K == 1) {  // one output: the leaf values gathered eight rows at a time
        for (int h = 0; h < lanes; h += 8) {
          qs_exits_avx2(m0 + h, S, T, qs_leaf_value_.data(), out + r + h);
        }
        return;
      }
      // Tree by tree, the rows side by side: each row's sum is its own chain
      // of adds, in tree order, and the chains overlap.
      for (int64_t t = 0; t < T; ++t) {
        const int32_t group = group_[t];
        const int64_t shift = shift_[t];
        const uint32_t* m = m0 + S * t;
        const int32_t* leaf_node = qs_leaf_node_.data() + t * kQsLeaves;
        for (int l = 0; l < lanes; ++l) {
          add_leaf(bin_values_, out + (r + l) * K, group, shift, leaf_node[__builtin_ctz(m[l])]);
        }
      }
    };
    const QsTables q{qs_cols_.data(),
                     static_cast<int64_t>(qs_cols_.size()),
                     qs_begin_.data(),
                     qs_thr_.data(),
                     qs_tree_.data(),
                     qs_lmask_.data(),
                     T};
    int64_t r = 0;
    for (; r + 16 <= nrows; r += 16) {
      qs_scan_avx2<16>(q, bins + r, masks.data());
      exits(r, 16, masks.data(), 16);
    }
    if (r + 8 <= nrows) {
      qs_scan_avx2<8>(q, bins + r, masks.data());
      exits(r, 8, masks.data(), 8);
      r += 8;
    }
    for (; r < nrows; ++r) {
      for (int64_t t = 0; t < T; ++t) {
        int32_t n = root_[t];
        for (int32_t d = 0; d < depth_[t]; ++d) n = bin_step(n, bins + r, kBinRows);
        add_leaf(bin_values_, out + r * K, group_[t], shift_[t], n);
      }
    }
  }
#endif

  // One tree over a block: kLanes rows walk together so their loads overlap.
  // With AVX2 (nvec > 0: the first nvec rows, a multiple of 16), the tree's
  // top levels are walked 16 rows at a time first (build_explicit_tops).
  void binned_tree(int64_t t, const Bin* bins, int64_t nrows, int64_t nvec, uint32_t* top_idx,
                   AccT* out) const {
    const int32_t K = spec_.num_outputs;
    const int32_t root = root_[t], depth = depth_[t], group = group_[t];
    const int64_t shift = shift_[t];
    const int32_t L = nvec > 0 ? top_levels_[t] : 0;
#if FASTML_FOREST_X86
    if (L > 0) perfect_top_avx2(top_nodes_.data() + t * kTopNodes, L, bins, nvec, top_idx);
#endif
    const int32_t* exits = top_exit_.data() + t * kTopExits;
    const uint32_t first_exit = (uint32_t{1} << L) - 1u;
    int64_t r = 0;
    for (; r + kBinLanes <= nrows; r += kBinLanes) {
      int32_t idx[kBinLanes];
      const bool topped = L > 0 && r < nvec;
      for (int l = 0; l < kBinLanes; ++l)
        idx[l] = topped ? exits[top_idx[r + l] - first_exit] : root;
      const Bin* x0 = bins + r;  // lane l reads at constant offset l
      // Unbalanced trees (LightGBM's leaf-wise growth: depth 10-20, most
      // leaves far shallower) stop once every lane is at a leaf (a leaf is
      // its own left child), checked every two levels past the fourth.
      for (int32_t d = topped ? L : 0; d < depth; d += 2) {
        for (int l = 0; l < kBinLanes; ++l) idx[l] = bin_step(idx[l], x0 + l, kBinRows);
        if (d + 1 < depth)
          for (int l = 0; l < kBinLanes; ++l) idx[l] = bin_step(idx[l], x0 + l, kBinRows);
        if (d >= 4 && d + 2 < depth) {
          bool leaves = true;
          for (int l = 0; l < kBinLanes; ++l) leaves &= bin_nodes_[idx[l]].left == idx[l];
          if (leaves) break;
        }
      }
      for (int l = 0; l < kBinLanes; ++l)
        add_leaf(bin_values_, out + (r + l) * K, group, shift, idx[l]);
    }
    for (; r < nrows; ++r) {
      int32_t n = root;
      for (int32_t d = 0; d < depth; ++d) n = bin_step(n, bins + r, kBinRows);
      add_leaf(bin_values_, out + r * K, group, shift, n);
    }
  }

  // One row: kRowLanes trees walk together; leaves are added in tree order.
  void binned_one_row(const Bin* bins, AccT* out) const {
    const int64_t T = static_cast<int64_t>(root_.size());
    int64_t t = 0;
    for (; t + kRowLanes <= T; t += kRowLanes) {
      int32_t idx[kRowLanes];
      int32_t depth = 0;
      for (int l = 0; l < kRowLanes; ++l) {
        idx[l] = root_[t + l];
        depth = std::max(depth, depth_[t + l]);
      }
      for (int32_t d = 0; d < depth; ++d)
        for (int l = 0; l < kRowLanes; ++l) idx[l] = bin_step(idx[l], bins, 1);
      for (int l = 0; l < kRowLanes; ++l)
        add_leaf(bin_values_, out, group_[t + l], shift_[t + l], idx[l]);
    }
    for (; t < T; ++t) {
      int32_t n = root_[t];
      for (int32_t d = 0; d < depth_[t]; ++d) n = bin_step(n, bins, 1);
      add_leaf(bin_values_, out, group_[t], shift_[t], n);
    }
  }

  // ---------------------------------------------------------------- float paths

  template <bool Fast, bool HasCat, bool HasZero>
  inline int32_t step(int32_t n, const ThrT* row) const {
    const Node& nd =
        Fast ? *reinterpret_cast<const Node*>(reinterpret_cast<const char*>(nodes_.data()) +
                                              static_cast<uint32_t>(n))
             : nodes_[n];
    const uint32_t f = nd.feature;
    const ThrT x = row[Fast ? f : (f & kNodeFeatureMask)];
    bool left;
    if (HasCat && (f & kNodeCategorical)) {
      left =
          forest_go_left_categorical<ThrT>(x, f, cat_bits_.data() + cat_offset_[n], cat_words_[n],
                                           cat_lo_, cat_hi_, spec_.cat_rule.integral);
    } else if (HasZero) {
      left = forest_go_left_numeric<ThrT>(x, nd.threshold, f);
    } else if (Fast) {
      left = x <= nd.threshold;  // missing values were mapped to -inf / +inf (see fast_)
    } else {
      left = (x <= nd.threshold) | ((x != x) & ((f & kNodeDefaultLeft) != 0));
    }
    // Indexing by the decision keeps the step branch-free (a jump here would
    // be mispredicted about half the time).
    return nd.child[!left];
  }

  // Rows [r0, r1) of X as a dense ThrT matrix: a view when X already is
  // one, else converted (float64 -> float32 rounds as XGBoost does).
  const ThrT* rows_as_thr(const ArrayView& X, int64_t r0, int64_t r1, int64_t* stride) const {
    const int64_t F = spec_.num_features;
    const size_t item = sizeof(ThrT);
    if (fast_) return rows_doubled(X, r0, r1, stride);
    if (X.dtype == dtype_of<ThrT>::value && X.strides[1] == static_cast<int64_t>(item) &&
        X.strides[0] % static_cast<int64_t>(item) == 0) {
      *stride = X.strides[0] / static_cast<int64_t>(item);
      return reinterpret_cast<const ThrT*>(static_cast<const char*>(X.data) + r0 * X.strides[0]);
    }
    thread_local std::vector<ThrT> buf;
    const size_t need = static_cast<size_t>((r1 - r0) * F);
    if (buf.size() < need) buf.resize(need);
    const char* base = static_cast<const char*>(X.data);
    for (int64_t r = r0; r < r1; ++r) {
      ThrT* dst = buf.data() + (r - r0) * F;
      const char* src = base + r * X.strides[0];
      if (X.dtype == DType::F32) {
        for (int64_t j = 0; j < F; ++j)
          dst[j] = static_cast<ThrT>(*reinterpret_cast<const float*>(src + j * X.strides[1]));
      } else {
        for (int64_t j = 0; j < F; ++j)
          dst[j] = static_cast<ThrT>(*reinterpret_cast<const double*>(src + j * X.strides[1]));
      }
    }
    *stride = F;
    return buf.data();
  }

  // Rows [r0, r1) feature-major, twice: x with NaN -> -inf, then x with
  // NaN -> +inf (see fast_). Feature-major lets the lanes of walk_tree share
  // one base pointer (lane l reads at a constant offset l).
  const ThrT* rows_doubled(const ArrayView& X, int64_t r0, int64_t r1, int64_t* stride) const {
    const int64_t F = spec_.num_features;
    thread_local std::vector<ThrT> buf;
    const size_t need = static_cast<size_t>(2 * F * kBlockRows);
    if (buf.size() < need) buf.resize(need);
    const char* base = static_cast<const char*>(X.data);
    const ThrT inf = std::numeric_limits<ThrT>::infinity();
    for (int64_t r = r0; r < r1; ++r) {
      ThrT* lo = buf.data() + (r - r0);
      ThrT* hi = lo + F * kBlockRows;
      const char* src = base + r * X.strides[0];
      auto put = [&](int64_t j, ThrT v) {
        const bool nan = v != v;
        lo[j * kBlockRows] = nan ? -inf : v;
        hi[j * kBlockRows] = nan ? inf : v;
      };
      if (X.dtype == DType::F32) {
        for (int64_t j = 0; j < F; ++j)
          put(j, static_cast<ThrT>(*reinterpret_cast<const float*>(src + j * X.strides[1])));
      } else {
        for (int64_t j = 0; j < F; ++j)
          put(j, static_cast<ThrT>(*reinterpret_cast<const double*>(src + j * X.strides[1])));
      }
    }
    *stride = 1;
    return buf.data();
  }

  template <bool Fast, bool HasCat, bool HasZero>
  void predict_block(const ArrayView& X, int64_t r0, int64_t r1, bool apply_link,
                     AccT* out_all) const {
    const int32_t K = spec_.num_outputs;
    int64_t stride = 0;
    const ThrT* xs = rows_as_thr(X, r0, r1, &stride);
    const int64_t nrows = r1 - r0;
    AccT* out = out_all + r0 * K;
    for (int64_t r = 0; r < nrows; ++r)
      for (int32_t k = 0; k < K; ++k) out[r * K + k] = base_[k];
    const int64_t T = static_cast<int64_t>(root_.size());
    if (nrows == 1) {
      walk_one_row<Fast, HasCat, HasZero>(xs, out);
    } else {
      for (int64_t t = 0; t < T; ++t) walk_tree<Fast, HasCat, HasZero>(t, xs, stride, nrows, out);
    }
    finish(out, nrows, apply_link);
  }

  // One tree over a block: kLanes rows walk together so their loads overlap.
  template <bool Fast, bool HasCat, bool HasZero>
  void walk_tree(int64_t t, const ThrT* xs, int64_t stride, int64_t nrows, AccT* out) const {
    const int32_t K = spec_.num_outputs;
    const int32_t root = root_[t], depth = depth_[t], group = group_[t];
    const int64_t shift = shift_[t];
    int64_t r = 0;
    for (; r + kLanes <= nrows; r += kLanes) {
      int32_t idx[kLanes];
      for (int l = 0; l < kLanes; ++l) idx[l] = handle<Fast>(root);
      if (Fast) {  // stride 1: lane l reads at constant offset l from one pointer
        const ThrT* x0 = xs + r;
        for (int32_t d = 0; d < depth; ++d)
          for (int l = 0; l < kLanes; ++l) idx[l] = step<Fast, HasCat, HasZero>(idx[l], x0 + l);
      } else {
        for (int32_t d = 0; d < depth; ++d)
          for (int l = 0; l < kLanes; ++l)
            idx[l] = step<Fast, HasCat, HasZero>(idx[l], xs + (r + l) * stride);
      }
      for (int l = 0; l < kLanes; ++l)
        add_leaf(out + (r + l) * K, group, shift, index<Fast>(idx[l]));
    }
    for (; r < nrows; ++r) {
      int32_t n = handle<Fast>(root);
      for (int32_t d = 0; d < depth; ++d) n = step<Fast, HasCat, HasZero>(n, xs + r * stride);
      add_leaf(out + r * K, group, shift, index<Fast>(n));
    }
  }

  // One row: kLanes trees walk together; leaves are added in tree order.
  template <bool Fast, bool HasCat, bool HasZero>
  void walk_one_row(const ThrT* x, AccT* out) const {
    const int64_t T = static_cast<int64_t>(root_.size());
    int64_t t = 0;
    for (; t + kRowLanes <= T; t += kRowLanes) {
      int32_t idx[kRowLanes];
      int32_t depth = 0;
      for (int l = 0; l < kRowLanes; ++l) {
        idx[l] = handle<Fast>(root_[t + l]);
        depth = std::max(depth, depth_[t + l]);
      }
      for (int32_t d = 0; d < depth; ++d)
        for (int l = 0; l < kRowLanes; ++l) idx[l] = step<Fast, HasCat, HasZero>(idx[l], x);
      for (int l = 0; l < kRowLanes; ++l)
        add_leaf(out, group_[t + l], shift_[t + l], index<Fast>(idx[l]));
    }
    for (; t < T; ++t) {
      int32_t n = handle<Fast>(root_[t]);
      for (int32_t d = 0; d < depth_[t]; ++d) n = step<Fast, HasCat, HasZero>(n, x);
      add_leaf(out, group_[t], shift_[t], index<Fast>(n));
    }
  }

  // Node handles: byte offsets on the fast path, indices otherwise.
  template <bool Fast>
  static int32_t handle(int32_t node) {
    return Fast ? node * static_cast<int32_t>(sizeof(Node)) : node;
  }
  template <bool Fast>
  static int32_t index(int32_t h) {
    return Fast ? static_cast<int32_t>(static_cast<uint32_t>(h) / sizeof(Node)) : h;
  }

  inline void add_leaf(AccT* row_out, int32_t group, int64_t shift, int32_t node) const {
    add_leaf(values_, row_out, group, shift, node);
  }
  inline void add_leaf(const std::vector<AccT>& values, AccT* row_out, int32_t group, int64_t shift,
                       int32_t node) const {
    if (group >= 0) {
      row_out[group] += values[shift + node];
    } else {
      const int32_t K = spec_.num_outputs;
      const AccT* v = values.data() + shift + static_cast<int64_t>(node) * K;
      for (int32_t k = 0; k < K; ++k) row_out[k] += v[k];
    }
  }

  void finish(AccT* out, int64_t nrows, bool apply_link) const {
    const int32_t K = spec_.num_outputs;
    if (spec_.divisor != 1.0 && (apply_link || spec_.divide_margin)) {
      const AccT div = static_cast<AccT>(spec_.divisor);
      for (int64_t i = 0; i < nrows * K; ++i) out[i] /= div;
    }
    if (apply_link) link_rows<AccT>(spec_.link, K, nrows, out);
  }

  const ForestSpec& spec_;
  const std::vector<int32_t>& root_;
  const std::vector<int32_t>& depth_;
  const std::vector<int32_t>& group_;
  const std::vector<int64_t>& shift_;
  const std::vector<int64_t>& cat_offset_;
  const std::vector<uint32_t>& cat_words_;
  std::vector<Node> nodes_;
  std::vector<AccT> values_;
  std::vector<AccT> base_;
  std::vector<uint32_t> cat_bits_;
  ThrT cat_lo_{}, cat_hi_{};
  // Binned path (see build_binned).
  std::vector<ThrT> cuts_;
  std::vector<int32_t> cut_offset_;
  std::vector<ThrT> simd_bins_;        // build_simd_bins
  std::vector<int64_t> simd_bin_off_;  // per feature; -1: binary search
  std::vector<BinNode> bin_nodes_;
  // The explicit layout's top levels as perfect trees for the AVX2 walk (see
  // build_explicit_tops): kTopNodes words and kTopExits exits per tree.
  std::vector<uint32_t> top_nodes_;
  std::vector<int32_t> top_exit_;
  std::vector<int32_t> top_levels_;
  // QuickScorer tables (build_qs): per bin column c, nodes [qs_begin_[c],
  // qs_begin_[c + 1]) sorted by threshold; qs_cols_ the columns with nodes.
  bool qs_ = false;
  std::vector<int32_t> qs_begin_, qs_cols_, qs_thr_, qs_tree_, qs_leaf_node_;
  std::vector<uint32_t> qs_lmask_;
  std::vector<AccT> qs_leaf_value_;  // one output: value of leaf j of tree t at t * 32 + j
  std::vector<uint32_t> node_word_;  // construction only: pack_perfect per spec node
  std::vector<AccT> bin_values_;
  bool perfect_ = false;
  std::vector<uint32_t> p_nodes_;
  std::vector<uint32_t> r_nodes_;  // the single-row layout (row_pos)
  std::vector<int64_t> r_node_off_;
  int64_t r_align_ = 0;  // r_nodes_.data() + r_align_ is 64-byte aligned
  std::vector<int64_t> p_node_off_, p_leaf_off_;
  std::vector<AccT> p_values_;
  bool has_cat_ = false, has_zero_missing_ = false, fast_ = false, binned_ = false;
};

}  // namespace

void forest_apply_link(ForestLink link, int32_t k, int64_t rows, float* data) {
  link_rows<float>(link, k, rows, data);
}
void forest_apply_link(ForestLink link, int32_t k, int64_t rows, double* data) {
  link_rows<double>(link, k, rows, data);
}

// ------------------------------------------------------------------ validation

namespace {

template <typename V>
void check_size(const V& v, int64_t n, const char* name) {
  if (static_cast<int64_t>(v.size()) != n)
    fail<std::invalid_argument>("forest ", name, " must have ", n, " entries, got ", v.size());
}

}  // namespace

Forest::~Forest() = default;

std::shared_ptr<Forest> Forest::build(ForestSpec spec) {
  std::shared_ptr<Forest> f(new Forest());
  f->spec_ = std::move(spec);
  f->finish_build();
  return f;
}

void Forest::finish_build() {
  ForestSpec& s = spec_;
  FASTML_CHECK_ARG(s.num_features >= 1 && s.num_features < kMaxForestFeatures, "num_features",
                   "must be in [1, ", kMaxForestFeatures, "), got ", s.num_features);
  FASTML_CHECK_ARG(s.num_outputs >= 1 && s.num_outputs <= kMaxOutputs, "num_outputs",
                   "must be in [1, ", kMaxOutputs, "], got ", s.num_outputs);
  FASTML_CHECK_ARG(std::isfinite(s.divisor) && s.divisor != 0.0, "divisor",
                   "must be finite and non-zero, got ", s.divisor);
  const int32_t link = static_cast<int32_t>(s.link);
  FASTML_CHECK_ARG(link >= 0 && link <= 4, "link", "must be 0..4, got ", link);
  FASTML_CHECK_ARG(!std::isnan(s.cat_rule.lo) && !std::isnan(s.cat_rule.hi), "cat_rule",
                   "bounds must not be NaN");
  check_size(s.base_margin, s.num_outputs, "base_margin");

  const int64_t T = s.num_trees();
  const int64_t N = s.num_nodes();
  FASTML_CHECK_ARG(N < (int64_t{1} << 31), "forest", "has too many nodes: ", N);
  check_size(s.tree_node_offsets, T + 1, "tree_node_offsets");
  check_size(s.node_threshold, N, "node_threshold");
  check_size(s.node_left, N, "node_left");
  check_size(s.node_right, N, "node_right");
  check_size(s.node_flags, N, "node_flags");
  check_size(s.node_cat, N, "node_cat");
  FASTML_CHECK_ARG(s.tree_node_offsets[0] == 0 && s.tree_node_offsets[T] == N, "tree_node_offsets",
                   "must start at 0 and end at the node count ", N);
  // Every tree's node range inside [0, N) before any node is read (found by
  // ASan: an offset past N made the walk below read past the node arrays).
  for (int64_t t = 0; t < T; ++t) {
    if (s.tree_node_offsets[t + 1] <= s.tree_node_offsets[t] || s.tree_node_offsets[t + 1] > N)
      fail<std::invalid_argument>("tree ", t, " has no nodes or nodes past the forest's ", N,
                                  " (tree_node_offsets)");
  }
  if (s.cat_offsets.empty()) s.cat_offsets.push_back(0);
  const int64_t C = static_cast<int64_t>(s.cat_offsets.size()) - 1;
  FASTML_CHECK_ARG(
      s.cat_offsets[0] == 0 && s.cat_offsets[C] == static_cast<int64_t>(s.cat_bits.size()),
      "cat_offsets", "must start at 0 and end at the bitset length ", s.cat_bits.size());
  for (int64_t c = 0; c < C; ++c) {
    const int64_t words = s.cat_offsets[c + 1] - s.cat_offsets[c];
    FASTML_CHECK_ARG(words >= 0 && words < (int64_t{1} << 26), "cat_offsets",
                     "must be non-decreasing with bounded sets, got ", words, " words at set ", c);
  }

  tree_root_.assign(T, 0);
  tree_depth_.assign(T, 0);
  tree_value_shift_.assign(T, 0);
  node_cat_offset_.assign(N, 0);
  node_cat_words_.assign(N, 0);
  int64_t value_offset = 0;
  std::vector<int32_t> stack;
  std::vector<int32_t> depth_of;
  std::vector<uint8_t> seen;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t base = s.tree_node_offsets[t];
    const int64_t n = s.tree_node_offsets[t + 1] - base;
    if (n < 1) fail<std::invalid_argument>("tree ", t, " has no nodes (tree_node_offsets)");
    const int32_t group = s.tree_group[t];
    if (group < -1 || group >= s.num_outputs)
      fail<std::invalid_argument>("tree ", t, " has group ", group, ", expected -1..",
                                  s.num_outputs - 1);
    const int64_t width = group >= 0 ? 1 : s.num_outputs;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = base + i;
      const int32_t l = s.node_left[a], r = s.node_right[a];
      if ((l < 0) != (r < 0))
        fail<std::invalid_argument>("tree ", t, " node ", i, " has one child only");
      if (l < 0) continue;
      if (l >= n || r >= n || l == i || r == i || l == r)
        fail<std::invalid_argument>("tree ", t, " node ", i, " has children (", l, ", ", r,
                                    ") outside the tree's ", n, " nodes");
      const int32_t feat = s.node_feature[a];
      if (feat < 0 || feat >= s.num_features)
        fail<std::invalid_argument>("tree ", t, " node ", i, " splits on feature ", feat,
                                    " but the model has ", s.num_features, " features");
      if (s.node_flags[a] & kNodeCategorical) {
        const int32_t c = s.node_cat[a];
        if (c < 0 || c >= C)
          fail<std::invalid_argument>("tree ", t, " node ", i, " refers to category set ", c,
                                      " of ", C);
        node_cat_offset_[a] = s.cat_offsets[c];
        node_cat_words_[a] = static_cast<uint32_t>(s.cat_offsets[c + 1] - s.cat_offsets[c]);
      } else if (std::isnan(s.node_threshold[a])) {
        fail<std::invalid_argument>("tree ", t, " node ", i, " has a NaN threshold");
      }
    }
    // Walk from the root: every node at most once (a tree, not a graph), bounded depth.
    seen.assign(n, 0);
    depth_of.assign(n, 0);
    stack.assign(1, 0);
    seen[0] = 1;
    int32_t depth = 0;
    while (!stack.empty()) {
      const int32_t i = stack.back();
      stack.pop_back();
      const int64_t a = base + i;
      if (s.node_left[a] < 0) {
        depth = std::max(depth, depth_of[i]);
        continue;
      }
      for (int32_t c : {s.node_left[a], s.node_right[a]}) {
        if (seen[c])
          fail<std::invalid_argument>("tree ", t, " is not a tree: node ", c, " is reached twice");
        seen[c] = 1;
        depth_of[c] = depth_of[i] + 1;
        if (depth_of[c] > kMaxTreeDepth)
          fail<std::invalid_argument>("tree ", t, " is deeper than ", kMaxTreeDepth);
        stack.push_back(c);
      }
    }
    tree_root_[t] = static_cast<int32_t>(base);
    tree_depth_[t] = depth;
    max_depth_ = std::max(max_depth_, depth);
    tree_value_shift_[t] = value_offset - base * width;
    value_offset += n * width;
  }
  check_size(s.tree_group, T, "tree_group");
  check_size(s.node_feature, N, "node_feature");
  check_size(s.leaf_values, value_offset, "leaf_values");

  if (s.threshold_f64 && s.accum_f64)
    engine_ = std::make_unique<Engine<double, double>>(
        s, tree_root_, tree_depth_, tree_value_shift_, node_cat_offset_, node_cat_words_);
  else if (s.threshold_f64)
    engine_ = std::make_unique<Engine<double, float>>(s, tree_root_, tree_depth_, tree_value_shift_,
                                                      node_cat_offset_, node_cat_words_);
  else if (s.accum_f64)
    engine_ = std::make_unique<Engine<float, double>>(s, tree_root_, tree_depth_, tree_value_shift_,
                                                      node_cat_offset_, node_cat_words_);
  else
    engine_ = std::make_unique<Engine<float, float>>(s, tree_root_, tree_depth_, tree_value_shift_,
                                                     node_cat_offset_, node_cat_words_);
}

const char* Forest::engine_name() const {
  return engine_->name();
}

ForestLayout forest_kernel_layout(const Forest& f, bool general) {
  if (general || f.num_features() > kForestMaxBinnedFeatures) return ForestLayout::General;
  return f.engine().binned_layout();
}

const char* forest_layout_name(ForestLayout layout) {
  switch (layout) {
    case ForestLayout::Perfect: return "perfect";
    case ForestLayout::Explicit: return "explicit";
    case ForestLayout::General: break;
  }
  return "general";
}

ForestKernelData forest_kernel_data(const Forest& f, bool general) {
  const ForestSpec& s = f.spec();
  ForestKernelData d;
  d.tree_depth = f.tree_depth();
  d.tree_group = s.tree_group;
  d.one_output = s.num_outputs == 1 && std::all_of(s.tree_group.begin(), s.tree_group.end(),
                                                   [](int32_t g) { return g == 0; });
  auto as_acc = [&](const std::vector<double>& v, std::vector<unsigned char>& dst) {
    if (s.accum_f64) {
      assign_bytes(dst, v.data(), v.size());
    } else {
      const std::vector<float> v32(v.begin(), v.end());
      assign_bytes(dst, v32.data(), v32.size());
    }
  };
  as_acc(s.base_margin, d.base);
  d.layout = forest_kernel_layout(f, general);
  if (d.layout != ForestLayout::General) {
    f.engine().binned_kernel_data(d);
    return d;
  }
  if (s.threshold_f64) {
    const auto nodes = general_nodes<double>(s);
    assign_bytes(d.nodes, nodes.data(), nodes.size());
  } else {
    const auto nodes = general_nodes<float>(s);
    assign_bytes(d.nodes, nodes.data(), nodes.size());
  }
  as_acc(s.leaf_values, d.values);
  d.tree_node.assign(f.tree_root().begin(), f.tree_root().end());
  d.tree_vshift = f.tree_value_shift();
  d.node_cat_offset = f.node_cat_offset();
  d.node_cat_words = f.node_cat_words();
  d.cat_bits = s.cat_bits;
  return d;
}

// ------------------------------------------------------------------ prediction

void Forest::check_matrix(const ArrayView& X, const char* name) const {
  FASTML_CHECK_TYPE(X.dtype == DType::F32 || X.dtype == DType::F64, name,
                    "must be float32 or float64, got ", X.describe());
  FASTML_CHECK_ARG(X.ndim == 2, name, "must be 2-D (rows, features), got ", X.describe());
  FASTML_CHECK_ARG(X.shape[1] == spec_.num_features, name, "must have ", spec_.num_features,
                   " features (columns), got ", X.describe());
}

void Forest::predict(const ArrayView& X, bool apply_link, void* out) const {
  check_matrix(X, "X");
  engine_->predict(X, apply_link, out);
}

HandlerOutput Forest::run(const ArrayView& batch) {
  ArrayView X = batch;
  if (X.ndim == 1) {  // one request of num_features values
    X.ndim = 2;
    X.shape[1] = X.shape[0];
    X.shape[0] = 1;
    X.strides[1] = X.strides[0];
    X.strides[0] = X.shape[1] * X.strides[1];
  }
  check_matrix(X, "batch");
  HandlerOutput out;
  out.dtype = output_dtype();
  const int64_t rows = X.shape[0];
  out.buffer =
      Buffer::allocate(static_cast<size_t>(rows * spec_.num_outputs) * itemsize(out.dtype));
  engine_->predict(X, true, out.buffer->data());
  out.shape = {rows};
  if (spec_.num_outputs > 1) out.shape.push_back(spec_.num_outputs);
  return out;
}

void Forest::check_input(const ArrayView& request, const char* name) const {
  FASTML_CHECK_TYPE(request.dtype == DType::F32 || request.dtype == DType::F64, name,
                    "must be float32 or float64, got ", request.describe());
  const int64_t width = request.ndim >= 1 ? request.shape[request.ndim - 1] : 0;
  FASTML_CHECK_ARG(request.ndim >= 1 && request.ndim <= 2 && width == spec_.num_features, name,
                   "must be (", spec_.num_features, ",) or (rows, ", spec_.num_features, "), got ",
                   request.describe());
}

std::string Forest::handler_name() const {
  return "Forest(" + spec_.objective + ", " + std::to_string(num_trees()) + " trees)";
}

// ------------------------------------------------------------------ serialisation
//
// Layout (little-endian): magic "FMLFRST1", u32 version, u32 reserved,
// u64 payload bytes, u64 FNV-1a-64 of the payload, payload. The payload holds
// the ForestSpec fields in a fixed order; arrays are a u64 count plus raw data.

namespace {

constexpr char kMagic[8] = {'F', 'M', 'L', 'F', 'R', 'S', 'T', '1'};
constexpr uint32_t kFormatVersion = 1;

struct Writer {
  std::vector<uint8_t> out;
  template <typename T>
  void pod(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  template <typename T>
  void vec(const std::vector<T>& v) {
    pod<uint64_t>(v.size());
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    out.insert(out.end(), p, p + v.size() * sizeof(T));
  }
};

// Reads fields of a forest file; every failure is a FormatError naming the
// source, the field and its byte offset in the file.
struct Reader {
  const uint8_t* base;  // the file's first byte (offsets are reported from it)
  const uint8_t* p;
  size_t left;
  const std::string& source;

  [[noreturn]] void corrupt(const char* what, const std::string& why) const {
    fail<FormatError>(source, ": not a valid fastml forest file: ", why, " (field '", what,
                      "' at byte ", p - base, ")");
  }
  template <typename T>
  T pod(const char* what) {
    if (left < sizeof(T)) corrupt(what, "the file is truncated");
    T v;
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    left -= sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> vec(const char* what) {
    const auto n = pod<uint64_t>(what);
    if (n > left / sizeof(T)) {
      p -= sizeof(uint64_t);
      corrupt(what, detail::concat("its length ", n, " runs past the end of the file"));
    }
    std::vector<T> v(static_cast<size_t>(n));
    if (n) std::memcpy(v.data(), p, n * sizeof(T));
    p += n * sizeof(T);
    left -= n * sizeof(T);
    return v;
  }
  std::string text(const char* what) {
    const uint8_t* at = p;
    auto chars = vec<char>(what);
    std::string s(chars.begin(), chars.end());
    const size_t bad = utf8_invalid_at(s);
    if (bad != std::string::npos) {
      p = at + sizeof(uint64_t) + bad;
      corrupt(what, "the text is not valid UTF-8");
    }
    return s;
  }
};

}  // namespace

std::vector<uint8_t> Forest::serialize() const {
  const ForestSpec& s = spec_;
  Writer w;
  w.pod<int32_t>(s.num_features);
  w.pod<int32_t>(s.num_outputs);
  w.pod<uint8_t>(s.threshold_f64);
  w.pod<uint8_t>(s.accum_f64);
  w.pod<int32_t>(static_cast<int32_t>(s.link));
  w.pod<double>(s.divisor);
  w.pod<uint8_t>(s.divide_margin);
  w.pod<double>(s.cat_rule.lo);
  w.pod<double>(s.cat_rule.hi);
  w.pod<uint8_t>(s.cat_rule.integral);
  w.vec(std::vector<char>(s.objective.begin(), s.objective.end()));
  w.vec(std::vector<char>(s.metadata.begin(), s.metadata.end()));
  w.vec(s.tree_node_offsets);
  w.vec(s.tree_group);
  w.vec(s.node_feature);
  w.vec(s.node_threshold);
  w.vec(s.node_left);
  w.vec(s.node_right);
  w.vec(s.node_flags);
  w.vec(s.node_cat);
  w.vec(s.cat_offsets);
  w.vec(s.cat_bits);
  w.vec(s.leaf_values);
  w.vec(s.base_margin);
  std::vector<uint8_t> out(kMagic, kMagic + 8);
  Writer h;
  h.pod<uint32_t>(kFormatVersion);
  h.pod<uint32_t>(0);
  h.pod<uint64_t>(w.out.size());
  h.pod<uint64_t>(fnv1a64(w.out.data(), w.out.size()));
  out.insert(out.end(), h.out.begin(), h.out.end());
  out.insert(out.end(), w.out.begin(), w.out.end());
  return out;
}

std::shared_ptr<Forest> Forest::deserialize(const uint8_t* data, size_t size,
                                            const std::string& source) {
  if (size < 8 || std::memcmp(data, kMagic, 8) != 0) {
    fail<FormatError>(source, ": not a fastml forest file (no 'FMLFRST1' magic at byte 0; ", size,
                      " bytes)");
  }
  Reader hr{data, data + 8, size - 8, source};
  const auto version = hr.pod<uint32_t>("version");
  if (version != kFormatVersion) {
    fail<FormatError>(source, ": fastml forest format version ", version,
                      " is not supported (this build reads version ", kFormatVersion,
                      "; field 'version' at byte 8)");
  }
  if (hr.pod<uint32_t>("reserved") != 0) {
    fail<FormatError>(source, ": not a valid fastml forest file: the reserved field (byte 12) ",
                      "is not 0");
  }
  const auto nbytes = hr.pod<uint64_t>("payload size");
  const auto checksum = hr.pod<uint64_t>("checksum");
  if (nbytes != hr.left) {
    fail<FormatError>(source, ": not a valid fastml forest file: the header (field 'payload size' ",
                      "at byte 16) says ", nbytes, " payload bytes, the file has ", hr.left,
                      " (truncated or padded)");
  }
  if (fnv1a64(hr.p, hr.left) != checksum) {
    fail<FormatError>(source, ": not a valid fastml forest file: the payload (bytes 32 to ", size,
                      ") does not match its checksum (field 'checksum' at byte 24): corrupted");
  }
  Reader r{data, hr.p, hr.left, source};
  ForestSpec s;
  s.num_features = r.pod<int32_t>("num_features");
  s.num_outputs = r.pod<int32_t>("num_outputs");
  s.threshold_f64 = r.pod<uint8_t>("threshold_f64") != 0;
  s.accum_f64 = r.pod<uint8_t>("accum_f64") != 0;
  s.link = static_cast<ForestLink>(r.pod<int32_t>("link"));
  s.divisor = r.pod<double>("divisor");
  s.divide_margin = r.pod<uint8_t>("divide_margin") != 0;
  s.cat_rule.lo = r.pod<double>("cat_lo");
  s.cat_rule.hi = r.pod<double>("cat_hi");
  s.cat_rule.integral = r.pod<uint8_t>("cat_integral") != 0;
  s.objective = r.text("objective");
  s.metadata = r.text("metadata");
  s.tree_node_offsets = r.vec<int64_t>("tree_node_offsets");
  s.tree_group = r.vec<int32_t>("tree_group");
  s.node_feature = r.vec<int32_t>("node_feature");
  s.node_threshold = r.vec<double>("node_threshold");
  s.node_left = r.vec<int32_t>("node_left");
  s.node_right = r.vec<int32_t>("node_right");
  s.node_flags = r.vec<uint32_t>("node_flags");
  s.node_cat = r.vec<int32_t>("node_cat");
  s.cat_offsets = r.vec<int64_t>("cat_offsets");
  s.cat_bits = r.vec<uint32_t>("cat_bits");
  s.leaf_values = r.vec<double>("leaf_values");
  s.base_margin = r.vec<double>("base_margin");
  if (r.left != 0) r.corrupt("base_margin", detail::concat(r.left, " unexpected trailing bytes"));
  try {
    return build(std::move(s));
  } catch (const std::invalid_argument& e) {
    // The fields parsed but do not form a valid forest (build names the field).
    fail<FormatError>(source, ": not a valid fastml forest file: ", e.what());
  }
}

}  // namespace fastml::infer
