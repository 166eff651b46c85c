// The one array type the core sees: a raw pointer, an element type, a shape
// and byte strides. Views never own memory; the bindings keep the owner
// alive for as long as the core uses a view.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "common/dtype.hpp"
#include "common/errors.hpp"

namespace fastml {

inline constexpr int kMaxDims = 8;

struct ArrayView {
  void* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in bytes
  bool readonly = false;

  int64_t size() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t itemsize() const { return fastml::itemsize(dtype); }
  int64_t nbytes() const { return size() * static_cast<int64_t>(itemsize()); }

  bool is_c_contiguous() const {
    int64_t expected = static_cast<int64_t>(itemsize());
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }

  // Elements per row when viewed as (shape[0], rest...).
  int64_t row_elements() const {
    int64_t n = 1;
    for (int i = 1; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t row_bytes() const { return row_elements() * static_cast<int64_t>(itemsize()); }

  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
  template <typename T>
  const T& at(int64_t i) const {  // 1-D strided access
    return *reinterpret_cast<const T*>(static_cast<const char*>(data) + i * strides[0]);
  }
  template <typename T>
  const T& at(int64_t i, int64_t j) const {  // 2-D strided access
    return *reinterpret_cast<const T*>(static_cast<const char*>(data) + i * strides[0] +
                                       j * strides[1]);
  }

  std::string describe() const {
    std::string s = std::to_string(ndim) + "-D " + dtype_name(dtype) + " (";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (ndim == 1 ? ",)" : ")");
  }

  // A C-contiguous view over `data`.
  static ArrayView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape) {
    ArrayView v;
    v.data = data;
    v.dtype = dtype;
    v.ndim = static_cast<int>(shape.size());
    FASTML_ASSERT(v.ndim <= kMaxDims);
    int i = 0;
    for (int64_t s : shape) v.shape[i++] = s;
    int64_t stride = static_cast<int64_t>(fastml::itemsize(dtype));
    for (int d = v.ndim - 1; d >= 0; --d) {
      v.strides[d] = stride;
      stride *= v.shape[d];
    }
    return v;
  }
};

}  // namespace fastml
