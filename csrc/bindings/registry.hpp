// One register_<area>(module) function per area, each in its own binding
// file; module.cpp only wires them into fastml._core.
#pragma once

#include <pybind11/pybind11.h>

namespace fastml::bind {

void register_common(pybind11::module_& m);
void register_testing(pybind11::module_& m);

}  // namespace fastml::bind
