// fastml.infer's shared binding: the NativeHandler base class, which the
// Batcher (register_batcher.cpp) accepts and the Forest (register_forest.cpp)
// implements.
#include <pybind11/pybind11.h>

#include <memory>

#include "bindings/registry.hpp"
#include "infer/native_handler.hpp"

namespace py = pybind11;

namespace fastml::bind {

void register_infer(py::module_& m) {
  py::class_<infer::NativeHandler, std::shared_ptr<infer::NativeHandler>>(
      m, "NativeHandler", "A model that runs batches in native code without the GIL.")
      .def_property_readonly("handler_name", &infer::NativeHandler::handler_name)
      .def_property_readonly("row_ndim", &infer::NativeHandler::row_ndim);
}

}  // namespace fastml::bind
