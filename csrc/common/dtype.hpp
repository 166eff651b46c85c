// Element types understood by the core, and a dispatcher from a runtime
// DType to a compile-time C++ type.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "common/errors.hpp"
#include "common/float16.hpp"

namespace fastml {

enum class DType : uint8_t { Bool, I8, I16, I32, I64, U8, U16, U32, U64, F16, F32, F64 };

inline constexpr int kNumDTypes = 12;

inline size_t itemsize(DType t) {
  switch (t) {
    case DType::Bool:
    case DType::I8:
    case DType::U8: return 1;
    case DType::I16:
    case DType::U16:
    case DType::F16: return 2;
    case DType::I32:
    case DType::U32:
    case DType::F32: return 4;
    case DType::I64:
    case DType::U64:
    case DType::F64: return 8;
  }
  return 0;
}

// NumPy's names, so messages read the same on both sides of the boundary.
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Bool: return "bool";
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    case DType::U16: return "uint16";
    case DType::U32: return "uint32";
    case DType::U64: return "uint64";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
  }
  return "?";
}

inline DType dtype_from_name(const std::string& name) {
  for (int i = 0; i < kNumDTypes; ++i) {
    auto t = static_cast<DType>(i);
    if (name == dtype_name(t)) return t;
  }
  fail<TypeError>("unknown dtype '", name, "'");
}

inline bool is_floating(DType t) {
  return t == DType::F16 || t == DType::F32 || t == DType::F64;
}
inline bool is_integer(DType t) {
  return !is_floating(t) && t != DType::Bool;
}

template <typename T>
struct dtype_of;
template <>
struct dtype_of<bool> {
  static constexpr DType value = DType::Bool;
};
template <>
struct dtype_of<int8_t> {
  static constexpr DType value = DType::I8;
};
template <>
struct dtype_of<int16_t> {
  static constexpr DType value = DType::I16;
};
template <>
struct dtype_of<int32_t> {
  static constexpr DType value = DType::I32;
};
template <>
struct dtype_of<int64_t> {
  static constexpr DType value = DType::I64;
};
template <>
struct dtype_of<uint8_t> {
  static constexpr DType value = DType::U8;
};
template <>
struct dtype_of<uint16_t> {
  static constexpr DType value = DType::U16;
};
template <>
struct dtype_of<uint32_t> {
  static constexpr DType value = DType::U32;
};
template <>
struct dtype_of<uint64_t> {
  static constexpr DType value = DType::U64;
};
template <>
struct dtype_of<float16> {
  static constexpr DType value = DType::F16;
};
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::F32;
};
template <>
struct dtype_of<double> {
  static constexpr DType value = DType::F64;
};

template <typename T>
struct type_tag {
  using type = T;
};

// dispatch_dtype(t, [&](auto tag) { using T = typename decltype(tag)::type; ... });
template <typename F>
decltype(auto) dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::Bool: return f(type_tag<bool>{});
    case DType::I8: return f(type_tag<int8_t>{});
    case DType::I16: return f(type_tag<int16_t>{});
    case DType::I32: return f(type_tag<int32_t>{});
    case DType::I64: return f(type_tag<int64_t>{});
    case DType::U8: return f(type_tag<uint8_t>{});
    case DType::U16: return f(type_tag<uint16_t>{});
    case DType::U32: return f(type_tag<uint32_t>{});
    case DType::U64: return f(type_tag<uint64_t>{});
    case DType::F16: return f(type_tag<float16>{});
    case DType::F32: return f(type_tag<float>{});
    case DType::F64: return f(type_tag<double>{});
  }
  fail<TypeError>("unsupported dtype");
}

// Only the floating types (float16 loads as float).
template <typename F>
decltype(auto) dispatch_floating(DType t, const char* name, F&& f) {
  switch (t) {
    case DType::F16: return f(type_tag<float16>{});
    case DType::F32: return f(type_tag<float>{});
    case DType::F64: return f(type_tag<double>{});
    default:
      fail<TypeError>(name, " must be a floating dtype (float16/32/64), got ", dtype_name(t));
  }
}

}  // namespace fastml
