// CUDA runtime calls of the data loader's host-to-device path, callable from
// plain C++. Implemented in data_copy.cu with CUDA, and by
// csrc/data/data_copy_no_cuda.cpp (which throws) without it. Streams and
// events are passed as opaque pointers (cudaStream_t / cudaEvent_t), so a
// caller's stream (e.g. torch's current stream) can be used directly.
#pragma once

#include <cstddef>

namespace fastml::cuda {

// A non-blocking stream on `device`.
void* stream_create(int device);
void stream_destroy(void* stream);
// An event without timing (cheap to record and query).
void* event_create(int device);
void event_destroy(void* event);
void event_record(void* event, void* stream);
// True once the work before the event's record has finished.
bool event_query(void* event);
void event_synchronize(void* event);
// Work queued on `stream` after this waits for `event`.
void stream_wait_event(void* stream, void* event);
void memcpy_h2d_async(void* dst, const void* src, size_t nbytes, void* stream);
// Page-locks host memory so copies from it are true DMA (cudaHostRegister).
void host_register(void* ptr, size_t nbytes);
// Best effort: errors (e.g. a context already torn down at exit) are ignored.
void host_unregister(void* ptr);

}  // namespace fastml::cuda
