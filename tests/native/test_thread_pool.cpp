// Stress test of the shared thread pool, meant for ThreadSanitizer:
// concurrent parallel_for from several threads, nested calls, exceptions,
// resizing while idle, and submit().
#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "common/thread_pool.hpp"
#include "tests/native/check.hpp"

using fastml::ThreadPool;

int main() {
  ThreadPool& pool = ThreadPool::global();
  pool.set_num_threads(4);

  // Several callers at once, each covering its own array.
  std::vector<std::thread> callers;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep) {
        std::vector<int> hits(1000, 0);
        pool.parallel_for(0, 1000, 7, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) hits[i] += 1;
        });
        for (int h : hits)
          if (h != 1) failures.fetch_add(1);
      }
    });
  }
  for (auto& c : callers) c.join();
  NATIVE_CHECK(failures.load() == 0);

  // Nested parallel_for completes (the caller works on its own chunks).
  std::atomic<int64_t> total{0};
  pool.parallel_for(0, 8, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      pool.parallel_for(0, 100, 10, [&](int64_t a, int64_t b) { total.fetch_add(b - a); });
    }
  });
  NATIVE_CHECK(total.load() == 800);

  // The first exception reaches the caller; the pool keeps working.
  bool caught = false;
  try {
    pool.parallel_for(0, 100, 1, [&](int64_t lo, int64_t hi) {
      if (lo <= 50 && 50 < hi) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  NATIVE_CHECK(caught);

  // Resize, then submit tasks and wait for them.
  pool.set_num_threads(2);
  NATIVE_CHECK(pool.num_threads() == 2);
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) pool.submit([&] { ran.fetch_add(1); });
  while (ran.load() < 100) std::this_thread::yield();
  pool.set_num_threads(3);
  NATIVE_CHECK(pool.num_threads() == 3);
  std::puts("test_thread_pool: ok");
  return 0;
}
