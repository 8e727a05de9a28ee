// Emulator stand-in for <cuda_fp16.h>: the storage type and the conversions the kernels use
// (they are compiled with __CUDA_NO_HALF_OPERATORS__, so no arithmetic on __half).
#pragma once
#include <cstdint>
#include <cstring>

#include "vos_emu/runtime.h"

struct alignas(2) __half {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
  uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400u));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __half __float2half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu, exp = ax >> 23;
  __half h;
  if (ax >= 0x7f800000u) {
    h.__x = static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  } else if (ax >= 0x477ff000u) {  // rounds past 65504
    h.__x = static_cast<uint16_t>(sign | 0x7c00u);
  } else if (exp < 102) {  // below half the smallest subnormal
    h.__x = static_cast<uint16_t>(sign);
  } else {
    uint32_t r, rem, half;
    if (exp < 113) {  // half subnormal: units of 2^-24
      const uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - exp;
      r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    } else {
      r = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu, half = 0x1000u;
    }
    if (rem > half || (rem == half && (r & 1u))) ++r;
    h.__x = static_cast<uint16_t>(sign | r);
  }
  return h;
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
