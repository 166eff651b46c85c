// Deterministic epoch orders: a documented PRNG, Fisher-Yates permutations
// and rank sharding. Everything here is a pure function of its arguments and
// runs on one thread, so an epoch's order never depends on thread counts.
#pragma once

#include <cstdint>
#include <vector>

namespace fastml::data {

// SplitMix64 (Steele, Lea & Flood 2014): a 64-bit counter passed through a
// bijective mixer. Small, fast and statistically sound for shuffling.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform integer in [0, range), range >= 1, without modulo bias
  // (Lemire 2019, multiply-and-reject).
  uint64_t below(uint64_t range);

 private:
  uint64_t state_;
};

// The generator of stream `stream` of epoch `epoch` under `seed`: the three
// are mixed through SplitMix64 so nearby seeds/epochs give unrelated streams.
SplitMix64 epoch_stream(uint64_t seed, uint64_t epoch, uint64_t stream);

// out[0..n) = a uniformly random permutation of 0..n-1. Below 262144 rows:
// Fisher-Yates (j = below(i + 1) for i = n-1 down to 1). From 262144 rows:
// Sanders' scatter shuffle over 1024 buckets, run on the shared pool in a
// fixed number of pieces, so the result is the same for any thread count.
void permutation(int64_t n, uint64_t seed, uint64_t epoch, uint64_t stream, int64_t* out);

// The order of a window of several row groups, shuffled as a whole (the
// Parquet reader's): group g's rows are [starts[g], starts[g + 1]) of the
// window's m rows. The positions' groups are a uniformly random arrangement
// of the window's rows' groups (Fisher-Yates over one label per row, stream
// `stream` of the epoch's generator); position p takes its group's next row: starts[g] + t for the
// group's t-th position, or starts[g] + within[g][t] when `within` (each group's own order) is
// given. With uniform group orders the result is a uniform permutation of the window. With rows
// already stored in their group's shuffled order (the reader's decode does this while a group is in
// cache), `within` is omitted and every group is read front to back: a few ascending runs instead
// of random reads over the whole window. starts: num_groups + 1 ascending offsets from 0 to m; out:
// m entries.
void window_order(int64_t* out, const int64_t* starts, int64_t num_groups, uint64_t seed,
                  uint64_t epoch, uint64_t stream, const int64_t* const* within);

// This rank's rows of an epoch whose global order is `order`:
//   drop_last=false: the order is padded to a multiple of world_size by
//     repeating its first rows (at most world_size-1 of them);
//   drop_last=true: it is truncated to a multiple of world_size.
// Rank r then takes positions r, r + world_size, r + 2*world_size, ...
std::vector<int64_t> shard_rows(const std::vector<int64_t>& order, int64_t rank, int64_t world_size,
                                bool drop_last);

}  // namespace fastml::data

namespace fastml::data {

// The rows one rank reads in an epoch of n rows: the identity (shuffle=false)
// or permutation(n, seed, epoch, stream 0), then shard_rows().
std::vector<int64_t> epoch_rows(int64_t n, bool shuffle, uint64_t seed, uint64_t epoch,
                                int64_t rank, int64_t world_size, bool drop_last);

}  // namespace fastml::data
