// The binned encoding of fastml's tree-ensemble engine, shared by the CPU
// engine (forest.cpp) and the CUDA kernel (cuda/forest_kernels.cu, through
// infer/forest_block.hpp).
//
// At build time the distinct thresholds of each feature are sorted into
// *cuts*; a node keeps the rank of its threshold among them. An input value
// (rounded to the forest's threshold type) is mapped to its *bin*, the number
// of cuts below it, so "x <= t_k" becomes "bin(x) <= k": exact by
// construction, one integer compare per node whatever the threshold type.
// Missing values take bin 0 in the column read by default-left nodes and the
// top bin in the column read by default-right nodes, so no NaN test remains.
#pragma once

#include <cstdint>

#include "common/float16.hpp"  // FASTML_HD

namespace fastml::infer {

// Bins are stored biased, as int16 (bin - 32768), so that SIMD compares them
// with signed 16-bit compares.
using Bin = int16_t;
inline constexpr int32_t kBinBias = 32768;
// Bin of a missing input in the column read by default-left nodes (bin 0).
inline constexpr Bin kBinBottom = -32768;
// Bin of a missing input in the column read by default-right nodes, and the
// threshold of a leaf (every bin is <= it, so a leaf stays put).
inline constexpr Bin kBinTop = 32767;
// At most this many distinct thresholds per feature on the binned path (real
// bins are 0..count, so count + 1 < 65535, the unbiased kBinTop).
inline constexpr int64_t kMaxBinCuts = 65533;

// A node of the explicit-children layout: "go left when bin(x) <= thr".
// Children are adjacent (right = left + 1); a leaf has thr = kBinTop and
// left = itself, so walking past it stays on it.
struct BinNode {
  Bin thr;       // index of the threshold among the feature's sorted distinct ones, biased
  uint16_t col;  // bin column: the feature, + num_features when missing values go right
  int32_t left;  // absolute index of the left child
};
static_assert(sizeof(BinNode) == 8, "BinNode is 8 bytes");

// A node of the perfect layout (trees padded to complete trees, children of
// local node i at 2i+1 and 2i+2): biased threshold bin (low 16 bits) | bin
// column (high 16 bits). A leaf above the tree's depth is an always-left node
// (threshold kBinTop) over copies of itself.
FASTML_HD inline uint32_t pack_perfect(Bin thr, uint16_t col) {
  return static_cast<uint32_t>(static_cast<uint16_t>(thr)) | (static_cast<uint32_t>(col) << 16);
}
FASTML_HD inline Bin perfect_thr(uint32_t nd) {
  return static_cast<Bin>(static_cast<uint16_t>(nd & 0xFFFFu));
}
FASTML_HD inline uint32_t perfect_col(uint32_t nd) {
  return nd >> 16;
}

// The bin of x once a search over `cuts` has narrowed it to the cut at b.
template <typename ThrT>
FASTML_HD inline Bin forest_bin_at(const ThrT* cuts, const ThrT* b, ThrT x) {
  return static_cast<Bin>((b - cuts) + (*b < x ? 1 : 0) - kBinBias);
}

// The number of the `count` sorted distinct cuts below x, biased (NaN counts
// none; the caller stores missing values itself). Branch-free: the loop runs
// log2(count) times whatever x is.
template <typename ThrT>
FASTML_HD inline Bin forest_bin_of(const ThrT* cuts, int32_t count, ThrT x) {
  if (count == 0) return kBinBottom;
  const ThrT* b = cuts;
  int32_t len = count;
  while (len > 1) {
    const int32_t half = len / 2;
    b = (b[half] < x) ? b + half : b;
    len -= half;
  }
  return forest_bin_at(cuts, b, x);
}

}  // namespace fastml::infer
