// Bindings of the forest area: fastml._core.ForestCore, the native object
// behind fastml.infer.Forest (and a NativeHandler for fastml.infer.Batcher).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "bindings/array.hpp"
#include "bindings/registry.hpp"
#include "infer/forest.hpp"
#include "infer/forest_kernel.hpp"
#include "infer/native_handler.hpp"

namespace py = pybind11;

namespace fastml::bind {

namespace {

using infer::Forest;
using infer::ForestSpec;

template <typename T>
std::vector<T> take(const py::dict& d, const char* key, DType want) {
  if (!d.contains(key)) fail<std::invalid_argument>("forest spec is missing '", key, "'");
  ArraySpec spec;
  spec.ndim = 1;
  spec.dtypes = {want};
  BoundArray b = bind_array(d[key], key, spec);
  const T* p = b.view.as<T>();
  return std::vector<T>(p, p + b.view.shape[0]);
}

template <typename T>
py::array give(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

std::shared_ptr<Forest> forest_from_spec(const py::dict& d) {
  ForestSpec s;
  s.num_features = d["num_features"].cast<int32_t>();
  s.num_outputs = d["num_outputs"].cast<int32_t>();
  s.threshold_f64 = d["threshold_f64"].cast<bool>();
  s.accum_f64 = d["accum_f64"].cast<bool>();
  s.link = static_cast<infer::ForestLink>(d["link"].cast<int32_t>());
  s.divisor = d["divisor"].cast<double>();
  s.divide_margin = d["divide_margin"].cast<bool>();
  s.cat_rule.lo = d["cat_lo"].cast<double>();
  s.cat_rule.hi = d["cat_hi"].cast<double>();
  s.cat_rule.integral = d["cat_integral"].cast<bool>();
  s.objective = d["objective"].cast<std::string>();
  s.metadata = d["metadata"].cast<std::string>();
  s.tree_node_offsets = take<int64_t>(d, "tree_node_offsets", DType::I64);
  s.tree_group = take<int32_t>(d, "tree_group", DType::I32);
  s.node_feature = take<int32_t>(d, "node_feature", DType::I32);
  s.node_threshold = take<double>(d, "node_threshold", DType::F64);
  s.node_left = take<int32_t>(d, "node_left", DType::I32);
  s.node_right = take<int32_t>(d, "node_right", DType::I32);
  s.node_flags = take<uint32_t>(d, "node_flags", DType::U32);
  s.node_cat = take<int32_t>(d, "node_cat", DType::I32);
  s.cat_offsets = take<int64_t>(d, "cat_offsets", DType::I64);
  s.cat_bits = take<uint32_t>(d, "cat_bits", DType::U32);
  s.leaf_values = take<double>(d, "leaf_values", DType::F64);
  s.base_margin = take<double>(d, "base_margin", DType::F64);
  // Validation walks every node; no Python object is touched.
  py::gil_scoped_release release;
  return Forest::build(std::move(s));
}

py::dict spec_to_dict(const Forest& f) {
  const ForestSpec& s = f.spec();
  py::dict d;
  d["num_features"] = s.num_features;
  d["num_outputs"] = s.num_outputs;
  d["threshold_f64"] = s.threshold_f64;
  d["accum_f64"] = s.accum_f64;
  d["link"] = static_cast<int32_t>(s.link);
  d["divisor"] = s.divisor;
  d["divide_margin"] = s.divide_margin;
  d["cat_lo"] = s.cat_rule.lo;
  d["cat_hi"] = s.cat_rule.hi;
  d["cat_integral"] = s.cat_rule.integral;
  d["objective"] = s.objective;
  d["metadata"] = s.metadata;
  d["tree_node_offsets"] = give(s.tree_node_offsets);
  d["tree_group"] = give(s.tree_group);
  d["node_feature"] = give(s.node_feature);
  d["node_threshold"] = give(s.node_threshold);
  d["node_left"] = give(s.node_left);
  d["node_right"] = give(s.node_right);
  d["node_flags"] = give(s.node_flags);
  d["node_cat"] = give(s.node_cat);
  d["cat_offsets"] = give(s.cat_offsets);
  d["cat_bits"] = give(s.cat_bits);
  d["leaf_values"] = give(s.leaf_values);
  d["base_margin"] = give(s.base_margin);
  return d;
}

py::array forest_predict(const Forest& f, py::handle X_obj, bool apply_link, py::object out_obj) {
  ArraySpec spec;
  spec.ndim = 2;
  spec.dtypes = {DType::F32, DType::F64};
  spec.layout = Layout::Any;  // the engine reads strided rows (one copy per block)
  BoundArray X = bind_array(X_obj, "X", spec);
  f.check_matrix(X.view, "X");
  const int64_t rows = X.view.shape[0];
  const int32_t k = f.num_outputs();
  const DType dt = f.output_dtype();
  std::vector<int64_t> shape = {rows};
  if (k > 1) shape.push_back(k);
  py::array result = py::reinterpret_steal<py::array>(py::handle());
  void* out_ptr = nullptr;
  if (out_obj.is_none()) {
    auto buf = Buffer::allocate(static_cast<size_t>(rows * k) * itemsize(dt));
    out_ptr = buf->data();
    result = to_numpy(std::move(buf), dt, shape);
  } else {
    ArraySpec os;
    os.dtypes = {dt};
    os.layout = Layout::Contiguous;
    os.writable = true;
    BoundArray o = bind_array(out_obj, "out", os);
    FASTML_CHECK_ARG(o.view.size() == rows * k && o.view.ndim == static_cast<int>(shape.size()) &&
                         o.view.shape[0] == rows,
                     "out", "must have shape ", (k > 1 ? "(rows, num_outputs)" : "(rows,)"), " = (",
                     rows, k > 1 ? ", " + std::to_string(k) : std::string(","), "), got ",
                     o.view.describe());
    out_ptr = o.view.data;
    result = o.owner;
  }
  {
    // X and out are kept alive by X.owner / result; the engine touches no Python object.
    py::gil_scoped_release release;
    f.predict(X.view, apply_link, out_ptr);
  }
  return result;
}

// fn(X, out) on a C-contiguous float32/float64 host matrix X, out a new
// rows x num_outputs buffer of the forest's output dtype (GIL released).
template <typename Fn>
py::array predict_host(const Forest& f, py::object X, const Fn& fn) {
  ArraySpec spec;
  spec.ndim = 2;
  spec.dtypes = {DType::F32, DType::F64};
  BoundArray Xb = bind_array(X, "X", spec);
  f.check_matrix(Xb.view, "X");
  const int64_t rows = Xb.view.shape[0];
  const int32_t k = f.num_outputs();
  auto buf = Buffer::allocate(static_cast<size_t>(rows * k) * itemsize(f.output_dtype()));
  {
    py::gil_scoped_release release;  // native buffers only
    fn(Xb.view, buf->data());
  }
  std::vector<int64_t> shape = {rows};
  if (k > 1) shape.push_back(k);
  return to_numpy(std::move(buf), f.output_dtype(), shape);
}

}  // namespace

void register_forest(py::module_& m) {
  py::class_<Forest, infer::NativeHandler, std::shared_ptr<Forest>>(
      m, "ForestCore", "Validated native tree ensemble (use fastml.infer.Forest)")
      .def(py::init(&forest_from_spec), py::arg("spec"))
      .def_static(
          "from_bytes",
          [](py::bytes data, const std::string& source) {
            std::string s = data;  // a private copy, so the GIL can be dropped
            py::gil_scoped_release release;
            return Forest::deserialize(reinterpret_cast<const uint8_t*>(s.data()), s.size(),
                                       source);
          },
          py::arg("data"), py::arg("source") = "data")
      .def("to_bytes",
           [](const Forest& f) {
             std::vector<uint8_t> b;
             {
               py::gil_scoped_release release;  // serialisation reads only native memory
               b = f.serialize();
             }
             return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
           })
      .def("spec", &spec_to_dict)
      .def("predict", &forest_predict, py::arg("X"), py::arg("apply_link"),
           py::arg("out") = py::none())
      .def(
          "predict_cuda",
          [](const Forest& f, py::object X, bool apply_link) {
            // Host arrays only here; torch CUDA tensors go through predict_cuda_ptr.
            return predict_host(f, X, [&](const ArrayView& Xv, void* out) {
              infer::forest_predict_cuda(f, Xv, false, apply_link, out, false, 0);
            });
          },
          py::arg("X"), py::arg("apply_link"))
      // Tests: the CUDA kernel's blocks run on the host (forest_block.hpp);
      // returns (result, layout) with the launch shape of an `sm_count`-SM GPU.
      .def(
          "emulate_cuda",
          [](const Forest& f, py::object X, bool apply_link, int sm_count, bool general) {
            const char* layout = nullptr;
            py::array res = predict_host(f, X, [&](const ArrayView& Xv, void* out) {
              layout = infer::forest_emulate_kernel(f, Xv, apply_link, out, sm_count, general);
            });
            return py::make_tuple(res, std::string(layout));
          },
          py::arg("X"), py::arg("apply_link"), py::arg("sm_count") = 132,
          py::arg("general") = false)
      .def(
          "predict_cuda_ptr",
          [](const Forest& f, uintptr_t x_ptr, int64_t rows, int64_t cols, const std::string& dtype,
             uintptr_t out_ptr, bool apply_link, uintptr_t stream) {
            ArrayView X;
            X.data = reinterpret_cast<void*>(x_ptr);
            X.dtype = dtype_from_name(dtype);
            X.ndim = 2;
            X.shape[0] = rows;
            X.shape[1] = cols;
            X.strides[1] = static_cast<int64_t>(itemsize(X.dtype));
            X.strides[0] = cols * X.strides[1];
            f.check_matrix(X, "X");
            py::gil_scoped_release release;  // raw device pointers only
            infer::forest_predict_cuda(f, X, true, apply_link, reinterpret_cast<void*>(out_ptr),
                                       true, stream);
          },
          py::arg("x_ptr"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("out_ptr"),
          py::arg("apply_link"), py::arg("stream"))
      .def_property_readonly("num_features", &Forest::num_features)
      .def_property_readonly("num_outputs", &Forest::num_outputs)
      .def_property_readonly("num_trees", &Forest::num_trees)
      .def_property_readonly("max_depth", &Forest::max_depth)
      .def_property_readonly("engine", [](const Forest& f) { return std::string(f.engine_name()); })
      // The CUDA kernel's layout for this forest under the current
      // forest_cuda_general setting (known without a GPU).
      .def_property_readonly("cuda_layout",
                             [](const Forest& f) {
                               return std::string(infer::forest_layout_name(
                                   infer::forest_kernel_layout(f, infer::forest_cuda_general())));
                             })
      .def_property_readonly("output_dtype", [](const Forest& f) {
        return std::string(dtype_name(f.output_dtype()));
      });
  m.def("forest_cuda_compiled", &infer::forest_cuda_compiled);
  // Tests and benchmarks compare the AVX2 and scalar CPU walks.
  m.def(
      "forest_simd",
      [](std::optional<bool> enable) { return infer::forest_simd(enable ? *enable : -1); },
      py::arg("enable") = py::none());
  // Benchmarks and GPU tests compare the CUDA kernel's layouts.
  m.def(
      "forest_cuda_general",
      [](std::optional<bool> enable) { return infer::forest_cuda_general(enable ? *enable : -1); },
      py::arg("enable") = py::none());
  // XGBoost turns its intercept into a margin in float32 arithmetic with the C
  // library's logf; the same expression here reproduces it bit for bit.
  m.def(
      "forest_f32_prob_to_margin",
      [](const std::string& kind, float p) -> float {
        if (kind == "logit") return -std::log(1.0f / p - 1.0f);
        if (kind == "log") return std::log(p);
        if (kind == "identity") return p;
        fail<std::invalid_argument>("kind must be 'logit', 'log' or 'identity', got '", kind, "'");
      },
      py::arg("kind"), py::arg("p"));
}

}  // namespace fastml::bind
