// Bindings of the batcher area: fastml._core.BatchFuture (the future that
// Batcher.submit returns), fastml._core._BatcherCore (the native batcher
// behind fastml.infer.Batcher) and _BatcherTestHandler (a native handler for
// the tests).
//
// Requests keep their Python objects (arrays, dicts, tensors) in opaque
// payloads whose destructors take the GIL; the core never destroys one while
// holding a lock (see csrc/infer/batcher.hpp), so that is deadlock-free.
#include <fcntl.h>
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings/array.hpp"
#include "bindings/registry.hpp"
#include "common/errors.hpp"
#include "infer/batcher.hpp"
#include "infer/native_handler.hpp"

namespace py = pybind11;

namespace fastml::bind {

namespace {

using infer::BatchCore;
using infer::FuturePtr;
using infer::RequestFuture;

bool python_alive() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsInitialized() && !Py_IsFinalizing();
#else
  return Py_IsInitialized() && !_Py_IsFinalizing();
#endif
}

// Keeps one Python thread state for a native thread (a batcher worker) for
// as long as the thread lives: without it, each GIL acquisition on a thread
// Python has not seen creates and destroys a thread state (measured: a
// worker-path predict() went from about 70 to 28 us per request here).
struct KeptThreadState {
  bool kept = false;
  void keep() {
    if (kept) return;
    PyGILState_Ensure();  // creates the thread state with one reference...
    PyEval_SaveThread();  // ...that this object holds while the GIL is free
    kept = true;
  }
  ~KeptThreadState() {
    if (!kept || !python_alive()) return;
    PyThreadState* ts = PyGILState_GetThisThreadState();
    if (ts == nullptr) return;
    PyEval_RestoreThread(ts);
    PyGILState_Release(PyGILState_UNLOCKED);  // last reference: deletes it, frees the GIL
  }
};

// Takes the GIL unless this thread already holds it (PyGILState_Check is a
// thread-local read).
class GilIfNeeded {
 public:
  GilIfNeeded() {
    if (PyGILState_Check()) return;
    if (PyGILState_GetThisThreadState() == nullptr) {
      // Only threads Python knows nothing about (batcher workers): Python's own
      // threads delete their thread state themselves when they end.
      thread_local KeptThreadState state;
      state.keep();
    }
    gil_ = PyGILState_Ensure();
    active_ = true;
  }
  ~GilIfNeeded() {
    if (active_) PyGILState_Release(gil_);
  }
  GilIfNeeded(const GilIfNeeded&) = delete;
  GilIfNeeded& operator=(const GilIfNeeded&) = delete;

 private:
  PyGILState_STATE gil_{};
  bool active_ = false;
};

// A Python object owned from C++; safe to destroy on any thread.
struct PyRef {
  py::object obj;
  explicit PyRef(py::object o) : obj(std::move(o)) {}
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  ~PyRef() {
    if (!obj) return;
    if (!python_alive()) {
      obj.release();  // the interpreter is gone: leak rather than crash
      return;
    }
    GilIfNeeded gil;
    obj = py::object();
  }
};

std::shared_ptr<void> hold(py::object o) {
  return std::make_shared<PyRef>(std::move(o));
}
py::object held(const std::shared_ptr<void>& p) {
  return static_cast<PyRef*>(p.get())->obj;
}

// A Python exception raised by a handler, kept as its exception instance so
// that every request of the batch can raise it again.
struct PyErrorHolder : std::exception {
  std::shared_ptr<void> exc;
  explicit PyErrorHolder(py::object e) : exc(hold(std::move(e))) {}
  const char* what() const noexcept override { return "Python exception from the batch handler"; }
};

enum InputKind : int { kNumpy = 1, kTorch = 2, kDict = 3, kNative = 4 };
enum ValueKind : int { kPyValue = 1, kNativeSlice = 2 };

// One request's share of a native handler's output, viewed without copying.
struct NativeSlice {
  BufferPtr buffer;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  size_t offset = 0;
};

// Python references dropped on a thread that does not hold the GIL (a worker
// that ran a native batch), queued here and released by the next thread that
// holds it anyway (submit, a future's result, the asyncio bridge, stats,
// close): a native batch then never waits for the GIL, which an event loop or
// busy Python threads may hold for up to the interpreter's switch interval.
class DeferredDecref {
 public:
  static void push(PyObject* o) {
    std::lock_guard<std::mutex> lock(mu());
    queue().push_back(o);
    pending().store(true, std::memory_order_release);
  }
  // With the GIL held.
  static void drain() {
    if (!pending().load(std::memory_order_acquire)) return;
    std::vector<PyObject*> objs;
    {
      std::lock_guard<std::mutex> lock(mu());
      objs.swap(queue());
      pending().store(false, std::memory_order_relaxed);
    }
    for (PyObject* o : objs) Py_DECREF(o);
  }

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::vector<PyObject*>& queue() {
    static auto* q = new std::vector<PyObject*>();  // never destroyed: may outlive Python
    return *q;
  }
  static std::atomic<bool>& pending() {
    static std::atomic<bool> p{false};
    return p;
  }
};

struct NativeInput {
  BoundArray array;  // keeps the caller's array alive while the batch runs
  ~NativeInput() {
    if (!array.owner) return;
    if (!python_alive()) {
      array.owner.release();
      return;
    }
    if (PyGILState_Check()) {
      array.owner = py::array();
    } else {
      DeferredDecref::push(array.owner.release().ptr());
    }
  }
};

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h;
}

bool is_torch_tensor(py::handle x) {
  py::handle mod = py::type::of(x).attr("__module__");
  const std::string m = py::str(mod);
  return m.rfind("torch", 0) == 0 && py::hasattr(x, "shape") && py::hasattr(x, "dtype");
}

std::string type_name(py::handle x) {
  return py::str(py::type::of(x).attr("__name__"));
}

// Rows and signature (kind, dtype, trailing shape) of one array-like value.
struct ArrayInfo {
  py::object value;
  int kind = kNumpy;
  int64_t rows = 0;
  uint64_t signature = 0;
};

// With row_ndim >= 0, an array of exactly row_ndim dimensions is one row given
// without its batch dimension: it is described (and batched) as shape (1, ...)
// and `single` is set.
ArrayInfo describe_array(py::handle x, const char* name, int row_ndim, bool& single) {
  ArrayInfo info;
  single = false;
  if (!py::isinstance<py::array>(x) && is_torch_tensor(x)) {
    info.kind = kTorch;
    info.value = py::reinterpret_borrow<py::object>(x);
    if (row_ndim >= 0 && static_cast<int>(py::len(x.attr("shape"))) == row_ndim) {
      info.value = info.value.attr("unsqueeze")(0);
      single = true;
    }
    py::tuple shape = py::tuple(info.value.attr("shape"));
    if (shape.size() < 1) {
      fail<std::invalid_argument>(name, " must have a leading row dimension, got a 0-D tensor");
    }
    info.rows = shape[0].cast<int64_t>();
    uint64_t h = mix(kTorch, std::hash<std::string>()(py::str(x.attr("dtype"))));
    h = mix(h, std::hash<std::string>()(py::str(x.attr("device"))));
    for (size_t i = 1; i < shape.size(); ++i) h = mix(h, shape[i].cast<uint64_t>());
    info.signature = mix(h, shape.size());
  } else {
    py::array a =
        py::isinstance<py::array>(x) ? py::reinterpret_borrow<py::array>(x) : as_numpy(x, name);
    if (row_ndim >= 0 && a.ndim() == row_ndim) {
      std::vector<py::ssize_t> shape{1};
      shape.insert(shape.end(), a.shape(), a.shape() + a.ndim());
      a = a.reshape(shape);
      single = true;
    }
    if (a.ndim() < 1) {
      fail<std::invalid_argument>(name, " must have a leading row dimension, got a 0-D array");
    }
    info.kind = kNumpy;
    info.rows = a.shape(0);
    const py::dtype dt = a.dtype();
    uint64_t h = mix(kNumpy, static_cast<uint64_t>(dt.num()));
    h = mix(h, static_cast<uint64_t>(dt.itemsize()));
    h = mix(h, static_cast<uint64_t>(dt.byteorder()));
    for (py::ssize_t i = 1; i < a.ndim(); ++i) h = mix(h, static_cast<uint64_t>(a.shape(i)));
    info.signature = mix(h, static_cast<uint64_t>(a.ndim()));
    info.value = std::move(a);
  }
  if (info.rows < 1) fail<std::invalid_argument>(name, " must have at least one row, got 0");
  return info;
}

// Fills f's input, rows and signature from a Python request `x`.
void describe_request(py::handle x, RequestFuture& f, int row_ndim) {
  if (PyDict_Check(x.ptr())) {
    py::dict d = py::reinterpret_borrow<py::dict>(x);
    if (d.empty()) fail<std::invalid_argument>("x must be a non-empty dict of arrays, got {}");
    py::dict normalized;
    int64_t rows = -1;
    std::string first_key;
    uint64_t signature = kDict;
    for (auto item : d) {
      if (!PyUnicode_Check(item.first.ptr())) {
        fail<TypeError>("x dict keys must be str, got ", type_name(item.first));
      }
      const std::string key = py::str(item.first);
      const std::string name = "x['" + key + "']";
      bool single = false;
      ArrayInfo info = describe_array(item.second, name.c_str(), row_ndim, single);
      if (rows < 0) {
        rows = info.rows;
        first_key = key;
        f.single_row = single;
      } else if (single != f.single_row) {
        fail<std::invalid_argument>("x['", key, "'] and x['", first_key,
                                    "'] disagree on whether the request is one row (row_ndim=",
                                    row_ndim, "): give every array its row dimension, or none");
      } else if (info.rows != rows) {
        fail<std::invalid_argument>("x['", key, "'] has ", info.rows, " rows but x['", first_key,
                                    "'] has ", rows,
                                    "; every array of a request needs the same rows");
      }
      // Order-independent over keys: a sum of per-key hashes.
      signature += mix(std::hash<std::string>()(key), info.signature);
      normalized[item.first] = info.value;
    }
    f.input = hold(std::move(normalized));
    f.input_kind = kDict;
    f.rows = rows;
    f.signature = signature;
    return;
  }
  bool single = false;
  ArrayInfo info = describe_array(x, "x", row_ndim, single);
  f.single_row = single;
  f.input = hold(std::move(info.value));
  f.input_kind = info.kind;
  f.rows = info.rows;
  f.signature = info.signature;
}

// ---------------------------------------------------------------- batch assembly (GIL held)

py::object concat_arrays(const std::vector<py::object>& parts, int kind) {
  if (kind == kTorch) {
    py::list l;
    for (auto& p : parts) l.append(p);
    return py::module_::import("torch").attr("cat")(l);
  }
  // Fast path: plain numeric C-contiguous arrays are copied with memcpy.
  py::array first = py::reinterpret_borrow<py::array>(parts[0]);
  const char k = first.dtype().kind();
  bool plain = (k == 'b' || k == 'i' || k == 'u' || k == 'f' || k == 'c');
  int64_t rows = 0;
  for (auto& p : parts) {
    py::array a = py::reinterpret_borrow<py::array>(p);
    plain = plain && (a.flags() & py::array::c_style) != 0;
    rows += a.shape(0);
  }
  if (!plain) {
    py::list l;
    for (auto& p : parts) l.append(p);
    return py::module_::import("numpy").attr("concatenate")(l);
  }
  std::vector<py::ssize_t> shape(first.shape(), first.shape() + first.ndim());
  shape[0] = rows;
  py::array out(first.dtype(), shape);
  char* dst = static_cast<char*>(out.mutable_data());
  for (auto& p : parts) {
    py::array a = py::reinterpret_borrow<py::array>(p);
    const size_t n = static_cast<size_t>(a.nbytes());
    if (n) std::memcpy(dst, a.data(), n);
    dst += n;
  }
  return std::move(out);
}

py::object concat_inputs(const std::vector<py::object>& parts, int kind) {
  if (kind != kDict) return concat_arrays(parts, kind);
  py::dict first = py::reinterpret_borrow<py::dict>(parts[0]);
  py::dict out;
  for (auto item : first) {
    std::vector<py::object> column;
    column.reserve(parts.size());
    for (auto& p : parts) column.push_back(py::reinterpret_borrow<py::dict>(p)[item.first]);
    const int ck = is_torch_tensor(column[0]) ? kTorch : kNumpy;
    out[item.first] = concat_arrays(column, ck);
  }
  return std::move(out);
}

// Row `i` of a batch output (a dict: each value's row): the answer to a
// request given as one row without its batch dimension.
py::object row_of(py::handle x, int64_t i) {
  py::int_ index(static_cast<py::ssize_t>(i));
  if (PyDict_Check(x.ptr())) {
    py::dict out;
    for (auto item : py::reinterpret_borrow<py::dict>(x)) out[item.first] = item.second[index];
    return std::move(out);
  }
  return x[index];
}

py::object slice_rows(py::handle x, int64_t begin, int64_t end) {
  py::slice s(static_cast<py::ssize_t>(begin), static_cast<py::ssize_t>(end), 1);
  if (PyDict_Check(x.ptr())) {
    py::dict out;
    for (auto item : py::reinterpret_borrow<py::dict>(x)) out[item.first] = item.second[s];
    return std::move(out);
  }
  return x[s];
}

// Rows of a handler output value, or -1 when it has no leading dimension;
// TypeError when it is not an array at all.
int64_t leading_rows(py::handle v, const std::string& name, const char* key) {
  if (py::isinstance<py::array>(v)) {
    const auto a = py::reinterpret_borrow<py::array>(v);
    return a.ndim() >= 1 ? static_cast<int64_t>(a.shape(0)) : -1;
  }
  if (py::hasattr(v, "shape")) {
    py::tuple shape = py::tuple(v.attr("shape"));
    return shape.size() >= 1 ? shape[0].cast<int64_t>() : -1;
  }
  fail<TypeError>("the result of handler '", name, "'", key,
                  " must be an array (or a dict of arrays), got ", type_name(v));
}

// Checks that a handler output has `rows` rows (every value of a dict).
void check_output_rows(py::handle out, int64_t rows, const std::string& name) {
  auto check = [&](py::handle v, const std::string& key) {
    const int64_t r = leading_rows(v, name, key.c_str());
    if (r == rows) return;
    if (r < 0) {
      fail<std::invalid_argument>("the result of handler '", name, "'", key,
                                  " must have a leading row dimension, got a 0-D value");
    }
    fail<std::invalid_argument>("the result of handler '", name, "'", key, " has ", r,
                                " rows for a batch of ", rows,
                                " rows; the handler must return one row per input row");
  };
  if (PyDict_Check(out.ptr())) {
    for (auto item : py::reinterpret_borrow<py::dict>(out)) {
      check(item.second, "['" + std::string(py::str(item.first)) + "']");
    }
    return;
  }
  static const std::string no_key;
  check(out, no_key);
}

py::object concat_outputs(const std::vector<py::object>& parts) {
  if (PyDict_Check(parts[0].ptr())) return concat_inputs(parts, kDict);
  return concat_arrays(parts, is_torch_tensor(parts[0]) ? kTorch : kNumpy);
}

// ---------------------------------------------------------------- the Python-side batcher

class PyBatcher {
 public:
  PyBatcher(py::object fn, std::shared_ptr<infer::NativeHandler> native,
            infer::BatcherConfig config, int row_ndim)
      : fn_(std::move(fn)), native_(std::move(native)), name_(config.name) {
    row_ndim_ = native_ ? native_->row_ndim() : row_ndim;
    if (!native_) {
      FASTML_CHECK_TYPE(PyCallable_Check(fn_.ptr()), "fn", "must be callable, got ",
                        type_name(fn_));
    }
    auto runner = native_ ? BatchCore::Runner([this](std::vector<FuturePtr>& b) { run_native(b); })
                          : BatchCore::Runner([this](std::vector<FuturePtr>& b) { run_python(b); });
    core_ = std::make_shared<BatchCore>(std::move(config), std::move(runner));
    core_->start();
  }

  ~PyBatcher() {
    // Workers may be waiting for the GIL to run a Python handler: let them
    // finish while this thread waits for them.
    py::gil_scoped_release release;
    core_->close(false);
    core_.reset();
  }

  // Queues one request. `allow_inline`: the caller blocks for the result
  // anyway (predict) or opted in (Batcher(inline=True)), and is not an asyncio
  // event loop's thread: then, with max_delay_us=0 and nothing queued, the
  // batch may run here, on the calling thread.
  FuturePtr submit(py::handle x, int priority, int64_t timeout_us, bool block,
                   double block_timeout_s, bool allow_inline) {
    FuturePtr f = make_request(x);
    bool run_now;
    if (block) {
      const double limit =
          block_timeout_s < 0 ? std::numeric_limits<double>::infinity() : block_timeout_s;
      // Waiting for room: the workers need the GIL to drain the queue.
      py::gil_scoped_release release;
      run_now = core_->enqueue(f, priority, timeout_us, limit, allow_inline);
    } else {
      run_now = core_->enqueue(f, priority, timeout_us, -1.0, allow_inline);
    }
    if (run_now) core_->run_inline(f);
    return f;
  }

  // A request for `x`, checked and described, not queued yet.
  FuturePtr make_request(py::handle x) {
    DeferredDecref::drain();
    auto f = std::make_shared<RequestFuture>();
    f->wait_spin_us = static_cast<int32_t>(core_->config().spin_us);
    if (native_) {
      auto input = std::make_shared<NativeInput>();
      ArraySpec spec;
      spec.min_ndim = row_ndim_ >= 0 ? row_ndim_ : 1;
      spec.layout = Layout::MakeContiguous;
      input->array = bind_array(x, "x", spec);
      ArrayView& v = input->array.view;
      if (row_ndim_ >= 0 && v.ndim == row_ndim_ && v.ndim < kMaxDims) {
        // One row without its batch dimension: a (1, ...) view of the same bytes.
        for (int i = v.ndim; i > 0; --i) {
          v.shape[i] = v.shape[i - 1];
          v.strides[i] = v.strides[i - 1];
        }
        v.shape[0] = 1;
        v.strides[0] = v.ndim ? v.shape[1] * v.strides[1] : static_cast<int64_t>(itemsize(v.dtype));
        ++v.ndim;
        f->single_row = true;
      }
      if (input->array.view.shape[0] < 1) {
        fail<std::invalid_argument>("x must have at least one row, got 0");
      }
      native_->check_input(input->array.view, "x");
      f->rows = input->array.view.shape[0];
      uint64_t h = mix(kNative, static_cast<uint64_t>(input->array.view.dtype));
      for (int i = 1; i < input->array.view.ndim; ++i) {
        h = mix(h, static_cast<uint64_t>(input->array.view.shape[i]));
      }
      f->signature = mix(h, static_cast<uint64_t>(input->array.view.ndim));
      f->input = std::move(input);
      f->input_kind = kNative;
    } else {
      describe_request(x, *f, row_ndim_);
    }
    return f;
  }

  const std::shared_ptr<BatchCore>& core() const { return core_; }

  void close(bool drain) {
    {
      py::gil_scoped_release release;  // workers may need the GIL to finish
      core_->close(drain);
    }
    DeferredDecref::drain();
  }

  py::dict stats() const;
  const std::string& name() const { return name_; }
  int row_ndim() const { return row_ndim_; }
  bool closed() const { return core_->closed(); }
  const infer::BatcherConfig& config() const { return core_->config(); }

 private:
  // Marks the requests that still may run; returns them.
  static std::vector<FuturePtr> start_all(std::vector<FuturePtr>& batch) {
    std::vector<FuturePtr> live;
    live.reserve(batch.size());
    for (auto& f : batch) {
      if (f->set_running()) live.push_back(f);
    }
    return live;
  }

  void run_python(std::vector<FuturePtr>& batch) {
    GilIfNeeded gil;
    std::vector<FuturePtr> live = start_all(batch);
    if (live.empty()) return;
    // The runner owns its running requests' inputs: drop them while the GIL is
    // held (before `gil` is released), not later, one GIL round trip each,
    // when the core ends the requests.
    struct DropInputs {
      std::vector<FuturePtr>& live;
      ~DropInputs() {
        for (auto& f : live) f->input.reset();
      }
    } drop_inputs{live};
    const int64_t max_rows = core_->config().max_batch_size;
    try {
      py::object out;
      int64_t rows = 0;
      if (live.size() == 1) {
        py::object x = held(live[0]->input);
        rows = live[0]->rows;
        if (rows <= max_rows) {
          out = fn_(x);
          check_output_rows(out, rows, name_);
        } else {
          // A request larger than max_batch_size alone runs in chunks.
          std::vector<py::object> outs;
          for (int64_t b = 0; b < rows; b += max_rows) {
            const int64_t e = std::min(rows, b + max_rows);
            py::object part = fn_(slice_rows(x, b, e));
            check_output_rows(part, e - b, name_);
            outs.push_back(std::move(part));
          }
          out = concat_outputs(outs);
        }
        if (live[0]->single_row) out = row_of(out, 0);
        live[0]->stage_result(hold(std::move(out)), kPyValue);
        return;
      }
      std::vector<py::object> parts;
      parts.reserve(live.size());
      for (auto& f : live) {
        parts.push_back(held(f->input));
        rows += f->rows;
      }
      py::object x = concat_inputs(parts, live[0]->input_kind);
      parts.clear();
      out = fn_(x);
      check_output_rows(out, rows, name_);
      int64_t begin = 0;
      for (auto& f : live) {
        f->stage_result(
            hold(f->single_row ? row_of(out, begin) : slice_rows(out, begin, begin + f->rows)),
            kPyValue);
        begin += f->rows;
      }
    } catch (py::error_already_set& e) {
      const auto error = std::make_exception_ptr(PyErrorHolder(e.value()));
      for (auto& f : live) f->stage_exception(error);
    } catch (...) {
      const auto error = std::current_exception();
      for (auto& f : live) f->stage_exception(error);
    }
  }

  void run_native(std::vector<FuturePtr>& batch) {
    std::vector<FuturePtr> live = start_all(batch);
    if (live.empty()) return;
    // Running requests cannot be cancelled or time out: the runner owns their inputs.
    std::vector<std::shared_ptr<void>> inputs;
    inputs.reserve(live.size());
    for (auto& f : live) inputs.push_back(f->input);
    const bool had_gil = PyGILState_Check() != 0;
    {
      // Only native buffers are touched below; the inputs' owners stay alive
      // in `inputs`, so running without the GIL is safe.
      std::unique_ptr<py::gil_scoped_release> release;
      if (had_gil) release = std::make_unique<py::gil_scoped_release>();
      try {
        run_native_batch(live, inputs);
      } catch (...) {
        const auto error = std::current_exception();
        for (auto& f : live) f->stage_exception(error);
      }
    }
    // Without the GIL: the arrays are released by the next thread that holds it
    // (DeferredDecref), before the requests end.
    for (auto& f : live) f->input.reset();
    inputs.clear();
  }

  void run_native_batch(std::vector<FuturePtr>& live,
                        const std::vector<std::shared_ptr<void>>& inputs) {
    const int64_t max_rows = core_->config().max_batch_size;
    const ArrayView& first = static_cast<NativeInput*>(inputs[0].get())->array.view;
    const int64_t row_bytes = first.row_bytes();
    int64_t rows = 0;
    for (auto& f : live) rows += f->rows;

    infer::HandlerOutput out;
    auto check = [&](const infer::HandlerOutput& o, int64_t want) {
      if (!o.buffer || o.shape.empty() || o.shape[0] != want) {
        fail<std::invalid_argument>("the result of native handler '", native_->handler_name(),
                                    "' has ", o.shape.empty() ? 0 : o.shape[0],
                                    " rows for a batch of ", want,
                                    " rows; the handler must return one row per input row");
      }
    };
    if (live.size() == 1 && rows <= max_rows) {
      out = native_->run(first);
      check(out, rows);
    } else if (live.size() == 1) {
      // Oversized request: run in chunks and gather the outputs.
      std::vector<infer::HandlerOutput> parts;
      for (int64_t b = 0; b < rows; b += max_rows) {
        const int64_t e = std::min(rows, b + max_rows);
        ArrayView chunk = first;
        chunk.data = static_cast<char*>(first.data) + b * row_bytes;
        chunk.shape[0] = e - b;
        parts.push_back(native_->run(chunk));
        check(parts.back(), e - b);
      }
      out.dtype = parts[0].dtype;
      out.shape = parts[0].shape;
      out.shape[0] = rows;
      size_t total = 0;
      for (auto& p : parts) total += p.buffer->nbytes();
      out.buffer = Buffer::allocate(total);
      char* dst = out.buffer->as<char>();
      for (auto& p : parts) {
        std::memcpy(dst, p.buffer->data(), p.buffer->nbytes());
        dst += p.buffer->nbytes();
      }
    } else {
      BufferPtr gathered = Buffer::allocate(static_cast<size_t>(rows * row_bytes));
      char* dst = gathered->as<char>();
      for (auto& in : inputs) {
        const ArrayView& v = static_cast<NativeInput*>(in.get())->array.view;
        const size_t n = static_cast<size_t>(v.nbytes());
        if (n) std::memcpy(dst, v.data, n);
        dst += n;
      }
      ArrayView view = first;
      view.data = gathered->data();
      view.shape[0] = rows;
      view.readonly = false;
      out = native_->run(view);
      check(out, rows);
    }
    int64_t out_row_bytes = static_cast<int64_t>(itemsize(out.dtype));
    for (size_t i = 1; i < out.shape.size(); ++i) out_row_bytes *= out.shape[i];
    int64_t begin = 0;
    for (auto& f : live) {
      auto slice = std::make_shared<NativeSlice>();
      slice->buffer = out.buffer;
      slice->dtype = out.dtype;
      slice->shape = out.shape;
      slice->shape[0] = f->rows;
      slice->offset = static_cast<size_t>(begin * out_row_bytes);
      f->stage_result(std::move(slice), kNativeSlice);
      begin += f->rows;
    }
  }

  py::object fn_;
  std::shared_ptr<infer::NativeHandler> native_;
  std::string name_;
  int row_ndim_ = -1;
  std::shared_ptr<BatchCore> core_;
};

std::vector<double> percentiles(std::vector<double> v) {
  std::vector<double> out;
  if (v.empty()) return {0.0, 0.0, 0.0, 0.0};
  std::sort(v.begin(), v.end());
  for (double q : {0.5, 0.9, 0.99}) {
    const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
    out.push_back(v[i]);
  }
  out.push_back(v.back());
  return out;
}

py::dict PyBatcher::stats() const {
  DeferredDecref::drain();
  infer::BatcherStats s = core_->stats();
  py::dict d;
  d["name"] = name_;
  d["requests"] = s.requests;
  d["completed"] = s.completed;
  d["errors"] = s.errors;
  d["timeouts"] = s.timeouts;
  d["cancellations"] = s.cancellations;
  d["rejections"] = s.rejections;
  d["batches"] = s.batches;
  d["failed_batches"] = s.failed_batches;
  d["inline_batches"] = s.inline_batches;
  d["rows"] = s.rows;
  d["queued"] = s.queued;
  d["queued_rows"] = s.queued_rows;
  d["in_flight"] = s.in_flight;
  d["closed"] = s.closed;
  py::dict hist;
  for (int i = 0; i < 32; ++i) {
    if (s.batch_size_buckets[i]) hist[py::int_(uint64_t{1} << i)] = s.batch_size_buckets[i];
  }
  d["batch_size_histogram"] = hist;
  const char* names[] = {"p50", "p90", "p99", "max"};
  for (auto [key, samples] : {std::make_pair("queue_wait_us", &s.queue_wait_us),
                              std::make_pair("handler_us", &s.handler_us)}) {
    auto p = percentiles(*samples);
    py::dict q;
    for (int i = 0; i < 4; ++i) q[names[i]] = p[i];
    d[key] = q;
  }
  return d;
}

// ---------------------------------------------------------------- futures

py::object future_value(const RequestFuture& f) {
  if (f.value_kind() == kNativeSlice) {
    const auto* s = static_cast<const NativeSlice*>(f.value().get());
    py::object rows = to_numpy(s->buffer, s->dtype, s->shape, s->offset);
    // One row asked without its batch dimension: its row, as indexing gives it.
    return f.single_row ? row_of(rows, 0) : rows;
  }
  return held(f.value());
}

// Raises the future's error as a Python exception.
[[noreturn]] void raise_error(const RequestFuture& f) {
  try {
    std::rethrow_exception(f.error());
  } catch (const PyErrorHolder& e) {
    py::object exc = held(e.exc);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    throw py::error_already_set();
  }
}

void wait_done(const RequestFuture& f, py::object timeout, const char* what, int64_t spin_us = 0) {
  if (f.done()) return;
  if (spin_us > 0) {
    // Poll briefly before sleeping (the worker usually ends a small batch in
    // microseconds): saves the futex wake-up of the waiting thread. The GIL
    // is released so a Python handler can run meanwhile.
    py::gil_scoped_release release;
    const auto until = infer::Clock::now() + std::chrono::microseconds(spin_us);
    while (!f.done() && infer::Clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
  if (f.done()) return;
  const double limit = timeout.is_none() ? -1.0 : timeout.cast<double>();
  const auto t_end = infer::Clock::now() +
                     std::chrono::duration_cast<infer::Clock::duration>(
                         std::chrono::duration<double>(limit < 0 ? 0.0 : std::min(limit, 1e9)));
  for (;;) {
    double slice = 0.05;  // wake up now and then for Ctrl-C
    if (limit >= 0) {
      const double left = std::chrono::duration<double>(t_end - infer::Clock::now()).count();
      if (left <= 0) break;
      slice = std::min(slice, left);
    }
    bool done;
    {
      // Only the future's own lock and condition are touched while waiting.
      py::gil_scoped_release release;
      done = f.wait(slice);
    }
    if (done) return;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
  if (!f.done()) fail<TimeoutError>(what, " did not complete within ", limit, " s");
}

py::object future_result(const FuturePtr& f, py::object timeout) {
  wait_done(*f, timeout, "the request", f->wait_spin_us);
  DeferredDecref::drain();
  switch (f->state()) {
    case infer::FutureState::Finished: return future_value(*f);
    case infer::FutureState::Cancelled: fail<Cancelled>("the request was cancelled");
    default: raise_error(*f);
  }
}

py::object future_exception(const FuturePtr& f, py::object timeout) {
  wait_done(*f, timeout, "the request");
  switch (f->state()) {
    case infer::FutureState::Finished: return py::none();
    case infer::FutureState::Cancelled: fail<Cancelled>("the request was cancelled");
    default: break;
  }
  try {
    raise_error(*f);
  } catch (py::error_already_set& e) {
    return e.value();
  } catch (...) {
    py::detail::try_translate_exceptions();  // sets the Python error from the C++ one
    py::error_already_set e;
    return e.value();
  }
}

void future_add_done_callback(const FuturePtr& f, py::object fn) {
  FASTML_CHECK_TYPE(PyCallable_Check(fn.ptr()), "fn", "must be callable, got ", type_name(fn));
  auto cb = std::make_shared<PyRef>(std::move(fn));
  f->add_done_callback([cb](const FuturePtr& done) {
    if (!python_alive()) return;
    GilIfNeeded gil;
    try {
      cb->obj(py::cast(done));
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("fastml.infer BatchFuture done callback");
    }
  });
}

// ---------------------------------------------------------------- asyncio

// Resolves the asyncio futures of one event loop when their requests end.
// Completions arrive on worker threads and are collected here; the loop is
// woken once per group, not once per request, and no thread is created per
// request. The wake-up is a byte written to a pipe the loop watches
// (loop.add_reader), so a worker needs no GIL to wake the loop: a native
// batch's whole path runs without it. Loops without add_reader (Windows'
// proactor) are woken with call_soon_threadsafe, which takes the GIL.
class AsyncBridge : public std::enable_shared_from_this<AsyncBridge> {
 public:
  // Holds the loop weakly, so a finished loop (and this bridge) can be freed.
  explicit AsyncBridge(py::object loop)
      : loop_ref_(hold(py::module_::import("weakref").attr("ref")(loop))) {}

  ~AsyncBridge() {
    if (read_fd_ >= 0) ::close(read_fd_);
    if (write_fd_ >= 0) ::close(write_fd_);
  }

  // Resolves `waiter` (an asyncio future of this bridge's loop) with `f`'s
  // outcome once `f` ends: its value, its exception, or cancelled. Called on
  // the loop's thread.
  void attach(const FuturePtr& f, py::object waiter) {
    if (!registered_) register_reader();
    auto self = shared_from_this();
    auto held_waiter = hold(std::move(waiter));
    f->add_done_callback([self, held_waiter](const FuturePtr& done) mutable {
      self->completed(std::move(held_waiter), done);
    });
  }

  // predict_async's one call: checks `x`, attaches `waiter` and stages the
  // request; returns its future (for cancelling it). Requests staged during
  // one iteration of the loop are queued together by flush(), which the first
  // of them schedules with loop.call_soon: one lock and one wake-up per group,
  // so the workers see whole batches instead of racing the loop for single
  // requests. A full queue or a closed batcher fails the request at flush
  // (its await raises QueueFull / RuntimeError), as at submit.
  FuturePtr call(PyBatcher& b, py::handle x, int priority, int64_t timeout_us, py::object waiter);

  // On the loop's thread: queues every staged request.
  // A request whose waiter is already done (its task was cancelled meanwhile)
  // is cancelled here, before it is queued: it is never counted or run.
  void flush() {
    std::vector<StagedRequest> staged;
    staged.swap(staged_);
    std::vector<BatchCore::Staged> group;
    for (size_t i = 0; i < staged.size();) {
      const std::shared_ptr<BatchCore>& core = staged[i].core;
      group.clear();
      for (; i < staged.size() && staged[i].core == core; ++i) {
        if (waiter_done(staged[i].waiter)) {
          staged[i].request.future->cancel();
          continue;
        }
        group.push_back(std::move(staged[i].request));
      }
      if (!group.empty()) core->enqueue_many(group);
    }
  }

  // On the loop's thread: resolves every waiter collected so far.
  void drain() {
    if (read_fd_ >= 0) {
      char buf[64];
      while (::read(read_fd_, buf, sizeof buf) > 0) {
      }
    }
    std::vector<std::pair<std::shared_ptr<void>, FuturePtr>> ready;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready.swap(pending_);
    }
    // Created once and never released: a static py::str would be decref'd at
    // process exit, after Python finalised (a SIGSEGV at exit on Python 3.12).
    static const py::str& result_name = *new py::str("set_result");
    static const py::str& exception_name = *new py::str("set_exception");
    static const py::str& cancel_name = *new py::str("cancel");
    for (auto& [w, f] : ready) {
      py::object waiter = held(w);
      if (waiter_done(waiter)) continue;  // its task was cancelled
      switch (f->state()) {
        case infer::FutureState::Finished: waiter.attr(result_name)(future_value(*f)); break;
        case infer::FutureState::Cancelled: waiter.attr(cancel_name)(); break;
        default: waiter.attr(exception_name)(future_exception(f, py::none())); break;
      }
    }
    DeferredDecref::drain();
  }

 private:
  void register_reader() {
    registered_ = true;
    int fds[2];
    if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return;
    try {
      py::object loop = held(loop_ref_)();
      loop.attr("add_reader")(fds[0], py::cast(shared_from_this()).attr("_drain"));
      read_fd_ = fds[0];
      write_fd_ = fds[1];
    } catch (py::error_already_set&) {  // no add_reader on this loop: the GIL path
      ::close(fds[0]);
      ::close(fds[1]);
    }
  }

  void completed(std::shared_ptr<void> waiter, const FuturePtr& f) {
    bool first;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.emplace_back(std::move(waiter), f);
      first = pending_.size() == 1;
    }
    if (!first) return;
    if (write_fd_ >= 0) {
      const char one = 1;
      // A full pipe (EAGAIN) already holds a wake-up: nothing to add.
      [[maybe_unused]] const auto n = ::write(write_fd_, &one, 1);
      return;
    }
    if (!python_alive()) return;
    GilIfNeeded gil;
    try {
      py::object loop = held(loop_ref_)();
      if (!loop.is_none()) {
        loop.attr("call_soon_threadsafe")(py::cast(shared_from_this()).attr("_drain"));
        return;
      }
    } catch (py::error_already_set&) {
    }
    // The loop is closed or gone: nobody awaits these requests any more.
    std::vector<std::pair<std::shared_ptr<void>, FuturePtr>> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped.swap(pending_);
    }
  }

  struct StagedRequest {
    std::shared_ptr<BatchCore> core;
    BatchCore::Staged request;
    py::object waiter;
  };

  static bool waiter_done(const py::object& waiter) {
    static const py::str& done_name = *new py::str("done");
    return waiter.attr(done_name)().cast<bool>();
  }

  void stage(const std::shared_ptr<BatchCore>& core, BatchCore::Staged request, py::object waiter) {
    const bool first = staged_.empty();
    staged_.push_back(StagedRequest{core, std::move(request), std::move(waiter)});
    if (!first) return;
    static const py::str& call_soon_name = *new py::str("call_soon");
    py::object loop = held(loop_ref_)();
    if (loop.is_none()) {  // cannot happen on the running loop's thread; be safe
      flush();
      return;
    }
    try {
      loop.attr(call_soon_name)(py::cast(shared_from_this()).attr("_flush"));
    } catch (...) {
      flush();  // queue it now rather than never
      throw;
    }
  }

  std::shared_ptr<void> loop_ref_;  // a weakref.ref to the loop (PyRef: freed on any thread)
  // Requests checked but not queued yet (loop thread only; see call()).
  std::vector<StagedRequest> staged_;
  std::mutex mu_;
  std::vector<std::pair<std::shared_ptr<void>, FuturePtr>> pending_;
  bool registered_ = false;  // touched on the loop's thread only
  int read_fd_ = -1, write_fd_ = -1;
};

FuturePtr AsyncBridge::call(PyBatcher& b, py::handle x, int priority, int64_t timeout_us,
                            py::object waiter) {
  FuturePtr f = b.make_request(x);
  attach(f, waiter);
  stage(b.core(), BatchCore::Staged{f, priority, timeout_us}, std::move(waiter));
  return f;
}

// ---------------------------------------------------------------- a native handler for the tests

// Doubles a float32 input (any trailing shape); `fail_rows` > 0 makes batches
// with exactly that many rows return one row too few.
class BatcherTestHandler : public infer::NativeHandler {
 public:
  BatcherTestHandler(int64_t bad_rows, bool gated) : bad_rows_(bad_rows), gated_(gated) {}
  void open_gate() {
    std::lock_guard<std::mutex> lock(gate_mu_);
    gate_open_ = true;
    gate_cv_.notify_all();
  }
  infer::HandlerOutput run(const ArrayView& batch) override {
    calls_.fetch_add(1);
    if (gated_) {
      // Test hook: wait (without the GIL) until a Python thread opens the gate.
      std::unique_lock<std::mutex> lock(gate_mu_);
      if (!gate_cv_.wait_for(lock, std::chrono::seconds(10), [this] { return gate_open_; })) {
        fail<std::runtime_error>("_BatcherTestHandler: the gate was not opened within 10 s");
      }
    }
    infer::HandlerOutput out;
    out.dtype = DType::F32;
    out.shape.assign(batch.shape.begin(), batch.shape.begin() + batch.ndim);
    if (bad_rows_ > 0 && batch.shape[0] == bad_rows_) out.shape[0] -= 1;
    const int64_t n = batch.size();
    out.buffer = Buffer::allocate(static_cast<size_t>(n) * sizeof(float));
    const float* src = batch.as<float>();
    float* dst = out.buffer->as<float>();
    for (int64_t i = 0; i < n; ++i) dst[i] = 2.0f * src[i];
    return out;
  }
  void check_input(const ArrayView& request, const char* name) const override {
    FASTML_CHECK_TYPE(request.dtype == DType::F32, name, "must be float32, got ",
                      request.describe());
  }
  std::string handler_name() const override { return "batcher_test_double"; }
  int64_t calls() const { return calls_.load(); }

 private:
  int64_t bad_rows_;
  bool gated_;
  std::atomic<int64_t> calls_{0};
  std::mutex gate_mu_;
  std::condition_variable gate_cv_;
  bool gate_open_ = false;
};

}  // namespace

void register_batcher(py::module_& m) {
  py::class_<RequestFuture, FuturePtr>(
      m, "BatchFuture",
      "The future of one Batcher request: the concurrent.futures.Future interface\n"
      "(result, exception, done, cancel, cancelled, running, add_done_callback),\n"
      "resolved natively. Use fastml.infer.wait / as_completed to wait on many.")
      .def("result", &future_result, py::arg("timeout") = py::none(),
           "The request's result; waits up to `timeout` seconds (None: no limit).\n"
           "Raises the request's error, CancelledError, or TimeoutError on timeout.")
      .def("exception", &future_exception, py::arg("timeout") = py::none(),
           "The request's error (None if it succeeded); waits like result().")
      .def("done", &RequestFuture::done, "True once the request ended (any outcome).")
      .def("running", &RequestFuture::running, "True while the request's batch runs.")
      .def("cancelled", &RequestFuture::cancelled, "True if the request was cancelled.")
      .def(
          "cancel", [](const FuturePtr& f) { return f->cancel(); },
          "Cancels the request if it has not started; True if it is (now) cancelled.")
      .def("add_done_callback", &future_add_done_callback, py::arg("fn"),
           "Calls fn(future) once the request ends (at once if it already has),\n"
           "on the thread that ends it, with the GIL held.")
      .def("__repr__", [](const FuturePtr& f) {
        static const char* names[] = {"pending", "running", "finished", "error", "cancelled"};
        return std::string("<BatchFuture ") + names[static_cast<int>(f->state())] + ">";
      });

  py::class_<PyBatcher>(m, "_BatcherCore", "Native core of fastml.infer.Batcher (private).")
      .def(py::init([](py::object fn, std::shared_ptr<infer::NativeHandler> native,
                       int64_t max_batch_size, int64_t max_delay_us, int64_t max_queue,
                       int64_t timeout_us, int workers, std::string name, int row_ndim,
                       int64_t spin_us) {
             infer::BatcherConfig c;
             c.max_batch_size = max_batch_size;
             c.max_delay_us = max_delay_us;
             c.max_queue = max_queue;
             c.timeout_us = timeout_us;
             c.workers = workers;
             c.name = std::move(name);
             c.spin_us = spin_us;
             return std::make_unique<PyBatcher>(std::move(fn), std::move(native), std::move(c),
                                                row_ndim);
           }),
           py::arg("fn"), py::arg("native"), py::arg("max_batch_size"), py::arg("max_delay_us"),
           py::arg("max_queue"), py::arg("timeout_us"), py::arg("workers"), py::arg("name"),
           py::arg("row_ndim") = -1, py::arg("spin_us") = 20)
      .def("submit", &PyBatcher::submit, py::arg("x"), py::arg("priority") = 0,
           py::arg("timeout_us") = -1, py::arg("block") = false, py::arg("block_timeout") = -1.0,
           py::arg("allow_inline") = false)
      .def(
          "call",
          [](PyBatcher& b, py::handle x, int priority, int64_t timeout_us,
             bool allow_inline) -> py::object {
            // predict()'s fast path: the result itself when the batch ran inline.
            FuturePtr f = b.submit(x, priority, timeout_us, false, -1.0, allow_inline);
            if (f->done()) return future_result(f, py::none());
            return py::cast(f);
          },
          py::arg("x"), py::arg("priority") = 0, py::arg("timeout_us") = -1,
          py::arg("allow_inline") = false)
      .def_property_readonly("row_ndim", &PyBatcher::row_ndim)
      .def("close", &PyBatcher::close, py::arg("drain") = true)
      .def("stats", &PyBatcher::stats)
      .def_property_readonly("closed", &PyBatcher::closed)
      .def_property_readonly("name", &PyBatcher::name);

  py::class_<AsyncBridge, std::shared_ptr<AsyncBridge>>(
      m, "_BatcherAsyncBridge", "Resolves asyncio futures of one loop (private).")
      .def(py::init<py::object>(), py::arg("loop"))
      .def("attach", &AsyncBridge::attach, py::arg("future"), py::arg("waiter"))
      .def("call", &AsyncBridge::call, py::arg("batcher"), py::arg("x"), py::arg("priority"),
           py::arg("timeout_us"), py::arg("waiter"))
      .def("_drain", &AsyncBridge::drain)
      .def("_flush", &AsyncBridge::flush);

  py::class_<BatcherTestHandler, infer::NativeHandler, std::shared_ptr<BatcherTestHandler>>(
      m, "_BatcherTestHandler", "Test-only native handler: doubles float32 input.")
      .def(py::init<int64_t, bool>(), py::arg("bad_rows") = 0, py::arg("gated") = false)
      .def_property_readonly("calls", &BatcherTestHandler::calls)
      .def("open_gate", &BatcherTestHandler::open_gate)
      .def("_fastml_native_handler",
           [](std::shared_ptr<BatcherTestHandler> h) -> std::shared_ptr<infer::NativeHandler> {
             return h;
           });
}

}  // namespace fastml::bind
