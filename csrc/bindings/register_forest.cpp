// Bindings of the forest area (filled in by its issue).
#include <pybind11/pybind11.h>

#include "bindings/registry.hpp"

namespace py = pybind11;

namespace fastml::bind {

void register_forest(py::module_& m) {}

}  // namespace fastml::bind
