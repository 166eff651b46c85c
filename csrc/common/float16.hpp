// IEEE 754 binary16 storage type with exact conversions to and from float.
// __host__ __device__ so the same code runs in CUDA kernels and on the CPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTML_HD __host__ __device__
#else
#define FASTML_HD
#endif

namespace fastml {

FASTML_HD inline uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FASTML_HD inline float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// binary16 -> binary32, exact (handles subnormals, inf and NaN).
FASTML_HD inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return f32_from_bits(sign);
    // subnormal: normalise
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    exp = static_cast<uint32_t>(127 - 15 - e);
    return f32_from_bits(sign | (exp << 23) | (mant << 13));
  }
  return f32_from_bits(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// binary32 -> binary16 with round-to-nearest-even (as NumPy's astype).
FASTML_HD inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to inf
  if (absx < 0x38800000u) {                                               // subnormal or zero
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);  // below half of min subnormal
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t half_m = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_m & 1u))) ++half_m;
    return static_cast<uint16_t>(sign | half_m);
  }
  uint32_t h = ((absx >> 13) - ((127u - 15u) << 10));
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

struct float16 {
  uint16_t bits;
  float16() = default;
  FASTML_HD explicit float16(float f) : bits(float_to_half_bits(f)) {}
  FASTML_HD explicit operator float() const { return half_bits_to_float(bits); }
  FASTML_HD explicit operator double() const { return half_bits_to_float(bits); }
  FASTML_HD static float16 from_bits(uint16_t b) {
    float16 h;
    h.bits = b;
    return h;
  }
};
static_assert(sizeof(float16) == 2, "float16 must be 2 bytes");

// Uniform loads/stores so templated loops can treat float16 like float.
template <typename T>
FASTML_HD inline double load_as_double(const T& v) {
  return static_cast<double>(v);
}
template <>
FASTML_HD inline double load_as_double<float16>(const float16& v) {
  return half_bits_to_float(v.bits);
}

}  // namespace fastml
