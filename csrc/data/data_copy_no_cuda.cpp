// CPU-only builds: the loader's CUDA entry points exist and explain that this
// build has no CUDA (device="cuda" is refused before reaching them).
#if !defined(FASTML_WITH_CUDA)

#include <stdexcept>

#include "cuda/data_copy.hpp"

namespace fastml::cuda {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "fastml was built without CUDA (FASTML_CUDA=OFF); device='cuda' needs a CUDA build");
}
}  // namespace

void* stream_create(int) {
  no_cuda();
}
void stream_destroy(void*) {}
void* event_create(int) {
  no_cuda();
}
void event_destroy(void*) {}
void event_record(void*, void*) {
  no_cuda();
}
bool event_query(void*) {
  no_cuda();
}
void event_synchronize(void*) {
  no_cuda();
}
void stream_wait_event(void*, void*) {
  no_cuda();
}
void memcpy_h2d_async(void*, const void*, size_t, void*) {
  no_cuda();
}
void host_register(void*, size_t) {
  no_cuda();
}
void host_unregister(void*) {}

}  // namespace fastml::cuda

#endif  // !FASTML_WITH_CUDA
