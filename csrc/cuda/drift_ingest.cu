#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/drift_ingest.hpp"
#include "drift/bin_search.hpp"

namespace fastml::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Values each thread takes per step: independent binary searches and loads in
// flight together (the search is a chain of dependent loads).
constexpr int kUnroll = 4;

struct Moments {
  double cnt = 0, nan = 0, inf = 0, sum = 0, sq = 0;
  double mn, mx;
};

// One value into the warp's histogram and the thread's moments.
__device__ inline void ingest_one(double v, const double* edges, int64_t nbins,
                                  unsigned int* warp_hist, double pivot, Moments& m) {
  if (isfinite(v)) {
    atomicAdd(&warp_hist[fastml::drift::histogram_slot(v, edges, nbins)], 1u);
    const double d = v - pivot;
    m.cnt += 1;
    m.sum += d;
    m.sq += d * d;
    m.mn = fmin(m.mn, v);
    m.mx = fmax(m.mx, v);
  } else if (isnan(v)) {
    m.nan += 1;
  } else {
    m.inf += 1;
  }
}

// One block's share of a column: rows blockIdx.x, blockIdx.x + gridDim.x, ...
// (in steps of kUnroll values per thread), `load(i)` reading row i as a double.
// Shared memory: the edges (nbins + 1 doubles) when they fit, then one
// histogram of nbins + 2 counters per warp (fewer threads contend for one
// counter), or a single block histogram when the per-warp copies would not
// fit. Adds the block's counts to `hist` and writes its 7 partials (count, nan,
// inf, sum, sumsq, min, max) to `partials`. Every thread of the block calls it.
template <typename Load>
__device__ void ingest_block(const Load& load, int64_t n, const double* __restrict__ edges_g,
                             int64_t nbins, bool edges_shared, int hist_copies, double pivot,
                             unsigned long long* __restrict__ hist, double* __restrict__ partials) {
  extern __shared__ double shared[];
  const double* edges = edges_shared ? shared : edges_g;
  unsigned int* shared_hist =
      reinterpret_cast<unsigned int*>(edges_shared ? shared + nbins + 1 : shared);
  __shared__ double red[7][kThreads];
  const int64_t slots = nbins + 2;
  if (edges_shared)
    for (int64_t k = threadIdx.x; k <= nbins; k += blockDim.x) shared[k] = edges_g[k];
  for (int64_t k = threadIdx.x; k < slots * hist_copies; k += blockDim.x) shared_hist[k] = 0u;
  __syncthreads();
  unsigned int* my_hist = shared_hist + (hist_copies > 1 ? (threadIdx.x / 32) * slots : 0);
  Moments m;
  m.mn = __longlong_as_double(0x7ff0000000000000LL);
  m.mx = -m.mn;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Main part: kUnroll values per thread per step, loaded before any is used
  // (a step covers kUnroll * threads consecutive-by-thread values).
  const int64_t full = n / (kUnroll * threads) * (kUnroll * threads);
  for (int64_t base = tid; base < full; base += kUnroll * threads) {
    double v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load(base + u * threads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) ingest_one(v[u], edges, nbins, my_hist, pivot, m);
  }
  for (int64_t i = full + tid; i < n; i += threads)
    ingest_one(load(i), edges, nbins, my_hist, pivot, m);
  red[0][threadIdx.x] = m.cnt;
  red[1][threadIdx.x] = m.nan;
  red[2][threadIdx.x] = m.inf;
  red[3][threadIdx.x] = m.sum;
  red[4][threadIdx.x] = m.sq;
  red[5][threadIdx.x] = m.mn;
  red[6][threadIdx.x] = m.mx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      for (int f = 0; f < 5; ++f) red[f][threadIdx.x] += red[f][threadIdx.x + s];
      red[5][threadIdx.x] = fmin(red[5][threadIdx.x], red[5][threadIdx.x + s]);
      red[6][threadIdx.x] = fmax(red[6][threadIdx.x], red[6][threadIdx.x + s]);
    }
    __syncthreads();
  }
  if (threadIdx.x < 7) partials[threadIdx.x] = red[threadIdx.x][0];
  for (int64_t k = threadIdx.x; k < slots; k += blockDim.x) {
    unsigned long long c = 0;
    for (int w = 0; w < hist_copies; ++w) c += shared_hist[w * slots + k];
    if (c) atomicAdd(&hist[k], c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    drift_ingest_kernel(const T* __restrict__ x, int64_t n, int64_t stride,
                        const double* __restrict__ edges_g, int64_t nbins, bool edges_shared,
                        int hist_copies, unsigned long long* __restrict__ hist,
                        double* __restrict__ partials, double pivot) {
  const auto load = [=](int64_t i) { return static_cast<double>(x[i * stride]); };
  ingest_block(load, n, edges_g, nbins, edges_shared, hist_copies, pivot, hist,
               partials + blockIdx.x * 7);
}

// ---------------------------------------------------------------- all columns in one launch

__device__ inline double load_value(const DriftColumn& c, int64_t i) {
  return c.dtype == 0 ? static_cast<double>(static_cast<const float*>(c.x)[i * c.stride])
                      : static_cast<const double*>(c.x)[i * c.stride];
}

// Block (blockIdx.x, column blockIdx.y). Shared memory as in
// drift_ingest_kernel, sized for the launch's widest column.
__global__ void __launch_bounds__(kThreads)
    drift_ingest_multi_kernel(const __grid_constant__ DriftMultiParams p, bool edges_shared,
                              int hist_copies) {
  const DriftColumn& c = p.col[blockIdx.y];
  __shared__ bool last_block;
  const auto load = [&](int64_t i) { return load_value(c, i); };
  ingest_block(load, p.n, p.edges + c.edge_offset, c.nbins, edges_shared, hist_copies, c.pivot,
               p.hist + c.hist_offset,
               p.partials + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * 7);
  // The column's last block to finish folds the partials, in block order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&p.done[blockIdx.y], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (threadIdx.x < 7) {
    const int f = threadIdx.x;
    const double* col_partials = p.partials + static_cast<int64_t>(blockIdx.y) * gridDim.x * 7;
    double t = f == 5 ? __longlong_as_double(0x7ff0000000000000LL)
                      : (f == 6 ? -__longlong_as_double(0x7ff0000000000000LL) : 0.0);
    for (unsigned int b = 0; b < gridDim.x; ++b) {
      const double v = __ldcg(col_partials + b * 7 + f);  // other blocks' writes: skip L1
      t = f == 5 ? fmin(t, v) : (f == 6 ? fmax(t, v) : t + v);
    }
    double* acc = p.acc + c.acc_row * 7 + f;
    *acc = f == 5 ? fmin(*acc, t) : (f == 6 ? fmax(*acc, t) : *acc + t);
  }
  if (threadIdx.x == 0) p.done[blockIdx.y] = 0u;  // ready for the next launch
}

// ingest_block's dynamic shared memory for columns of up to `nbins` bins:
// per-warp histograms while they fit the default 48 KB (with the edges and
// the reduction's 14 KB), else one per block; the edges while they fit too.
struct SharedLayout {
  int copies;
  bool edges_shared;
  size_t bytes;
};
SharedLayout shared_layout(int64_t nbins) {
  const size_t edge_bytes = static_cast<size_t>(nbins + 1) * sizeof(double);
  const size_t hist_bytes = static_cast<size_t>(nbins + 2) * sizeof(unsigned int);
  constexpr size_t kBudget = 32 * 1024;
  const int copies = edge_bytes + kWarps * hist_bytes <= kBudget ? kWarps : 1;
  const bool edges_shared = edge_bytes + copies * hist_bytes <= kBudget;
  return {copies, edges_shared, (edges_shared ? edge_bytes : 0) + copies * hist_bytes};
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
  const SharedLayout lay = shared_layout(p.nbins);
  if (p.dtype == 0) {
    drift_ingest_kernel<float><<<p.blocks, kThreads, lay.bytes, stream>>>(
        static_cast<const float*>(p.x), p.n, p.stride, p.edges, p.nbins, lay.edges_shared,
        lay.copies, p.hist, p.partials, p.pivot);
  } else {
    drift_ingest_kernel<double><<<p.blocks, kThreads, lay.bytes, stream>>>(
        static_cast<const double*>(p.x), p.n, p.stride, p.edges, p.nbins, lay.edges_shared,
        lay.copies, p.hist, p.partials, p.pivot);
  }
  check(cudaGetLastError(), "kernel launch");
}

void drift_ingest_multi_cuda(const DriftMultiParams& p) {
  if (p.ncols < 1 || p.ncols > kDriftMaxMultiColumns) {
    throw std::invalid_argument("ncols must be in 1.." + std::to_string(kDriftMaxMultiColumns) +
                                ", got " + std::to_string(p.ncols));
  }
  if (p.blocks < 1) throw std::invalid_argument("blocks must be positive");
  int64_t widest = 0;
  for (int i = 0; i < p.ncols; ++i) {
    const DriftColumn& c = p.col[i];
    if (c.nbins < 1 || c.nbins > kDriftMaxCudaBins) {
      throw std::invalid_argument("edges must define 1.." + std::to_string(kDriftMaxCudaBins) +
                                  " bins for the CUDA ingest, got " + std::to_string(c.nbins));
    }
    if (c.dtype != 0 && c.dtype != 1) throw std::invalid_argument("dtype must be 0 or 1");
    if (c.stride < 1) throw std::invalid_argument("stride must be positive");
    widest = c.nbins > widest ? c.nbins : widest;
  }
  if (p.n == 0) return;
  auto stream = static_cast<cudaStream_t>(p.stream);
  const SharedLayout lay = shared_layout(widest);
  const dim3 grid(static_cast<unsigned int>(p.blocks), static_cast<unsigned int>(p.ncols));
  drift_ingest_multi_kernel<<<grid, kThreads, lay.bytes, stream>>>(p, lay.edges_shared, lay.copies);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace fastml::cuda
