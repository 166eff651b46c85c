#include "drift/two_sample.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "common/buffer.hpp"
#include "common/thread_pool.hpp"

namespace fastml::drift {

namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr int64_t kMaxExactN = 10000;  // SciPy's MAX_AUTO_N for method="auto"

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
int64_t ceil_div(int64_t a, int64_t b) {  // b > 0
  return -floor_div(-a, b);
}

// Pr(D_{n,n} >= h / n): alternating sum of binomial ratios evaluated Horner-style
// so no term is ever larger than one.
double prob_outside_square(int64_t n, int64_t h) {
  double p = 0.0;
  for (int64_t k = n / h; k >= 0; --k) {
    double p1 = 1.0;
    for (int64_t j = 0; j < h; ++j) {
      p1 = static_cast<double>(n - k * h - j) * p1 / static_cast<double>(n + k * h + j + 1);
    }
    p = p1 * (1.0 - p);
  }
  return 2.0 * p;
}

// 1 - Pr(all lattice paths stay strictly inside |x/m - y/n| < h / lcm), using
// the recursion on the complement (Viehmann 2021) over a sliding column window.
double prob_outside_lattice(int64_t m, int64_t n, int64_t g, int64_t h) {
  if (m < n) std::swap(m, n);
  const int64_t mg = m / g, ng = n / g;
  int64_t minj = 0;
  int64_t maxj = std::min<int64_t>(ceil_div(h, mg), n + 1);
  int64_t curlen = maxj - minj;
  const int64_t len = std::min<int64_t>(2 * maxj + 2, n + 1);
  std::vector<double> a(static_cast<size_t>(std::max<int64_t>(len, 1)), 1.0);
  for (int64_t j = minj; j < maxj; ++j) a[j] = 0.0;
  for (int64_t i = 1; i <= m; ++i) {
    const int64_t lastminj = minj, lastlen = curlen;
    minj = std::max<int64_t>(floor_div(ng * i - h, mg) + 1, 0);
    minj = std::min(minj, n);
    maxj = std::min<int64_t>(ceil_div(ng * i + h, mg), n + 1);
    if (maxj <= minj) return 1.0;
    double val = minj == 0 ? 0.0 : 1.0;
    for (int64_t jj = 0; jj < maxj - minj; ++jj) {
      const int64_t j = jj + minj;
      val = (a[jj + minj - lastminj] * static_cast<double>(i) + val * static_cast<double>(j)) /
            static_cast<double>(i + j);
      a[jj] = val;
    }
    curlen = maxj - minj;
    for (int64_t t = curlen; t < lastlen; ++t) a[t] = 1.0;  // carried-over entries
  }
  return a[maxj - minj - 1];
}

double clip01(double p) {
  return std::min(1.0, std::max(0.0, p));
}

// log(n! / n^n) by Stirling's series with n log n removed up front.
double log_nfactorial_div_n_pow_n(double n) {
  static const double coeffs[] = {-2.955065359477124183e-2,  6.4102564102564102564e-3,
                                  -1.9175269175269175269e-3, 8.4175084175084175084e-4,
                                  -5.952380952380952381e-4,  7.9365079365079365079e-4,
                                  -2.7777777777777777778e-3, 8.3333333333333333333e-2};
  const double rn = 1.0 / n, y = rn / n;
  double poly = 0.0;
  for (double c : coeffs) poly = poly * y + c;
  return std::log(n) / 2 - n + std::log(2 * kPi) / 2 + rn * poly;
}

// Pr(D_n <= d) by the Durbin matrix (Marsaglia, Tsang and Wang 2003).
double kolmogn_durbin_cdf(int64_t n, double d) {
  const double nd = static_cast<double>(n) * d;
  if (nd <= 0.5) return 0.0;
  const int64_t k = static_cast<int64_t>(std::ceil(nd));
  const double h = static_cast<double>(k) - nd;
  const int64_t m = 2 * k - 1;
  std::vector<double> H(m * m, 0.0), v(m), w(m);
  double fac = 1.0;
  for (int64_t j = 1; j <= m; ++j) {
    w[j - 1] = fac;
    fac /= static_cast<double>(j);
    v[j - 1] = (1.0 - std::pow(h, static_cast<double>(j))) * fac;
  }
  const double tt = std::pow(std::max(2 * h - 1.0, 0.0), static_cast<double>(m)) -
                    2 * std::pow(h, static_cast<double>(m));
  v[m - 1] = (1.0 + tt) * fac;
  for (int64_t i = 1; i < m; ++i)
    for (int64_t r = i - 1; r < m; ++r) H[r * m + i] = w[r - (i - 1)];
  for (int64_t r = 0; r < m; ++r) H[r * m] = v[r];
  for (int64_t c = 0; c < m; ++c) H[(m - 1) * m + c] = v[m - 1 - c];

  auto matmul = [m](const std::vector<double>& x, const std::vector<double>& y) {
    std::vector<double> z(m * m, 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t l = 0; l < m; ++l) {
        const double xil = x[i * m + l];
        for (int64_t j = 0; j < m; ++j) z[i * m + j] += xil * y[l * m + j];
      }
    return z;
  };
  std::vector<double> P(m * m, 0.0);
  for (int64_t i = 0; i < m; ++i) P[i * m + i] = 1.0;
  const double ep128 = std::ldexp(1.0, 128), em128 = std::ldexp(1.0, -128);
  int64_t expnt = 0, hexpnt = 0;
  for (int64_t nn = n; nn > 0; nn /= 2) {
    if (nn % 2) {
      P = matmul(P, H);
      expnt += hexpnt;
    }
    H = matmul(H, H);
    hexpnt *= 2;
    if (std::abs(H[(k - 1) * m + (k - 1)]) > ep128) {
      for (double& x : H) x /= ep128;
      hexpnt += 128;
    }
  }
  double p = P[(k - 1) * m + (k - 1)];
  for (int64_t i = 1; i <= n; ++i) {
    p = static_cast<double>(i) * p / static_cast<double>(n);
    if (std::abs(p) < em128) {
      p *= ep128;
      expnt -= 128;
    }
  }
  if (expnt != 0) p = std::ldexp(p, static_cast<int>(expnt));
  return clip01(p);
}

// Pelz-Good asymptotic series for Pr(D_n <= x).
double kolmogn_pelz_good_cdf(int64_t n, double x) {
  if (x <= 0.0) return 0.0;
  if (x >= 1.0) return 1.0;
  const double pi2 = kPi * kPi, pi4 = pi2 * pi2, pi6 = pi4 * pi2;
  const double sqrt2pi = std::sqrt(2 * kPi);
  const double z = std::sqrt(static_cast<double>(n)) * x;
  const double z2 = z * z, z3 = z2 * z, z4 = z2 * z2, z6 = z4 * z2;
  const double qlog = -pi2 / 8 / z2;
  if (qlog < -708) return 0.0;
  double q = std::exp(qlog);
  const double k1a = -z2, k1b = pi2 / 4;
  const double k2a = 6 * z6 + 2 * z4, k2b = (2 * z4 - 5 * z2) * pi2 / 4,
               k2c = pi4 * (1 - 2 * z2) / 16;
  const double k3d = pi6 * (5 - 30 * z2) / 64, k3c = pi4 * (-60 * z2 + 212 * z4) / 16,
               k3b = pi2 * (135 * z4 - 96 * z6) / 4, k3a = -30 * z6 - 90 * std::pow(z, 8);
  double K[4] = {0, 0, 0, 0};
  const int64_t maxk = static_cast<int64_t>(std::ceil(16 * z / kPi));
  for (int64_t k = maxk; k > 0; --k) {
    const double m = static_cast<double>(2 * k - 1);
    const double m2 = m * m, m4 = m2 * m2, m6 = m4 * m2;
    const double qp = std::pow(q, static_cast<double>(8 * k));
    const double c[4] = {1.0, k1a + k1b * m2, k2a + k2b * m2 + k2c * m4,
                         k3a + k3b * m2 + k3c * m4 + k3d * m6};
    for (int i = 0; i < 4; ++i) K[i] = K[i] * qp + c[i];
  }
  const double den[4] = {z, 6 * z4, 72 * std::pow(z, 7), 6480 * std::pow(z, 10)};
  for (int i = 0; i < 4; ++i) K[i] = K[i] * q * sqrt2pi / den[i];
  q = std::exp(-pi2 / 2 / z2);
  double k2extra = 0.0, k3extra = 0.0;
  const double sqrt3z = std::sqrt(3.0) * z;
  for (int64_t k = maxk; k > 0; --k) {
    const double kk = static_cast<double>(k) * static_cast<double>(k);
    const double qp = std::pow(q, kk);
    const double kpi = kPi * static_cast<double>(k);
    k2extra += kk * qp;
    k3extra += (sqrt3z + kpi) * (sqrt3z - kpi) * kk * qp;
  }
  K[2] += k2extra * pi2 * sqrt2pi / (-36 * z3);
  K[3] += k3extra * pi2 * sqrt2pi / (216 * z6);
  double sum = 0.0;
  for (int i = 0; i < 4; ++i) sum += K[i] / std::pow(static_cast<double>(n), i / 2.0);
  return sum;
}

// log Gamma without touching the global `signgam` (std::lgamma may write it:
// a data race when two threads compute p-values).
long double log_gamma(long double z) {
#if defined(__GLIBC__)
  int sign;
  return ::lgammal_r(z, &sign);
#else
  return std::lgamma(z);
#endif
}

// Below this many terms the Smirnov sum runs directly from v = 0.
constexpr int64_t kSmirnovDirectTerms = 1 << 15;

// Stirling's remainder eps(k) = log k! - (k log k - k + log(2 pi k) / 2):
// exact (extended precision) up to 16, else its series to 1/k^7 (the next
// term is below 1e-14 there).
double stirling_remainder(int64_t k) {
  static const std::array<double, 17> small = [] {
    std::array<double, 17> t{};
    const long double two_pi = 6.283185307179586476925286766559005768L;
    for (int i = 1; i <= 16; ++i) {
      const long double kk = i;
      t[i] = static_cast<double>(log_gamma(kk + 1.0L) -
                                 (kk * std::log(kk) - kk + 0.5L * std::log(two_pi * kk)));
    }
    return t;
  }();
  if (k <= 16) return small[static_cast<size_t>(k)];
  const double r = 1.0 / static_cast<double>(k), r2 = r * r;
  return r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 * (1.0 / 1680))));
}

// log of the v-th Smirnov summand C(n, v) (1 - x - v/n)^(n-v) (x + v/n)^(v-1),
// c = n x, in double precision without the cancellation of the direct form:
// with log C(n, v) = n H(v/n) + S (S from Stirling's formula, O(log n)), the
// O(n) parts cancel analytically and what is left is
//   S + (n - v) log1p(-c / (n - v)) + v log1p(c / v) - log(x + v/n),
// whose pieces are at most ~c log c in size: each summand is off by ~1e-12
// relative at n = 1e6, against the 1e-10 the p-values promise (the
// extended-precision direct form measured 7x slower).
double smirnov_log_term(int64_t n, double c, int64_t v) {
  const double dn = static_cast<double>(n), dv = static_cast<double>(v), nv = dn - dv;
  const double log_p = std::log((dv + c) / dn);
  if (v == 0) return dn * std::log1p(-c / dn) - log_p;
  const double s = 0.5 * std::log(dn / (2.0 * M_PI * dv * nv)) + stirling_remainder(n) -
                   stirling_remainder(v) - stirling_remainder(n - v);
  return s + nv * std::log1p(-c / nv) + dv * std::log1p(c / dv) - log_p;
}

// One-sided Smirnov survival function Pr(D_n^+ >= x) (scipy.special.smirnov),
// by the exact Birnbaum-Tingey sum in extended precision.
double smirnov_sf(int64_t n, double x) {
  if (!(n > 0 && x >= 0.0 && x <= 1.0)) return std::nan("");
  if (n == 1) return 1 - x;
  if (x == 0.0) return 1.0;
  if (x == 1.0) return 0.0;
  const long double nx = static_cast<long double>(n) * static_cast<long double>(x);
  int64_t nxfl = static_cast<int64_t>(std::floor(nx));
  long double alpha = nx - static_cast<long double>(nxfl);
  if (alpha >= 1.0L) {
    nxfl += 1;
    alpha = 0;
  }
  if (nxfl == 0 || (nxfl == 1 && alpha == 0)) {
    const double t = static_cast<double>(std::pow(1.0L + x, static_cast<long double>(n - 1)));
    return 1 - x * t;
  }
  if (-2.0 * static_cast<double>(n) * x * x < -708.3964185322641) return 0.0;
  if (nxfl >= n - 1) return static_cast<double>(std::pow(1.0L - x, static_cast<long double>(n)));
  if (n > 1000000) {
    const double logp =
        -std::pow(6.0 * static_cast<double>(n) * x + 1, 2) / 18.0 / static_cast<double>(n);
    return logp < -std::log(2.0) ? std::exp(logp) : 1 - (-std::expm1(logp));
  }
  const int64_t last = n - nxfl - 1;
  const long double ln = static_cast<long double>(n), lx = x;
  if (last < kSmirnovDirectTerms) {
    long double log_binom = 0.0L, sum = 0.0L;
    for (int64_t v = 0; v <= last; ++v) {
      const long double lv = static_cast<long double>(v);
      const long double left = (ln - lv) / ln - lx;  // 1 - x - v/n
      const long double right = lv / ln + lx;        // x + v/n
      const long double log_term =
          log_binom + (ln - lv) * std::log(left) + (lv - 1.0L) * std::log(right);
      const long double term = std::exp(log_term);
      sum += term;
      if (v > n / 2 && term < 1e-30L * sum) break;
      log_binom += std::log((ln - lv) / (lv + 1.0L));
    }
    return clip01(static_cast<double>(lx * sum));
  }
  // Large n (the asymptotic two-sample p-value at 1M vs 1M lands here with
  // n = 500,000): hundreds of thousands of summands, each from
  // smirnov_log_term (double precision, no cancellation). The summands are
  // unimodal in v, so only the v whose log-term is within 50 of the peak's
  // matter: each other term is below e^-50 times the peak, so together they
  // add < n e^-50 relative to the sum (< 2e-16: n <= 1e6 here, larger n take
  // the asymptotic branch above): a ternary search finds the peak, binary
  // searches the ends, and the range is summed in fixed blocks on the shared
  // pool (the partial sums are added in block order, so the result does not
  // depend on the threads).
  const double c = static_cast<double>(nx);
  auto log_term_at = [&](int64_t v) { return smirnov_log_term(n, c, v); };
  int64_t a = 0, b = last;
  while (b - a > 2) {
    const int64_t m1 = a + (b - a) / 3, m2 = b - (b - a) / 3;
    if (log_term_at(m1) < log_term_at(m2)) {
      a = m1 + 1;
    } else {
      b = m2;
    }
  }
  int64_t peak_v = a;
  for (int64_t v = a + 1; v <= b; ++v)
    if (log_term_at(v) > log_term_at(peak_v)) peak_v = v;
  const double floor_log = log_term_at(peak_v) - 50.0;
  int64_t lo = 0, hi = peak_v;  // first v in [0, peak] above the floor
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (log_term_at(mid) > floor_log) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t v0 = lo > 64 ? lo - 64 : 0;
  lo = peak_v;
  hi = last;  // last v in [peak, last] above the floor
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (log_term_at(mid) > floor_log) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t v1 = std::min(last, lo + 64);
  constexpr int64_t kBlocks = 64;
  const int64_t span = v1 - v0 + 1, per = (span + kBlocks - 1) / kBlocks;
  std::vector<long double> partial(kBlocks, 0.0L);
  ThreadPool::global().parallel_for(0, kBlocks, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      const int64_t vb = v0 + k * per, ve = std::min(v1 + 1, vb + per);
      long double sum = 0.0L;
      for (int64_t v = vb; v < ve; ++v) sum += std::exp(log_term_at(v));
      partial[k] = sum;
    }
  });
  long double sum = 0.0L;
  for (long double p : partial) sum += p;
  return clip01(static_cast<double>(lx * sum));
}

uint64_t order_key(double x) {
  uint64_t u;
  std::memcpy(&u, &x, 8);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

double from_order_key(uint64_t u) {
  u = (u >> 63) ? (u & 0x7fffffffffffffffull) : ~u;
  double x;
  std::memcpy(&x, &u, 8);
  return x;
}

}  // namespace

void sort_doubles(double* x, int64_t n) {
  sort_doubles_into(x, n, x);
}

void sort_doubles_into(const double* in, int64_t n, double* out) {
  if (n < 4096) {
    if (out != in) std::copy(in, in + n, out);
    std::sort(out, out + n);
    return;
  }
  // 6 passes of 11 bits over order keys, counting all digits in one read and
  // skipping passes where every key has the same digit. The keys live in
  // `out` (reading in[i] before writing key i, so in == out works) and one
  // scratch buffer (a Buffer: large ones are backed by huge pages).
  constexpr int kBits = 11, kPasses = 6, kBuckets = 1 << kBits;
  BufferPtr scratch = Buffer::allocate(static_cast<size_t>(n) * sizeof(uint64_t));
  uint64_t* a = reinterpret_cast<uint64_t*>(out);
  uint64_t* b = scratch->as<uint64_t>();
  std::vector<uint32_t> counts(static_cast<size_t>(kPasses) * kBuckets, 0u);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = order_key(in[i]);
    a[i] = k;
    for (int p = 0; p < kPasses; ++p)
      ++counts[p * kBuckets + ((k >> (p * kBits)) & (kBuckets - 1))];
  }
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* c = counts.data() + p * kBuckets;
    const uint64_t first = (a[0] >> (p * kBits)) & (kBuckets - 1);
    if (c[first] == static_cast<uint32_t>(n)) continue;  // one digit value: nothing to do
    uint32_t sum = 0;
    for (int d = 0; d < kBuckets; ++d) {
      const uint32_t t = c[d];
      c[d] = sum;
      sum += t;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t k = a[i];
      b[c[(k >> (p * kBits)) & (kBuckets - 1)]++] = k;
    }
    std::swap(a, b);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = from_order_key(a[i]);
}

double kstwo_sf(int64_t n, double x) {
  if (n <= 0 || std::isnan(x)) return std::nan("");
  if (x >= 1.0) return 0.0;
  if (x <= 0.0) return 1.0;
  const double dn = static_cast<double>(n);
  const double t = dn * x;
  if (t <= 1.0) {
    if (t <= 0.5) return 1.0;
    double prob;
    if (n <= 140) {
      prob = 1.0;
      for (int64_t i = 1; i <= n; ++i) prob *= static_cast<double>(i) * (1.0 / dn) * (2 * t - 1);
    } else {
      prob = std::exp(log_nfactorial_div_n_pow_n(dn) + dn * std::log(2 * t - 1));
    }
    return clip01(1.0 - prob);
  }
  if (t >= dn - 1) return clip01(2 * std::pow(1.0 - x, dn));
  if (x >= 0.5) return clip01(2 * smirnov_sf(n, x));
  const double nxsquared = t * x;
  if (n <= 140) {
    // Exact region: the Durbin matrix also covers SciPy's Pomeranz range (both exact).
    if (nxsquared <= 4) return clip01(1.0 - kolmogn_durbin_cdf(n, x));
    return clip01(2 * smirnov_sf(n, x));
  }
  if (nxsquared >= 370.0) return 0.0;
  if (nxsquared >= 2.2) return clip01(2 * smirnov_sf(n, x));
  double cdf;
  if (n <= 100000 && dn * std::pow(x, 1.5) <= 1.4) {
    cdf = kolmogn_durbin_cdf(n, x);
  } else {
    cdf = kolmogn_pelz_good_cdf(n, x);
  }
  return clip01(1.0 - cdf);
}

double ks_pvalue(double d, int64_t n1, int64_t n2, bool* exact, double* d_used) {
  const int64_t g = std::gcd(n1, n2);
  if (exact) *exact = false;
  if (d_used) *d_used = d;
  if (std::max(n1, n2) <= kMaxExactN) {
    const int64_t lcm = (n1 / g) * n2;
    const int64_t h = static_cast<int64_t>(std::nearbyint(d * static_cast<double>(lcm)));
    const double dr = static_cast<double>(h) * 1.0 / static_cast<double>(lcm);
    double prob = 1.0;
    if (h != 0) {
      prob = n1 == n2 ? prob_outside_square(n1, h) : prob_outside_lattice(n1, n2, g, h);
    }
    if (prob >= 0.0 && prob <= 1.0) {
      if (exact) *exact = true;
      if (d_used) *d_used = dr;
      return prob;
    }
    d = dr;  // SciPy keeps the rounded statistic when falling back
    if (d_used) *d_used = dr;
  }
  double m = static_cast<double>(n1), n = static_cast<double>(n2);
  if (m < n) std::swap(m, n);
  const double en = m * n / (m + n);
  return clip01(kstwo_sf(static_cast<int64_t>(std::nearbyint(en)), d));
}

KsResult ks_2samp_sorted(const double* a, int64_t n1, const double* b, int64_t n2) {
  const double dn1 = static_cast<double>(n1), dn2 = static_cast<double>(n2);
  double max_diff = -2.0, min_diff = 2.0;
  int64_t i = 0, j = 0;
  while (i < n1 || j < n2) {
    // Advance past every copy of the next value in the union (ties step together).
    const double v = (j >= n2 || (i < n1 && a[i] <= b[j])) ? a[i] : b[j];
    while (i < n1 && a[i] <= v) ++i;
    while (j < n2 && b[j] <= v) ++j;
    const double diff = static_cast<double>(i) / dn1 - static_cast<double>(j) / dn2;
    max_diff = std::max(max_diff, diff);
    min_diff = std::min(min_diff, diff);
  }
  const double min_s = clip01(-min_diff);
  const double d = min_s > max_diff ? min_s : max_diff;
  KsResult r;
  double d_used = d;
  r.pvalue = ks_pvalue(d, n1, n2, &r.exact, &d_used);
  r.statistic = d_used;
  return r;
}

double ks_statistic_weighted(const double* a, const double* wa, int64_t n1, const double* b,
                             const double* wb, int64_t n2) {
  double t1 = 0.0, t2 = 0.0;
  for (int64_t k = 0; k < n1; ++k) t1 += wa[k];
  for (int64_t k = 0; k < n2; ++k) t2 += wb[k];
  if (t1 <= 0 || t2 <= 0) return 0.0;
  double c1 = 0.0, c2 = 0.0, d = 0.0;
  int64_t i = 0, j = 0;
  while (i < n1 || j < n2) {
    const double v = (j >= n2 || (i < n1 && a[i] <= b[j])) ? a[i] : b[j];
    while (i < n1 && a[i] <= v) c1 += wa[i++];
    while (j < n2 && b[j] <= v) c2 += wb[j++];
    d = std::max(d, std::abs(c1 / t1 - c2 / t2));
  }
  return d;
}

double wasserstein_sorted(const double* a, const double* wa, int64_t n1, const double* b,
                          const double* wb, int64_t n2) {
  double t1 = static_cast<double>(n1), t2 = static_cast<double>(n2);
  if (wa) {
    t1 = 0.0;
    for (int64_t k = 0; k < n1; ++k) t1 += wa[k];
  }
  if (wb) {
    t2 = 0.0;
    for (int64_t k = 0; k < n2; ++k) t2 += wb[k];
  }
  // Neumaier-compensated sum of |F1 - F2| * gap between consecutive distinct
  // values of the merged sample (zero gaps between ties add nothing).
  double sum = 0.0, comp = 0.0, c1 = 0.0, c2 = 0.0, prev = 0.0, gap_weight = 0.0;
  int64_t i = 0, j = 0;
  bool have_prev = false;
  while (i < n1 || j < n2) {
    const double v = (j >= n2 || (i < n1 && a[i] <= b[j])) ? a[i] : b[j];
    if (have_prev) {
      const double term = gap_weight * (v - prev);
      const double s = sum + term;
      comp += std::abs(sum) >= std::abs(term) ? (sum - s) + term : (term - s) + sum;
      sum = s;
    }
    while (i < n1 && a[i] <= v) c1 += wa ? wa[i++] : (++i, 1.0);
    while (j < n2 && b[j] <= v) c2 += wb ? wb[j++] : (++j, 1.0);
    gap_weight = std::abs(c1 / t1 - c2 / t2);
    prev = v;
    have_prev = true;
  }
  return sum + comp;
}

double gamma_q(double a, double x) {
  if (!(a > 0) || !(x >= 0) || std::isnan(x)) return std::nan("");
  if (x == 0) return 1.0;
  if (std::isinf(x)) return 0.0;
  const double log_prefix = a * std::log(x) - x - std::lgamma(a);
  if (x < a + 1.0) {
    // Series for P(a, x); Q = 1 - P is well conditioned here (Q >~ 0.3).
    double term = 1.0 / a, sum = term, ap = a;
    for (int it = 0; it < 100000; ++it) {
      ap += 1.0;
      term *= x / ap;
      sum += term;
      if (std::abs(term) < std::abs(sum) * 1e-17) break;
    }
    return clip01(1.0 - sum * std::exp(log_prefix));
  }
  // Lentz's continued fraction for Q(a, x).
  const double tiny = 1e-300;
  double b = x + 1.0 - a, c = 1.0 / tiny, d = 1.0 / b, h = d;
  for (int it = 1; it < 100000; ++it) {
    const double an = -it * (it - a);
    b += 2.0;
    d = an * d + b;
    if (std::abs(d) < tiny) d = tiny;
    c = b + an / c;
    if (std::abs(c) < tiny) c = tiny;
    d = 1.0 / d;
    const double delta = d * c;
    h *= delta;
    if (std::abs(delta - 1.0) < 1e-17) break;
  }
  return clip01(std::exp(log_prefix) * h);
}

double chi2_sf(double x, double dof) {
  if (x <= 0) return 1.0;
  return gamma_q(dof / 2.0, x / 2.0);
}

}  // namespace fastml::drift
