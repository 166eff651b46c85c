// Native checks of the Parquet column-chunk decoder, meant for
// AddressSanitizer/UBSan: hand-built chunks (Thrift compact page headers,
// dictionary and PLAIN pages, v1 and v2, nulls, Snappy literals and
// overlapping copies) decode to the expected values, and random corruptions
// and truncations of them either decode or throw IOError / Unsupported /
// NullValues, never read or write out of bounds. The Python tests compare the
// decoder with pyarrow on real files.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <vector>

#include "common/errors.hpp"
#include "data/parquet.hpp"
#include "tests/native/check.hpp"

using namespace fastml;
using namespace fastml::data::parquet;

namespace {

using Bytes = std::vector<uint8_t>;

// A minimal Thrift compact-protocol writer (only what page headers use).
struct Writer {
  Bytes out;
  int16_t last = 0;
  std::vector<int16_t> stack;

  void varint(uint64_t v) {
    while (v >= 0x80) {
      out.push_back(static_cast<uint8_t>(v | 0x80));
      v >>= 7;
    }
    out.push_back(static_cast<uint8_t>(v));
  }
  void field(int16_t id, int type) {
    out.push_back(static_cast<uint8_t>(((id - last) << 4) | type));
    last = id;
  }
  void i32(int16_t id, int32_t v) {
    field(id, 5);
    varint((static_cast<uint32_t>(v) << 1) ^ static_cast<uint32_t>(v >> 31));
  }
  void boolean(int16_t id, bool v) { field(id, v ? 1 : 2); }
  void begin(int16_t id) {
    field(id, 12);
    stack.push_back(last);
    last = 0;
  }
  void end() {
    out.push_back(0);
    if (!stack.empty()) {
      last = stack.back();
      stack.pop_back();
    }
  }
};

// Snappy stream of `raw`: literals of up to 7 bytes then, where possible, a
// 1-byte-offset copy of the previous bytes, so both tag kinds are exercised.
Bytes snappy(const Bytes& raw) {
  Writer w;
  w.varint(raw.size());
  size_t i = 0;
  while (i < raw.size()) {
    const size_t lit = std::min<size_t>(7, raw.size() - i);
    w.out.push_back(static_cast<uint8_t>((lit - 1) << 2));
    w.out.insert(w.out.end(), raw.begin() + static_cast<long>(i),
                 raw.begin() + static_cast<long>(i + lit));
    i += lit;
    // copy of 4..11 bytes at offset 1..7 where the data repeats
    for (size_t off = 1; off <= 7 && off <= i; ++off) {
      size_t n = 0;
      while (n < 11 && i + n < raw.size() && raw[i + n] == raw[i + n - off]) ++n;
      if (n >= 4) {
        w.out.push_back(static_cast<uint8_t>(1 | ((n - 4) << 2)));
        w.out.push_back(static_cast<uint8_t>(off));
        i += n;
        break;
      }
    }
  }
  return w.out;
}

Bytes page(int type, const Bytes& body, size_t uncompressed,
           const std::function<void(Writer&)>& sub) {
  Writer w;
  w.i32(1, type);
  w.i32(2, static_cast<int32_t>(uncompressed));
  w.i32(3, static_cast<int32_t>(body.size()));
  sub(w);
  w.end();
  w.out.insert(w.out.end(), body.begin(), body.end());
  return w.out;
}

// RLE/bit-packed hybrid: one bit-packed run of `vals` (padded to 8) at width bw.
Bytes bitpacked(const std::vector<uint32_t>& vals, int bw) {
  Writer w;
  const size_t groups = (vals.size() + 7) / 8;
  w.varint((groups << 1) | 1);
  Bytes bits(groups * static_cast<size_t>(bw), 0);
  for (size_t i = 0; i < vals.size(); ++i) {
    for (int b = 0; b < bw; ++b) {
      if (vals[i] >> b & 1) {
        const size_t bit = i * static_cast<size_t>(bw) + static_cast<size_t>(b);
        bits[bit / 8] |= static_cast<uint8_t>(1 << (bit % 8));
      }
    }
  }
  w.out.insert(w.out.end(), bits.begin(), bits.end());
  return w.out;
}

Bytes rle(uint32_t value, size_t count, int bw) {
  Writer w;
  w.varint(count << 1);
  for (int i = 0; i < (bw + 7) / 8; ++i) w.out.push_back(static_cast<uint8_t>(value >> (8 * i)));
  return w.out;
}

void append(Bytes& a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
}

// A FLOAT column chunk: dictionary of 5 values, one v1 page with nulls
// (RLE + bit-packed levels) and bit-packed indices, then a v2 PLAIN page.
struct Chunk {
  Bytes bytes;
  std::vector<float> expected;  // NaN for nulls
};

Chunk float_chunk(bool compress) {
  const std::vector<float> dict = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f};
  Chunk c;
  auto body = [&](const Bytes& raw) { return compress ? snappy(raw) : raw; };
  Bytes d(dict.size() * 4);
  std::memcpy(d.data(), dict.data(), d.size());
  append(c.bytes, page(2, body(d), d.size(), [&](Writer& w) {
           w.begin(7);
           w.i32(1, static_cast<int32_t>(dict.size()));
           w.i32(2, 0);
           w.boolean(3, false);
           w.end();
         }));
  // v1 data page: 20 values, levels: 6 present (RLE), then a bit-packed mix.
  std::vector<uint32_t> lv = {1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0};
  Bytes levels = rle(1, 6, 1);
  append(levels, bitpacked(lv, 1));
  std::vector<uint32_t> idx;
  for (int i = 0; i < 16; ++i) idx.push_back(static_cast<uint32_t>((i * 3) % 5));
  Bytes raw;
  const auto len = static_cast<uint32_t>(levels.size());
  raw.resize(4);
  std::memcpy(raw.data(), &len, 4);
  append(raw, levels);
  raw.push_back(3);  // index bit width
  append(raw, bitpacked(idx, 3));
  append(c.bytes, page(0, body(raw), raw.size(), [&](Writer& w) {
           w.begin(5);
           w.i32(1, 20);
           w.i32(2, 8);  // RLE_DICTIONARY
           w.i32(3, 3);  // RLE levels
           w.i32(4, 3);
           w.end();
         }));
  size_t k = 0;
  for (int i = 0; i < 20; ++i) {
    const bool present = i < 6 || lv[static_cast<size_t>(i - 6)] == 1;
    c.expected.push_back(present ? dict[idx[k++]] : std::nanf(""));
  }
  // v1 data page: 3000 values, none null, bit-packed indices at width 3 (the
  // compile-time-width group path).
  {
    std::vector<uint32_t> many;
    for (int i = 0; i < 3000; ++i) many.push_back(static_cast<uint32_t>((i * 7 + i / 13) % 5));
    Bytes lv3 = rle(1, 3000, 1);
    Bytes raw3(4);
    const auto len3 = static_cast<uint32_t>(lv3.size());
    std::memcpy(raw3.data(), &len3, 4);
    append(raw3, lv3);
    raw3.push_back(3);
    append(raw3, bitpacked(many, 3));
    append(c.bytes, page(0, body(raw3), raw3.size(), [&](Writer& w) {
             w.begin(5);
             w.i32(1, 3000);
             w.i32(2, 2);  // PLAIN_DICTIONARY (v1 writers)
             w.i32(3, 3);
             w.i32(4, 3);
             w.end();
           }));
    for (uint32_t v : many) c.expected.push_back(dict[v]);
  }
  // v2 data page: 9 PLAIN values, no nulls (one RLE run of levels, uncompressed).
  Bytes lv2 = rle(1, 9, 1);
  Bytes vals(9 * 4);
  std::vector<float> plain;
  for (int i = 0; i < 9; ++i) plain.push_back(0.5f * static_cast<float>(i) - 1.0f);
  std::memcpy(vals.data(), plain.data(), vals.size());
  Bytes v2body = lv2;
  append(v2body, body(vals));
  append(c.bytes, page(3, v2body, lv2.size() + vals.size(), [&](Writer& w) {
           w.begin(8);
           w.i32(1, 9);
           w.i32(2, 0);
           w.i32(3, 9);
           w.i32(4, 0);  // PLAIN
           w.i32(5, static_cast<int32_t>(lv2.size()));
           w.i32(6, 0);
           w.boolean(7, compress);
           w.end();
         }));
  c.expected.insert(c.expected.end(), plain.begin(), plain.end());
  return c;
}

ChunkSpec spec_of(const Bytes& b, bool compress, int64_t n) {
  ChunkSpec s;
  s.data = b.data();
  s.size = static_cast<int64_t>(b.size());
  s.physical_type = kFloat;
  s.codec = compress ? kSnappy : kUncompressed;
  s.num_values = n;
  s.max_def_level = 1;
  return s;
}

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return false;
    if (!std::isnan(a[i]) && a[i] != b[i]) return false;
  }
  return true;
}

void test_snappy() {
  Bytes raw;
  for (int i = 0; i < 300; ++i) raw.push_back(static_cast<uint8_t>(i % 3 == 0 ? 7 : i % 11));
  const Bytes z = snappy(raw);
  NATIVE_CHECK(snappy_length(z.data(), z.size()) == raw.size());
  Bytes out(raw.size());
  snappy_decompress(z.data(), z.size(), out.data(), out.size());
  NATIVE_CHECK(out == raw);
  // Wrong expected length, an offset before the start, a truncated literal.
  bool threw = false;
  try {
    Bytes small(raw.size() - 1);
    snappy_decompress(z.data(), z.size(), small.data(), small.size());
  } catch (const IOError&) {
    threw = true;
  }
  NATIVE_CHECK(threw);
  const Bytes bad_copy = {4, 0x01, 9, 9};  // 4 bytes: copy at offset 9 of nothing
  threw = false;
  try {
    Bytes o(4);
    snappy_decompress(bad_copy.data(), bad_copy.size(), o.data(), o.size());
  } catch (const IOError&) {
    threw = true;
  }
  NATIVE_CHECK(threw);
}

void test_decode(bool compress) {
  const Chunk c = float_chunk(compress);
  std::vector<float> out(c.expected.size());
  decode_column_chunk(spec_of(c.bytes, compress, static_cast<int64_t>(out.size())), out.data());
  NATIVE_CHECK(same(out, c.expected));
  // Integer column with nulls: NullValues.
  ChunkSpec s = spec_of(c.bytes, compress, static_cast<int64_t>(out.size()));
  s.physical_type = kInt32;
  bool threw = false;
  try {
    std::vector<int32_t> o(out.size());
    decode_column_chunk(s, o.data());
  } catch (const NullValues&) {
    threw = true;
  }
  NATIVE_CHECK(threw);
  // More values than the chunk holds: IOError.
  threw = false;
  try {
    std::vector<float> o(out.size() + 1);
    decode_column_chunk(spec_of(c.bytes, compress, static_cast<int64_t>(o.size())), o.data());
  } catch (const IOError&) {
    threw = true;
  }
  NATIVE_CHECK(threw);
}

// parquet-java's shapes: a one-entry dictionary with zero-width indices in a
// bit-packed run of no bytes, and a v2 page of only nulls whose (compressed)
// values section is empty.
void test_writer_quirks() {
  Bytes c;
  const float one = 4.5f;
  Bytes d(4);
  std::memcpy(d.data(), &one, 4);
  c = page(2, snappy(d), 4, [&](Writer& w) {
    w.begin(7);
    w.i32(1, 1);
    w.i32(2, 0);
    w.end();
  });
  Bytes raw(4);
  const Bytes lv = rle(1, 5, 1);
  const auto len = static_cast<uint32_t>(lv.size());
  std::memcpy(raw.data(), &len, 4);
  append(raw, lv);
  raw.push_back(0);     // index bit width 0
  raw.push_back(0x03);  // bit-packed run of one group, zero bytes
  append(c, page(0, snappy(raw), raw.size(), [&](Writer& w) {
           w.begin(5);
           w.i32(1, 5);
           w.i32(2, 8);
           w.i32(3, 3);
           w.i32(4, 3);
           w.end();
         }));
  const Bytes nulls = rle(0, 3, 1);
  append(c, page(3, nulls, nulls.size(), [&](Writer& w) {
           w.begin(8);
           w.i32(1, 3);
           w.i32(2, 3);
           w.i32(3, 3);
           w.i32(4, 8);
           w.i32(5, static_cast<int32_t>(nulls.size()));
           w.i32(6, 0);
           w.end();  // is_compressed defaults to true: an empty Snappy section
         }));
  std::vector<float> out(8);
  decode_column_chunk(spec_of(c, true, 8), out.data());
  for (int i = 0; i < 5; ++i) NATIVE_CHECK(out[static_cast<size_t>(i)] == one);
  for (int i = 5; i < 8; ++i) NATIVE_CHECK(std::isnan(out[static_cast<size_t>(i)]));
}

// Random corruptions and truncations: exact-size heap copies, so ASan sees
// any read past the end.
void fuzz(bool compress, uint32_t seed) {
  const Chunk c = float_chunk(compress);
  std::mt19937 rng(seed);
  int ok = 0, failed = 0;
  for (int trial = 0; trial < 6000; ++trial) {
    Bytes b = c.bytes;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t k = rng() % b.size();
      b[k] = (trial & 1) ? static_cast<uint8_t>(rng())
                         : static_cast<uint8_t>(b[k] ^ (1u << (rng() % 8)));
    }
    if (trial % 5 == 0) b.resize(rng() % b.size());
    Bytes exact(b.begin(), b.end());  // exactly sized allocation
    std::vector<float> out(c.expected.size());
    try {
      decode_column_chunk(spec_of(exact, compress, static_cast<int64_t>(out.size())), out.data());
      ++ok;
    } catch (const IOError&) {
      ++failed;
    } catch (const Unsupported&) {
      ++failed;
    } catch (const NullValues&) {
      ++failed;
    }
  }
  NATIVE_CHECK(failed > 0);
  std::printf("parquet fuzz (%s): %d decoded, %d rejected\n", compress ? "snappy" : "plain", ok,
              failed);
}

// BOOLEAN: a v1 PLAIN page (bits, LSB first) and a v2 RLE page (4-byte length,
// hybrid at width 1), both required; then random corruptions of the chunk.
void test_booleans() {
  Bytes c;
  std::vector<uint8_t> expected;
  Bytes bits(3, 0);
  for (int i = 0; i < 19; ++i) {
    const uint8_t v = static_cast<uint8_t>((i * 5 + 1) % 3 == 0);
    expected.push_back(v);
    if (v) bits[static_cast<size_t>(i / 8)] |= static_cast<uint8_t>(1 << (i % 8));
  }
  append(c, page(0, bits, bits.size(), [&](Writer& w) {
           w.begin(5);
           w.i32(1, 19);
           w.i32(2, 0);  // PLAIN
           w.i32(3, 3);
           w.i32(4, 3);
           w.end();
         }));
  std::vector<uint32_t> vals;
  for (int i = 0; i < 21; ++i) vals.push_back(static_cast<uint32_t>(i % 4 == 1));
  Bytes hybrid = rle(1, 5, 1);
  append(hybrid, bitpacked(vals, 1));
  Bytes body(4);
  const auto len = static_cast<uint32_t>(hybrid.size());
  std::memcpy(body.data(), &len, 4);
  append(body, hybrid);
  append(c, page(3, body, body.size(), [&](Writer& w) {
           w.begin(8);
           w.i32(1, 26);
           w.i32(2, 0);
           w.i32(3, 26);
           w.i32(4, 3);  // RLE
           w.i32(5, 0);
           w.i32(6, 0);
           w.boolean(7, false);
           w.end();
         }));
  for (int i = 0; i < 5; ++i) expected.push_back(1);
  for (int i = 0; i < 21; ++i)
    expected.push_back(static_cast<uint8_t>(vals[static_cast<size_t>(i)]));
  ChunkSpec s;
  s.data = c.data();
  s.size = static_cast<int64_t>(c.size());
  s.physical_type = kBoolean;
  s.codec = kUncompressed;
  s.num_values = static_cast<int64_t>(expected.size());
  std::vector<uint8_t> out(expected.size());
  decode_column_chunk(s, out.data());
  NATIVE_CHECK(out == expected);
  std::mt19937 rng(3);
  for (int trial = 0; trial < 4000; ++trial) {
    Bytes b = c;
    b[rng() % b.size()] = static_cast<uint8_t>(rng());
    if (trial % 4 == 0) b.resize(rng() % b.size());
    Bytes exact(b.begin(), b.end());
    s.data = exact.data();
    s.size = static_cast<int64_t>(exact.size());
    try {
      decode_column_chunk(s, out.data());
    } catch (const IOError&) {
    } catch (const Unsupported&) {
    } catch (const NullValues&) {
    }
  }
}

}  // namespace

int main() {
  test_snappy();
  test_decode(false);
  test_decode(true);
  test_writer_quirks();
  test_booleans();
  fuzz(false, 1);
  fuzz(true, 2);
  std::printf("test_parquet: ok\n");
  return 0;
}
