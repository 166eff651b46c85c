// The one array boundary between Python and the core.
//
// Accepts NumPy arrays, CPU torch tensors, pyarrow arrays and anything NumPy
// can view (buffer protocol, __array__), without copying when the layout
// allows; validates dtype, rank and layout once; and returns NumPy arrays that
// share reference-counted native buffers.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "common/array_view.hpp"
#include "common/buffer.hpp"

namespace fastml::bind {

namespace py = pybind11;

enum class Layout {
  Any,            // strided views are fine
  Contiguous,     // C-contiguous required; a non-contiguous input raises ValueError
  MakeContiguous  // copy to C-contiguous when needed
};

struct ArraySpec {
  int ndim = -1;              // -1: any rank
  int min_ndim = 0;           // used when ndim == -1
  std::vector<DType> dtypes;  // empty: any supported dtype
  Layout layout = Layout::MakeContiguous;
  bool writable = false;
};

// A validated view plus the Python object that owns its memory; keep the
// BoundArray alive for as long as the view is used (also with the GIL released).
struct BoundArray {
  // Null until bound (py::array's default constructor would make an empty
  // NumPy array: a real allocation on every call).
  py::array owner = py::reinterpret_steal<py::array>(py::handle());
  ArrayView view;
};

// Maps a NumPy dtype to the core's; TypeError naming `name` when unsupported.
DType dtype_from_numpy(const py::dtype& dt, const char* name);
py::dtype numpy_dtype(DType t);

// Converts `obj` to a NumPy array without copying where possible
// (torch CPU tensors via .numpy(), pyarrow arrays via to_numpy(zero_copy_only)).
py::array as_numpy(py::handle obj, const char* name);

// as_numpy + validation against `spec`.
BoundArray bind_array(py::handle obj, const char* name, const ArraySpec& spec = {});

// A NumPy array over a native buffer; the array keeps the buffer alive.
py::array to_numpy(BufferPtr buffer, DType dtype, const std::vector<int64_t>& shape,
                   size_t byte_offset = 0);

// A NumPy array over `data` whose lifetime is tied to `owner`.
py::array to_numpy_view(void* data, DType dtype, const std::vector<int64_t>& shape,
                        py::handle owner, const std::vector<int64_t>& strides = {});

}  // namespace fastml::bind
