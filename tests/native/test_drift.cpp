// Native checks of the drift core, meant for AddressSanitizer/UBSan (and
// ThreadSanitizer, for the pool-parallel p-value sum and ingest): ADWIN over
// long streams with every bucket shape, exponential decay of exact values
// and sketches, merge, the profile byte format under random corruption, the
// radix sort and the Smirnov tail. The Python tests compare the numbers with
// SciPy and River; these make sure the native code paths stay memory-safe.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "common/thread_pool.hpp"
#include "drift/detectors.hpp"
#include "drift/feature_state.hpp"
#include "drift/quantile_sketch.hpp"
#include "drift/two_sample.hpp"
#include "tests/native/check.hpp"

using namespace fastml;
using namespace fastml::drift;

namespace {

std::unique_ptr<ProfileState> make_profile(QuantileMode mode) {
  auto p = std::make_unique<ProfileState>();
  p->mode = mode;
  Feature f;
  f.name = "x";
  f.kind = FeatureKind::Numeric;
  std::vector<double> edges;
  for (int i = 0; i <= 20; ++i) edges.push_back(-3.0 + 0.3 * i);
  f.num = std::make_unique<NumericState>(edges, mode, QuantileSketch::kDefaultK);
  p->features.push_back(std::move(f));
  Feature c;
  c.name = "c";
  c.kind = FeatureKind::Categorical;
  c.cat = std::make_unique<CategoricalState>();
  c.cat->cap = 4;
  p->features.push_back(std::move(c));
  return p;
}

void feed(ProfileState& p, std::mt19937_64& rng, int n, double shift) {
  std::normal_distribution<double> d(shift, 1.0);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = static_cast<float>(d(rng));
  if (n > 3) {
    x[1] = std::numeric_limits<float>::quiet_NaN();
    x[2] = std::numeric_limits<float>::infinity();
  }
  ArrayView view;
  view.data = x.data();
  view.dtype = DType::F32;
  view.ndim = 1;
  view.shape[0] = n;
  view.strides[0] = sizeof(float);
  p.features[0].num->ingest(view, 0);
  std::vector<std::string> keys = {"a", "b", std::to_string(rng() % 9)};
  std::vector<double> counts = {1.0, 2.0, 3.0};
  p.features[1].cat->add(keys, counts.data(), 0.0);
  p.rows += n;
}

void check_adwin() {
  std::mt19937_64 rng(1);
  for (int max_buckets : {2, 3, 5, 9}) {
    for (int clock : {1, 4, 32}) {
      Adwin a(0.002, clock, max_buckets, 5, 10);
      std::normal_distribution<double> d(0.0, 1.0);
      std::vector<double> x(60000);
      for (size_t i = 0; i < x.size(); ++i) x[i] = d(rng) + (i > 30000 ? 1.0 : 0.0);
      const auto idx = a.update(x.data(), static_cast<int64_t>(x.size()));
      NATIVE_CHECK(!idx.empty());  // the shift at 30,000 is found
      NATIVE_CHECK(idx.front() > 30000 && idx.front() < 31000);
      // values far from zero with a tiny spread, in odd-sized pieces
      std::vector<double> y(5003);
      for (auto& v : y) v = 1e6 + 1e-3 * d(rng);
      for (int off = 0; off < 5003; off += 997)
        a.update(y.data() + off, std::min<int64_t>(997, 5003 - off));
      NATIVE_CHECK(a.width() >= 0);
    }
  }
}

void check_decay_merge_bytes(QuantileMode mode) {
  std::mt19937_64 rng(2);
  auto a = make_profile(mode);
  auto b = make_profile(mode);
  for (int i = 0; i < 40; ++i) {
    a->scale(std::pow(0.5, 300.0 / 1000.0));
    feed(*a, rng, 300, i % 3);
    feed(*b, rng, 77, 0.0);
  }
  a->scale(0.0);  // everything decays away
  feed(*a, rng, 50, 1.0);
  for (int i = 0; i < 300; ++i) {  // past kDropExp half-lives: values are dropped
    a->scale(0.5);
    feed(*a, rng, 20, 0.0);
  }
  NumericState& na = *a->features[0].num;
  if (mode == QuantileMode::Exact) {
    NATIVE_CHECK(na.decayed && na.vexp.size() == na.values.size());
    NATIVE_CHECK(na.values.size() <= static_cast<size_t>(20 * (NumericState::kDropExp + 6)));
    na.ensure_sorted();
    NATIVE_CHECK(std::is_sorted(na.values.begin(), na.values.end()));
    const auto w = na.value_weights();
    NATIVE_CHECK(w.size() == na.values.size());
  } else {
    NATIVE_CHECK(na.sketch->rank_error() > 0 && na.sketch->rank_error() < 1);
  }
  a->merge(*b);
  b->merge(*a);
  const std::vector<uint8_t> bytes = a->to_bytes();
  auto back = ProfileState::from_bytes(bytes.data(), bytes.size());
  NATIVE_CHECK(back->to_bytes() == bytes);
  // Random corruption: a clean exception or a valid profile, never a crash.
  int rejected = 0;
  for (int i = 0; i < 3000; ++i) {
    std::vector<uint8_t> bad = bytes;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f)
      bad[rng() % bad.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
    if (i % 3 == 0) bad.resize(rng() % bad.size());
    try {
      auto p = ProfileState::from_bytes(bad.data(), bad.size());
      (void)p->to_bytes();
    } catch (const std::invalid_argument&) {
      ++rejected;
    }
  }
  NATIVE_CHECK(rejected > 2900);  // the checksum catches nearly all of them
}

void check_two_sample() {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> d(0.0, 1.0);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{4095}, int64_t{4096}, int64_t{70001}}) {
    std::vector<double> x(static_cast<size_t>(n)), out(static_cast<size_t>(n));
    for (auto& v : x) v = d(rng);
    if (n > 10) x[3] = -0.0, x[4] = 0.0, x[5] = x[6];
    sort_doubles_into(x.data(), n, out.data());
    std::vector<double> ref = x;
    std::sort(ref.begin(), ref.end());
    NATIVE_CHECK(out == ref);
    sort_doubles(x.data(), n);
    NATIVE_CHECK(x == ref);
  }
  ThreadPool::global().set_num_threads(3);
  for (int64_t n : {int64_t{40000}, int64_t{500000}}) {
    for (double x : {0.002, 0.005458, 0.03}) {
      const double p = kstwo_sf(n, x);
      NATIVE_CHECK(p >= 0.0 && p <= 1.0);
    }
  }
}

// update_run's 32-bit sort for float32 values leaves the sketch exactly as the
// 64-bit sort does: runs of float32 values (signed zeros, subnormals, heavy
// ties, one repeated value, lengths around the four-way split) into two
// sketches, one told the values are float32.
void check_float32_run_sort() {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  const float specials[] = {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-38f, -3.4e38f, 3.4e38f, 1.0f};
  for (int trial = 0; trial < 40; ++trial) {
    QuantileSketch a(QuantileSketch::kDefaultK, 5), b(QuantileSketch::kDefaultK, 5);
    for (int run = 0; run < 6; ++run) {
      const int64_t n = 1600 + static_cast<int64_t>(rng() % 6000);
      std::vector<double> x(static_cast<size_t>(n));
      for (auto& v : x) {
        const uint64_t r = rng() % 100;
        float f = normal(rng);
        if (trial % 5 == 0) f = 7.0f;  // every value equal
        if (r < 5) f = specials[r % 8];
        if (r >= 95) f = std::round(f);  // ties
        v = static_cast<double>(f);
      }
      std::vector<double> y = x;
      a.update_run(x.data(), n, true);
      b.update_run(y.data(), n, false);
      NATIVE_CHECK(x == y);  // the same sorted leftovers
    }
    NATIVE_CHECK(a.levels() == b.levels());
    NATIVE_CHECK(a.n() == b.n() && a.error_sum() == b.error_sum());
  }
}

// update_run keeps, once a run is halved three times or more, only the items
// at the ranks the compaction keeps, selected through value buckets instead
// of sorting the run: the sketch must be the one the full sort gives. Two
// sketches with one seed take the same runs, one with selection off; runs of
// normal, tied, constant, heavy-tailed, signed-zero, subnormal and
// tiny-range values, float32 and float64, lengths from 1 to 9000, into
// sketches of several widths (so of several depths).
void check_selected_runs_equal_sorted_runs() {
  std::mt19937_64 rng(23);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::cauchy_distribution<double> cauchy(0.0, 1.0);
  const double specials[] = {0.0, -0.0, 1e-45, -1e-45, 5e-324, -5e-324, 1e-300, 3.4e38};
  int selected_runs = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int k = trial % 3 == 0 ? 8 : (trial % 3 == 1 ? 64 : QuantileSketch::kDefaultK);
    QuantileSketch sel(k, 100 + trial), ref(k, 100 + trial);
    const int kind = trial % 6;
    const bool f32 = trial % 2 == 0;
    for (int run = 0; run < 120; ++run) {
      const int64_t n = 1 + static_cast<int64_t>(rng() % (run % 7 == 0 ? 9000 : 4096));
      std::vector<double> x(static_cast<size_t>(n));
      for (auto& v : x) {
        double d = normal(rng);
        if (kind == 1) d = std::round(d * 2.0);        // heavy ties
        if (kind == 2) d = 7.25;                       // one value
        if (kind == 3) d = cauchy(rng);                // heavy tails
        if (kind == 4) d = specials[rng() % 8];        // zeros of both signs, subnormals
        if (kind == 5) d = 1.0 + 1e-12 * normal(rng);  // a tiny range
        if (rng() % 50 == 0) d = specials[rng() % 8];
        v = f32 ? static_cast<double>(static_cast<float>(d)) : d;
      }
      std::vector<double> y = x;
      const int levels_before = sel.num_levels();
      QuantileSketch::set_select_stride(std::numeric_limits<int64_t>::max());
      ref.update_run(y.data(), n, f32);
      QuantileSketch::set_select_stride(QuantileSketch::kSelectStride);
      if (run % 2) {  // the caller's bounds (ingest passes the chunk's extremes)
        const auto [mn, mx] = std::minmax_element(x.begin(), x.end());
        sel.update_run(x.data(), n, f32, *mn, *mx);
      } else {
        sel.update_run(x.data(), n, f32);
      }
      selected_runs += levels_before > 6;
      NATIVE_CHECK(sel.levels() == ref.levels());
      NATIVE_CHECK(sel.n() == ref.n() && sel.error_sum() == ref.error_sum());
      NATIVE_CHECK(sel.rng_state() == ref.rng_state());
    }
  }
  NATIVE_CHECK(selected_runs > 1000);  // deep sketches: most runs took the selection
  bool threw = false;
  try {
    QuantileSketch::set_select_stride(1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  NATIVE_CHECK(threw);
}

}  // namespace

int main() {
  check_float32_run_sort();
  check_selected_runs_equal_sorted_runs();
  check_adwin();
  check_decay_merge_bytes(QuantileMode::Exact);
  check_decay_merge_bytes(QuantileMode::Sketch);
  check_two_sample();
  std::printf("test_drift: ok\n");
  return 0;
}
