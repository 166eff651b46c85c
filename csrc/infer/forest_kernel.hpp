// What the CUDA Forest kernel reads, and how it is launched: the arrays
// built on the host from a Forest (uploaded by cuda/forest_kernels.cu, read in
// place by the host emulation, forest_emulate.cpp), the kernel's arguments,
// and the dispatch over threshold, accumulator and input types. The block's
// work itself is infer/forest_block.hpp.
#pragma once

#include <cstdint>
#include <vector>

#include "common/array_view.hpp"
#include "common/dtype.hpp"
#include "infer/forest.hpp"
#include "infer/forest_block.hpp"

namespace fastml::infer {

// The arrays of the CUDA kernel (infer/forest_block.hpp), built on the host
// from the engine: the CUDA path uploads them, forest_emulate_kernel reads
// them in place. `general`: the General layout even for a binned forest (for
// comparisons); otherwise the binned layout when the engine has one and the
// forest has at most kForestMaxBinnedFeatures features.
struct ForestKernelData {
  ForestLayout layout = ForestLayout::General;
  std::vector<unsigned char> nodes, values, base, cuts;  // see ForestKernelArgs
  std::vector<int32_t> cut_offset, tree_depth, tree_group;
  std::vector<int64_t> tree_node, tree_vshift, node_cat_offset;
  std::vector<uint32_t> node_cat_words, cat_bits;
  bool one_output = false;
};
ForestKernelData forest_kernel_data(const Forest& forest, bool general);
// The layout forest_kernel_data picks, and its name ("perfect", "explicit",
// "general").
ForestLayout forest_kernel_layout(const Forest& forest, bool general);
const char* forest_layout_name(ForestLayout layout);

// Where a ForestKernelData lives: its own vectors (the emulation) or their
// device copies (the CUDA path).
struct ForestKernelPtrs {
  const void *nodes = nullptr, *values = nullptr, *base = nullptr, *cuts = nullptr;
  const int32_t *cut_offset = nullptr, *tree_depth = nullptr, *tree_group = nullptr;
  const int64_t *tree_node = nullptr, *tree_vshift = nullptr, *node_cat_offset = nullptr;
  const uint32_t *node_cat_words = nullptr, *cat_bits = nullptr;
};

// The pointers of every array of `d` through place(vector) (the vector's own
// data for the emulation, a device copy for the CUDA path): the one list of
// the kernel's arrays.
template <typename Place>
ForestKernelPtrs forest_kernel_ptrs(const ForestKernelData& d, const Place& place) {
  ForestKernelPtrs p;
  p.nodes = place(d.nodes);
  p.values = place(d.values);
  p.base = place(d.base);
  p.cuts = place(d.cuts);
  p.cut_offset = place(d.cut_offset);
  p.tree_depth = place(d.tree_depth);
  p.tree_group = place(d.tree_group);
  p.tree_node = place(d.tree_node);
  p.tree_vshift = place(d.tree_vshift);
  p.node_cat_offset = place(d.node_cat_offset);
  p.node_cat_words = place(d.node_cat_words);
  p.cat_bits = place(d.cat_bits);
  return p;
}

// The kernel's arguments for `forest` (divisor and link as predict applies
// them: output="value" when `apply_link`, else the margin).
template <typename ThrT, typename AccT>
ForestKernelArgs<ThrT, AccT> forest_kernel_args(const Forest& forest, ForestLayout layout,
                                                bool one_output, const ForestKernelPtrs& p,
                                                bool apply_link) {
  const ForestSpec& s = forest.spec();
  ForestKernelArgs<ThrT, AccT> a;
  a.layout = layout;
  a.nodes = p.nodes;
  a.values = static_cast<const AccT*>(p.values);
  a.base = static_cast<const AccT*>(p.base);
  a.tree_node = p.tree_node;
  a.tree_depth = p.tree_depth;
  a.tree_group = p.tree_group;
  a.tree_vshift = p.tree_vshift;
  a.node_cat_offset = p.node_cat_offset;
  a.node_cat_words = p.node_cat_words;
  a.cat_bits = p.cat_bits;
  a.cat_lo = static_cast<ThrT>(s.cat_rule.lo);
  a.cat_hi = static_cast<ThrT>(s.cat_rule.hi);
  a.cat_integral = s.cat_rule.integral;
  a.cuts = static_cast<const ThrT*>(p.cuts);
  a.cut_offset = p.cut_offset;
  a.num_features = s.num_features;
  a.num_outputs = s.num_outputs;
  a.num_trees = forest.num_trees();
  a.one_output = one_output;
  a.divisor = s.divisor != 1.0 && (apply_link || s.divide_margin) ? s.divisor : 1.0;
  a.link = apply_link ? static_cast<int32_t>(s.link) : 0;
  return a;
}

// fn(type_tag<ThrT>, type_tag<AccT>, type_tag<XT>) for the forest's threshold
// and accumulator types and X's dtype (float32 or float64).
template <typename Fn>
void forest_dispatch_types(const ForestSpec& s, DType xdt, const Fn& fn) {
  auto with_x = [&](auto thr, auto acc) {
    if (xdt == DType::F32)
      fn(thr, acc, type_tag<float>{});
    else
      fn(thr, acc, type_tag<double>{});
  };
  if (s.threshold_f64 && s.accum_f64)
    with_x(type_tag<double>{}, type_tag<double>{});
  else if (s.threshold_f64)
    with_x(type_tag<double>{}, type_tag<float>{});
  else if (s.accum_f64)
    with_x(type_tag<float>{}, type_tag<double>{});
  else
    with_x(type_tag<float>{}, type_tag<float>{});
}

// Runs the CUDA kernel's blocks on the host (every phase of ForestBlock for
// every thread of every block, in the kernel's order), for tests without a
// GPU: X C-contiguous float32/float64 rows x num_features, out rows x
// num_outputs of output_dtype(). `sm_count` sets the launch shape as a
// device with that many SMs would. Returns the layout's name.
const char* forest_emulate_kernel(const Forest& forest, const ArrayView& X, bool apply_link,
                                  void* out, int sm_count, bool general);

}  // namespace fastml::infer
