#include "data/loader.hpp"

#include <algorithm>
#include <atomic>

#include "common/errors.hpp"
#include "common/thread_pool.hpp"

namespace fastml::data {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

PoolAllocator::PoolAllocator(size_t num_columns, size_t capacity) {
  for (size_t c = 0; c < num_columns; ++c) pools_.push_back(std::make_unique<BufferPool>(capacity));
}

size_t PoolAllocator::batch_layout(const std::vector<GatherColumn>& cols, int64_t rows_capacity,
                                   std::vector<size_t>& offsets) {
  std::vector<size_t> order(cols.size());
  for (size_t c = 0; c < order.size(); ++c) order[c] = c;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const size_t ia = itemsize(cols[a].out_dtype), ib = itemsize(cols[b].out_dtype);
    if (ia != ib) return ia > ib;
    return static_cast<int>(cols[a].out_dtype) < static_cast<int>(cols[b].out_dtype);
  });
  offsets.assign(cols.size(), 0);
  size_t off = 0;
  for (size_t c : order) {
    off = (off + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
    offsets[c] = off;
    off += static_cast<size_t>(cols[c].out_row_bytes() * rows_capacity);
  }
  return off;
}

void PoolAllocator::acquire(Batch& b, const std::vector<GatherColumn>& cols,
                            int64_t rows_capacity) {
  b.buffers.resize(cols.size());
  b.ptrs.resize(cols.size());
  if (one_buffer_) {
    std::vector<size_t> offsets;
    size_t need = batch_layout(cols, rows_capacity, offsets);
    size_t align = page_align_ > 0 ? page_align_ : kColumnAlign;
    need = (need + align - 1) / align * align + align;
    BufferPtr buf = pools_[0]->acquire(need);
    const auto addr = reinterpret_cast<uintptr_t>(buf->data());
    char* base = reinterpret_cast<char*>((addr + align - 1) / align * align);
    for (size_t c = 0; c < cols.size(); ++c) {
      b.buffers[c] = buf;
      b.ptrs[c] = base + offsets[c];
    }
    return;
  }
  for (size_t c = 0; c < cols.size(); ++c) {
    auto need = static_cast<size_t>(cols[c].out_row_bytes() * rows_capacity);
    if (page_align_ == 0) {
      b.buffers[c] = pools_[c]->acquire(need);
      b.ptrs[c] = b.buffers[c]->data();
    } else {
      // Whole pages of their own, so page-locking one buffer never touches another's pages.
      need = (need + page_align_ - 1) / page_align_ * page_align_ + page_align_;
      b.buffers[c] = pools_[c]->acquire(need);
      const auto addr = reinterpret_cast<uintptr_t>(b.buffers[c]->data());
      b.ptrs[c] = reinterpret_cast<void*>((addr + page_align_ - 1) / page_align_ * page_align_);
    }
  }
}

int64_t PoolAllocator::allocated() const {
  int64_t n = 0;
  for (const auto& p : pools_) n += p->allocated();
  return n;
}

void PoolAllocator::set_allocate(const std::function<BufferPtr(size_t)>& fn, size_t page_align,
                                 bool one_buffer) {
  page_align_ = page_align;
  one_buffer_ = one_buffer && !pools_.empty();
  for (auto& p : pools_) p->set_allocate(fn);
}

int64_t PoolAllocator::reused() const {
  int64_t n = 0;
  for (const auto& p : pools_) n += p->reused();
  return n;
}

struct Engine::State : std::enable_shared_from_this<Engine::State> {
  struct Slot {
    Batch batch;
    uint64_t generation = 0;  // the epoch it belongs to (stop() bumps State::generation)
    bool done = false;
    std::exception_ptr error;
    // A batch is gathered in `pieces` row ranges by as many pool tasks (see
    // pieces_for); the first task to start acquires its memory.
    int pieces = 1;
    int pieces_left = 0;  // under State::m
    std::mutex alloc_m;
    bool allocated = false, alloc_failed = false;  // under alloc_m
  };

  // Rows below which a batch is not split further.
  static constexpr int64_t kMinPieceRows = 1024;
  // Pieces of a batch of `n` rows: the threads the window leaves to each batch
  // (max_running / prefetch; with 16 threads and prefetch 4, four per batch),
  // so a window of prefetch batches keeps every thread busy; at least
  // kMinPieceRows rows each. One piece when threads <= prefetch.
  // Batches in flight ahead of the consumer: `prefetch`, or, when threads
  // outnumber it and batches are too small to split into pieces, one per
  // thread (small batches: the extra memory is at most num_threads batches of
  // fewer than 2 * kMinPieceRows rows).
  int window_limit() const {
    return batch_size >= 2 * kMinPieceRows ? prefetch : std::max(prefetch, max_running);
  }
  int pieces_for(int64_t n) const {
    const int64_t per_batch = std::max(1, max_running / std::max(1, prefetch));
    return static_cast<int>(std::max<int64_t>(1, std::min(per_batch, n / kMinPieceRows)));
  }

  std::vector<GatherColumn> cols;
  int64_t batch_size;
  int prefetch, max_running;
  std::shared_ptr<BatchAllocator> allocator;

  std::mutex m;
  std::condition_variable cv;
  std::shared_ptr<const std::vector<int64_t>> rows;
  int64_t num_batches = 0, next_submit = 0;
  // Bumped by stop() (under m): tasks of an old epoch do nothing. Atomic so a
  // task can check it before gathering without taking m.
  std::atomic<uint64_t> generation{0};
  int running = 0;
  std::deque<std::shared_ptr<Slot>> window;  // submitted, not yet consumed, in order
  bool consumer_waiting = false;
  LoaderStats stats;

  // Batches a waiting consumer wants finished before it wakes: the front one,
  // and while more are coming, as many as leave max_running batches of the
  // window for the workers to gather meanwhile. A loader-bound consumer then
  // sleeps and wakes once per `wake_batches()` batches rather than once per
  // batch (each wake-up is a futex round trip and two context switches),
  // and the workers never run out of batches to gather.
  int64_t wake_batches() const { return std::max(1, prefetch - max_running); }
  bool consumer_can_go() const {
    int64_t ready = 0;
    for (const auto& s : window) {
      if (!s->done) break;
      ++ready;
    }
    if (ready == 0) return false;
    if (window.front()->error) return true;  // report a failed gather at once
    return ready >= wake_batches() || ready == static_cast<int64_t>(window.size());
  }

  // Submits gathers while the window and the running limit allow. Holds m.
  void pump() {
    while (next_submit < num_batches && static_cast<int>(window.size()) < window_limit() &&
           running < max_running) {
      auto slot = std::make_shared<Slot>();
      slot->batch.index = next_submit++;
      slot->generation = generation;
      const int64_t lo = slot->batch.index * batch_size;
      const int64_t n = std::min<int64_t>(batch_size, static_cast<int64_t>(rows->size()) - lo);
      slot->pieces = slot->pieces_left = pieces_for(n);
      window.push_back(slot);
      running += slot->pieces;
      for (int p = 0; p < slot->pieces; ++p) {
        ThreadPool::global().submit([self = shared_from_this(), slot, p, gen = generation.load(),
                                     rows_ref = rows] { self->run(slot, p, gen, rows_ref); });
      }
    }
  }

  // Piece `piece` of a slot's batch: rows [n * piece / pieces, n * (piece + 1) / pieces).
  void run(const std::shared_ptr<Slot>& slot, int piece, uint64_t gen,
           const std::shared_ptr<const std::vector<int64_t>>& rows_ref) {
    const bool cancelled = gen != generation.load();
    double spent = 0;
    std::exception_ptr error;
    if (!cancelled) {
      const auto t0 = std::chrono::steady_clock::now();
      try {
        Batch& b = slot->batch;
        const int64_t lo = b.index * batch_size;
        const int64_t n =
            std::min<int64_t>(lo + batch_size, static_cast<int64_t>(rows_ref->size())) - lo;
        bool ok;
        {
          std::lock_guard<std::mutex> alloc(slot->alloc_m);
          if (!slot->allocated && !slot->alloc_failed) {
            try {
              b.rows = n;
              allocator->acquire(b, cols, batch_size);
              slot->allocated = true;
            } catch (...) {
              slot->alloc_failed = true;
              throw;
            }
          }
          ok = slot->allocated;
        }
        if (ok) {
          const int64_t a = n * piece / slot->pieces, z = n * (piece + 1) / slot->pieces;
          const int64_t* idx = rows_ref->data() + lo + a;
          for (size_t c = 0; c < cols.size(); ++c) {
            char* dst = static_cast<char*>(b.ptrs[c]) + a * cols[c].out_row_bytes();
            gather_rows(cols[c], idx, z - a, dst);
          }
        }
      } catch (...) {
        error = std::current_exception();
      }
      spent = seconds_since(t0);
    }
    bool wake;
    {
      std::lock_guard<std::mutex> lock(m);
      if (error && !slot->error) slot->error = error;
      --running;
      stats.worker_seconds += spent;
      if (--slot->pieces_left == 0) {
        slot->done = true;
        if (!cancelled) ++stats.gathered;
      }
      if (gen == generation) pump();
      // Wake the consumer only once it can go on, and stop() once all is idle.
      wake = running == 0 || (consumer_waiting && consumer_can_go());
    }
    // After unlocking: a woken thread does not block on m straight away.
    if (wake) cv.notify_all();
  }

  // Ends the epoch: cancels what has not started and waits (m released) for
  // running gathers. Returns false when a newer start() or stop() on another
  // thread bumped the generation meanwhile: that call owns the state now (it
  // cleans up after this epoch too), so this one must not touch it.
  bool stop_locked(std::unique_lock<std::mutex>& lock) {
    const uint64_t mine = ++generation;
    num_batches = next_submit = 0;
    cv.wait(lock, [&] { return running == 0; });
    if (generation != mine) return false;
    for (auto& s : window) allocator->discard(s->batch);
    window.clear();
    rows.reset();
    cv.notify_all();  // a consumer waiting in next() sees the epoch end
    return true;
  }
};

Engine::Engine(std::vector<GatherColumn> cols, int64_t batch_size, int prefetch, int max_running,
               std::shared_ptr<BatchAllocator> allocator)
    : state_(std::make_shared<State>()) {
  FASTML_CHECK_ARG(batch_size > 0, "batch_size", "must be > 0, got ", batch_size);
  FASTML_CHECK_ARG(prefetch >= 1, "prefetch", "must be >= 1, got ", prefetch);
  FASTML_CHECK_ARG(max_running >= 1, "num_threads", "must be >= 1, got ", max_running);
  state_->cols = std::move(cols);
  state_->batch_size = batch_size;
  state_->prefetch = prefetch;
  state_->max_running = max_running;
  state_->allocator = std::move(allocator);
}

Engine::~Engine() {
  stop();
}

uint64_t Engine::start(std::shared_ptr<const std::vector<int64_t>> rows, bool drop_last,
                       int64_t first_batch) {
  const int64_t n = batch_count(static_cast<int64_t>(rows->size()), state_->batch_size, drop_last);
  FASTML_CHECK_ARG(first_batch >= 0 && first_batch <= n, "first_batch", "must be in [0, ", n,
                   "], got ", first_batch);
  std::unique_lock<std::mutex> lock(state_->m);
  // Superseded by a start() on another thread while waiting for the old
  // epoch's gathers: that one wins, and this epoch's token is already stale.
  if (!state_->stop_locked(lock)) return state_->generation - 1;
  state_->rows = std::move(rows);
  state_->num_batches = n;
  state_->next_submit = first_batch;
  state_->pump();
  return state_->generation;
}

int64_t Engine::num_batches() const {
  std::lock_guard<std::mutex> lock(state_->m);
  return state_->num_batches;
}

bool Engine::next(Batch& out, uint64_t epoch) {
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.m);
  if (epoch != kAnyEpoch && epoch != s.generation) return false;  // a newer epoch started
  if (s.window.empty()) {
    s.pump();
    if (s.window.empty()) return false;
  }
  auto slot = s.window.front();
  // A stop() on another thread bumps the generation first and waits for the
  // running gathers with the lock released: from then on this epoch's slots
  // (cancelled ones are "done" without rows) are never handed out.
  if (slot->generation != s.generation) return false;
  if (!slot->done) {
    const auto t0 = std::chrono::steady_clock::now();
    s.consumer_waiting = true;
    s.cv.wait(lock, [&] { return slot->generation != s.generation || s.consumer_can_go(); });
    s.consumer_waiting = false;
    s.stats.wait_seconds += seconds_since(t0);
    if (slot->generation != s.generation) return false;
  }
  s.window.pop_front();
  if (slot->error) {
    s.stop_locked(lock);
    std::rethrow_exception(slot->error);
  }
  out = std::move(slot->batch);
  s.stats.batches += 1;
  s.stats.rows += out.rows;
  for (const auto& c : s.cols) s.stats.bytes += c.out_row_bytes() * out.rows;
  s.pump();
  return true;
}

void Engine::stop() {
  std::unique_lock<std::mutex> lock(state_->m);
  state_->stop_locked(lock);
}

LoaderStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(state_->m);
  return state_->stats;
}

const std::vector<GatherColumn>& Engine::columns() const {
  return state_->cols;
}

}  // namespace fastml::data
