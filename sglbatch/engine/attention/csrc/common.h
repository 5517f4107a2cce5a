// What the CPU kernels share: widening their dtype to fp32, and the head size as a
// compile-time constant.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Calls run(std::integral_constant<int64_t, D>) with D = head_dim for the sizes with
// unrolled loops (64, 128), else D = 0: the kernel then reads the size at run time.
template <typename Run>
void dispatch_head_dim(int64_t head_dim, Run&& run) {
  switch (head_dim) {
    case 64:
      run(std::integral_constant<int64_t, 64>{});
      break;
    case 128:
      run(std::integral_constant<int64_t, 128>{});
      break;
    default:
      run(std::integral_constant<int64_t, 0>{});
  }
}

}  // namespace sglbatch
