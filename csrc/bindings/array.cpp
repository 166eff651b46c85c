#include "bindings/array.hpp"

#include <string>

#include "common/errors.hpp"

namespace fastml::bind {

namespace {

std::string type_module(py::handle obj) {
  py::object mod = py::type::of(obj).attr("__module__");
  return py::str(mod);
}

std::string shape_str(const py::array& a) {
  std::string s = std::to_string(a.ndim()) + "-D " + std::string(py::str(a.dtype())) + " (";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::array from_torch(py::handle t, const char* name) {
  py::object dev = t.attr("device");
  const std::string dev_type = py::str(dev.attr("type"));
  if (dev_type != "cpu") {
    fail<std::invalid_argument>(name, " must be a CPU tensor here, got a tensor on '",
                                std::string(py::str(dev)), "'");
  }
  py::object dt = t.attr("dtype");
  const std::string dts = py::str(dt);
  if (dts == "torch.bfloat16" || dts.find("complex") != std::string::npos) {
    fail<TypeError>(name, " has unsupported dtype ", dts);
  }
  // .numpy() shares the tensor's memory; resolve_* are no-ops unless lazy bits are set.
  return t.attr("detach")().attr("resolve_conj")().attr("resolve_neg")().attr("numpy")();
}

py::array from_arrow(py::handle obj, const char* name) {
  py::module_ pa = py::module_::import("pyarrow");
  py::object arr = py::reinterpret_borrow<py::object>(obj);
  if (py::isinstance(arr, pa.attr("ChunkedArray"))) {
    const auto nchunks = arr.attr("num_chunks").cast<int64_t>();
    arr = nchunks == 1 ? arr.attr("chunk")(0) : arr.attr("combine_chunks")();
  }
  if (py::isinstance(arr, pa.attr("Buffer"))) {
    // A raw Arrow buffer is bytes: viewed as uint8 through the buffer protocol.
    return py::module_::import("numpy").attr("frombuffer")(arr, py::arg("dtype") = "uint8");
  }
  if (!py::isinstance(arr, pa.attr("Array"))) {
    fail<TypeError>(name, " must be a pyarrow Array or ChunkedArray, got ",
                    std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  py::object type = arr.attr("type");
  py::module_ types = pa.attr("types");
  if (types.attr("is_dictionary")(type).cast<bool>()) arr = arr.attr("indices");
  const auto nulls = arr.attr("null_count").cast<int64_t>();
  if (nulls > 0) {
    if (!types.attr("is_floating")(arr.attr("type")).cast<bool>()) {
      fail<std::invalid_argument>(name, " has ", nulls,
                                  " null values in a non-floating Arrow column; fill them first");
    }
    // Nulls in a floating column become NaN (a copy).
    return arr.attr("to_numpy")(py::arg("zero_copy_only") = false);
  }
  if (types.attr("is_boolean")(arr.attr("type")).cast<bool>()) {
    // Arrow packs booleans as bits: unpacking is the one unavoidable copy.
    return arr.attr("to_numpy")(py::arg("zero_copy_only") = false);
  }
  const bool numeric = types.attr("is_integer")(arr.attr("type")).cast<bool>() ||
                       types.attr("is_floating")(arr.attr("type")).cast<bool>();
  if (!numeric) {
    fail<TypeError>(name, " has Arrow type ", std::string(py::str(arr.attr("type"))),
                    "; only fixed-width numeric and boolean columns are supported");
  }
  return arr.attr("to_numpy")(py::arg("zero_copy_only") = true);
}

}  // namespace

DType dtype_from_numpy(const py::dtype& dt, const char* name) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  switch (kind) {
    case 'b': return DType::Bool;
    case 'i':
      if (size == 1) return DType::I8;
      if (size == 2) return DType::I16;
      if (size == 4) return DType::I32;
      if (size == 8) return DType::I64;
      break;
    case 'u':
      if (size == 1) return DType::U8;
      if (size == 2) return DType::U16;
      if (size == 4) return DType::U32;
      if (size == 8) return DType::U64;
      break;
    case 'f':
      if (size == 2) return DType::F16;
      if (size == 4) return DType::F32;
      if (size == 8) return DType::F64;
      break;
    default: break;
  }
  fail<TypeError>(name, " has unsupported dtype ", std::string(py::str(dt)),
                  "; expected bool, int8..int64, uint8..uint64 or float16/32/64");
}

py::dtype numpy_dtype(DType t) {
  // Made once from NumPy's names (parsing a name costs more than the array a
  // result needs: measured in the batcher's per-request path) and never
  // released (they may outlive the interpreter's finalisation).
  static PyObject* cache[kNumDTypes] = {};
  PyObject*& slot = cache[static_cast<int>(t)];
  if (slot == nullptr) slot = py::dtype(dtype_name(t)).release().ptr();
  return py::reinterpret_borrow<py::dtype>(slot);
}

py::array as_numpy(py::handle obj, const char* name) {
  if (obj.is_none()) fail<TypeError>(name, " must be an array, got None");
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  const std::string mod = type_module(obj);
  if (mod.rfind("torch", 0) == 0 && py::hasattr(obj, "device")) return from_torch(obj, name);
  if (mod.rfind("pyarrow", 0) == 0) return from_arrow(obj, name);
  py::object np = py::module_::import("numpy");
  py::array arr = py::reinterpret_steal<py::array>(py::handle());
  try {
    arr = np.attr("asarray")(obj);
  } catch (py::error_already_set& e) {
    fail<TypeError>(name, " must be array-like, got ",
                    std::string(py::str(py::type::of(obj).attr("__name__"))), " (", e.what(), ")");
  }
  return arr;
}

BoundArray bind_array(py::handle obj, const char* name, const ArraySpec& spec) {
  py::array arr = as_numpy(obj, name);
  if (arr.dtype().kind() == 'O' || arr.dtype().kind() == 'U' || arr.dtype().kind() == 'S') {
    fail<TypeError>(name, " must be numeric, got dtype ", std::string(py::str(arr.dtype())));
  }
  if (spec.ndim >= 0 && arr.ndim() != spec.ndim) {
    fail<std::invalid_argument>(name, " must be ", spec.ndim, "-D, got ", shape_str(arr));
  }
  if (spec.ndim < 0 && arr.ndim() < spec.min_ndim) {
    fail<std::invalid_argument>(name, " must be at least ", spec.min_ndim, "-D, got ",
                                shape_str(arr));
  }
  if (arr.ndim() > kMaxDims) {
    fail<std::invalid_argument>(name, " has ", arr.ndim(), " dimensions; at most ", kMaxDims,
                                " are supported");
  }
  DType dt = dtype_from_numpy(arr.dtype(), name);
  if (!spec.dtypes.empty()) {
    bool ok = false;
    for (DType d : spec.dtypes) ok = ok || d == dt;
    if (!ok) {
      std::string want;
      for (DType d : spec.dtypes) want += (want.empty() ? "" : "/") + std::string(dtype_name(d));
      fail<TypeError>(name, " must be ", want, ", got ", shape_str(arr));
    }
  }
  // Non-native byte order: a value-preserving copy into native order.
  if (arr.dtype().byteorder() == '>') {
    arr = arr.attr("astype")(arr.dtype().attr("newbyteorder")("="));
  }
  // Unaligned data (an array over a pickle, network or file buffer at an odd
  // offset, as Dask hands partitions to workers): the core reads whole typed
  // elements, which is undefined behaviour there (UBSan stopped a Dask
  // worker), so inputs are copied to aligned memory; an output cannot be.
  if ((arr.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) == 0) {
    if (spec.writable) {
      fail<std::invalid_argument>(name, " must be aligned to its item size, got an unaligned ",
                                  shape_str(arr), " view");
    }
    arr = py::module_::import("numpy").attr("array")(arr, py::arg("copy") = true);
  }
  const bool contiguous = (arr.flags() & py::array::c_style) != 0;
  if (!contiguous) {
    if (spec.layout == Layout::Contiguous) {
      fail<std::invalid_argument>(name, " must be C-contiguous, got a strided ", shape_str(arr),
                                  " view (use numpy.ascontiguousarray)");
    }
    if (spec.layout == Layout::MakeContiguous) {
      arr = py::module_::import("numpy").attr("ascontiguousarray")(arr);
    }
  }
  const bool writable = arr.writeable();
  if (spec.writable && !writable) fail<std::invalid_argument>(name, " must be writable");

  BoundArray out;
  out.owner = arr;
  ArrayView& v = out.view;
  v.data = const_cast<void*>(arr.data());
  v.dtype = dt;
  v.ndim = static_cast<int>(arr.ndim());
  v.readonly = !writable;
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = arr.shape(i);
    v.strides[i] = arr.strides(i);
  }
  return out;
}

py::array to_numpy(BufferPtr buffer, DType dtype, const std::vector<int64_t>& shape,
                   size_t byte_offset) {
  auto* holder = new BufferPtr(std::move(buffer));
  py::capsule owner(holder, [](void* p) { delete static_cast<BufferPtr*>(p); });
  char* data = static_cast<char*>((*holder)->data()) + byte_offset;
  std::vector<py::ssize_t> sh(shape.begin(), shape.end());
  return py::array(numpy_dtype(dtype), sh, data, owner);
}

py::array to_numpy_view(void* data, DType dtype, const std::vector<int64_t>& shape,
                        py::handle owner, const std::vector<int64_t>& strides) {
  std::vector<py::ssize_t> sh(shape.begin(), shape.end());
  if (strides.empty()) return py::array(numpy_dtype(dtype), sh, data, owner);
  std::vector<py::ssize_t> st(strides.begin(), strides.end());
  return py::array(numpy_dtype(dtype), sh, st, data, owner);
}

}  // namespace fastml::bind
