// Bindings of the data area: the epoch order, the gather plan (columns,
// transforms, batch buffers) and the prefetching engine behind
// fastml.data.Loader.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings/array.hpp"
#include "bindings/registry.hpp"
#include "common/errors.hpp"
#include "common/mapped_file.hpp"
#include "common/thread_pool.hpp"
#include "cuda/data_copy.hpp"
#include "data/loader.hpp"
#include "data/parquet.hpp"
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
    cache_python_objects();
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
      const char* name = cols_[c].name.c_str();
      GatherColumn g;
      if (py::isinstance<py::tuple>(arrays[c])) {
        // A tuple of 1-D arrays: element e of each row from array e (a
        // feature column assembled from several Parquet columns).
        auto elems = py::reinterpret_borrow<py::tuple>(arrays[c]);
        const auto k = static_cast<int64_t>(elems.size());
        FASTML_CHECK_ARG(cols_[c].row_shape.size() == 1 && cols_[c].row_shape[0] == k && k > 0,
                         name, "was planned with rows of shape (",
                         cols_[c].row_shape.empty() ? 0 : cols_[c].row_shape[0],
                         ",), got a tuple of ", k, " arrays");
        ArraySpec pspec;
        pspec.ndim = 1;
        pspec.dtypes = {cols_[c].src_dtype};
        pspec.layout = Layout::MakeContiguous;
        int64_t rows = -1;
        for (py::handle e : elems) {
          keep.push_back(bind_array(e, name, pspec));
          const ArrayView& v = keep.back().view;
          FASTML_CHECK_ARG(rows < 0 || v.shape[0] == rows, name,
                           "arrays must have one length, got ", rows, " and ", v.shape[0]);
          rows = v.shape[0];
          g.parts.push_back(static_cast<const char*>(v.data));
        }
        g.src = ArrayView::contiguous(nullptr, cols_[c].src_dtype, {rows, k});
        if (n < 0) n = rows;
        FASTML_CHECK_ARG(rows == n, name, "must have ", n, " rows, got ", rows);
        g.plan = cols_[c].plan;
        g.out_dtype = cols_[c].out_dtype;
        out.push_back(std::move(g));
        continue;
      }
      // A column is one array, or a list of chunks used in place (Arrow record batches).
      const bool chunked = py::isinstance<py::list>(arrays[c]);
      py::list parts = chunked ? py::reinterpret_borrow<py::list>(arrays[c]) : py::list();
      if (!chunked) parts.append(arrays[c]);
      FASTML_CHECK_ARG(parts.size() > 0, name, "must have at least one chunk, got none");
      int64_t rows = 0;
      for (py::handle part : parts) {
        keep.push_back(bind_array(part, name, spec));
        const ArrayView& v = keep.back().view;
        for (size_t d = 0; d < cols_[c].row_shape.size(); ++d) {
          FASTML_CHECK_ARG(v.shape[d + 1] == cols_[c].row_shape[d], name,
                           "must have rows of the planned shape, got ", v.describe());
        }
        if (chunked) {
          g.chunks.push_back(static_cast<const char*>(v.data));
          g.chunk_starts.push_back(rows);
        } else {
          g.src = v;
        }
        rows += v.shape[0];
      }
      if (chunked) {
        g.chunk_starts.push_back(rows);
        g.src = keep.back().view;  // dtype and row shape
        g.src.shape[0] = rows;
        g.src.data = nullptr;
      }
      if (n < 0) n = rows;
      FASTML_CHECK_ARG(rows == n, name, "must have ", n, " rows, got ", rows);
      g.plan = cols_[c].plan;
      g.out_dtype = cols_[c].out_dtype;
      out.push_back(std::move(g));
    }
    if (num_rows) *num_rows = n;
    return out;
  }

  // Batch b as a dict of NumPy arrays sharing the batch's buffers.
  py::dict to_dict(const data::Batch& b) const {
    py::dict d;
    // One owner for all columns of the batch: its buffers go back to the pool
    // when the last array (or view) of the batch is gone.
    auto* holder = new std::vector<BufferPtr>(b.buffers);
    py::capsule owner(holder, [](void* p) { delete static_cast<std::vector<BufferPtr>*>(p); });
    std::vector<py::ssize_t> shape;
    for (size_t c = 0; c < cols_.size(); ++c) {
      const ColumnPlan& col = cols_[c];
      shape.assign(1, static_cast<py::ssize_t>(b.rows));
      shape.insert(shape.end(), col.row_shape.begin(), col.row_shape.end());
      d[names_[c]] = py::array(dtypes_[c], shape, b.ptrs[c], owner);
    }
    return d;
  }

  // Row shapes and output dtypes, for allocating batches outside the engine.
  std::vector<GatherColumn> out_shapes() const {
    std::vector<GatherColumn> shapes(cols_.size());
    for (size_t c = 0; c < cols_.size(); ++c) {
      shapes[c].src.ndim = static_cast<int>(cols_[c].row_shape.size()) + 1;
      for (size_t d = 0; d < cols_[c].row_shape.size(); ++d)
        shapes[c].src.shape[d + 1] = cols_[c].row_shape[d];
      shapes[c].out_dtype = cols_[c].out_dtype;
    }
    return shapes;
  }

  void cache_python_objects() {
    for (const auto& c : cols_) {
      names_.push_back(py::str(c.name));
      dtypes_.push_back(numpy_dtype(c.out_dtype));
    }
  }

 private:
  std::vector<ColumnPlan> cols_;
  std::vector<py::str> names_;  // cached: building a batch dict costs no lookups
  std::vector<py::dtype> dtypes_;
  std::shared_ptr<data::PoolAllocator> allocator_;
};

// Source columns bound once (e.g. one Parquet shuffle window), for many gathers.
struct DataSources {
  std::vector<BoundArray> keep;
  std::vector<GatherColumn> cols;
  int64_t num_rows = 0;
};

// The Parquet reader's batch assembly: the rows of a decoded window, in the
// order given by an index array, are appended to a stream of batches of
// `batch_size` rows. One call gathers every batch a slice of the window
// completes (one GIL release, one parallel_for over columns x batches), so
// no Python runs per batch; the last incomplete batch waits for the next
// call (it may continue from another window) or for flush().
class DataBatcher {
  // Source columns up to this size are read sequentially before their random
  // gathers (about half of a core's L2 on the machines we measured).
  static constexpr int64_t kWarmBytes = int64_t{512} << 10;

 public:
  DataBatcher(std::shared_ptr<GatherPlan> plan, int64_t batch_size)
      : plan_(std::move(plan)), batch_size_(batch_size), shapes_(plan_->out_shapes()) {
    FASTML_CHECK_ARG(batch_size > 0, "batch_size", "must be > 0, got ", batch_size);
  }

  int64_t batch_size() const { return batch_size_; }
  int64_t pending() {
    py::gil_scoped_release release;  // mutex_ is only ever taken without the GIL
    std::lock_guard<std::mutex> lock(mutex_);
    return filled_;
  }

  // Appends transform(src rows `indices`); returns the batches this completes.
  // `streams`: the indices read each source column as a few ascending runs
  // interleaved (a window stored in shuffled order, see the Parquet reader):
  // the hardware prefetchers follow them, so rows are read without software
  // prefetches, as from a column in cache.
  py::list feed(const DataSources& src, const py::handle& indices, bool streams) {
    ArraySpec ispec;
    ispec.ndim = 1;
    ispec.dtypes = {DType::I64};
    BoundArray idx = bind_array(indices, "indices", ispec);
    const int64_t k = idx.view.shape[0];
    const int64_t* ip = idx.view.as<int64_t>();
    const auto& cols = src.cols;
    FASTML_CHECK_ARG(cols.size() == shapes_.size(), "sources", "must hold ", shapes_.size(),
                     " columns, got ", cols.size());
    for (size_t c = 0; c < cols.size(); ++c) {
      FASTML_CHECK_ARG(cols[c].out_row_bytes() == shapes_[c].out_row_bytes(), "sources",
                       "must come from this batcher's plan (column ", c, " differs)");
    }
    std::vector<data::Batch> done;
    {
      // `src` and `idx` keep every array alive; the gathers touch only raw
      // memory and pooled buffers, so the GIL can go while the pool works.
      // mutex_ serialises feeds on one batcher (its open batch); it is taken
      // and dropped without the GIL, so it never waits on a thread that
      // waits for the GIL.
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      for (int64_t j = 0; j < k; ++j) {
        if (static_cast<uint64_t>(ip[j]) >= static_cast<uint64_t>(src.num_rows)) {
          fail<std::out_of_range>("indices: row index ", ip[j], " out of range for ", src.num_rows,
                                  " rows");
        }
      }
      // Segments: (batch, first row in it, first index, rows).
      struct Segment {
        data::Batch* batch;
        int64_t offset, start, len;
      };
      std::vector<data::Batch> fresh;
      fresh.reserve(static_cast<size_t>(k / batch_size_ + 2));  // Segments point into it
      std::vector<Segment> segs;
      int64_t pos = 0;
      bool use_current = filled_ > 0;
      while (pos < k) {
        data::Batch* b;
        int64_t offset;
        if (use_current) {
          b = &current_;
          offset = filled_;
          use_current = false;
        } else {
          fresh.emplace_back();
          plan_->allocator()->acquire(fresh.back(), shapes_, batch_size_);
          b = &fresh.back();
          offset = 0;
        }
        const int64_t take = std::min(batch_size_ - offset, k - pos);
        segs.push_back({b, offset, pos, take});
        pos += take;
      }
      const auto num_segs = static_cast<int64_t>(segs.size());
      const auto num_cols = static_cast<int64_t>(cols.size());
      // Tasks are (column, run of segments), column-major: a task reads one
      // source column, which is first pulled into this core's cache by a
      // sequential pass when it is small enough to stay there; the random
      // reads of the gathers then hit the cache. Columns are split into
      // several runs only when there are too few columns to keep the pool busy.
      const int64_t threads = ThreadPool::global().num_threads();
      const int64_t parts = std::clamp<int64_t>((2 * threads + num_cols - 1) / num_cols, 1,
                                                std::max<int64_t>(num_segs, 1));
      const int64_t per_part = (num_segs + parts - 1) / parts;
      ThreadPool::global().parallel_for(0, num_cols * parts, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo; t < hi; ++t) {
          const auto c = static_cast<size_t>(t / parts);
          const int64_t s0 = (t % parts) * per_part;
          const int64_t s1 = std::min(num_segs, s0 + per_part);
          const bool cached = streams || (parts == 1 && data::warm_column(cols[c], kWarmBytes));
          for (int64_t si = s0; si < s1; ++si) {
            const Segment& s = segs[static_cast<size_t>(si)];
            char* dst = static_cast<char*>(s.batch->ptrs[c]) + s.offset * cols[c].out_row_bytes();
            data::gather_rows(cols[c], ip + s.start, s.len, dst, false, cached);
          }
        }
      });
      // Completed batches in order; the last segment's batch may stay open.
      for (const Segment& s : segs) {
        const int64_t end = s.offset + s.len;
        if (end == batch_size_) {
          s.batch->rows = batch_size_;
          done.push_back(std::move(*s.batch));
          if (s.batch == &current_) current_ = data::Batch();
          filled_ = 0;
        } else {
          if (s.batch != &current_) current_ = std::move(*s.batch);
          filled_ = end;
        }
      }
    }
    py::list out;
    for (const auto& b : done) out.append(plan_->to_dict(b));
    return out;
  }

  // The incomplete batch, if any (None otherwise); the stream starts afresh.
  py::object flush() {
    data::Batch b;
    {
      py::gil_scoped_release release;  // see feed()
      std::lock_guard<std::mutex> lock(mutex_);
      if (filled_ > 0) {
        current_.rows = filled_;
        b = std::move(current_);
        current_ = data::Batch();
        filled_ = 0;
      }
    }
    if (b.rows == 0) return py::none();
    return plan_->to_dict(b);
  }

 private:
  std::shared_ptr<GatherPlan> plan_;
  int64_t batch_size_;
  std::vector<GatherColumn> shapes_;
  std::mutex mutex_;
  data::Batch current_;  // rows [0, filled_) gathered
  int64_t filled_ = 0;
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

  // Starts an epoch; returns its token for next() (see data::Engine::start).
  uint64_t start(bool shuffle, uint64_t seed, uint64_t epoch, int64_t rank, int64_t world_size,
                 bool drop_last, int64_t first_batch) {
    const RowsKey key{shuffle, seed, epoch, rank, world_size, drop_last};
    uint64_t token;
    {
      // Pure computation on native memory (and waiting for old gathers).
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> guard(start_mutex_);  // ahead_ is shared by start() calls
      std::shared_ptr<const std::vector<int64_t>> rows;
      if (ahead_.valid() && ahead_key_ == key) {
        rows = ahead_.get();
      } else {
        rows = std::make_shared<const std::vector<int64_t>>(
            data::epoch_rows(num_rows_, shuffle, seed, epoch, rank, world_size, drop_last));
      }
      ahead_ = {};
      token = engine_->start(rows, drop_last, first_batch);
      // The next epoch's order is computed on the pool while this one runs,
      // so an epoch boundary does not stall the consumer.
      RowsKey next = key;
      next.epoch = epoch + 1;
      ahead_key_ = next;
      auto promise = std::make_shared<std::promise<RowsPtr>>();
      ahead_ = promise->get_future().share();
      const int64_t n = num_rows_;
      ThreadPool::global().submit([promise, next, n] {
        try {
          promise->set_value(std::make_shared<const std::vector<int64_t>>(data::epoch_rows(
              n, next.shuffle, next.seed, next.epoch, next.rank, next.world_size, next.drop_last)));
        } catch (...) {
          promise->set_exception(std::current_exception());
        }
      });
    }
    return token;
  }

  // Starts an epoch over explicit rows (an elastic resume's share of the rest
  // of an epoch, see fastml/data/_elastic.py); returns its token for next().
  uint64_t start_rows(const py::handle& rows, bool drop_last, int64_t first_batch) {
    ArraySpec spec;
    spec.ndim = 1;
    spec.dtypes = {DType::I64};
    BoundArray bound = bind_array(rows, "rows", spec);
    const int64_t m = bound.view.shape[0];
    const int64_t* r = bound.view.as<int64_t>();
    auto owned = std::make_shared<std::vector<int64_t>>(r, r + m);
    for (int64_t i = 0; i < m; ++i) {
      FASTML_CHECK_ARG((*owned)[i] >= 0 && (*owned)[i] < num_rows_, "rows", "must be in [0, ",
                       num_rows_, "), got ", (*owned)[i], " at index ", i);
    }
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> guard(start_mutex_);
    return engine_->start(std::move(owned), drop_last, first_batch);
  }

  // The next batch of the epoch `token` names; None at its end, or once a
  // newer epoch has started (an old iteration never takes a new one's batch).
  py::object next(uint64_t token) {
    data::Batch b;
    bool ok;
    {
      // Waiting touches only the engine's own state; workers never need the GIL.
      py::gil_scoped_release release;
      ok = engine_->next(b, token);
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

  using RowsPtr = std::shared_ptr<const std::vector<int64_t>>;
  struct RowsKey {
    bool shuffle;
    uint64_t seed, epoch;
    int64_t rank, world_size;
    bool drop_last;
    bool operator==(const RowsKey& o) const {
      return shuffle == o.shuffle && seed == o.seed && epoch == o.epoch && rank == o.rank &&
             world_size == o.world_size && drop_last == o.drop_last;
    }
  };
  RowsKey ahead_key_{};
  std::shared_future<RowsPtr> ahead_;  // the order of the epoch after the current one
  std::mutex start_mutex_;
};

// The byte span that holds every array of a batch: (start address, size,
// each array's offset from the start). Batches of a one-buffer plan (see
// PoolAllocator::batch_layout) are one such span, so a batch reaches a device
// in one copy and its tensors are views of one device buffer.
struct BatchSpan {
  uintptr_t start = 0;
  size_t nbytes = 0;   // the span, padding between arrays included
  size_t payload = 0;  // the arrays' own bytes
  std::vector<size_t> offsets;
};

BatchSpan batch_span(const py::list& arrays) {
  BatchSpan s;
  FASTML_CHECK_ARG(arrays.size() > 0, "arrays", "must hold at least one array");
  std::vector<uintptr_t> begin;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (py::handle a : arrays) {
    ArraySpec spec;
    spec.layout = Layout::Contiguous;
    BoundArray b = bind_array(a, "arrays", spec);
    const auto p = reinterpret_cast<uintptr_t>(b.view.data);
    begin.push_back(p);
    lo = std::min(lo, p);
    hi = std::max(hi, p + static_cast<uintptr_t>(b.view.nbytes()));
    s.payload += static_cast<size_t>(b.view.nbytes());
  }
  s.start = lo;
  s.nbytes = static_cast<size_t>(hi - lo);
  for (uintptr_t p : begin) s.offsets.push_back(static_cast<size_t>(p - lo));
  return s;
}

// Page-locked address ranges [lo, hi) of one stager's buffers. Shared with the
// buffers' deleters, which may run after the stager is gone.
class PinnedRanges {
 public:
  void add(uintptr_t lo, uintptr_t hi) {
    std::lock_guard<std::mutex> lock(m_);
    ranges_[lo] = hi;
  }
  void remove(uintptr_t lo) {
    std::lock_guard<std::mutex> lock(m_);
    ranges_.erase(lo);
  }
  // Whether [lo, hi) lies inside one registered range.
  bool contains(uintptr_t lo, uintptr_t hi) {
    std::lock_guard<std::mutex> lock(m_);
    auto it = ranges_.upper_bound(lo);
    if (it == ranges_.begin()) return false;
    --it;
    return lo >= it->first && hi <= it->second;
  }

 private:
  std::mutex m_;
  std::map<uintptr_t, uintptr_t> ranges_;
};

// device="cuda": batches are gathered into page-locked pool buffers, one
// buffer per batch holding every column, and copied to device memory in one
// transfer per batch on a dedicated stream, ordered after the consumer
// stream's earlier work and before its later work, with an event per copy so
// a staging buffer is recycled only after its copy has finished.
class CudaStager {
 public:
  CudaStager(std::shared_ptr<GatherPlan> plan, int device, int max_inflight)
      : device_(device), max_inflight_(max_inflight) {
    FASTML_CHECK_ARG(max_inflight >= 1, "max_inflight", "must be >= 1, got ", max_inflight);
    stream_ = cuda::stream_create(device);
    // Pinned buffers: the allocator pads every buffer to whole pages of its
    // own and starts the rows on a page boundary; exactly those pages are
    // registered, so no two registrations share a page.
    constexpr size_t kPage = 4096;
    plan->allocator()->set_allocate(
        [pinned = pinned_](size_t nbytes) {
          auto* b = new Buffer(nbytes);
          const auto addr = reinterpret_cast<uintptr_t>(b->data());
          const uintptr_t lo = (addr + kPage - 1) / kPage * kPage;
          const uintptr_t hi = (addr + nbytes) / kPage * kPage;
          try {
            cuda::host_register(reinterpret_cast<void*>(lo), hi - lo);
          } catch (...) {
            delete b;
            throw;
          }
          pinned->add(lo, hi);
          return BufferPtr(b, [pinned, lo](Buffer* p) {
            pinned->remove(lo);
            cuda::host_unregister(reinterpret_cast<void*>(lo));
            delete p;
          });
        },
        kPage, /*one_buffer=*/true);
  }
  ~CudaStager() {
    try {
      close();
    } catch (...) {
      // Destructors never throw; close() reported errors to callers that asked.
    }
  }

  // (start, nbytes, payload, offsets) of the span holding `arrays` when it
  // lies in one page-locked buffer of this stager (a batch of its plan), else
  // None (then copy() column by column).
  py::object span(const py::list& arrays) {
    BatchSpan s = batch_span(arrays);
    if (!pinned_->contains(s.start, s.start + s.nbytes)) return py::none();
    return py::make_tuple(s.start, s.nbytes, s.payload, s.offsets);
  }

  // dst (a device pointer) <- the pinned span [start, start + nbytes) that
  // span() returned for `arrays` (`payload` bytes of them), in one copy;
  // `arrays` is held until it ends.
  void copy_span(const py::list& arrays, uintptr_t start, size_t nbytes, size_t payload,
                 uintptr_t dst, uintptr_t consumer_stream) {
    FASTML_CHECK_ARG(!closed_, "stager", "is closed");
    FASTML_CHECK_ARG(pinned_->contains(start, start + nbytes), "start",
                     "must be a span that span() returned (a pinned batch of this loader)");
    enqueue(arrays, consumer_stream, [&] {
      cuda::memcpy_h2d_async(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(start),
                             nbytes, stream_);
      bytes_ += static_cast<int64_t>(payload);
      span_bytes_ += static_cast<int64_t>(nbytes);
      ++transfers_;
    });
  }

  // dsts[i] (device pointers) <- arrays[i], one copy per array.
  void copy(const py::list& arrays, const std::vector<uintptr_t>& dsts, uintptr_t consumer_stream) {
    FASTML_CHECK_ARG(!closed_, "stager", "is closed");
    FASTML_CHECK_ARG(arrays.size() == dsts.size(), "dsts", "must hold ", arrays.size(),
                     " pointers, got ", dsts.size());
    std::vector<BoundArray> srcs;
    for (py::handle a : arrays) {
      ArraySpec spec;
      spec.layout = Layout::Contiguous;
      srcs.push_back(bind_array(a, "arrays", spec));
    }
    enqueue(arrays, consumer_stream, [&] {
      for (size_t i = 0; i < srcs.size(); ++i) {
        const auto nbytes = static_cast<size_t>(srcs[i].view.nbytes());
        cuda::memcpy_h2d_async(reinterpret_cast<void*>(dsts[i]), srcs[i].view.data, nbytes,
                               stream_);
        bytes_ += static_cast<int64_t>(nbytes);
        span_bytes_ += static_cast<int64_t>(nbytes);
        ++transfers_;
      }
    });
  }

  py::dict stats() {
    py::dict d;
    d["h2d_copies"] = copies_;            // batches
    d["h2d_transfers"] = transfers_;      // cudaMemcpyAsync calls: one per batch on the span path
    d["h2d_bytes"] = bytes_;              // the batches' bytes
    d["h2d_copied_bytes"] = span_bytes_;  // with the padding between columns copied along
    d["h2d_waits"] = waits_;
    d["h2d_inflight"] = static_cast<int64_t>(inflight_.size());
    return d;
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    while (!inflight_.empty()) {
      {
        py::gil_scoped_release release;
        cuda::event_synchronize(inflight_.front().done);
      }
      retire_front();
    }
    for (void* e : free_events_) cuda::event_destroy(e);
    free_events_.clear();
    cuda::stream_destroy(stream_);
    stream_ = nullptr;
  }

 private:
  struct InFlight {
    void* ready = nullptr;
    void* done = nullptr;
    py::object hold;
  };

  // Runs `copies` (which queue work on stream_) between an event recorded on
  // the consumer's stream and one the consumer's stream then waits for;
  // `hold` (the staging arrays) stays referenced until they finish.
  template <typename F>
  void enqueue(const py::list& hold, uintptr_t consumer_stream, F&& copies) {
    reap();
    auto* consumer = reinterpret_cast<void*>(consumer_stream);
    InFlight f;
    f.ready = take_event();
    f.done = take_event();
    // Our stream starts after the consumer's earlier work (the destination
    // memory may have been freed and reused on that stream).
    cuda::event_record(f.ready, consumer);
    cuda::stream_wait_event(stream_, f.ready);
    copies();
    cuda::event_record(f.done, stream_);
    cuda::stream_wait_event(consumer, f.done);
    f.hold = hold;  // the staging buffers stay referenced until the copy ends
    inflight_.push_back(std::move(f));
    ++copies_;
    while (static_cast<int>(inflight_.size()) > max_inflight_) {
      void* ev = inflight_.front().done;
      {
        py::gil_scoped_release release;  // waits on the GPU only
        cuda::event_synchronize(ev);
      }
      ++waits_;
      retire_front();
    }
  }

  void* take_event() {
    if (!free_events_.empty()) {
      void* e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
    return cuda::event_create(device_);
  }

  void retire_front() {
    InFlight& f = inflight_.front();
    free_events_.push_back(f.ready);
    free_events_.push_back(f.done);
    inflight_.pop_front();  // drops `hold`: the pool may now reuse those buffers
  }

  void reap() {
    while (!inflight_.empty() && cuda::event_query(inflight_.front().done)) retire_front();
  }

  int device_;
  int max_inflight_;
  std::shared_ptr<PinnedRanges> pinned_ = std::make_shared<PinnedRanges>();
  void* stream_ = nullptr;
  bool closed_ = false;
  std::deque<InFlight> inflight_;
  std::vector<void*> free_events_;
  int64_t copies_ = 0, transfers_ = 0, bytes_ = 0, span_bytes_ = 0, waits_ = 0;
};

// The Parquet reader's decode step: column chunks of memory-mapped files into
// caller-owned arrays, all chunks in one parallel_for with the GIL released.
// `chunks` rows: (file, offset, size, physical_type, codec, num_values,
// max_def_level, max_rep_level); outs[i] receives chunk i. Returns one
// (status, message) per chunk: 0 decoded, 1 unsupported here (the caller
// reads it with pyarrow), 2 corrupt, 3 nulls in a column without NaN.
py::list parquet_decode(const std::vector<std::shared_ptr<MappedFile>>& files,
                        const py::handle& chunks, const py::list& outs, const py::object& perms) {
  ArraySpec cspec;
  cspec.ndim = 2;
  cspec.dtypes = {DType::I64};
  BoundArray c = bind_array(chunks, "chunks", cspec);
  FASTML_CHECK_ARG(c.view.shape[1] == 8, "chunks", "must have 8 columns, got ", c.view.shape[1]);
  const int64_t k = c.view.shape[0];
  FASTML_CHECK_ARG(static_cast<int64_t>(outs.size()) == k, "outs",
                   "must hold one array per chunk (", k, "), got ", outs.size());
  const int64_t* t = c.view.as<int64_t>();
  std::vector<BoundArray> keep;
  std::vector<data::parquet::ChunkSpec> specs(static_cast<size_t>(k));
  std::vector<void*> dst(static_cast<size_t>(k));
  ArraySpec ospec;
  ospec.ndim = 1;
  ospec.layout = Layout::Contiguous;
  ospec.writable = true;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t* r = t + i * 8;
    FASTML_CHECK_ARG(r[0] >= 0 && r[0] < static_cast<int64_t>(files.size()), "chunks", "row ", i,
                     " names file ", r[0], " of ", files.size());
    const MappedFile& f = *files[static_cast<size_t>(r[0])];
    if (r[1] < 0 || r[2] < 0 || r[1] > f.size() || r[2] > f.size() - r[1]) {
      fail<IOError>("'", f.path(), "': column chunk at bytes ", r[1], "..", r[1] + r[2],
                    " lies outside the file (", f.size(), " bytes)");
    }
    auto& s = specs[static_cast<size_t>(i)];
    s.data = f.data() + r[1];
    s.size = r[2];
    s.physical_type = static_cast<int>(r[3]);
    s.codec = static_cast<int>(r[4]);
    s.num_values = r[5];
    s.max_def_level = static_cast<int>(r[6]);
    s.max_rep_level = static_cast<int>(r[7]);
    keep.push_back(bind_array(outs[static_cast<size_t>(i)], "outs", ospec));
    const ArrayView& v = keep.back().view;
    const auto size = static_cast<int64_t>(v.itemsize());
    s.out_size = static_cast<int>(size);
    FASTML_CHECK_ARG(
        s.num_values >= 0 && s.num_values <= v.nbytes() / size && v.nbytes() == s.num_values * size,
        "outs", "[", i, "] has ", v.nbytes(), " bytes for a chunk of ", s.num_values, " values of ",
        size, " bytes");
    dst[static_cast<size_t>(i)] = v.data;
  }
  {
    // The chunks are decoded in parallel: their outputs must not overlap.
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    for (int64_t i = 0; i < k; ++i) {
      const auto a = reinterpret_cast<uintptr_t>(dst[static_cast<size_t>(i)]);
      spans.emplace_back(a, a + static_cast<uintptr_t>(keep[static_cast<size_t>(i)].view.nbytes()));
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) {
      FASTML_CHECK_ARG(spans[i].first >= spans[i - 1].second, "outs",
                       "arrays overlap (each chunk needs memory of its own)");
    }
  }
  // perms[i] (optional): chunk i is stored in that order, out[j] = value[perm[j]]
  // (decoded into scratch first, then permuted while it is in cache).
  std::vector<const int64_t*> perm(static_cast<size_t>(k), nullptr);
  if (!perms.is_none()) {
    auto pl = perms.cast<py::list>();
    FASTML_CHECK_ARG(static_cast<int64_t>(pl.size()) == k, "perms",
                     "must hold one entry per chunk (", k, "), got ", pl.size());
    ArraySpec pspec;
    pspec.ndim = 1;
    pspec.dtypes = {DType::I64};
    pspec.layout = Layout::Contiguous;
    for (int64_t i = 0; i < k; ++i) {
      const py::handle h = pl[static_cast<size_t>(i)];
      if (h.is_none()) continue;
      keep.push_back(bind_array(h, "perms", pspec));
      const ArrayView& v = keep.back().view;
      const int64_t n = specs[static_cast<size_t>(i)].num_values;
      FASTML_CHECK_ARG(v.shape[0] == n, "perms", "[", i, "] must hold ", n, " entries, got ",
                       v.shape[0]);
      const int64_t* p = v.as<int64_t>();
      if (std::find(perm.begin(), perm.begin() + i, p) == perm.begin() + i) {
        // One order usually serves every column of a row group: checked once.
        for (int64_t j = 0; j < n; ++j) {
          FASTML_CHECK_ARG(p[j] >= 0 && p[j] < n, "perms", "[", i, "] holds ", p[j],
                           ", outside 0..", n - 1);
        }
      }
      perm[static_cast<size_t>(i)] = p;
    }
  }
  std::vector<int> status(static_cast<size_t>(k), 0);
  std::vector<std::string> message(static_cast<size_t>(k));
  {
    py::gil_scoped_release release;  // `files` and `keep` hold the memory
    ThreadPool::global().parallel_for(0, k, 1, [&](int64_t lo, int64_t hi) {
      thread_local std::vector<char> scratch;
      for (int64_t i = lo; i < hi; ++i) {
        const auto u = static_cast<size_t>(i);
        try {
          if (perm[u] != nullptr) {
            const int64_t size = specs[u].out_size, n = specs[u].num_values;
            scratch.resize(static_cast<size_t>(n * size));
            data::parquet::decode_column_chunk(specs[u], scratch.data());
            data::permute_values(scratch.data(), perm[u], n, size, dst[u]);
            continue;
          }
          data::parquet::decode_column_chunk(specs[u], dst[u]);
        } catch (const data::parquet::Unsupported& e) {
          status[u] = 1;
          message[u] = e.what();
        } catch (const IOError& e) {
          status[u] = 2;
          message[u] = e.what();
        } catch (const data::parquet::NullValues& e) {
          status[u] = 3;
          message[u] = e.what();
        }
      }
    });
  }
  py::list out;
  for (int64_t i = 0; i < k; ++i) {
    const auto u = static_cast<size_t>(i);
    out.append(py::make_tuple(status[u], message[u]));
  }
  return out;
}

}  // namespace

void register_data(py::module_& m) {
  m.def(
      "data_permutation",
      [](int64_t n, uint64_t seed, uint64_t epoch, uint64_t stream, const py::object& out) {
        FASTML_CHECK_ARG(n >= 0, "n", "must be >= 0, got ", n);
        if (!out.is_none()) {
          // Into the caller's array (the Parquet reader reuses one per window).
          ArraySpec spec;
          spec.ndim = 1;
          spec.dtypes = {DType::I64};
          spec.layout = Layout::Contiguous;
          spec.writable = true;
          BoundArray o = bind_array(out, "out", spec);
          FASTML_CHECK_ARG(o.view.shape[0] == n, "out", "must hold n = ", n, " entries, got ",
                           o.view.shape[0]);
          {
            py::gil_scoped_release release;
            data::permutation(n, seed, epoch, stream, o.view.as<int64_t>());
          }
          return py::object(o.owner);
        }
        auto buf = Buffer::allocate(static_cast<size_t>(n) * sizeof(int64_t));
        {
          // Pure computation into memory no Python object refers to yet (the
          // Parquet read-ahead calls this while the consumer runs).
          py::gil_scoped_release release;
          data::permutation(n, seed, epoch, stream, static_cast<int64_t*>(buf->data()));
        }
        return py::object(to_numpy(buf, DType::I64, {n}));
      },
      py::arg("n"), py::arg("seed"), py::arg("epoch"), py::arg("stream") = 0,
      py::arg("out") = py::none(),
      "A permutation of range(n): SplitMix64 Fisher-Yates on (seed, epoch, stream), into `out` "
      "when given.");
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
      .def(
          "bind",
          [](const GatherPlan& p, const py::list& arrays) {
            auto s = std::make_unique<DataSources>();
            s->cols = p.bind_sources(arrays, s->keep, &s->num_rows);
            return s;
          },
          py::arg("arrays"))
      .def_property_readonly("out_row_bytes",
                             [](const GatherPlan& p) {
                               int64_t n = 0;
                               for (const auto& c : p.out_shapes()) n += c.out_row_bytes();
                               return n;
                             })
      .def(
          "use_one_buffer",
          [](GatherPlan& p) { p.allocator()->set_allocate({}, 0, /*one_buffer=*/true); },
          "Batches from here on are one heap buffer holding every column (the layout of "
          "device staging); for tests on machines without a GPU.")
      .def("buffers_allocated", [](const GatherPlan& p) { return p.allocator()->allocated(); })
      .def("buffers_reused", [](const GatherPlan& p) { return p.allocator()->reused(); });

  py::class_<DataSources>(m, "DataSources")
      .def_property_readonly("num_rows", [](const DataSources& s) { return s.num_rows; });

  py::class_<MappedFile, std::shared_ptr<MappedFile>>(m, "MappedFile")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("size", &MappedFile::size)
      .def_property_readonly("path", &MappedFile::path);
  m.def("parquet_decode", &parquet_decode, py::arg("files"), py::arg("chunks"), py::arg("outs"),
        py::arg("perms") = py::none(),
        "Decodes Parquet column chunks of mapped files into arrays (see fastml.data).");
  m.def(
      "parquet_footer",
      [](const std::shared_ptr<MappedFile>& f) {
        data::parquet::Footer footer;
        try {
          py::gil_scoped_release release;  // reads only the mapped bytes
          footer = data::parquet::read_footer(f->data(), static_cast<size_t>(f->size()));
        } catch (const IOError& e) {
          fail<FormatError>("'", f->path(), "': not a readable Parquet footer: ", e.what());
        }
        const int64_t n = static_cast<int64_t>(footer.chunks.size());
        py::array_t<int64_t> chunks({n, int64_t{10}});
        auto c = chunks.mutable_unchecked<2>();
        py::list paths;
        for (int64_t i = 0; i < n; ++i) {
          const auto& ch = footer.chunks[static_cast<size_t>(i)];
          const int64_t row[10] = {ch.row_group,
                                   ch.column,
                                   ch.type,
                                   ch.codec,
                                   ch.num_values,
                                   ch.total_compressed_size,
                                   ch.data_page_offset,
                                   ch.dictionary_page_offset,
                                   ch.external ? 1 : 0,
                                   0};
          for (int j = 0; j < 10; ++j) c(i, j) = row[j];
          paths.append(py::bytes(ch.path));  // bytes: a footer's strings need not be UTF-8
        }
        py::dict d;
        d["num_rows"] = footer.num_rows;
        d["file_size"] = f->size();
        d["row_group_rows"] = py::array_t<int64_t>(
            static_cast<py::ssize_t>(footer.row_group_rows.size()), footer.row_group_rows.data());
        d["chunks"] = chunks;
        d["paths"] = paths;
        return d;
      },
      py::arg("file"),
      "A Parquet file's row groups and column chunks, read from its footer natively: "
      "(row_group, column, type, codec, num_values, total_compressed_size, "
      "data_page_offset, dictionary_page_offset, external, 0) per chunk.");

  m.def(
      "data_window_order",
      [](const py::handle& out, const py::handle& starts, uint64_t seed, uint64_t epoch,
         uint64_t stream, const py::object& within) {
        ArraySpec spec;
        spec.ndim = 1;
        spec.dtypes = {DType::I64};
        spec.layout = Layout::Contiguous;
        BoundArray st = bind_array(starts, "starts", spec);
        const int64_t groups = st.view.shape[0] - 1;
        FASTML_CHECK_ARG(groups >= 1, "starts", "must hold at least 2 offsets");
        const int64_t* s = st.view.as<int64_t>();
        std::vector<BoundArray> keep;
        std::vector<const int64_t*> w;
        if (!within.is_none()) {
          auto wl = within.cast<py::list>();
          FASTML_CHECK_ARG(static_cast<int64_t>(wl.size()) == groups, "within",
                           "must hold one order per group (", groups, "), got ", wl.size());
          for (int64_t g = 0; g < groups; ++g) {
            keep.push_back(bind_array(wl[static_cast<size_t>(g)], "within", spec));
            const ArrayView& v = keep.back().view;
            const int64_t n = s[g + 1] - s[g];
            FASTML_CHECK_ARG(v.shape[0] == n, "within", "[", g, "] must hold ", n, " entries, got ",
                             v.shape[0]);
            const int64_t* p = v.as<int64_t>();
            for (int64_t j = 0; j < n; ++j) {
              FASTML_CHECK_ARG(p[j] >= 0 && p[j] < n, "within", "[", g, "] holds ", p[j],
                               ", outside 0..", n - 1);
            }
            w.push_back(p);
          }
        }
        spec.writable = true;
        BoundArray o = bind_array(out, "out", spec);
        FASTML_CHECK_ARG(o.view.shape[0] == s[groups], "out", "must hold the window's ", s[groups],
                         " rows, got ", o.view.shape[0]);
        {
          py::gil_scoped_release release;
          data::window_order(o.view.as<int64_t>(), s, groups, seed, epoch, stream,
                             w.empty() ? nullptr : w.data());
        }
      },
      py::arg("out"), py::arg("starts"), py::arg("seed"), py::arg("epoch"), py::arg("stream"),
      py::arg("within") = py::none(),
      "Fills `out` with a window's order over row groups (see data::window_order).");

  py::class_<DataBatcher>(m, "DataBatcher")
      .def(py::init<std::shared_ptr<GatherPlan>, int64_t>(), py::arg("plan"), py::arg("batch_size"))
      .def_property_readonly("batch_size", &DataBatcher::batch_size)
      .def_property_readonly("pending", &DataBatcher::pending)
      .def("feed", &DataBatcher::feed, py::arg("sources"), py::arg("indices"),
           py::arg("streams") = false)
      .def("flush", &DataBatcher::flush);

  m.def(
      "data_batch_span",
      [](const py::list& arrays) {
        BatchSpan s = batch_span(arrays);
        return py::make_tuple(s.start, s.nbytes, s.payload, s.offsets);
      },
      py::arg("arrays"),
      "(start address, span bytes, the arrays' own bytes, offset of each array) of the span "
      "holding `arrays`.");

  py::class_<CudaStager>(m, "DataCudaStager")
      .def(py::init<std::shared_ptr<GatherPlan>, int, int>(), py::arg("plan"), py::arg("device"),
           py::arg("max_inflight"))
      .def("copy", &CudaStager::copy, py::arg("arrays"), py::arg("dsts"), py::arg("stream"))
      .def("span", &CudaStager::span, py::arg("arrays"))
      .def("copy_span", &CudaStager::copy_span, py::arg("arrays"), py::arg("start"),
           py::arg("nbytes"), py::arg("payload"), py::arg("dst"), py::arg("stream"))
      .def("stats", &CudaStager::stats)
      .def("close", &CudaStager::close);

  py::class_<DataEngine>(m, "DataEngine")
      .def(py::init<std::shared_ptr<GatherPlan>, const py::list&, int64_t, int, int>(),
           py::arg("plan"), py::arg("arrays"), py::arg("batch_size"), py::arg("prefetch"),
           py::arg("max_running"))
      .def_property_readonly("num_rows", &DataEngine::num_rows)
      .def("start", &DataEngine::start, py::arg("shuffle"), py::arg("seed"), py::arg("epoch"),
           py::arg("rank"), py::arg("world_size"), py::arg("drop_last"), py::arg("first_batch"))
      .def("start_rows", &DataEngine::start_rows, py::arg("rows"), py::arg("drop_last"),
           py::arg("first_batch"))
      .def("next", &DataEngine::next, py::arg("token"))
      .def("stop", &DataEngine::stop)
      .def("stats", &DataEngine::stats);
}

}  // namespace fastml::bind
