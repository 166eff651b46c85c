// The loader's native engine: gathers the batches of one epoch on the shared
// thread pool, up to `prefetch` of them ahead of the consumer, and hands them
// over in order.
//
// Batch b of an epoch holds rows[b*batch_size, (b+1)*batch_size) of the
// rank's row list, so its contents depend only on that list and never on
// thread counts or timing. Errors in a gather are stored with the batch and
// rethrown by next() on the consumer's thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "common/buffer.hpp"
#include "data/buffer_pool.hpp"
#include "data/gather.hpp"

namespace fastml::data {

// The memory of one batch: ptrs[c] is where column c's rows go. `buffers`
// (heap batches) or `slot` (pinned staging, CUDA) own it.
struct Batch {
  int64_t index = -1;
  int64_t rows = 0;
  std::vector<BufferPtr> buffers;
  std::vector<void*> ptrs;
  int slot = -1;
};

// Where batch memory comes from. acquire() runs on pool threads.
class BatchAllocator {
 public:
  virtual ~BatchAllocator() = default;
  // Fills b.ptrs (and b.buffers or b.slot) with room for `rows_capacity` rows.
  virtual void acquire(Batch& b, const std::vector<GatherColumn>& cols, int64_t rows_capacity) = 0;
  // The batch will not be used (cancelled before consumption).
  virtual void discard(Batch& b) {}
};

// Heap batches from per-column BufferPools: recycled only when unreferenced.
class PoolAllocator : public BatchAllocator {
 public:
  PoolAllocator(size_t num_columns, size_t capacity);
  void acquire(Batch& b, const std::vector<GatherColumn>& cols, int64_t rows_capacity) override;
  int64_t allocated() const;
  int64_t reused() const;
  // New buffers come from `fn` (call before any acquire()). With page_align > 0, each buffer's rows
  // start on a page boundary inside a buffer padded to whole pages of its own. `one_buffer`: a
  // batch is one buffer holding every column (see batch_layout), so it can be copied to a device in
  // one transfer; otherwise one buffer per column.
  void set_allocate(const std::function<BufferPtr(size_t)>& fn, size_t page_align,
                    bool one_buffer = false);

  // Column starts within a one-buffer batch of `rows_capacity` rows, and its
  // size: columns ordered by element size (widest first), then dtype, then
  // position, each starting on a kColumnAlign boundary. Columns of one dtype
  // are therefore adjacent, separated only by padding to that boundary.
  static constexpr size_t kColumnAlign = 64;
  static size_t batch_layout(const std::vector<GatherColumn>& cols, int64_t rows_capacity,
                             std::vector<size_t>& offsets);

 private:
  std::vector<std::unique_ptr<BufferPool>> pools_;
  size_t page_align_ = 0;
  bool one_buffer_ = false;
};

struct LoaderStats {
  int64_t batches = 0;        // handed to the consumer
  int64_t rows = 0;           // in those batches
  int64_t bytes = 0;          // output bytes in those batches
  double wait_seconds = 0;    // consumer time blocked in next()
  double worker_seconds = 0;  // pool-thread time spent gathering
  int64_t gathered = 0;       // batches gathered (consumed or not)
};

class Engine {
 public:
  // `max_running`: at most this many batches are gathered at once;
  // `prefetch`: at most this many are gathered or waiting ahead of the consumer.
  Engine(std::vector<GatherColumn> cols, int64_t batch_size, int prefetch, int max_running,
         std::shared_ptr<BatchAllocator> allocator);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Starts an epoch over `rows` (row indices into the columns) at batch
  // `first_batch`; stops any epoch in progress first.
  // Returns the epoch's token for next(); a start() on another thread that
  // begins later wins, and this call's token is then already stale.
  uint64_t start(std::shared_ptr<const std::vector<int64_t>> rows, bool drop_last,
                 int64_t first_batch);
  int64_t num_batches() const;
  // Waits for the next batch in order; false when the epoch is done (or was
  // stopped by another thread meanwhile). A consumer that has to wait sleeps
  // until max(1, prefetch - max_running) batches are ready (or all that were
  // submitted), so a loader-bound loop wakes once per few batches.
  // Rethrows a gather's error on the calling thread (and stops the epoch).
  // With `epoch` (a token from start()), false as soon as another epoch has
  // started, so a consumer of an old iteration never takes a new epoch's batch.
  static constexpr uint64_t kAnyEpoch = ~uint64_t{0};
  bool next(Batch& out, uint64_t epoch = kAnyEpoch);
  // Cancels batches not started yet and waits for running gathers to finish.
  void stop();
  LoaderStats stats() const;
  const std::vector<GatherColumn>& columns() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// Number of batches for `rows` rows.
inline int64_t batch_count(int64_t rows, int64_t batch_size, bool drop_last) {
  return drop_last ? rows / batch_size : (rows + batch_size - 1) / batch_size;
}

}  // namespace fastml::data
