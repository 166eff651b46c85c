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
#include <structmember.h>
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
      array.owner.release().dec_ref();
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

// The awaitable that predict_async awaits: a small native object speaking
// asyncio's future protocol (what asyncio.Task looks for in what a coroutine
// yields: `_asyncio_future_blocking`, get_loop, add_done_callback, result,
// cancel), resolved by the loop's AsyncBridge. Against an asyncio.Future per
// request it saves the future and, above all, the loop.call_soon handle that
// Future.set_result schedules per waiting task: the bridge resolves a group
// of waiters in one loop callback and runs each task's wake-up there
// directly, in the task's context (it is a plain loop callback itself, so no
// other task is running). Callbacks added once the waiter is done, and those
// of a cancelled waiter, go through loop.call_soon like asyncio's.
//
// A raw CPython type (not pybind11): its methods are called several times per
// request by asyncio's C task, where pybind11's dispatch would cost more than
// the work.
struct AsyncWaiter {
  PyObject_HEAD PyObject* loop_ref;  // a weakref.ref to the loop (the bridge's): a closed
                                     // loop is not kept alive by its requests
  PyObject* cb0;                     // the first done callback (a task's wake-up) and its context
  PyObject* ctx0;
  PyObject* more;        // list of (callback, context) tuples after the first, or null
  PyObject* value;       // the result, or the exception instance
  PyObject* cancel_msg;  // cancel(msg)'s message, or null
  FuturePtr request;     // constructed in place; released once the waiter is done
  uint8_t state;         // WaiterState
  uint8_t blocking;      // _asyncio_future_blocking
  uint8_t yielded;       // the await yielded it once
};

enum WaiterState : uint8_t { kWaiting = 0, kHasResult = 1, kHasError = 2, kIsCancelled = 3 };

// Objects created once and never released (a static py::object would be
// released at process exit, after Python finalised).
struct AsyncNames {
  PyObject* cancelled_error;
  PyObject* invalid_state_error;
  PyObject* call_soon;
  PyObject* call_exception_handler;
  PyObject* context_kw;  // ("context",)
  PyObject* thread_id;
};
const AsyncNames& async_names() {
  static const AsyncNames* names = [] {
    py::module_ exc = py::module_::import("asyncio.exceptions");
    auto* n = new AsyncNames{py::object(exc.attr("CancelledError")).release().ptr(),
                             py::object(exc.attr("InvalidStateError")).release().ptr(),
                             PyUnicode_InternFromString("call_soon"),
                             PyUnicode_InternFromString("call_exception_handler"),
                             nullptr,
                             PyUnicode_InternFromString("_thread_id")};
    n->context_kw = Py_BuildValue("(s)", "context");
    return n;
  }();
  return *names;
}

PyTypeObject* async_waiter_type();

AsyncWaiter* new_async_waiter(PyObject* loop_ref, FuturePtr request) {
  AsyncWaiter* w = PyObject_GC_New(AsyncWaiter, async_waiter_type());
  if (w == nullptr) throw py::error_already_set();
  Py_INCREF(loop_ref);
  w->loop_ref = loop_ref;
  w->cb0 = w->ctx0 = w->more = w->value = w->cancel_msg = nullptr;
  new (&w->request) FuturePtr(std::move(request));
  w->state = kWaiting;
  w->blocking = 0;
  w->yielded = 0;
  PyObject_GC_Track(w);
  return w;
}

// The target of a weakref.ref (a new reference), or null once it is gone.
PyObject* weak_target(PyObject* ref) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* target = nullptr;
  if (PyWeakref_GetRef(ref, &target) < 0) PyErr_Clear();
  return target;
#else
  PyObject* target = PyWeakref_GetObject(ref);
  if (target == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  if (target == Py_None) return nullptr;
  Py_INCREF(target);
  return target;
#endif
}

// The waiter's loop (a new reference), or null once the loop is gone.
PyObject* waiter_loop(const AsyncWaiter* w) {
  return weak_target(w->loop_ref);
}

// Schedules `cb(w)` with loop.call_soon(cb, w, context=ctx) (steals cb, ctx).
// Errors are reported through sys.unraisablehook: the callers cannot fail.
void waiter_schedule(AsyncWaiter* w, PyObject* cb, PyObject* ctx) {
  PyObject* loop = waiter_loop(w);
  PyObject* meth = loop == nullptr ? nullptr : PyObject_GetAttr(loop, async_names().call_soon);
  Py_XDECREF(loop);
  if (meth != nullptr) {
    PyObject* args[3] = {cb, reinterpret_cast<PyObject*>(w), ctx};
    PyObject* r = (ctx != nullptr && ctx != Py_None)
                      ? PyObject_Vectorcall(meth, args, 2, async_names().context_kw)
                      : PyObject_Vectorcall(meth, args, 2, nullptr);
    Py_DECREF(meth);
    Py_XDECREF(r);
  }
  if (PyErr_Occurred()) PyErr_WriteUnraisable(cb);
  Py_DECREF(cb);
  Py_XDECREF(ctx);
}

// Takes the waiter's callbacks: [(cb, ctx), ...] with new references.
std::vector<std::pair<PyObject*, PyObject*>> waiter_take_callbacks(AsyncWaiter* w) {
  std::vector<std::pair<PyObject*, PyObject*>> cbs;
  if (w->cb0 != nullptr)
    cbs.emplace_back(std::exchange(w->cb0, nullptr), std::exchange(w->ctx0, nullptr));
  if (w->more != nullptr) {
    PyObject* more = std::exchange(w->more, nullptr);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(more); ++i) {
      PyObject* item = PyList_GET_ITEM(more, i);
      PyObject* cb = PyTuple_GET_ITEM(item, 0);
      PyObject* ctx = PyTuple_GET_ITEM(item, 1);
      Py_INCREF(cb);
      Py_INCREF(ctx);
      cbs.emplace_back(cb, ctx);
    }
    Py_DECREF(more);
  }
  return cbs;
}

// Runs `cb(w)` now, in `ctx` (steals both). Returns false with the error set
// when the callback raised.
bool waiter_run_callback(AsyncWaiter* w, PyObject* cb, PyObject* ctx) {
  const bool enter = ctx != nullptr && ctx != Py_None;
  bool ok = true;
  if (enter && PyContext_Enter(ctx) != 0) {
    ok = false;
  } else {
    PyObject* r = PyObject_CallOneArg(cb, reinterpret_cast<PyObject*>(w));
    ok = r != nullptr;
    Py_XDECREF(r);
    if (enter) {
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      if (PyContext_Exit(ctx) != 0) PyErr_Clear();
      PyErr_Restore(t, v, tb);
    }
  }
  Py_DECREF(cb);
  Py_XDECREF(ctx);
  return ok;
}

// Ends the waiter from its request's outcome and runs its callbacks now (on
// the loop's thread, from the bridge's drain, outside any task). An Exception
// from a callback goes to the loop's exception handler, as a handle's would;
// a BaseException (KeyboardInterrupt, SystemExit) is returned in `*raised`
// (the first one) for the caller to raise once every waiter is resolved.
void waiter_resolve(AsyncWaiter* w, PyObject** raised) {
  if (w->state != kWaiting) return;  // cancelled meanwhile
  FuturePtr f = std::move(w->request);
  w->request.reset();
  switch (f->state()) {
    case infer::FutureState::Finished:
      try {
        w->value = future_value(*f).release().ptr();
        w->state = kHasResult;
      } catch (py::error_already_set& e) {
        w->value = py::object(e.value()).release().ptr();
        w->state = kHasError;
      } catch (...) {
        py::detail::try_translate_exceptions();  // sets the Python error from the C++ one
        py::error_already_set e;
        w->value = py::object(e.value()).release().ptr();
        w->state = kHasError;
      }
      break;
    case infer::FutureState::Cancelled: w->state = kIsCancelled; break;
    default:
      w->value = future_exception(f, py::none()).release().ptr();
      w->state = kHasError;
      break;
  }
  for (auto [cb, ctx] : waiter_take_callbacks(w)) {
    if (waiter_run_callback(w, cb, ctx)) continue;
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
      if (*raised == nullptr) {
        PyObject *t, *tb;
        PyErr_Fetch(&t, raised, &tb);
        PyErr_NormalizeException(&t, raised, &tb);
        if (tb != nullptr) PyException_SetTraceback(*raised, tb);
        Py_XDECREF(t);
        Py_XDECREF(tb);
      } else {
        PyErr_Clear();
      }
      continue;
    }
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyObject* ctx_dict = Py_BuildValue("{s:s,s:O,s:O}", "message",
                                       "Exception in a done callback of a Batcher request",
                                       "exception", v, "future", reinterpret_cast<PyObject*>(w));
    if (ctx_dict != nullptr) {
      PyObject* loop = waiter_loop(w);
      PyObject* r = loop == nullptr ? nullptr
                                    : PyObject_CallMethodOneArg(
                                          loop, async_names().call_exception_handler, ctx_dict);
      Py_XDECREF(loop);
      Py_XDECREF(r);
      Py_DECREF(ctx_dict);
    }
    if (PyErr_Occurred()) PyErr_WriteUnraisable(reinterpret_cast<PyObject*>(w));
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
  }
}

// Sets the Python error the waiter's result() raises; false on success with
// `*out` set to a new reference to the value.
bool waiter_outcome(AsyncWaiter* w, PyObject** out) {
  switch (w->state) {
    case kHasResult:
      Py_INCREF(w->value);
      *out = w->value;
      return true;
    case kHasError:
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(w->value)), w->value);
      return false;
    case kIsCancelled:
      if (w->cancel_msg != nullptr) {
        PyErr_SetObject(async_names().cancelled_error, w->cancel_msg);
      } else {
        PyErr_SetNone(async_names().cancelled_error);
      }
      return false;
    default:
      PyErr_SetString(async_names().invalid_state_error, "Result is not ready.");
      return false;
  }
}

PyObject* waiter_result(PyObject* self, PyObject*) {
  PyObject* out = nullptr;
  return waiter_outcome(reinterpret_cast<AsyncWaiter*>(self), &out) ? out : nullptr;
}

PyObject* waiter_exception(PyObject* self, PyObject*) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  if (w->state == kHasError) {
    Py_INCREF(w->value);
    return w->value;
  }
  if (w->state == kHasResult) Py_RETURN_NONE;
  PyObject* out = nullptr;
  waiter_outcome(w, &out);
  return nullptr;
}

PyObject* waiter_done(PyObject* self, PyObject*) {
  return PyBool_FromLong(reinterpret_cast<AsyncWaiter*>(self)->state != kWaiting);
}

PyObject* waiter_cancelled(PyObject* self, PyObject*) {
  return PyBool_FromLong(reinterpret_cast<AsyncWaiter*>(self)->state == kIsCancelled);
}

PyObject* waiter_get_loop(PyObject* self, PyObject*) {
  PyObject* loop = waiter_loop(reinterpret_cast<AsyncWaiter*>(self));
  if (loop == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the event loop of this Batcher request is gone");
  }
  return loop;
}

// cancel(msg=None): cancels the request too if it has not started (one that
// runs finishes, its result unused). Callbacks are scheduled with call_soon:
// a task's cancel() calls this while another task may be running.
PyObject* waiter_cancel(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                        PyObject* kwnames) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  PyObject* msg = nargs > 0 ? args[0] : nullptr;
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  if (nargs + nkw > 1) {
    PyErr_SetString(PyExc_TypeError, "cancel() takes at most one argument (msg)");
    return nullptr;
  }
  if (nkw == 1) {
    if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "msg") != 0) {
      PyErr_Format(PyExc_TypeError, "cancel() got an unexpected keyword argument '%U'",
                   PyTuple_GET_ITEM(kwnames, 0));
      return nullptr;
    }
    msg = args[0];
  }
  if (w->state != kWaiting) Py_RETURN_FALSE;
  w->state = kIsCancelled;
  if (msg != nullptr && msg != Py_None) {
    Py_INCREF(msg);
    w->cancel_msg = msg;
  }
  FuturePtr f = std::move(w->request);
  w->request.reset();
  if (f) f->cancel();  // may end the request here: the bridge then drops it
  for (auto [cb, ctx] : waiter_take_callbacks(w)) waiter_schedule(w, cb, ctx);
  Py_RETURN_TRUE;
}

// add_done_callback(fn, *, context=None)
PyObject* waiter_add_done_callback(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                                   PyObject* kwnames) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  PyObject* fn = nargs > 0 ? args[0] : nullptr;
  PyObject* ctx = nullptr;
  for (Py_ssize_t i = 0; i < nkw; ++i) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, i);
    if (PyUnicode_CompareWithASCIIString(key, "context") == 0) {
      ctx = args[nargs + i];
    } else if (PyUnicode_CompareWithASCIIString(key, "fn") == 0 && fn == nullptr) {
      fn = args[nargs + i];
    } else {
      PyErr_Format(PyExc_TypeError, "add_done_callback() got an unexpected keyword argument '%U'",
                   key);
      return nullptr;
    }
  }
  if (fn == nullptr || nargs > 1) {
    PyErr_SetString(PyExc_TypeError, "add_done_callback() takes one positional argument (fn)");
    return nullptr;
  }
  if (ctx == nullptr || ctx == Py_None) {
    ctx = PyContext_CopyCurrent();
    if (ctx == nullptr) return nullptr;
  } else {
    Py_INCREF(ctx);
  }
  Py_INCREF(fn);
  if (w->state != kWaiting) {
    waiter_schedule(w, fn, ctx);
    Py_RETURN_NONE;
  }
  if (w->cb0 == nullptr) {
    w->cb0 = fn;
    w->ctx0 = ctx;
    Py_RETURN_NONE;
  }
  if (w->more == nullptr && (w->more = PyList_New(0)) == nullptr) {
    Py_DECREF(fn);
    Py_DECREF(ctx);
    return nullptr;
  }
  PyObject* item = PyTuple_Pack(2, fn, ctx);
  Py_DECREF(fn);
  Py_DECREF(ctx);
  if (item == nullptr) return nullptr;
  const int rc = PyList_Append(w->more, item);
  Py_DECREF(item);
  if (rc != 0) return nullptr;
  Py_RETURN_NONE;
}

// remove_done_callback(fn): how many were removed.
PyObject* waiter_remove_done_callback(PyObject* self, PyObject* fn) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  Py_ssize_t removed = 0;
  if (w->cb0 != nullptr) {
    const int eq = PyObject_RichCompareBool(w->cb0, fn, Py_EQ);
    if (eq < 0) return nullptr;
    if (eq) {
      Py_CLEAR(w->cb0);
      Py_CLEAR(w->ctx0);
      ++removed;
    }
  }
  if (w->more != nullptr) {
    PyObject* kept = PyList_New(0);
    if (kept == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(w->more); ++i) {
      PyObject* item = PyList_GET_ITEM(w->more, i);
      const int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(item, 0), fn, Py_EQ);
      if (eq < 0) {
        Py_DECREF(kept);
        return nullptr;
      }
      if (eq) {
        ++removed;
      } else if (PyList_Append(kept, item) != 0) {
        Py_DECREF(kept);
        return nullptr;
      }
    }
    Py_SETREF(w->more, kept);
  }
  return PyLong_FromSsize_t(removed);
}

// Iteration (what `await` drives): yields the waiter itself while it waits,
// then returns its result (StopIteration) or raises its error.
PyObject* waiter_iternext(PyObject* self) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  if (w->state == kWaiting) {
    if (w->yielded) {
      PyErr_SetString(PyExc_RuntimeError, "await wasn't used with future");
      return nullptr;
    }
    w->yielded = 1;
    w->blocking = 1;
    Py_INCREF(self);
    return self;
  }
  PyObject* value = nullptr;
  if (!waiter_outcome(w, &value)) return nullptr;
  // StopIteration(value) built explicitly: a tuple value must not become its args.
  PyObject* stop = PyObject_CallOneArg(PyExc_StopIteration, value);
  Py_DECREF(value);
  if (stop == nullptr) return nullptr;
  PyErr_SetObject(PyExc_StopIteration, stop);
  Py_DECREF(stop);
  return nullptr;
}

PyObject* waiter_self(PyObject* self) {
  Py_INCREF(self);
  return self;
}

PyObject* waiter_get_blocking(PyObject* self, void*) {
  return PyBool_FromLong(reinterpret_cast<AsyncWaiter*>(self)->blocking);
}

int waiter_set_blocking(PyObject* self, PyObject* value, void*) {
  if (value == nullptr) {
    PyErr_SetString(PyExc_AttributeError, "cannot delete _asyncio_future_blocking");
    return -1;
  }
  const int b = PyObject_IsTrue(value);
  if (b < 0) return -1;
  reinterpret_cast<AsyncWaiter*>(self)->blocking = static_cast<uint8_t>(b);
  return 0;
}

PyObject* waiter_get_loop_attr(PyObject* self, void*) {
  return waiter_get_loop(self, nullptr);
}

PyObject* waiter_repr(PyObject* self) {
  static const char* names[] = {"pending", "finished", "error", "cancelled"};
  return PyUnicode_FromFormat("<fastml Batcher request waiter %s>",
                              names[reinterpret_cast<AsyncWaiter*>(self)->state]);
}

int waiter_traverse(PyObject* self, visitproc visit, void* arg) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(w->loop_ref);
  Py_VISIT(w->cb0);
  Py_VISIT(w->ctx0);
  Py_VISIT(w->more);
  Py_VISIT(w->value);
  Py_VISIT(w->cancel_msg);
  return 0;
}

int waiter_clear(PyObject* self) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  Py_CLEAR(w->loop_ref);
  Py_CLEAR(w->cb0);
  Py_CLEAR(w->ctx0);
  Py_CLEAR(w->more);
  Py_CLEAR(w->value);
  Py_CLEAR(w->cancel_msg);
  return 0;
}

void waiter_dealloc(PyObject* self) {
  auto* w = reinterpret_cast<AsyncWaiter*>(self);
  PyTypeObject* type = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  waiter_clear(self);
  w->request.~FuturePtr();
  PyObject_GC_Del(self);
  Py_DECREF(type);
}

PyTypeObject* async_waiter_type() {
  static PyTypeObject* type = [] {
    static PyMethodDef methods[] = {
        {"result", waiter_result, METH_NOARGS, "The request's result (raises its error)."},
        {"exception", waiter_exception, METH_NOARGS, "The request's error, or None."},
        {"done", waiter_done, METH_NOARGS, "True once the request ended."},
        {"cancelled", waiter_cancelled, METH_NOARGS, "True if it was cancelled."},
        {"get_loop", waiter_get_loop, METH_NOARGS, "The event loop it belongs to."},
        {"cancel", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(waiter_cancel)),
         METH_FASTCALL | METH_KEYWORDS, "Cancels the request if it has not started."},
        {"add_done_callback",
         reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(waiter_add_done_callback)),
         METH_FASTCALL | METH_KEYWORDS, "Calls fn(waiter) once it is done."},
        {"remove_done_callback", waiter_remove_done_callback, METH_O,
         "Removes fn from the done callbacks; returns how many were removed."},
        {nullptr, nullptr, 0, nullptr}};
    static PyGetSetDef getset[] = {
        {"_asyncio_future_blocking", waiter_get_blocking, waiter_set_blocking, nullptr, nullptr},
        {"_loop", waiter_get_loop_attr, nullptr, nullptr, nullptr},
        {nullptr, nullptr, nullptr, nullptr, nullptr}};
    static PyType_Slot slots[] = {
        {Py_tp_dealloc, reinterpret_cast<void*>(waiter_dealloc)},
        {Py_tp_traverse, reinterpret_cast<void*>(waiter_traverse)},
        {Py_tp_clear, reinterpret_cast<void*>(waiter_clear)},
        {Py_tp_repr, reinterpret_cast<void*>(waiter_repr)},
        {Py_tp_iter, reinterpret_cast<void*>(waiter_self)},
        {Py_tp_iternext, reinterpret_cast<void*>(waiter_iternext)},
        {Py_am_await, reinterpret_cast<void*>(waiter_self)},
        {Py_tp_methods, methods},
        {Py_tp_getset, getset},
        {Py_tp_doc, const_cast<char*>("What Batcher.predict_async awaits (an asyncio-compatible "
                                      "future of one request).")},
        {0, nullptr}};
    static PyType_Spec spec = {"fastml._core._BatcherWaiter", sizeof(AsyncWaiter), 0,
                               Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, slots};
    PyObject* t = PyType_FromSpec(&spec);
    if (t == nullptr) throw py::error_already_set();
    return reinterpret_cast<PyTypeObject*>(t);  // never released
  }();
  return type;
}

class AsyncBridge;

// The callable the loop watches the bridge's pipe with. The loop drops it
// when it closes (or is freed): that is when the bridge lets go of its waiters.
struct BridgeReader {
  std::shared_ptr<AsyncBridge> bridge;
  explicit BridgeReader(std::shared_ptr<AsyncBridge> b) : bridge(std::move(b)) {}
  BridgeReader(const BridgeReader&) = delete;
  BridgeReader& operator=(const BridgeReader&) = delete;
  BridgeReader(BridgeReader&&) = default;
  ~BridgeReader();
};

// Resolves the waiters of one event loop when their requests end.
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
    // Waiters whose requests ended after the loop stopped draining.
    std::vector<PyObject*> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      left.swap(pending_);
    }
    // Requests staged on a loop that closed before its flush ran: never queued.
    for (auto& st : staged_) {
      st.request.future->cancel();
      left.push_back(std::exchange(st.waiter, nullptr));
    }
    if (left.empty() || !python_alive()) return;
    if (PyGILState_Check()) {
      for (PyObject* w : left) Py_DECREF(w);
    } else {
      for (PyObject* w : left) DeferredDecref::push(w);
    }
  }

  // predict_async's one call: checks `x`, makes its waiter and stages the
  // request; returns the waiter. Requests staged during one iteration of the
  // loop are queued together by flush(), which the first of them schedules
  // with loop.call_soon: one lock and one wake-up per group, so the workers
  // see whole batches instead of racing the loop for single requests. A full
  // queue or a closed batcher fails the request at flush (its await raises
  // QueueFull / RuntimeError), as at submit.
  py::object call(PyBatcher& b, py::handle x, int priority, int64_t timeout_us);

  // On the loop's thread: queues every staged request, each with the
  // listener that hands its waiter back here when it ends. A request whose
  // waiter was cancelled meanwhile already ended: its listener runs at once,
  // and the core skips it uncounted.
  void flush() {
    std::vector<StagedRequest> staged;
    staged.swap(staged_);
    const std::shared_ptr<void> self = shared_from_this();
    std::vector<BatchCore::Staged> group;
    for (size_t i = 0; i < staged.size();) {
      const std::shared_ptr<BatchCore> core = staged[i].core;
      group.clear();
      for (; i < staged.size() && staged[i].core == core; ++i) {
        // The listener owns the waiter's reference from here on.
        PyObject* w = std::exchange(staged[i].waiter, nullptr);
        staged[i].request.future->set_listener(&AsyncBridge::request_ended, self, w);
        group.push_back(std::move(staged[i].request));
      }
      core->enqueue_many(group);
    }
  }

  // With the GIL, when the loop dropped the bridge's reader (the loop closed or
  // was freed): waiters that ended or were staged are released now and later
  // ones as they end, so a closed loop is not kept alive by its tasks (the
  // waiters' done callbacks) through this bridge.
  void orphan() {
    std::vector<PyObject*> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      orphaned_ = true;
      left.swap(pending_);
    }
    for (auto& st : staged_) {
      st.request.future->cancel();
      left.push_back(std::exchange(st.waiter, nullptr));
    }
    staged_.clear();
    for (PyObject* w : left) Py_XDECREF(w);
  }

  // True when the bridge's loop is running on the calling thread (asyncio's
  // loops record their thread while they run). Cheaper than
  // asyncio.get_running_loop(), whose fork check is a getpid() system call
  // before Python 3.12.
  bool runs_on_this_thread() const {
    static PyObject* thread_id_name = PyUnicode_InternFromString("_thread_id");
    PyObject* loop = weak_target(loop_ref_obj());
    if (loop == nullptr) return false;
    PyObject* tid = nullptr;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyObject_GetOptionalAttr(loop, thread_id_name, &tid) < 0) PyErr_Clear();
#else
    if (_PyObject_LookupAttr(loop, thread_id_name, &tid) < 0) PyErr_Clear();
#endif
    bool yes;
    if (tid != nullptr && PyLong_Check(tid)) {
      yes = PyLong_AsUnsignedLong(tid) == PyThread_get_thread_ident();
      if (PyErr_Occurred()) {
        PyErr_Clear();
        yes = false;
      }
    } else {
      // Loops that do not record their thread (uvloop): ask asyncio.
      static PyObject* get_running = [] {
        return py::object(py::module_::import("asyncio.events").attr("_get_running_loop"))
            .release()
            .ptr();
      }();
      PyObject* running = PyObject_CallNoArgs(get_running);
      if (running == nullptr) PyErr_Clear();
      yes = running == loop;
      Py_XDECREF(running);
    }
    Py_XDECREF(tid);
    Py_DECREF(loop);
    return yes;
  }

  // On the loop's thread: resolves every waiter whose request ended, running
  // their tasks' wake-ups here.
  void drain() {
    if (read_fd_ >= 0) {
      char buf[64];
      while (::read(read_fd_, buf, sizeof buf) > 0) {
      }
    }
    std::vector<PyObject*> ready;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready.swap(pending_);
    }
    DeferredDecref::drain();
    PyObject* raised = nullptr;
    for (PyObject* w : ready) {
      waiter_resolve(reinterpret_cast<AsyncWaiter*>(w), &raised);
      Py_DECREF(w);
    }
    if (raised != nullptr) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(raised)), raised);
      Py_DECREF(raised);
      throw py::error_already_set();
    }
  }

 private:
  // The request listener (any thread, no GIL): hands the waiter (whose
  // reference the listener owned) to the loop.
  static void request_ended(std::shared_ptr<void>& owner, void* waiter, const FuturePtr&) {
    static_cast<AsyncBridge*>(owner.get())->completed(static_cast<PyObject*>(waiter));
  }

  void register_reader() {
    registered_ = true;
    int fds[2];
    if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return;
    py::object reader = py::cast(BridgeReader{shared_from_this()});
    try {
      py::object loop = held(loop_ref_)();
      loop.attr("add_reader")(fds[0], reader);
      read_fd_ = fds[0];
      write_fd_ = fds[1];
    } catch (py::error_already_set&) {  // no add_reader on this loop: the GIL path
      // Disarm the reader first: dropping it must not orphan the bridge.
      reader.cast<BridgeReader&>().bridge.reset();
      ::close(fds[0]);
      ::close(fds[1]);
    }
  }

  void completed(PyObject* waiter) {
    bool first, orphaned;
    {
      std::lock_guard<std::mutex> lock(mu_);
      orphaned = orphaned_;
      if (!orphaned) pending_.push_back(waiter);
      first = pending_.size() == 1;
    }
    if (orphaned) {  // the loop closed: nobody will resolve it
      if (!python_alive()) return;
      if (PyGILState_Check()) {
        Py_DECREF(waiter);
      } else {
        DeferredDecref::push(waiter);
      }
      return;
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
    std::vector<PyObject*> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped.swap(pending_);
    }
    for (PyObject* w : dropped) Py_DECREF(w);
  }

  struct StagedRequest {
    std::shared_ptr<BatchCore> core;
    BatchCore::Staged request;
    PyObject* waiter;  // owned reference, handed to the request's listener at flush
  };

  // Takes the reference to `waiter`.
  void stage(const std::shared_ptr<BatchCore>& core, BatchCore::Staged request, PyObject* waiter) {
    const bool first = staged_.empty();
    staged_.push_back(StagedRequest{core, std::move(request), waiter});
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

  PyObject* loop_ref_obj() const { return static_cast<PyRef*>(loop_ref_.get())->obj.ptr(); }

  std::shared_ptr<void> loop_ref_;     // a weakref.ref to the loop (PyRef: freed on any thread)
  std::vector<StagedRequest> staged_;  // checked, not queued yet (loop thread only)
  std::mutex mu_;
  std::vector<PyObject*> pending_;  // waiters whose requests ended (owned references)
  bool orphaned_ = false;           // under mu_: see orphan()
  bool registered_ = false;         // touched on the loop's thread only
  int read_fd_ = -1, write_fd_ = -1;
};

BridgeReader::~BridgeReader() {
  if (bridge && python_alive() && PyGILState_Check()) bridge->orphan();
}

py::object AsyncBridge::call(PyBatcher& b, py::handle x, int priority, int64_t timeout_us) {
  if (!registered_) register_reader();
  FuturePtr f = b.make_request(x);
  auto* w = new_async_waiter(loop_ref_obj(), f);
  py::object waiter = py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(w));
  Py_INCREF(w);  // the staged request's, then its listener's, until the request ends
  stage(b.core(), BatchCore::Staged{std::move(f), priority, timeout_us},
        reinterpret_cast<PyObject*>(w));
  return waiter;
}

// What predict_async calls per request: a batcher and its loop's bridge bound
// together, so a request costs one vectorcall (no pybind11 dispatch). Returns
// the request's waiter, or None when its loop is not running on the calling
// thread (predict_async then finds the running loop's bridge).
struct AsyncCaller {
  PyObject_HEAD vectorcallfunc vectorcall;
  PyObject* core_obj;  // the _BatcherCore (keeps `batcher` alive)
  PyBatcher* batcher;
  std::shared_ptr<AsyncBridge> bridge;  // constructed in place
};

PyObject* async_caller_call(PyObject* self, PyObject* const* args, size_t nargsf,
                            PyObject* kwnames) {
  auto* c = reinterpret_cast<AsyncCaller*>(self);
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs != 3 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError, "_BatcherAsyncCaller(x, priority, timeout_us)");
    return nullptr;
  }
  try {
    if (!c->bridge->runs_on_this_thread()) Py_RETURN_NONE;
    if (!PyLong_Check(args[1]) || PyBool_Check(args[1])) {
      PyErr_Format(PyExc_TypeError, "priority must be an int, got %s", Py_TYPE(args[1])->tp_name);
      return nullptr;
    }
    const long priority = PyLong_AsLong(args[1]);
    const long long timeout_us = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return nullptr;
    if (priority < std::numeric_limits<int>::min() || priority > std::numeric_limits<int>::max()) {
      PyErr_SetString(PyExc_OverflowError, "priority does not fit a C int");
      return nullptr;
    }
    return c->bridge->call(*c->batcher, args[0], static_cast<int>(priority), timeout_us)
        .release()
        .ptr();
  } catch (py::error_already_set& e) {
    e.restore();
    return nullptr;
  } catch (...) {
    py::detail::try_translate_exceptions();
    return nullptr;
  }
}

int async_caller_traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(reinterpret_cast<AsyncCaller*>(self)->core_obj);
  return 0;
}

int async_caller_clear(PyObject* self) {
  Py_CLEAR(reinterpret_cast<AsyncCaller*>(self)->core_obj);
  return 0;
}

void async_caller_dealloc(PyObject* self) {
  auto* c = reinterpret_cast<AsyncCaller*>(self);
  PyTypeObject* type = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  async_caller_clear(self);
  c->bridge.~shared_ptr();
  PyObject_GC_Del(self);
  Py_DECREF(type);
}

PyTypeObject* async_caller_type() {
  static PyTypeObject* type = [] {
    static PyMemberDef members[] = {
        {"__vectorcalloffset__", T_PYSSIZET,
         static_cast<Py_ssize_t>(offsetof(AsyncCaller, vectorcall)), READONLY, nullptr},
        {nullptr, 0, 0, 0, nullptr}};
    static PyType_Slot slots[] = {
        {Py_tp_dealloc, reinterpret_cast<void*>(async_caller_dealloc)},
        {Py_tp_traverse, reinterpret_cast<void*>(async_caller_traverse)},
        {Py_tp_clear, reinterpret_cast<void*>(async_caller_clear)},
        {Py_tp_call, reinterpret_cast<void*>(PyVectorcall_Call)},
        {Py_tp_members, members},
        {Py_tp_doc, const_cast<char*>("Batcher.predict_async's per-request call (private).")},
        {0, nullptr}};
    static PyType_Spec spec = {"fastml._core._BatcherAsyncCaller", sizeof(AsyncCaller), 0,
                               Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
                               slots};
    PyObject* t = PyType_FromSpec(&spec);
    if (t == nullptr) throw py::error_already_set();
    return reinterpret_cast<PyTypeObject*>(t);  // never released
  }();
  return type;
}

py::object make_async_caller(const std::shared_ptr<AsyncBridge>& bridge, py::handle core) {
  PyBatcher* batcher = core.cast<PyBatcher*>();
  AsyncCaller* c = PyObject_GC_New(AsyncCaller, async_caller_type());
  if (c == nullptr) throw py::error_already_set();
  c->vectorcall = async_caller_call;
  c->core_obj = core.inc_ref().ptr();
  c->batcher = batcher;
  new (&c->bridge) std::shared_ptr<AsyncBridge>(bridge);
  PyObject_GC_Track(c);
  return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(c));
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
      .def("call", &AsyncBridge::call, py::arg("batcher"), py::arg("x"), py::arg("priority"),
           py::arg("timeout_us"))
      .def("caller", &make_async_caller, py::arg("batcher"),
           "predict_async's per-request call for `batcher` on this bridge's loop.")
      .def("_drain", &AsyncBridge::drain)
      .def("_flush", &AsyncBridge::flush);

  py::class_<BridgeReader>(m, "_BatcherBridgeReader",
                           "What an event loop calls when a bridge's requests end (private).")
      .def("__call__", [](BridgeReader& r) { r.bridge->drain(); });

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
