// Checksums and text checks for the bytes fastml reads from files: one copy,
// shared by every format (drift profiles, Parquet pages, forest files).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace fastml {

// CRC-32 (IEEE 802.3, zlib's crc32) of `size` bytes: the checksum of drift
// profiles and of Parquet pages. Slicing-by-8, ~1 byte per cycle.
uint32_t crc32(const uint8_t* data, size_t size);

// FNV-1a, 64 bits: the checksum of fastml forest files.
uint64_t fnv1a64(const uint8_t* data, size_t size);

// The offset of the first byte that makes `s` invalid UTF-8 (overlong forms,
// surrogates and code points past U+10FFFF are invalid, as in Python's
// decoder), or npos when `s` is valid.
size_t utf8_invalid_at(std::string_view s);

}  // namespace fastml
