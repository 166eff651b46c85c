// CPU-only builds: the CUDA ingest entry point exists and says why it cannot run.
#if !defined(FASTML_WITH_CUDA)
#include <stdexcept>

#include "cuda/drift_ingest.hpp"

namespace fastml::cuda {

void drift_ingest_cuda(const DriftIngestParams&) {
  throw std::runtime_error(
      "fastml was built without CUDA: rebuild with FASTML_CUDA=ON to ingest CUDA tensors");
}

void drift_ingest_multi_cuda(const DriftMultiParams&) {
  throw std::runtime_error(
      "fastml was built without CUDA: rebuild with FASTML_CUDA=ON to ingest CUDA tensors");
}

}  // namespace fastml::cuda
#endif
