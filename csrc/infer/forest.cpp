#include "infer/forest.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/errors.hpp"
#include "common/thread_pool.hpp"

namespace fastml::infer {

namespace {

constexpr int32_t kMaxTreeDepth = 4096;
constexpr int32_t kMaxOutputs = 1 << 20;
// Rows per block: a block walks every tree while the tree's nodes are hot in
// cache, so the model streams through the cache once per block.
constexpr int64_t kBlockRows = 128;
// Independent walks interleaved in one loop, so their loads overlap.
constexpr int kLanes = 16;
// Trees walked together for one row: more independent node loads in flight.
constexpr int kRowLanes = 16;

}  // namespace

// ------------------------------------------------------------------ engine

class ForestEngine {
 public:
  virtual ~ForestEngine() = default;
  virtual void predict(const ArrayView& X, bool apply_link, void* out) const = 0;
  virtual const void* nodes() const = 0;
  virtual size_t node_bytes() const = 0;
  virtual const void* values() const = 0;
  virtual size_t value_bytes() const = 0;
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
    nodes_.resize(static_cast<size_t>(n));
    has_cat_ = false;
    has_zero_missing_ = false;
    for (int64_t t = 0; t < spec.num_trees(); ++t) {
      const int64_t base = spec.tree_node_offsets[t];
      const int64_t end = spec.tree_node_offsets[t + 1];
      for (int64_t i = base; i < end; ++i) {
        Node& nd = nodes_[i];
        if (spec.node_left[i] < 0) {  // leaf: loops on itself
          nd.threshold = ThrT(0);
          nd.feature = 0;
          nd.child[0] = nd.child[1] = static_cast<int32_t>(i);
          continue;
        }
        const uint32_t flags = spec.node_flags[i] & ~kNodeFeatureMask;
        nd.feature = static_cast<uint32_t>(spec.node_feature[i]) | flags;
        nd.threshold = static_cast<ThrT>(spec.node_threshold[i]);
        nd.child[0] = static_cast<int32_t>(base + spec.node_left[i]);
        nd.child[1] = static_cast<int32_t>(base + spec.node_right[i]);
        has_cat_ |= (flags & kNodeCategorical) != 0;
        has_zero_missing_ |= (flags & kNodeZeroMissing) != 0;
      }
    }
    // The fast path resolves missing values without a NaN test: each block
    // row is stored twice, NaN -> -inf (read by default-left nodes) and
    // NaN -> +inf (read by default-right nodes), so one "x <= threshold"
    // decides every numeric node. It needs no +inf threshold (NaN -> +inf
    // would then go left) and no categorical or zero-as-missing node.
    fast_ = !has_cat_ && !has_zero_missing_ &&
            n * static_cast<int64_t>(sizeof(Node)) < (int64_t{1} << 31) &&
            2 * int64_t{spec.num_features} * kBlockRows < (int64_t{1} << 31);
    for (const Node& nd : nodes_)
      fast_ = fast_ && !(nd.threshold == std::numeric_limits<ThrT>::infinity());
    if (fast_) {
      // The CUDA kernel reads the general encoding (feature | flags).
      if (forest_cuda_compiled()) general_nodes_ = nodes_;
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
    values_.resize(spec.leaf_values.size());
    for (size_t i = 0; i < values_.size(); ++i) values_[i] = static_cast<AccT>(spec.leaf_values[i]);
    base_.resize(spec.base_margin.size());
    for (size_t i = 0; i < base_.size(); ++i) base_[i] = static_cast<AccT>(spec.base_margin[i]);
    cat_bits_ = spec.cat_bits;
    cat_lo_ = static_cast<ThrT>(spec.cat_rule.lo);
    cat_hi_ = static_cast<ThrT>(spec.cat_rule.hi);
  }

  // The general encoding (see fast_), for the CUDA path.
  const void* nodes() const override { return fast_ ? general_nodes_.data() : nodes_.data(); }
  size_t node_bytes() const override {
    return (fast_ ? general_nodes_.size() : nodes_.size()) * sizeof(Node);
  }
  const void* values() const override { return values_.data(); }
  size_t value_bytes() const override { return values_.size() * sizeof(AccT); }

  void predict(const ArrayView& X, bool apply_link, void* out_ptr) const override {
    AccT* out = static_cast<AccT*>(out_ptr);
    const int64_t rows = X.shape[0];
    if (rows == 0) return;
    if (fast_) {
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
  template <bool Fast, bool HasCat, bool HasZero>
  void dispatch(const ArrayView& X, bool apply_link, AccT* out) const {
    const int64_t rows = X.shape[0];
    const int64_t nblocks = (rows + kBlockRows - 1) / kBlockRows;
    auto run_blocks = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kBlockRows;
        const int64_t r1 = std::min(rows, r0 + kBlockRows);
        predict_block<Fast, HasCat, HasZero>(X, r0, r1, apply_link, out);
      }
    };
    if (nblocks == 1) {
      run_blocks(0, 1);  // one block (e.g. one row): no pool hand-off
    } else {
      ThreadPool::global().parallel_for(0, nblocks, 1, run_blocks);
    }
  }

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
    if (group >= 0) {
      row_out[group] += values_[shift + node];
    } else {
      const int32_t K = spec_.num_outputs;
      const AccT* v = values_.data() + shift + static_cast<int64_t>(node) * K;
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
  std::vector<Node> general_nodes_;  // copy before the fast-path rewrite (CUDA builds only)
  std::vector<AccT> values_;
  std::vector<AccT> base_;
  std::vector<uint32_t> cat_bits_;
  ThrT cat_lo_{}, cat_hi_{};
  bool has_cat_ = false, has_zero_missing_ = false, fast_ = false;
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

Forest::Flat Forest::flat() const {
  Flat f;
  f.nodes = engine_->nodes();
  f.node_bytes = engine_->node_bytes();
  f.values = engine_->values();
  f.value_bytes = engine_->value_bytes();
  f.tree_root = tree_root_.data();
  f.tree_depth = tree_depth_.data();
  f.tree_group = spec_.tree_group.data();
  f.tree_value_shift = tree_value_shift_.data();
  f.node_cat_offset = node_cat_offset_.data();
  f.node_cat_words = node_cat_words_.data();
  f.cat_bits = spec_.cat_bits.data();
  f.num_nodes = static_cast<size_t>(spec_.num_nodes());
  f.num_cat_bits = spec_.cat_bits.size();
  return f;
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

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

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

struct Reader {
  const uint8_t* p;
  size_t left;
  template <typename T>
  T pod(const char* what) {
    if (left < sizeof(T)) fail<IOError>("forest file is truncated (reading ", what, ")");
    T v;
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    left -= sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> vec(const char* what) {
    const auto n = pod<uint64_t>(what);
    if (n > left / sizeof(T)) fail<IOError>("forest file is truncated (", what, ")");
    std::vector<T> v(static_cast<size_t>(n));
    if (n) std::memcpy(v.data(), p, n * sizeof(T));
    p += n * sizeof(T);
    left -= n * sizeof(T);
    return v;
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
  h.pod<uint64_t>(fnv1a(w.out.data(), w.out.size()));
  out.insert(out.end(), h.out.begin(), h.out.end());
  out.insert(out.end(), w.out.begin(), w.out.end());
  return out;
}

std::shared_ptr<Forest> Forest::deserialize(const uint8_t* data, size_t size) {
  if (size < 8 || std::memcmp(data, kMagic, 8) != 0)
    fail<IOError>("not a fastml forest file (bad magic)");
  Reader hr{data + 8, size - 8};
  const auto version = hr.pod<uint32_t>("version");
  if (version != kFormatVersion)
    fail<IOError>("unsupported fastml forest format version ", version, " (this build reads ",
                  kFormatVersion, ")");
  hr.pod<uint32_t>("reserved");
  const auto nbytes = hr.pod<uint64_t>("payload size");
  const auto checksum = hr.pod<uint64_t>("checksum");
  if (nbytes != hr.left)
    fail<IOError>("forest file is truncated or has trailing bytes: payload of ", hr.left,
                  " bytes, header says ", nbytes);
  if (fnv1a(hr.p, hr.left) != checksum) fail<IOError>("forest file is corrupt (checksum mismatch)");
  Reader r{hr.p, hr.left};
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
  auto obj = r.vec<char>("objective");
  s.objective.assign(obj.begin(), obj.end());
  auto meta = r.vec<char>("metadata");
  s.metadata.assign(meta.begin(), meta.end());
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
  if (r.left != 0) fail<IOError>("forest file has ", r.left, " unexpected trailing bytes");
  try {
    return build(std::move(s));
  } catch (const std::invalid_argument& e) {
    fail<IOError>("forest file is invalid: ", e.what());
  }
}

}  // namespace fastml::infer
