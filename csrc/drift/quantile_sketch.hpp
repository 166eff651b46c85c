// A mergeable quantile sketch of fixed memory: a stack of compactors in the
// style of KLL (Karnin, Lang and Liberty 2016), written for fastml.
//
// Level h holds items of weight 2^h. When a level reaches its capacity it is
// sorted and every other item (starting at a random offset) moves up one
// level. Capacities shrink geometrically (factor 2/3) below the top level, so
// the sketch never holds more than capacity_bound(k) items whatever the stream
// length (k = 400: at most 1616 doubles, 12.6 KB of items).
//
// Error bound: each compaction at level h shifts the rank of any fixed query
// by +2^h, -2^h or 0, with mean zero, independently. The sketch tracks
// S = sum over compactions of 4^h, so by Hoeffding the absolute rank error of a
// query is at most sqrt(2 ln(2 / delta) S) with probability 1 - delta;
// rank_error() reports this bound divided by n at delta = 0.01.
//
// Exponential decay (thin): each level keeps a systematic sample of a
// fraction f of its sorted items (random offset), so the retained weight
// below any query is an unbiased estimate of the decayed weight f * (weight
// below it), off by less than one item per level. Earlier error terms shrink
// by f. rank_error() adds a Bernstein bound over the thinning terms (at
// delta = 0.01) twice: once for the query's weight and once for the (now
// random) normalising total. Decayed sketches are noisier than undecayed ones.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

namespace fastml::drift {

class QuantileSketch {
 public:
  static constexpr int kDefaultK = 400;
  static constexpr int kMinWidth = 8;
  static constexpr int kMaxLevels = 64;
  // update_run selects the items it keeps instead of sorting the run once
  // they are at most one in select_stride() of it (default kSelectStride).
  // The sketch is the same either way; set_select_stride(INT64_MAX) sorts
  // every run (the reference the native tests compare the selection with,
  // and an A/B switch for benchmarks). Process-wide.
  static constexpr int64_t kSelectStride = 8;
  static void set_select_stride(int64_t stride);
  static int64_t select_stride();

  explicit QuantileSketch(int k = kDefaultK, uint64_t seed = 0x9e3779b97f4a7c15ull);

  void update(double x) { update_many(&x, 1); }
  void update_many(const double* x, int64_t n);
  // A batch of items (each of weight 1), compacted as one sorted run (each
  // halving of the sorted run is one compaction at its level, so the error
  // accounting is that of update_many, with fewer compactions); what remains
  // joins the level where it fits. x may be reordered (sorted when the items
  // kept are dense, else left as it is and the kept ones selected).
  // `float32_exact`: every x is a float32 value (as from a float32 column),
  // so a sort runs on 32-bit keys (three passes instead of up to eight on
  // 64-bit keys). The sketch is the same either way.
  // `lo`, `hi`: bounds of the items when the caller has them (e.g. the run's
  // extremes, from its moments pass), which saves the selection a pass; NaN
  // when unknown.
  void update_run(double* x, int64_t n, bool float32_exact = false,
                  double lo = std::numeric_limits<double>::quiet_NaN(),
                  double hi = std::numeric_limits<double>::quiet_NaN());
  void merge(const QuantileSketch& other);
  void clear();
  // Exponential decay by factor f in (0, 1] (see the header comment).
  void thin(double f);

  int k() const { return k_; }
  uint64_t n() const { return n_; }
  int num_levels() const { return static_cast<int>(levels_.size()); }
  int64_t num_items() const;
  // Normalised rank-error bound (fraction of n) at 99% confidence per query.
  double rank_error() const;
  // Items and weights, ascending by item.
  void sorted_items(std::vector<double>* items, std::vector<double>* weights) const;
  // The most items the sketch may ever hold with parameter k.
  static int64_t capacity_bound(int k);

  // Raw state, for serialisation.
  const std::vector<std::vector<double>>& levels() const { return levels_; }
  double error_sum() const { return err_sum_; }
  double thin_variance() const { return thin_var_; }
  uint64_t rng_state() const { return rng_; }
  void restore(uint64_t n, double err_sum, double thin_var, uint64_t rng,
               std::vector<std::vector<double>> levels);

 private:
  int64_t capacity(int level) const { return caps_[level]; }
  void refresh_capacities();
  void compress();
  void compact_level(int level);
  uint64_t next_random();

  int k_;
  uint64_t n_ = 0;
  double err_sum_ = 0.0;
  double thin_var_ = 0.0;  // variance of the thinning terms (see rank_error)
  uint64_t rng_;
  std::vector<std::vector<double>> levels_;
  std::vector<int64_t> caps_;  // capacity per level for the current height
};

}  // namespace fastml::drift
