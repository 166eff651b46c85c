#include "drift/quantile_sketch.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "common/cpu_features.hpp"
#include "common/errors.hpp"

namespace fastml::drift {

QuantileSketch::QuantileSketch(int k, uint64_t seed) : k_(k), rng_(seed) {
  FASTML_CHECK_ARG(k >= kMinWidth && k <= 65536, "sketch_k", "must be in [8, 65536], got ", k);
  levels_.emplace_back();
  refresh_capacities();
}

void QuantileSketch::refresh_capacities() {
  caps_.resize(levels_.size());
  for (int h = 0; h < num_levels(); ++h) {
    const int depth = num_levels() - 1 - h;
    const double c = std::ceil(k_ * std::pow(2.0 / 3.0, depth));
    caps_[h] = std::max<int64_t>(kMinWidth, static_cast<int64_t>(c));
  }
}

int64_t QuantileSketch::capacity_bound(int k) {
  // Worst case over the number of levels: sum of every level's capacity.
  int64_t best = 0;
  for (int levels = 1; levels <= kMaxLevels; ++levels) {
    int64_t total = 0;
    for (int depth = 0; depth < levels; ++depth) {
      total += std::max<int64_t>(kMinWidth,
                                 static_cast<int64_t>(std::ceil(k * std::pow(2.0 / 3.0, depth))));
    }
    best = std::max(best, total);
  }
  return best;
}

uint64_t QuantileSketch::next_random() {  // splitmix64: deterministic, seedable
  uint64_t z = (rng_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void QuantileSketch::update_many(const double* x, int64_t n) {
  while (n > 0) {
    const int64_t room = capacity(0) - static_cast<int64_t>(levels_[0].size());
    const int64_t take = std::min(n, std::max<int64_t>(room, 1));
    levels_[0].insert(levels_[0].end(), x, x + take);
    n_ += static_cast<uint64_t>(take);
    x += take;
    n -= take;
    if (static_cast<int64_t>(levels_[0].size()) >= capacity(0)) compress();
  }
}

namespace {

// Sorts doubles by an LSD radix sort over order-preserving 64-bit keys (8
// passes of 8 bits, passes where every key has the same digit skipped: a run
// of float32 values widened to double skips the 3 low all-zero bytes). Branch
// free, unlike a comparison sort on random data (measured: std::sort of 4096
// random doubles cost ~36 ns per value here, as much as the rest of the
// sketch update).
void radix_sort(double* x, int64_t n) {
  thread_local std::vector<uint64_t> scratch;
  if (scratch.size() < static_cast<size_t>(n)) scratch.resize(static_cast<size_t>(n));
  uint64_t* a = reinterpret_cast<uint64_t*>(x);
  uint64_t* b = scratch.data();
  uint32_t counts[8][256] = {};
  for (int64_t i = 0; i < n; ++i) {
    uint64_t u = a[i];
    u = (u >> 63) ? ~u : (u | 0x8000000000000000ull);  // order-preserving key
    a[i] = u;
    for (int d = 0; d < 8; ++d) ++counts[d][(u >> (8 * d)) & 0xffu];
  }
  for (int d = 0; d < 8; ++d) {
    uint32_t* c = counts[d];
    if (c[(a[0] >> (8 * d)) & 0xffu] == static_cast<uint32_t>(n)) continue;  // one digit only
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const uint32_t t = c[v];
      c[v] = sum;
      sum += t;
    }
    for (int64_t i = 0; i < n; ++i) b[c[(a[i] >> (8 * d)) & 0xffu]++] = a[i];
    std::swap(a, b);
  }
  uint64_t* keys = a;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t u = keys[i];
    u = (u >> 63) ? (u & 0x7fffffffffffffffull) : ~u;
    std::memcpy(x + i, &u, 8);
  }
}

// The same order for values that are all float32 (finite): 32-bit keys in
// three passes of 11, 11 and 10 bits, then widened back (float -> double is
// exact and monotone). The top digit (sign, exponent, one mantissa bit) takes
// few values on real data, so consecutive keys often bump the same counter,
// a chain of store-to-load forwards: that pass scatters four quarters of the
// keys at once, each with its own counters.
void radix_sort_f32(double* x, int64_t n) {
  thread_local std::vector<uint32_t> scratch;
  if (scratch.size() < static_cast<size_t>(2 * n)) scratch.resize(static_cast<size_t>(2 * n));
  uint32_t* a = scratch.data();
  uint32_t* b = a + n;
  uint32_t low[2][2048] = {};
  uint32_t top[4][1024] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(x[i]);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u = (u >> 31) ? ~u : (u | 0x80000000u);  // order-preserving key
    a[i] = u;
    ++low[0][u & 2047u];
    ++low[1][(u >> 11) & 2047u];
  }
  for (int d = 0; d < 2; ++d) {
    const int shift = 11 * d;
    uint32_t* c = low[d];
    if (c[(a[0] >> shift) & 2047u] == static_cast<uint32_t>(n)) continue;  // one digit
    uint32_t sum = 0;
    for (int v = 0; v < 2048; ++v) {
      const uint32_t t = c[v];
      c[v] = sum;
      sum += t;
    }
    for (int64_t i = 0; i < n; ++i) b[c[(a[i] >> shift) & 2047u]++] = a[i];
    std::swap(a, b);
  }
  // Top digit, counted per quarter of the keys in their current order:
  // quarter q goes after every smaller digit and after the quarters before q
  // with the same digit (stable, as LSD needs).
  const int64_t quarter = n / 4;
  for (int64_t i = 0; i < quarter; ++i) {
    ++top[0][a[i] >> 22];
    ++top[1][a[quarter + i] >> 22];
    ++top[2][a[2 * quarter + i] >> 22];
    ++top[3][a[3 * quarter + i] >> 22];
  }
  for (int64_t i = 4 * quarter; i < n; ++i) ++top[3][a[i] >> 22];
  uint32_t sum = 0;
  for (int v = 0; v < 1024; ++v) {
    for (int q = 0; q < 4; ++q) {
      const uint32_t t = top[q][v];
      top[q][v] = sum;
      sum += t;
    }
  }
  uint32_t* t0 = top[0];
  uint32_t* t1 = top[1];
  uint32_t* t2 = top[2];
  uint32_t* t3 = top[3];
  int64_t i = 0;
  for (; i < quarter; ++i) {
    const uint32_t k0 = a[i], k1 = a[quarter + i], k2 = a[2 * quarter + i], k3 = a[3 * quarter + i];
    b[t0[k0 >> 22]++] = k0;
    b[t1[k1 >> 22]++] = k1;
    b[t2[k2 >> 22]++] = k2;
    b[t3[k3 >> 22]++] = k3;
  }
  for (int64_t r = 4 * quarter; r < n; ++r) b[t3[a[r] >> 22]++] = a[r];  // the last quarter's tail
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u = b[k];
    u = (u >> 31) ? (u & 0x7fffffffu) : ~u;
    float f;
    std::memcpy(&f, &u, 4);
    x[k] = static_cast<double>(f);
  }
}

// Order-preserving 64-bit key of a double: the radix sorts' order (-0.0
// before +0.0; the sketch holds finite values only).
inline uint64_t order_key(double v) {
  uint64_t u;
  std::memcpy(&u, &v, 8);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

// bucket[i] = min(trunc((x[i] - lo) * scale), nb - 1) (monotone in x) and
// count[b] += the items in bucket b. The AVX2 path computes the same
// products (IEEE, lane by lane) four at a time.
void bucket_pass_scalar(const double* x, int64_t i, int64_t n, double lo, double scale, int64_t nb,
                        uint16_t* bucket, int32_t* count) {
  for (; i < n; ++i) {
    int64_t b = static_cast<int64_t>((x[i] - lo) * scale);
    b = b < nb ? b : nb - 1;
    bucket[i] = static_cast<uint16_t>(b);
    ++count[b];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) void bucket_pass_avx2(const double* x, int64_t n, double lo,
                                                      double scale, int64_t nb, uint16_t* bucket,
                                                      int32_t* count) {
  const __m256d vlo = _mm256_set1_pd(lo), vscale = _mm256_set1_pd(scale);
  const __m128i top = _mm_set1_epi32(static_cast<int32_t>(nb - 1));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i a = _mm_min_epi32(
        _mm256_cvttpd_epi32(_mm256_mul_pd(_mm256_sub_pd(_mm256_loadu_pd(x + i), vlo), vscale)),
        top);
    const __m128i b = _mm_min_epi32(
        _mm256_cvttpd_epi32(_mm256_mul_pd(_mm256_sub_pd(_mm256_loadu_pd(x + i + 4), vlo), vscale)),
        top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bucket + i), _mm_packus_epi32(a, b));
    for (int j = 0; j < 8; ++j) ++count[bucket[i + j]];
  }
  bucket_pass_scalar(x, i, n, lo, scale, nb, bucket, count);
}
#endif

void bucket_pass(const double* x, int64_t n, double lo, double scale, int64_t nb, uint16_t* bucket,
                 int32_t* count) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (cpu_features().avx2) return bucket_pass_avx2(x, n, lo, scale, nb, bucket, count);
#endif
  bucket_pass_scalar(x, 0, n, lo, scale, nb, bucket, count);
}

// The items of ranks want[0..k) (ascending, distinct) of x[0..n) in the
// radix sorts' order, without sorting x: values go to ~n/4 buckets linear in
// value between the run's extremes (monotone in the order), counted; only the
// buckets that hold a wanted rank are gathered and sorted. False (nothing
// written) when the extremes are equal, where only the sign of zero would
// order the items. x is left unchanged.
bool select_ranks(const double* x, int64_t n, const int64_t* want, int64_t k, double* out,
                  double lo, double hi) {
  if (!(lo <= hi)) {  // not given: the extremes, in four lanes (one chain waited on each min)
    double l[4] = {x[0], x[0], x[0], x[0]}, u[4] = {x[0], x[0], x[0], x[0]};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int j = 0; j < 4; ++j) {
        l[j] = x[i + j] < l[j] ? x[i + j] : l[j];
        u[j] = x[i + j] > u[j] ? x[i + j] : u[j];
      }
    }
    for (; i < n; ++i) {
      l[0] = x[i] < l[0] ? x[i] : l[0];
      u[0] = x[i] > u[0] ? x[i] : u[0];
    }
    lo = std::min(std::min(l[0], l[1]), std::min(l[2], l[3]));
    hi = std::max(std::max(u[0], u[1]), std::max(u[2], u[3]));
  }
  if (!(hi > lo)) return false;
  const int64_t nb = std::max<int64_t>(16, std::min<int64_t>(n / 4, 1 << 15));
  const double scale = static_cast<double>(nb) / (hi - lo);
  if (!std::isfinite(scale)) return false;  // the range underflows the division
  thread_local std::vector<uint16_t> bucket_of;
  thread_local std::vector<int32_t> start_of;
  thread_local std::vector<uint8_t> need_of;
  thread_local std::vector<int32_t> fill_of;
  thread_local std::vector<double> picked_v, sorted_v;
  thread_local std::vector<uint16_t> picked_b;
  bucket_of.resize(static_cast<size_t>(n));
  start_of.assign(static_cast<size_t>(nb) + 1, 0);
  uint16_t* bucket = bucket_of.data();
  int32_t* start = start_of.data();
  bucket_pass(x, n, lo, scale, nb, bucket, start + 1);
  for (int64_t b = 0; b < nb; ++b) start[b + 1] += start[b];  // start[b] = first rank in b
  // The buckets holding a wanted rank, and how many items they hold.
  need_of.assign(static_cast<size_t>(nb), 0);
  uint8_t* need = need_of.data();
  int64_t picked = 0;
  for (int64_t j = 0, b = 0; j < k; ++j) {
    while (start[b + 1] <= want[j]) ++b;
    if (!need[b]) {
      need[b] = 1;
      picked += start[b + 1] - start[b];
    }
  }
  if (picked > n / 4) return false;  // past a quarter of the run, sorting it all is cheaper
  // Their items, in one pass (a branch: with deep sketches the wanted items
  // are a few percent of the run; the branch-free form, a store per item and
  // a cursor that advances on wanted buckets, measured 5.8 vs 4.9 ns per
  // value), then placed bucket by bucket.
  picked_v.resize(static_cast<size_t>(picked) + 1);
  picked_b.resize(static_cast<size_t>(picked) + 1);
  double* pv = picked_v.data();
  uint16_t* pb = picked_b.data();
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t b = bucket[i];
    if (need[b]) {
      pv[c] = x[i];
      pb[c] = b;
      ++c;
    }
  }
  fill_of.resize(static_cast<size_t>(nb));
  int32_t* fill = fill_of.data();
  int32_t off = 0;
  for (int64_t b = 0; b < nb; ++b) {
    if (need[b]) {
      fill[b] = off;
      off += start[b + 1] - start[b];
    }
  }
  sorted_v.resize(static_cast<size_t>(picked));
  double* sv = sorted_v.data();
  for (int64_t i = 0; i < picked; ++i) sv[fill[pb[i]]++] = pv[i];
  // Sort each wanted bucket (now ending at fill[b]) and read its ranks.
  for (int64_t j = 0, b = 0; j < k;) {
    while (start[b + 1] <= want[j]) ++b;
    double* last = sv + fill[b];
    double* first = last - (start[b + 1] - start[b]);
    std::sort(first, last, [](double p, double q) { return order_key(p) < order_key(q); });
    for (; j < k && want[j] < start[b + 1]; ++j) out[j] = first[want[j] - start[b]];
  }
  return true;
}

}  // namespace

namespace {
std::atomic<int64_t> g_select_stride{QuantileSketch::kSelectStride};
}  // namespace

void QuantileSketch::set_select_stride(int64_t stride) {
  FASTML_CHECK_ARG(stride >= 2, "stride", "must be at least 2, got ", stride);
  g_select_stride.store(stride, std::memory_order_relaxed);
}

int64_t QuantileSketch::select_stride() {
  return g_select_stride.load(std::memory_order_relaxed);
}

void QuantileSketch::update_run(double* x, int64_t n, bool float32_exact, double lo, double hi) {
  if (n < 4 * capacity(0)) {  // small batches: the item-by-item path
    update_many(x, n);
    return;
  }
  n_ += static_cast<uint64_t>(n);
  // The compaction is planned on ranks first: which items of the sorted run
  // stay is fixed by the run's length, the levels' sizes and capacities and
  // the random offsets, not by the values. The run's ranks stay an arithmetic
  // progression base + stride * i (i < m): an odd item (rank `base`) stays at
  // its level, then every other item, from a random offset, moves up.
  struct Peel {
    int level;
    int64_t rank;
  };
  Peel peels[kMaxLevels];
  int npeels = 0;
  int h = 0;
  int64_t base = 0, stride = 1, m = n;
  while (static_cast<int64_t>(levels_[h].size()) + m >= capacity(h)) {
    if (m & 1) {
      peels[npeels++] = {h, base};
      base += stride;
      --m;
    }
    const int64_t offset = static_cast<int64_t>(next_random() & 1u);
    base += offset * stride;
    stride *= 2;
    m /= 2;
    const double w = std::ldexp(1.0, h);
    err_sum_ += w * w;
    ++h;
    if (h >= num_levels()) {
      FASTML_ASSERT(num_levels() < kMaxLevels);
      levels_.emplace_back();
      refresh_capacities();
    }
    if (m == 0) break;
  }
  // The items at those ranks: selected when they are few (after a few
  // halvings, one rank in 2^halvings), else the whole run sorted.
  thread_local std::vector<int64_t> want;
  thread_local std::vector<double> got;
  want.clear();
  for (int p = 0; p < npeels; ++p) want.push_back(peels[p].rank);
  for (int64_t i = 0; i < m; ++i) want.push_back(base + stride * i);  // ascending, after the peels
  got.resize(want.size());
  if (stride < select_stride() ||
      !select_ranks(x, n, want.data(), static_cast<int64_t>(want.size()), got.data(), lo, hi)) {
    if (float32_exact) {
      radix_sort_f32(x, n);
    } else {
      radix_sort(x, n);
    }
    for (size_t i = 0; i < want.size(); ++i) got[i] = x[want[i]];
  }
  for (int p = 0; p < npeels; ++p) levels_[peels[p].level].push_back(got[p]);
  levels_[h].insert(levels_[h].end(), got.begin() + npeels, got.end());
  compress();
}

namespace {

// Sorts a level's items. Level 0 holds few items in arrival order (a plain
// insertion sort beats std::sort's there); higher levels are a few sorted runs
// appended one after another (compacted output is sorted), merged in place.
// Any correct sort gives the same sequence, so the sketch is unchanged.
void sort_items(std::vector<double>& v) {
  const size_t n = v.size();
  if (n <= 24) {
    for (size_t i = 1; i < n; ++i) {
      const double x = v[i];
      size_t j = i;
      for (; j > 0 && v[j - 1] > x; --j) v[j] = v[j - 1];
      v[j] = x;
    }
    return;
  }
  size_t starts[4];
  size_t runs = 0;
  for (size_t i = 1; i < n; ++i) {
    if (v[i] < v[i - 1]) {
      if (runs == 4) {
        std::sort(v.begin(), v.end());
        return;
      }
      starts[runs++] = i;
    }
  }
  // Merge the runs left to right: [0, s0) with [s0, s1), then with [s1, s2), ...
  for (size_t r = 0; r < runs; ++r) {
    const size_t end = r + 1 < runs ? starts[r + 1] : n;
    std::inplace_merge(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(starts[r]),
                       v.begin() + static_cast<std::ptrdiff_t>(end));
  }
}

}  // namespace

void QuantileSketch::compact_level(int h) {
  if (h + 1 >= num_levels()) {
    FASTML_ASSERT(num_levels() < kMaxLevels);
    levels_.emplace_back();  // before taking references: this may reallocate
    refresh_capacities();
  }
  auto& items = levels_[h];
  auto& up = levels_[h + 1];
  sort_items(items);
  // An odd item stays behind so the compacted pairs keep the total weight.
  const size_t pairs = items.size() / 2;
  const size_t keep = items.size() - 2 * pairs;
  const size_t offset = next_random() & 1u;
  for (size_t p = 0; p < pairs; ++p) up.push_back(items[keep + 2 * p + offset]);
  const double w = std::ldexp(1.0, h);
  err_sum_ += w * w;
  items.resize(keep);
}

void QuantileSketch::compress() {
  // Repeat: compacting one level may overfill the next, and a new top level
  // shrinks the capacities below it.
  bool over = true;
  while (over) {
    over = false;
    for (int h = 0; h < num_levels(); ++h) {
      if (static_cast<int64_t>(levels_[h].size()) >= capacity(h)) {
        compact_level(h);
        over = true;
      }
    }
  }
}

void QuantileSketch::merge(const QuantileSketch& other) {
  FASTML_CHECK_ARG(other.k_ == k_, "other", "must be a sketch with k=", k_, ", got k=", other.k_);
  while (num_levels() < other.num_levels()) levels_.emplace_back();
  refresh_capacities();
  for (int h = 0; h < other.num_levels(); ++h) {
    levels_[h].insert(levels_[h].end(), other.levels_[h].begin(), other.levels_[h].end());
  }
  n_ += other.n_;
  err_sum_ += other.err_sum_;
  thin_var_ += other.thin_var_;
  rng_ ^= other.rng_ * 0x2545f4914f6cdd1dull;
  compress();
}

void QuantileSketch::clear() {
  levels_.assign(1, {});
  refresh_capacities();
  n_ = 0;
  err_sum_ = 0.0;
  thin_var_ = 0.0;
}

void QuantileSketch::thin(double f) {
  FASTML_CHECK_ARG(f >= 0 && f <= 1, "factor", "must be in [0, 1], got ", f);
  if (f == 1.0 || n_ == 0) return;
  if (f == 0.0) {
    clear();
    return;
  }
  // Systematic sampling per level: sort the level, draw u in [0, 1), keep
  // item i when floor((i + 1) f + u) > floor(i f + u). Of the first j items
  // floor(j f + u) survive: the error of any rank is below one item, has
  // mean zero and variance frac(j f)(1 - frac(j f)) <= min(1/4, j f (1 - f)).
  double var = 0.0;
  uint64_t total = 0;
  for (int h = 0; h < num_levels(); ++h) {
    auto& items = levels_[h];
    if (items.empty()) continue;
    const double w = std::ldexp(1.0, h);
    const double m = static_cast<double>(items.size());
    var += w * w * std::min(0.25, m * f * (1.0 - f));
    std::sort(items.begin(), items.end());
    const double u = static_cast<double>(next_random() >> 11) * 0x1p-53;
    size_t out = 0;
    double prev = std::floor(u);
    for (size_t i = 0; i < items.size(); ++i) {
      const double next = std::floor(static_cast<double>(i + 1) * f + u);
      if (next > prev) items[out++] = items[i];
      prev = next;
    }
    items.resize(out);
    total += static_cast<uint64_t>(out) << h;
  }
  // Earlier errors (in weight units) shrink with the weights.
  err_sum_ *= f * f;
  thin_var_ = f * f * thin_var_ + var;
  n_ = total;
}

int64_t QuantileSketch::num_items() const {
  int64_t t = 0;
  for (const auto& l : levels_) t += static_cast<int64_t>(l.size());
  return t;
}

double QuantileSketch::rank_error() const {
  if (n_ == 0) return 0.0;
  const double delta = 0.01, L = std::log(2.0 / delta);
  const double compaction = std::sqrt(2.0 * L * err_sum_);
  if (thin_var_ <= 0.0) return compaction / static_cast<double>(n_);
  // Bernstein for the thinning terms (zero mean, total variance at most
  // thin_var_, each below the heaviest item's weight), once for the query's
  // weight and once for the normalising total.
  int top = 0;
  for (int h = 0; h < num_levels(); ++h)
    if (!levels_[h].empty()) top = h;
  const double a = L * std::ldexp(1.0, top) / 3.0;
  const double thinning = a + std::sqrt(a * a + 2.0 * L * thin_var_);
  return (compaction + 2.0 * thinning) / static_cast<double>(n_);
}

void QuantileSketch::sorted_items(std::vector<double>* items, std::vector<double>* weights) const {
  std::vector<std::pair<double, double>> all;
  all.reserve(static_cast<size_t>(num_items()));
  for (int h = 0; h < num_levels(); ++h) {
    const double w = std::ldexp(1.0, h);
    for (double x : levels_[h]) all.emplace_back(x, w);
  }
  std::sort(all.begin(), all.end());
  items->resize(all.size());
  weights->resize(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    (*items)[i] = all[i].first;
    (*weights)[i] = all[i].second;
  }
}

void QuantileSketch::restore(uint64_t n, double err_sum, double thin_var, uint64_t rng,
                             std::vector<std::vector<double>> levels) {
  FASTML_CHECK_ARG(!levels.empty() && static_cast<int>(levels.size()) <= kMaxLevels, "data",
                   "has a sketch with ", levels.size(), " levels; expected 1..", kMaxLevels);
  levels_ = std::move(levels);
  refresh_capacities();
  uint64_t total = 0;
  for (int h = 0; h < num_levels(); ++h) {
    FASTML_CHECK_ARG(static_cast<int64_t>(levels_[h].size()) < capacity(h), "data",
                     "has a sketch level over its capacity (corrupted)");
    total += static_cast<uint64_t>(levels_[h].size()) << h;
  }
  FASTML_CHECK_ARG(total == n, "data", "has a sketch whose weights (", total,
                   ") do not add up to its count (", n, ")");
  FASTML_CHECK_ARG(thin_var >= 0 && std::isfinite(thin_var), "data",
                   "has a sketch with a bad thinning variance (corrupted)");
  n_ = n;
  err_sum_ = err_sum;
  thin_var_ = thin_var;
  rng_ = rng;
}

}  // namespace fastml::drift
