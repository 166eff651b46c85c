#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/drift_ingest.hpp"
#include "drift/bin_search.hpp"

namespace fastml::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void drift_ingest_kernel(const T* __restrict__ x, int64_t n, int64_t stride,
                                    const double* __restrict__ edges, int64_t nbins,
                                    unsigned long long* __restrict__ hist,
                                    double* __restrict__ partials, double pivot) {
  extern __shared__ unsigned int shared_hist[];
  __shared__ double red[7][kThreads];
  const int64_t slots = nbins + 2;
  for (int64_t k = threadIdx.x; k < slots; k += blockDim.x) shared_hist[k] = 0u;
  __syncthreads();
  double cnt = 0, nan = 0, inf = 0, sum = 0, sq = 0;
  double mn = __longlong_as_double(0x7ff0000000000000LL), mx = -mn;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const double v = static_cast<double>(x[i * stride]);
    if (isfinite(v)) {
      atomicAdd(&shared_hist[fastml::drift::histogram_slot(v, edges, nbins)], 1u);
      const double d = v - pivot;
      cnt += 1;
      sum += d;
      sq += d * d;
      mn = fmin(mn, v);
      mx = fmax(mx, v);
    } else if (isnan(v)) {
      nan += 1;
    } else {
      inf += 1;
    }
  }
  red[0][threadIdx.x] = cnt;
  red[1][threadIdx.x] = nan;
  red[2][threadIdx.x] = inf;
  red[3][threadIdx.x] = sum;
  red[4][threadIdx.x] = sq;
  red[5][threadIdx.x] = mn;
  red[6][threadIdx.x] = mx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      for (int f = 0; f < 5; ++f) red[f][threadIdx.x] += red[f][threadIdx.x + s];
      red[5][threadIdx.x] = fmin(red[5][threadIdx.x], red[5][threadIdx.x + s]);
      red[6][threadIdx.x] = fmax(red[6][threadIdx.x], red[6][threadIdx.x + s]);
    }
    __syncthreads();
  }
  if (threadIdx.x < 7) partials[blockIdx.x * 7 + threadIdx.x] = red[threadIdx.x][0];
  for (int64_t k = threadIdx.x; k < slots; k += blockDim.x) {
    if (shared_hist[k]) atomicAdd(&hist[k], static_cast<unsigned long long>(shared_hist[k]));
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("drift CUDA ingest: ") + what +
                             " failed: " + cudaGetErrorString(e));
  }
}

}  // namespace

void drift_ingest_cuda(const DriftIngestParams& p) {
  if (p.nbins < 1 || p.nbins > kDriftMaxCudaBins) {
    throw std::invalid_argument("edges must define 1.." + std::to_string(kDriftMaxCudaBins) +
                                " bins for the CUDA ingest, got " + std::to_string(p.nbins));
  }
  if (p.blocks < 1) throw std::invalid_argument("blocks must be positive");
  if (p.n == 0) return;
  auto stream = static_cast<cudaStream_t>(p.stream);
  const size_t shared = static_cast<size_t>(p.nbins + 2) * sizeof(unsigned int);
  if (p.dtype == 0) {
    drift_ingest_kernel<float>
        <<<p.blocks, kThreads, shared, stream>>>(static_cast<const float*>(p.x), p.n, p.stride,
                                                 p.edges, p.nbins, p.hist, p.partials, p.pivot);
  } else {
    drift_ingest_kernel<double>
        <<<p.blocks, kThreads, shared, stream>>>(static_cast<const double*>(p.x), p.n, p.stride,
                                                 p.edges, p.nbins, p.hist, p.partials, p.pivot);
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace fastml::cuda
