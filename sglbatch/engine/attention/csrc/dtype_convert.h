// Conversions the CPU kernels share: every kernel widens its dtype to fp32 to compute.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace sglbatch {

inline float to_float(float x) { return x; }

inline float to_float(double x) { return static_cast<float>(x); }

// bf16 is fp32's upper half: widening is a shift, exact.
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float to_float(c10::Half x) { return static_cast<float>(x); }

// By the bits: the kernels build with -ffast-math, under which std::isnan may fold to false.
inline bool is_nan(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

}  // namespace sglbatch
