#include "drift/detectors.hpp"

#include <cmath>
#include <limits>

#include "common/errors.hpp"

namespace fastml::drift {

// ------------------------------------------------------------------ ADWIN

Adwin::Adwin(double delta, int clock, int max_buckets, int min_window_length, int grace_period)
    : delta_(delta),
      clock_(clock),
      max_buckets_(max_buckets),
      min_window_(min_window_length),
      grace_(grace_period) {
  FASTML_CHECK_ARG(delta > 0 && delta < 1, "delta", "must be in (0, 1), got ", delta);
  FASTML_CHECK_ARG(clock >= 1, "clock", "must be >= 1, got ", clock);
  FASTML_CHECK_ARG(max_buckets >= 2, "max_buckets", "must be >= 2, got ", max_buckets);
  FASTML_CHECK_ARG(min_window_length >= 1, "min_window_length", "must be >= 1, got ",
                   min_window_length);
  FASTML_CHECK_ARG(grace_period >= 0, "grace_period", "must be >= 0, got ", grace_period);
  reset();
}

void Adwin::reset() {
  total_ = variance_ = width_ = 0;
  tick_ = 0;
  detected_ = false;
  levels_.assign(1, Level{});
}

void Adwin::insert(double value) {
  levels_[0].totals.push_back(value);
  levels_[0].variances.push_back(0.0);
  width_ += 1.0;
  double inc = 0.0;
  if (width_ > 1.0) {
    const double d = value - total_ / (width_ - 1.0);
    inc = (width_ - 1.0) * d * d / width_;
  }
  variance_ += inc;
  total_ += value;
  compress();
}

void Adwin::compress() {
  for (size_t h = 0; h < levels_.size(); ++h) {
    Level& lv = levels_[h];
    if (static_cast<int>(lv.totals.size()) != max_buckets_ + 1) break;
    const double n1 = static_cast<double>(uint64_t{1} << h);
    const double mu1 = lv.totals[0] / n1, mu2 = lv.totals[1] / n1;
    const double total12 = lv.totals[0] + lv.totals[1];
    const double temp = n1 * 0.5 * (mu1 - mu2) * (mu1 - mu2);
    const double v12 = lv.variances[0] + lv.variances[1] + temp;
    if (h + 1 >= levels_.size()) levels_.emplace_back();
    Level& up = levels_[h + 1];
    up.totals.push_back(total12);
    up.variances.push_back(v12);
    Level& cur = levels_[h];  // `lv` may dangle after emplace_back
    cur.totals.erase(cur.totals.begin(), cur.totals.begin() + 2);
    cur.variances.erase(cur.variances.begin(), cur.variances.begin() + 2);
    if (static_cast<int>(levels_[h + 1].totals.size()) <= max_buckets_) break;
  }
}

void Adwin::delete_oldest() {
  const size_t last = levels_.size() - 1;
  const double n = static_cast<double>(uint64_t{1} << last);
  const double u = levels_[last].totals[0], v = levels_[last].variances[0];
  const double mu = u / n;
  width_ -= n;
  total_ -= u;
  const double mu_window = total_ / width_;
  const double inc = v + n * width_ * (mu - mu_window) * (mu - mu_window) / (n + width_);
  variance_ -= inc;
  levels_[last].totals.erase(levels_[last].totals.begin());
  levels_[last].variances.erase(levels_[last].variances.begin());
  if (levels_[last].totals.empty() && last > 0) levels_.pop_back();
}

bool Adwin::cut(double n0, double n1, double delta_mean, double delta_prime) const {
  // delta_prime = log(2 log(width) / delta) is computed once per pass by the
  // caller: the same expression, so the same bits as evaluating it here.
  const double m_recip = 1.0 / (n0 - min_window_ + 1.0) + 1.0 / (n1 - min_window_ + 1.0);
  const double linear = 2.0 / 3.0 * delta_prime * m_recip;
  const double dm = std::abs(delta_mean);
  // eps = sqrt(...) + linear >= linear exactly (rounding is monotone), so a
  // mean difference at or below `linear` can never cut: skip the sqrt.
  if (!(dm > linear)) return false;
  const double eps = std::sqrt(2.0 * m_recip * (variance_ / width_) * delta_prime) + linear;
  return dm > eps;
}

bool Adwin::detect() {
  bool change = false;
  ++tick_;
  if (tick_ % clock_ == 0 && width_ > grace_) {
    bool reduce = true;
    while (reduce) {
      reduce = false;
      bool exit_flag = false;
      double n0 = 0, n1 = width_, u0 = 0, u1 = total_;
      const double delta_prime = std::log(2.0 * std::log(width_) / delta_);
      const int64_t nlev = static_cast<int64_t>(levels_.size());
      for (int64_t h = nlev - 1; h >= 0 && !exit_flag && !reduce; --h) {
        const double size = static_cast<double>(uint64_t{1} << h);
        const int64_t cnt = static_cast<int64_t>(levels_[h].totals.size());
        for (int64_t k = 0; k < cnt; ++k) {
          n0 += size;
          n1 -= size;
          const double t = levels_[h].totals[k];
          u0 += t;
          u1 -= t;
          if (h == 0 && k == cnt - 1) {
            exit_flag = true;
            break;
          }
          const double delta_mean = (u0 / n0) - (u1 / n1);
          if (n1 >= min_window_ && n0 >= min_window_ && cut(n0, n1, delta_mean, delta_prime)) {
            reduce = true;
            change = true;
            if (width_ > 0) {
              delete_oldest();
              break;
            }
          }
        }
      }
    }
  }
  return change;
}

bool Adwin::step(double x) {
  if (detected_) reset();
  insert(x);
  detected_ = detect();
  if (detected_) ++n_detections_;
  return detected_;
}

std::vector<int64_t> Adwin::update(const double* x, int64_t n) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i)
    if (step(x[i])) out.push_back(i);
  return out;
}

// ------------------------------------------------------------------ Page-Hinkley

PageHinkley::PageHinkley(int64_t min_instances, double delta, double threshold, double alpha,
                         int mode)
    : min_instances_(min_instances),
      delta_(delta),
      threshold_(threshold),
      alpha_(alpha),
      mode_(mode) {
  FASTML_CHECK_ARG(min_instances >= 1, "min_instances", "must be >= 1, got ", min_instances);
  FASTML_CHECK_ARG(threshold > 0, "threshold", "must be > 0, got ", threshold);
  reset();
}

void PageHinkley::reset() {
  n_ = mean_ = sum_inc_ = sum_dec_ = 0;
  min_inc_ = std::numeric_limits<double>::infinity();
  max_dec_ = -1;
  detected_ = false;
}

std::vector<int64_t> PageHinkley::update(const double* x, int64_t n) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    if (detected_) reset();
    n_ += 1.0;
    mean_ += (1.0 / n_) * (x[i] - mean_);
    const double dev = x[i] - mean_;
    sum_inc_ = alpha_ * sum_inc_ + dev - delta_;
    sum_dec_ = alpha_ * sum_dec_ + dev + delta_;
    if (sum_inc_ < min_inc_) min_inc_ = sum_inc_;
    if (sum_dec_ > max_dec_) max_dec_ = sum_dec_;
    if (n_ >= static_cast<double>(min_instances_)) {
      const double up = sum_inc_ - min_inc_, down = max_dec_ - sum_dec_;
      detected_ = mode_ == 1   ? up > threshold_
                  : mode_ == 2 ? down > threshold_
                               : (up > threshold_ || down > threshold_);
      if (detected_) out.push_back(i);
    }
  }
  return out;
}

// ------------------------------------------------------------------ DDM

Ddm::Ddm(int64_t warm_start, double warning_threshold, double drift_threshold)
    : warm_start_(warm_start),
      warning_threshold_(warning_threshold),
      drift_threshold_(drift_threshold) {
  FASTML_CHECK_ARG(warm_start >= 0, "warm_start", "must be >= 0, got ", warm_start);
  reset();
}

void Ddm::reset() {
  n_ = mean_ = p_min_ = s_min_ = 0;
  ps_min_ = std::numeric_limits<double>::infinity();
  has_min_ = detected_ = warning_ = false;
}

std::vector<int64_t> Ddm::update(const double* x, int64_t n, std::vector<int64_t>* warnings) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    if (detected_) reset();
    n_ += 1.0;
    mean_ += (1.0 / n_) * (x[i] - mean_);
    const double p = mean_;
    const double s = std::sqrt(p * (1 - p) / n_);
    if (n_ > static_cast<double>(warm_start_)) {
      if (p + s <= ps_min_) {
        p_min_ = p;
        s_min_ = s;
        ps_min_ = p_min_ + s_min_;
        has_min_ = true;
      }
      warning_ = p + s > p_min_ + warning_threshold_ * s_min_;
      if (p + s > p_min_ + drift_threshold_ * s_min_) {
        detected_ = true;
        warning_ = false;
        out.push_back(i);
      }
      if (warning_ && warnings) warnings->push_back(i);
    }
  }
  return out;
}

}  // namespace fastml::drift
