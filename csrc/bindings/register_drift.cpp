// Bindings of the drift area: profiles (native state behind fastml.drift.Profile),
// exact two-sample functions and stream detectors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/array.hpp"
#include "bindings/registry.hpp"
#include "common/errors.hpp"
#include "common/thread_pool.hpp"
#include "cuda/drift_ingest.hpp"
#include "drift/bin_search.hpp"
#include "drift/detectors.hpp"
#include "drift/feature_state.hpp"
#include "drift/two_sample.hpp"

namespace py = pybind11;

namespace fastml::bind {

namespace {

using drift::FeatureKind;
using drift::ProfileState;
using drift::QuantileMode;

// A profile plus the lock that serialises native work on it (the GIL is
// released while it runs, so two Python threads may call in at once).
struct NativeProfile {
  std::unique_ptr<ProfileState> state;
  mutable std::mutex mutex;

  explicit NativeProfile(std::unique_ptr<ProfileState> s) : state(std::move(s)) {}

  const drift::Feature& feature(int64_t i) const {
    if (i < 0 || i >= static_cast<int64_t>(state->features.size())) {
      fail<std::out_of_range>("feature index ", i, " is out of range for ", state->features.size(),
                              " features");
    }
    return state->features[i];
  }
};

std::vector<double> to_vector(const py::handle& obj, const char* name) {
  BoundArray b = bind_array(obj, name, ArraySpec{1, 0, {DType::F64}, Layout::MakeContiguous});
  const double* p = b.view.as<double>();
  return std::vector<double>(p, p + b.view.shape[0]);
}

py::array_t<double> vec_to_numpy(const std::vector<double>& v) {
  auto buf = Buffer::allocate(v.size() * sizeof(double));
  if (!v.empty()) std::copy(v.begin(), v.end(), buf->as<double>());
  return to_numpy(buf, DType::F64, {static_cast<int64_t>(v.size())});
}

QuantileMode parse_mode(const std::string& mode) {
  if (mode == "exact") return QuantileMode::Exact;
  if (mode == "sketch") return QuantileMode::Sketch;
  if (mode == "histogram" || mode == "none") return QuantileMode::None;
  fail<std::invalid_argument>("mode must be 'exact', 'sketch' or 'histogram', got '", mode, "'");
}

const char* mode_name(QuantileMode m) {
  return m == QuantileMode::Exact ? "exact" : (m == QuantileMode::Sketch ? "sketch" : "histogram");
}

// KS and Wasserstein-1 from two histograms over the same edges, as intervals
// that hold the exact values of the samples they summarise. With p and q the
// slots' shares (underflow, bins, overflow) and d the CDF difference at a
// slot's start, F - G stays within [d - q, d + p] inside the slot (each CDF
// only grows by its own share there) and equals d exactly at every edge. So
// KS >= max |d| at the edges and <= max over slots of max(d + p, q - d); the
// integral of |F - G| over a slot of width w lies between w times the
// distance of [d - q, d + p] from 0 and w times its largest magnitude (the
// outer slots span from the edges to the samples' min and max).
struct HistogramBounds {
  double ks_lo = 0, ks_hi = 0, w_lo = 0, w_hi = 0;
};

HistogramBounds histogram_bounds(const drift::NumericState& a, const drift::NumericState& b) {
  HistogramBounds r;
  const double na = a.count, nb = b.count;
  const size_t slots = a.hist.size();
  const auto& e = a.edges;
  const double lo_x = std::min(a.min, b.min), hi_x = std::max(a.max, b.max);
  double d = 0;
  for (size_t k = 0; k < slots; ++k) {
    const double p = a.hist[k] / na, q = b.hist[k] / nb;
    double left, right;
    if (k == 0) {
      left = std::min(lo_x, e.front()), right = e.front();
    } else if (k + 1 == slots) {
      left = e.back(), right = std::max(hi_x, e.back());
    } else {
      left = e[k - 1], right = e[k];
    }
    const double width = std::max(0.0, right - left);
    const double low = d - q, high = d + p;
    r.ks_hi = std::max(r.ks_hi, std::max(high, -low));
    const double nearest = (low <= 0 && high >= 0) ? 0.0 : std::min(std::abs(low), std::abs(high));
    r.w_lo += width * nearest;
    r.w_hi += width * std::max(std::abs(low), std::abs(high));
    d += p - q;
    r.ks_lo = std::max(r.ks_lo, std::abs(d));
  }
  r.ks_hi = std::min(1.0, std::max(r.ks_hi, r.ks_lo));
  return r;
}

// Sorted values (exact) or sorted sketch items with weights, for one feature.
void quantile_points(drift::NumericState& s, std::vector<double>* items,
                     std::vector<double>* weights) {
  if (s.mode == QuantileMode::Exact) {
    s.ensure_sorted();
    items->assign(s.values.begin(), s.values.end());
    *weights = s.value_weights();  // empty: every value weighs 1
  } else if (s.mode == QuantileMode::Sketch) {
    s.sketch->sorted_items(items, weights);
  }
}

// The sample size a p-value uses: the count, or for a decayed window Kish's
// effective size count^2 / sum of squared weights (at least 1).
int64_t effective_n(const drift::NumericState& s) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::llround(s.effective_count())));
}

py::dict compare_numeric(NativeProfile& a, int64_t i, NativeProfile& b, int64_t j) {
  a.feature(i);
  b.feature(j);
  FASTML_CHECK_ARG(a.state->features[i].num && b.state->features[j].num, "feature",
                   "must be numeric in both profiles");
  double ks = 0, p = 1, w = 0, ks_bound = 0, w_bound = 0, p_lo = 1, p_hi = 1;
  bool exact = false, have = false;
  {
    // Safe without the GIL: only native state, guarded by both profiles' locks.
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> la(a.mutex, std::defer_lock), lb(b.mutex, std::defer_lock);
    if (&a == &b) {
      la.lock();
    } else {
      std::lock(la, lb);
    }
    drift::NumericState& sa = *a.state->features[i].num;
    drift::NumericState& sb = *b.state->features[j].num;
    if (sa.mode == QuantileMode::Exact && sb.mode == QuantileMode::Exact) {
      sa.ensure_sorted();
      sb.ensure_sorted();
      if (!sa.values.empty() && !sb.values.empty() && !sa.decayed && !sb.decayed) {
        const auto r = drift::ks_2samp_sorted(sa.values.data(), sa.values.size(), sb.values.data(),
                                              sb.values.size());
        ks = r.statistic;
        p = p_lo = p_hi = r.pvalue;
        exact = r.exact;
        w = drift::wasserstein_sorted(sa.values.data(), nullptr, sa.values.size(), sb.values.data(),
                                      nullptr, sb.values.size());
        have = true;
      } else if (!sa.values.empty() && !sb.values.empty()) {
        // A decayed window: weighted ECDFs; the p-value at Kish's effective
        // sample sizes (asymptotic: no exact null distribution for weights).
        std::vector<double> wa = sa.value_weights(), wb = sb.value_weights();
        if (wa.empty()) wa.assign(sa.values.size(), 1.0);
        if (wb.empty()) wb.assign(sb.values.size(), 1.0);
        ks = drift::ks_statistic_weighted(sa.values.data(), wa.data(), sa.values.size(),
                                          sb.values.data(), wb.data(), sb.values.size());
        w = drift::wasserstein_sorted(sa.values.data(), wa.data(), sa.values.size(),
                                      sb.values.data(), wb.data(), sb.values.size());
        p = p_lo = p_hi = drift::ks_pvalue(ks, effective_n(sa), effective_n(sb));
        have = true;
      }
    } else if (sa.mode == QuantileMode::Sketch && sb.mode == QuantileMode::Sketch) {
      std::vector<double> xa, wa, xb, wb;
      quantile_points(sa, &xa, &wa);
      quantile_points(sb, &xb, &wb);
      if (!xa.empty() && !xb.empty()) {
        ks = drift::ks_statistic_weighted(xa.data(), wa.data(), xa.size(), xb.data(), wb.data(),
                                          xb.size());
        w = drift::wasserstein_sorted(xa.data(), wa.data(), xa.size(), xb.data(), wb.data(),
                                      xb.size());
        ks_bound = sa.sketch->rank_error() + sb.sketch->rank_error();
        const double range = std::max(sa.max, sb.max) - std::min(sa.min, sb.min);
        w_bound = ks_bound * range;
        const int64_t n1 = effective_n(sa), n2 = effective_n(sb);
        p = drift::ks_pvalue(ks, n1, n2);
        p_lo = drift::ks_pvalue(std::min(1.0, ks + ks_bound), n1, n2);
        p_hi = drift::ks_pvalue(std::max(0.0, ks - ks_bound), n1, n2);
        have = true;
      }
    } else if (sa.mode == QuantileMode::None && sb.mode == QuantileMode::None &&
               sa.edges == sb.edges && sa.count > 0 && sb.count > 0) {
      // Histogram mode: the intervals of histogram_bounds; the midpoint is
      // reported with half the interval as its bound, as in sketch mode.
      const HistogramBounds hb = histogram_bounds(sa, sb);
      ks = 0.5 * (hb.ks_lo + hb.ks_hi);
      ks_bound = 0.5 * (hb.ks_hi - hb.ks_lo);
      w = 0.5 * (hb.w_lo + hb.w_hi);
      w_bound = 0.5 * (hb.w_hi - hb.w_lo);
      const int64_t n1 = effective_n(sa), n2 = effective_n(sb);
      p = drift::ks_pvalue(ks, n1, n2);
      p_lo = drift::ks_pvalue(hb.ks_hi, n1, n2);
      p_hi = drift::ks_pvalue(hb.ks_lo, n1, n2);
      have = true;
    }
  }
  py::dict d;
  d["available"] = have;
  d["ks_statistic"] = ks;
  d["ks_pvalue"] = p;
  d["ks_pvalue_low"] = p_lo;
  d["ks_pvalue_high"] = p_hi;
  d["ks_exact"] = exact;
  d["ks_bound"] = ks_bound;
  d["wasserstein"] = w;
  d["wasserstein_bound"] = w_bound;
  return d;
}

}  // namespace

void register_drift(py::module_& m) {
  py::class_<NativeProfile, std::shared_ptr<NativeProfile>>(m, "_DriftProfile")
      .def_static(
          "create",
          [](const std::vector<std::string>& names, const std::vector<int>& kinds,
             const py::list& edges, const std::string& mode, int sketch_k, int64_t category_cap,
             int bins, bool edges_own) {
            FASTML_CHECK_ARG(names.size() == kinds.size() && names.size() == edges.size(), "names",
                             "kinds and edges must have equal lengths");
            FASTML_CHECK_ARG(category_cap >= 1, "category_cap", "must be >= 1, got ", category_cap);
            auto st = std::make_unique<ProfileState>();
            st->mode = parse_mode(mode);
            FASTML_CHECK_ARG(sketch_k >= 8 && sketch_k <= 65536, "sketch_k",
                             "must be in [8, 65536], got ", sketch_k);
            st->sketch_k = sketch_k;
            FASTML_CHECK_ARG(bins >= 0, "bins", "must be >= 0, got ", bins);
            st->bins = bins;
            st->edges_own = edges_own;
            for (size_t i = 0; i < names.size(); ++i) {
              FASTML_CHECK_ARG(st->find(names[i]) < 0, "names", "has a duplicate feature '",
                               names[i], "'");
              drift::Feature f;
              f.name = names[i];
              if (kinds[i] == 0) {
                f.kind = FeatureKind::Numeric;
                f.num = std::make_unique<drift::NumericState>(to_vector(edges[i], "edges"),
                                                              st->mode, sketch_k);
              } else {
                f.kind = FeatureKind::Categorical;
                f.cat = std::make_unique<drift::CategoricalState>();
                f.cat->cap = category_cap;
              }
              st->features.push_back(std::move(f));
            }
            return std::make_shared<NativeProfile>(std::move(st));
          },
          py::arg("names"), py::arg("kinds"), py::arg("edges"), py::arg("mode"),
          py::arg("sketch_k"), py::arg("category_cap"), py::arg("bins") = 0,
          py::arg("edges_own") = false)
      .def("empty_like",
           [](const NativeProfile& p) {
             std::lock_guard<std::mutex> g(p.mutex);
             return std::make_shared<NativeProfile>(p.state->empty_like());
           })
      .def("copy",
           [](const NativeProfile& p) {
             std::lock_guard<std::mutex> g(p.mutex);
             return std::make_shared<NativeProfile>(std::make_unique<ProfileState>(*p.state));
           })
      .def(
          "ingest_columns",
          [](NativeProfile& p, const py::list& columns, const std::vector<int64_t>& features,
             int64_t rows) {
            FASTML_CHECK_ARG(columns.size() == features.size(), "columns",
                             "and features must have equal lengths");
            std::vector<BoundArray> bound;
            bound.reserve(columns.size());
            for (size_t i = 0; i < columns.size(); ++i) {
              const int64_t f = features[i];
              const auto& ft = p.feature(f);
              FASTML_CHECK_TYPE(ft.kind == FeatureKind::Numeric, "features",
                                "must name numeric features; '", ft.name, "' is categorical");
              std::string name = "column '" + ft.name + "'";
              bound.push_back(
                  bind_array(columns[i], name.c_str(), ArraySpec{1, 0, {}, Layout::Any}));
              FASTML_CHECK_ARG(bound.back().view.shape[0] == rows, name.c_str(), "has ",
                               bound.back().view.shape[0], " rows; expected ", rows);
            }
            // Safe without the GIL: the arrays are bound (kept alive by `bound`)
            // and the profile is guarded by its lock.
            std::vector<ArrayView> views;
            views.reserve(bound.size());
            for (auto& b : bound) views.push_back(b.view);
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> g(p.mutex);
            p.state->ingest_columns(views, features);
          },
          py::arg("columns"), py::arg("features"), py::arg("rows"))
      .def(
          "ingest_categorical",
          [](NativeProfile& p, int64_t f, const std::vector<std::string>& keys,
             const py::handle& counts, double missing) {
            const auto& ft = p.feature(f);
            FASTML_CHECK_TYPE(ft.kind == FeatureKind::Categorical, "feature",
                              "must be categorical; '", ft.name, "' is numeric");
            std::vector<double> c = to_vector(counts, "counts");
            FASTML_CHECK_ARG(c.size() == keys.size(), "counts", "must match keys in length");
            std::lock_guard<std::mutex> g(p.mutex);
            p.state->features[f].cat->add(keys, c.data(), missing);
          },
          py::arg("feature"), py::arg("keys"), py::arg("counts"), py::arg("missing"))
      .def("add_rows",
           [](NativeProfile& p, double n) {
             std::lock_guard<std::mutex> g(p.mutex);
             p.state->rows += n;
           })
      .def("merge",
           [](NativeProfile& p, const NativeProfile& o) {
             if (&p == &o) {
               std::lock_guard<std::mutex> g(p.mutex);
               ProfileState copy(*o.state);
               p.state->merge(copy);
               return;
             }
             std::scoped_lock g(p.mutex, o.mutex);
             p.state->merge(*o.state);
           })
      .def(
          "rebin",
          [](NativeProfile& p, int64_t i, const py::handle& edges) {
            const auto& ft = p.feature(i);
            FASTML_CHECK_TYPE(ft.kind == FeatureKind::Numeric, "feature", "must be numeric; '",
                              ft.name, "' is categorical");
            std::vector<double> e = to_vector(edges, "edges");
            FASTML_CHECK_ARG(e.size() >= 2 && std::is_sorted(e.begin(), e.end()), "edges",
                             "must be at least 2 sorted values");
            std::lock_guard<std::mutex> g(p.mutex);
            p.state->features[i].num->rebin(std::move(e));
          },
          py::arg("feature"), py::arg("edges"))
      .def("scale",
           [](NativeProfile& p, double f) {
             FASTML_CHECK_ARG(f >= 0 && f <= 1, "factor", "must be in [0, 1], got ", f);
             std::lock_guard<std::mutex> g(p.mutex);
             p.state->scale(f);
           })
      .def("clear",
           [](NativeProfile& p) {
             std::lock_guard<std::mutex> g(p.mutex);
             p.state->clear();
           })
      .def("to_bytes",
           [](const NativeProfile& p) {
             std::vector<uint8_t> out;
             {
               py::gil_scoped_release release;  // safe: native state only, under the lock
               std::lock_guard<std::mutex> g(p.mutex);
               out = p.state->to_bytes();
             }
             return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
           })
      .def_static("from_bytes",
                  [](const py::bytes& data) {
                    std::string s = data;  // copy: the parse then runs without the GIL
                    std::unique_ptr<ProfileState> st;
                    {
                      py::gil_scoped_release release;
                      st = ProfileState::from_bytes(reinterpret_cast<const uint8_t*>(s.data()),
                                                    s.size());
                    }
                    return std::make_shared<NativeProfile>(std::move(st));
                  })
      .def_property_readonly("names",
                             [](const NativeProfile& p) {
                               std::vector<std::string> n;
                               for (const auto& f : p.state->features) n.push_back(f.name);
                               return n;
                             })
      .def_property_readonly("kinds",
                             [](const NativeProfile& p) {
                               std::vector<int> k;
                               for (const auto& f : p.state->features)
                                 k.push_back(static_cast<int>(f.kind));
                               return k;
                             })
      .def_property_readonly("mode",
                             [](const NativeProfile& p) { return mode_name(p.state->mode); })
      .def_property_readonly("sketch_k", [](const NativeProfile& p) { return p.state->sketch_k; })
      .def_property_readonly("bins", [](const NativeProfile& p) { return p.state->bins; })
      .def_property(
          "edges_own", [](const NativeProfile& p) { return p.state->edges_own; },
          [](NativeProfile& p, bool v) {
            std::lock_guard<std::mutex> g(p.mutex);
            p.state->edges_own = v;
          })
      .def_property_readonly("rows", [](const NativeProfile& p) { return p.state->rows; })
      .def("numeric_summary",
           [](const NativeProfile& p, int64_t i) {
             std::lock_guard<std::mutex> g(p.mutex);
             const auto& ft = p.feature(i);
             FASTML_CHECK_TYPE(ft.num != nullptr, "feature", "'", ft.name, "' is not numeric");
             const drift::NumericState& s = *ft.num;
             py::dict d;
             d["count"] = s.count;
             d["missing"] = s.missing;
             d["nonfinite"] = s.nonfinite;
             d["mean"] = s.mean;
             d["m2"] = s.m2;
             d["variance"] = s.variance();
             d["min"] = s.min;
             d["max"] = s.max;
             d["edges"] = vec_to_numpy(s.edges);
             d["hist"] = vec_to_numpy(s.hist);
             d["mode"] = mode_name(s.mode);
             d["n_values"] = static_cast<int64_t>(s.values.size());
             d["effective_count"] = s.effective_count();
             if (s.sketch) {
               d["sketch_n"] = s.sketch->n();
               d["sketch_items"] = s.sketch->num_items();
               d["sketch_rank_error"] = s.sketch->rank_error();
               d["sketch_bytes"] = s.sketch->num_items() * static_cast<int64_t>(sizeof(double));
             }
             return d;
           })
      .def("categorical_summary",
           [](const NativeProfile& p, int64_t i) {
             std::lock_guard<std::mutex> g(p.mutex);
             const auto& ft = p.feature(i);
             FASTML_CHECK_TYPE(ft.cat != nullptr, "feature", "'", ft.name, "' is not categorical");
             const drift::CategoricalState& c = *ft.cat;
             py::dict d;
             d["total"] = c.total;
             d["missing"] = c.missing;
             d["other"] = c.other;
             d["cap"] = c.cap;
             py::dict counts;
             std::vector<std::pair<std::string, double>> items(c.counts.begin(), c.counts.end());
             std::sort(items.begin(), items.end());
             for (const auto& kv : items) counts[py::str(kv.first)] = kv.second;
             d["counts"] = counts;
             return d;
           })
      .def("quantile_points",
           [](NativeProfile& p, int64_t i) {
             std::vector<double> items, weights;
             {
               std::lock_guard<std::mutex> g(p.mutex);
               const auto& ft = p.feature(i);
               FASTML_CHECK_TYPE(ft.num != nullptr, "feature", "'", ft.name, "' is not numeric");
               quantile_points(*p.state->features[i].num, &items, &weights);
             }
             return py::make_tuple(vec_to_numpy(items), vec_to_numpy(weights));
           })
      .def(
          "add_summary",
          [](NativeProfile& p, int64_t f, double count, double missing, double nonfinite,
             double mean, double m2, double mn, double mx, const py::handle& hist) {
            const auto& ft = p.feature(f);
            FASTML_CHECK_TYPE(ft.num != nullptr, "feature", "'", ft.name, "' is not numeric");
            std::vector<double> h = to_vector(hist, "hist");
            std::lock_guard<std::mutex> g(p.mutex);
            drift::NumericState& s = *p.state->features[f].num;
            FASTML_CHECK_ARG(h.size() == s.hist.size(), "hist", "must have ", s.hist.size(),
                             " slots, got ", h.size());
            FASTML_CHECK_ARG(count >= 0 && missing >= 0 && nonfinite >= 0 && m2 >= 0, "summary",
                             "counts and m2 must be non-negative");
            s.add_moments(count, mean, m2, mn, mx);
            s.count_sq += count;  // new values weigh 1
            s.missing += missing;
            s.nonfinite += nonfinite;
            for (size_t i = 0; i < h.size(); ++i) s.hist[i] += h[i];
          },
          py::arg("feature"), py::arg("count"), py::arg("missing"), py::arg("nonfinite"),
          py::arg("mean"), py::arg("m2"), py::arg("min"), py::arg("max"), py::arg("hist"))
      .def(
          "add_quantile_values",
          [](NativeProfile& p, int64_t f, const py::handle& values) {
            const auto& ft = p.feature(f);
            FASTML_CHECK_TYPE(ft.num != nullptr, "feature", "'", ft.name, "' is not numeric");
            std::vector<double> v = to_vector(values, "values");
            for (double x : v) FASTML_CHECK_ARG(std::isfinite(x), "values", "must be finite");
            std::lock_guard<std::mutex> g(p.mutex);
            p.state->features[f].num->add_quantile_values(v.data(), static_cast<int64_t>(v.size()));
          },
          py::arg("feature"), py::arg("values"))
      .def("compare_numeric", &compare_numeric, py::arg("feature"), py::arg("other"),
           py::arg("other_feature"));

  m.def("_drift_sketch_capacity_bound", &drift::QuantileSketch::capacity_bound, py::arg("k"));

  m.def(
      "_drift_ks_2samp",
      [](const py::handle& a, const py::handle& b) {
        const ArraySpec spec{1, 0, {DType::F64}, Layout::MakeContiguous};
        BoundArray ba = bind_array(a, "a", spec), bb = bind_array(b, "b", spec);
        const int64_t n1 = ba.view.shape[0], n2 = bb.view.shape[0];
        BufferPtr x = Buffer::allocate(static_cast<size_t>(n1) * sizeof(double));
        BufferPtr y = Buffer::allocate(static_cast<size_t>(n2) * sizeof(double));
        drift::KsResult r;
        {
          // Safe without the GIL: the bound arrays are kept alive and only
          // read; the sorted copies are private.
          py::gil_scoped_release release;
          // The two sorts are independent: run them on the shared pool.
          ThreadPool::global().parallel_for(0, 2, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t k = lo; k < hi; ++k) {
              const BoundArray& in = k == 0 ? ba : bb;
              drift::sort_doubles_into(in.view.as<double>(), k == 0 ? n1 : n2,
                                       (k == 0 ? x : y)->as<double>());
            }
          });
          r = drift::ks_2samp_sorted(x->as<double>(), n1, y->as<double>(), n2);
        }
        return py::make_tuple(r.statistic, r.pvalue, r.exact);
      },
      py::arg("a"), py::arg("b"));

  m.def(
      "_drift_wasserstein",
      [](const py::handle& a, const py::handle& b, const py::handle& wa, const py::handle& wb) {
        std::vector<double> x = to_vector(a, "a"), y = to_vector(b, "b");
        std::vector<double> u, v;
        const bool weighted = !wa.is_none();
        if (weighted) {
          u = to_vector(wa, "a_weights");
          v = to_vector(wb, "b_weights");
        }
        double out;
        {
          py::gil_scoped_release release;  // safe: private copies only
          auto sort_by = [](std::vector<double>& vals, std::vector<double>& w) {
            if (w.empty()) {
              drift::sort_doubles(vals.data(), vals.size());
              return;
            }
            std::vector<size_t> idx(vals.size());
            for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
            std::stable_sort(idx.begin(), idx.end(),
                             [&](size_t p, size_t q) { return vals[p] < vals[q]; });
            std::vector<double> sv(vals.size()), sw(vals.size());
            for (size_t i = 0; i < idx.size(); ++i) {
              sv[i] = vals[idx[i]];
              sw[i] = w[idx[i]];
            }
            vals.swap(sv);
            w.swap(sw);
          };
          sort_by(x, u);
          sort_by(y, v);
          out = drift::wasserstein_sorted(x.data(), weighted ? u.data() : nullptr, x.size(),
                                          y.data(), weighted ? v.data() : nullptr, y.size());
        }
        return out;
      },
      py::arg("a"), py::arg("b"), py::arg("a_weights") = py::none(),
      py::arg("b_weights") = py::none());

  m.def(
      "_drift_bin_slots",
      [](const py::handle& values, const py::handle& edges) {
        std::vector<double> v = to_vector(values, "values"), e = to_vector(edges, "edges");
        FASTML_CHECK_ARG(e.size() >= 2, "edges", "must hold at least 2 values, got ", e.size());
        auto buf = Buffer::allocate(v.size() * sizeof(int64_t));
        auto* out = buf->as<int64_t>();
        const auto nb = static_cast<int64_t>(e.size()) - 1;
        for (size_t i = 0; i < v.size(); ++i) {
          FASTML_CHECK_ARG(std::isfinite(v[i]), "values", "must be finite");
          out[i] = drift::histogram_slot(v[i], e.data(), nb);
        }
        return to_numpy(buf, DType::I64, {static_cast<int64_t>(v.size())});
      },
      py::arg("values"), py::arg("edges"));

  m.def(
      "_drift_ingest_cuda",
      [](uintptr_t x, int dtype, int64_t n, int64_t stride, uintptr_t edges, int64_t nbins,
         uintptr_t hist, uintptr_t partials, int blocks, double pivot, uintptr_t stream) {
        FASTML_CHECK_ARG(dtype == 0 || dtype == 1, "dtype", "must be 0 (float32) or 1 (float64)");
        FASTML_CHECK_ARG(n >= 0 && stride >= 1, "n", "and stride must be non-negative/positive");
        cuda::DriftIngestParams p;
        p.x = reinterpret_cast<const void*>(x);
        p.dtype = dtype;
        p.n = n;
        p.stride = stride;
        p.edges = reinterpret_cast<const double*>(edges);
        p.nbins = nbins;
        p.hist = reinterpret_cast<unsigned long long*>(hist);
        p.partials = reinterpret_cast<double*>(partials);
        p.blocks = blocks;
        p.pivot = pivot;
        p.stream = reinterpret_cast<void*>(stream);
        py::gil_scoped_release release;  // safe: raw device pointers owned by the caller's tensors
        cuda::drift_ingest_cuda(p);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("stride"), py::arg("edges"),
      py::arg("nbins"), py::arg("hist"), py::arg("partials"), py::arg("blocks"), py::arg("pivot"),
      py::arg("stream"));
  m.attr("_drift_max_cuda_bins") = cuda::kDriftMaxCudaBins;
  m.def(
      "_drift_ingest_cuda_multi",
      [](const std::vector<
             std::tuple<uintptr_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, double>>& cols,
         int64_t n, uintptr_t edges, uintptr_t hist, uintptr_t partials, uintptr_t done,
         uintptr_t acc, int blocks, uintptr_t stream) {
        FASTML_CHECK_ARG(!cols.empty() && cols.size() <= cuda::kDriftMaxMultiColumns, "cols",
                         "must hold 1..", cuda::kDriftMaxMultiColumns, " columns, got ",
                         cols.size());
        FASTML_CHECK_ARG(n >= 0, "n", "must be non-negative, got ", n);
        cuda::DriftMultiParams p;
        p.ncols = static_cast<int>(cols.size());
        p.n = n;
        for (size_t i = 0; i < cols.size(); ++i) {
          const auto& [x, dtype, stride, edge_offset, nbins, hist_offset, acc_row, pivot] = cols[i];
          FASTML_CHECK_ARG(dtype == 0 || dtype == 1, "dtype", "must be 0 (float32) or 1 (float64)");
          FASTML_CHECK_ARG(stride >= 1, "stride", "must be positive, got ", stride);
          cuda::DriftColumn& c = p.col[i];
          c.x = reinterpret_cast<const void*>(x);
          c.dtype = dtype;
          c.stride = stride;
          c.edge_offset = edge_offset;
          c.nbins = nbins;
          c.hist_offset = hist_offset;
          c.acc_row = acc_row;
          c.pivot = pivot;
        }
        p.edges = reinterpret_cast<const double*>(edges);
        p.hist = reinterpret_cast<unsigned long long*>(hist);
        p.partials = reinterpret_cast<double*>(partials);
        p.done = reinterpret_cast<unsigned int*>(done);
        p.acc = reinterpret_cast<double*>(acc);
        p.blocks = blocks;
        p.stream = reinterpret_cast<void*>(stream);
        py::gil_scoped_release release;  // raw device pointers owned by the caller's tensors
        cuda::drift_ingest_multi_cuda(p);
      },
      py::arg("cols"), py::arg("n"), py::arg("edges"), py::arg("hist"), py::arg("partials"),
      py::arg("done"), py::arg("acc"), py::arg("blocks"), py::arg("stream"),
      "All numeric columns of a batch in one CUDA launch (private; see _gpu.py).");
  m.attr("_drift_max_multi_columns") = cuda::kDriftMaxMultiColumns;

  m.def("_drift_chi2_sf", &drift::chi2_sf, py::arg("x"), py::arg("dof"));
  m.def("_drift_kstwo_sf", &drift::kstwo_sf, py::arg("n"), py::arg("x"));

  py::class_<drift::Adwin>(m, "_DriftADWIN")
      .def(py::init<double, int, int, int, int>(), py::arg("delta"), py::arg("clock"),
           py::arg("max_buckets"), py::arg("min_window_length"), py::arg("grace_period"))
      .def("update",
           [](drift::Adwin& d, const py::handle& x) {
             std::vector<double> v = to_vector(x, "values");
             std::vector<int64_t> idx;
             {
               py::gil_scoped_release release;  // safe: private copy; callers serialise use
               idx = d.update(v.data(), v.size());
             }
             return idx;
           })
      .def("reset", &drift::Adwin::reset)
      .def_property_readonly("width", &drift::Adwin::width)
      .def_property_readonly("total", &drift::Adwin::total)
      .def_property_readonly("variance", &drift::Adwin::variance)
      .def_property_readonly("n_detections", &drift::Adwin::n_detections);

  py::class_<drift::PageHinkley>(m, "_DriftPageHinkley")
      .def(py::init<int64_t, double, double, double, int>(), py::arg("min_instances"),
           py::arg("delta"), py::arg("threshold"), py::arg("alpha"), py::arg("mode"))
      .def("update",
           [](drift::PageHinkley& d, const py::handle& x) {
             std::vector<double> v = to_vector(x, "values");
             return d.update(v.data(), v.size());
           })
      .def("reset", &drift::PageHinkley::reset);

  py::class_<drift::Ddm>(m, "_DriftDDM")
      .def(py::init<int64_t, double, double>(), py::arg("warm_start"), py::arg("warning_threshold"),
           py::arg("drift_threshold"))
      .def("update",
           [](drift::Ddm& d, const py::handle& x) {
             std::vector<double> v = to_vector(x, "values");
             std::vector<int64_t> warnings;
             auto idx = d.update(v.data(), v.size(), &warnings);
             return py::make_tuple(idx, warnings);
           })
      .def("reset", &drift::Ddm::reset)
      .def_property_readonly("warning", &drift::Ddm::warning);
}

}  // namespace fastml::bind
