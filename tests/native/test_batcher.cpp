// The batcher core under ThreadSanitizer: every request ends exactly once and
// the counters add up, under concurrent submitters, cancellations racing with
// dispatch, deadlines, a runner that fails some batches (by staging errors, by
// throwing, or by leaving requests unstaged), inline runs, and close with and
// without draining while requests are in flight.
#include <atomic>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/errors.hpp"
#include "infer/batcher.hpp"
#include "tests/native/check.hpp"

using fastml::infer::BatchCore;
using fastml::infer::BatcherConfig;
using fastml::infer::FuturePtr;
using fastml::infer::FutureState;
using fastml::infer::RequestFuture;

namespace {

// Doubles each request's value; batches whose first request's value is a
// multiple of 11 stage an error, of 13 throw, of 17 leave a request unstaged.
void runner(std::vector<FuturePtr>& batch) {
  std::vector<FuturePtr> live;
  for (auto& f : batch) {
    if (f->set_running()) live.push_back(f);
  }
  if (live.empty()) return;
  const int key = *static_cast<int*>(live[0]->input.get());
  if (key % 13 == 0) throw std::runtime_error("runner threw on purpose");
  for (size_t i = 0; i < live.size(); ++i) {
    if (key % 17 == 0 && i == 0) continue;  // the core must fail it
    if (key % 11 == 0) {
      live[i]->stage_exception(std::make_exception_ptr(std::runtime_error("staged error")));
    } else {
      const int v = *static_cast<int*>(live[i]->input.get());
      live[i]->stage_result(std::make_shared<int>(2 * v), 1);
    }
  }
  if (key % 7 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
}

FuturePtr make_request(int value) {
  auto f = std::make_shared<RequestFuture>();
  f->input = std::make_shared<int>(value);
  f->rows = 1 + value % 3;
  f->signature = static_cast<uint64_t>(value % 2);
  return f;
}

struct Tally {
  std::atomic<int> ended{0}, twice{0};
};

void run_scenario(bool drain, int delay_us, int workers) {
  BatcherConfig config;
  config.max_batch_size = 8;
  config.max_delay_us = delay_us;
  config.max_queue = 100000;
  config.workers = workers;
  auto core = std::make_shared<BatchCore>(config, runner);
  core->start();

  std::vector<FuturePtr> all[8];
  Tally tally;
  std::atomic<int> rejected{0}, unqueued{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::vector<BatchCore::Staged> group;  // odd threads queue groups (predict_async's path)
      for (int i = 0; i < 600; ++i) {
        const int value = t * 1000 + i;
        FuturePtr f = make_request(value);
        auto seen = std::make_shared<std::atomic<int>>(0);
        f->add_done_callback([&tally, seen](const FuturePtr&) {
          if (seen->fetch_add(1) > 0) tally.twice.fetch_add(1);
          tally.ended.fetch_add(1);
        });
        if (t % 2 == 1) {
          if (i % 16 == 5) f->cancel();  // before it is queued: skipped, never counted
          group.push_back(BatchCore::Staged{f, i % 3, (i % 5 == 0) ? 50 : 0});
          if (group.size() < 16 && i != 599) continue;
          core->enqueue_many(group);
          for (size_t k = 0; k < group.size(); ++k) {
            const FuturePtr& g = group[k].future;
            const int gi = i - static_cast<int>(group.size() - 1 - k);
            if (gi % 16 == 5) {
              NATIVE_CHECK(g->cancelled());
              unqueued.fetch_add(1);
              continue;
            }
            bool refused = false;
            if (g->state() == FutureState::Failed) {
              try {
                std::rethrow_exception(g->error());
              } catch (const fastml::QueueFull&) {
                refused = true;
              } catch (const std::runtime_error& e) {
                refused = std::string(e.what()).find("is closed") != std::string::npos;
              } catch (...) {
                // It was queued, ran already and failed (e.g. the runner left it
                // unfinished: a std::logic_error): accepted, not refused.
              }
            }
            if (refused) {
              rejected.fetch_add(1);
              unqueued.fetch_add(1);
              continue;
            }
            if (gi % 9 == 0) g->cancel();  // races with dispatch
            all[t].push_back(g);
          }
          group.clear();
          continue;
        }
        try {
          const int64_t timeout_us = (i % 5 == 0) ? 50 : 0;
          if (core->enqueue(f, i % 3, timeout_us, -1.0, i % 4 == 0)) core->run_inline(f);
        } catch (const std::runtime_error&) {  // closed, or QueueFull
          rejected.fetch_add(1);
          continue;
        }
        if (i % 9 == 0) f->cancel();  // races with dispatch
        all[t].push_back(std::move(f));
      }
    });
  }
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    core->close(drain);
  });
  for (auto& th : threads) th.join();
  closer.join();

  int completed = 0, failed = 0, cancelled = 0, accepted = 0;
  for (auto& v : all) {
    for (auto& f : v) {
      ++accepted;
      NATIVE_CHECK(f->wait(30.0));
      switch (f->state()) {
        case FutureState::Finished:
          ++completed;
          NATIVE_CHECK(*static_cast<int*>(f->value().get()) % 2 == 0);
          break;
        case FutureState::Failed: ++failed; break;
        case FutureState::Cancelled: ++cancelled; break;
        default: NATIVE_CHECK(false);
      }
    }
  }
  const auto s = core->stats();
  NATIVE_CHECK(tally.twice.load() == 0);
  NATIVE_CHECK(tally.ended.load() == accepted + unqueued.load());
  NATIVE_CHECK(s.queued == 0 && s.in_flight == 0);
  NATIVE_CHECK(static_cast<int>(s.requests) == accepted);
  NATIVE_CHECK(s.requests == s.completed + s.errors + s.timeouts + s.cancellations);
  NATIVE_CHECK(static_cast<int>(s.completed) == completed);
  NATIVE_CHECK(static_cast<int>(s.cancellations) == cancelled);
  NATIVE_CHECK(static_cast<int>(s.errors + s.timeouts) == failed);
}

}  // namespace

int main() {
  for (bool drain : {true, false}) {
    for (int delay : {0, 100}) {
      for (int workers : {1, 3}) run_scenario(drain, delay, workers);
    }
  }
  // A stalled runner: submit never blocks, the queue bound and deadlines hold.
  {
    BatcherConfig config;
    config.max_batch_size = 1;
    config.max_delay_us = 0;
    config.max_queue = 4;
    std::atomic<bool> open{false};
    auto core = std::make_shared<BatchCore>(config, [&](std::vector<FuturePtr>& batch) {
      while (!open.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      for (auto& f : batch) {
        if (f->set_running()) f->stage_result(std::make_shared<int>(0), 1);
      }
    });
    core->start();
    int full = 0;
    std::vector<FuturePtr> accepted;
    for (int i = 0; i < 50; ++i) {
      FuturePtr f = make_request(i);
      try {
        NATIVE_CHECK(!core->enqueue(f, 0, 20000, -1.0, false));
        accepted.push_back(f);
      } catch (const fastml::QueueFull&) {
        ++full;
      }
    }
    NATIVE_CHECK(accepted.size() >= 4 && accepted.size() <= 5);
    NATIVE_CHECK(full == 50 - static_cast<int>(accepted.size()));
    std::this_thread::sleep_for(std::chrono::milliseconds(60));
    open.store(true);
    for (auto& f : accepted) NATIVE_CHECK(f->wait(30.0));
    core->close(true);
    const auto s = core->stats();
    NATIVE_CHECK(s.requests == s.completed + s.errors + s.timeouts + s.cancellations);
    NATIVE_CHECK(s.rejections == static_cast<uint64_t>(full));
    NATIVE_CHECK(s.completed == 1 && s.timeouts == accepted.size() - 1);
  }
  return 0;
}
