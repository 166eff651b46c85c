// fastml.infer.Batcher's native core: request futures, the priority queue and
// the scheduler that groups queued requests into batches.
//
// The core knows nothing about Python. A request's input and its result are
// opaque (std::shared_ptr<void> owned by the bindings); the core decides when
// and with which requests a batch runs, and calls a Runner that executes it
// and ends every request of the batch.
//
// Locking rule: no callback, runner or payload destructor ever runs while the
// core's mutex or a future's mutex is held, so the bindings may take the GIL
// inside any of them without a lock-order deadlock.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace fastml::infer {

using Clock = std::chrono::steady_clock;

enum class FutureState : uint8_t { Pending, Running, Finished, Failed, Cancelled };

class BatchCore;

// The outcome of one request; ends exactly once (result, error or cancellation).
class RequestFuture : public std::enable_shared_from_this<RequestFuture> {
 public:
  using Callback = std::function<void(const std::shared_ptr<RequestFuture>&)>;

  RequestFuture() = default;
  RequestFuture(const RequestFuture&) = delete;
  RequestFuture& operator=(const RequestFuture&) = delete;

  FutureState state() const { return state_.load(std::memory_order_acquire); }
  bool done() const {
    const FutureState s = state();
    return s == FutureState::Finished || s == FutureState::Failed || s == FutureState::Cancelled;
  }
  bool running() const { return state() == FutureState::Running; }
  bool cancelled() const { return state() == FutureState::Cancelled; }

  // Pending -> Cancelled (also takes it out of its batcher's queue). False
  // once it runs or has ended; true if it was already cancelled.
  bool cancel();
  // Pending -> Running, by the runner just before the handler sees the
  // request. False when it was cancelled or ended meanwhile: skip it.
  bool set_running();
  // End with a value (opaque to the core; `kind` tells the bindings what it
  // is) or an error. False (and no effect) if it had already ended.
  bool set_result(std::shared_ptr<void> value, int kind);
  bool set_exception(std::exception_ptr error);
  // What a batch runner calls instead, on a Running request: records the
  // outcome without ending the request. The core counts the batch's outcomes
  // in its stats and only then ends the requests (commit), so a caller that
  // sees its result also sees it counted. False unless Running and unstaged.
  bool stage_result(std::shared_ptr<void> value, int kind);
  bool stage_exception(std::exception_ptr error);

  // Blocks until done or until `timeout_s` passes (< 0: no limit). True when done.
  bool wait(double timeout_s) const;
  // Runs `cb` once the future ends: now, on this thread, if it already has;
  // otherwise on the thread that ends it.
  void add_done_callback(Callback cb);

  // One listener, cheaper than a callback (nothing allocated per request):
  // `fn(owner, cookie, future)` runs once when the request ends, on the thread
  // that ends it, after the callbacks and with no lock held; `owner` (kept
  // alive until then) is released right after. Set it before the request is
  // shared with another thread, i.e. before it is queued; on a request that
  // already ended it runs at once.
  using Listener = void (*)(std::shared_ptr<void>& owner, void* cookie,
                            const std::shared_ptr<RequestFuture>& future);
  void set_listener(Listener fn, std::shared_ptr<void> owner, void* cookie);

  // Valid once done (read after done() returned true).
  const std::shared_ptr<void>& value() const { return value_; }
  int value_kind() const { return value_kind_; }
  std::exception_ptr error() const { return error_; }

  // The request, as the bindings described it (set before it is queued).
  std::shared_ptr<void> input;  // released as soon as the request ends
  int input_kind = 0;
  int64_t rows = 0;
  uint64_t signature = 0;    // requests batch together only when equal
  bool single_row = false;   // the bindings' flag: one row given without its batch dimension
  int32_t wait_spin_us = 0;  // how long a waiter polls before sleeping (the batcher's spin_us)

 private:
  friend class BatchCore;
  bool finish(FutureState to, std::shared_ptr<void> value, int kind, std::exception_ptr error);
  bool stage(FutureState to, std::shared_ptr<void> value, int kind, std::exception_ptr error);
  FutureState staged() const;
  void commit();  // ends the request with its staged outcome

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::atomic<FutureState> state_{FutureState::Pending};
  std::shared_ptr<void> value_;
  int value_kind_ = 0;
  std::exception_ptr error_;
  std::vector<Callback> callbacks_;
  Listener listener_ = nullptr;
  std::shared_ptr<void> listener_owner_;
  void* listener_cookie_ = nullptr;
  mutable bool has_waiters_ = false;
  FutureState staged_ = FutureState::Pending;  // Finished/Failed once a runner staged it

  // Queue bookkeeping, guarded by the owning core's mutex.
  std::weak_ptr<BatchCore> owner_;
  bool queued_ = false;
  int priority_ = 0;
  uint64_t seq_ = 0;
  Clock::time_point enqueued_{};
  Clock::time_point deadline_ = Clock::time_point::max();
};

using FuturePtr = std::shared_ptr<RequestFuture>;

struct BatcherConfig {
  int64_t max_batch_size = 64;  // rows
  int64_t max_delay_us = 500;
  int64_t max_queue = 10000;  // requests waiting (not yet in a batch)
  int64_t timeout_us = -1;    // default per-request deadline; < 0: none
  int workers = 1;
  std::string name = "model";
  // An idle worker polls for new requests this long before it sleeps, so a
  // request that arrives soon after the last batch starts without a futex
  // wake-up (a few microseconds here). 0: sleep at once.
  int64_t spin_us = 20;
};

struct BatcherStats {
  uint64_t requests = 0;       // accepted by submit
  uint64_t completed = 0;      // ended with a result
  uint64_t errors = 0;         // ended with an error (handler, wrong rows, closed)
  uint64_t timeouts = 0;       // ended with TimeoutError before running
  uint64_t cancellations = 0;  // cancelled before running
  uint64_t rejections = 0;     // refused with QueueFull
  uint64_t batches = 0;
  uint64_t failed_batches = 0;
  uint64_t rows = 0;
  uint64_t inline_batches = 0;  // ran on the submitting thread
  int64_t queued = 0;           // requests waiting now
  int64_t queued_rows = 0;
  int64_t in_flight = 0;  // batches running now
  // Batch sizes in rows: bucket i counts batches with 2^(i-1) < rows <= 2^i.
  std::array<uint64_t, 32> batch_size_buckets{};
  // Recent samples (up to kSamples each) for percentiles, in microseconds.
  std::vector<double> queue_wait_us;
  std::vector<double> handler_us;
  bool closed = false;
};

// Fixed-size blocks for the queue's tree nodes, recycled through a free list:
// the loop or submitting thread allocates a request's nodes and a worker frees
// them, and with malloc that hand-over between threads cost more than the
// queue itself (measured: predict_async's loop thread spent ~10% in malloc).
// Not thread-safe: every container using it is touched under the core's mutex.
class NodePool {
 public:
  static constexpr size_t kBlock = 64;
  NodePool() = default;
  NodePool(const NodePool&) = delete;
  NodePool& operator=(const NodePool&) = delete;
  ~NodePool() {
    for (void* c : chunks_) ::operator delete(c);
  }
  void* get() {
    if (free_ == nullptr) refill();
    Free* b = free_;
    free_ = b->next;
    return b;
  }
  void put(void* p) {
    auto* b = static_cast<Free*>(p);
    b->next = free_;
    free_ = b;
  }

 private:
  struct Free {
    Free* next;
  };
  void refill() {
    constexpr size_t kPerChunk = 256;
    char* c = static_cast<char*>(::operator new(kBlock * kPerChunk));
    chunks_.push_back(c);
    for (size_t i = 0; i < kPerChunk; ++i) put(c + i * kBlock);
  }
  Free* free_ = nullptr;
  std::vector<void*> chunks_;
};

// std::allocator's interface over a NodePool for single nodes of up to
// NodePool::kBlock bytes; anything else goes to operator new.
template <class T>
struct PoolAllocator {
  using value_type = T;
  NodePool* pool;
  explicit PoolAllocator(NodePool* p) noexcept : pool(p) {}
  template <class U>
  PoolAllocator(const PoolAllocator<U>& o) noexcept : pool(o.pool) {}  // NOLINT
  T* allocate(size_t n) {
    if (n == 1 && sizeof(T) <= NodePool::kBlock && alignof(T) <= alignof(std::max_align_t)) {
      return static_cast<T*>(pool->get());
    }
    return static_cast<T*>(::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept {
    if (n == 1 && sizeof(T) <= NodePool::kBlock && alignof(T) <= alignof(std::max_align_t)) {
      pool->put(p);
      return;
    }
    ::operator delete(p);
  }
  template <class U>
  bool operator==(const PoolAllocator<U>& o) const noexcept {
    return pool == o.pool;
  }
  template <class U>
  bool operator!=(const PoolAllocator<U>& o) const noexcept {
    return pool != o.pool;
  }
};

class BatchCore : public std::enable_shared_from_this<BatchCore> {
 public:
  // Runs one batch: must call set_running() on each request before handing it
  // to the model (skipping those where it returns false) and stage each one's
  // outcome (stage_result / stage_exception); the core then counts and ends
  // them. If it throws, every request it left unstaged fails with that error.
  using Runner = std::function<void(std::vector<FuturePtr>& batch)>;
  static constexpr size_t kSamples = 4096;

  // Validates `config` (std::invalid_argument naming the bad field).
  BatchCore(BatcherConfig config, Runner runner);
  ~BatchCore();
  BatchCore(const BatchCore&) = delete;
  BatchCore& operator=(const BatchCore&) = delete;

  // Starts the worker threads (call once, after the core is owned by a shared_ptr).
  void start();

  // Queues `f` (its rows, signature and input set). With `allow_inline`,
  // returns true when the caller must run it at once with run_inline()
  // instead: nothing is queued, a worker slot is free, and waiting could not
  // form a larger batch (max_delay_us == 0). The bindings allow it only where
  // the caller blocks for the result anyway, or opted in (see Batcher.inline).
  // `timeout_us` < 0 uses the batcher's default; 0 means none.
  // A full queue throws fastml::QueueFull, or with `block_s` >= 0 waits up to
  // that many seconds (infinity allowed) for room first. After close(),
  // throws std::runtime_error.
  bool enqueue(const FuturePtr& f, int priority, int64_t timeout_us, double block_s,
               bool allow_inline);
  // One request of a group queued by enqueue_many.
  struct Staged {
    FuturePtr future;
    int priority = 0;
    int64_t timeout_us = -1;
  };
  // Queues a group under one lock, waking the workers once (never inline,
  // never blocking). Requests already ended (cancelled before they were
  // queued) are skipped, uncounted. A request that finds the queue full or
  // the batcher closed ends at once with QueueFull / std::runtime_error (a
  // rejection counts as enqueue's does).
  void enqueue_many(std::vector<Staged>& group);
  void run_inline(const FuturePtr& f);

  // Stops accepting requests. drain: queued requests still run; otherwise
  // they fail with std::runtime_error. Waits for the workers to finish.
  void close(bool drain);
  bool closed() const;
  BatcherStats stats() const;
  const BatcherConfig& config() const { return config_; }

 private:
  friend class RequestFuture;
  struct ByDeadline {
    bool operator()(const FuturePtr& a, const FuturePtr& b) const;
  };
  struct ByAge {
    bool operator()(const FuturePtr& a, const FuturePtr& b) const;
  };

  void worker_loop();
  void timer_loop();
  void wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point t);
  void run_batch(std::vector<FuturePtr>& batch, bool is_inline);
  void remove_cancelled(RequestFuture* f);
  // Under mu_: unlinks f from the queue.
  void unlink(const FuturePtr& f);
  // Under mu_: moves requests past their deadline into `expired`.
  void collect_expired(Clock::time_point now, std::vector<FuturePtr>& expired);
  // Under mu_: takes the next batch out of the queue.
  void form_batch(std::vector<FuturePtr>& batch);
  Clock::time_point earliest_deadline() const;
  void record_queue_wait(double us);  // under mu_
  // Under mu_: links an accepted request into the queue (no wake-up).
  void insert_locked(const FuturePtr& f, int priority, int64_t timeout_us, Clock::time_point now);
  void fail_expired(std::vector<FuturePtr>& expired);

  const BatcherConfig config_;
  const Runner runner_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // workers: queue changed or a slot freed
  std::condition_variable space_cv_;  // blocked submitters: room in the queue
  std::condition_variable timer_cv_;  // the deadline watcher: a new deadline or close
  // Priority level (highest first) -> requests by (deadline, arrival). The
  // nodes come from pool_ (declared first: destroyed after the containers).
  NodePool pool_;
  using LevelSet = std::set<FuturePtr, ByDeadline, PoolAllocator<FuturePtr>>;
  std::map<int, LevelSet, std::greater<int>, PoolAllocator<std::pair<const int, LevelSet>>> levels_{
      PoolAllocator<std::pair<const int, LevelSet>>(&pool_)};
  std::set<FuturePtr, ByAge, PoolAllocator<FuturePtr>> by_age_{
      PoolAllocator<FuturePtr>(&pool_)};  // every queued request, oldest first
  int64_t queued_ = 0;
  int64_t queued_rows_ = 0;
  int64_t in_flight_ = 0;
  uint64_t next_seq_ = 0;
  std::atomic<uint64_t> arrivals_{0};  // requests queued so far (the spinning workers poll it)
  bool closing_ = false;
  bool drain_ = true;
  std::vector<std::thread> threads_;
  std::mutex close_mu_;  // serialises close()

  BatcherStats stats_;
  size_t wait_pos_ = 0, handler_pos_ = 0;
};

}  // namespace fastml::infer
