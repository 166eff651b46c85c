// Per-element transforms fused into the loader's gather. FASTML_HD so a CUDA
// kernel can apply the same arithmetic the CPU tests check.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/dtype.hpp"
#include "common/float16.hpp"

namespace fastml::data {

enum class OpKind : uint8_t { FillNa, Standardize, Clip };

// One transform step. Standardize's mean/std are per element of a row
// (broadcast from a scalar when they hold one value).
struct TransformOp {
  OpKind kind = OpKind::FillNa;
  double a = 0.0, b = 0.0;          // FillNa: a = value; Clip: [a, b]
  std::vector<double> mean, scale;  // Standardize: (x - mean) / scale
};

// A column's transforms in order; the result is stored as `out` (Cast).
struct TransformPlan {
  std::vector<TransformOp> ops;
  bool empty() const { return ops.empty(); }
};

FASTML_HD inline double fill_na(double x, double value) {
  return x != x ? value : x;
}
FASTML_HD inline double standardize(double x, double mean, double scale) {
  return (x - mean) / scale;
}
// NaN passes through Clip unchanged, as numpy.clip does.
FASTML_HD inline double clip(double x, double lo, double hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// double -> float rounded to odd: an inexact result gets an odd last bit.
// float's 13 spare bits then make float -> half round exactly as a direct
// double -> half rounding would (no double-rounding error).
FASTML_HD inline float round_to_odd_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) == x || x != x) return f;
  uint32_t bits = f32_bits(f);
  if ((bits & 1u) == 0) {
    // Step one ulp toward x: up in magnitude when |f| < |x|, down otherwise.
    const bool below = (bits >> 31) ? (static_cast<double>(f) > x) : (static_cast<double>(f) < x);
    bits = below ? bits + 1 : bits - 1;
  }
  return f32_from_bits(bits);
}

// Stores a double as T: floats round to nearest (as NumPy's astype); integers
// truncate toward zero, saturating at T's range, with NaN stored as 0.
template <typename T>
FASTML_HD inline T store_as(double x) {
  if constexpr (std::is_same_v<T, bool>) {
    return x != 0.0;
  } else if constexpr (std::is_same_v<T, float16>) {
    return float16(round_to_odd_float(x));
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(x);
  } else {
    if (x != x) return T(0);
    constexpr double lo = static_cast<double>(std::numeric_limits<T>::lowest());
    constexpr double hi = static_cast<double>(std::numeric_limits<T>::max());
    if (x <= lo) return std::numeric_limits<T>::lowest();
    if (x >= hi) return std::numeric_limits<T>::max();
    return static_cast<T>(x);
  }
}

}  // namespace fastml::data
