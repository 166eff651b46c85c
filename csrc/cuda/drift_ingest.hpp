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

// All numeric columns of a batch in one launch (histogram mode): a grid of
// row-chunk blocks x columns. Each column's counts are added to its slice of
// one int64 histogram buffer (bit-identical to the CPU path), and the last
// block of a column to finish sums the column's block partials in block
// order (deterministic) into its accumulator row: count, nan, inf, sum and
// sum of squares of (x - pivot), min, max. Nothing is copied to the host.
inline constexpr int kDriftMaxMultiColumns = 32;

struct DriftColumn {
  const void* x = nullptr;  // device values, float32 (dtype 0) or float64 (dtype 1)
  int64_t stride = 1;       // in elements
  int64_t edge_offset = 0;  // into DriftMultiParams::edges
  int64_t nbins = 0;
  int64_t hist_offset = 0;  // into DriftMultiParams::hist (nbins + 2 slots)
  int64_t acc_row = 0;      // row of DriftMultiParams::acc (7 doubles)
  double pivot = 0.0;
  int dtype = 0;
};

struct DriftMultiParams {
  int ncols = 0;  // 1..kDriftMaxMultiColumns
  int64_t n = 0;  // rows, the same for every column
  DriftColumn col[kDriftMaxMultiColumns];
  const double* edges = nullptr;       // device, every column's edges
  unsigned long long* hist = nullptr;  // device, every column's counters (accumulated)
  double* partials = nullptr;          // device scratch, ncols x blocks x 7
  unsigned int* done = nullptr;        // device, ncols zeroed counters (left zeroed)
  double* acc = nullptr;               // device, rows of 7 (accumulated)
  int blocks = 0;                      // row-chunk blocks per column
  void* stream = nullptr;              // cudaStream_t of the caller
};

void drift_ingest_multi_cuda(const DriftMultiParams& p);

}  // namespace fastml::cuda
