// CUDA ingest of one numeric column into a drift histogram and moments, in
// one pass (csrc/cuda/drift_ingest.cu). Callable from plain C++; in CPU-only
// builds drift_ingest_cuda throws std::runtime_error (csrc/drift/cuda_stub.cpp).
#pragma once

#include <cstdint>

namespace fastml::cuda {

// Raw device pointers and sizes only; the caller (the bindings, over torch
// tensors) owns every buffer, so no allocation happens per call.
struct DriftIngestParams {
  const void* x = nullptr;  // device values, float32 (dtype 0) or float64 (dtype 1)
  int dtype = 0;
  int64_t n = 0;
  int64_t stride = 1;             // in elements
  const double* edges = nullptr;  // device, nbins + 1 ascending
  int64_t nbins = 0;
  unsigned long long* hist = nullptr;  // device, nbins + 2 zeroed counters
  double* partials = nullptr;          // device, blocks x 7: count, nan, inf, sum, sumsq, min, max
  int blocks = 0;                      // grid size; partials holds 7 * blocks doubles
  double pivot = 0.0;                  // sums are of (x - pivot)
  void* stream = nullptr;              // cudaStream_t of the caller
};

// The most bins the kernel's shared-memory histogram holds.
inline constexpr int64_t kDriftMaxCudaBins = 4094;

void drift_ingest_cuda(const DriftIngestParams& p);

}  // namespace fastml::cuda
