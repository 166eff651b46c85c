// Per-node decision logic of fastml's tree-ensemble engine, shared by the
// CPU traversal (forest.cpp) and the CUDA kernel (cuda/forest_kernels.cu).
//
// Every split is normalised at load time to "go left when x <= threshold";
// the Python loaders rewrite XGBoost's "x < t" as "x <= nextafter(t, -inf)"
// and scikit-learn's double thresholds for float32 inputs as the largest
// float <= t, so one comparison serves all three libraries exactly.
#pragma once

#include <cstdint>

#include "common/float16.hpp"  // FASTML_HD

namespace fastml::infer {

// Flags stored in the top bits of ForestNode::feature.
inline constexpr uint32_t kNodeDefaultLeft = 1u << 31;     // missing values go left
inline constexpr uint32_t kNodeCategorical = 1u << 30;     // a categorical (bitset) split
inline constexpr uint32_t kNodeZeroMissing = 1u << 29;     // LightGBM: |x| <= 1e-35 is missing too
inline constexpr uint32_t kNodeCatSetLeft = 1u << 28;      // categories in the set go left
inline constexpr uint32_t kNodeCatInvalidLeft = 1u << 27;  // invalid categories go left
inline constexpr uint32_t kNodeFeatureMask = (1u << 27) - 1u;
inline constexpr int32_t kMaxForestFeatures = 1 << 27;

// LightGBM's kZeroThreshold (a float constant compared in double).
inline constexpr float kLightGBMZero = 1e-35f;

// One node. Leaves point to themselves on both sides, so a tree can be
// walked a fixed number of steps (its depth) without a leaf test.
template <typename T>
struct ForestNode {
  T threshold;       // numeric split: go left when x <= threshold
  uint32_t feature;  // feature index | flags
  int32_t child[2];  // absolute node indices: [0] left, [1] right
};

// The categorical rule: NaN takes the default direction; values outside
// [cat_lo, cat_hi) are invalid categories; others are truncated to an integer
// and looked up in the node's bitset.
struct CategoricalRule {
  double lo = 0.0;
  double hi = 2147483648.0;
  bool integral = false;  // non-integer values are invalid (scikit-learn), else truncated
};

template <typename T>
FASTML_HD inline bool forest_go_left_numeric(T x, T threshold, uint32_t flags) {
  const bool nan = x != x;
  if (flags & kNodeZeroMissing) {
    const T z = static_cast<T>(kLightGBMZero);
    const bool missing = nan || (x >= -z && x <= z);
    return missing ? (flags & kNodeDefaultLeft) != 0 : x <= threshold;
  }
  // x <= threshold is false for NaN, so missing values only add the default.
  return (x <= threshold) | (nan & ((flags & kNodeDefaultLeft) != 0));
}

template <typename T>
FASTML_HD inline bool forest_go_left_categorical(T x, uint32_t flags, const uint32_t* bits,
                                                 uint32_t nwords, T cat_lo, T cat_hi,
                                                 bool integral) {
  if (x != x) return (flags & kNodeDefaultLeft) != 0;
  if (!(x >= cat_lo) || !(x < cat_hi)) return (flags & kNodeCatInvalidLeft) != 0;
  const int64_t c = static_cast<int64_t>(x);  // truncation, as the libraries do
  if (integral && static_cast<T>(c) != x) return (flags & kNodeCatInvalidLeft) != 0;
  bool in_set = false;
  if (c >= 0) {
    const uint64_t word = static_cast<uint64_t>(c) >> 5;
    in_set = word < nwords && ((bits[word] >> (static_cast<uint64_t>(c) & 31u)) & 1u) != 0;
  }
  return in_set == ((flags & kNodeCatSetLeft) != 0);
}

// The CUDA kernel's ordered sum of one tile of trees for output k of one row
// (forest_trees_kernel), here so that CPU tests run it. Tree lt of the tile
// (lt < n) left at lv[lt * stride] its leaf's value (a scalar leaf for output
// group[lt] >= 0, added when group[lt] == k) or its leaf's node index (a
// vector leaf, group[lt] < 0: vector_value(lt, node) gives its k-th value).
// `one_output`: every tree of the tile has a scalar leaf for output 0 (a
// single-output forest), so every tree adds: a plain loop over the leaves,
// the same additions in the same order (bit-identical), without a group load
// and test per tree; the loads are independent, so only the adds are serial.
template <typename AccT, typename VectorValue>
FASTML_HD inline AccT forest_tile_sum(AccT a, const AccT* lv, int64_t stride, const int32_t* group,
                                      int32_t n, int32_t k, bool one_output,
                                      const VectorValue& vector_value) {
  if (one_output) {
    int32_t lt = 0;
    for (; lt + 4 <= n; lt += 4) {
      const AccT v0 = lv[lt * stride], v1 = lv[(lt + 1) * stride];
      const AccT v2 = lv[(lt + 2) * stride], v3 = lv[(lt + 3) * stride];
      a += v0;
      a += v1;
      a += v2;
      a += v3;
    }
    for (; lt < n; ++lt) a += lv[lt * stride];
    return a;
  }
  for (int32_t lt = 0; lt < n; ++lt) {
    const int32_t g = group[lt];
    if (g == k) {
      a += lv[lt * stride];
    } else if (g < 0) {
      a += vector_value(lt, *reinterpret_cast<const int32_t*>(lv + lt * stride));
    }
  }
  return a;
}

// Link functions (output="value").
enum class ForestLink : int32_t {
  Identity = 0,
  Sigmoid = 1,
  Softmax = 2,
  Exp = 3,
  Hinge = 4,  // 1 when the margin is > 0, else 0
};

}  // namespace fastml::infer
