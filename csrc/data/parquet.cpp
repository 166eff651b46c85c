#include "data/parquet.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>

#include "common/checksum.hpp"

namespace fastml::data::parquet {

namespace {

// Encodings and page types (parquet.thrift).
enum Encoding : int32_t {
  kPlain = 0,
  kPlainDictionary = 2,
  kRle = 3,
  kRleDictionary = 8,
  kByteStreamSplit = 9,
};
enum PageType : int32_t { kDataPage = 0, kDictionaryPage = 2, kDataPageV2 = 3 };

template <typename... Args>
[[noreturn]] void corrupt(Args&&... args) {
  fail<IOError>(std::forward<Args>(args)...);
}

// Bytes left in [p, end) (0 when p is past end, which never happens: every
// advance is checked first).
inline size_t left(const uint8_t* p, const uint8_t* end) {
  return p < end ? static_cast<size_t>(end - p) : 0;
}

// ------------------------------------------------------------ Thrift compact protocol

// Reads the compact protocol's structs field by field (only what a page header
// needs); every read is bounds-checked, nesting is limited.
class Thrift {
 public:
  static constexpr int kMaxDepth = 32;
  enum Type : int {
    kTrue = 1,
    kFalse = 2,
    kByte = 3,
    kI16 = 4,
    kI32 = 5,
    kI64 = 6,
    kDouble = 7,
    kBinary = 8,
    kList = 9,
    kSet = 10,
    kMap = 11,
    kStruct = 12,
  };

  Thrift(const uint8_t* p, const uint8_t* end) : p_(p), end_(end) {}
  const uint8_t* pos() const { return p_; }

  uint8_t byte() {
    if (p_ >= end_) corrupt("page header is truncated");
    return *p_++;
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const uint8_t b = byte();
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    corrupt("page header holds a malformed integer");
  }
  int64_t zigzag() {
    const uint64_t v = varint();
    return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1);
  }
  int32_t i32(int type) {
    if (type != kI32) corrupt("page header field has type ", type, ", expected i32");
    const int64_t v = zigzag();
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
      corrupt("page header i32 field out of range: ", v);
    }
    return static_cast<int32_t>(v);
  }
  bool boolean(int type) {
    if (type != kTrue && type != kFalse) corrupt("page header field has type ", type, ", not bool");
    return type == kTrue;
  }
  int64_t i64(int type) {
    if (type != kI64 && type != kI32) corrupt("field has type ", type, ", expected i64");
    return zigzag();
  }
  // A list or set header: the element type and count (checked against the bytes left).
  std::pair<int, uint64_t> list_header(int type) {
    if (type != kList && type != kSet) corrupt("field has type ", type, ", expected a list");
    const uint8_t h = byte();
    uint64_t n = h >> 4;
    if (n == 15) n = varint();
    check_count(n);
    return {h & 0x0f, n};
  }
  std::string binary(int type) {
    if (type != kBinary) corrupt("field has type ", type, ", expected binary");
    const uint64_t n = varint();
    if (n > left(p_, end_)) corrupt("a string runs past the end of the footer");
    std::string s(reinterpret_cast<const char*>(p_), static_cast<size_t>(n));
    p_ += n;
    return s;
  }

  // Calls fn(field_id, type, depth + 1) for each field of a struct; fn must
  // consume the field's value (or skip it).
  template <typename Fn>
  void read_struct(int depth, Fn&& fn) {
    if (depth > kMaxDepth) corrupt("page header nests deeper than ", kMaxDepth, " levels");
    int64_t last = 0;
    for (;;) {
      const uint8_t h = byte();
      // A field header whose type nibble is 0 is STOP, whatever its high bits
      // (as Thrift's own TCompactProtocol reads it).
      if ((h & 0x0f) == 0) return;
      const int type = h & 0x0f;
      const int delta = h >> 4;
      const int64_t id = delta ? last + delta : zigzag();
      last = id;
      fn(id, type, depth + 1);
    }
  }

  // Skips one value of `type` (in_container: an element of a list, set or map,
  // where a bool takes one byte).
  void skip(int type, int depth, bool in_container = false) {
    if (depth > kMaxDepth) corrupt("page header nests deeper than ", kMaxDepth, " levels");
    switch (type) {
      case kTrue:
      case kFalse:
        if (in_container) byte();
        return;
      case kByte: byte(); return;
      case kI16:
      case kI32:
      case kI64: varint(); return;
      case kDouble: skip_bytes(8); return;
      case kBinary: skip_bytes(varint()); return;
      case kList:
      case kSet: {
        const uint8_t h = byte();
        uint64_t n = h >> 4;
        if (n == 15) n = varint();
        check_count(n);
        for (uint64_t i = 0; i < n; ++i) skip(h & 0x0f, depth + 1, true);
        return;
      }
      case kMap: {
        const uint64_t n = varint();
        if (n == 0) return;
        check_count(n);
        const uint8_t kv = byte();
        for (uint64_t i = 0; i < n; ++i) {
          skip(kv >> 4, depth + 1, true);
          skip(kv & 0x0f, depth + 1, true);
        }
        return;
      }
      case kStruct: read_struct(depth, [&](int64_t, int t, int d) { skip(t, d); }); return;
      default: corrupt("page header holds an unknown field type ", type);
    }
  }

 private:
  void skip_bytes(uint64_t n) {
    if (n > left(p_, end_)) corrupt("page header is truncated");
    p_ += n;
  }
  // Every element takes at least one byte: a count above the bytes left is corrupt
  // (and would otherwise loop for a long time).
  void check_count(uint64_t n) const {
    if (n > left(p_, end_)) corrupt("page header holds a container of ", n, " elements");
  }

  const uint8_t* p_;
  const uint8_t* end_;
};

struct PageHeader {
  int32_t type = -1;
  int32_t uncompressed_size = -1;
  int32_t compressed_size = -1;
  bool has_crc = false;
  uint32_t crc = 0;  // CRC-32 of the page's bytes as stored (after the header)
  bool has_data_v1 = false, has_dict = false, has_data_v2 = false;
  int32_t num_values = -1;
  int32_t encoding = -1;
  int32_t def_encoding = kRle;
  int32_t def_bytes = 0;      // v2
  int32_t rep_bytes = 0;      // v2
  bool is_compressed = true;  // v2
};

PageHeader read_page_header(Thrift& t) {
  PageHeader h;
  t.read_struct(0, [&](int64_t id, int type, int depth) {
    switch (id) {
      case 1: h.type = t.i32(type); break;
      case 2: h.uncompressed_size = t.i32(type); break;
      case 3: h.compressed_size = t.i32(type); break;
      case 4:  // crc: written as a signed i32
        h.crc = static_cast<uint32_t>(t.i32(type));
        h.has_crc = true;
        break;
      case 5:    // DataPageHeader
      case 7:    // DictionaryPageHeader
      case 8: {  // DataPageHeaderV2
        if (type != Thrift::kStruct) corrupt("page header field ", id, " is not a struct");
        (id == 5 ? h.has_data_v1 : id == 7 ? h.has_dict : h.has_data_v2) = true;
        uint32_t seen = 0;  // the sub-header's fields present (bit = field id)
        t.read_struct(depth, [&](int64_t sub, int st, int d) {
          if (sub >= 1 && sub < 32) seen |= 1u << sub;
          if (sub == 1) {
            h.num_values = t.i32(st);
          } else if (id == 5 && sub == 2) {
            h.encoding = t.i32(st);
          } else if (id == 5 && sub == 3) {
            h.def_encoding = t.i32(st);
          } else if (id == 7 && sub == 2) {
            h.encoding = t.i32(st);
          } else if (id == 8 && sub == 4) {
            h.encoding = t.i32(st);
          } else if (id == 8 && sub == 5) {
            h.def_bytes = t.i32(st);
          } else if (id == 8 && sub == 6) {
            h.rep_bytes = t.i32(st);
          } else if (id == 8 && sub == 7) {
            h.is_compressed = t.boolean(st);
          } else {
            t.skip(st, d);
          }
        });
        {
          // The fields parquet.thrift marks required, which Thrift's own
          // readers (pyarrow's among them) refuse a header without:
          // DataPageHeader 1-4, DictionaryPageHeader 1-2, DataPageHeaderV2 1-6.
          const uint32_t required = id == 5 ? 0x1Eu : id == 7 ? 0x06u : 0x7Eu;
          if ((seen & required) != required) {
            corrupt("page header field ", id, " lacks a required field");
          }
        }
        break;
      }
      default: t.skip(type, depth);
    }
  });
  if (h.type < 0 || h.uncompressed_size < 0 || h.compressed_size < 0) {
    corrupt("page header lacks its type or sizes");
  }
  return h;
}

// ------------------------------------------------------------ RLE / bit-packed hybrid

// Parquet's RLE/bit-packing hybrid (levels and dictionary indices), run by run.
class Hybrid {
 public:
  Hybrid(const uint8_t* p, const uint8_t* end, int bit_width)
      : p_(p),
        end_(end),
        bw_(bit_width),
        mask_(bit_width == 32 ? 0xffffffffu : (1u << bit_width) - 1) {}

  struct Run {
    bool rle;
    uint32_t value;       // rle
    const uint8_t* bits;  // bit-packed: the packed values
    int64_t count;        // values in the run (bit-packed: multiple of 8)
  };

  // The next run; false when the data ends.
  bool next(Run& r) {
    if (p_ >= end_) return false;
    const uint64_t header = varint();
    if (header & 1) {  // bit-packed: (header >> 1) groups of 8 values, bw bytes each
      const uint64_t groups = header >> 1;
      if (bw_ == 0) {  // zero-width values take no bytes (parquet-java writes these)
        if (groups > static_cast<uint64_t>(std::numeric_limits<int64_t>::max() / 8)) {
          corrupt("bit-packed run too long");
        }
        r = {false, 0, p_, static_cast<int64_t>(groups * 8)};
        return true;
      }
      if (groups > left(p_, end_) ||
          (bw_ > 0 && groups * static_cast<uint64_t>(bw_) > left(p_, end_))) {
        // A bit-packed run may be cut short at the end of the page: its last
        // group is padded only as far as values remain. Take what is there,
        // but no more than one group may be missing (a run declaring more is
        // corrupt, as pyarrow finds too).
        const uint64_t bytes = left(p_, end_);
        if (groups > bytes / static_cast<uint64_t>(bw_) + 1) {
          corrupt("bit-packed run of ", groups, " groups runs past the data (", bytes, " bytes)");
        }
        r = {false, 0, p_,
             bw_ > 0 ? static_cast<int64_t>(bytes * 8 / static_cast<uint64_t>(bw_)) : 0};
        p_ = end_;
        return r.count > 0;
      }
      r = {false, 0, p_, static_cast<int64_t>(groups * 8)};
      p_ += groups * static_cast<uint64_t>(bw_);
      return true;
    }
    const uint64_t count = header >> 1;
    const int nbytes = (bw_ + 7) / 8;
    if (static_cast<size_t>(nbytes) > left(p_, end_)) corrupt("RLE run is truncated");
    uint32_t v = 0;
    for (int i = 0; i < nbytes; ++i) v |= static_cast<uint32_t>(p_[i]) << (8 * i);
    p_ += nbytes;
    if (v > mask_) corrupt("RLE run value ", v, " exceeds its bit width ", bw_);
    if (count > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      corrupt("RLE run too long");
    r = {true, v, nullptr, static_cast<int64_t>(count)};
    return true;
  }

  // Value i of a bit-packed run (i < r.count; the run's bytes are in bounds).
  uint32_t unpack_slow(const Run& r, int64_t i) const {
    const uint64_t bit = static_cast<uint64_t>(i) * static_cast<uint64_t>(bw_);
    const uint8_t* q = r.bits + (bit >> 3);
    uint64_t w = 0;
    const size_t avail = std::min<size_t>(8, left(q, end_));
    std::memcpy(&w, q, avail);
    return static_cast<uint32_t>(w >> (bit & 7)) & mask_;
  }

  // Calls f(k, value) for values k = 0 .. n-1 of a bit-packed run (n <= r.count).
  template <typename F>
  void visit(const Run& r, int64_t n, F&& f) const {
    if (bw_ == 0) {
      for (int64_t k = 0; k < n; ++k) f(k, 0u);
      return;
    }
    // Whole groups of 8 with the bit width a constant (shifts and offsets
    // known at compile time), then the rest one by one.
    int64_t k = 0;
    switch (bw_) {
#define FASTML_PARQUET_BW(B) \
  case B: k = visit_groups<B>(r.bits, left(r.bits, end_), n, f); break;
      FASTML_PARQUET_BW(1)
      FASTML_PARQUET_BW(2)
      FASTML_PARQUET_BW(3)
      FASTML_PARQUET_BW(4)
      FASTML_PARQUET_BW(5)
      FASTML_PARQUET_BW(6)
      FASTML_PARQUET_BW(7)
      FASTML_PARQUET_BW(8)
      FASTML_PARQUET_BW(9)
      FASTML_PARQUET_BW(10)
      FASTML_PARQUET_BW(11)
      FASTML_PARQUET_BW(12)
      FASTML_PARQUET_BW(13)
      FASTML_PARQUET_BW(14)
      FASTML_PARQUET_BW(15)
      FASTML_PARQUET_BW(16)
      FASTML_PARQUET_BW(17)
      FASTML_PARQUET_BW(18)
      FASTML_PARQUET_BW(19)
      FASTML_PARQUET_BW(20)
      FASTML_PARQUET_BW(21)
      FASTML_PARQUET_BW(22)
      FASTML_PARQUET_BW(23)
      FASTML_PARQUET_BW(24)
#undef FASTML_PARQUET_BW
      default: break;
    }
    // Values whose 8-byte load stays inside the data: k * bw / 8 + 8 <= bytes.
    const size_t bytes = left(r.bits, end_);
    const auto bw = static_cast<uint64_t>(bw_);
    const int64_t safe =
        std::min<int64_t>(n, bytes < 8 ? 0 : static_cast<int64_t>(((bytes - 8) * 8) / bw) + 1);
    const uint8_t* const bits = r.bits;
    const uint32_t mask = mask_;
    uint64_t bit = static_cast<uint64_t>(k) * bw;
    for (; k < safe; ++k, bit += bw) {
      uint64_t w;
      std::memcpy(&w, bits + (bit >> 3), 8);
      f(k, static_cast<uint32_t>(w >> (bit & 7)) & mask);
    }
    for (; k < n; ++k) f(k, unpack_slow(r, k));
  }

  // f(k, value) for the whole groups of 8 values of a bit-packed run whose
  // 8-byte loads stay inside `bytes`; returns the values done (a multiple of 8).
  template <int B, typename F>
  static int64_t visit_groups(const uint8_t* bits, size_t bytes, int64_t n, F& f) {
    constexpr uint32_t kMask = (uint32_t{1} << B) - 1;
    // Group g's last load reads bytes [g*B + (7*B)/8, +8).
    constexpr size_t kReach = (7 * B) / 8 + 8;
    const int64_t groups = n / 8;
    const int64_t fit = bytes < kReach ? 0 : static_cast<int64_t>((bytes - kReach) / B) + 1;
    const int64_t g_end = std::min(groups, fit);
    for (int64_t g = 0; g < g_end; ++g) {
      const uint8_t* b = bits + g * B;
      group<B, 0>(b, g * 8, f, kMask);
      group<B, 1>(b, g * 8, f, kMask);
      group<B, 2>(b, g * 8, f, kMask);
      group<B, 3>(b, g * 8, f, kMask);
      group<B, 4>(b, g * 8, f, kMask);
      group<B, 5>(b, g * 8, f, kMask);
      group<B, 6>(b, g * 8, f, kMask);
      group<B, 7>(b, g * 8, f, kMask);
    }
    return g_end * 8;
  }
  template <int B, int K, typename F>
  static inline void group(const uint8_t* b, int64_t base, F& f, uint32_t mask) {
    uint64_t w;
    std::memcpy(&w, b + (K * B) / 8, 8);
    f(base + K, static_cast<uint32_t>(w >> ((K * B) % 8)) & mask);
  }

  int bit_width() const { return bw_; }

 private:
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) corrupt("RLE/bit-packed run header is truncated");
      const uint8_t b = *p_++;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    corrupt("RLE/bit-packed run header is malformed");
  }

  const uint8_t* p_;
  const uint8_t* end_;
  int bw_;
  uint32_t mask_;
};

int bit_width_of(int64_t max_value) {
  int bw = 0;
  while (bw < 63 && (int64_t{1} << bw) <= max_value) ++bw;
  return bw;
}

// Definition levels of `n` values into `levels` (only when some are below the
// maximum); returns how many are present (= max_def).
int64_t decode_levels(const uint8_t* p, const uint8_t* end, int max_def, int64_t n,
                      std::unique_ptr<uint8_t[]>& levels, bool& all_present) {
  Hybrid h(p, end, bit_width_of(max_def));
  Hybrid::Run r;
  int64_t done = 0;
  all_present = true;
  int64_t present = 0;
  while (done < n) {
    if (!h.next(r)) corrupt("definition levels end after ", done, " of ", n, " values");
    const int64_t m = std::min(r.count, n - done);
    if (r.rle && r.value == static_cast<uint32_t>(max_def) && all_present) {
      done += m;
      present += m;
      continue;
    }
    if (all_present) {  // first gap: expand what came before
      levels.reset(new uint8_t[static_cast<size_t>(n)]);
      std::fill(levels.get(), levels.get() + done, static_cast<uint8_t>(max_def));
      all_present = false;
    }
    uint8_t* out = levels.get() + done;
    if (r.rle) {
      if (r.value > static_cast<uint32_t>(max_def))
        corrupt("definition level ", r.value, " > ", max_def);
      std::fill(out, out + m, static_cast<uint8_t>(r.value));
      if (r.value == static_cast<uint32_t>(max_def)) present += m;
    } else {
      uint32_t bad = 0;
      int64_t got = 0;
      const auto md = static_cast<uint32_t>(max_def);
      h.visit(r, m, [&](int64_t k, uint32_t v) {
        bad |= static_cast<uint32_t>(v > md);
        out[k] = static_cast<uint8_t>(v);
        got += v == md;
      });
      if (bad) corrupt("definition level above ", max_def);
      present += got;
    }
    done += m;
  }
  return present;
}

// ------------------------------------------------------------ values

// Scratch memory that is not zeroed on allocation.
class Scratch {
 public:
  uint8_t* get(size_t n) {
    if (n > cap_ || !buf_) {
      buf_.reset(new uint8_t[std::max<size_t>(n, 1)]);
      cap_ = std::max<size_t>(n, 1);
      init_ = 0;
    }
    return buf_.get();
  }
  // Frees the memory when it exceeds `max_bytes` (thread-local scratch keeps
  // ordinary page sizes from chunk to chunk, not one huge page forever).
  void trim(size_t max_bytes) {
    if (cap_ > max_bytes) {
      buf_.reset();
      cap_ = init_ = 0;
    }
  }
  // At least n bytes, all of them initialized (zeroed the first time they are
  // handed out; later they keep whatever was written).
  uint8_t* get_initialized(size_t n) {
    if (n > cap_) {
      buf_.reset(new uint8_t[n]);
      cap_ = n;
      init_ = 0;
    }
    if (init_ < n) {
      std::memset(buf_.get() + init_, 0, n - init_);
      init_ = n;
    }
    return buf_.get();
  }

 private:
  std::unique_ptr<uint8_t[]> buf_;
  size_t cap_ = 0;
  size_t init_ = 0;
};

struct Dictionary {
  const uint8_t* values = nullptr;  // aligned copy
  int64_t count = -1;               // -1: no dictionary page seen
  uint64_t readable = 0;            // entries that may be read (>= count: padding)
};

// Dictionaries are padded to a power of two entries up to this size, so that
// indices of the bit width the writer chose can be looked up without a clamp
// (an index >= count is still reported as corrupt, after the run).
constexpr uint64_t kMaxPaddedDictBytes = uint64_t{4} << 20;

// `n` values of width sizeof(T) (bit patterns) into out.
// Booleans: PLAIN is one bit per value (LSB first); RLE (v2 pages) is the
// hybrid at bit width 1 after a 4-byte length.
void decode_booleans(int32_t encoding, const uint8_t* p, const uint8_t* end, int64_t n,
                     uint8_t* out) {
  if (encoding == kPlain) {
    if (static_cast<size_t>((n + 7) / 8) > left(p, end)) {
      corrupt("PLAIN boolean page holds fewer values than its header says");
    }
    for (int64_t i = 0; i < n; ++i) out[i] = (p[i >> 3] >> (i & 7)) & 1u;
    return;
  }
  if (encoding != kRle) throw Unsupported(detail::concat("boolean encoding ", encoding));
  if (left(p, end) < 4) corrupt("RLE boolean page is truncated");
  uint32_t len;
  std::memcpy(&len, p, 4);
  p += 4;
  if (len > left(p, end)) corrupt("RLE boolean data of ", len, " bytes runs past the page");
  Hybrid h(p, p + len, 1);
  Hybrid::Run r;
  int64_t done = 0;
  while (done < n) {
    if (!h.next(r)) corrupt("RLE booleans end after ", done, " of ", n, " values");
    const int64_t m = std::min(r.count, n - done);
    if (r.rle) {
      std::fill(out + done, out + done + m, static_cast<uint8_t>(r.value));
    } else {
      uint8_t* o = out + done;
      h.visit(r, m, [o](int64_t k, uint32_t v) { o[k] = static_cast<uint8_t>(v); });
    }
    done += m;
  }
}

template <typename T>
void decode_values(int32_t encoding, const uint8_t* p, const uint8_t* end, int64_t n,
                   const Dictionary& dict, T* out) {
  if constexpr (sizeof(T) == 1) {
    (void)dict;
    decode_booleans(encoding, p, end, n, out);
    return;
  }
  const size_t need = static_cast<size_t>(n) * sizeof(T);
  switch (encoding) {
    case kPlain:
      if (need > left(p, end)) corrupt("PLAIN page holds fewer values than its header says");
      std::memcpy(out, p, need);
      return;
    case kByteStreamSplit: {
      // Like Arrow: the stream holds len / width values (the stride), at least n.
      const size_t len = left(p, end);
      if (len % sizeof(T) != 0 || len < need) {
        corrupt("BYTE_STREAM_SPLIT page of ", len, " bytes for ", n, " values");
      }
      const size_t stride = len / sizeof(T);
      for (int64_t i = 0; i < n; ++i) {
        unsigned char b[sizeof(T)];
        for (size_t k = 0; k < sizeof(T); ++k) b[k] = p[k * stride + static_cast<size_t>(i)];
        std::memcpy(out + i, b, sizeof(T));
      }
      return;
    }
    case kRleDictionary:
    case kPlainDictionary: {
      if (dict.count < 0) corrupt("dictionary-encoded page without a dictionary page");
      if (n == 0) return;
      if (p >= end) corrupt("dictionary-encoded page is empty");
      const int bw = *p++;
      if (bw > 32) corrupt("dictionary index bit width ", bw, " > 32");
      if (dict.count == 0) corrupt("dictionary-encoded values with an empty dictionary");
      const T* dv = reinterpret_cast<const T*>(dict.values);
      const auto count = static_cast<uint32_t>(
          std::min<int64_t>(dict.count, std::numeric_limits<uint32_t>::max()));
      Hybrid h(p, end, bw);
      Hybrid::Run r;
      int64_t done = 0;
      while (done < n) {
        if (!h.next(r)) corrupt("dictionary indices end after ", done, " of ", n, " values");
        const int64_t m = std::min(r.count, n - done);
        if (r.rle) {
          if (r.value >= count)
            corrupt("dictionary index ", r.value, " >= dictionary size ", dict.count);
          std::fill(out + done, out + done + m, dv[r.value]);
        } else {
          T* const o = out + done;
          if ((uint64_t{1} << bw) <= dict.readable) {  // every bw-bit index is readable
            uint32_t mx = 0;
            h.visit(r, m, [&mx, o, dv](int64_t k, uint32_t ix) {
              mx = std::max(mx, ix);
              o[k] = dv[ix];
            });
            if (mx >= count) corrupt("dictionary index ", mx, " >= dictionary size ", dict.count);
          } else {
            uint32_t bad = 0;
            h.visit(r, m, [&bad, o, dv, count](int64_t k, uint32_t ix) {
              bad |= static_cast<uint32_t>(ix >= count);
              o[k] = dv[std::min(ix, count - 1)];  // clamped: no read past the dictionary
            });
            if (bad) corrupt("dictionary index >= dictionary size ", dict.count);
          }
        }
        done += m;
      }
      return;
    }
    default: throw Unsupported(detail::concat("encoding ", encoding));
  }
}

template <typename T>
T nan_bits() {
  if constexpr (sizeof(T) == 4) {
    return static_cast<T>(0x7fc00000u);
  } else {
    return static_cast<T>(0x7ff8000000000000ull);
  }
}

template <typename T>
void decode_chunk(const ChunkSpec& s, T* out) {
  const bool floating = s.physical_type == kFloat || s.physical_type == kDouble;
  const uint8_t* p = s.data;
  const uint8_t* const end = s.data + s.size;
  // Page and dictionary buffers are kept per thread from chunk to chunk.
  thread_local Scratch page_buf, dict_buf;
  struct TrimOnExit {  // however the chunk ends, keep at most 16 MiB per buffer
    ~TrimOnExit() {
      page_buf.trim(size_t{16} << 20);
      dict_buf.trim(size_t{16} << 20);
    }
  } trim_on_exit;
  Scratch spread_buf;
  std::unique_ptr<uint8_t[]> levels;
  Dictionary dict;
  int64_t done = 0;
  while (done < s.num_values) {
    if (p >= end) corrupt("column chunk ends after ", done, " of ", s.num_values, " values");
    Thrift t(p, end);
    const PageHeader h = read_page_header(t);
    p = t.pos();
    if (static_cast<size_t>(h.compressed_size) > left(p, end)) {
      corrupt("page of ", h.compressed_size, " bytes runs past the column chunk");
    }
    const uint8_t* body = p;
    const uint8_t* body_end = p + h.compressed_size;
    p = body_end;
    // A writer that stored page checksums (parquet-format's PageHeader.crc:
    // CRC-32 of the page as stored, levels included) lets value corruption be
    // caught; pyarrow verifies them too when asked (page_checksum_verification).
    if (h.has_crc && crc32(body, static_cast<size_t>(h.compressed_size)) != h.crc) {
      corrupt("page at byte ", body - s.data, " of the column chunk does not match its CRC-32");
    }

    // The page's bytes after `skip` leading uncompressed ones, decompressed
    // into `into` (at least `reserve` bytes of it initialized when `init`).
    auto payload = [&](size_t skip, bool compressed, Scratch& into, size_t reserve,
                       bool init) -> std::pair<const uint8_t*, const uint8_t*> {
      const uint8_t* q = body + skip;
      if (!compressed || s.codec == kUncompressed) return {q, body_end};
      const size_t in = left(q, body_end);
      const size_t out_size = static_cast<size_t>(h.uncompressed_size) - skip;
      if (out_size == 0) return {q, q};  // an empty section (e.g. all values null)
      // The length is checked before anything is allocated for it: it must be
      // the header's and within what Snappy can expand `in` bytes to (a
      // 3-byte copy makes at most 64 bytes).
      const uint64_t len = snappy_length(q, in);
      if (len != out_size) {
        corrupt("Snappy stream decompresses to ", len, " bytes, the page header says ", out_size);
      }
      if (out_size > 22 * in + 32)
        corrupt("page claims ", out_size, " bytes from ", in, " compressed");
      uint8_t* o = init ? into.get_initialized(std::max(out_size, reserve)) : into.get(out_size);
      snappy_decompress(q, in, o, out_size);
      return {o, o + out_size};
    };

    if (h.type == kDictionaryPage) {
      if (!h.has_dict) corrupt("dictionary page without its header");
      if (dict.count >= 0) corrupt("second dictionary page in a column chunk");
      if (h.encoding != kPlain && h.encoding != kPlainDictionary) {
        throw Unsupported(detail::concat("dictionary page encoding ", h.encoding));
      }
      if (h.num_values < 0) corrupt("dictionary page with ", h.num_values, " values");
      if (sizeof(T) == 1) throw Unsupported("dictionary-encoded booleans");
      // Padded to a power of two entries (see kMaxPaddedDictBytes), the
      // padding initialized.
      const uint64_t padded = uint64_t{1} << bit_width_of(h.num_values);
      bool pad = padded * sizeof(T) <= kMaxPaddedDictBytes;
      const size_t need = static_cast<size_t>(h.num_values) * sizeof(T);
      const size_t reserve = pad ? padded * sizeof(T) : 0;
      const uint8_t* d;
      if (s.codec == kUncompressed) {  // the file's bytes may be unaligned: copy them
        if (need > left(body, body_end)) {
          corrupt("dictionary page holds fewer values than its header says");
        }
        uint8_t* a = pad ? dict_buf.get_initialized(std::max(need, reserve))
                         : dict_buf.get(std::max<size_t>(need, 1));
        std::memcpy(a, body, need);
        d = a;
      } else {
        auto [q, qe] = payload(0, true, dict_buf, reserve, pad);
        if (need > left(q, qe)) corrupt("dictionary page holds fewer values than its header says");
        d = q;
        if (q == body) pad = false;  // empty: nothing was decompressed into dict_buf
      }
      dict.values = d;
      dict.readable = pad ? padded : static_cast<uint64_t>(h.num_values);
      dict.count = h.num_values;
      continue;
    }
    if (h.type != kDataPage && h.type != kDataPageV2) continue;  // index pages etc.
    const bool v2 = h.type == kDataPageV2;
    if (!(v2 ? h.has_data_v2 : h.has_data_v1)) corrupt("data page without its header");
    const int64_t n = h.num_values;
    if (n < 0 || n > s.num_values - done) {
      corrupt("data page of ", n, " values overflows the chunk's ", s.num_values);
    }
    const uint8_t *lv = nullptr, *lv_end = nullptr, *vals = nullptr, *vals_end = nullptr;
    if (v2) {
      if (h.def_bytes < 0 || h.rep_bytes < 0 ||
          static_cast<int64_t>(h.def_bytes) + h.rep_bytes > h.compressed_size ||
          static_cast<int64_t>(h.def_bytes) + h.rep_bytes > h.uncompressed_size) {
        corrupt("data page v2 level lengths exceed the page");
      }
      if (h.rep_bytes != 0) corrupt("repetition levels in a flat column");
      lv = body;
      lv_end = body + h.def_bytes;
      std::tie(vals, vals_end) =
          payload(static_cast<size_t>(h.def_bytes), h.is_compressed, page_buf, 0, false);
    } else {
      auto [q, qe] = payload(0, true, page_buf, 0, false);
      if (s.max_def_level > 0) {
        if (h.def_encoding != kRle) {
          throw Unsupported(detail::concat("definition level encoding ", h.def_encoding));
        }
        if (left(q, qe) < 4) corrupt("definition levels are truncated");
        uint32_t len;
        std::memcpy(&len, q, 4);
        q += 4;
        if (len > left(q, qe)) corrupt("definition levels of ", len, " bytes run past the page");
        lv = q;
        lv_end = q + len;
        q += len;
      }
      vals = q;
      vals_end = qe;
    }
    T* o = out + done;
    int64_t present = n;
    bool all_present = true;
    if (s.max_def_level > 0)
      present = decode_levels(lv, lv_end, s.max_def_level, n, levels, all_present);
    if (all_present) {
      decode_values<T>(h.encoding, vals, vals_end, n, dict, o);
    } else {
      if (!floating) throw NullValues("has null values in a non-floating column; fill them first");
      T* tmp = reinterpret_cast<T*>(
          spread_buf.get(std::max<size_t>(static_cast<size_t>(present) * sizeof(T), 1)));
      decode_values<T>(h.encoding, vals, vals_end, present, dict, tmp);
      const uint8_t* lvl = levels.get();
      const T nan = nan_bits<T>();
      int64_t k = 0;
      for (int64_t i = 0; i < n; ++i) {
        o[i] = lvl[i] == s.max_def_level ? tmp[k++] : nan;
      }
    }
    done += n;
  }
}

}  // namespace

Footer read_footer(const uint8_t* data, size_t size) {
  // File: "PAR1" ... FileMetaData (Thrift compact) | u32 footer length | "PAR1".
  // Only the trailing magic is checked, as pyarrow does.
  if (size < 12 || std::memcmp(data + size - 4, "PAR1", 4) != 0) {
    corrupt("not a Parquet file (no 'PAR1' magic at its end)");
  }
  uint32_t len;
  std::memcpy(&len, data + size - 8, 4);
  if (len > size - 12) corrupt("the footer length ", len, " runs past the file's ", size, " bytes");
  const uint8_t* begin = data + size - 8 - len;
  Thrift t(begin, data + size - 8);
  Footer out;
  t.read_struct(0, [&](int64_t id, int type, int depth) {
    if (id == 3) {
      out.num_rows = t.i64(type);
      return;
    }
    if (id != 4) return t.skip(type, depth);
    const auto [elem, groups] = t.list_header(type);
    if (elem != Thrift::kStruct) corrupt("row_groups is not a list of structs");
    for (uint64_t g = 0; g < groups; ++g) {
      int64_t rows = -1;
      const int64_t group = static_cast<int64_t>(g);
      int64_t column = 0;
      t.read_struct(depth, [&](int64_t rid, int rtype, int rdepth) {
        if (rid == 3) {
          rows = t.i64(rtype);
          return;
        }
        if (rid != 1) return t.skip(rtype, rdepth);
        const auto [celem, ncols] = t.list_header(rtype);
        if (celem != Thrift::kStruct) corrupt("columns is not a list of structs");
        for (uint64_t c = 0; c < ncols; ++c) {
          FooterChunk ch;
          ch.row_group = group;
          ch.column = column++;
          t.read_struct(rdepth, [&](int64_t cid, int ctype, int cdepth) {
            if (cid == 1) {  // file_path: the chunk lives in another file
              ch.external = true;
              return t.skip(ctype, cdepth);
            }
            if (cid != 3) return t.skip(ctype, cdepth);
            if (ctype != Thrift::kStruct) corrupt("meta_data is not a struct");
            t.read_struct(cdepth, [&](int64_t mid, int mtype, int mdepth) {
              switch (mid) {
                case 1: ch.type = t.i32(mtype); break;
                case 3: {
                  const auto [selem, nparts] = t.list_header(mtype);
                  for (uint64_t k = 0; k < nparts; ++k) {
                    if (k) ch.path += '.';
                    ch.path += t.binary(selem);
                  }
                  break;
                }
                case 4: ch.codec = t.i32(mtype); break;
                case 5: ch.num_values = t.i64(mtype); break;
                case 7: ch.total_compressed_size = t.i64(mtype); break;
                case 9: ch.data_page_offset = t.i64(mtype); break;
                case 11: ch.dictionary_page_offset = t.i64(mtype); break;
                default: t.skip(mtype, mdepth);
              }
            });
          });
          out.chunks.push_back(std::move(ch));
        }
      });
      if (rows < 0) corrupt("row group ", g, " has no valid num_rows");
      out.row_group_rows.push_back(rows);
    }
  });
  return out;
}

int value_size(int physical_type) {
  switch (physical_type) {
    case kBoolean: return 1;
    case kInt32:
    case kFloat: return 4;
    case kInt64:
    case kDouble: return 8;
    default: throw Unsupported(detail::concat("physical type ", physical_type));
  }
}

void decode_column_chunk(const ChunkSpec& spec, void* out) {
  const int size = value_size(spec.physical_type);
  if (spec.codec != kUncompressed && spec.codec != kSnappy) {
    throw Unsupported(detail::concat("compression codec ", spec.codec));
  }
  if (spec.max_rep_level != 0) throw Unsupported("nested column (repetition levels)");
  if (spec.max_def_level < 0 || spec.max_def_level > 1) {
    throw Unsupported(detail::concat("definition level ", spec.max_def_level));
  }
  if (spec.num_values < 0 || spec.size < 0 || (spec.size > 0 && spec.data == nullptr)) {
    corrupt("bad column chunk bounds");
  }
  const int out_size = spec.out_size == 0 ? size : spec.out_size;
  if (out_size == size) {
    switch (size) {
      case 1: decode_chunk<uint8_t>(spec, static_cast<uint8_t*>(out)); return;
      case 4: decode_chunk<uint32_t>(spec, static_cast<uint32_t*>(out)); return;
      default: decode_chunk<uint64_t>(spec, static_cast<uint64_t*>(out)); return;
    }
  }
  if (spec.physical_type != kInt32 || (out_size != 1 && out_size != 2)) {
    throw Unsupported(
        detail::concat("physical type ", spec.physical_type, " into ", out_size, "-byte values"));
  }
  // 8- and 16-bit integers: decoded as INT32, then their low bytes kept.
  std::unique_ptr<uint32_t[]> wide(
      new uint32_t[static_cast<size_t>(std::max<int64_t>(spec.num_values, 1))]);
  decode_chunk<uint32_t>(spec, wide.get());
  if (out_size == 1) {
    auto* o = static_cast<uint8_t*>(out);
    for (int64_t i = 0; i < spec.num_values; ++i)
      o[i] = static_cast<uint8_t>(wide[static_cast<size_t>(i)]);
  } else {
    auto* o = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < spec.num_values; ++i)
      o[i] = static_cast<uint16_t>(wide[static_cast<size_t>(i)]);
  }
}

// ------------------------------------------------------------ Snappy

uint64_t snappy_length(const uint8_t* in, size_t in_size) {
  uint64_t v = 0;
  for (int i = 0; i < 5; ++i) {
    if (static_cast<size_t>(i) >= in_size) corrupt("Snappy stream is truncated");
    v |= static_cast<uint64_t>(in[i] & 0x7f) << (7 * i);
    if (!(in[i] & 0x80)) {
      if (v > 0xffffffffull) break;
      return v;
    }
  }
  corrupt("Snappy stream has a malformed length");
}

void snappy_decompress(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size) {
  const uint64_t len = snappy_length(in, in_size);
  if (len != out_size)
    corrupt("Snappy stream decompresses to ", len, " bytes, expected ", out_size);
  const uint8_t* p = in;
  const uint8_t* const end = in + in_size;
  while (*p++ & 0x80) {
  }
  size_t o = 0;
  while (p < end) {
    const uint8_t tag = *p++;
    size_t n, offset;
    switch (tag & 3) {
      case 0: {  // literal
        n = tag >> 2;
        if (n >= 60) {
          const size_t nb = n - 59;
          if (nb > left(p, end)) corrupt("Snappy literal length is truncated");
          n = 0;
          for (size_t i = 0; i < nb; ++i) n |= static_cast<size_t>(p[i]) << (8 * i);
          p += nb;
        }
        n += 1;
        if (n > left(p, end) || n > out_size - o) corrupt("Snappy literal runs past its buffer");
        std::memcpy(out + o, p, n);
        p += n;
        o += n;
        continue;
      }
      case 1:
        if (p >= end) corrupt("Snappy copy is truncated");
        n = 4 + ((tag >> 2) & 7);
        offset = (static_cast<size_t>(tag >> 5) << 8) | *p++;
        break;
      case 2:
        if (left(p, end) < 2) corrupt("Snappy copy is truncated");
        n = (tag >> 2) + 1;
        offset = p[0] | (static_cast<size_t>(p[1]) << 8);
        p += 2;
        break;
      default:
        if (left(p, end) < 4) corrupt("Snappy copy is truncated");
        n = (tag >> 2) + 1;
        offset = p[0] | (static_cast<size_t>(p[1]) << 8) | (static_cast<size_t>(p[2]) << 16) |
                 (static_cast<size_t>(p[3]) << 24);
        p += 4;
        break;
    }
    if (offset == 0 || offset > o || n > out_size - o) corrupt("Snappy copy out of bounds");
    uint8_t* d = out + o;
    const uint8_t* src = d - offset;
    if (offset >= n) {
      std::memcpy(d, src, n);
    } else {
      for (size_t i = 0; i < n; ++i) d[i] = src[i];  // overlapping: repeats the pattern
    }
    o += n;
  }
  if (o != out_size) corrupt("Snappy stream ends after ", o, " of ", out_size, " bytes");
}

}  // namespace fastml::data::parquet
