#include "data/buffer_pool.hpp"

#include <atomic>

namespace fastml::data {

BufferPtr BufferPool::acquire(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Batches are mostly released in the order they were handed out, so the
  // scan starts after the buffer handed out last: the next one is usually free.
  const size_t m = buffers_.size();
  for (size_t k = 0; k < m; ++k) {
    const size_t i = (next_ + k) % m;
    BufferPtr& b = buffers_[i];
    // use_count() == 1: only this pool holds the buffer, and only under this
    // lock can a new holder appear, so nobody can start using it meanwhile.
    if (b.use_count() == 1 && b->nbytes() == nbytes) {
      // Pairs with the release in the last holder's decrement: its reads of
      // the old batch happen before our writes of the new one.
      std::atomic_thread_fence(std::memory_order_acquire);
      ++reused_;
      next_ = i + 1;
      return b;
    }
  }
  BufferPtr fresh = allocate_ ? allocate_(nbytes) : Buffer::allocate(nbytes);
  ++allocated_;
  if (buffers_.size() < capacity_) {
    buffers_.push_back(fresh);
  } else {
    // Replace a pooled buffer of another size that nobody uses, if any.
    for (auto& b : buffers_) {
      if (b.use_count() == 1) {
        b = fresh;
        break;
      }
    }
  }
  return fresh;
}

void BufferPool::set_allocate(std::function<BufferPtr(size_t)> fn) {
  std::lock_guard<std::mutex> lock(mutex_);
  allocate_ = std::move(fn);
  buffers_.clear();  // made the old way: not reused from here on
}

void BufferPool::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  buffers_.clear();
}

}  // namespace fastml::data
