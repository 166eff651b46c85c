// The one native thread pool of fastml, shared by every area.
//
// parallel_for splits [begin, end) into chunks; the calling thread runs chunks
// too, so nested calls and calls from many Python threads at once never
// deadlock. submit() runs short background tasks (loader gathers, etc.).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fastml {

class ThreadPool {
 public:
  // The process-wide pool (created on first use; recreated in a forked child).
  static ThreadPool& global();

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Threads that work on one parallel_for, the caller included.
  int num_threads() const;
  // Resizes the pool; n >= 1. Throws std::invalid_argument otherwise, and
  // std::logic_error when called from inside a pool task.
  void set_num_threads(int n);

  // Runs fn(chunk_begin, chunk_end) over [begin, end) in chunks of at least
  // `grain` items, on up to num_threads() threads, and returns when all are
  // done. The first exception thrown by fn is rethrown here after the other
  // chunks finish (unclaimed chunks are skipped).
  void parallel_for(int64_t begin, int64_t end, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn);

  // Runs `task` on a worker thread. Tasks must report their own errors
  // (an escaping exception is swallowed to keep the worker alive).
  void submit(std::function<void()> task);

  // True on a thread owned by a fastml pool.
  static bool in_worker();

 private:
  void start_workers(int n);
  void stop_workers();
  void worker_loop();

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
  int num_threads_ = 1;
  std::mutex resize_mutex_;
};

// Defaults: FASTML_NUM_THREADS if set, else the CPUs this process may use.
int default_num_threads();

}  // namespace fastml
