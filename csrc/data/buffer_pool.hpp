// Batch buffers that are recycled only once nobody else holds them.
//
// The loader hands a batch to Python as NumPy arrays that own a copy of the
// buffer's shared_ptr (bind::to_numpy). The pool keeps one more copy; when
// use_count() drops back to 1, every array (and every view or tensor made
// from one) is gone, so the memory can be overwritten. A batch a training
// loop keeps alive therefore never changes.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "common/buffer.hpp"

namespace fastml::data {

class BufferPool {
 public:
  // At most `capacity` buffers are remembered for reuse; more are allocated
  // when all of those are in use, and freed with their last user.
  explicit BufferPool(size_t capacity) : capacity_(capacity) {}

  // A buffer of exactly `nbytes`: a free pooled one if any, else a new one.
  BufferPtr acquire(size_t nbytes);

  // Forgets every pooled buffer (those still in use live on with their users).
  void clear();

  // Replaces how new buffers are made (e.g. page-locked for CUDA copies,
  // with a deleter that unlocks them).
  void set_allocate(std::function<BufferPtr(size_t)> fn);

  int64_t allocated() const { return allocated_; }
  int64_t reused() const { return reused_; }

 private:
  std::mutex mutex_;
  size_t capacity_;
  std::vector<BufferPtr> buffers_;
  size_t next_ = 0;  // where the next scan starts
  std::function<BufferPtr(size_t)> allocate_;
  int64_t allocated_ = 0, reused_ = 0;
};

}  // namespace fastml::data
