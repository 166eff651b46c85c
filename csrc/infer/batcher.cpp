#include "infer/batcher.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>

#include "common/errors.hpp"

namespace fastml::infer {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
}  // namespace

// ---------------------------------------------------------------- RequestFuture

bool RequestFuture::finish(FutureState to, std::shared_ptr<void> value, int kind,
                           std::exception_ptr error) {
  std::vector<Callback> callbacks;
  std::shared_ptr<void> released_input;
  Listener listener;
  std::shared_ptr<void> listener_owner;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const FutureState s = state_.load(std::memory_order_relaxed);
    if (s != FutureState::Pending && s != FutureState::Running) return false;
    if (to == FutureState::Cancelled && s != FutureState::Pending) return false;
    value_ = std::move(value);
    value_kind_ = kind;
    error_ = std::move(error);
    released_input = std::move(input);
    callbacks.swap(callbacks_);
    listener = std::exchange(listener_, nullptr);
    listener_owner = std::move(listener_owner_);
    state_.store(to, std::memory_order_release);
    if (has_waiters_) cv_.notify_all();
  }
  // Outside the lock: callbacks and the input's destructor may take the GIL.
  auto self = shared_from_this();
  for (auto& cb : callbacks) cb(self);
  if (listener) listener(listener_owner, listener_cookie_, self);
  return true;
}

bool RequestFuture::cancel() {
  if (state() == FutureState::Cancelled) return true;
  if (!finish(FutureState::Cancelled, nullptr, 0, nullptr))
    return state() == FutureState::Cancelled;
  std::shared_ptr<BatchCore> owner;
  {
    std::lock_guard<std::mutex> lock(mu_);
    owner = owner_.lock();
  }
  if (owner) owner->remove_cancelled(this);
  return true;
}

bool RequestFuture::set_running() {
  std::lock_guard<std::mutex> lock(mu_);
  if (state_.load(std::memory_order_relaxed) != FutureState::Pending) return false;
  state_.store(FutureState::Running, std::memory_order_release);
  return true;
}

bool RequestFuture::set_result(std::shared_ptr<void> value, int kind) {
  return finish(FutureState::Finished, std::move(value), kind, nullptr);
}

bool RequestFuture::set_exception(std::exception_ptr error) {
  return finish(FutureState::Failed, nullptr, 0, std::move(error));
}

bool RequestFuture::stage(FutureState to, std::shared_ptr<void> value, int kind,
                          std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (state_.load(std::memory_order_relaxed) != FutureState::Running ||
      staged_ != FutureState::Pending) {
    return false;
  }
  staged_ = to;
  value_ = std::move(value);
  value_kind_ = kind;
  error_ = std::move(error);
  return true;
}

bool RequestFuture::stage_result(std::shared_ptr<void> value, int kind) {
  return stage(FutureState::Finished, std::move(value), kind, nullptr);
}

bool RequestFuture::stage_exception(std::exception_ptr error) {
  return stage(FutureState::Failed, nullptr, 0, std::move(error));
}

FutureState RequestFuture::staged() const {
  std::lock_guard<std::mutex> lock(mu_);
  return staged_;
}

void RequestFuture::commit() {
  FutureState to;
  std::shared_ptr<void> value;
  int kind;
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(mu_);
    to = staged_;
    value = std::move(value_);
    kind = value_kind_;
    error = std::move(error_);
  }
  finish(to, std::move(value), kind, std::move(error));
}

bool RequestFuture::wait(double timeout_s) const {
  if (done()) return true;
  std::unique_lock<std::mutex> lock(mu_);
  has_waiters_ = true;
  auto is_done = [this] { return done(); };
  if (timeout_s < 0 || std::isinf(timeout_s)) {
    cv_.wait(lock, is_done);
    return true;
  }
  const auto limit = std::chrono::duration<double>(std::min(timeout_s, 1e9));
  return cv_.wait_for(lock, std::chrono::duration_cast<Clock::duration>(limit), is_done);
}

void RequestFuture::add_done_callback(Callback cb) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done()) {
      callbacks_.push_back(std::move(cb));
      return;
    }
  }
  cb(shared_from_this());
}

void RequestFuture::set_listener(Listener fn, std::shared_ptr<void> owner, void* cookie) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done()) {
      listener_ = fn;
      listener_owner_ = std::move(owner);
      listener_cookie_ = cookie;
      return;
    }
  }
  fn(owner, cookie, shared_from_this());
}

// ---------------------------------------------------------------- BatchCore

bool BatchCore::ByDeadline::operator()(const FuturePtr& a, const FuturePtr& b) const {
  if (a->deadline_ != b->deadline_) return a->deadline_ < b->deadline_;
  return a->seq_ < b->seq_;
}

bool BatchCore::ByAge::operator()(const FuturePtr& a, const FuturePtr& b) const {
  return a->seq_ < b->seq_;  // seq grows with arrival time
}

BatchCore::BatchCore(BatcherConfig config, Runner runner)
    : config_(std::move(config)), runner_(std::move(runner)) {
  FASTML_CHECK_ARG(config_.max_batch_size >= 1, "max_batch_size", "must be >= 1, got ",
                   config_.max_batch_size);
  FASTML_CHECK_ARG(config_.max_delay_us >= 0, "max_delay_us", "must be >= 0, got ",
                   config_.max_delay_us);
  FASTML_CHECK_ARG(config_.max_queue >= 1, "max_queue", "must be >= 1, got ", config_.max_queue);
  FASTML_CHECK_ARG(config_.workers >= 1 && config_.workers <= 256, "workers",
                   "must be in [1, 256], got ", config_.workers);
  FASTML_CHECK_ARG(static_cast<bool>(runner_), "fn", "must be callable");
  FASTML_CHECK_ARG(config_.spin_us >= 0 && config_.spin_us <= 1000000, "spin_us",
                   "must be in [0, 1000000], got ", config_.spin_us);
  stats_.queue_wait_us.reserve(kSamples);
  stats_.handler_us.reserve(kSamples);
}

BatchCore::~BatchCore() {
  close(false);
}

void BatchCore::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!threads_.empty() || closing_) return;
  // Dedicated threads, not the shared pool: each one sleeps on the queue
  // until a batch is due (deadline-driven waits) and may then block on the
  // model for long; parking pool workers like that would starve the
  // parallel_for work of every other area.
  // Each thread holds the core, so a close() that runs on a worker thread
  // itself (the last reference dropped inside a callback) cannot free it early.
  auto self = shared_from_this();
  for (int i = 0; i < config_.workers; ++i) threads_.emplace_back([self] { self->worker_loop(); });
  // Deadlines must fire while every worker is busy inside the model, so one
  // more thread watches them (it sleeps unless a queued request has a deadline).
  threads_.emplace_back([self] { self->timer_loop(); });
}

void BatchCore::timer_loop() {
  std::vector<FuturePtr> expired;
  std::unique_lock<std::mutex> lock(mu_);
  while (!closing_) {  // while draining, the workers watch the deadlines
    collect_expired(Clock::now(), expired);
    if (!expired.empty()) {
      lock.unlock();
      fail_expired(expired);
      lock.lock();
      continue;
    }
    const auto t = earliest_deadline();
    if (t == Clock::time_point::max()) {
      timer_cv_.wait(lock);
    } else {
      timer_cv_.wait_until(lock, t);
    }
  }
}

bool BatchCore::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closing_;
}

bool BatchCore::enqueue(const FuturePtr& f, int priority, int64_t timeout_us, double block_s,
                        bool allow_inline) {
  std::unique_lock<std::mutex> lock(mu_);
  auto check_open = [&] {
    if (closing_) fail<std::runtime_error>("batcher '", config_.name, "' is closed");
  };
  check_open();
  if (queued_ >= config_.max_queue) {
    if (block_s < 0) {
      ++stats_.rejections;
      fail<QueueFull>("batcher '", config_.name, "' queue is full (max_queue=", config_.max_queue,
                      " requests waiting)");
    }
    auto has_room = [&] { return closing_ || queued_ < config_.max_queue; };
    bool ok = true;
    if (std::isinf(block_s)) {
      space_cv_.wait(lock, has_room);
    } else {
      const auto limit = std::chrono::duration<double>(std::min(block_s, 1e9));
      ok = space_cv_.wait_for(lock, std::chrono::duration_cast<Clock::duration>(limit), has_room);
    }
    check_open();
    if (!ok) {
      ++stats_.rejections;
      fail<QueueFull>("batcher '", config_.name, "' queue stayed full for ", block_s,
                      " s (max_queue=", config_.max_queue, " requests waiting)");
    }
  }
  ++stats_.requests;
  if (allow_inline && queued_ == 0 && in_flight_ < config_.workers && config_.max_delay_us == 0) {
    ++in_flight_;
    record_queue_wait(0.0);
    return true;
  }
  insert_locked(f, priority, timeout_us, Clock::now());
  work_cv_.notify_one();
  if (f->deadline_ != Clock::time_point::max()) timer_cv_.notify_one();
  return false;
}

void BatchCore::insert_locked(const FuturePtr& f, int priority, int64_t timeout_us,
                              Clock::time_point now) {
  if (timeout_us < 0) timeout_us = config_.timeout_us;
  {
    std::lock_guard<std::mutex> flock(f->mu_);
    f->owner_ = weak_from_this();
  }
  f->priority_ = priority;
  f->seq_ = next_seq_++;
  f->enqueued_ = now;
  f->deadline_ =
      timeout_us > 0 ? now + std::chrono::microseconds(timeout_us) : Clock::time_point::max();
  f->queued_ = true;
  levels_.try_emplace(priority, PoolAllocator<FuturePtr>(&pool_)).first->second.insert(f);
  by_age_.insert(f);
  ++queued_;
  queued_rows_ += f->rows;
  arrivals_.fetch_add(1, std::memory_order_release);
}

void BatchCore::enqueue_many(std::vector<Staged>& group) {
  std::vector<std::pair<FuturePtr, std::exception_ptr>> refused;
  size_t accepted = 0;
  bool any_deadline = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = Clock::now();
    for (Staged& s : group) {
      if (s.future->done()) continue;  // cancelled before it was queued
      try {
        if (closing_) fail<std::runtime_error>("batcher '", config_.name, "' is closed");
        if (queued_ >= config_.max_queue) {
          ++stats_.rejections;
          fail<QueueFull>("batcher '", config_.name,
                          "' queue is full (max_queue=", config_.max_queue, " requests waiting)");
        }
      } catch (...) {
        refused.emplace_back(s.future, std::current_exception());
        continue;
      }
      ++stats_.requests;
      insert_locked(s.future, s.priority, s.timeout_us, now);
      any_deadline |= s.future->deadline_ != Clock::time_point::max();
      ++accepted;
    }
  }
  if (accepted > static_cast<size_t>(config_.max_batch_size)) {
    work_cv_.notify_all();
  } else if (accepted > 0) {
    work_cv_.notify_one();
  }
  if (any_deadline) timer_cv_.notify_one();
  // Outside the lock: ending a request runs its callbacks.
  for (auto& [f, error] : refused) f->set_exception(error);
}

void BatchCore::run_inline(const FuturePtr& f) {
  std::vector<FuturePtr> batch{f};
  run_batch(batch, true);
}

void BatchCore::unlink(const FuturePtr& f) {
  auto level = levels_.find(f->priority_);
  level->second.erase(f);
  if (level->second.empty()) levels_.erase(level);
  by_age_.erase(f);
  f->queued_ = false;
  --queued_;
  queued_rows_ -= f->rows;
  space_cv_.notify_one();
}

void BatchCore::remove_cancelled(RequestFuture* raw) {
  FuturePtr keep;  // dropped after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  if (!raw->queued_) return;  // already taken into a batch; counted there
  keep = raw->shared_from_this();
  unlink(keep);
  ++stats_.cancellations;
  work_cv_.notify_one();
}

Clock::time_point BatchCore::earliest_deadline() const {
  auto t = Clock::time_point::max();
  for (const auto& level : levels_) t = std::min(t, (*level.second.begin())->deadline_);
  return t;
}

void BatchCore::collect_expired(Clock::time_point now, std::vector<FuturePtr>& expired) {
  for (auto level = levels_.begin(); level != levels_.end();) {
    auto& set = level->second;
    while (!set.empty() && (*set.begin())->deadline_ <= now) {
      FuturePtr f = *set.begin();
      set.erase(set.begin());
      by_age_.erase(f);
      f->queued_ = false;
      --queued_;
      queued_rows_ -= f->rows;
      expired.push_back(std::move(f));
    }
    level = set.empty() ? levels_.erase(level) : std::next(level);
  }
  if (!expired.empty()) space_cv_.notify_all();
}

void BatchCore::fail_expired(std::vector<FuturePtr>& expired) {
  if (expired.empty()) return;
  uint64_t timeouts = 0, cancellations = 0;
  const auto error = std::make_exception_ptr(
      TimeoutError("request timed out in batcher '" + config_.name + "' before it ran"));
  for (auto& f : expired) {
    if (f->set_exception(error)) {
      ++timeouts;
    } else if (f->cancelled()) {
      ++cancellations;
    }
  }
  expired.clear();
  std::lock_guard<std::mutex> lock(mu_);
  stats_.timeouts += timeouts;
  stats_.cancellations += cancellations;
}

void BatchCore::form_batch(std::vector<FuturePtr>& batch) {
  // The head: highest priority level, earliest deadline, then arrival.
  FuturePtr head = *levels_.begin()->second.begin();
  unlink(head);
  batch.push_back(head);
  int64_t rows = head->rows;
  const uint64_t signature = head->signature;
  // Fill with requests of the same signature that fit whole, in the same
  // order; bounded scan so one odd request cannot make this quadratic.
  size_t budget = static_cast<size_t>(std::min<int64_t>(config_.max_batch_size, 1 << 20)) * 4 + 64;
  for (auto level = levels_.begin();
       level != levels_.end() && rows < config_.max_batch_size && budget > 0;) {
    auto& set = level->second;
    for (auto it = set.begin(); it != set.end() && rows < config_.max_batch_size && budget > 0;) {
      --budget;
      const FuturePtr& f = *it;
      if (f->signature == signature && rows + f->rows <= config_.max_batch_size) {
        FuturePtr take = f;
        it = set.erase(it);
        by_age_.erase(take);
        take->queued_ = false;
        --queued_;
        queued_rows_ -= take->rows;
        rows += take->rows;
        batch.push_back(std::move(take));
      } else {
        ++it;
      }
    }
    level = set.empty() ? levels_.erase(level) : std::next(level);
  }
  space_cv_.notify_all();
  const auto now = Clock::now();
  for (const auto& f : batch) {
    record_queue_wait(std::chrono::duration<double, std::micro>(now - f->enqueued_).count());
  }
}

void BatchCore::record_queue_wait(double us) {
  if (stats_.queue_wait_us.size() < kSamples) {
    stats_.queue_wait_us.push_back(us);
  } else {
    stats_.queue_wait_us[wait_pos_++ % kSamples] = us;
  }
}

void BatchCore::wait_until(std::unique_lock<std::mutex>& lock, Clock::time_point t) {
  if (t == Clock::time_point::max()) {
    work_cv_.wait(lock);
  } else {
    work_cv_.wait_until(lock, t);
  }
}

void BatchCore::worker_loop() {
  std::vector<FuturePtr> expired;
  std::vector<FuturePtr> batch;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    const auto now = Clock::now();
    collect_expired(now, expired);
    if (!expired.empty()) {
      lock.unlock();
      fail_expired(expired);
      lock.lock();
      continue;
    }
    if (queued_ == 0) {
      if (closing_) break;
      if (config_.spin_us > 0) {
        // Poll for a while before sleeping (see BatcherConfig::spin_us). An
        // arrival during the poll, or between it and relocking, is seen: the
        // queue is checked again under the lock before waiting.
        const uint64_t seen = arrivals_.load(std::memory_order_relaxed);
        lock.unlock();
        const auto until = Clock::now() + std::chrono::microseconds(config_.spin_us);
        while (arrivals_.load(std::memory_order_acquire) == seen && Clock::now() < until) {
          cpu_relax();
        }
        lock.lock();
        if (queued_ > 0 || closing_) continue;
      }
      work_cv_.wait(lock);
      continue;
    }
    if (closing_ && !drain_) break;  // close() fails what is left
    if (in_flight_ >= config_.workers) {
      wait_until(lock, earliest_deadline());
      continue;
    }
    const FuturePtr& oldest = *by_age_.begin();
    const auto due_at = oldest->enqueued_ + std::chrono::microseconds(config_.max_delay_us);
    const bool due = closing_ || queued_rows_ >= config_.max_batch_size || due_at <= now;
    if (!due) {
      wait_until(lock, std::min(due_at, earliest_deadline()));
      continue;
    }
    form_batch(batch);
    ++in_flight_;
    lock.unlock();
    run_batch(batch, false);
    batch.clear();  // may drop the last references (payload destructors): unlocked
    lock.lock();
  }
}

void BatchCore::run_batch(std::vector<FuturePtr>& batch, bool is_inline) {
  const auto t0 = Clock::now();
  bool failed = false;
  std::exception_ptr runner_error;
  try {
    runner_(batch);
  } catch (...) {
    failed = true;
    runner_error = std::current_exception();
  }
  const auto t1 = Clock::now();
  // Count every outcome first, then end the requests: a caller that sees its
  // result also sees it in stats().
  uint64_t completed = 0, errors = 0, cancellations = 0, rows = 0;
  bool wake = false;
  for (auto& f : batch) {
    if (f->state() == FutureState::Pending && !f->set_running()) {
      // Never started by the runner and cancelled meanwhile.
    }
    if (f->state() == FutureState::Running && f->staged() == FutureState::Pending) {
      f->stage_exception(
          runner_error ? runner_error
                       : std::make_exception_ptr(std::logic_error(
                             "fastml internal error: the batch runner left a request unfinished")));
    }
    if (f->cancelled()) {
      ++cancellations;
    } else if (f->staged() == FutureState::Finished) {
      ++completed;
      rows += static_cast<uint64_t>(f->rows);
    } else {
      ++errors;
      rows += static_cast<uint64_t>(f->rows);
      failed = true;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.completed += completed;
    stats_.errors += errors;
    stats_.cancellations += cancellations;
    if (completed + errors > 0) {
      ++stats_.batches;
      if (failed) ++stats_.failed_batches;
      if (is_inline) ++stats_.inline_batches;
      stats_.rows += rows;
      int bucket = 0;
      while (bucket < 31 && (uint64_t{1} << bucket) < rows) ++bucket;
      ++stats_.batch_size_buckets[bucket];
      const double us = std::chrono::duration<double, std::micro>(t1 - t0).count();
      if (stats_.handler_us.size() < kSamples) {
        stats_.handler_us.push_back(us);
      } else {
        stats_.handler_us[handler_pos_++ % kSamples] = us;
      }
    }
    --in_flight_;
    // Wake the workers only when a queued request may be waiting for this slot.
    wake = queued_ > 0 || closing_;
  }
  if (wake) work_cv_.notify_all();
  for (auto& f : batch) {
    if (f->state() == FutureState::Running) f->commit();
  }
}

void BatchCore::close(bool drain) {
  std::lock_guard<std::mutex> close_lock(close_mu_);
  std::vector<FuturePtr> abandoned;
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!closing_) {
      closing_ = true;
      drain_ = drain;
    } else if (!drain) {
      drain_ = false;
    }
    if (!drain_ || threads_.empty()) {
      for (auto& f : by_age_) {
        auto level = levels_.find(f->priority_);
        level->second.erase(f);
        if (level->second.empty()) levels_.erase(level);
        f->queued_ = false;
        abandoned.push_back(f);
      }
      by_age_.clear();
      queued_ = 0;
      queued_rows_ = 0;
    }
    threads.swap(threads_);
  }
  work_cv_.notify_all();
  space_cv_.notify_all();
  timer_cv_.notify_all();
  uint64_t errors = 0, cancellations = 0;
  if (!abandoned.empty()) {
    const auto error = std::make_exception_ptr(std::runtime_error(
        "batcher '" + config_.name + "' was closed with drain=False before this request ran"));
    for (auto& f : abandoned) {
      if (f->set_exception(error)) {
        ++errors;
      } else if (f->cancelled()) {
        ++cancellations;
      }
    }
    abandoned.clear();
  }
  for (auto& t : threads) {
    if (t.get_id() == std::this_thread::get_id()) {
      t.detach();  // closing from inside a batch: this worker exits when it returns
    } else {
      t.join();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.errors += errors;
  stats_.cancellations += cancellations;
  stats_.closed = true;
}

BatcherStats BatchCore::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  BatcherStats s = stats_;
  s.queued = queued_;
  s.queued_rows = queued_rows_;
  s.in_flight = in_flight_;
  s.closed = closing_;
  return s;
}

}  // namespace fastml::infer
