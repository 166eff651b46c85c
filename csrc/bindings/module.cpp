// fastml._core: wires the per-area submodules and maps core exceptions to
// Python exceptions, in this one place.
#include <pybind11/pybind11.h>

#include "bindings/registry.hpp"
#include "common/errors.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastml native core (private; use the fastml package)";
  m.attr("__version__") = FASTML_VERSION;

  // Python exception types that the core's errors map to. Leaked on purpose:
  // a static Python object's destructor runs at process exit, after the
  // interpreter has finalised, and its decref then crashes (seen on Python
  // 3.12 with the Batcher's cached attribute names).
  static auto* queue_full =
      new py::exception<fastml::QueueFull>(m, "QueueFull", PyExc_RuntimeError);
  static auto* format_error =
      new py::exception<fastml::FormatError>(m, "FormatError", PyExc_ValueError);
  static auto* cancelled_error =
      new py::object(py::module_::import("concurrent.futures").attr("CancelledError"));

  // Translators registered later are tried first: the most derived types come last.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastml::FileNotFound& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const fastml::IOError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    } catch (const fastml::FormatError& e) {
      PyErr_SetString(format_error->ptr(), e.what());
    } catch (const fastml::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const fastml::TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const fastml::Cancelled& e) {
      PyErr_SetString(cancelled_error->ptr(), e.what());
    } catch (const fastml::QueueFull& e) {
      PyErr_SetString(queue_full->ptr(), e.what());
    }
  });

  fastml::bind::register_common(m);
  fastml::bind::register_data(m);
  fastml::bind::register_drift(m);
  fastml::bind::register_infer(m);
  fastml::bind::register_batcher(m);
  fastml::bind::register_forest(m);
  auto testing = m.def_submodule("_testing", "hooks for fastml's own tests");
  fastml::bind::register_testing(testing);
}
