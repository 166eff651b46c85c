// The loader's gather: rows by index from a column into a batch buffer, with
// the column's transforms fused into the same pass over memory.
#pragma once

#include <cstdint>
#include <vector>

#include "common/array_view.hpp"
#include "data/transform.hpp"

namespace fastml::data {

// A column the loader reads: C-contiguous rows along dim 0, and how to store
// them (transforms, then the output dtype). `src` describes the whole column
// (shape[0] = all rows); its rows live in `src.data`, or, for a column in
// several chunks (Arrow record batches, used without combining them), chunk j
// holds rows [chunk_starts[j], chunk_starts[j + 1]) at chunks[j].
// A column may also be assembled from `parts`: 1-D arrays of one dtype and
// src.shape[0] rows each, part e giving element e of every row (several
// Parquet columns loaded as one 2-D feature column); `src` then carries the
// dtype and the (rows, parts) shape, with no data of its own.
struct GatherColumn {
  ArrayView src;
  std::vector<const char*> chunks;
  std::vector<int64_t> chunk_starts;  // chunks.size() + 1 entries, from 0 to src.shape[0]
  std::vector<const char*> parts;
  TransformPlan plan;
  DType out_dtype = DType::F32;
  int64_t out_row_bytes() const {
    return src.row_elements() * static_cast<int64_t>(itemsize(out_dtype));
  }
};

// dst row k = transform(src row indices[k]) for k in [0, n). Indices must be
// in [0, src.shape[0]) (checked; std::out_of_range otherwise). `check = false`
// skips that check for callers that validated the indices once for many
// columns; `cached = true` says the column is in the cache (warm_column), so
// rows are read without prefetching.
void gather_rows(const GatherColumn& col, const int64_t* indices, int64_t n, void* dst,
                 bool check = true, bool cached = false);

// dst[j] = src[perm[j]] for j in [0, n), values of `itemsize` bytes (1, 2, 4,
// 8 or any other); perm's entries must lie in [0, n) (checked by the caller).
void permute_values(const void* src, const int64_t* perm, int64_t n, int64_t itemsize, void* dst);

// Reads one byte per cache line of the column when it holds at most
// `max_bytes`, so that random gathers that follow find it in the cache
// instead of missing on nearly every row. Returns whether it did.
bool warm_column(const GatherColumn& col, int64_t max_bytes);

}  // namespace fastml::data
