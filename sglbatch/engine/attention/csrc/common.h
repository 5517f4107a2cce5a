// What the CPU kernels share: widening their dtype to fp32, the head size as a compile-time
// constant, and the vector helpers of the attention kernels.
#pragma once

#include <torch/extension.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <initializer_list>
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

// The kernels read index tensors as raw int64 arrays on the host.
inline void check_indices(std::initializer_list<const torch::Tensor*> tensors) {
  for (const auto* t : tensors) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "index tensors must be contiguous int64");
  }
}

// The AVX512-BF16 dot-product path (vdpbf16ps on bf16 pairs): compile-time head sizes that
// are whole 64-dim chunks.
template <typename scalar_t, int64_t HEAD_DIM>
constexpr bool kBf16Dot =
#if defined(__AVX512BF16__)
    std::is_same_v<scalar_t, c10::BFloat16> && HEAD_DIM > 0 && HEAD_DIM % 64 == 0;
#else
    false;
#endif

// Calls f(std::integral_constant<int, n>) for a runtime 1 <= n <= MAX: register tiles of any
// width.
template <int MAX, typename F>
inline void with_width(int64_t n, F&& f) {
  if constexpr (MAX > 1) {
    if (n < MAX) return with_width<MAX - 1>(n, f);
  }
  f(std::integral_constant<int, MAX>{});
}

// Where prefetch_row loads a row: into L1 for use a few keys later, or only into L2 for use
// a few KB of rows later. On Zen 4, L2 prefetches raised the decode kernel's bandwidth from
// DRAM 1.2x (consecutive slots) to 1.6x (scattered), presumably by leaving the L1's few
// miss buffers to the loads the kernel waits on; the extend kernel gained nothing.
enum class Cache { kL1 = 3, kL2 = 2 };  // __builtin_prefetch's locality hints (T0, T1)

// Starts loading a pool row before its use: slots are scattered in the pool, where the
// hardware prefetchers cannot follow them.
template <Cache kInto = Cache::kL1>
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(static_cast<const char*>(row) + b, 0, static_cast<int>(kInto));
  }
}

// Elements 2i and 2i + 1 of a bf16 row as one 32-bit word (the bf16 pair vdpbf16ps takes).
inline uint32_t bf16_pair(const c10::BFloat16* row, int64_t i) {
  uint32_t word;
  std::memcpy(&word, row + 2 * i, sizeof word);
  return word;
}

// exp's arguments are clamped here (exp(-80) ~ 1e-35, against a max term of 1): the vector
// exp would handle out-of-range lanes one at a time, slowly.
constexpr float kMinExp = -80.f;

#if defined(__AVX512F__)
// The mask of the first min(n, 16) lanes (none for n <= 0): a row's last, partial vector.
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
}

// exp(x) for x <= 0 to ~2 ulp: 2^n * a degree-6 polynomial of the remainder r, |r| <= ln2/2.
inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kMinExp));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);  // and the rest
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX512BF16__)
// 16 floats rounded to bf16 (to nearest even), as raw bits.
inline __m256i bf16_bits(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
#endif

}  // namespace sglbatch
