// Exact two-sample statistics on sorted samples: Kolmogorov-Smirnov with the
// p-value SciPy's ks_2samp(method="auto") reports, Wasserstein-1, and the
// chi-square survival function. Plain C++; the bindings sort and validate.
#pragma once

#include <cstdint>

namespace fastml::drift {

struct KsResult {
  double statistic = 0.0;
  double pvalue = 1.0;
  bool exact = false;  // the exact (lattice-path) p-value, else the asymptotic one
};

// Two-sided KS on ascending samples a (n1) and b (n2), both non-empty, NaN-free.
// Follows SciPy's semantics: exact p-value when max(n1, n2) <= 10000 (the
// statistic is then rounded to h / lcm(n1, n2)), else kstwo.sf(D, round(n1 n2 / (n1 + n2))).
KsResult ks_2samp_sorted(const double* a, int64_t n1, const double* b, int64_t n2);

// Only the statistic D = sup |F1 - F2| of two weighted, ascending samples.
double ks_statistic_weighted(const double* a, const double* wa, int64_t n1, const double* b,
                             const double* wb, int64_t n2);

// The p-value of a two-sided KS statistic d for sizes n1, n2 (SciPy's rules).
double ks_pvalue(double d, int64_t n1, int64_t n2, bool* exact = nullptr, double* d_used = nullptr);

// Survival function of the two-sided one-sample Kolmogorov statistic, Pr(D_n > x),
// as scipy.stats.kstwo.sf.
double kstwo_sf(int64_t n, double x);

// Wasserstein-1 distance between two weighted ascending samples (weights may be
// null for unit weights): the integral of |F1 - F2|, as scipy.stats.wasserstein_distance.
double wasserstein_sorted(const double* a, const double* wa, int64_t n1, const double* b,
                          const double* wb, int64_t n2);

// Sorts finite (NaN-free) doubles ascending: LSD radix sort on the order-
// preserving integer image of the bits for large inputs, std::sort for small.
void sort_doubles(double* x, int64_t n);
// Sorted copy of in[0, n) into out (in == out sorts in place).
void sort_doubles_into(const double* in, int64_t n, double* out);

// Regularised upper incomplete gamma Q(a, x); chi2.sf(x, k) = Q(k / 2, x / 2).
double gamma_q(double a, double x);
double chi2_sf(double x, double dof);

}  // namespace fastml::drift
