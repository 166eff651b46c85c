// The work of one block of the CUDA Forest kernel (cuda/forest_kernels.cu),
// written as __host__ __device__ phases so that the CPU tests run the same
// code: forest_emulate_kernel (forest.cpp) runs every block of a launch on the
// host, each phase for every thread in turn, which is what the kernel's
// barriers between the phases guarantee on the GPU.
//
// A block takes R rows (1..32) and walks the trees a tile at a time:
//   start  binned layouts: the block's rows as bins in shared memory, one
//          32-bit word per (feature, row) holding its two bin columns
//          (missing -> bottom | missing -> top), each a binary search over the
//          feature's cuts; accumulators set to the base. One-row blocks count
//          each feature's cuts below x with 32 threads instead (independent
//          loads: one memory latency, not log2(cuts) dependent ones) and
//   bins_done adds the counts (after a barrier)
//   walk   thread i walks tree (tile + i / R, then + kForestThreads / R, ...)
//          for row i % R, two trees at a time (their loads overlap), so the
//          threads of a warp walk one tree for consecutive rows; each walk
//          leaves its leaf's value (or, for a vector leaf, the leaf's index)
//          in shared memory, laid out [tree][row]
//   sum    one thread per (row, output) adds the tile's leaves in tree
//          order (forest_tile_sum): the CPU engine's additions in its order,
//          so margins are bit-identical
//   store  the sums to the output; then divisor and link per row.
// One row uses the whole block (its trees walked in parallel), so a small
// batch costs about one tree's walk per tile plus an ordered add per tree.
//
// Layouts (ForestKernelArgs::layout):
//   Perfect   the CPU engine's binned perfect trees: 4-byte nodes, children
//             of local node i at 2i+1 and 2i+2, integer compares of bins
//   Explicit  the binned explicit-children layout (8-byte BinNode), for
//             deep unbalanced trees (LightGBM's leaf-wise growth)
//   General   ForestNode<ThrT> with per-node NaN, zero-as-missing and
//             categorical rules (forests the binned encoding cannot take)
// On the device, a bin column c of the CPU engine (feature f, + F when missing
// values go right) is renumbered 2f + (c >= F), so both columns of a feature
// sit in one 32-bit word of shared memory (forest_device_col).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "infer/forest_binned.hpp"
#include "infer/forest_node.hpp"

// Full unrolling of the accumulator loops (registers, not local memory, on
// the GPU); the host compiler decides for itself.
#ifdef __CUDACC__
#define FASTML_FOREST_UNROLL _Pragma("unroll")
#else
#define FASTML_FOREST_UNROLL
#endif

namespace fastml::infer {

enum class ForestLayout : int32_t { General = 0, Perfect = 1, Explicit = 2 };

// Threads that count one feature's cuts together for a one-row block, and
// the stride of their partial counts in shared memory, [thread][feature]: odd,
// so the 32 threads of a feature write 32 banks and the threads that add up
// consecutive features read 32 banks.
inline constexpr int32_t kForestBinSplit = 32;
FASTML_HD inline int32_t forest_bin_split_stride(int32_t num_features) {
  return (num_features + 1) | 1;
}

// Threads per block, the most rows per block, the most trees per tile, the
// shared memory of a tile's leaves (+ groups) and of a block's bins, and the
// accumulators a summing thread keeps in registers.
inline constexpr int kForestThreads = 256;
inline constexpr int32_t kForestMaxBlockRows = 32;
inline constexpr int32_t kForestMaxTile = 1024;
inline constexpr size_t kForestLeafSmem = 32 * 1024;
inline constexpr size_t kForestBinSmem = 16 * 1024;
inline constexpr int kForestAccPerThread = 4;
// The widest forest the binned kernel takes: one row's bins must fit.
inline constexpr int32_t kForestMaxBinnedFeatures = static_cast<int32_t>(kForestBinSmem / 4);

// Device bin column of the CPU engine's column c (see the top of the file).
inline uint16_t forest_device_col(uint32_t c, uint32_t num_features) {
  return static_cast<uint16_t>(c < num_features ? 2 * c : 2 * (c - num_features) + 1);
}

template <typename ThrT, typename AccT>
struct ForestKernelArgs {
  ForestLayout layout = ForestLayout::General;
  const void* nodes = nullptr;  // ForestNode<ThrT> | uint32_t (perfect) | BinNode (explicit)
  // Tree t's leaf reached at index i (the walk's final node: absolute for
  // General/Explicit, local for Perfect) has its values at
  // values[tree_vshift[t] + i * width], width 1 for a scalar leaf (group >= 0).
  const AccT* values = nullptr;
  const AccT* base = nullptr;          // num_outputs
  const int64_t* tree_node = nullptr;  // root (General/Explicit) or first node (Perfect)
  const int32_t* tree_depth = nullptr;
  const int32_t* tree_group = nullptr;  // output of a scalar leaf; -1: a vector leaf
  const int64_t* tree_vshift = nullptr;
  // General: categorical splits.
  const int64_t* node_cat_offset = nullptr;
  const uint32_t* node_cat_words = nullptr;
  const uint32_t* cat_bits = nullptr;
  ThrT cat_lo{}, cat_hi{};
  bool cat_integral = false;
  // Binned: the sorted distinct thresholds of feature f are
  // cuts[cut_offset[f] .. cut_offset[f + 1]).
  const ThrT* cuts = nullptr;
  const int32_t* cut_offset = nullptr;
  int32_t num_features = 0;
  int32_t num_outputs = 1;
  int64_t num_trees = 0;
  bool one_output = false;  // every tree a scalar leaf of output 0 (forest_tile_sum)
  double divisor = 1.0;     // 1: none
  int32_t link = 0;         // ForestLink; 0: identity
};

// How a batch is cut into blocks (the same on the GPU and in the emulation).
struct ForestLaunchShape {
  int32_t rows_per_block = 1;
  int32_t tile = 1;
  int64_t blocks = 0;
  size_t bin_bytes = 0;  // start of the leaf tile in shared memory
  size_t smem = 0;
  // One-row blocks of a binned forest whose leaf tile holds kForestBinSplit
  // partial counts per feature: each bin is counted by 32 threads
  // (ForestBlock::start, then bins_done), not searched by one.
  bool split_bins = false;
};

// Rows per block: the most (up to 32, so a warp walks one tree for 32 rows)
// that still gives every SM four blocks, and whose bins fit kForestBinSmem;
// 1 for small batches, where one row's trees are walked by a whole block.
// The tile: as many trees as kForestLeafSmem holds leaves of, up to
// kForestMaxTile (one tile for a 1,000-tree forest and one row).
inline ForestLaunchShape forest_launch_shape(int64_t rows, int sm_count, ForestLayout layout,
                                             int32_t num_features, size_t acc_bytes) {
  ForestLaunchShape s;
  const int64_t want_blocks = int64_t{4} * (sm_count > 0 ? sm_count : 1);
  int32_t R = kForestMaxBlockRows;
  while (R > 1 && (rows + R - 1) / R < want_blocks) R /= 2;
  if (layout != ForestLayout::General) {
    while (R > 1 && static_cast<size_t>(num_features) * R * 4 > kForestBinSmem) R /= 2;
    s.bin_bytes = (static_cast<size_t>(num_features) * R * 4 + 15) / 16 * 16;
  }
  const size_t per_tree = static_cast<size_t>(R) * acc_bytes + sizeof(int32_t);
  const size_t fit = kForestLeafSmem / per_tree;
  s.rows_per_block = R;
  s.tile = static_cast<int32_t>(fit < static_cast<size_t>(kForestMaxTile) ? fit : kForestMaxTile);
  s.blocks = (rows + R - 1) / R;
  s.smem = s.bin_bytes + static_cast<size_t>(s.tile) * per_tree;
  s.split_bins = layout != ForestLayout::General && R == 1 &&
                 static_cast<size_t>(forest_bin_split_stride(num_features)) * kForestBinSplit *
                         sizeof(int32_t) <=
                     static_cast<size_t>(s.tile) * per_tree;
  return s;
}

template <typename T>
FASTML_HD inline T forest_exp(T x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

// Divisor and link of one row of k outputs (output="value"); link 0 = identity.
template <typename T>
FASTML_HD inline void forest_finish_row(T* o, int32_t k, double divisor, int32_t link) {
  if (divisor != 1.0)
    for (int32_t j = 0; j < k; ++j) o[j] /= static_cast<T>(divisor);
  switch (static_cast<ForestLink>(link)) {
    case ForestLink::Identity: break;
    case ForestLink::Sigmoid:
      for (int32_t j = 0; j < k; ++j) o[j] = T(1) / (T(1) + forest_exp(-o[j]));
      break;
    case ForestLink::Exp:
      for (int32_t j = 0; j < k; ++j) o[j] = forest_exp(o[j]);
      break;
    case ForestLink::Hinge:
      for (int32_t j = 0; j < k; ++j) o[j] = o[j] > T(0) ? T(1) : T(0);
      break;
    case ForestLink::Softmax: {
      T mx = o[0];
      for (int32_t j = 1; j < k; ++j) mx = o[j] > mx ? o[j] : mx;
      T sum = 0;
      for (int32_t j = 0; j < k; ++j) {
        o[j] = forest_exp(o[j] - mx);
        sum += o[j];
      }
      for (int32_t j = 0; j < k; ++j) o[j] /= sum;
      break;
    }
  }
}

// Read-only loads of the node arrays (the read-only data path on the GPU).
FASTML_HD inline uint32_t forest_load_perfect(const uint32_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}
FASTML_HD inline BinNode forest_load_bin_node(const BinNode* p) {
#ifdef __CUDA_ARCH__
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  BinNode nd;
  nd.thr = static_cast<Bin>(static_cast<uint16_t>(v.x & 0xFFFFu));
  nd.col = static_cast<uint16_t>(v.x >> 16);
  nd.left = static_cast<int32_t>(v.y);
  return nd;
#else
  return *p;
#endif
}

// The shared-memory word of one (feature, row): its bin for default-left
// nodes (low half) and for default-right nodes (high half).
FASTML_HD inline uint32_t forest_bin_word(Bin lo, Bin hi) {
  return static_cast<uint32_t>(static_cast<uint16_t>(lo)) |
         (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
}

template <typename ThrT, typename AccT, typename XT>
struct ForestBlock {
  // A thread's accumulators across tiles: (row, output) pairs tid + j * kForestThreads.
  struct Thread {
    AccT acc[kForestAccPerThread];
  };

  ForestKernelArgs<ThrT, AccT> a;
  const XT* X;  // rows x num_features, C-contiguous
  AccT* out;    // rows x num_outputs
  int32_t R, tile;
  bool split_bins;
  int64_t row0;
  int32_t block_rows;
  uint32_t* bins;  // binned: num_features x R words (lo: missing -> bottom, hi: -> top)
  AccT* leaf;      // tile x R
  int32_t* grp;    // tile

  FASTML_HD ForestBlock(const ForestKernelArgs<ThrT, AccT>& args, const XT* x, AccT* o,
                        int64_t rows, const ForestLaunchShape& shape, int64_t block,
                        unsigned char* smem)
      : a(args),
        X(x),
        out(o),
        R(shape.rows_per_block),
        tile(shape.tile),
        split_bins(shape.split_bins) {
    row0 = block * R;
    block_rows = static_cast<int32_t>(rows - row0 < R ? rows - row0 : R);
    bins = reinterpret_cast<uint32_t*>(smem);
    leaf = reinterpret_cast<AccT*>(smem + shape.bin_bytes);
    grp = reinterpret_cast<int32_t*>(leaf + static_cast<int64_t>(tile) * R);
  }

  FASTML_HD int32_t sums() const { return R * a.num_outputs; }
  // Rare (more than 1,024 / R outputs): accumulate in the output itself.
  FASTML_HD bool many_outputs() const { return sums() > kForestThreads * kForestAccPerThread; }
  FASTML_HD bool needs_link() const { return a.divisor != 1.0 || a.link != 0; }

  // Accumulators (or the output) set to the base; bins of the block's rows.
  FASTML_HD void start(int32_t tid, Thread& th) const {
    const int32_t S = sums();
    FASTML_FOREST_UNROLL
    for (int j = 0; j < kForestAccPerThread; ++j) {
      const int32_t s = tid + j * kForestThreads;
      th.acc[j] = s < S ? a.base[s / R] : AccT(0);
    }
    if (many_outputs()) {
      for (int32_t s = tid; s < S; s += kForestThreads) {
        const int32_t r = s % R;
        if (r < block_rows) out[(row0 + r) * a.num_outputs + s / R] = a.base[s / R];
      }
    }
    if (a.layout == ForestLayout::General) return;
    const int32_t F = a.num_features;
    if (split_bins) {
      // One row: thread (f, j) counts the cuts j, j + 32, ... of feature f
      // below x into the leaf tile (free until the first walk); bins_done
      // adds the 32 counts. The loads are independent, so a feature costs one
      // memory latency instead of log2(cuts) dependent ones.
      auto* part = reinterpret_cast<int32_t*>(leaf);
      const int32_t stride = forest_bin_split_stride(F);
      for (int32_t p = tid; p < F * kForestBinSplit; p += kForestThreads) {
        const int32_t f = p / kForestBinSplit, j = p % kForestBinSplit;
        const ThrT x = static_cast<ThrT>(X[row0 * F + f]);
        const int32_t o = a.cut_offset[f], end = a.cut_offset[f + 1];
        int32_t below = 0;
        for (int32_t m = o + j; m < end; m += kForestBinSplit) below += a.cuts[m] < x ? 1 : 0;
        part[j * stride + f] = below;
      }
      return;
    }
    // Consecutive threads take consecutive rows of one feature (one feature's
    // cuts for the warp's searches).
    for (int32_t p = tid; p < F * R; p += kForestThreads) {
      const int32_t r = p % R, f = p / R;
      Bin lo = kBinBottom, hi = kBinTop;  // missing, and the rows past the batch
      if (r < block_rows) {
        const ThrT x = static_cast<ThrT>(X[(row0 + r) * F + f]);
        if (x == x) {
          const int32_t o = a.cut_offset[f];
          lo = hi = forest_bin_of(a.cuts + o, a.cut_offset[f + 1] - o, x);
        }
      }
      bins[f * R + r] = forest_bin_word(lo, hi);
    }
  }

  // After a barrier (split_bins only): each feature's counts added into its bin.
  FASTML_HD void bins_done(int32_t tid) const {
    if (!split_bins) return;
    const int32_t F = a.num_features;
    const auto* part = reinterpret_cast<const int32_t*>(leaf);
    const int32_t stride = forest_bin_split_stride(F);
    for (int32_t f = tid; f < F; f += kForestThreads) {
      const ThrT x = static_cast<ThrT>(X[row0 * F + f]);
      int32_t below = 0;
      for (int32_t j = 0; j < kForestBinSplit; ++j) below += part[j * stride + f];
      const Bin b = static_cast<Bin>(below - kBinBias);
      bins[f] = x == x ? forest_bin_word(b, b) : forest_bin_word(kBinBottom, kBinTop);
    }
  }

  // Bin of device column c for block row r.
  FASTML_HD Bin bin(uint32_t c, int32_t r) const {
    const Bin* b = reinterpret_cast<const Bin*>(bins);
    return b[static_cast<int32_t>(c & ~1u) * R + 2 * r + static_cast<int32_t>(c & 1u)];
  }

  FASTML_HD int32_t general_step(const ForestNode<ThrT>* nodes, int32_t n, const XT* x) const {
    const ForestNode<ThrT> nd = nodes[n];
    const uint32_t f = nd.feature;
    const ThrT v = static_cast<ThrT>(x[f & kNodeFeatureMask]);
    bool left;
    if (f & kNodeCategorical) {
      left =
          forest_go_left_categorical<ThrT>(v, f, a.cat_bits + a.node_cat_offset[n],
                                           a.node_cat_words[n], a.cat_lo, a.cat_hi, a.cat_integral);
    } else {
      left = forest_go_left_numeric<ThrT>(v, nd.threshold, f);
    }
    return left ? nd.child[0] : nd.child[1];  // no dynamic index: no local memory
  }

  // Trees t0 and t1 (t1 < 0: none) for block row r, their steps interleaved;
  // the final index of each walk (see ForestKernelArgs::values) to i0, i1.
  FASTML_HD void walk_pair(int64_t t0, int64_t t1, int32_t r, int32_t& i0, int32_t& i1) const {
    const bool two = t1 >= 0;
    const int32_t d0 = a.tree_depth[t0];
    const int32_t d1 = two ? a.tree_depth[t1] : 0;
    const int32_t D = d0 > d1 ? d0 : d1;
    if (a.layout == ForestLayout::Perfect) {
      // Padded trees end at their depth exactly: each walk stops at its own.
      const auto* nodes = static_cast<const uint32_t*>(a.nodes);
      const uint32_t* n0 = nodes + a.tree_node[t0];
      const uint32_t* n1 = nodes + (two ? a.tree_node[t1] : a.tree_node[t0]);
      uint32_t j0 = 0, j1 = 0;
      for (int32_t d = 0; d < D; ++d) {
        if (d < d0) {
          const uint32_t nd = forest_load_perfect(n0 + j0);
          j0 = 2 * j0 + 1 + (bin(perfect_col(nd), r) > perfect_thr(nd) ? 1u : 0u);
        }
        if (d < d1) {
          const uint32_t nd = forest_load_perfect(n1 + j1);
          j1 = 2 * j1 + 1 + (bin(perfect_col(nd), r) > perfect_thr(nd) ? 1u : 0u);
        }
      }
      i0 = static_cast<int32_t>(j0);
      i1 = static_cast<int32_t>(j1);
    } else if (a.layout == ForestLayout::Explicit) {
      // Leaves stay put, so both walks take the deeper tree's steps.
      const auto* nodes = static_cast<const BinNode*>(a.nodes);
      int32_t m0 = static_cast<int32_t>(a.tree_node[t0]);
      int32_t m1 = static_cast<int32_t>(two ? a.tree_node[t1] : a.tree_node[t0]);
      for (int32_t d = 0; d < D; ++d) {
        const BinNode x0 = forest_load_bin_node(nodes + m0);
        const BinNode x1 = forest_load_bin_node(nodes + m1);
        m0 = x0.left + (bin(x0.col, r) > x0.thr ? 1 : 0);
        m1 = x1.left + (bin(x1.col, r) > x1.thr ? 1 : 0);
      }
      i0 = m0;
      i1 = m1;
    } else {
      const auto* nodes = static_cast<const ForestNode<ThrT>*>(a.nodes);
      const XT* x = X + (row0 + r) * a.num_features;
      int32_t m0 = static_cast<int32_t>(a.tree_node[t0]);
      int32_t m1 = static_cast<int32_t>(two ? a.tree_node[t1] : a.tree_node[t0]);
      for (int32_t d = 0; d < D; ++d) {
        m0 = general_step(nodes, m0, x);
        m1 = general_step(nodes, m1, x);
      }
      i0 = m0;
      i1 = m1;
    }
  }

  // Leaf of tree t (tile position lt) for row r into shared memory: its value
  // for a scalar leaf, its index for a vector leaf (read by the sum).
  FASTML_HD void put_leaf(int64_t t, int32_t lt, int32_t r, int32_t i) const {
    AccT* slot = leaf + static_cast<int64_t>(lt) * R + r;
    if (a.tree_group[t] >= 0)
      *slot = a.values[a.tree_vshift[t] + i];
    else
      *reinterpret_cast<int32_t*>(slot) = i;
  }

  // The tile of trees [t0, t0 + tile) walked: leaves into shared memory.
  FASTML_HD void walk(int32_t tid, int64_t t0) const {
    const int32_t n = static_cast<int32_t>(a.num_trees - t0 < tile ? a.num_trees - t0 : tile);
    for (int32_t lt = tid; lt < n; lt += kForestThreads) grp[lt] = a.tree_group[t0 + lt];
    const int32_t r = tid % R;
    if (r >= block_rows) return;
    const int32_t step = kForestThreads / R;  // R divides kForestThreads
    for (int32_t lt = tid / R; lt < n; lt += 2 * step) {
      const int32_t lt1 = lt + step;
      int32_t i0 = 0, i1 = 0;
      walk_pair(t0 + lt, lt1 < n ? t0 + lt1 : -1, r, i0, i1);
      put_leaf(t0 + lt, lt, r, i0);
      if (lt1 < n) put_leaf(t0 + lt1, lt1, r, i1);
    }
  }

  // The tile's leaves added in tree order, one thread per (row, output).
  FASTML_HD void sum(int32_t tid, int64_t t0, Thread& th) const {
    const int32_t n = static_cast<int32_t>(a.num_trees - t0 < tile ? a.num_trees - t0 : tile);
    const int32_t K = a.num_outputs;
    auto add_tile = [&](int32_t r, int32_t k, AccT acc) {
      auto vector_value = [&](int32_t lt, int32_t i) {
        return a.values[a.tree_vshift[t0 + lt] + static_cast<int64_t>(i) * K + k];
      };
      return forest_tile_sum(acc, leaf + r, R, grp, n, k, a.one_output, vector_value);
    };
    const int32_t S = sums();
    if (many_outputs()) {
      for (int32_t s = tid; s < S; s += kForestThreads) {
        const int32_t r = s % R, k = s / R;
        if (r < block_rows) {
          AccT* o = out + (row0 + r) * K + k;
          *o = add_tile(r, k, *o);
        }
      }
      return;
    }
    FASTML_FOREST_UNROLL
    for (int j = 0; j < kForestAccPerThread; ++j) {
      const int32_t s = tid + j * kForestThreads;
      if (s < S && s % R < block_rows) th.acc[j] = add_tile(s % R, s / R, th.acc[j]);
    }
  }

  FASTML_HD void store(int32_t tid, const Thread& th) const {
    if (many_outputs()) return;
    const int32_t S = sums();
    FASTML_FOREST_UNROLL
    for (int j = 0; j < kForestAccPerThread; ++j) {
      const int32_t s = tid + j * kForestThreads;
      const int32_t r = s % R;
      if (s < S && r < block_rows) out[(row0 + r) * a.num_outputs + s / R] = th.acc[j];
    }
  }

  // After a barrier: divisor and link of the block's rows.
  FASTML_HD void finish(int32_t tid) const {
    if (tid < block_rows)
      forest_finish_row(out + (row0 + tid) * a.num_outputs, a.num_outputs, a.divisor, a.link);
  }
};

}  // namespace fastml::infer
