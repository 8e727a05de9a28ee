// Emulator stand-in for <cuda_bf16.h>: storage type and conversions (see cuda_fp16.h).
#pragma once
#include <cstdint>
#include <cstring>

#include "vos_emu/runtime.h"

struct alignas(2) __nv_bfloat16 {
  uint16_t __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  __nv_bfloat16 h;
  if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffu)) {
    h.__x = 0x7fc0u;
  } else {
    b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even
    h.__x = static_cast<uint16_t>(b >> 16);
  }
  return h;
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return make_float2(__bfloat162float(h.x), __bfloat162float(h.y));
}
