// The one allocation policy of the core: 64-byte aligned, uninitialised
// buffers, shared by reference count so a NumPy array can keep one alive.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastml {

inline constexpr size_t kBufferAlignment = 64;

// Buffers of at least this size are 2 MiB aligned and advised to use
// transparent huge pages (Linux): a fresh 8 MB buffer then costs 4 page
// faults instead of 2048 (measured: a third of KS's time at 1M values).
inline constexpr size_t kHugeBufferBytes = size_t{4} << 20;
inline constexpr size_t kHugePageBytes = size_t{2} << 20;

// The policy itself, for containers that manage their own memory (e.g. a
// std::vector with allocator_bytes below): nullptr for 0 bytes; release with
// free_bytes.
inline void* allocate_bytes(size_t nbytes) {
  const size_t align = nbytes >= kHugeBufferBytes ? kHugePageBytes : kBufferAlignment;
  const size_t rounded = (nbytes + align - 1) / align * align;
  void* p = rounded ? std::aligned_alloc(align, rounded) : nullptr;
  if (rounded && !p) throw std::bad_alloc();
#ifdef __linux__
  if (align == kHugePageBytes) madvise(p, rounded, MADV_HUGEPAGE);  // a hint; may fail
#endif
  return p;
}
inline void free_bytes(void* p) noexcept {
  std::free(p);
}

class Buffer {
 public:
  explicit Buffer(size_t nbytes) : data_(allocate_bytes(nbytes)), nbytes_(nbytes) {}
  ~Buffer() { free_bytes(data_); }
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
