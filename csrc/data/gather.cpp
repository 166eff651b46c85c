#include "data/gather.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/errors.hpp"

namespace fastml::data {

namespace {

void check_indices(const int64_t* indices, int64_t n, int64_t rows) {
  for (int64_t k = 0; k < n; ++k) {
    if (static_cast<uint64_t>(indices[k]) >= static_cast<uint64_t>(rows)) {
      fail<std::out_of_range>("row index ", indices[k], " out of range for ", rows, " rows");
    }
  }
}

// Where row i starts: one contiguous array, or a list of chunks.
struct Contiguous {
  const char* base;
  int64_t row_bytes;
  const char* operator()(int64_t i) const { return base + i * row_bytes; }
};

struct Chunked {
  const GatherColumn* col;
  int64_t row_bytes;
  const char* operator()(int64_t i) const {
    const auto& starts = col->chunk_starts;
    // The last start <= i (starts[0] == 0 and i < starts.back()).
    const auto j =
        static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), i) - starts.begin() - 1);
    return col->chunks[j] + (i - starts[j]) * row_bytes;
  }
};

// Rows are read in random order from arrays far larger than the caches:
// touching the row kPrefetch ahead hides most of the memory latency. Every
// cache line of the row is touched (a 128-byte row spans two or three lines;
// prefetching only its first line left the rest to a demand miss).
constexpr int64_t kPrefetch = 16;

inline void prefetch_row(const char* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  if (bytes > 1) __builtin_prefetch(p + bytes - 1);
}

template <size_t W, typename Rows>
void copy_fixed(const Rows& rows, const int64_t* idx, int64_t n, char* dst) {
  int64_t k = 0;
  for (; k + kPrefetch < n; ++k) {
    prefetch_row(rows(idx[k + kPrefetch]), static_cast<int64_t>(W));
    std::memcpy(dst + k * W, rows(idx[k]), W);
  }
  for (; k < n; ++k) std::memcpy(dst + k * W, rows(idx[k]), W);
}

// A column already in the cache (see warm_column): plain typed loads, no
// prefetches (they would only cost load slots).
template <typename T>
void copy_cached(const char* base, const int64_t* idx, int64_t n, char* dst) {
  const T* src = reinterpret_cast<const T*>(base);
  T* out = reinterpret_cast<T*>(dst);
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const T a = src[idx[k]], b = src[idx[k + 1]], c = src[idx[k + 2]], d = src[idx[k + 3]];
    out[k] = a;
    out[k + 1] = b;
    out[k + 2] = c;
    out[k + 3] = d;
  }
  for (; k < n; ++k) out[k] = src[idx[k]];
}

template <typename Rows>
void copy_rows(const Rows& rows, int64_t row_bytes, const int64_t* idx, int64_t n, char* dst) {
  switch (row_bytes) {
    case 1: return copy_fixed<1>(rows, idx, n, dst);
    case 2: return copy_fixed<2>(rows, idx, n, dst);
    case 4: return copy_fixed<4>(rows, idx, n, dst);
    case 8: return copy_fixed<8>(rows, idx, n, dst);
    case 16: return copy_fixed<16>(rows, idx, n, dst);
    case 32: return copy_fixed<32>(rows, idx, n, dst);
    case 64: return copy_fixed<64>(rows, idx, n, dst);
    case 128: return copy_fixed<128>(rows, idx, n, dst);
    default: {
      const auto w = static_cast<size_t>(row_bytes);
      int64_t k = 0;
      for (; k + kPrefetch < n; ++k) {
        prefetch_row(rows(idx[k + kPrefetch]), row_bytes);
        std::memcpy(dst + k * row_bytes, rows(idx[k]), w);
      }
      for (; k < n; ++k) std::memcpy(dst + k * row_bytes, rows(idx[k]), w);
    }
  }
}

// The column's transforms on element e of a row (per-element Standardize
// parameters are indexed by e).
inline double apply_ops(double x, const std::vector<TransformOp>& ops, int64_t e) {
  for (const TransformOp& op : ops) {
    switch (op.kind) {
      case OpKind::FillNa: x = fill_na(x, op.a); break;
      case OpKind::Standardize: {
        const size_t j = op.mean.size() == 1 ? 0 : static_cast<size_t>(e);
        x = standardize(x, op.mean[j], op.scale[j]);
        break;
      }
      case OpKind::Clip: x = clip(x, op.a, op.b); break;
    }
  }
  return x;
}

template <typename In, typename Out, typename Rows>
void transform_rows(const GatherColumn& col, const Rows& rows, const int64_t* idx, int64_t n,
                    Out* dst) {
  const int64_t m = col.src.row_elements();
  const auto& ops = col.plan.ops;
  for (int64_t k = 0; k < n; ++k) {
    const In* row = reinterpret_cast<const In*>(rows(idx[k]));
    Out* out = dst + k * m;
    for (int64_t e = 0; e < m; ++e)
      out[e] = store_as<Out>(apply_ops(load_as_double(row[e]), ops, e));
  }
}

template <typename Rows>
void gather_with(const GatherColumn& col, const Rows& rows, const int64_t* indices, int64_t n,
                 void* dst) {
  if (col.plan.empty() && col.out_dtype == col.src.dtype) {
    copy_rows(rows, col.src.row_bytes(), indices, n, static_cast<char*>(dst));
    return;
  }
  dispatch_dtype(col.src.dtype, [&](auto in_tag) {
    using In = typename decltype(in_tag)::type;
    dispatch_dtype(col.out_dtype, [&](auto out_tag) {
      using Out = typename decltype(out_tag)::type;
      transform_rows<In, Out>(col, rows, indices, n, static_cast<Out*>(dst));
    });
  });
}

// A column of parts: element e of dst row k = transform(parts[e][indices[k]]).
template <typename In, typename Out>
void gather_parts_as(const GatherColumn& col, const int64_t* idx, int64_t n, Out* dst) {
  const auto m = static_cast<int64_t>(col.parts.size());
  const auto& ops = col.plan.ops;
  for (int64_t e = 0; e < m; ++e) {
    const In* src = reinterpret_cast<const In*>(col.parts[static_cast<size_t>(e)]);
    Out* out = dst + e;
    if constexpr (std::is_same_v<In, Out>) {
      if (ops.empty()) {  // a plain copy into every m-th element
        for (int64_t k = 0; k < n; ++k) out[k * m] = src[idx[k]];
        continue;
      }
    }
    for (int64_t k = 0; k < n; ++k)
      out[k * m] = store_as<Out>(apply_ops(load_as_double(src[idx[k]]), ops, e));
  }
}

}  // namespace

void gather_rows(const GatherColumn& col, const int64_t* indices, int64_t n, void* dst, bool check,
                 bool cached) {
  if (check) check_indices(indices, n, col.src.shape[0]);
  if (!col.parts.empty()) {
    dispatch_dtype(col.src.dtype, [&](auto in_tag) {
      using In = typename decltype(in_tag)::type;
      dispatch_dtype(col.out_dtype, [&](auto out_tag) {
        using Out = typename decltype(out_tag)::type;
        gather_parts_as<In, Out>(col, indices, n, static_cast<Out*>(dst));
      });
    });
    return;
  }
  if (cached && col.chunks.empty() && col.plan.empty() && col.out_dtype == col.src.dtype) {
    const auto* base = static_cast<const char*>(col.src.data);
    auto* out = static_cast<char*>(dst);
    switch (col.src.row_bytes()) {
      case 1: return copy_cached<uint8_t>(base, indices, n, out);
      case 2: return copy_cached<uint16_t>(base, indices, n, out);
      case 4: return copy_cached<uint32_t>(base, indices, n, out);
      case 8: return copy_cached<uint64_t>(base, indices, n, out);
      default: break;
    }
  }
  if (col.chunks.empty()) {
    gather_with(col, Contiguous{static_cast<const char*>(col.src.data), col.src.row_bytes()},
                indices, n, dst);
  } else {
    gather_with(col, Chunked{&col, col.src.row_bytes()}, indices, n, dst);
  }
}

void permute_values(const void* src, const int64_t* perm, int64_t n, int64_t itemsize, void* dst) {
  const auto* in = static_cast<const char*>(src);
  auto* out = static_cast<char*>(dst);
  switch (itemsize) {
    case 1: return copy_cached<uint8_t>(in, perm, n, out);
    case 2: return copy_cached<uint16_t>(in, perm, n, out);
    case 4: return copy_cached<uint32_t>(in, perm, n, out);
    case 8: return copy_cached<uint64_t>(in, perm, n, out);
    default:
      for (int64_t j = 0; j < n; ++j)
        std::memcpy(out + j * itemsize, in + perm[j] * itemsize, static_cast<size_t>(itemsize));
  }
}

bool warm_column(const GatherColumn& col, int64_t max_bytes) {
  const int64_t nbytes = col.src.shape[0] * col.src.row_bytes();
  if (nbytes > max_bytes || !col.parts.empty()) return false;
  auto touch = [](const char* p, int64_t n) {
    // volatile: the loads are the point, and must not be optimised away.
    unsigned char acc = 0;
    for (int64_t i = 0; i < n; i += 64)
      acc ^= static_cast<const volatile unsigned char*>(static_cast<const void*>(p))[i];
    static_cast<void>(acc);
  };
  if (col.chunks.empty()) {
    touch(static_cast<const char*>(col.src.data), nbytes);
  } else {
    const int64_t rb = col.src.row_bytes();
    for (size_t j = 0; j < col.chunks.size(); ++j)
      touch(col.chunks[j], (col.chunk_starts[j + 1] - col.chunk_starts[j]) * rb);
  }
  return true;
}

}  // namespace fastml::data
