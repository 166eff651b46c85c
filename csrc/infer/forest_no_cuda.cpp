// CPU-only builds: the Forest's CUDA entry points exist and say why they
// cannot run (the CUDA build compiles cuda/forest_kernels.cu instead).
#include "common/errors.hpp"
#include "infer/forest.hpp"

#ifndef FASTML_WITH_CUDA
namespace fastml::infer {

bool forest_cuda_compiled() {
  return false;
}

void forest_predict_cuda(const Forest&, const ArrayView&, bool, bool, void*, bool, uintptr_t) {
  fail<std::runtime_error>("device='cuda' needs fastml built with CUDA (FASTML_CUDA=ON)");
}

}  // namespace fastml::infer
#endif
