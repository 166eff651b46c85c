#include "drift/detectors.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "common/cpu_features.hpp"
#include "common/errors.hpp"

namespace fastml::drift {

// ------------------------------------------------------------------ ADWIN

Adwin::Adwin(double delta, int clock, int max_buckets, int min_window_length, int grace_period)
    : delta_(delta),
      clock_(clock),
      max_buckets_(max_buckets),
      min_window_(min_window_length),
      grace_(grace_period),
      use_avx2_(cpu_features().avx2) {
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
  until_check_ = clock_;
  detected_ = false;
  cap_ = max_buckets_ + 1;
  if (tot_.size() != static_cast<size_t>(kMaxLevels * cap_)) {
    tot_.assign(static_cast<size_t>(kMaxLevels * cap_), 0.0);
    var_.assign(static_cast<size_t>(kMaxLevels * cap_), 0.0);
  }
  cnt_.fill(0);
  head_.fill(0);
  nlev_ = 1;
}

void Adwin::insert(double value) {
  push_newest(0, value, 0.0);
  width_ += 1.0;
  double inc = 0.0;
  if (width_ > 1.0) {
    const double d = value - total_ / (width_ - 1.0);
    inc = (width_ - 1.0) * d * d / width_;
  }
  variance_ += inc;
  total_ += value;
  if (cnt_[0] == cap_) compress();
}

// The bucket side of insert() for `n` values (the window sums are the
// caller's): level 0 is kept in registers, and the merge of its two oldest
// buckets -- the most frequent compression, every other value -- is done
// inline with compress()'s arithmetic at h = 0, where the sizes are 1 and the
// variances 0: mu = t, temp = 1 * 0.5 * (t0 - t1) * (t0 - t1), v = 0 + 0 + temp.
// Level-0 variances are never read as anything but 0, so they are not written.
void Adwin::insert_run(const double* x, int64_t n) {
  double* t0 = tot_.data();
  int c0 = cnt_[0], h0 = head_[0];
  const int cap = cap_;
  for (int64_t k = 0; k < n; ++k) {
    int j = h0 + c0;
    j = j >= cap ? j - cap : j;
    t0[j] = x[k];
    if (++c0 < cap) continue;
    const int i0 = h0, i1 = i0 + 1 == cap ? 0 : i0 + 1;
    const double d = t0[i0] - t0[i1];
    const double temp = 1.0 * 0.5 * d * d;
    const double total12 = t0[i0] + t0[i1];
    h0 = i1 + 1 == cap ? 0 : i1 + 1;
    c0 -= 2;
    if (nlev_ < 2) {
      nlev_ = 2;
      cnt_[1] = 0;
      head_[1] = 0;
    }
    push_newest(1, total12, 0.0 + 0.0 + temp);
    if (cnt_[1] == cap) {
      cnt_[0] = c0;
      head_[0] = h0;
      compress_from(1);
    }
  }
  cnt_[0] = c0;
  head_[0] = h0;
}

void Adwin::compress() {
  compress_from(0);
}

void Adwin::compress_from(int h0) {
  for (int h = h0; h < nlev_; ++h) {
    if (cnt_[h] != cap_) break;
    const double* t = tot_.data() + h * cap_;
    const double* v = var_.data() + h * cap_;
    const int i0 = head_[h], i1 = i0 + 1 == cap_ ? 0 : i0 + 1;  // the two oldest
    const double n1 = static_cast<double>(uint64_t{1} << h);
    // n1 is a power of two: x / n1 and x * (1 / n1) are the same correctly
    // rounded x 2^-h, and the multiplication is far cheaper.
    const double inv_n1 = 1.0 / n1;
    const double mu1 = t[i0] * inv_n1, mu2 = t[i1] * inv_n1;
    const double total12 = t[i0] + t[i1];
    const double temp = n1 * 0.5 * (mu1 - mu2) * (mu1 - mu2);
    const double v12 = v[i0] + v[i1] + temp;
    FASTML_ASSERT(h + 1 < kMaxLevels);
    if (h + 1 >= nlev_) {
      nlev_ = h + 2;
      cnt_[h + 1] = 0;
      head_[h + 1] = 0;
    }
    push_newest(h + 1, total12, v12);
    // Drop the two oldest of level h.
    head_[h] = i1 + 1 == cap_ ? 0 : i1 + 1;
    cnt_[h] -= 2;
    if (cnt_[h + 1] <= max_buckets_) break;
  }
}

void Adwin::delete_oldest() {
  const int last = nlev_ - 1;
  const int i0 = last * cap_ + head_[last];
  const double n = static_cast<double>(uint64_t{1} << last);
  const double u = tot_[i0], vv = var_[i0];
  const double mu = u / n;
  width_ -= n;
  total_ -= u;
  const double mu_window = total_ / width_;
  const double inc = vv + n * width_ * (mu - mu_window) * (mu - mu_window) / (n + width_);
  variance_ -= inc;
  head_[last] = head_[last] + 1 == cap_ ? 0 : head_[last] + 1;
  --cnt_[last];
  if (cnt_[last] == 0 && last > 0) --nlev_;
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

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTML_ADWIN_AVX 1
// First j in [from, m) whose split may cut, else m: both parts hold at least
// `mw` values and |u0/n0 - u1/n1| > sqrt(2 m (var/width) delta') + linear,
// with m = 1/(n0 - mw + 1) + 1/(n1 - mw + 1) and linear = (2/3 delta') m.
// A conservative filter, four splits per step, with no division or square
// root: with A = n0 - mw + 1, B = n1 - mw + 1, R = A B, N = n0 n1, the test
// multiplied by N R > 0 reads P = |u0 n1 - u1 n0| R - (2/3 delta') (A + B) N
// > 0 and P^2 > N^2 2 (var/width) delta' (A + B) R. P is given a slack of
// 1e-9 times the magnitudes it is made of, and the square test a relative
// 1e-9: far more than the few-ulp rounding of this and of the scalar test,
// so a split the filter rejects never cuts. The caller decides every split
// the filter returns with the scalar Adwin::cut, so decisions are River's.
__attribute__((target("avx2"))) int64_t adwin_first_candidate(const double* n0, const double* n1,
                                                              const double* u0, const double* u1,
                                                              int64_t from, int64_t m, double mw,
                                                              double lin_coef, double var_w,
                                                              double delta_prime) {
  const __m256d vmw = _mm256_set1_pd(mw), vmw1 = _mm256_set1_pd(mw - 1.0);
  const __m256d vc = _mm256_set1_pd(lin_coef), zero = _mm256_setzero_pd();
  const __m256d sign = _mm256_set1_pd(-0.0), tiny = _mm256_set1_pd(1e-9);
  const __m256d vq = _mm256_set1_pd(2.0 * var_w * delta_prime * (1.0 - 1e-9));
  int64_t j = from;
  for (; j + 4 <= m; j += 4) {
    const __m256d a = _mm256_loadu_pd(n0 + j), b = _mm256_loadu_pd(n1 + j);
    const __m256d x0 = _mm256_loadu_pd(u0 + j), x1 = _mm256_loadu_pd(u1 + j);
    const __m256d cross = _mm256_sub_pd(_mm256_mul_pd(x0, b), _mm256_mul_pd(x1, a));
    const __m256d mag = _mm256_add_pd(_mm256_mul_pd(_mm256_andnot_pd(sign, x0), b),
                                      _mm256_mul_pd(_mm256_andnot_pd(sign, x1), a));
    const __m256d A = _mm256_sub_pd(a, vmw1), B = _mm256_sub_pd(b, vmw1);
    const __m256d S = _mm256_add_pd(A, B), R = _mm256_mul_pd(A, B), N = _mm256_mul_pd(a, b);
    const __m256d lhs = _mm256_mul_pd(_mm256_andnot_pd(sign, cross), R);
    const __m256d lin = _mm256_mul_pd(_mm256_mul_pd(vc, S), N);
    const __m256d slack = _mm256_mul_pd(
        tiny, _mm256_add_pd(_mm256_add_pd(lhs, lin), _mm256_mul_pd(_mm256_add_pd(mag, lin), R)));
    const __m256d P = _mm256_add_pd(_mm256_sub_pd(lhs, lin), slack);
    const __m256d Y = _mm256_mul_pd(_mm256_mul_pd(_mm256_mul_pd(N, N), vq), _mm256_mul_pd(S, R));
    const __m256d ok = _mm256_and_pd(
        _mm256_and_pd(_mm256_cmp_pd(b, vmw, _CMP_GE_OQ), _mm256_cmp_pd(a, vmw, _CMP_GE_OQ)),
        _mm256_and_pd(_mm256_cmp_pd(P, zero, _CMP_GT_OQ),
                      _mm256_cmp_pd(_mm256_mul_pd(P, P), Y, _CMP_GE_OQ)));
    const int bits = _mm256_movemask_pd(ok);
    if (bits) return j + __builtin_ctz(static_cast<unsigned>(bits));
  }
  for (; j < m; ++j) {
    if (!(n1[j] >= mw && n0[j] >= mw)) continue;
    const double dmean = (u0[j] / n0[j]) - (u1[j] / n1[j]);
    const double m_recip = 1.0 / (n0[j] - mw + 1.0) + 1.0 / (n1[j] - mw + 1.0);
    const double linear = lin_coef * m_recip;
    if (!(std::abs(dmean) > linear)) continue;
    if (std::abs(dmean) > std::sqrt(2.0 * m_recip * var_w * delta_prime) + linear) return j;
  }
  return m;
}

constexpr int64_t kIncBlock = 64;

// inc[k] = w > 1 ? (w - 1) d d / w : 0 with d = x - prev / (w - 1), w = wk[k],
// prev = prev[k]: insert()'s variance increment, same operations in the same
// order (no FMA in this target), four values per step.
__attribute__((target("avx2"))) void adwin_increments(const double* x, const double* prev,
                                                      const double* wk, double* inc, int64_t len) {
  const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    const __m256d w = _mm256_load_pd(wk + k);
    const __m256d wm1 = _mm256_sub_pd(w, one);
    const __m256d d =
        _mm256_sub_pd(_mm256_loadu_pd(x + k), _mm256_div_pd(_mm256_load_pd(prev + k), wm1));
    const __m256d v = _mm256_div_pd(_mm256_mul_pd(_mm256_mul_pd(wm1, d), d), w);
    _mm256_store_pd(inc + k, _mm256_blendv_pd(zero, v, _mm256_cmp_pd(w, one, _CMP_GT_OQ)));
  }
  for (; k < len; ++k) {
    const double w = wk[k];
    double v = 0.0;
    if (w > 1.0) {
      const double d = x[k] - prev[k] / (w - 1.0);
      v = (w - 1.0) * d * d / w;
    }
    inc[k] = v;
  }
}
#endif

}  // namespace

bool Adwin::detect() {
  bool change = false;
  ++tick_;
  // tick_ % clock_ == 0, without a division per value.
  if (--until_check_ != 0) return false;
  until_check_ = clock_;
  if (width_ > grace_) {
    bool reduce = true;
    while (reduce) {
      reduce = false;
      // The splits in River's order (largest buckets, i.e. oldest, first),
      // with the running sizes and sums accumulated exactly as River does;
      // River stops before the newest bucket of level 0.
      size_t nb = 0;
      for (int h = 0; h < nlev_; ++h) nb += static_cast<size_t>(cnt_[h]);
      if (n0_.size() < nb) {
        n0_.resize(nb);
        n1_.resize(nb);
        u0_.resize(nb);
        u1_.resize(nb);
      }
      double n0 = 0, n1 = width_, u0 = 0, u1 = total_;
      size_t w = 0;
      for (int h = nlev_ - 1; h >= 0; --h) {
        const double size = static_cast<double>(uint64_t{1} << h);
        const double* totals = tot_.data() + h * cap_;
        for (int k = 0, j = head_[h]; k < cnt_[h]; ++k, j = j + 1 == cap_ ? 0 : j + 1) {
          const double t = totals[j];
          n0 += size;
          n1 -= size;
          u0 += t;
          u1 -= t;
          n0_[w] = n0;
          n1_[w] = n1;
          u0_[w] = u0;
          u1_[w] = u1;
          ++w;
        }
      }
      int64_t m = static_cast<int64_t>(nb);
      if (cnt_[0] > 0) --m;  // River's exit before the newest bucket
      const double delta_prime = std::log(2.0 * std::log(width_) / delta_);
      const double lin_coef = 2.0 / 3.0 * delta_prime;
      int64_t j = 0;
      while (j < m) {
#ifdef FASTML_ADWIN_AVX
        if (use_avx2_) {
          j = adwin_first_candidate(n0_.data(), n1_.data(), u0_.data(), u1_.data(), j, m,
                                    min_window_, lin_coef, variance_ / width_, delta_prime);
          if (j >= m) break;
        }
#endif
        const double delta_mean = (u0_[j] / n0_[j]) - (u1_[j] / n1_[j]);
        if (n1_[j] >= min_window_ && n0_[j] >= min_window_ &&
            cut(n0_[j], n1_[j], delta_mean, delta_prime)) {
          reduce = true;
          change = true;
          if (width_ > 0) delete_oldest();
          break;
        }
        ++j;
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
  int64_t i = 0;
  while (i < n) {
    if (detected_) reset();
    // The values before the next clock tick only insert (no check can
    // fire): run them with the window sums in registers, with the same
    // arithmetic as insert(); compress() does not read the sums.
    const int64_t run = std::min<int64_t>(n - i, until_check_ - 1);
    if (run <= 0) {
      if (step(x[i])) out.push_back(i);
      ++i;
      continue;
    }
    double w = width_, tot = total_, var = variance_;
    insert_run(x + i, run);
#ifdef FASTML_ADWIN_AVX
    if (use_avx2_) {
      // The two divisions per value do not depend on the previous value's
      // variance: compute them four at a time, then add in order. The width
      // before value k is w + k exactly (integers), so only the sum chains.
      for (int64_t b = i; b < i + run; b += kIncBlock) {
        const int64_t len = std::min<int64_t>(kIncBlock, i + run - b);
        alignas(32) double prev[kIncBlock], wk[kIncBlock], inc[kIncBlock];
        for (int64_t k = 0; k < len; ++k) {
          prev[k] = tot;
          wk[k] = w + static_cast<double>(k + 1);
          tot += x[b + k];
        }
        w += static_cast<double>(len);
        adwin_increments(x + b, prev, wk, inc, len);
        for (int64_t k = 0; k < len; ++k) var += inc[k];
      }
    } else
#endif
    {
      for (int64_t k = i; k < i + run; ++k) {
        const double value = x[k];
        w += 1.0;
        double inc = 0.0;
        if (w > 1.0) {
          const double d = value - tot / (w - 1.0);
          inc = (w - 1.0) * d * d / w;
        }
        var += inc;
        tot += value;
      }
    }
    width_ = w;
    total_ = tot;
    variance_ = var;
    tick_ += run;
    until_check_ -= run;
    i += run;
  }
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
