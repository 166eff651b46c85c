// fastml._core._testing: small native hooks that let the tests observe the
// array boundary, the thread pool, error translation and GIL release.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include "bindings/array.hpp"
#include "bindings/registry.hpp"
#include "common/errors.hpp"
#include "common/thread_pool.hpp"

namespace py = pybind11;

namespace fastml::bind {

namespace {

std::atomic<int> g_arrived{0};

[[noreturn]] void throw_kind(const std::string& kind, const std::string& msg) {
  if (kind == "value") throw std::invalid_argument(msg);
  if (kind == "type") throw TypeError(msg);
  if (kind == "index") throw std::out_of_range(msg);
  if (kind == "runtime") throw std::runtime_error(msg);
  if (kind == "os") throw IOError(msg);
  if (kind == "file_not_found") throw FileNotFound(msg);
  if (kind == "timeout") throw TimeoutError(msg);
  if (kind == "cancelled") throw Cancelled(msg);
  if (kind == "queue_full") throw QueueFull(msg);
  if (kind == "memory") throw std::bad_alloc();
  throw std::invalid_argument("kind: unknown error kind '" + kind + "'");
}

}  // namespace

void register_testing(py::module_& m) {
  m.def(
      "describe",
      [](py::handle x, const std::string& layout) {
        ArraySpec spec;
        spec.layout = layout == "any"          ? Layout::Any
                      : layout == "contiguous" ? Layout::Contiguous
                                               : Layout::MakeContiguous;
        BoundArray b = bind_array(x, "x", spec);
        py::dict d;
        d["dtype"] = dtype_name(b.view.dtype);
        d["shape"] = std::vector<int64_t>(b.view.shape.begin(), b.view.shape.begin() + b.view.ndim);
        d["strides"] =
            std::vector<int64_t>(b.view.strides.begin(), b.view.strides.begin() + b.view.ndim);
        d["data"] = reinterpret_cast<uintptr_t>(b.view.data);
        d["readonly"] = b.view.readonly;
        d["c_contiguous"] = b.view.is_c_contiguous();
        return d;
      },
      py::arg("x"), py::arg("layout") = "any");

  m.def(
      "sum",
      [](py::handle x) {
        BoundArray b = bind_array(x, "x", ArraySpec{});
        const ArrayView v = b.view;
        double total = 0.0;
        {
          // Safe: `b` keeps the array alive; the loop touches no Python object.
          py::gil_scoped_release release;
          dispatch_dtype(v.dtype, [&](auto tag) {
            using T = typename decltype(tag)::type;
            const T* p = v.as<T>();
            for (int64_t i = 0, n = v.size(); i < n; ++i) total += load_as_double(p[i]);
          });
        }
        return total;
      },
      py::arg("x"), "Sum of any numeric array as float64 (exercises dtype dispatch).");

  m.def(
      "owned_arange",
      [](int64_t n) {
        FASTML_CHECK_ARG(n >= 0, "n", "must be >= 0, got ", n);
        BufferPtr buf = Buffer::allocate(static_cast<size_t>(n) * sizeof(double));
        for (int64_t i = 0; i < n; ++i) buf->as<double>()[i] = static_cast<double>(i);
        return to_numpy(buf, DType::F64, {n});
      },
      py::arg("n"));

  m.def(
      "parallel_cover",
      [](int64_t n, int64_t grain) {
        FASTML_CHECK_ARG(n >= 0, "n", "must be >= 0, got ", n);
        BufferPtr buf = Buffer::allocate(static_cast<size_t>(n) * sizeof(int32_t));
        auto* counts = buf->as<int32_t>();
        for (int64_t i = 0; i < n; ++i) counts[i] = 0;
        std::mutex mu;
        std::set<std::thread::id> ids;
        {
          // Safe: only native memory is touched while the GIL is released.
          py::gil_scoped_release release;
          ThreadPool::global().parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; ++i) counts[i] += 1;
            // Keep chunks long enough that helpers actually join in.
            std::this_thread::sleep_for(std::chrono::microseconds(200));
            std::lock_guard<std::mutex> lock(mu);
            ids.insert(std::this_thread::get_id());
          });
        }
        return py::make_tuple(to_numpy(buf, DType::I32, {n}), ids.size());
      },
      py::arg("n"), py::arg("grain") = 1);

  m.def(
      "raise_error", [](const std::string& kind, const std::string& msg) { throw_kind(kind, msg); },
      py::arg("kind"), py::arg("message") = "test error");

  m.def(
      "parallel_raise",
      [](const std::string& kind, int64_t n) {
        py::gil_scoped_release release;
        ThreadPool::global().parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
          if (lo <= n / 2 && n / 2 < hi) throw_kind(kind, "raised in a pool thread");
        });
      },
      py::arg("kind"), py::arg("n") = 64);

  m.def("reset_rendezvous", [] { g_arrived = 0; });
  m.def(
      "rendezvous",
      [](double timeout_s) {
        // Safe: waits on an atomic only. Two callers both return True only if
        // they were inside native code at the same time, i.e. the GIL was free.
        py::gil_scoped_release release;
        g_arrived.fetch_add(1);
        const auto deadline =
            std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
        while (g_arrived.load() < 2) {
          if (std::chrono::steady_clock::now() > deadline) return false;
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        return true;
      },
      py::arg("timeout_s") = 5.0);
}

}  // namespace fastml::bind
