// The versioned binary format of a drift profile.
//
//   offset  size  field
//   0       8     magic "FMLDRIFT"
//   8       2     format version (4; 4 adds a flags byte after the requested
//                 bins (bit 0: the edges come from the profile's own data), 3
//                 the requested bins after the sketch size, 2 the decay state;
//                 versions 1 to 3 still read)
//   10      2     reserved, 0
//   12      4     CRC-32 (IEEE) of the payload
//   16      8     payload length in bytes
//   24      ...   payload (little-endian; see write_payload)
//
// Every length is checked against the bytes that remain before it is used,
// so truncated, corrupted or foreign input raises fastml.FormatError (a
// ValueError) with the byte offset, never a crash.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "common/checksum.hpp"
#include "common/errors.hpp"
#include "drift/feature_state.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fastml's drift profile format assumes a little-endian host"
#endif

namespace fastml::drift {

namespace {

constexpr char kMagic[8] = {'F', 'M', 'L', 'D', 'R', 'I', 'F', 'T'};
constexpr uint16_t kVersion = 4;
constexpr size_t kHeader = 24;

struct Writer {
  std::vector<uint8_t> out;
  template <typename T>
  void put(T v) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(out.data() + at, &v, sizeof(T));
  }
  template <typename Vec>
  void put_doubles(const Vec& v) {
    const size_t at = out.size();
    out.resize(at + v.size() * sizeof(double));
    if (!v.empty()) std::memcpy(out.data() + at, v.data(), v.size() * sizeof(double));
  }
  void put_str(const std::string& s) {
    put<uint32_t>(static_cast<uint32_t>(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
};

struct Reader {
  const uint8_t* p;
  size_t size, pos = 0;
  [[noreturn]] void corrupt(const char* what) const {
    fail<FormatError>("data is not a valid fastml drift profile: ", what, " at byte ",
                      pos + kHeader);
  }
  void need(size_t n) const {
    if (n > size - pos) corrupt("truncated");
  }
  template <typename T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  double get_count() {  // a finite, non-negative count
    const double v = get<double>();
    if (!(v >= 0 && std::isfinite(v))) corrupt("negative or non-finite count");
    return v;
  }
  double get_finite() {
    const double v = get<double>();
    if (!std::isfinite(v)) corrupt("non-finite statistic");
    return v;
  }
  std::vector<double> get_doubles(uint64_t n) {
    if (n > (size - pos) / sizeof(double)) corrupt("truncated array");
    std::vector<double> v(static_cast<size_t>(n));
    if (n) std::memcpy(v.data(), p + pos, static_cast<size_t>(n) * sizeof(double));
    pos += static_cast<size_t>(n) * sizeof(double);
    return v;
  }
  std::string get_str() {
    const uint32_t n = get<uint32_t>();
    need(n);
    std::string s(reinterpret_cast<const char*>(p + pos), n);
    const size_t bad = utf8_invalid_at(s);
    if (bad != std::string::npos) {
      pos += bad;
      corrupt("a name that is not valid UTF-8");
    }
    pos += n;
    return s;
  }
};

void write_numeric(Writer& w, const NumericState& s) {
  for (double v : {s.count, s.missing, s.nonfinite, s.mean, s.m2, s.min, s.max}) w.put<double>(v);
  w.put<double>(s.count_sq);  // v2
  w.put<uint32_t>(static_cast<uint32_t>(s.edges.size()));
  w.put_doubles(s.edges);
  w.put_doubles(s.hist);
  w.put<uint8_t>(static_cast<uint8_t>(s.mode));
  if (s.mode == QuantileMode::Exact) {
    w.put<uint64_t>(s.values.size());
    w.put<uint8_t>(s.sorted ? 1 : 0);
    w.put_doubles(s.values);
    w.put<uint8_t>(s.decayed ? 1 : 0);  // v2: decay state
    if (s.decayed) {
      w.put<double>(s.decay_exp);
      w.put<double>(s.pruned_at);
      w.put_doubles(s.vexp);
    }
  } else if (s.mode == QuantileMode::Sketch) {
    const QuantileSketch& q = *s.sketch;
    w.put<uint32_t>(static_cast<uint32_t>(q.k()));
    w.put<uint64_t>(q.n());
    w.put<double>(q.error_sum());
    w.put<double>(q.thin_variance());  // v2
    w.put<uint64_t>(q.rng_state());
    w.put<uint32_t>(static_cast<uint32_t>(q.num_levels()));
    for (const auto& level : q.levels()) {
      w.put<uint32_t>(static_cast<uint32_t>(level.size()));
      w.put_doubles(level);
    }
  }
}

std::unique_ptr<NumericState> read_numeric(Reader& r, QuantileMode profile_mode, int sketch_k,
                                           uint16_t version) {
  double f[8];
  f[0] = r.get_count();
  f[1] = r.get_count();
  f[2] = r.get_count();
  f[3] = r.get_finite();
  f[4] = r.get_count();
  f[5] = r.get_finite();
  f[6] = r.get_finite();
  f[7] = version >= 2 ? r.get_count() : f[0];  // undecayed v1: squared weights sum = count
  const uint32_t nedges = r.get<uint32_t>();
  if (nedges < 2) r.corrupt("fewer than 2 histogram edges");
  std::vector<double> edges = r.get_doubles(nedges);
  std::unique_ptr<NumericState> s;
  const auto mode_pos = r.pos;
  try {
    s = std::make_unique<NumericState>(std::move(edges), profile_mode, sketch_k);
  } catch (const std::invalid_argument&) {
    r.pos = mode_pos;
    r.corrupt("invalid histogram edges");
  }
  s->count = f[0];
  s->missing = f[1];
  s->nonfinite = f[2];
  s->mean = f[3];
  s->m2 = f[4];
  s->min = f[5];
  s->max = f[6];
  s->count_sq = f[7];
  s->hist = r.get_doubles(nedges + 1);
  for (double h : s->hist)
    if (!(h >= 0 && std::isfinite(h))) r.corrupt("negative or non-finite histogram count");
  const auto mode = static_cast<QuantileMode>(r.get<uint8_t>());
  if (mode != profile_mode) r.corrupt("quantile mode differs from the profile's");
  if (mode == QuantileMode::Exact) {
    const uint64_t n = r.get<uint64_t>();
    const uint8_t sorted = r.get<uint8_t>();
    if (sorted > 1) r.corrupt("bad flag");
    {
      const std::vector<double> got = r.get_doubles(n);
      s->values.assign(got.begin(), got.end());
    }
    for (double v : s->values)
      if (!std::isfinite(v)) r.corrupt("non-finite stored value");
    s->sorted = sorted == 1 && std::is_sorted(s->values.begin(), s->values.end());
    const uint8_t decayed = version >= 2 ? r.get<uint8_t>() : 0;
    if (decayed > 1) r.corrupt("bad flag");
    if (decayed) {
      s->decayed = true;
      s->decay_exp = r.get_finite();
      s->pruned_at = r.get_finite();
      s->vexp = r.get_doubles(n);
      for (double e : s->vexp)
        if (!std::isfinite(e) || e > s->decay_exp) r.corrupt("bad value weight");
      if (s->pruned_at > s->decay_exp) r.corrupt("bad decay state");
    }
  } else if (mode == QuantileMode::Sketch) {
    const uint32_t k = r.get<uint32_t>();
    if (static_cast<int>(k) != sketch_k) r.corrupt("sketch size differs from the profile's");
    const uint64_t n = r.get<uint64_t>();
    const double err = r.get_count();
    const double thin = version >= 2 ? r.get_count() : 0.0;
    const uint64_t rng = r.get<uint64_t>();
    const uint32_t nlevels = r.get<uint32_t>();
    if (nlevels < 1 || nlevels > static_cast<uint32_t>(QuantileSketch::kMaxLevels)) {
      r.corrupt("bad sketch level count");
    }
    std::vector<std::vector<double>> levels(nlevels);
    for (auto& level : levels) {
      const uint32_t len = r.get<uint32_t>();
      level = r.get_doubles(len);
      for (double v : level)
        if (!std::isfinite(v)) r.corrupt("non-finite sketch item");
    }
    try {
      s->sketch->restore(n, err, thin, rng, std::move(levels));
    } catch (const std::invalid_argument&) {
      r.corrupt("inconsistent sketch");
    }
  } else if (mode != QuantileMode::None) {
    r.corrupt("unknown quantile mode");
  }
  // Behind the checksum, the fields must agree with one another: the
  // histogram counts the finite values, the exact values are those values
  // (undecayed), a sketch holds as many as were counted (unthinned), and the
  // moments lie within the extremes. A profile whose count says 1e9 over a few
  // thousand stored values would otherwise turn every distance to nonsense.
  double hist_total = 0;
  for (double h : s->hist) hist_total += h;
  const double tol = 1e-9 * std::max(1.0, s->count);
  if (std::abs(hist_total - s->count) > tol) r.corrupt("histogram counts differ from the count");
  if (s->count_sq > s->count * s->count + tol || (s->count > 0 && s->count_sq <= 0)) {
    r.corrupt("inconsistent squared weights");
  }
  if (s->count > 0 && !(s->min <= s->max && s->mean >= s->min - 1e-9 * std::abs(s->min) &&
                        s->mean <= s->max + 1e-9 * std::abs(s->max))) {
    r.corrupt("inconsistent extremes and mean");
  }
  if (mode == QuantileMode::Exact && !s->decayed &&
      static_cast<double>(s->values.size()) != s->count) {
    r.corrupt("stored values differ from the count");
  }
  if (mode == QuantileMode::Sketch && s->sketch->thin_variance() == 0 &&
      static_cast<double>(s->sketch->n()) != s->count) {
    r.corrupt("the sketch's size differs from the count");
  }
  return s;
}

}  // namespace

std::vector<uint8_t> ProfileState::to_bytes() const {
  Writer w;
  w.put<uint8_t>(static_cast<uint8_t>(mode));
  w.put<uint32_t>(static_cast<uint32_t>(sketch_k));
  w.put<uint32_t>(static_cast<uint32_t>(bins));  // v3
  w.put<uint8_t>(edges_own ? 1 : 0);             // v4: flags
  w.put<double>(rows);
  w.put<uint32_t>(static_cast<uint32_t>(features.size()));
  for (const Feature& f : features) {
    w.put_str(f.name);
    w.put<uint8_t>(static_cast<uint8_t>(f.kind));
    if (f.kind == FeatureKind::Numeric) {
      write_numeric(w, *f.num);
    } else {
      const CategoricalState& c = *f.cat;
      w.put<int64_t>(c.cap);
      w.put<double>(c.total);
      w.put<double>(c.missing);
      w.put<double>(c.other);
      std::vector<std::pair<std::string, double>> items(c.counts.begin(), c.counts.end());
      std::sort(items.begin(), items.end());  // deterministic bytes
      w.put<uint32_t>(static_cast<uint32_t>(items.size()));
      for (const auto& kv : items) {
        w.put_str(kv.first);
        w.put<double>(kv.second);
      }
    }
  }
  std::vector<uint8_t> out(kHeader);
  std::memcpy(out.data(), kMagic, 8);
  const uint16_t version = kVersion, reserved = 0;
  const uint32_t crc = crc32(w.out.data(), w.out.size());
  const uint64_t len = w.out.size();
  std::memcpy(out.data() + 8, &version, 2);
  std::memcpy(out.data() + 10, &reserved, 2);
  std::memcpy(out.data() + 12, &crc, 4);
  std::memcpy(out.data() + 16, &len, 8);
  out.insert(out.end(), w.out.begin(), w.out.end());
  return out;
}

std::unique_ptr<ProfileState> ProfileState::from_bytes(const uint8_t* data, size_t size) {
  if (size < kHeader || std::memcmp(data, kMagic, 8) != 0) {
    fail<FormatError>(
        "data is not a fastml drift profile (missing the 'FMLDRIFT' "
        "header; got ",
        size, " bytes)");
  }
  uint16_t version, reserved;
  uint32_t crc;
  uint64_t len;
  std::memcpy(&version, data + 8, 2);
  std::memcpy(&reserved, data + 10, 2);
  std::memcpy(&crc, data + 12, 4);
  std::memcpy(&len, data + 16, 8);
  if (version < 1 || version > kVersion || reserved != 0) {
    fail<FormatError>("data is a fastml drift profile of format version ", version,
                      "; this fastml reads versions 1 to ", kVersion);
  }
  if (len != size - kHeader) {
    fail<FormatError>("data is not a valid fastml drift profile: the header says ", len,
                      " payload bytes, got ", size - kHeader, " (truncated or padded)");
  }
  if (crc32(data + kHeader, size - kHeader) != crc) {
    fail<FormatError>("data is not a valid fastml drift profile: checksum mismatch (corrupted)");
  }
  Reader r{data + kHeader, size - kHeader};
  auto p = std::make_unique<ProfileState>();
  const uint8_t mode = r.get<uint8_t>();
  if (mode > 2) r.corrupt("unknown mode");  // 0: histogram, 1: exact, 2: sketch
  p->mode = static_cast<QuantileMode>(mode);
  const uint32_t k = r.get<uint32_t>();
  if (k < 8 || k > 65536) r.corrupt("bad sketch size");
  p->sketch_k = static_cast<int>(k);
  if (version >= 3) {
    const uint32_t bins = r.get<uint32_t>();
    if (bins > (1u << 24)) r.corrupt("bad bin count");
    p->bins = static_cast<int>(bins);
  }
  if (version >= 4) {
    const uint8_t flags = r.get<uint8_t>();
    if (flags & ~1u) r.corrupt("unknown flags");
    p->edges_own = (flags & 1u) != 0;
  }
  p->rows = r.get_count();
  const uint32_t nfeat = r.get<uint32_t>();
  if (nfeat > r.size - r.pos) r.corrupt("feature count larger than the data");
  std::set<std::string> names;
  for (uint32_t i = 0; i < nfeat; ++i) {
    Feature f;
    f.name = r.get_str();
    if (!names.insert(f.name).second) r.corrupt("duplicate feature name");
    const uint8_t kind = r.get<uint8_t>();
    if (kind == 0) {
      f.kind = FeatureKind::Numeric;
      f.num = read_numeric(r, p->mode, p->sketch_k, version);
    } else if (kind == 1) {
      f.kind = FeatureKind::Categorical;
      f.cat = std::make_unique<CategoricalState>();
      auto& c = *f.cat;
      c.cap = r.get<int64_t>();
      if (c.cap < 1 || c.cap > (int64_t{1} << 32)) r.corrupt("bad category cap");
      c.total = r.get_count();
      c.missing = r.get_count();
      c.other = r.get_count();
      const uint32_t nkeys = r.get<uint32_t>();
      if (nkeys > c.cap || nkeys > r.size - r.pos) r.corrupt("too many categories");
      for (uint32_t j = 0; j < nkeys; ++j) {
        std::string key = r.get_str();
        const double cnt = r.get_count();
        if (!c.counts.emplace(std::move(key), cnt).second) r.corrupt("duplicate category");
      }
    } else {
      r.corrupt("unknown feature kind");
    }
    p->features.push_back(std::move(f));
  }
  if (r.pos != r.size) r.corrupt("trailing bytes");
  return p;
}

}  // namespace fastml::drift
