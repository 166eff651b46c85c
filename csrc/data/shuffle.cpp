#include "data/shuffle.hpp"

#include <algorithm>
#include <memory>

#include "common/errors.hpp"
#include "common/thread_pool.hpp"

namespace fastml::data {

uint64_t SplitMix64::below(uint64_t range) {
  uint64_t x = next();
  unsigned __int128 m = static_cast<unsigned __int128>(x) * range;
  uint64_t low = static_cast<uint64_t>(m);
  if (low < range) {
    const uint64_t threshold = (0 - range) % range;
    while (low < threshold) {
      x = next();
      m = static_cast<unsigned __int128>(x) * range;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
}

SplitMix64 epoch_stream(uint64_t seed, uint64_t epoch, uint64_t stream) {
  SplitMix64 a(seed);
  SplitMix64 b(a.next() ^ epoch);
  SplitMix64 c(b.next() ^ (stream * 0xD1B54A32D192ED03ull));
  return SplitMix64(c.next());
}

namespace {

// The SplitMix64 finaliser on its own: a bijective 64-bit hash of a counter.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void fisher_yates(int64_t* a, int64_t n, SplitMix64& rng) {
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    const int64_t t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

// Above this size the scatter shuffle runs: its passes touch memory in
// cache-sized pieces and run in parallel (45 ms -> about 10 ms for 1e6 rows).
// Below it Fisher-Yates is faster (its array fits in L2; 65,536 rows: 0.3 ms
// against 1.2 ms for the scatter, which matters for Parquet windows).
constexpr int64_t kScatterMin = int64_t{1} << 18;
constexpr int kBucketBits = 10;
constexpr int64_t kBuckets = int64_t{1} << kBucketBits;
constexpr int64_t kChunks = 64;  // fixed, so the result never depends on the thread count

}  // namespace

void permutation(int64_t n, uint64_t seed, uint64_t epoch, uint64_t stream, int64_t* out) {
  FASTML_CHECK_ARG(n >= 0, "n", "must be >= 0, got ", n);
  SplitMix64 rng = epoch_stream(seed, epoch, stream);
  if (n < kScatterMin) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    fisher_yates(out, n, rng);
    return;
  }
  // Sanders' scatter shuffle (1998): every row goes to one of kBuckets
  // buckets, uniformly and independently (top bits of mix64(key + i)); each
  // bucket is then Fisher-Yates shuffled with its own stream; the buckets
  // concatenated form a uniformly random permutation.
  const uint64_t key = rng.next();
  const uint64_t bucket_key = rng.next();
  auto bucket_of = [key](int64_t i) {
    return static_cast<int64_t>(mix64(key + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull) >>
                                (64 - kBucketBits));
  };
  const int64_t chunk = (n + kChunks - 1) / kChunks;
  std::vector<int64_t> counts(static_cast<size_t>(kChunks * kBuckets), 0);
  // Each row's bucket, computed once for the counting and the scatter pass.
  std::unique_ptr<uint16_t[]> bucket(new uint16_t[static_cast<size_t>(n)]);
  ThreadPool& pool = ThreadPool::global();
  pool.parallel_for(0, kChunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      int64_t* cnt = counts.data() + c * kBuckets;
      const int64_t end = std::min(n, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < end; ++i) {
        const auto b = static_cast<uint16_t>(bucket_of(i));
        bucket[static_cast<size_t>(i)] = b;
        ++cnt[b];
      }
    }
  });
  // Bucket-major offsets: bucket b's rows from chunk 0, then chunk 1, ...
  std::vector<int64_t> bucket_start(static_cast<size_t>(kBuckets + 1), 0);
  int64_t pos = 0;
  for (int64_t b = 0; b < kBuckets; ++b) {
    bucket_start[static_cast<size_t>(b)] = pos;
    for (int64_t c = 0; c < kChunks; ++c) {
      int64_t& cnt = counts[static_cast<size_t>(c * kBuckets + b)];
      const int64_t k = cnt;
      cnt = pos;
      pos += k;
    }
  }
  bucket_start[static_cast<size_t>(kBuckets)] = pos;
  pool.parallel_for(0, kChunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      int64_t* next = counts.data() + c * kBuckets;
      const int64_t end = std::min(n, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < end; ++i) out[next[bucket[static_cast<size_t>(i)]]++] = i;
    }
  });
  pool.parallel_for(0, kBuckets, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      SplitMix64 brng(mix64(bucket_key ^ static_cast<uint64_t>(b)));
      const int64_t s = bucket_start[static_cast<size_t>(b)];
      fisher_yates(out + s, bucket_start[static_cast<size_t>(b) + 1] - s, brng);
    }
  });
}

namespace {
// The groups of a window's positions, shuffled (Fisher-Yates over one label
// per row: a uniformly random arrangement of the multiset), then each position
// given its group's next row. Labels are as narrow as the group count allows,
// so the shuffle's random accesses stay in cache.
template <typename Label>
void window_order_impl(int64_t* out, const int64_t* starts, int64_t num_groups, SplitMix64& rng,
                       const int64_t* const* within) {
  const int64_t m = starts[num_groups];
  std::vector<Label> label(static_cast<size_t>(m));
  for (int64_t g = 0; g < num_groups; ++g) {
    std::fill(label.begin() + starts[g], label.begin() + starts[g + 1], static_cast<Label>(g));
  }
  for (int64_t i = m - 1; i > 0; --i) {
    const auto j = static_cast<size_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(label[static_cast<size_t>(i)], label[j]);
  }
  std::vector<int64_t> taken(static_cast<size_t>(num_groups), 0);
  for (int64_t p = 0; p < m; ++p) {
    const size_t g = label[static_cast<size_t>(p)];
    const int64_t t = taken[g]++;
    out[p] = starts[g] + (within != nullptr ? within[g][t] : t);
  }
}
}  // namespace

void window_order(int64_t* out, const int64_t* starts, int64_t num_groups, uint64_t seed,
                  uint64_t epoch, uint64_t stream, const int64_t* const* within) {
  FASTML_CHECK_ARG(num_groups >= 1 && starts[0] == 0, "starts",
                   "must start at 0 and hold >= 1 groups");
  for (int64_t g = 0; g < num_groups; ++g) {
    FASTML_CHECK_ARG(starts[g] <= starts[g + 1], "starts", "must be ascending");
  }
  SplitMix64 rng = epoch_stream(seed, epoch, stream);
  if (num_groups <= 256) {
    window_order_impl<uint8_t>(out, starts, num_groups, rng, within);
  } else if (num_groups <= 65536) {
    window_order_impl<uint16_t>(out, starts, num_groups, rng, within);
  } else {
    window_order_impl<uint32_t>(out, starts, num_groups, rng, within);
  }
}

std::vector<int64_t> shard_rows(const std::vector<int64_t>& order, int64_t rank, int64_t world_size,
                                bool drop_last) {
  FASTML_CHECK_ARG(world_size >= 1, "world_size", "must be >= 1, got ", world_size);
  FASTML_CHECK_ARG(rank >= 0 && rank < world_size, "rank", "must be in [0, world_size=", world_size,
                   "), got ", rank);
  const auto n = static_cast<int64_t>(order.size());
  if (world_size == 1) return order;
  const int64_t total =
      drop_last ? n / world_size * world_size : (n + world_size - 1) / world_size * world_size;
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(total / world_size));
  for (int64_t p = rank; p < total; p += world_size) out.push_back(order[p % n]);
  return out;
}

}  // namespace fastml::data

namespace fastml::data {

std::vector<int64_t> epoch_rows(int64_t n, bool shuffle, uint64_t seed, uint64_t epoch,
                                int64_t rank, int64_t world_size, bool drop_last) {
  FASTML_CHECK_ARG(n > 0, "dataset", "must have at least one row, got ", n);
  std::vector<int64_t> order(static_cast<size_t>(n));
  if (shuffle) {
    permutation(n, seed, epoch, 0, order.data());
  } else {
    for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  }
  if (world_size == 1) return order;
  return shard_rows(order, rank, world_size, drop_last);
}

}  // namespace fastml::data
