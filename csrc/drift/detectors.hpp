// Stream drift detectors that take whole arrays per call: ADWIN, Page-Hinkley
// and DDM. Their arithmetic follows River's implementations step by step so
// that both detect at the same indices (tests compare them).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastml::drift {

// ADWIN (Bifet and Gavalda 2007) with exponential-histogram buckets.
class Adwin {
 public:
  Adwin(double delta, int clock, int max_buckets, int min_window_length, int grace_period);
  // Returns the indices of `x` at which drift was detected. As in River, the
  // window restarts empty on the value after a detection.
  std::vector<int64_t> update(const double* x, int64_t n);
  void reset();
  double width() const { return width_; }
  double total() const { return total_; }
  double variance() const { return variance_; }
  int64_t n_detections() const { return n_detections_; }

 private:
  bool step(double x);
  void insert(double value);
  void compress();
  void compress_from(int h);
  void insert_run(const double* x, int64_t n);
  bool detect();
  bool cut(double n0, double n1, double delta_mean, double delta_prime) const;
  void delete_oldest();

  double delta_;
  int clock_, max_buckets_;
  double min_window_, grace_;
  double total_ = 0, variance_ = 0, width_ = 0;
  int64_t tick_ = 0, n_detections_ = 0;
  int64_t until_check_ = 1;  // values until the next clock tick
  bool detected_ = false;
  bool use_avx2_ = false;
  // Bucket rows as fixed ring buffers: level h (buckets of 2^h values)
  // holds cnt_[h] buckets at tot_/var_[h * cap_ ...], cap_ = max_buckets + 1,
  // the oldest at slot head_[h]; nlev_ levels are in use.
  static constexpr int kMaxLevels = 64;
  int cap_ = 0, nlev_ = 1;
  std::array<int, kMaxLevels> cnt_{}, head_{};
  void push_newest(int h, double total, double var) {
    int j = head_[h] + cnt_[h];
    j = j >= cap_ ? j - cap_ : j;
    tot_[static_cast<std::size_t>(h * cap_ + j)] = total;
    var_[static_cast<std::size_t>(h * cap_ + j)] = var;
    ++cnt_[h];
  }
  std::vector<double> tot_, var_;
  // Scratch for one detection pass (kept to avoid per-pass allocation): the
  // running split sizes and sums after each bucket, oldest bucket first.
  std::vector<double> n0_, n1_, u0_, u1_;
};

// Page-Hinkley test on the running mean.
class PageHinkley {
 public:
  PageHinkley(int64_t min_instances, double delta, double threshold, double alpha, int mode);
  std::vector<int64_t> update(const double* x, int64_t n);
  void reset();

 private:
  int64_t min_instances_;
  double delta_, threshold_, alpha_;
  int mode_;  // 0 both, 1 up, 2 down
  double n_ = 0, mean_ = 0, sum_inc_ = 0, sum_dec_ = 0, min_inc_, max_dec_;
  bool detected_ = false;
};

// Drift Detection Method (Gama et al. 2004) on a stream of 0/1 errors.
class Ddm {
 public:
  Ddm(int64_t warm_start, double warning_threshold, double drift_threshold);
  std::vector<int64_t> update(const double* x, int64_t n, std::vector<int64_t>* warnings);
  void reset();
  bool warning() const { return warning_; }

 private:
  int64_t warm_start_;
  double warning_threshold_, drift_threshold_;
  double n_ = 0, mean_ = 0, p_min_ = 0, s_min_ = 0, ps_min_;
  bool has_min_ = false, detected_ = false, warning_ = false;
};

}  // namespace fastml::drift
