// CUDA path of fastml.infer.Forest: one kernel whose blocks do the work of
// infer/forest_block.hpp (the CPU tests run the same block code on the host,
// forest_emulate_kernel), over the layout forest_kernel_data picks:
//  * binned forests (the CPU engine's binned path; at most
//    kForestMaxBinnedFeatures features): each block bins its rows once into
//    shared memory, then walks 4-byte perfect nodes (or 8-byte explicit
//    nodes for deep trees) with integer compares;
//  * others (categorical or zero-as-missing splits, too many distinct
//    thresholds): the general nodes with the CPU engine's per-node rules.
// Either way the leaves are added in the CPU engine's order (base, then tree
// 0, 1, 2, ... in the accumulator's precision), so margins match the CPU path
// bit for bit. forest_cuda_general (FASTML_FOREST_CUDA_KERNEL=general)
// selects the general layout for every forest (to compare the two).
// The forest is copied to the device once (first use) and kept with the
// Forest; input/output staging buffers grow and are reused, so a call
// allocates only when a batch is larger than any before it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "common/errors.hpp"
#include "common/thread_pool.hpp"
#include "infer/forest.hpp"
#include "infer/forest_kernel.hpp"

namespace fastml::infer {

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state where possible
    fail<std::runtime_error>("CUDA error in Forest ", what, ": ", cudaGetErrorString(err));
  }
}

template <typename T>
T* upload(const T* host, size_t n, const char* what) {
  T* dev = nullptr;
  if (n == 0) return nullptr;
  check(cudaMalloc(&dev, n * sizeof(T)), what);
  check(cudaMemcpy(dev, host, n * sizeof(T), cudaMemcpyHostToDevice), what);
  return dev;
}

struct DeviceForest {
  int device = -1;
  int sm_count = 1;
  bool general = false;  // forest_cuda_general() when uploaded
  ForestLayout layout = ForestLayout::General;
  bool one_output = false;
  // Device copies of the ForestKernelData arrays, and where each lies.
  std::vector<void*> allocations;
  ForestKernelPtrs ptrs;
  // Host inputs: two slots, each a pinned staging pair (rows in, results out),
  // device buffers, its own stream and an event; chunks alternate between the
  // slots, so one chunk's copy in overlaps the other's kernel (see
  // predict_host).
  struct Slot {
    void* pin_x = nullptr;
    void* pin_out = nullptr;
    void* dev_x = nullptr;
    void* dev_out = nullptr;
    size_t x_cap = 0, out_cap = 0;
    cudaStream_t stream = nullptr;
    cudaEvent_t done = nullptr;
  };
  std::mutex staging_mutex;
  Slot slots[2];

  ~DeviceForest() {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device);
    for (void* p : allocations) cudaFree(p);
    for (Slot& s : slots) {
      if (s.stream) cudaStreamSynchronize(s.stream);
      if (s.pin_x) cudaFreeHost(s.pin_x);
      if (s.pin_out) cudaFreeHost(s.pin_out);
      if (s.dev_x) cudaFree(s.dev_x);
      if (s.dev_out) cudaFree(s.dev_out);
      if (s.done) cudaEventDestroy(s.done);
      if (s.stream) cudaStreamDestroy(s.stream);
    }
    cudaSetDevice(prev);
  }
};

// A slot with room for `xb` input and `ob` output bytes.
void ensure_slot(DeviceForest::Slot& s, size_t xb, size_t ob) {
  if (!s.stream) {
    check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
  }
  // A pinned host buffer and a device buffer of at least `need` bytes each.
  auto grow = [](void*& pin, void*& dev, size_t& cap, size_t need, const char* what) {
    if (cap >= need) return;
    if (pin) cudaFreeHost(pin);
    if (dev) cudaFree(dev);
    pin = dev = nullptr;
    cap = 0;
    check(cudaHostAlloc(&pin, need, cudaHostAllocDefault), what);
    check(cudaMalloc(&dev, need), what);
    cap = need;
  };
  grow(s.pin_x, s.dev_x, s.x_cap, xb, "staging X");
  grow(s.pin_out, s.dev_out, s.out_cap, ob, "staging out");
}

// memcpy on the shared pool for large copies (the copies into and out of the
// pinned slots are the host's share of the pipeline).
void parallel_copy(void* dst, const void* src, size_t n) {
  constexpr size_t kPiece = size_t{1} << 20;
  if (n <= 2 * kPiece) {
    std::memcpy(dst, src, n);
    return;
  }
  const auto pieces = static_cast<int64_t>((n + kPiece - 1) / kPiece);
  ThreadPool::global().parallel_for(0, pieces, 1, [&](int64_t b, int64_t e) {
    const size_t lo = static_cast<size_t>(b) * kPiece;
    const size_t hi = std::min(n, static_cast<size_t>(e) * kPiece);
    std::memcpy(static_cast<char*>(dst) + lo, static_cast<const char*>(src) + lo, hi - lo);
  });
}

// One launch: a block per R rows, the phases of ForestBlock between barriers
// (forest_emulate_kernel runs the same phases in the same order on the host).
template <typename ThrT, typename AccT, typename XT>
__global__ void __launch_bounds__(kForestThreads, 5)
    forest_kernel(const ForestKernelArgs<ThrT, AccT> args, const XT* __restrict__ X, int64_t rows,
                  const ForestLaunchShape shape, AccT* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const ForestBlock<ThrT, AccT, XT> blk(args, X, out, rows, shape, blockIdx.x, smem);
  typename ForestBlock<ThrT, AccT, XT>::Thread th;
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  blk.start(tid, th);
  if (shape.split_bins) {
    __syncthreads();  // the partial counts are in
    blk.bins_done(tid);
  }
  for (int64_t t0 = 0; t0 < args.num_trees; t0 += shape.tile) {
    __syncthreads();  // the bins are in (first tile); the last tile's sums are done
    blk.walk(tid, t0);
    __syncthreads();
    blk.sum(tid, t0, th);
  }
  blk.store(tid, th);
  if (blk.needs_link()) {
    __syncthreads();  // a row's outputs, stored by other threads, are visible
    blk.finish(tid);
  }
}

// The forest's device copy for the current device and layout setting (made,
// or made again, here). The caller holds it for its call, so a concurrent
// call that replaces it (another device, another layout) cannot free it.
std::shared_ptr<DeviceForest> device_forest(const Forest& f) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(f.device_mutex());
  auto& slot = f.device_slot();
  if (slot) {
    auto d = std::static_pointer_cast<DeviceForest>(slot);
    if (d->device == device && d->general == forest_cuda_general()) return d;
    slot.reset();
  }
  auto d = std::make_shared<DeviceForest>();
  d->device = device;
  d->general = forest_cuda_general();
  check(cudaDeviceGetAttribute(&d->sm_count, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  const ForestKernelData h = forest_kernel_data(f, d->general);
  d->layout = h.layout;
  d->one_output = h.one_output;
  d->ptrs = forest_kernel_ptrs(h, [&](const auto& v) {
    auto* p = upload(v.data(), v.size(), "upload the forest");
    if (p) d->allocations.push_back(p);
    return p;
  });
  slot = d;
  return d;
}

// One launch over `rows` rows of X (device memory) into out (device memory).
void launch(const Forest& f, const DeviceForest& d, const void* X, DType xdt, int64_t rows,
            void* out, bool apply_link, cudaStream_t stream) {
  forest_dispatch_types(f.spec(), xdt, [&](auto thr, auto acc, auto xt) {
    using ThrT = typename decltype(thr)::type;
    using AccT = typename decltype(acc)::type;
    using XT = typename decltype(xt)::type;
    const auto args = forest_kernel_args<ThrT, AccT>(f, d.layout, d.one_output, d.ptrs, apply_link);
    const ForestLaunchShape shape =
        forest_launch_shape(rows, d.sm_count, d.layout, f.num_features(), sizeof(AccT));
    FASTML_CHECK_ARG(shape.blocks < (int64_t{1} << 31), "X",
                     "has too many rows for one launch: ", rows);
    forest_kernel<ThrT, AccT, XT>
        <<<static_cast<unsigned>(shape.blocks), kForestThreads, shape.smem, stream>>>(
            args, static_cast<const XT*>(X), rows, shape, static_cast<AccT*>(out));
  });
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace

bool forest_cuda_compiled() {
  return true;
}

void forest_predict_cuda(const Forest& f, const ArrayView& X, bool x_on_device, bool apply_link,
                         void* out, bool out_on_device, uintptr_t stream_handle) {
  const int64_t rows = X.shape[0];
  const int32_t K = f.num_outputs();
  const size_t out_item = itemsize(f.output_dtype());
  if (rows == 0) return;
  FASTML_CHECK_ARG(x_on_device == out_on_device, "out",
                   "must be on the device exactly when X is (internal)");
  const std::shared_ptr<DeviceForest> held = device_forest(f);
  DeviceForest& d = *held;
  auto run = [&](const void* x_dev, int64_t n, void* out_dev, cudaStream_t stream) {
    launch(f, d, x_dev, X.dtype, n, out_dev, apply_link, stream);
  };
  if (x_on_device) {
    // Device in, device out: asynchronous on the caller's stream.
    run(X.data, rows, out, reinterpret_cast<cudaStream_t>(stream_handle));
    return;
  }
  // Host in, host out: chunks of ~8 MB of rows alternate between two slots.
  // For chunk c: its rows are copied into the slot's pinned buffer (on the
  // pool), copied to the device asynchronously on the slot's stream, walked,
  // and the results copied back to the slot's pinned output; the slot is
  // reused for chunk c + 2 once its event says chunk c is out. So the copy in
  // of one chunk overlaps the kernel of the other, and the host's memcpy
  // overlaps both. Results are in `out` when this returns.
  FASTML_CHECK_ARG(X.is_c_contiguous(), "X", "must be C-contiguous for the CUDA path, got ",
                   X.describe());
  std::lock_guard<std::mutex> staging(d.staging_mutex);
  const auto row_bytes = static_cast<size_t>(X.nbytes() / rows);
  const size_t out_row = static_cast<size_t>(K) * out_item;
  constexpr size_t kChunkBytes = size_t{8} << 20;
  const int64_t chunk = std::min<int64_t>(
      rows,
      std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes / std::max<size_t>(row_bytes, 1))));
  const int64_t nchunks = (rows + chunk - 1) / chunk;
  const auto* src = static_cast<const char*>(X.data);
  auto* dst = static_cast<char*>(out);
  auto rows_of = [&](int64_t c) { return std::min(chunk, rows - c * chunk); };
  auto retire = [&](int64_t c) {
    DeviceForest::Slot& sl = d.slots[c % 2];
    check(cudaEventSynchronize(sl.done), "synchronize");
    parallel_copy(dst + static_cast<size_t>(c * chunk) * out_row, sl.pin_out,
                  static_cast<size_t>(rows_of(c)) * out_row);
  };
  try {
    for (DeviceForest::Slot& sl : d.slots)
      ensure_slot(sl, static_cast<size_t>(chunk) * row_bytes, static_cast<size_t>(chunk) * out_row);
    for (int64_t c = 0; c < nchunks; ++c) {
      DeviceForest::Slot& sl = d.slots[c % 2];
      if (c >= 2) retire(c - 2);
      const int64_t n = rows_of(c);
      parallel_copy(sl.pin_x, src + static_cast<size_t>(c * chunk) * row_bytes,
                    static_cast<size_t>(n) * row_bytes);
      check(cudaMemcpyAsync(sl.dev_x, sl.pin_x, static_cast<size_t>(n) * row_bytes,
                            cudaMemcpyHostToDevice, sl.stream),
            "copy X");
      run(sl.dev_x, n, sl.dev_out, sl.stream);
      check(cudaMemcpyAsync(sl.pin_out, sl.dev_out, static_cast<size_t>(n) * out_row,
                            cudaMemcpyDeviceToHost, sl.stream),
            "copy out");
      check(cudaEventRecord(sl.done, sl.stream), "cudaEventRecord");
    }
    for (int64_t c = std::max<int64_t>(0, nchunks - 2); c < nchunks; ++c) retire(c);
  } catch (...) {
    // Nothing of ours may still be in flight when the slots are reused.
    for (DeviceForest::Slot& sl : d.slots)
      if (sl.stream) cudaStreamSynchronize(sl.stream);
    cudaGetLastError();
    throw;
  }
}

}  // namespace fastml::infer
