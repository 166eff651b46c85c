// Bindings of the data area (filled in by its issue).
#include <pybind11/pybind11.h>

#include "bindings/registry.hpp"

namespace py = pybind11;

namespace fastml::bind {

void register_data(py::module_& m) {}

}  // namespace fastml::bind
