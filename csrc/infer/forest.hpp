// fastml's tree-ensemble engine: a validated, compact, immutable forest that
// predicts blocks of rows on the shared thread pool.
//
// Loaders (python/fastml/infer/forest.py) flatten XGBoost, LightGBM and
// scikit-learn models into a ForestSpec; Forest::build validates every index,
// size and tree shape so that no model, however corrupt, can make the
// traversal read out of bounds or loop.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/array_view.hpp"
#include "common/buffer.hpp"
#include "infer/forest_node.hpp"
#include "infer/native_handler.hpp"

namespace fastml::infer {

// The flat, library-neutral description of a forest. Node arrays are
// concatenated over trees; child indices are local to their tree (-1 for a
// leaf). Node n of tree t has leaf_width(t) values at
// leaf_values[value_offset(t) + local(n) * leaf_width(t)], where
// leaf_width(t) is 1 when tree_group[t] >= 0 and num_outputs when it is -1
// (a vector leaf that adds to every output).
struct ForestSpec {
  int32_t num_features = 0;
  int32_t num_outputs = 1;
  bool threshold_f64 = false;  // compare in double (else float32)
  bool accum_f64 = false;      // accumulate and return double (else float32)
  ForestLink link = ForestLink::Identity;
  double divisor = 1.0;       // value = link((base + sum of leaves) / divisor)
  bool divide_margin = true;  // margin divided too (sklearn forests); LightGBM rf: raw sum
  CategoricalRule cat_rule;
  std::string objective;
  std::string metadata;  // opaque to the core (the Python layer stores JSON here)

  std::vector<int64_t> tree_node_offsets;  // num_trees + 1
  std::vector<int32_t> tree_group;         // num_trees
  std::vector<int32_t> node_feature;       // -1 for leaves
  std::vector<double> node_threshold;
  std::vector<int32_t> node_left;
  std::vector<int32_t> node_right;
  std::vector<uint32_t> node_flags;  // kNode* flags (feature bits ignored)
  std::vector<int32_t> node_cat;     // index into cat_offsets, -1 when numeric
  std::vector<int64_t> cat_offsets;  // num_cat_sets + 1, into cat_bits
  std::vector<uint32_t> cat_bits;
  std::vector<double> leaf_values;
  std::vector<double> base_margin;  // num_outputs

  int64_t num_trees() const { return static_cast<int64_t>(tree_group.size()); }
  int64_t num_nodes() const { return static_cast<int64_t>(node_feature.size()); }
};

class ForestEngine;

class Forest : public NativeHandler, public std::enable_shared_from_this<Forest> {
 public:
  // Validates `spec` and builds the compact engine; std::invalid_argument
  // naming the first problem otherwise.
  static std::shared_ptr<Forest> build(ForestSpec spec);
  // Reads fastml's own format (see serialize); fastml::FormatError naming
  // `source` (a file name or "data"), the field and its byte offset when the
  // bytes are not a valid forest.
  static std::shared_ptr<Forest> deserialize(const uint8_t* data, size_t size,
                                             const std::string& source);
  std::vector<uint8_t> serialize() const;

  ~Forest() override;

  const ForestSpec& spec() const { return spec_; }
  int32_t num_features() const { return spec_.num_features; }
  int32_t num_outputs() const { return spec_.num_outputs; }
  int64_t num_trees() const { return spec_.num_trees(); }
  int32_t max_depth() const { return max_depth_; }
  DType output_dtype() const { return spec_.accum_f64 ? DType::F64 : DType::F32; }

  // X: 2-D float32/float64 with num_features columns (any strides). Writes
  // rows x num_outputs values of output_dtype() to `out` (C-contiguous):
  // margins, or values after the link when `apply_link`.
  void predict(const ArrayView& X, bool apply_link, void* out) const;

  // NativeHandler: the "value" output of a C-contiguous float32/float64 batch.
  HandlerOutput run(const ArrayView& batch) override;
  void check_input(const ArrayView& request, const char* name) const override;
  std::string handler_name() const override;
  int row_ndim() const override { return 1; }

  // Checks X's dtype, rank and width; names `name` in the message.
  void check_matrix(const ArrayView& X, const char* name) const;

  // The CPU traversal chosen at build time: "binned-perfect", "binned",
  // "float" or "general" (see forest.cpp; tests check each is exercised).
  const char* engine_name() const;

  // Per tree: root node (absolute), depth, value shift (see ForestSpec);
  // per node: categorical bitset offset and words. The engine (forest.cpp).
  const std::vector<int32_t>& tree_root() const { return tree_root_; }
  const std::vector<int32_t>& tree_depth() const { return tree_depth_; }
  const std::vector<int64_t>& tree_value_shift() const { return tree_value_shift_; }
  const std::vector<int64_t>& node_cat_offset() const { return node_cat_offset_; }
  const std::vector<uint32_t>& node_cat_words() const { return node_cat_words_; }
  const ForestEngine& engine() const { return *engine_; }

  // The CUDA path keeps its device copy here (created on first use).
  std::mutex& device_mutex() const { return device_mutex_; }
  std::shared_ptr<void>& device_slot() const { return device_; }

 private:
  Forest() = default;
  void finish_build();

  ForestSpec spec_;
  int32_t max_depth_ = 0;
  std::vector<int32_t> tree_root_;
  std::vector<int32_t> tree_depth_;
  std::vector<int64_t> tree_value_shift_;  // value index of node n = shift + n * width
  std::vector<int64_t> node_cat_offset_;
  std::vector<uint32_t> node_cat_words_;
  std::unique_ptr<ForestEngine> engine_;
  mutable std::mutex device_mutex_;
  mutable std::shared_ptr<void> device_;
};

// Whether the CPU engine walks rows with AVX2 (runtime-detected). `enable`
// 0 or 1 switches it off or on for the process (tests compare both paths);
// -1 only asks. Returns the state in effect (false without AVX2).
bool forest_simd(int enable = -1);

// Whether the CUDA path walks every forest on the General layout (true) or
// binned forests on their binned layout (false, the default); `enable` 0 or 1
// sets it for the process (benchmarks and GPU tests compare the two; the
// environment variable FASTML_FOREST_CUDA_KERNEL=general sets it at start),
// -1 only asks. A forest already on the device is uploaded again on its next
// call when the setting changed.
bool forest_cuda_general(int enable = -1);

// Applies the link in place to rows x k margins.
void forest_apply_link(ForestLink link, int32_t k, int64_t rows, float* data);
void forest_apply_link(ForestLink link, int32_t k, int64_t rows, double* data);

// CUDA path (cuda/forest_kernels.cu; a stand-in raises without CUDA).
// X_host or X_device: rows x num_features of float32/float64; out on the
// same side as X. `stream` is a cudaStream_t (0 = default).
bool forest_cuda_compiled();
void forest_predict_cuda(const Forest& forest, const ArrayView& X, bool x_on_device,
                         bool apply_link, void* out, bool out_on_device, uintptr_t stream);

}  // namespace fastml::infer
