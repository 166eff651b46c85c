// CUDA runtime queries, callable from plain C++ (the bindings). Implemented in
// device.cu when fastml is built with CUDA, and by no_cuda.cpp otherwise, so
// every entry point exists in both builds.
#pragma once

#include <string>
#include <vector>

namespace fastml::cuda {

// True when the extension was compiled with CUDA kernels.
bool compiled_with_cuda();
// CUDA runtime version the kernels were built against, e.g. "13.0"; "" without CUDA.
std::string runtime_version();
// Number of usable CUDA devices; 0 without CUDA, without a driver or without a GPU.
int device_count();
// Driver version, e.g. "13.0"; "" when no driver is loaded.
std::string driver_version();

struct DeviceInfo {
  int index = 0;
  std::string name;
  size_t total_memory = 0;
  int sm_count = 0;
  int major = 0, minor = 0;
};
std::vector<DeviceInfo> devices();

}  // namespace fastml::cuda
