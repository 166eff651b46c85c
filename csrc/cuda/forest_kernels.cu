// CUDA path of fastml.infer.Forest, with the same per-node decisions as the
// CPU engine (infer/forest_node.hpp) and the same per-output summation order
// (base, then tree 0, 1, 2, ... in the accumulator's precision), so margins
// match the CPU path bit for bit.
//
// Two kernels:
//  * forest_trees_kernel (every batch by default): a block takes R rows
//    (1..32) and a tile of trees; each thread walks one (row, tree) pair, the
//    threads of a warp walking one tree for different rows (the top levels of
//    a tree are then one broadcast load); each walk leaves its leaf's node index
//    in shared memory, and one thread per (row, output) adds the leaves of the
//    tile in tree order, which keeps the sum bit-identical. One row uses a
//    whole block (its trees walked in parallel), so a small batch costs about
//    one tree's walk plus a serial add per tree rather than every tree's walk
//    in series. The link (output="value") is applied in the same kernel.
//  * forest_rows_kernel: one thread walks every tree for its row (the first
//    GPU path; kept for comparison: FASTML_FOREST_CUDA_KERNEL=rows).
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
#include "infer/forest_node.hpp"

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
  void* nodes = nullptr;
  void* values = nullptr;
  int32_t* tree_root = nullptr;
  int32_t* tree_depth = nullptr;
  int32_t* tree_group = nullptr;
  int64_t* tree_value_shift = nullptr;
  int64_t* node_cat_offset = nullptr;
  uint32_t* node_cat_words = nullptr;
  uint32_t* cat_bits = nullptr;
  void* base = nullptr;
  // A single-output forest of scalar leaves: the ordered sums skip the group
  // test (forest_tile_sum).
  bool one_output = false;
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
    for (void* p : {nodes, values, static_cast<void*>(tree_root), static_cast<void*>(tree_depth),
                    static_cast<void*>(tree_group), static_cast<void*>(tree_value_shift),
                    static_cast<void*>(node_cat_offset), static_cast<void*>(node_cat_words),
                    static_cast<void*>(cat_bits), base})
      if (p) cudaFree(p);
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

// One tree's walk for one row: `depth` steps from `root` (leaves point to
// themselves), with the CPU engine's per-node decisions; returns the leaf.
template <typename ThrT, typename XT>
__device__ inline int32_t forest_walk(const ForestNode<ThrT>* __restrict__ nodes,
                                      const int64_t* __restrict__ node_cat_offset,
                                      const uint32_t* __restrict__ node_cat_words,
                                      const uint32_t* __restrict__ cat_bits, int32_t root,
                                      int32_t depth, const XT* __restrict__ x, ThrT cat_lo,
                                      ThrT cat_hi, bool cat_integral) {
  int32_t n = root;
  for (int32_t d = 0; d < depth; ++d) {
    const ForestNode<ThrT> nd = nodes[n];
    const uint32_t f = nd.feature;
    const ThrT v = static_cast<ThrT>(x[f & kNodeFeatureMask]);
    bool left;
    if (f & kNodeCategorical) {
      left = forest_go_left_categorical<ThrT>(v, f, cat_bits + node_cat_offset[n],
                                              node_cat_words[n], cat_lo, cat_hi, cat_integral);
    } else {
      left = forest_go_left_numeric<ThrT>(v, nd.threshold, f);
    }
    n = nd.child[!left];
  }
  return n;
}

template <typename ThrT, typename AccT, typename XT>
__global__ void forest_rows_kernel(
    const ForestNode<ThrT>* __restrict__ nodes, const AccT* __restrict__ values,
    const int32_t* __restrict__ tree_root, const int32_t* __restrict__ tree_depth,
    const int32_t* __restrict__ tree_group, const int64_t* __restrict__ tree_value_shift,
    const int64_t* __restrict__ node_cat_offset, const uint32_t* __restrict__ node_cat_words,
    const uint32_t* __restrict__ cat_bits, const AccT* __restrict__ base, const XT* __restrict__ X,
    int64_t rows, int32_t num_features, int32_t num_outputs, int64_t num_trees, ThrT cat_lo,
    ThrT cat_hi, bool cat_integral, AccT* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const XT* x = X + r * num_features;
  AccT* o = out + r * num_outputs;
  for (int32_t k = 0; k < num_outputs; ++k) o[k] = base[k];
  for (int64_t t = 0; t < num_trees; ++t) {
    const int32_t n = forest_walk(nodes, node_cat_offset, node_cat_words, cat_bits, tree_root[t],
                                  tree_depth[t], x, cat_lo, cat_hi, cat_integral);
    const int32_t g = tree_group[t];
    const int64_t shift = tree_value_shift[t];
    if (g >= 0) {
      o[g] += values[shift + n];
    } else {
      const AccT* v = values + shift + static_cast<int64_t>(n) * num_outputs;
      for (int32_t k = 0; k < num_outputs; ++k) o[k] += v[k];
    }
  }
}

// Divisor and link of one row of k outputs (output="value"); link 0 = identity.
template <typename T>
__device__ inline void forest_finish_row(T* o, int32_t k, double divisor, int32_t link) {
  if (divisor != 1.0)
    for (int32_t j = 0; j < k; ++j) o[j] /= static_cast<T>(divisor);
  switch (static_cast<ForestLink>(link)) {
    case ForestLink::Identity: break;
    case ForestLink::Sigmoid:
      for (int32_t j = 0; j < k; ++j) o[j] = T(1) / (T(1) + exp(-o[j]));
      break;
    case ForestLink::Exp:
      for (int32_t j = 0; j < k; ++j) o[j] = exp(o[j]);
      break;
    case ForestLink::Hinge:
      for (int32_t j = 0; j < k; ++j) o[j] = o[j] > T(0) ? T(1) : T(0);
      break;
    case ForestLink::Softmax: {
      T mx = o[0];
      for (int32_t j = 1; j < k; ++j) mx = o[j] > mx ? o[j] : mx;
      T sum = 0;
      for (int32_t j = 0; j < k; ++j) {
        o[j] = exp(o[j] - mx);
        sum += o[j];
      }
      for (int32_t j = 0; j < k; ++j) o[j] /= sum;
      break;
    }
  }
}

// Threads per block of forest_trees_kernel, the most trees per tile, the most
// rows per block, and the shared memory a block's tile may take.
constexpr int kTreeThreads = 256;
constexpr int kTreeTile = 256;
constexpr int kMaxBlockRows = 32;
constexpr size_t kTreeSmemBytes = 32 * 1024;

// A block takes rows [blockIdx.x * R, +R). Thread i walks tree
// (tile + i / R) for row (i % R). Accumulators live in registers of the
// threads that sum, one per (row, output), across tiles.
template <typename ThrT, typename AccT, typename XT>
__global__ void __launch_bounds__(kTreeThreads) forest_trees_kernel(
    const ForestNode<ThrT>* __restrict__ nodes, const AccT* __restrict__ values,
    const int32_t* __restrict__ tree_root, const int32_t* __restrict__ tree_depth,
    const int32_t* __restrict__ tree_group, const int64_t* __restrict__ tree_value_shift,
    const int64_t* __restrict__ node_cat_offset, const uint32_t* __restrict__ node_cat_words,
    const uint32_t* __restrict__ cat_bits, const AccT* __restrict__ base, const XT* __restrict__ X,
    int64_t rows, int32_t R, int32_t num_features, int32_t num_outputs, int64_t num_trees,
    ThrT cat_lo, ThrT cat_hi, bool cat_integral, double divisor, int32_t link, int32_t tile_size,
    bool one_output, AccT* __restrict__ out) {
  // Shared memory: per (tree of the tile, row) the leaf's value, or for trees
  // with a vector of values per leaf (group < 0) the leaf's node index; laid
  // out [tree][row] so the threads of a warp touch consecutive words. Then
  // the tile's tree groups.
  extern __shared__ __align__(8) unsigned char smem[];
  AccT* leaf_val = reinterpret_cast<AccT*>(smem);
  int32_t* grp = reinterpret_cast<int32_t*>(leaf_val + static_cast<int64_t>(tile_size) * R);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int32_t block_rows = static_cast<int32_t>(rows - row0 < R ? rows - row0 : R);
  const int32_t tid = threadIdx.x;
  const int32_t trees_per_pass = kTreeThreads / R;  // R divides kTreeThreads
  const int32_t my_row = tid % R;
  // The summing threads: (row, output) = (tid % R, tid / R), looping when
  // R * num_outputs exceeds the block.
  const int32_t sums = R * num_outputs;
  constexpr int kAccPerThread = 4;
  AccT acc[kAccPerThread];
  const bool many_outputs = sums > kTreeThreads * kAccPerThread;
#pragma unroll
  for (int j = 0; j < kAccPerThread; ++j) {
    const int32_t s = tid + j * kTreeThreads;
    acc[j] = s < sums ? base[s / R] : AccT(0);
  }
  if (many_outputs) {
    // Rare (more than 1,024 / R outputs): accumulate in the output itself.
    for (int32_t s = tid; s < sums; s += kTreeThreads) {
      const int32_t r = s % R;
      if (r < block_rows) out[(row0 + r) * num_outputs + s / R] = base[s / R];
    }
  }
  for (int64_t tile = 0; tile < num_trees; tile += tile_size) {
    const int32_t tile_trees =
        static_cast<int32_t>(num_trees - tile < tile_size ? num_trees - tile : tile_size);
    for (int32_t lt = tid; lt < tile_trees; lt += kTreeThreads) grp[lt] = tree_group[tile + lt];
    if (my_row < block_rows) {
      const XT* x = X + (row0 + my_row) * num_features;
      for (int32_t lt = tid / R; lt < tile_trees; lt += trees_per_pass) {
        const int64_t t = tile + lt;
        const int32_t n = forest_walk(nodes, node_cat_offset, node_cat_words, cat_bits,
                                      tree_root[t], tree_depth[t], x, cat_lo, cat_hi, cat_integral);
        // The leaf's value is fetched here, by the walking threads in
        // parallel, so the ordered sum below reads shared memory only.
        AccT* slot = leaf_val + static_cast<int64_t>(lt) * R + my_row;
        if (tree_group[t] >= 0)
          *slot = values[tree_value_shift[t] + n];
        else
          *reinterpret_cast<int32_t*>(slot) = n;
      }
    }
    __syncthreads();
    // Sum this tile's leaves in tree order, one thread per (row, output).
    auto add_tile = [&](int32_t r, int32_t k, AccT a) {
      auto vector_value = [&](int32_t lt, int32_t n) {
        return values[tree_value_shift[tile + lt] + static_cast<int64_t>(n) * num_outputs + k];
      };
      return forest_tile_sum(a, leaf_val + r, R, grp, tile_trees, k, one_output, vector_value);
    };
    if (many_outputs) {
      for (int32_t s = tid; s < sums; s += kTreeThreads) {
        const int32_t r = s % R, k = s / R;
        if (r < block_rows) {
          AccT* o = out + (row0 + r) * num_outputs + k;
          *o = add_tile(r, k, *o);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kAccPerThread; ++j) {
        const int32_t s = tid + j * kTreeThreads;
        if (s < sums && s % R < block_rows) acc[j] = add_tile(s % R, s / R, acc[j]);
      }
    }
    __syncthreads();
  }
  if (!many_outputs) {
#pragma unroll
    for (int j = 0; j < kAccPerThread; ++j) {
      const int32_t s = tid + j * kTreeThreads;
      const int32_t r = s % R;
      if (s < sums && r < block_rows) out[(row0 + r) * num_outputs + s / R] = acc[j];
    }
  }
  if (divisor != 1.0 || link != 0) {
    __syncthreads();  // the row's outputs, written by other threads, are visible
    if (tid < block_rows)
      forest_finish_row(out + (row0 + tid) * num_outputs, num_outputs, divisor, link);
  }
}

// Divisor and link per row (output="value"); 0 = identity.
template <typename T>
__global__ void forest_finish_kernel(T* out, int64_t rows, int32_t k, double divisor,
                                     int32_t link) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  forest_finish_row(out + r * k, k, divisor, link);
}

DeviceForest& device_forest(const Forest& f) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(f.device_mutex());
  auto& slot = f.device_slot();
  if (slot) {
    auto* d = static_cast<DeviceForest*>(slot.get());
    if (d->device == device) return *d;
    slot.reset();
  }
  auto d = std::make_shared<DeviceForest>();
  d->device = device;
  check(cudaDeviceGetAttribute(&d->sm_count, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  const Forest::Flat fl = f.flat();
  const int64_t T = f.num_trees();
  d->nodes = upload(static_cast<const char*>(fl.nodes), fl.node_bytes, "upload nodes");
  d->values = upload(static_cast<const char*>(fl.values), fl.value_bytes, "upload values");
  d->tree_root = upload(fl.tree_root, T, "upload trees");
  d->tree_depth = upload(fl.tree_depth, T, "upload trees");
  d->tree_group = upload(fl.tree_group, T, "upload trees");
  d->one_output = f.num_outputs() == 1 &&
                  std::all_of(fl.tree_group, fl.tree_group + T, [](int32_t g) { return g == 0; });
  d->tree_value_shift = upload(fl.tree_value_shift, T, "upload trees");
  d->node_cat_offset = upload(fl.node_cat_offset, fl.num_nodes, "upload categories");
  d->node_cat_words = upload(fl.node_cat_words, fl.num_nodes, "upload categories");
  d->cat_bits = upload(fl.cat_bits, fl.num_cat_bits, "upload categories");
  const auto& bm = f.spec().base_margin;
  if (f.spec().accum_f64) {
    d->base = upload(bm.data(), bm.size(), "upload base");
  } else {
    std::vector<float> b32(bm.begin(), bm.end());
    d->base = upload(b32.data(), b32.size(), "upload base");
  }
  slot = d;
  return *d;
}

// FASTML_FOREST_CUDA_KERNEL=rows selects the one-thread-per-row kernel (a
// diagnostic, for comparing the two on a machine); anything else, the default.
bool use_rows_kernel() {
  static const bool rows = [] {
    const char* v = std::getenv("FASTML_FOREST_CUDA_KERNEL");
    return v != nullptr && std::strcmp(v, "rows") == 0;
  }();
  return rows;
}

// Rows per block of forest_trees_kernel: the most (up to 32, so a warp walks
// one tree for 32 rows) that still gives every SM a few blocks; 1 for small
// batches, where one row's trees are walked by a whole block.
int32_t rows_per_block(int64_t rows, int sm_count) {
  const int64_t want_blocks = int64_t{4} * sm_count;
  int32_t r = kMaxBlockRows;
  while (r > 1 && (rows + r - 1) / r < want_blocks) r /= 2;
  return r;
}

// Runs the trees kernel (default) or the rows kernel; `finish` tells whether
// the caller must still apply divisor and link (only after the rows kernel).
template <typename ThrT, typename AccT>
bool launch(const Forest& f, DeviceForest& d, const void* X, DType xdt, int64_t rows, void* out,
            double divisor, int32_t link, cudaStream_t stream) {
  const auto& s = f.spec();
  const ThrT lo = static_cast<ThrT>(s.cat_rule.lo), hi = static_cast<ThrT>(s.cat_rule.hi);
  const bool rows_kernel = use_rows_kernel();
  auto go = [&](auto tag) {
    using XT = typename decltype(tag)::type;
    if (rows_kernel) {
      const int threads = 128;
      const int64_t blocks = (rows + threads - 1) / threads;
      FASTML_CHECK_ARG(blocks < (int64_t{1} << 31), "X",
                       "has too many rows for one launch: ", rows);
      forest_rows_kernel<ThrT, AccT, XT><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
          static_cast<const ForestNode<ThrT>*>(d.nodes), static_cast<const AccT*>(d.values),
          d.tree_root, d.tree_depth, d.tree_group, d.tree_value_shift, d.node_cat_offset,
          d.node_cat_words, d.cat_bits, static_cast<const AccT*>(d.base), static_cast<const XT*>(X),
          rows, s.num_features, s.num_outputs, f.num_trees(), lo, hi, s.cat_rule.integral,
          static_cast<AccT*>(out));
    } else {
      const int32_t R = rows_per_block(rows, d.sm_count);
      const int64_t blocks = (rows + R - 1) / R;
      FASTML_CHECK_ARG(blocks < (int64_t{1} << 31), "X",
                       "has too many rows for one launch: ", rows);
      const int32_t tile = static_cast<int32_t>(std::min<size_t>(
          kTreeTile, kTreeSmemBytes / (static_cast<size_t>(R) * sizeof(AccT) + sizeof(int32_t))));
      const size_t smem = static_cast<size_t>(tile) * (R * sizeof(AccT) + sizeof(int32_t));
      forest_trees_kernel<ThrT, AccT, XT>
          <<<static_cast<unsigned>(blocks), kTreeThreads, smem, stream>>>(
              static_cast<const ForestNode<ThrT>*>(d.nodes), static_cast<const AccT*>(d.values),
              d.tree_root, d.tree_depth, d.tree_group, d.tree_value_shift, d.node_cat_offset,
              d.node_cat_words, d.cat_bits, static_cast<const AccT*>(d.base),
              static_cast<const XT*>(X), rows, R, s.num_features, s.num_outputs, f.num_trees(), lo,
              hi, s.cat_rule.integral, divisor, link, tile, d.one_output, static_cast<AccT*>(out));
    }
  };
  if (xdt == DType::F32)
    go(type_tag<float>{});
  else
    go(type_tag<double>{});
  check(cudaGetLastError(), "kernel launch");
  return rows_kernel;
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
  DeviceForest& d = device_forest(f);
  const auto& s = f.spec();
  const bool divide = s.divisor != 1.0 && (apply_link || s.divide_margin);
  const double divisor = divide ? s.divisor : 1.0;
  const int32_t link = apply_link ? static_cast<int32_t>(s.link) : 0;
  // One launch of the kernel (and, after the rows kernel, the finish kernel).
  auto run = [&](const void* x_dev, int64_t n, void* out_dev, cudaStream_t stream) {
    bool finish;
    if (s.threshold_f64 && s.accum_f64)
      finish = launch<double, double>(f, d, x_dev, X.dtype, n, out_dev, divisor, link, stream);
    else if (s.threshold_f64)
      finish = launch<double, float>(f, d, x_dev, X.dtype, n, out_dev, divisor, link, stream);
    else if (s.accum_f64)
      finish = launch<float, double>(f, d, x_dev, X.dtype, n, out_dev, divisor, link, stream);
    else
      finish = launch<float, float>(f, d, x_dev, X.dtype, n, out_dev, divisor, link, stream);
    if (finish && (divide || apply_link)) {
      const int threads = 128;
      const auto blocks = static_cast<unsigned>((n + threads - 1) / threads);
      if (out_item == 4)
        forest_finish_kernel<float>
            <<<blocks, threads, 0, stream>>>(static_cast<float*>(out_dev), n, K, divisor, link);
      else
        forest_finish_kernel<double>
            <<<blocks, threads, 0, stream>>>(static_cast<double*>(out_dev), n, K, divisor, link);
      check(cudaGetLastError(), "finish kernel launch");
    }
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
