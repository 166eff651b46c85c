// CPU-only build: the CUDA entry points report that no CUDA code is present.
#include "cuda/device.hpp"

namespace fastml::cuda {

bool compiled_with_cuda() {
  return false;
}
std::string runtime_version() {
  return "";
}
int device_count() {
  return 0;
}
std::string driver_version() {
  return "";
}
std::vector<DeviceInfo> devices() {
  return {};
}

}  // namespace fastml::cuda
