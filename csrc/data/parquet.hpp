// A Parquet column-chunk decoder for the loader's hot path: flat (non-nested)
// columns of physical types BOOLEAN, INT32 (also as 8/16-bit integers), INT64,
// FLOAT and DOUBLE; PLAIN, dictionary (RLE_DICTIONARY / PLAIN_DICTIONARY),
// BYTE_STREAM_SPLIT and (booleans) RLE encodings; data pages v1 and v2,
// uncompressed or Snappy-compressed.
//
// It decodes one column chunk straight into a caller-owned buffer (the
// loader's reused window buffers), so a shuffled epoch decodes each value once
// with no intermediate Arrow arrays. Everything else (other codecs, nested
// columns, DELTA encodings, ...) is reported as Unsupported and the
// loader reads that chunk with pyarrow instead. The file footer (schema, row
// groups, chunk offsets) is read by pyarrow; only pages are parsed here.
//
// Every length and offset read from the file is checked against the bytes
// available: a corrupt or truncated chunk raises IOError, never reads or
// writes out of bounds (the native test fuzzes this under ASan/UBSan).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/errors.hpp"

namespace fastml::data::parquet {

// Parquet's enums (parquet.thrift).
enum PhysicalType : int { kBoolean = 0, kInt32 = 1, kInt64 = 2, kFloat = 4, kDouble = 5 };
enum Codec : int { kUncompressed = 0, kSnappy = 1 };

// A chunk this decoder does not handle; the caller falls back to another reader.
struct Unsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Null values in a column whose type has no NaN to stand for them.
struct NullValues : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// One column chunk, as described by the file's metadata.
struct ChunkSpec {
  const uint8_t* data = nullptr;  // the chunk's bytes, from its first page
  int64_t size = 0;               // bytes available at `data`
  int physical_type = 0;          // PhysicalType
  int codec = 0;                  // Codec
  int64_t num_values = 0;         // values in the chunk (= rows for flat columns)
  int max_def_level = 0;          // 0: required column, 1: optional
  int max_rep_level = 0;          // must be 0 (flat)
  int out_size = 0;               // bytes per output value; 0: the physical type's own
};

// What the loader needs of a file's footer (FileMetaData), read natively: the
// row groups' row counts and, per column chunk, where it is and how it is
// stored. Reading it here (not through pyarrow's metadata accessors) keeps a
// corrupt enum in the footer from aborting the process: pyarrow raises C++
// exceptions from some accessors that Python cannot catch. Every count and
// length is checked against the footer's bytes; a corrupt footer throws
// IOError naming the problem.
struct FooterChunk {
  int64_t row_group = 0, column = 0;
  int32_t type = -1, codec = -1;
  int64_t num_values = -1, total_compressed_size = -1;
  int64_t data_page_offset = -1, dictionary_page_offset = -1;
  bool external = false;  // file_path set: the chunk is in another file
  std::string path;       // dotted path in the schema
};
struct Footer {
  int64_t num_rows = -1;
  std::vector<int64_t> row_group_rows;
  std::vector<FooterChunk> chunks;  // row group by row group, columns in order
};
Footer read_footer(const uint8_t* data, size_t size);

// Bytes per value of a supported physical type (Unsupported otherwise);
// BOOLEAN decodes to one byte (0 or 1, as NumPy's bool).
int value_size(int physical_type);

// Decodes the chunk's num_values values into `out` (num_values * out_size
// bytes, little-endian, as NumPy stores them). out_size is the physical
// type's size, or 1 or 2 for INT32 columns holding 8- or 16-bit integers
// (Parquet stores those as INT32; the low bytes are kept, as Arrow does).
// Nulls become NaN in FLOAT and DOUBLE columns; in other columns they throw
// NullValues. Throws IOError for corrupt data and Unsupported for features
// outside this decoder (when it throws, `out` may be partly written).
void decode_column_chunk(const ChunkSpec& spec, void* out);

// Snappy (raw format, as Parquet uses it). The length the stream says it
// decompresses to, and the decompression into exactly that many bytes
// (IOError on a malformed stream or a length other than `out_size`).
uint64_t snappy_length(const uint8_t* in, size_t in_size);
void snappy_decompress(const uint8_t* in, size_t in_size, uint8_t* out, size_t out_size);

}  // namespace fastml::data::parquet
