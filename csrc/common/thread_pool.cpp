#include "common/thread_pool.hpp"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cstdlib>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/errors.hpp"

namespace fastml {

namespace {

thread_local bool t_in_worker = false;

ThreadPool* g_pool = nullptr;
std::mutex g_pool_mutex;
std::once_flag g_atfork_once;

// In a forked child the worker threads do not exist: abandon the old pool
// (its mutexes may be held by threads that are gone) and build a new one
// lazily. The leak is deliberate and bounded to one pool per fork.
void reset_pool_in_child() {
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
}

struct ForJob {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t begin = 0, end = 0, chunk = 1, nchunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> failed{false};
  std::mutex m;
  std::condition_variable cv;
  std::exception_ptr error;

  // Claims and runs chunks until none are left.
  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      if (!failed.load(std::memory_order_relaxed)) {
        const int64_t lo = begin + c * chunk;
        const int64_t hi = lo + chunk < end ? lo + chunk : end;
        try {
          (*fn)(lo, hi);
        } catch (...) {
          std::lock_guard<std::mutex> lock(m);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == nchunks) {
        std::lock_guard<std::mutex> lock(m);
        cv.notify_all();
      }
    }
  }
};

}  // namespace

int default_num_threads() {
  if (const char* env = std::getenv("FASTML_NUM_THREADS")) {
    char* endp = nullptr;
    long v = std::strtol(env, &endp, 10);
    if (endp != env && *endp == '\0' && v >= 1 && v <= 4096) return static_cast<int>(v);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

ThreadPool& ThreadPool::global() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_pool_in_child); });
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool) g_pool = new ThreadPool(default_num_threads());  // lives until exit
  return *g_pool;
}

ThreadPool::ThreadPool(int num_threads) {
  FASTML_CHECK_ARG(num_threads >= 1, "num_threads", "must be >= 1, got ", num_threads);
  start_workers(num_threads);
}

ThreadPool::~ThreadPool() {
  stop_workers();
}

bool ThreadPool::in_worker() {
  return t_in_worker;
}

int ThreadPool::num_threads() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_threads_;
}

void ThreadPool::start_workers(int n) {
  std::lock_guard<std::mutex> lock(mutex_);
  stopping_ = false;
  num_threads_ = n;
  // n workers: the caller of parallel_for is one more participant, but
  // submit() needs at least one worker even when n == 1.
  for (int i = 0; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::set_num_threads(int n) {
  FASTML_CHECK_ARG(n >= 1, "num_threads", "must be >= 1, got ", n);
  if (t_in_worker)
    fail<std::logic_error>("set_num_threads cannot be called from a fastml worker thread");
  std::lock_guard<std::mutex> resize(resize_mutex_);
  if (n == num_threads()) return;
  // Workers finish their current task and exit; queued tasks stay queued
  // for the new workers.
  stop_workers();
  start_workers(n);
}

void ThreadPool::worker_loop() {
  t_in_worker = true;
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      task();
    } catch (...) {
      // Tasks own their error reporting; keep the worker alive regardless.
    }
  }
}

void ThreadPool::submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
}

void ThreadPool::parallel_for(int64_t begin, int64_t end, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (end <= begin) return;
  if (grain < 1) grain = 1;
  const int64_t n = end - begin;
  const int threads = num_threads();
  if (threads <= 1 || n <= grain) {
    fn(begin, end);
    return;
  }
  // About four chunks per thread balances uneven work without many hand-offs.
  int64_t chunk = (n + 4 * threads - 1) / (4 * threads);
  if (chunk < grain) chunk = grain;
  auto job = std::make_shared<ForJob>();
  job->fn = &fn;
  job->begin = begin;
  job->end = end;
  job->chunk = chunk;
  job->nchunks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(threads - 1, job->nchunks - 1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t i = 0; i < helpers; ++i) queue_.emplace_back([job] { job->work(); });
  }
  if (helpers == 1)
    cv_.notify_one();
  else
    cv_.notify_all();
  job->work();
  {
    std::unique_lock<std::mutex> lock(job->m);
    job->cv.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == job->nchunks; });
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace fastml
