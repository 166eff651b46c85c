#include "drift/feature_state.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/dtype.hpp"
#include "common/errors.hpp"
#include "common/thread_pool.hpp"

namespace fastml::drift {

// ------------------------------------------------------------------ BinLookup

BinLookup::BinLookup(const std::vector<double>& edges) : edges_(edges) {
  FASTML_ASSERT(edges.size() >= 2);
  nbins_ = static_cast<int64_t>(edges.size()) - 1;
  lo_ = edges.front();
  hi_ = edges.back();
  // About 16 grid cells per bin: most lookups land in the right bin at once.
  grid_ = std::min<int64_t>(1 << 16, std::max<int64_t>(64, 16 * nbins_));
  const double range = hi_ - lo_;
  scale_ = range > 0 && std::isfinite(static_cast<double>(grid_) / range)
               ? static_cast<double>(grid_) / range
               : 0.0;
  table_.resize(static_cast<size_t>(grid_));
  int64_t b = 0;
  for (int64_t c = 0; c < grid_; ++c) {
    const double cell_lo = scale_ > 0 ? lo_ + static_cast<double>(c) / scale_ : lo_;
    while (b + 1 < nbins_ && edges_[b + 1] <= cell_lo) ++b;
    table_[c] = static_cast<int32_t>(b);
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
      sketch(o.sketch ? std::make_unique<QuantileSketch>(*o.sketch) : nullptr),
      lookup(o.lookup) {}

void NumericState::rebuild_lookup() {
  lookup = std::make_shared<const BinLookup>(edges);
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

template <typename T>
void ingest_typed(NumericState& s, const char* base, int64_t n, int64_t stride) {
  const BinLookup& lk = *s.lookup;
  const int64_t slots = lk.nbins() + 2;
  constexpr int64_t kChunk = 4096;
  std::vector<uint32_t> local(static_cast<size_t>(slots));
  if (s.mode == QuantileMode::Exact) {
    s.values.reserve(s.values.size() + static_cast<size_t>(n));
  }
  double missing = 0, nonfinite = 0;
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    std::fill(local.begin(), local.end(), 0u);
    // Shifted sums around a pivot near the mean keep the one-pass variance
    // exact enough; chunks are then merged with Chan's formula.
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
    double cnt = 0, sum = 0, sq = 0;
    double mn = std::numeric_limits<double>::infinity(), mx = -mn;
    for (int64_t i = start; i < end; ++i) {
      const double x = load_as_double(*reinterpret_cast<const T*>(base + i * stride));
      if (std::isfinite(x)) {
        ++local[static_cast<size_t>(lk.slot(x))];
        const double d = x - pivot;
        cnt += 1;
        sum += d;
        sq += d * d;
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
        if (s.mode == QuantileMode::Exact) {
          s.values.push_back(x);
        } else if (s.mode == QuantileMode::Sketch) {
          s.sketch->update(x);
        }
      } else if (std::isnan(x)) {
        missing += 1;
      } else {
        nonfinite += 1;
      }
    }
    for (int64_t k = 0; k < slots; ++k) s.hist[k] += local[k];
    if (cnt > 0) {
      const double mu = sum / cnt;
      s.add_moments(cnt, pivot + mu, std::max(0.0, sq - sum * mu), mn, mx);
    }
  }
  if (s.mode == QuantileMode::Exact && n > 0) s.sorted = false;
  s.missing += missing;
  s.nonfinite += nonfinite;
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
    ingest_typed<T>(*this, base, n, stride);
  });
}

void NumericState::ingest_values(const double* x, int64_t n) {
  ingest_typed<double>(*this, reinterpret_cast<const char*>(x), n, sizeof(double));
}

void NumericState::merge(const NumericState& o) {
  FASTML_CHECK_ARG(edges == o.edges, "profiles", "have different histogram edges (", edges.size(),
                   " vs ", o.edges.size(), " edges); merge only profiles from one reference");
  FASTML_CHECK_ARG(mode == o.mode, "profiles", "have different quantile modes");
  add_moments(o.count, o.mean, o.m2, o.min, o.max);
  missing += o.missing;
  nonfinite += o.nonfinite;
  for (size_t i = 0; i < hist.size(); ++i) hist[i] += o.hist[i];
  if (mode == QuantileMode::Exact && !o.values.empty()) {
    values.insert(values.end(), o.values.begin(), o.values.end());
    sorted = false;
  } else if (mode == QuantileMode::Sketch) {
    sketch->merge(*o.sketch);
  }
}

void NumericState::scale(double f) {
  count *= f;
  missing *= f;
  nonfinite *= f;
  m2 *= f;
  for (double& h : hist) h *= f;
}

void NumericState::clear() {
  count = missing = nonfinite = mean = m2 = min = max = 0;
  std::fill(hist.begin(), hist.end(), 0.0);
  values.clear();
  values.shrink_to_fit();
  sorted = true;
  if (sketch) sketch->clear();
}

void NumericState::ensure_sorted() {
  if (!sorted) {
    std::sort(values.begin(), values.end());
    sorted = true;
  }
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
