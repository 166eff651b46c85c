#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/errors.hpp"
#include "cuda/data_copy.hpp"

namespace fastml::cuda {

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    fail<std::runtime_error>("CUDA error in ", what, ": ", cudaGetErrorString(err));
  }
}

// Sets the current device for the lifetime of the guard, then restores it.
struct DeviceGuard {
  int previous = 0;
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous); }
};

}  // namespace

void* stream_create(int device) {
  DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  return s;
}

void stream_destroy(void* stream) {
  if (stream) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
}

void* event_create(int device) {
  DeviceGuard guard(device);
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  return e;
}

void event_destroy(void* event) {
  if (event) cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

void event_record(void* event, void* stream) {
  check(cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)),
        "cudaEventRecord");
}

bool event_query(void* event) {
  const cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (err == cudaErrorNotReady) return false;
  check(err, "cudaEventQuery");
  return true;
}

void event_synchronize(void* event) {
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(event)), "cudaEventSynchronize");
}

void stream_wait_event(void* stream, void* event) {
  check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0),
        "cudaStreamWaitEvent");
}

void memcpy_h2d_async(void* dst, const void* src, size_t nbytes, void* stream) {
  if (nbytes == 0) return;
  check(
      cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)),
      "cudaMemcpyAsync");
}

void host_register(void* ptr, size_t nbytes) {
  if (!ptr || nbytes == 0) return;
  check(cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable), "cudaHostRegister");
}

void host_unregister(void* ptr) {
  if (!ptr) return;
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();
}

}  // namespace fastml::cuda
