// The CUDA Forest kernel's blocks run on the host (see forest_block.hpp), so
// that the CPU tests check the kernel's layouts, launch shapes and summation
// order against the CPU engine bit for bit without a GPU.
#include <cstring>
#include <vector>

#include "common/errors.hpp"
#include "infer/forest.hpp"
#include "infer/forest_kernel.hpp"

namespace fastml::infer {

const char* forest_emulate_kernel(const Forest& f, const ArrayView& X, bool apply_link, void* out,
                                  int sm_count, bool general) {
  f.check_matrix(X, "X");
  FASTML_CHECK_ARG(sm_count >= 1, "sm_count", "must be >= 1, got ", sm_count);
  const ForestKernelData d = forest_kernel_data(f, general);
  const ForestKernelPtrs p = forest_kernel_ptrs(d, [](const auto& v) { return v.data(); });
  const int64_t rows = X.shape[0];
  if (rows == 0) return forest_layout_name(d.layout);
  FASTML_CHECK_ARG(X.is_c_contiguous(), "X", "must be C-contiguous, got ", X.describe());
  forest_dispatch_types(f.spec(), X.dtype, [&](auto thr, auto acc, auto xt) {
    using ThrT = typename decltype(thr)::type;
    using AccT = typename decltype(acc)::type;
    using XT = typename decltype(xt)::type;
    using Block = ForestBlock<ThrT, AccT, XT>;
    const auto args = forest_kernel_args<ThrT, AccT>(f, d.layout, d.one_output, p, apply_link);
    const ForestLaunchShape shape =
        forest_launch_shape(rows, sm_count, d.layout, f.num_features(), sizeof(AccT));
    // Shared memory, poisoned so that a read before a write shows.
    std::vector<unsigned char> smem(shape.smem + 16);
    std::vector<typename Block::Thread> threads(kForestThreads);
    const auto* x = static_cast<const XT*>(X.data);
    auto* o = static_cast<AccT*>(out);
    for (int64_t b = 0; b < shape.blocks; ++b) {
      std::memset(smem.data(), 0xA5, smem.size());
      const Block blk(args, x, o, rows, shape, b, smem.data());
      for (int tid = 0; tid < kForestThreads; ++tid) blk.start(tid, threads[tid]);
      if (shape.split_bins) {
        // __syncthreads()
        for (int tid = 0; tid < kForestThreads; ++tid) blk.bins_done(tid);
      }
      for (int64_t t0 = 0; t0 < args.num_trees; t0 += shape.tile) {
        // __syncthreads()
        for (int tid = 0; tid < kForestThreads; ++tid) blk.walk(tid, t0);
        // __syncthreads()
        for (int tid = 0; tid < kForestThreads; ++tid) blk.sum(tid, t0, threads[tid]);
      }
      for (int tid = 0; tid < kForestThreads; ++tid) blk.store(tid, threads[tid]);
      if (blk.needs_link()) {
        // __syncthreads()
        for (int tid = 0; tid < kForestThreads; ++tid) blk.finish(tid);
      }
    }
  });
  return forest_layout_name(d.layout);
}

}  // namespace fastml::infer
