// The one allocation policy of the core: 64-byte aligned, uninitialised
// buffers, shared by reference count so a NumPy array can keep one alive.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace fastml {

inline constexpr size_t kBufferAlignment = 64;

class Buffer {
 public:
  explicit Buffer(size_t nbytes) : nbytes_(nbytes) {
    const size_t rounded = (nbytes + kBufferAlignment - 1) / kBufferAlignment * kBufferAlignment;
    data_ = rounded ? std::aligned_alloc(kBufferAlignment, rounded) : nullptr;
    if (rounded && !data_) throw std::bad_alloc();
  }
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

  static std::shared_ptr<Buffer> allocate(size_t nbytes) {
    return std::make_shared<Buffer>(nbytes);
  }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
};

using BufferPtr = std::shared_ptr<Buffer>;

}  // namespace fastml
