// Bindings of the data area: the epoch order, the gather plan (columns,
// transforms, batch buffers) and the prefetching engine behind
// fastml.data.Loader.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/array.hpp"
#include "bindings/registry.hpp"
#include "common/errors.hpp"
#include "common/thread_pool.hpp"
#include "data/loader.hpp"
#include "data/shuffle.hpp"

namespace py = pybind11;

namespace fastml::bind {

namespace {

using data::GatherColumn;
using data::OpKind;
using data::TransformOp;

py::array_t<int64_t> vector_to_numpy(std::vector<int64_t>&& v) {
  auto buf = Buffer::allocate(v.size() * sizeof(int64_t));
  if (!v.empty()) std::memcpy(buf->data(), v.data(), v.size() * sizeof(int64_t));
  return to_numpy(buf, DType::I64, {static_cast<int64_t>(v.size())});
}

std::vector<double> as_doubles(py::handle obj, const char* name) {
  py::array_t<double, py::array::c_style | py::array::forcecast> a =
      py::module_::import("numpy").attr("asarray")(obj, "float64");
  return std::vector<double>(a.data(), a.data() + a.size());
}

// One output column: name, source dtype and row shape, transforms, output dtype.
struct ColumnPlan {
  std::string name;
  DType src_dtype;
  std::vector<int64_t> row_shape;
  data::TransformPlan plan;
  DType out_dtype;
  int64_t row_elements() const {
    int64_t n = 1;
    for (auto s : row_shape) n *= s;
    return n;
  }
};

// The columns of a loader and a pool of batch buffers for them.
class GatherPlan {
 public:
  GatherPlan(const py::list& specs, size_t pool_capacity) {
    for (py::handle h : specs) {
      auto t = h.cast<py::tuple>();
      ColumnPlan c;
      c.name = t[0].cast<std::string>();
      c.src_dtype = dtype_from_name(t[1].cast<std::string>());
      c.row_shape = t[2].cast<std::vector<int64_t>>();
      c.out_dtype = dtype_from_name(t[3].cast<std::string>());
      for (py::handle oh : t[4].cast<py::list>()) {
        auto o = oh.cast<py::tuple>();
        const std::string kind = o[0].cast<std::string>();
        TransformOp op;
        if (kind == "fillna") {
          op.kind = OpKind::FillNa;
          op.a = o[1].cast<double>();
        } else if (kind == "clip") {
          op.kind = OpKind::Clip;
          op.a = o[1].cast<double>();
          op.b = o[2].cast<double>();
        } else if (kind == "standardize") {
          op.kind = OpKind::Standardize;
          op.mean = as_doubles(o[1], "mean");
          op.scale = as_doubles(o[2], "std");
          const auto m = static_cast<size_t>(c.row_elements());
          FASTML_CHECK_ARG(op.mean.size() == 1 || op.mean.size() == m, "mean",
                           "must be a scalar or have one value per row element (", m,
                           ") of column '", c.name, "', got ", op.mean.size());
          FASTML_CHECK_ARG(op.scale.size() == op.mean.size(), "std",
                           "must have the same size as mean (", op.mean.size(), ") for column '",
                           c.name, "', got ", op.scale.size());
        } else {
          fail<std::invalid_argument>("transform kind must be fillna/clip/standardize, got '", kind,
                                      "'");
        }
        c.plan.ops.push_back(std::move(op));
      }
      cols_.push_back(std::move(c));
    }
    allocator_ = std::make_shared<data::PoolAllocator>(cols_.size(), pool_capacity);
  }

  const std::vector<ColumnPlan>& columns() const { return cols_; }
  std::shared_ptr<data::PoolAllocator> allocator() const { return allocator_; }

  // Views `arrays` (one per column, in order) as gather sources.
  std::vector<GatherColumn> bind_sources(const py::list& arrays, std::vector<BoundArray>& keep,
                                         int64_t* num_rows) const {
    FASTML_CHECK_ARG(arrays.size() == cols_.size(), "arrays", "must hold ", cols_.size(),
                     " columns, got ", arrays.size());
    std::vector<GatherColumn> out;
    int64_t n = -1;
    for (size_t c = 0; c < cols_.size(); ++c) {
      ArraySpec spec;
      spec.ndim = static_cast<int>(cols_[c].row_shape.size()) + 1;
      spec.dtypes = {cols_[c].src_dtype};
      spec.layout = Layout::MakeContiguous;
      keep.push_back(bind_array(arrays[c], cols_[c].name.c_str(), spec));
      const ArrayView& v = keep.back().view;
      for (size_t d = 0; d < cols_[c].row_shape.size(); ++d) {
        FASTML_CHECK_ARG(v.shape[d + 1] == cols_[c].row_shape[d], cols_[c].name.c_str(),
                         "must have rows of the planned shape, got ", v.describe());
      }
      if (n < 0) n = v.shape[0];
      FASTML_CHECK_ARG(v.shape[0] == n, cols_[c].name.c_str(), "must have ", n, " rows, got ",
                       v.shape[0]);
      GatherColumn g;
      g.src = v;
      g.plan = cols_[c].plan;
      g.out_dtype = cols_[c].out_dtype;
      out.push_back(std::move(g));
    }
    if (num_rows) *num_rows = n;
    return out;
  }

  // Batch b as a dict of NumPy arrays sharing the batch's buffers.
  py::dict to_dict(const data::Batch& b, int64_t row_offset = 0) const {
    py::dict d;
    for (size_t c = 0; c < cols_.size(); ++c) {
      std::vector<int64_t> shape{b.rows};
      shape.insert(shape.end(), cols_[c].row_shape.begin(), cols_[c].row_shape.end());
      d[py::str(cols_[c].name)] = to_numpy(b.buffers[c], cols_[c].out_dtype, shape);
    }
    return d;
  }

  // A batch with room for `capacity` rows, as a list of writable arrays.
  py::list acquire(int64_t capacity) const {
    FASTML_CHECK_ARG(capacity > 0, "capacity", "must be > 0, got ", capacity);
    data::Batch b;
    std::vector<GatherColumn> shapes(cols_.size());
    for (size_t c = 0; c < cols_.size(); ++c) {
      shapes[c].src.ndim = static_cast<int>(cols_[c].row_shape.size()) + 1;
      for (size_t d = 0; d < cols_[c].row_shape.size(); ++d)
        shapes[c].src.shape[d + 1] = cols_[c].row_shape[d];
      shapes[c].out_dtype = cols_[c].out_dtype;
    }
    allocator_->acquire(b, shapes, capacity);
    b.rows = capacity;
    py::list out;
    py::dict d = to_dict(b);
    for (const auto& c : cols_) out.append(d[py::str(c.name)]);
    return out;
  }

  // outs[c][offset : offset + len(indices)] = transform(arrays[c][indices]).
  void gather(const py::list& arrays, const py::handle& indices, const py::list& outs,
              int64_t offset) const {
    std::vector<BoundArray> keep;
    int64_t n = 0;
    auto srcs = bind_sources(arrays, keep, &n);
    ArraySpec ispec;
    ispec.ndim = 1;
    ispec.dtypes = {DType::I64};
    BoundArray idx = bind_array(indices, "indices", ispec);
    const int64_t k = idx.view.shape[0];
    FASTML_CHECK_ARG(outs.size() == cols_.size(), "outs", "must hold ", cols_.size(),
                     " arrays, got ", outs.size());
    std::vector<BoundArray> dsts;
    std::vector<char*> ptrs;
    for (size_t c = 0; c < cols_.size(); ++c) {
      ArraySpec ospec;
      ospec.ndim = static_cast<int>(cols_[c].row_shape.size()) + 1;
      ospec.dtypes = {cols_[c].out_dtype};
      ospec.layout = Layout::Contiguous;
      ospec.writable = true;
      dsts.push_back(bind_array(outs[c], "outs", ospec));
      const ArrayView& v = dsts.back().view;
      FASTML_CHECK_ARG(offset >= 0 && offset + k <= v.shape[0], "offset", "must leave room for ", k,
                       " rows in a batch of ", v.shape[0], ", got ", offset);
      ptrs.push_back(static_cast<char*>(v.data) + offset * srcs[c].out_row_bytes());
    }
    const int64_t* ip = idx.view.as<int64_t>();
    // Every Python object is converted and kept alive by `keep`, `idx` and
    // `dsts`; the gather touches only raw memory, so the GIL can go.
    py::gil_scoped_release release;
    ThreadPool::global().parallel_for(0, static_cast<int64_t>(srcs.size()), 1,
                                      [&](int64_t lo, int64_t hi) {
                                        for (int64_t c = lo; c < hi; ++c)
                                          data::gather_rows(srcs[c], ip, k, ptrs[c]);
                                      });
  }

 private:
  std::vector<ColumnPlan> cols_;
  std::shared_ptr<data::PoolAllocator> allocator_;
};

// The prefetching engine over in-memory columns (NumPy, .npy maps, Arrow).
class DataEngine {
 public:
  DataEngine(std::shared_ptr<GatherPlan> plan, const py::list& arrays, int64_t batch_size,
             int prefetch, int max_running)
      : plan_(std::move(plan)) {
    auto srcs = plan_->bind_sources(arrays, keep_, &num_rows_);
    FASTML_CHECK_ARG(num_rows_ > 0, "dataset", "must have at least one row, got ", num_rows_);
    engine_ = std::make_unique<data::Engine>(std::move(srcs), batch_size, prefetch, max_running,
                                             plan_->allocator());
  }

  int64_t num_rows() const { return num_rows_; }

  int64_t start(bool shuffle, uint64_t seed, uint64_t epoch, int64_t rank, int64_t world_size,
                bool drop_last, int64_t first_batch) {
    std::shared_ptr<const std::vector<int64_t>> rows;
    {
      // Pure computation on native memory (and waiting for old gathers).
      py::gil_scoped_release release;
      rows = std::make_shared<const std::vector<int64_t>>(
          data::epoch_rows(num_rows_, shuffle, seed, epoch, rank, world_size, drop_last));
      engine_->start(rows, drop_last, first_batch);
    }
    return engine_->num_batches();
  }

  py::object next() {
    data::Batch b;
    bool ok;
    {
      // Waiting touches only the engine's own state; workers never need the GIL.
      py::gil_scoped_release release;
      ok = engine_->next(b);
    }
    if (!ok) return py::none();
    return plan_->to_dict(b);
  }

  void stop() {
    py::gil_scoped_release release;  // waits for native gathers only
    engine_->stop();
  }

  py::dict stats() const {
    auto s = engine_->stats();
    py::dict d;
    d["batches"] = s.batches;
    d["rows"] = s.rows;
    d["bytes"] = s.bytes;
    d["wait_seconds"] = s.wait_seconds;
    d["worker_seconds"] = s.worker_seconds;
    d["batches_gathered"] = s.gathered;
    d["buffers_allocated"] = plan_->allocator()->allocated();
    d["buffers_reused"] = plan_->allocator()->reused();
    return d;
  }

 private:
  std::shared_ptr<GatherPlan> plan_;
  std::vector<BoundArray> keep_;  // the source arrays, alive while gathers run
  int64_t num_rows_ = 0;
  std::unique_ptr<data::Engine> engine_;
};

}  // namespace

void register_data(py::module_& m) {
  m.def(
      "data_permutation",
      [](int64_t n, uint64_t seed, uint64_t epoch, uint64_t stream) {
        FASTML_CHECK_ARG(n >= 0, "n", "must be >= 0, got ", n);
        std::vector<int64_t> out(static_cast<size_t>(n));
        data::permutation(n, seed, epoch, stream, out.data());
        return vector_to_numpy(std::move(out));
      },
      py::arg("n"), py::arg("seed"), py::arg("epoch"), py::arg("stream") = 0,
      "A permutation of range(n): SplitMix64 Fisher-Yates on (seed, epoch, stream).");
  m.def(
      "data_epoch_rows",
      [](int64_t n, bool shuffle, uint64_t seed, uint64_t epoch, int64_t rank, int64_t world_size,
         bool drop_last) {
        return vector_to_numpy(
            data::epoch_rows(n, shuffle, seed, epoch, rank, world_size, drop_last));
      },
      py::arg("n"), py::arg("shuffle"), py::arg("seed"), py::arg("epoch"), py::arg("rank"),
      py::arg("world_size"), py::arg("drop_last"), "The rows one rank reads in an epoch.");

  py::class_<GatherPlan, std::shared_ptr<GatherPlan>>(m, "DataGatherPlan")
      .def(py::init<const py::list&, size_t>(), py::arg("columns"), py::arg("pool_capacity"))
      .def("acquire", &GatherPlan::acquire, py::arg("capacity"))
      .def("gather", &GatherPlan::gather, py::arg("arrays"), py::arg("indices"), py::arg("outs"),
           py::arg("offset"))
      .def("buffers_allocated", [](const GatherPlan& p) { return p.allocator()->allocated(); })
      .def("buffers_reused", [](const GatherPlan& p) { return p.allocator()->reused(); });

  py::class_<DataEngine>(m, "DataEngine")
      .def(py::init<std::shared_ptr<GatherPlan>, const py::list&, int64_t, int, int>(),
           py::arg("plan"), py::arg("arrays"), py::arg("batch_size"), py::arg("prefetch"),
           py::arg("max_running"))
      .def_property_readonly("num_rows", &DataEngine::num_rows)
      .def("start", &DataEngine::start, py::arg("shuffle"), py::arg("seed"), py::arg("epoch"),
           py::arg("rank"), py::arg("world_size"), py::arg("drop_last"), py::arg("first_batch"))
      .def("next", &DataEngine::next)
      .def("stop", &DataEngine::stop)
      .def("stats", &DataEngine::stats);
}

}  // namespace fastml::bind
