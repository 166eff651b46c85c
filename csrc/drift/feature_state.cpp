#include "drift/feature_state.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTML_DRIFT_AVX2 1
#endif

#include "common/cpu_features.hpp"
#include "common/dtype.hpp"
#include "common/errors.hpp"
#include "common/thread_pool.hpp"
#include "drift/two_sample.hpp"

namespace fastml::drift {

// ------------------------------------------------------------------ BinLookup

BinLookup::BinLookup(const std::vector<double>& edges) : edges_(edges) {
  FASTML_ASSERT(edges.size() >= 2);
  nbins_ = static_cast<int64_t>(edges.size()) - 1;
  lo_ = edges.front();
  hi_ = edges.back();
  // About 512 grid cells per bin (at least 4096, at most 2^16): equal-mass
  // bins are narrow where data is dense, and only cells that hold an edge need
  // the comparison loop (measured on normal values: ~12% at 64 cells per bin,
  // ~1.7% at 256, ~0.9% at 512, where float32 ingest ran 7% faster than at
  // 256). One int32 per cell: 40 KB for 20 bins, shared by the profiles and
  // windows made from one reference.
  grid_ = std::min<int64_t>(1 << 16, std::max<int64_t>(4096, 512 * nbins_));
  const double range = hi_ - lo_;
  scale_ = range > 0 && std::isfinite(static_cast<double>(grid_) / range)
               ? static_cast<double>(grid_) / range
               : 0.0;
  // The bin holding each cell's start.
  std::vector<int32_t> start(static_cast<size_t>(grid_));
  int64_t b = 0;
  for (int64_t c = 0; c < grid_; ++c) {
    const double cell_lo = scale_ > 0 ? lo_ + static_cast<double>(c) / scale_ : lo_;
    while (b + 1 < nbins_ && edges_[b + 1] <= cell_lo) ++b;
    start[c] = static_cast<int32_t>(b);
  }
  // A cell is "clean" when every x that maps to it lies in one bin, so the
  // lookup needs no comparison. The index (x - lo) * scale is off by at most
  // ~1e-12 cells (two roundings, grid <= 2^16), so a margin of 1e-6 of a cell
  // on each side is safe. The cells at lo and hi are always dirty: the
  // vector path (chunk_f32_avx2) sends values just outside [lo, hi] there and
  // relies on slot()'s checks.
  ext_.resize(static_cast<size_t>(grid_) + 3);
  ext_[0] = 0;
  for (int64_t c = 0; c < grid_; ++c) {
    const int64_t bin = start[c];
    bool clean = false;
    if (scale_ > 0) {
      const double a = lo_ + (static_cast<double>(c) - 1e-6) / scale_;
      const double z = lo_ + (static_cast<double>(c) + 1.0 + 1e-6) / scale_;
      clean = edges_[bin] < a && edges_[bin + 1] > z;
    }
    ext_[c + 1] = clean ? start[c] + 1 : ~start[c];
  }
  ext_[grid_ + 1] = ~static_cast<int32_t>(nbins_ - 1);  // at or just past hi: slot() decides
  ext_[grid_ + 2] = static_cast<int32_t>(nbins_ + 1);   // a whole cell past hi: overflow
  if (nbins_ + 1 <= kMaxCmpEdges) {
    // The smallest float >= e (x >= e <=> x >= it for every float x).
    auto ceil_f = [](double e) {
      float f = static_cast<float>(e);
      if (static_cast<double>(f) < e) f = std::nextafter(f, std::numeric_limits<float>::infinity());
      return f;
    };
    cmp_keys_.resize(static_cast<size_t>(8 * (nbins_ + 1)));
    for (int64_t i = 0; i <= nbins_; ++i) {
      float t = ceil_f(edges_[i]);
      if (i == nbins_ && static_cast<double>(t) == hi_) {  // the last bin is closed: x > hi
        t = std::nextafter(t, std::numeric_limits<float>::infinity());
      }
      if (t == 0) t = -0.0f;
      int32_t bits;
      std::memcpy(&bits, &t, sizeof bits);
      const int32_t key = bits ^ ((bits >> 31) & 0x7fffffff);
      for (int j = 0; j < 8; ++j) cmp_keys_[static_cast<size_t>(8 * i + j)] = key - 1;
    }
  }
}

// ------------------------------------------------------------------ NumericState

NumericState::NumericState(std::vector<double> e, QuantileMode m, int sketch_k)
    : edges(std::move(e)), mode(m) {
  FASTML_CHECK_ARG(edges.size() >= 2, "edges", "must hold at least 2 values, got ", edges.size());
  for (size_t i = 0; i < edges.size(); ++i) {
    FASTML_CHECK_ARG(std::isfinite(edges[i]), "edges", "must be finite, got ", edges[i]);
    if (i) {
      FASTML_CHECK_ARG(edges[i] > edges[i - 1] || (edges.size() == 2 && edges[1] == edges[0]),
                       "edges", "must increase strictly, got ", edges[i - 1], " then ", edges[i]);
    }
  }
  hist.assign(edges.size() + 1, 0.0);
  if (mode == QuantileMode::Sketch) sketch = std::make_unique<QuantileSketch>(sketch_k);
  rebuild_lookup();
}

NumericState::NumericState(const NumericState& o)
    : count(o.count),
      count_sq(o.count_sq),
      missing(o.missing),
      nonfinite(o.nonfinite),
      mean(o.mean),
      m2(o.m2),
      min(o.min),
      max(o.max),
      edges(o.edges),
      hist(o.hist),
      mode(o.mode),
      values(o.values),
      sorted(o.sorted),
      decayed(o.decayed),
      decay_exp(o.decay_exp),
      pruned_at(o.pruned_at),
      vexp(o.vexp),
      sketch(o.sketch ? std::make_unique<QuantileSketch>(*o.sketch) : nullptr),
      lookup(o.lookup) {}

void NumericState::rebuild_lookup() {
  lookup = std::make_shared<const BinLookup>(edges);
}

void NumericState::rebin(std::vector<double> new_edges) {
  FASTML_CHECK_ARG(mode != QuantileMode::None, "profiles",
                   "in histogram mode keep no values to re-bin: build them over the same edges "
                   "(Profile.empty() of one reference) to merge them");
  edges = std::move(new_edges);
  rebuild_lookup();
  hist.assign(static_cast<size_t>(lookup->nbins() + 2), 0.0);
  if (mode == QuantileMode::Exact) {
    // Exact: the histogram of the stored values (each with its decay weight).
    const std::vector<double> w = value_weights();
    for (size_t i = 0; i < values.size(); ++i) {
      hist[static_cast<size_t>(lookup->slot(values[i]))] += w.empty() ? 1.0 : w[i];
    }
    return;
  }
  // Sketch: the histogram of the sketch's weighted items, scaled to the finite
  // count (each bin's share is then within the sketch's rank error).
  std::vector<double> items, weights;
  sketch->sorted_items(&items, &weights);
  double total = 0;
  for (double wt : weights) total += wt;
  if (total <= 0) return;
  const double f = count / total;
  for (size_t i = 0; i < items.size(); ++i) {
    hist[static_cast<size_t>(lookup->slot(items[i]))] += weights[i] * f;
  }
}

void NumericState::add_moments(double n, double mu, double m2b, double mn, double mx) {
  if (n <= 0) return;
  if (count <= 0) {
    count = n;
    mean = mu;
    m2 = m2b;
    min = mn;
    max = mx;
    return;
  }
  // Chan, Golub and LeVeque's pairwise update.
  const double total = count + n;
  const double delta = mu - mean;
  mean += delta * (n / total);
  m2 += m2b + delta * delta * (count * n / total);
  count = total;
  min = std::min(min, mn);
  max = std::max(max, mx);
}

namespace {

// Read-ahead for strided ingest (ingest_columns): the next block of a
// row-major matrix, prefetched a few lines per step of the count pass while
// the current block computes, so its transpose finds the lines in L2 instead
// of waiting on memory. Per thread (each pool task owns its blocks); empty
// (left == 0) outside ingest_columns.
struct ReadAhead {
  const char* next = nullptr;
  int64_t stride = 0;
  int64_t left = 0;
};
thread_local ReadAhead t_read_ahead;

// Values per chunk of ingest_typed: a chunk's sketch buffer stays in L1.
constexpr int64_t kChunkValues = 4096;

// Raw sums of one chunk, as the scalar loop keeps them.
struct ChunkSums {
  double sum = 0, sq = 0;
  double mn = std::numeric_limits<double>::infinity();
  double mx = -std::numeric_limits<double>::infinity();
  int64_t cnt = 0, nan_count = 0, inf_count = 0, kept = 0;
};

#ifdef FASTML_DRIFT_AVX2
// Contiguous (or strided: gathered first) float32 chunk, 8 values per group,
// in one or two passes over the chunk (4096 values: 16 KB, in L1).
//
// Pass 1 (moments_pass): finiteness test, extremes on the floats,
// float->double, shifted moments in AVX2 registers (two sets of two lanes of
// four, alternating groups, so the FMA chains overlap), the exact or sketch
// values; a group of eight holding a NaN or an infinity goes value by value.
// With Table (more than kMaxCmpEdges edges), pass 1 also bins: the grid cell
// clamped to [-1, grid + 1] (so underflow and overflow need no compare) and
// its slot read from the extended table with eight scalar loads into
// registers, checked for "dirty" with one OR of the eight (~18% faster than a
// vpgatherdd and a sign mask on Zen 3); only values in a cell holding an edge
// (~1%, including the cells at lo and hi, where rounding may put a value just
// outside [lo, hi]) take the scalar slot(). Increments rotate over four
// sub-histograms.
//
// Pass 2 (count_pass, at most kMaxCmpEdges edges, the default 20 bins among
// them): no table at all; every value is compared with every edge and the
// comparison masks of four edges are packed into bytes and summed, eight
// vector operations per four edges and eight values, no memory access but the
// thresholds. The per-edge counts "x >= edge" give the histogram by
// differences. Two passes in two functions, because one loop needed ~17
// vector registers and spilled the moment lanes (each step then waited on a
// store-to-load round trip): 2-D float32 ingest ran at ~925 M values/s in one
// loop and ~1.3 G in two (this VM's Zen 2, contiguous columns).
#define FASTML_LOAD8(i)                                                                        \
  (contiguous ? _mm256_loadu_ps(reinterpret_cast<const float*>(base + (i) * stride))           \
              : _mm256_set_ps(at((i) + 7), at((i) + 6), at((i) + 5), at((i) + 4), at((i) + 3), \
                              at((i) + 2), at((i) + 1), at(i)))

template <bool Store, bool Table>
__attribute__((target("avx2,fma"), noinline)) void moments_pass(const char* base, int64_t stride,
                                                                int64_t m, double pivot,
                                                                const BinLookup& lk, uint32_t* hist,
                                                                int64_t slots, double* out,
                                                                ChunkSums& r, int64_t& posbig) {
  const int32_t* ext = lk.ext_table();
  const __m256d vlo = _mm256_set1_pd(lk.lo());
  const __m256d vscale = _mm256_set1_pd(lk.scale()), vpiv = _mm256_set1_pd(pivot);
  const __m256d vzero = _mm256_setzero_pd(), vone = _mm256_set1_pd(1.0);
  const __m256d vneg = _mm256_set1_pd(-1.0);
  const __m256d vtop = _mm256_set1_pd(static_cast<double>(lk.grid() + 1));
  const __m256 vinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256d s0 = vzero, s1 = vzero, q0 = vzero, q1 = vzero;
  __m256d s2 = vzero, s3 = vzero, q2 = vzero, q3 = vzero;
  __m256 mnf = vinf, mxf = _mm256_sub_ps(_mm256_setzero_ps(), vinf);
  uint32_t* h0 = hist;
  uint32_t* h1 = hist + slots;
  uint32_t* h2 = hist + 2 * slots;
  uint32_t* h3 = hist + 3 * slots;
  int64_t cnt = 0, nan_count = 0, inf_count = 0, big = 0, kept = 0;
  double ssum = 0, ssq = 0, smn = r.mn, smx = r.mx;  // the scalar lane (odd values)
  // `binned`: false for the full groups' values when pass 2 counts them.
  auto scalar_one = [&](double v, bool binned) {
    if (std::isfinite(v)) {
      if (binned) ++h0[lk.slot(v)];
      const double d = v - pivot;
      ssum += d;
      ssq += d * d;
      smn = v < smn ? v : smn;
      smx = v > smx ? v : smx;
      ++cnt;
      if (Store) out[kept++] = v;
      return;
    }
    if (std::isnan(v)) {
      ++nan_count;
    } else {
      ++inf_count;
    }
    // Pass 2 counts these in every edge's "x >= edge" (see count_pass).
    if (!binned) big += v > 0 || (std::isnan(v) && !std::signbit(v));
  };
  // Strided columns gather their 8 values first: the arithmetic, and so the
  // rounding, is the same as for a contiguous copy of the column.
  auto at = [&](int64_t k) { return *reinterpret_cast<const float*>(base + k * stride); };
  const bool contiguous = stride == static_cast<int64_t>(sizeof(float));
  alignas(32) float xs[8];
  const int64_t full = m / 8 * 8;  // values in full groups of eight
  // One group of eight into the lane set (S_, T_, Q_, R_); false when it holds
  // a NaN or an infinity (then done value by value).
#define FASTML_GROUP(i, S_, T_, Q_, R_)                                                       \
  do {                                                                                        \
    const __m256 xf = FASTML_LOAD8(i);                                                        \
    /* x - x is 0 for finite x and NaN for NaN or inf. */                                     \
    const __m256 fin = _mm256_cmp_ps(_mm256_sub_ps(xf, xf), _mm256_setzero_ps(), _CMP_EQ_OQ); \
    if (_mm256_movemask_ps(fin) != 0xff) {                                                    \
      bad[nbad++] = static_cast<int32_t>(i);                                                  \
      (void)0;                                                                                \
      break;                                                                                  \
    }                                                                                         \
    const __m256d xa = _mm256_cvtps_pd(_mm256_castps256_ps128(xf));                           \
    const __m256d xb = _mm256_cvtps_pd(_mm256_extractf128_ps(xf, 1));                         \
    const __m256d da = _mm256_sub_pd(xa, vpiv), db = _mm256_sub_pd(xb, vpiv);                 \
    S_ = _mm256_add_pd(S_, da);                                                               \
    T_ = _mm256_add_pd(T_, db);                                                               \
    Q_ = _mm256_fmadd_pd(da, da, Q_);                                                         \
    R_ = _mm256_fmadd_pd(db, db, R_);                                                         \
    mnf = _mm256_min_ps(mnf, xf);                                                             \
    mxf = _mm256_max_ps(mxf, xf);                                                             \
    cnt += 8;                                                                                 \
    if (Store) {                                                                              \
      _mm256_storeu_pd(out + kept, xa);                                                       \
      _mm256_storeu_pd(out + kept + 4, xb);                                                   \
      kept += 8;                                                                              \
    }                                                                                         \
    if constexpr (Table) FASTML_TABLE_BINS(xa, xb, xf);                                       \
  } while (0)
  // Table index: trunc(clamp((x - lo) * scale, -1, grid + 1) + 1), so 0
  // below lo (x < lo gives a negative product), cell + 1 inside, grid + 1
  // at or just past hi (dirty), grid + 2 a whole cell past hi (overflow).
#define FASTML_TABLE_BINS(xa, xb, xf)                                                       \
  do {                                                                                      \
    __m256d ca = _mm256_mul_pd(_mm256_sub_pd(xa, vlo), vscale);                             \
    __m256d cb = _mm256_mul_pd(_mm256_sub_pd(xb, vlo), vscale);                             \
    ca = _mm256_add_pd(_mm256_min_pd(_mm256_max_pd(ca, vneg), vtop), vone);                 \
    cb = _mm256_add_pd(_mm256_min_pd(_mm256_max_pd(cb, vneg), vtop), vone);                 \
    const __m256i idx = _mm256_set_m128i(_mm256_cvttpd_epi32(cb), _mm256_cvttpd_epi32(ca)); \
    alignas(32) int32_t ix[8];                                                              \
    _mm256_store_si256(reinterpret_cast<__m256i*>(ix), idx);                                \
    int32_t e[8];                                                                           \
    for (int k = 0; k < 8; ++k) e[k] = ext[ix[k]];                                          \
    /* A dirty cell's entry is negative. */                                                 \
    if ((e[0] | e[1] | e[2] | e[3] | e[4] | e[5] | e[6] | e[7]) < 0) {                      \
      _mm256_store_ps(xs, xf);                                                              \
      for (int k = 0; k < 8; ++k)                                                           \
        if (e[k] < 0) e[k] = static_cast<int32_t>(lk.slot(xs[k]));                          \
    }                                                                                       \
    ++h0[e[0]];                                                                             \
    ++h1[e[1]];                                                                             \
    ++h2[e[2]];                                                                             \
    ++h3[e[3]];                                                                             \
    ++h0[e[4]];                                                                             \
    ++h1[e[5]];                                                                             \
    ++h2[e[6]];                                                                             \
    ++h3[e[7]];                                                                             \
  } while (0)
  // Groups holding a NaN or an infinity go value by value after the loop:
  // a call inside it (even on a cold branch) made the compiler keep every
  // vector lane in memory, since no vector register survives a call.
  FASTML_ASSERT(m <= kChunkValues);
  int32_t bad[kChunkValues / 8];
  int64_t nbad = 0;
  int64_t i = 0;
  for (; i + 16 <= full; i += 16) {
    FASTML_GROUP(i, s0, s1, q0, q1);
    FASTML_GROUP(i + 8, s2, s3, q2, q3);
  }
  if (i < full) FASTML_GROUP(i, s0, s1, q0, q1);
#undef FASTML_GROUP
#undef FASTML_TABLE_BINS
  for (int64_t b = 0; b < nbad; ++b) {
    for (int64_t k = bad[b]; k < bad[b] + 8; ++k) scalar_one(static_cast<double>(at(k)), Table);
  }
  for (i = full; i < m; ++i) scalar_one(static_cast<double>(at(i)), true);
  alignas(32) double tmp[4];
  _mm256_store_pd(tmp, _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
  r.sum = ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ssum;
  _mm256_store_pd(tmp, _mm256_add_pd(_mm256_add_pd(q0, q1), _mm256_add_pd(q2, q3)));
  r.sq = ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ssq;
  alignas(32) float ftmp[8];
  double vmn = smn, vmx = smx;  // float -> double is exact and monotone
  _mm256_store_ps(ftmp, mnf);
  for (float f : ftmp) vmn = std::min(vmn, static_cast<double>(f));
  _mm256_store_ps(ftmp, mxf);
  for (float f : ftmp) vmx = std::max(vmx, static_cast<double>(f));
  r.mn = vmn;
  r.mx = vmx;
  r.cnt = cnt;
  r.nan_count = nan_count;
  r.inf_count = inf_count;
  r.kept = kept;
  posbig = big;
}

// Pass 2 over the first `full` values (a multiple of 8), on integer keys: a
// float's bits with the magnitude bits flipped when negative order like the
// floats as int32, compared with BinLookup::cmp_keys() (built once per
// lookup). Integer compares measured at least as fast as float compares here
// (mixing the two, half the edges each, was within noise). +inf and NaN with
// the sign bit clear pass every threshold (the caller subtracts them), -inf
// and NaN with the sign bit set pass none. ge[k] += the count of keys above
// threshold k.
template <int G, int R>
__attribute__((target("avx2"), noinline)) void count_pass(const char* base, int64_t stride,
                                                          int64_t full, const BinLookup& lk,
                                                          int64_t* ge) {
  FASTML_ASSERT(lk.cmp_edges() == 4 * G + R);
  const int32_t* bt = lk.cmp_keys();  // key(threshold) - 1 per edge, eight lanes each
  auto at = [&](int64_t k) { return *reinterpret_cast<const float*>(base + k * stride); };
  const bool contiguous = stride == static_cast<int64_t>(sizeof(float));
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
#define FASTML_KEY8(dst, i)                                        \
  const __m256i dst##_bits = _mm256_castps_si256(FASTML_LOAD8(i)); \
  const __m256i dst =                                              \
      _mm256_xor_si256(dst##_bits, _mm256_and_si256(_mm256_srai_epi32(dst##_bits, 31), magnitude))
#define FASTML_THR(k) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + (k) * 8))
  ReadAhead ra = t_read_ahead;
  for (int64_t i = 0; i < full;) {
    // Each group of eight adds at most one to a byte: widen every 255.
    const int64_t stop = std::min(full, i + 255 * 8);
    __m256i acc[G > 0 ? G : 1];
    for (auto& a : acc) a = _mm256_setzero_si256();
    // The last R edges (kEdges mod 4) count in int32 lanes: no padding edges.
    __m256i rem[R > 0 ? R : 1];
    for (auto& a : rem) a = _mm256_setzero_si256();
    // Two groups of eight per step share each threshold's load. Bytes 0-3 of
    // each 128-bit half of acc[g] count edge 4g, bytes 4-7 edge 4g + 1, ...
    for (; i + 16 <= stop; i += 16) {
      if (ra.left > 0) {  // two lines per step: a block's rows over one unit's passes
        __builtin_prefetch(ra.next, 0, 3);
        __builtin_prefetch(ra.next + ra.stride, 0, 3);
        ra.next += 2 * ra.stride;
        ra.left -= 2;
      }
      FASTML_KEY8(ka, i);
      FASTML_KEY8(kb, i + 8);
      for (int g = 0; g < G; ++g) {
        const __m256i t0 = FASTML_THR(4 * g), t1 = FASTML_THR(4 * g + 1);
        const __m256i t2 = FASTML_THR(4 * g + 2), t3 = FASTML_THR(4 * g + 3);
        const __m256i la =
            _mm256_packs_epi32(_mm256_cmpgt_epi32(ka, t0), _mm256_cmpgt_epi32(ka, t1));
        const __m256i ha =
            _mm256_packs_epi32(_mm256_cmpgt_epi32(ka, t2), _mm256_cmpgt_epi32(ka, t3));
        const __m256i lb =
            _mm256_packs_epi32(_mm256_cmpgt_epi32(kb, t0), _mm256_cmpgt_epi32(kb, t1));
        const __m256i hb =
            _mm256_packs_epi32(_mm256_cmpgt_epi32(kb, t2), _mm256_cmpgt_epi32(kb, t3));
        acc[g] = _mm256_sub_epi8(acc[g], _mm256_packs_epi16(la, ha));  // -(-1) = +1
        acc[g] = _mm256_sub_epi8(acc[g], _mm256_packs_epi16(lb, hb));
      }
      for (int k = 0; k < R; ++k) {
        const __m256i t = FASTML_THR(4 * G + k);
        rem[k] = _mm256_sub_epi32(
            rem[k], _mm256_add_epi32(_mm256_cmpgt_epi32(ka, t), _mm256_cmpgt_epi32(kb, t)));
      }
    }
    for (; i < stop; i += 8) {
      FASTML_KEY8(ka, i);
      for (int g = 0; g < G; ++g) {
        const __m256i la = _mm256_packs_epi32(_mm256_cmpgt_epi32(ka, FASTML_THR(4 * g)),
                                              _mm256_cmpgt_epi32(ka, FASTML_THR(4 * g + 1)));
        const __m256i ha = _mm256_packs_epi32(_mm256_cmpgt_epi32(ka, FASTML_THR(4 * g + 2)),
                                              _mm256_cmpgt_epi32(ka, FASTML_THR(4 * g + 3)));
        acc[g] = _mm256_sub_epi8(acc[g], _mm256_packs_epi16(la, ha));
      }
      for (int k = 0; k < R; ++k) {
        rem[k] = _mm256_sub_epi32(rem[k], _mm256_cmpgt_epi32(ka, FASTML_THR(4 * G + k)));
      }
    }
    // Widen: byte pairs to 16 bits, then pairs of those to 32 bits; lane j
    // of each half is then edge 4g + j.
    for (int g = 0; g < G; ++g) {
      alignas(32) int32_t w[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(w),
                         _mm256_madd_epi16(_mm256_maddubs_epi16(acc[g], ones8), ones16));
      for (int j = 0; j < 4; ++j) ge[4 * g + j] += w[j] + w[4 + j];
    }
    for (int k = 0; k < R; ++k) {
      alignas(32) int32_t w[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(w), rem[k]);
      for (int j = 0; j < 8; ++j) ge[4 * G + k] += w[j];
    }
  }
#undef FASTML_THR
#undef FASTML_KEY8
  t_read_ahead = ra;
}
#undef FASTML_LOAD8

// E > 0: 2..kMaxCmpEdges edges, counted by count_pass; E == 0: the table.
template <bool Store, int E>
void chunk_f32_avx2(const char* base, int64_t stride, int64_t m, double pivot, const BinLookup& lk,
                    uint32_t* hist, int64_t slots, double* out, ChunkSums& r) {
  static_assert(E == 0 || (E >= 2 && E <= BinLookup::kMaxCmpEdges), "2..kMaxCmpEdges edges");
  int64_t posbig = 0;
  moments_pass<Store, E == 0>(base, stride, m, pivot, lk, hist, slots, out, r, posbig);
  if constexpr (E > 0) {
    const int64_t full = m / 8 * 8;
    int64_t ge[E] = {};
    count_pass<E / 4, E % 4>(base, stride, full, lk, ge);
    // The full groups' finite values: all finite values but the tail's.
    int64_t full_finite = r.cnt;
    for (int64_t i = full; i < m; ++i) {
      full_finite -= std::isfinite(*reinterpret_cast<const float*>(base + i * stride));
    }
    // Slot 0 holds x < edge 0, slot k edge k - 1 <= x < edge k, the last x > hi.
    const int64_t nb = lk.nbins();
    for (int64_t k = 0; k <= nb; ++k) ge[k] -= posbig;
    hist[0] += static_cast<uint32_t>(full_finite - ge[0]);
    for (int64_t k = 1; k <= nb; ++k) hist[k] += static_cast<uint32_t>(ge[k - 1] - ge[k]);
    hist[nb + 1] += static_cast<uint32_t>(ge[nb]);
  }
}

// The compare path while the edges fit kMaxCmpEdges (the default 20 bins: 21
// edges), the table path beyond.
template <bool Store>
void chunk_f32_dispatch(const char* base, int64_t stride, int64_t m, double pivot,
                        const BinLookup& lk, uint32_t* hist, int64_t slots, double* out,
                        ChunkSums& r) {
  switch (lk.cmp_edges()) {
#define FASTML_CASE(e) \
  case e: return chunk_f32_avx2<Store, e>(base, stride, m, pivot, lk, hist, slots, out, r);
#define FASTML_CASE4(e) FASTML_CASE(e) FASTML_CASE(e + 1) FASTML_CASE(e + 2) FASTML_CASE(e + 3)
    FASTML_CASE(2)
    FASTML_CASE(3)
    FASTML_CASE4(4)
    FASTML_CASE4(8)
    FASTML_CASE4(12)
    FASTML_CASE4(16)
    FASTML_CASE4(20)
    FASTML_CASE4(24)
    FASTML_CASE4(28)
    FASTML_CASE(32)
#undef FASTML_CASE4
#undef FASTML_CASE
    default: return chunk_f32_avx2<Store, 0>(base, stride, m, pivot, lk, hist, slots, out, r);
  }
}
#endif

// One pass per chunk with every accumulator in a register: no calls inside
// the loop (exact values go to a pre-sized buffer, sketch updates are batched
// after the chunk), so the compiler keeps x, the sums and the extremes out of
// memory. 4096 values per chunk keep the chunk's sketch buffer in L1.
template <typename T, QuantileMode Mode>
void ingest_typed(NumericState& s, const char* base, int64_t n, int64_t stride) {
  const BinLookup& lk = *s.lookup;
  const int64_t slots = lk.nbins() + 2;
  constexpr int64_t kChunk = kChunkValues;
  std::vector<uint32_t> local(static_cast<size_t>(4 * slots));
  std::vector<double> sketch_buf(Mode == QuantileMode::Sketch ? kChunk : 0);
  size_t nvalues = s.values.size();
  if (Mode == QuantileMode::Exact) s.values.resize(nvalues + static_cast<size_t>(n));
  double missing = 0, nonfinite = 0;
  [[maybe_unused]] const bool use_avx2 = cpu_features().avx2 && cpu_features().fma;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    std::fill(local.begin(), local.end(), 0u);
    uint32_t* hist = local.data();
    double* out = Mode == QuantileMode::Exact ? s.values.data() + nvalues : sketch_buf.data();
    // Shifted sums around a pivot near the mean keep the one-pass variance
    // accurate; chunks are then merged with Chan's formula.
    double pivot = s.count > 0 ? s.mean : 0.0;
    if (s.count <= 0) {
      for (int64_t i = start; i < end; ++i) {
        const double x = load_as_double(*reinterpret_cast<const T*>(base + i * stride));
        if (std::isfinite(x)) {
          pivot = x;
          break;
        }
      }
    }
    // Four independent accumulator lanes (named scalars, so they live in
    // registers) and four sub-histograms break the loop-carried dependencies
    // (add/min/max latency, store forwarding on a repeated bin) that bound a
    // single-lane loop to ~4 cycles per value.
    const double inf = std::numeric_limits<double>::infinity();
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
    double mn0 = inf, mn1 = inf, mn2 = inf, mn3 = inf;
    double mx0 = -inf, mx1 = -inf, mx2 = -inf, mx3 = -inf;
    int64_t cnt = 0, nan_count = 0, inf_count = 0, kept = 0;
    const double lo = lk.lo(), hi = lk.hi(), scale = lk.scale();
    const int64_t grid = lk.grid(), overflow = lk.nbins() + 1;
    const int32_t* ext = lk.ext_table();
    uint32_t* h0 = hist;
    uint32_t* h1 = hist + slots;
    uint32_t* h2 = hist + 2 * slots;
    uint32_t* h3 = hist + 3 * slots;
    auto slot_of = [&](double x) -> int64_t {
      if (x >= lo && x <= hi) {
        int64_t c = static_cast<int64_t>((x - lo) * scale);
        c = c >= grid ? grid - 1 : c;
        const int32_t t = ext[c + 1];
        return t >= 0 ? t : lk.search(x, ~t) + 1;
      }
      return x < lo ? 0 : overflow;
    };
#define FASTML_DRIFT_LANE(x, hj, sj, qj, mnj, mxj) \
  do {                                             \
    ++hj[slot_of(x)];                              \
    const double d = (x) - pivot;                  \
    sj += d;                                       \
    qj += d * d;                                   \
    mnj = (x) < mnj ? (x) : mnj;                   \
    mxj = (x) > mxj ? (x) : mxj;                   \
  } while (0)
    auto one = [&](double x) {  // the careful path: lane 0, any value
      if (std::isfinite(x)) {
        FASTML_DRIFT_LANE(x, h0, s0, q0, mn0, mx0);
        ++cnt;
        if (Mode != QuantileMode::None) out[kept++] = x;
      } else if (std::isnan(x)) {
        ++nan_count;
      } else {
        ++inf_count;
      }
    };
    int64_t i = start;
#ifdef FASTML_DRIFT_AVX2
    if constexpr (std::is_same_v<T, float>) {
      if (use_avx2) {
        ChunkSums r;
        chunk_f32_dispatch<Mode != QuantileMode::None>(base + start * stride, stride, end - start,
                                                       pivot, lk, hist, slots, out, r);
        s0 = r.sum;
        q0 = r.sq;
        mn0 = r.mn;
        mx0 = r.mx;
        cnt = r.cnt;
        nan_count = r.nan_count;
        inf_count = r.inf_count;
        kept = r.kept;
        i = end;
      }
    }
#endif
    for (; i + 4 <= end; i += 4) {
      const double x0 = load_as_double(*reinterpret_cast<const T*>(base + i * stride));
      const double x1 = load_as_double(*reinterpret_cast<const T*>(base + (i + 1) * stride));
      const double x2 = load_as_double(*reinterpret_cast<const T*>(base + (i + 2) * stride));
      const double x3 = load_as_double(*reinterpret_cast<const T*>(base + (i + 3) * stride));
      // x - x is 0 for finite x and NaN for NaN or inf.
      if (((x0 - x0) + (x1 - x1)) + ((x2 - x2) + (x3 - x3)) == 0) {
        FASTML_DRIFT_LANE(x0, h0, s0, q0, mn0, mx0);
        FASTML_DRIFT_LANE(x1, h1, s1, q1, mn1, mx1);
        FASTML_DRIFT_LANE(x2, h2, s0, q0, mn0, mx0);
        FASTML_DRIFT_LANE(x3, h3, s1, q1, mn1, mx1);
        cnt += 4;
        if (Mode != QuantileMode::None) {
          out[kept] = x0;
          out[kept + 1] = x1;
          out[kept + 2] = x2;
          out[kept + 3] = x3;
          kept += 4;
        }
      } else {
        one(x0);
        one(x1);
        one(x2);
        one(x3);
      }
    }
#undef FASTML_DRIFT_LANE
    for (; i < end; ++i) one(load_as_double(*reinterpret_cast<const T*>(base + i * stride)));
    for (int64_t k = 0; k < slots; ++k) {
      s.hist[k] += static_cast<double>(h0[k]) + h1[k] + h2[k] + h3[k];
    }
    const double total_sum = (s0 + s1) + (s2 + s3);
    const double total_sq = (q0 + q1) + (q2 + q3);
    const double chunk_min = std::min(std::min(mn0, mn1), std::min(mn2, mn3));
    const double chunk_max = std::max(std::max(mx0, mx1), std::max(mx2, mx3));
    missing += static_cast<double>(nan_count);
    nonfinite += static_cast<double>(inf_count);
    if (Mode == QuantileMode::Exact) nvalues += static_cast<size_t>(kept);
    if (Mode == QuantileMode::Sketch) {
      // The chunk's extremes bound its finite values, which are the run.
      s.sketch->update_run(sketch_buf.data(), kept, std::is_same_v<T, float>, chunk_min, chunk_max);
    }
    if (cnt > 0) {
      const double dc = static_cast<double>(cnt);
      s.count_sq += dc;  // new values weigh 1
      const double mu = total_sum / dc;
      s.add_moments(dc, pivot + mu, std::max(0.0, total_sq - total_sum * mu), chunk_min, chunk_max);
    }
  }
  if (Mode == QuantileMode::Exact) {
    s.values.resize(nvalues);
    if (n > 0) s.sorted = false;
  }
  s.missing += missing;
  s.nonfinite += nonfinite;
}

template <typename T>
void ingest_dispatch(NumericState& s, const char* base, int64_t n, int64_t stride) {
  switch (s.mode) {
    case QuantileMode::None: return ingest_typed<T, QuantileMode::None>(s, base, n, stride);
    case QuantileMode::Exact: return ingest_typed<T, QuantileMode::Exact>(s, base, n, stride);
    case QuantileMode::Sketch: return ingest_typed<T, QuantileMode::Sketch>(s, base, n, stride);
  }
}

}  // namespace

void NumericState::ingest(const ArrayView& view, int64_t column) {
  FASTML_ASSERT(view.ndim == 1 || view.ndim == 2);
  const int64_t n = view.shape[0];
  const char* base = static_cast<const char*>(view.data);
  if (view.ndim == 2) base += column * view.strides[1];
  const int64_t stride = view.strides[0];
  dispatch_dtype(view.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    ingest_dispatch<T>(*this, base, n, stride);
  });
  if (decayed) vexp.resize(values.size(), decay_exp);  // the new values weigh 1
}

void NumericState::ingest_values(const double* x, int64_t n) {
  ingest_dispatch<double>(*this, reinterpret_cast<const char*>(x), n, sizeof(double));
  if (decayed) vexp.resize(values.size(), decay_exp);
}

void NumericState::add_quantile_values(const double* x, int64_t n) {
  if (n <= 0) return;
  if (mode == QuantileMode::Exact) {
    values.insert(values.end(), x, x + n);
    sorted = false;
    if (decayed) vexp.resize(values.size(), decay_exp);
  } else if (mode == QuantileMode::Sketch) {
    sketch->update_many(x, n);
  }
}

void NumericState::merge(const NumericState& o) {
  if (edges != o.edges) {
    size_t k = 0;
    while (k < edges.size() && k < o.edges.size() && edges[k] == o.edges[k]) ++k;
    auto at = [](const std::vector<double>& e, size_t i) {
      return i < e.size() ? detail::concat(e[i]) : std::string("(none)");
    };
    fail<std::invalid_argument>("profiles have different histogram edges: edge ", k, " is ",
                                at(edges, k), " in one and ", at(o.edges, k), " in the other (",
                                edges.size(), " vs ", o.edges.size(), " edges)");
  }
  FASTML_CHECK_ARG(mode == o.mode, "profiles", "have different quantile modes");
  add_moments(o.count, o.mean, o.m2, o.min, o.max);
  count_sq += o.count_sq;
  missing += o.missing;
  nonfinite += o.nonfinite;
  for (size_t i = 0; i < hist.size(); ++i) hist[i] += o.hist[i];
  if (mode == QuantileMode::Exact && !o.values.empty()) {
    if (o.decayed && !decayed) {  // weigh this side's values 1 in this frame
      decayed = true;
      pruned_at = decay_exp;
      vexp.assign(values.size(), decay_exp);
    }
    values.insert(values.end(), o.values.begin(), o.values.end());
    if (decayed) {
      // o's value weighs 2^(e - o.decay_exp) = 2^((e - o.decay_exp + decay_exp) - decay_exp)
      if (o.decayed) {
        for (double e : o.vexp) vexp.push_back(e - o.decay_exp + decay_exp);
      } else {
        vexp.resize(values.size(), decay_exp);
      }
    }
    sorted = false;
  } else if (mode == QuantileMode::Sketch) {
    sketch->merge(*o.sketch);
  }
}

void NumericState::scale(double f) {
  FASTML_CHECK_ARG(f >= 0 && f <= 1, "factor", "must be in [0, 1], got ", f);
  if (f == 1.0) return;
  if (f == 0.0) {  // everything decayed away (a batch of many half-lives)
    clear();
    return;
  }
  count *= f;
  count_sq *= f * f;
  missing *= f;
  nonfinite *= f;
  m2 *= f;
  for (double& h : hist) h *= f;
  if (mode == QuantileMode::Exact) {
    if (!decayed) {
      decayed = true;
      pruned_at = decay_exp;
      vexp.assign(values.size(), decay_exp);
    }
    decay_exp -= std::log2(f);
    if (decay_exp - pruned_at >= 4.0) {
      // Drop values lighter than 2^-kDropExp; order (and so sortedness) kept.
      size_t out = 0;
      for (size_t i = 0; i < values.size(); ++i) {
        if (decay_exp - vexp[i] <= kDropExp) {
          values[out] = values[i];
          vexp[out] = vexp[i];
          ++out;
        }
      }
      values.resize(out);
      vexp.resize(out);
      pruned_at = decay_exp;
    }
  } else if (mode == QuantileMode::Sketch) {
    sketch->thin(f);
  }
}

void NumericState::clear() {
  count = count_sq = missing = nonfinite = mean = m2 = min = max = 0;
  std::fill(hist.begin(), hist.end(), 0.0);
  values.clear();
  values.shrink_to_fit();
  sorted = true;
  decayed = false;
  decay_exp = pruned_at = 0;
  vexp.clear();
  vexp.shrink_to_fit();
  if (sketch) sketch->clear();
}

void NumericState::ensure_sorted() {
  if (sorted) return;
  if (!decayed) {
    sort_doubles(values.data(), static_cast<int64_t>(values.size()));
  } else {
    std::vector<std::pair<double, double>> pairs(values.size());
    for (size_t i = 0; i < values.size(); ++i) pairs[i] = {values[i], vexp[i]};
    std::sort(pairs.begin(), pairs.end());
    for (size_t i = 0; i < pairs.size(); ++i) {
      values[i] = pairs[i].first;
      vexp[i] = pairs[i].second;
    }
  }
  sorted = true;
}

std::vector<double> NumericState::value_weights() const {
  std::vector<double> w;
  if (!decayed) return w;
  w.resize(values.size());
  for (size_t i = 0; i < values.size(); ++i) w[i] = std::exp2(vexp[i] - decay_exp);
  return w;
}

// ------------------------------------------------------------------ CategoricalState

void CategoricalState::add(const std::vector<std::string>& keys, const double* cnt,
                           double missing_count) {
  missing += missing_count;
  for (size_t i = 0; i < keys.size(); ++i) {
    const double c = cnt[i];
    if (c <= 0) continue;
    total += c;
    auto it = counts.find(keys[i]);
    if (it != counts.end()) {
      it->second += c;
      continue;
    }
    if (static_cast<int64_t>(counts.size()) < cap) {
      counts.emplace(keys[i], c);
      continue;
    }
    // Past the cap: a heavier newcomer evicts the lightest retained category.
    auto smallest = counts.end();
    for (auto jt = counts.begin(); jt != counts.end(); ++jt) {
      if (smallest == counts.end() || jt->second < smallest->second ||
          (jt->second == smallest->second && jt->first < smallest->first)) {
        smallest = jt;
      }
    }
    if (smallest != counts.end() && c > smallest->second) {
      other += smallest->second;
      counts.erase(smallest);
      counts.emplace(keys[i], c);
    } else {
      other += c;
    }
  }
}

void CategoricalState::merge(const CategoricalState& o) {
  // Sorted keys make the merge independent of hash order.
  std::vector<std::pair<std::string, double>> items(o.counts.begin(), o.counts.end());
  std::sort(items.begin(), items.end());
  std::vector<std::string> keys;
  std::vector<double> cnt;
  for (auto& kv : items) {
    keys.push_back(kv.first);
    cnt.push_back(kv.second);
  }
  add(keys, cnt.data(), o.missing);
  total += o.other;
  other += o.other;
}

void CategoricalState::scale(double f) {
  total *= f;
  missing *= f;
  other *= f;
  for (auto& kv : counts) kv.second *= f;
}

void CategoricalState::clear() {
  total = missing = other = 0;
  counts.clear();
}

// ------------------------------------------------------------------ Feature / ProfileState

Feature::Feature(const Feature& o) : name(o.name), kind(o.kind) {
  if (o.num) num = std::make_unique<NumericState>(*o.num);
  if (o.cat) cat = std::make_unique<CategoricalState>(*o.cat);
}

int64_t ProfileState::find(const std::string& name) const {
  for (size_t i = 0; i < features.size(); ++i)
    if (features[i].name == name) return static_cast<int64_t>(i);
  return -1;
}

std::unique_ptr<ProfileState> ProfileState::empty_like() const {
  auto p = std::make_unique<ProfileState>(*this);
  p->clear();
  p->edges_own = false;  // the edges are this profile's, not the new one's data's
  return p;
}

void ProfileState::merge(const ProfileState& o) {
  FASTML_CHECK_ARG(features.size() == o.features.size(), "profiles", "have different features (",
                   features.size(), " vs ", o.features.size(), ")");
  FASTML_CHECK_ARG(mode == o.mode && sketch_k == o.sketch_k, "profiles",
                   "have different modes or sketch sizes");
  for (size_t i = 0; i < features.size(); ++i) {
    const Feature& b = o.features[i];
    Feature& a = features[i];
    FASTML_CHECK_ARG(a.name == b.name && a.kind == b.kind, "profiles",
                     "have different features at position ", i, ": '", a.name, "' vs '", b.name,
                     "'");
  }
  for (size_t i = 0; i < features.size(); ++i) {
    if (features[i].num) features[i].num->merge(*o.features[i].num);
    if (features[i].cat) features[i].cat->merge(*o.features[i].cat);
  }
  rows += o.rows;
}

void ProfileState::scale(double f) {
  rows *= f;
  for (auto& ft : features) {
    if (ft.num) ft.num->scale(f);
    if (ft.cat) ft.cat->scale(f);
  }
}

void ProfileState::clear() {
  rows = 0;
  for (auto& ft : features) {
    if (ft.num) ft.num->clear();
    if (ft.cat) ft.cat->clear();
  }
}

namespace {

// Eight float32 columns that sit side by side in one row-major matrix: rows
// [0, rows) transposed into out[c * ld + r] (eight contiguous columns). The
// values are copied bit for bit, so ingesting the copy gives exactly what
// ingesting the strided columns gives.
void transpose8_f32_scalar(const char* base, int64_t stride, int64_t r0, int64_t rows, float* out,
                           int64_t ld) {
  for (int64_t r = r0; r < rows; ++r) {
    const float* row = reinterpret_cast<const float*>(base + r * stride);
    for (int c = 0; c < 8; ++c) out[c * ld + r] = row[c];
  }
}

#ifdef FASTML_DRIFT_AVX2
__attribute__((target("avx2"))) void transpose8_f32_avx2(const char* base, int64_t stride,
                                                         int64_t rows, float* out, int64_t ld) {
#define FASTML_ROW(k) _mm256_loadu_ps(reinterpret_cast<const float*>(base + (k) * stride))
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    const __m256 a0 = FASTML_ROW(r), a1 = FASTML_ROW(r + 1), a2 = FASTML_ROW(r + 2);
    const __m256 a3 = FASTML_ROW(r + 3), a4 = FASTML_ROW(r + 4), a5 = FASTML_ROW(r + 5);
    const __m256 a6 = FASTML_ROW(r + 6), a7 = FASTML_ROW(r + 7);
    const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
    const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
    const __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
    const __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(out + 0 * ld + r, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(out + 1 * ld + r, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(out + 2 * ld + r, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(out + 3 * ld + r, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(out + 4 * ld + r, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(out + 5 * ld + r, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(out + 6 * ld + r, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(out + 7 * ld + r, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
#undef FASTML_ROW
  transpose8_f32_scalar(base, stride, r, rows, out, ld);
}
#endif

void transpose8_f32(const char* base, int64_t stride, int64_t rows, float* out, int64_t ld) {
#ifdef FASTML_DRIFT_AVX2
  if (cpu_features().avx2) return transpose8_f32_avx2(base, stride, rows, out, ld);
#endif
  transpose8_f32_scalar(base, stride, 0, rows, out, ld);
}

// The work units of ingest_columns: one column, or eight float32 columns side
// by side in one row-major matrix (`members` in column order), which are
// transposed block by block into a small buffer and ingested as contiguous
// columns (a strided column costs a gather per value; the transpose is a
// fraction of that).
struct IngestUnit {
  std::vector<int64_t> members;  // indices into `columns`
  bool tile = false;
};

std::vector<IngestUnit> plan_units(const std::vector<ArrayView>& columns) {
  std::vector<int64_t> cand;  // strided float32 columns that could form tiles
  for (size_t i = 0; i < columns.size(); ++i) {
    const ArrayView& c = columns[i];
    if (c.dtype == DType::F32 && c.strides[0] >= 32 && c.strides[0] % 4 == 0) {
      cand.push_back(static_cast<int64_t>(i));
    }
  }
  auto addr = [&](int64_t i) { return reinterpret_cast<uintptr_t>(columns[i].data); };
  std::sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) {
    if (columns[a].strides[0] != columns[b].strides[0])
      return columns[a].strides[0] < columns[b].strides[0];
    return addr(a) < addr(b);
  });
  std::vector<uint8_t> used(columns.size(), 0);
  std::vector<IngestUnit> units;
  for (size_t k = 0; k + 8 <= cand.size();) {
    bool run = true;
    for (size_t m = 1; m < 8 && run; ++m) {
      run = columns[cand[k + m]].strides[0] == columns[cand[k]].strides[0] &&
            addr(cand[k + m]) == addr(cand[k]) + 4 * m;
    }
    if (!run) {
      ++k;
      continue;
    }
    IngestUnit u;
    u.tile = true;
    u.members.assign(cand.begin() + static_cast<std::ptrdiff_t>(k),
                     cand.begin() + static_cast<std::ptrdiff_t>(k + 8));
    for (int64_t i : u.members) used[static_cast<size_t>(i)] = 1;
    units.push_back(std::move(u));
    k += 8;
  }
  for (size_t i = 0; i < columns.size(); ++i) {
    if (!used[i]) units.push_back(IngestUnit{{static_cast<int64_t>(i)}, false});
  }
  return units;
}

}  // namespace

void ProfileState::ingest_columns(const std::vector<ArrayView>& columns,
                                  const std::vector<int64_t>& feature_idx) {
  FASTML_ASSERT(columns.size() == feature_idx.size());
  if (columns.empty()) return;
  const int64_t n = columns[0].shape[0];
  int64_t widest = 0;  // the largest row stride among strided columns
  for (const auto& c : columns) {
    FASTML_ASSERT(c.ndim == 1 && c.shape[0] == n);
    if (c.strides[0] != static_cast<int64_t>(itemsize(c.dtype))) {
      widest = std::max(widest, std::abs(c.strides[0]));
    }
  }
  if (widest == 0) {  // contiguous columns: each is one stream
    // Each task owns distinct features, so no two threads touch one state.
    ThreadPool::global().parallel_for(0, static_cast<int64_t>(columns.size()), 1,
                                      [&](int64_t b, int64_t e) {
                                        for (int64_t i = b; i < e; ++i) {
                                          features[feature_idx[i]].num->ingest(columns[i], 0);
                                        }
                                      });
    return;
  }
  // The blocks below append to the exact values block by block: make room for
  // all of them once (no reallocation copies).
  for (int64_t f : feature_idx) {
    NumericState& st = *features[f].num;
    if (st.mode == QuantileMode::Exact)
      st.values.reserve(st.values.size() + static_cast<size_t>(n));
  }
  // Strided columns (columns of a row-major matrix share cache lines): walk
  // the rows in blocks of ~256 KB, so the block's lines come from memory once
  // and every column's pass over them hits the caches. Column by column over
  // the whole matrix would read it from memory once per column (measured:
  // 16 float32 columns of 1M rows, 64 vs 223 M values/s on one thread).
  const int64_t block = std::max<int64_t>(4096, ((int64_t{256} << 10) / widest) / 4096 * 4096);
  const std::vector<IngestUnit> units = plan_units(columns);
  // The tile's eight columns 64 bytes more than a block apart: a block apart
  // (16 KB and up) they fell in one L1 set, nine streams in eight ways.
  const int64_t tile_ld = block + 16;
  // Each unit owns distinct features, so no two threads touch one state; a
  // task keeps its transpose buffer (8 x block floats) for all its blocks.
  ThreadPool::global().parallel_for(
      0, static_cast<int64_t>(units.size()), 1, [&](int64_t b, int64_t e) {
        std::vector<float> tile;
        for (int64_t r0 = 0; r0 < n; r0 += block) {
          const int64_t rows = std::min(n, r0 + block) - r0;
          for (int64_t u = b; u < e; ++u) {
            const IngestUnit& unit = units[static_cast<size_t>(u)];
            if (!unit.tile) {
              const int64_t i = unit.members[0];
              ArrayView v = columns[i];
              v.data = static_cast<char*>(v.data) + r0 * v.strides[0];
              v.shape[0] = rows;
              features[feature_idx[i]].num->ingest(v, 0);
              continue;
            }
            tile.resize(static_cast<size_t>(8 * tile_ld));
            const ArrayView& first = columns[unit.members[0]];
            transpose8_f32(static_cast<const char*>(first.data) + r0 * first.strides[0],
                           first.strides[0], rows, tile.data(), tile_ld);
            // The task's last unit of this block: its lines are read for
            // the last time by the transpose above, so the next block's can
            // come into L2 while it computes (a block 256 KB, the tile 128).
            if (u == e - 1 && r0 + block < n) {
              t_read_ahead = {
                  static_cast<const char*>(first.data) + (r0 + block) * first.strides[0],
                  first.strides[0], std::min(n, r0 + 2 * block) - (r0 + block)};
            }
            for (int m = 0; m < 8; ++m) {
              const int64_t i = unit.members[m];
              ArrayView v = columns[i];
              v.data = tile.data() + m * tile_ld;
              v.shape[0] = rows;
              v.strides[0] = sizeof(float);
              features[feature_idx[i]].num->ingest(v, 0);
            }
            t_read_ahead = {};
          }
        }
      });
}

void ProfileState::ingest_matrix(const ArrayView& view, const std::vector<int64_t>& cols,
                                 const std::vector<int64_t>& feature_idx) {
  FASTML_ASSERT(cols.size() == feature_idx.size());
  for (int64_t f : feature_idx) {
    FASTML_ASSERT(f >= 0 && f < static_cast<int64_t>(features.size()) && features[f].num);
  }
  // Each task owns distinct features, so no two threads touch one state.
  ThreadPool::global().parallel_for(0, static_cast<int64_t>(cols.size()), 1,
                                    [&](int64_t b, int64_t e) {
                                      for (int64_t i = b; i < e; ++i) {
                                        features[feature_idx[i]].num->ingest(view, cols[i]);
                                      }
                                    });
}

}  // namespace fastml::drift
