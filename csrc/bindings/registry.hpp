// One register_<area>(module) function per area, each in its own binding
// file; module.cpp only wires them into fastml._core. Classes and functions
// are registered at the top level of fastml._core, each area using names of
// its own (stubs in python/fastml/_core.pyi, one section per area).
#pragma once

#include <pybind11/pybind11.h>

namespace fastml::bind {

void register_common(pybind11::module_& m);
void register_testing(pybind11::module_& m);
void register_data(pybind11::module_& m);
void register_drift(pybind11::module_& m);
void register_infer(pybind11::module_& m);  // NativeHandler base: before batcher and forest
void register_batcher(pybind11::module_& m);
void register_forest(pybind11::module_& m);

}  // namespace fastml::bind
