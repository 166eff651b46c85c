// Build information, the shared thread pool and CUDA queries.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/registry.hpp"
#include "common/cpu_features.hpp"
#include "common/thread_pool.hpp"
#include "cuda/device.hpp"

namespace py = pybind11;

namespace fastml::bind {

void register_common(py::module_& m) {
  m.def(
      "set_num_threads", [](int n) { ThreadPool::global().set_num_threads(n); }, py::arg("n"),
      "Set the number of threads of fastml's shared native pool.");
  m.def(
      "get_num_threads", [] { return ThreadPool::global().num_threads(); },
      "Number of threads of fastml's shared native pool.");

  m.def("build_info", [] {
    py::dict d;
    d["version"] = FASTML_VERSION;
    d["compiler"] = FASTML_COMPILER;
    d["cuda"] = cuda::compiled_with_cuda();
    const std::string rt = cuda::runtime_version();
    d["cuda_version"] = rt.empty() ? py::object(py::none()) : py::object(py::str(rt));
    d["simd"] = simd_summary();
#if defined(FASTML_NATIVE)
    d["native"] = true;
#else
    d["native"] = false;
#endif
    d["num_threads"] = ThreadPool::global().num_threads();
    return d;
  });

  m.def("cuda_device_count", [] { return cuda::device_count(); });
  m.def("cuda_driver_version", [] { return cuda::driver_version(); });
  m.def("cuda_devices", [] {
    py::list out;
    for (const auto& dev : cuda::devices()) {
      py::dict d;
      d["index"] = dev.index;
      d["name"] = dev.name;
      d["total_memory"] = dev.total_memory;
      d["sm_count"] = dev.sm_count;
      d["compute_capability"] = py::make_tuple(dev.major, dev.minor);
      out.append(d);
    }
    return out;
  });
}

}  // namespace fastml::bind
