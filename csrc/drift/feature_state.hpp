// Per-feature state of a drift profile: numeric (counts, extremes, parallel
// moments, a histogram over fixed edges, exact values or a quantile sketch)
// and categorical (capped exact counts with heavy hitters and "other").
//
// Counts are doubles so that exponentially decayed windows can scale them;
// without decay they hold integers exactly (up to 2^53).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/array_view.hpp"
#include "common/buffer.hpp"
#include "drift/quantile_sketch.hpp"

namespace fastml::drift {

// std::allocator, except that resize() leaves new elements default-initialised
// (for double: unset) instead of zeroed: the exact values are written right
// after they are allocated, so zeroing them first was a wasted pass over
// 8 bytes per value. Memory comes from the core's one allocation policy
// (common/buffer.hpp): large blocks on transparent huge pages, so a fresh
// window's values cost a few page faults instead of one per 4 KiB (page
// faults were 40% of an exact-mode update of 16 x 2M float32 here).
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <typename U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(allocate_bytes(n * sizeof(T)));
  }
  void deallocate(T* p, size_t) noexcept { free_bytes(p); }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using ValueVector = std::vector<double, DefaultInitAllocator<double>>;

enum class QuantileMode : uint8_t { None = 0, Exact = 1, Sketch = 2 };

// Maps a finite value to its histogram bin in O(1) expected: a uniform grid
// over [edges.front(), edges.back()] gives a starting bin, corrected by at
// most a few comparisons. Bins follow numpy.histogram: [e_i, e_{i+1}) with
// the last bin closed.
class BinLookup {
 public:
  explicit BinLookup(const std::vector<double>& edges);
  // 0 = underflow, 1..nbins = bins, nbins + 1 = overflow; x must be finite.
  int64_t slot(double x) const {
    if (!(x >= lo_)) return 0;
    if (x > hi_) return nbins_ + 1;
    int64_t c = static_cast<int64_t>((x - lo_) * scale_);
    c = c >= grid_ ? grid_ - 1 : c;  // x >= lo_, so c >= 0
    const int32_t t = ext_[static_cast<size_t>(c) + 1];
    if (t >= 0) return t;  // no edge inside this cell: the slot is known
    return search(x, ~t) + 1;
  }
  // Bin of x starting from bin b, when an edge falls inside x's grid cell.
  int64_t search(double x, int64_t b) const {
    const double* e = edges_.data();
    while (b + 1 < nbins_ && x >= e[b + 1]) ++b;
    while (b > 0 && x < e[b]) --b;
    return b;
  }
  int64_t nbins() const { return nbins_; }
  double lo() const { return lo_; }
  double hi() const { return hi_; }
  double scale() const { return scale_; }
  int64_t grid() const { return grid_; }
  // The cell table with underflow in front and two slots behind, entries
  // already slots: ext[0] = 0; ext[c + 1] = the slot of cell c when it is
  // clean, or ~bin (negative; bin = the bin of the cell's start) when it holds
  // an edge and needs search(); ext[grid + 1] dirty (at or just past hi);
  // ext[grid + 2] = nbins + 1 (overflow). The cells at lo and hi are always
  // dirty.
  const int32_t* ext_table() const { return ext_.data(); }
  // For float32 values and at most kMaxCmpEdges edges, the comparison path
  // (count_pass): each edge as a float32 threshold t_i, so that for every
  // float x, x >= edge i  <=>  x >= t_i for i < nbins (t_i = the smallest
  // float >= edge i) and x > the last edge  <=>  x >= t_nbins (the smallest
  // float > it); then as an integer compare on order-preserving keys,
  // key(x) > key(t_i) - 1 (a zero threshold taken as -0.0, since floats
  // compare -0.0 == +0.0 and their keys differ by one). cmp_keys() holds
  // key(t_i) - 1 for each edge, broadcast to eight lanes; cmp_edges() is 0
  // when there are more edges.
  static constexpr int64_t kMaxCmpEdges = 32;
  int64_t cmp_edges() const { return static_cast<int64_t>(cmp_keys_.size() / 8); }
  const int32_t* cmp_keys() const { return cmp_keys_.data(); }

 private:
  std::vector<double> edges_;
  std::vector<int32_t> ext_;       // see ext_table()
  std::vector<int32_t> cmp_keys_;  // see cmp_keys()
  double lo_, hi_, scale_;
  int64_t nbins_, grid_;
};

struct NumericState {
  double count = 0;      // finite values (sum of their weights once decayed)
  double count_sq = 0;   // sum of the finite values' squared weights (= count undecayed)
  double missing = 0;    // NaN
  double nonfinite = 0;  // +-inf
  double mean = 0, m2 = 0;
  double min = 0, max = 0;  // meaningful when count > 0
  std::vector<double> edges;
  std::vector<double> hist;  // [underflow, bins..., overflow]
  QuantileMode mode = QuantileMode::None;
  ValueVector values;  // Exact: finite values (sorted when `sorted`)
  bool sorted = true;
  // Exact values under exponential decay (after the first scale(f < 1)):
  // value i weighs 2^(vexp[i] - decay_exp); vexp is parallel to `values`.
  // Values lighter than 2^-kDropExp are dropped, so a decayed window keeps at
  // most ~kDropExp half-lives of values.
  static constexpr double kDropExp = 32.0;
  bool decayed = false;
  double decay_exp = 0;
  double pruned_at = 0;  // decay_exp at the last drop pass
  std::vector<double> vexp;
  std::unique_ptr<QuantileSketch> sketch;
  std::shared_ptr<const BinLookup> lookup;

  NumericState() = default;
  NumericState(std::vector<double> edges, QuantileMode mode, int sketch_k);
  NumericState(const NumericState& o);
  NumericState& operator=(const NumericState& o) = delete;

  // Column of `n` values of `view` (1-D or one column of a 2-D view).
  void ingest(const ArrayView& view, int64_t column);
  void ingest_values(const double* x, int64_t n);  // contiguous doubles (tests, GPU results)
  // Appends finite values to the exact values or the sketch (weight 1 each);
  // counts and moments are not touched.
  void add_quantile_values(const double* x, int64_t n);
  void merge(const NumericState& o);
  void scale(double factor);  // exponential decay: counts, histogram, moments
  void clear();
  void ensure_sorted();
  double variance() const { return count > 1 ? m2 / (count - 1) : 0.0; }
  // Kish's effective sample size count^2 / count_sq (= count undecayed).
  double effective_count() const { return count_sq > 0 ? count * count / count_sq : 0.0; }
  // Exact mode: the weight of each (sorted) value; empty when undecayed.
  std::vector<double> value_weights() const;
  void add_moments(double n, double mean, double m2, double mn, double mx);
  void rebuild_lookup();
  // Moves the histogram onto other edges: exact from the stored values, within
  // the sketch's rank error from the sketch; histogram mode cannot.
  void rebin(std::vector<double> new_edges);
};

struct CategoricalState {
  int64_t cap = 1000;
  double total = 0;    // every non-missing value
  double missing = 0;  // None / NaN
  double other = 0;    // values beyond the cap (evicted or not admitted)
  std::unordered_map<std::string, double> counts;

  // Adds pre-aggregated counts; past the cap a value replaces the smallest
  // retained category when its batch count is larger (heavy hitters), else it
  // goes to `other`.
  void add(const std::vector<std::string>& keys, const double* cnt, double missing_count);
  void merge(const CategoricalState& o);
  void scale(double factor);
  void clear();
  bool overflowed() const { return other > 0; }
};

enum class FeatureKind : uint8_t { Numeric = 0, Categorical = 1 };

struct Feature {
  std::string name;
  FeatureKind kind = FeatureKind::Numeric;
  std::unique_ptr<NumericState> num;
  std::unique_ptr<CategoricalState> cat;

  Feature() = default;
  Feature(const Feature& o);
};

// The ordered features of a profile plus the row count.
class ProfileState {
 public:
  std::vector<Feature> features;
  double rows = 0;
  QuantileMode mode = QuantileMode::Exact;
  int sketch_k = QuantileSketch::kDefaultK;
  int bins = 0;  // equal-mass bins asked of from_data (0: unknown, format < 3)
  // True when the numeric edges were computed from this profile's own data
  // (from_data, or a merge that re-binned to the union's edges); false for
  // empty() copies, which keep a reference's edges, and for format < 4.
  // Merge re-bins profiles with identical edges only when all own them.
  bool edges_own = false;

  int64_t find(const std::string& name) const;  // -1 when absent
  // A profile with the same features and edges and no data.
  std::unique_ptr<ProfileState> empty_like() const;
  void merge(const ProfileState& o);  // same features in the same order
  void scale(double factor);
  void clear();

  // Ingests 1-D columns of equal length into features `feature_idx[i]`, in
  // parallel over features on the pool; strided columns (of one row-major
  // matrix) are walked in row blocks so each block is read from memory once.
  void ingest_columns(const std::vector<ArrayView>& columns,
                      const std::vector<int64_t>& feature_idx);
  // Ingests numeric columns of a 2-D (rows x cols) view: view column `cols[i]`
  // into feature `features_idx[i]`, in parallel over features on the pool.
  void ingest_matrix(const ArrayView& view, const std::vector<int64_t>& cols,
                     const std::vector<int64_t>& feature_idx);

  std::vector<uint8_t> to_bytes() const;
  static std::unique_ptr<ProfileState> from_bytes(const uint8_t* data, size_t size);
};

}  // namespace fastml::drift
