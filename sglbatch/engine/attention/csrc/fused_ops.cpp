// Fused elementwise steps of a decoder layer for the CPU, each one pass over its rows where
// torch runs a chain of small ops:
//
// - rms_norm / fused_add_rms_norm: the residual add (rounded to the model's dtype, as
//   torch's add) and RMSNorm with `layers.norm.rms_norm`'s roundings: normalized in fp32,
//   rounded to the dtype, then multiplied by the weight and rounded again. The sum of squares
//   is accumulated in a different order than torch's reduction, so the fp32 result may differ
//   from torch's in its last bits, and a 16-bit one by one unit where that flips a rounding.
// - rope_store_kv: rotate-half rope on q and k in place (cos/sin rounded to the dtype first,
//   each product and the sum rounded, as `RotaryEmbedding` does: bit-identical to it), with
//   k and v written into the layer's head-major KV pool buffers at the tokens' slots.
//
// The module must round exactly as torch does, so it opts out of the build's -ffast-math:
// that would contract a multiply and add into one FMA (one rounding instead of two) and turn
// 1/sqrt into an approximation. Before any include, so inline headers agree on the options.
#pragma GCC optimize("no-fast-math", "fp-contract=off")

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FUSED_OPS_AVX512 1
#endif

// The model dtypes: fp32, bf16, fp16.
#define DISPATCH_MODEL_TYPES(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

// Vec: kLanes fp32 values. Every loop below runs over a row in steps of kLanes with `n`, the
// number of valid lanes (fewer at a row's end); the portable build is the same code with one
// lane.
#if defined(FUSED_OPS_AVX512)
constexpr int64_t kLanes = 16;
using Vec = __m512;

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }

// bf16 bits of each lane, rounded to nearest even (as c10::BFloat16), in the low half.
inline __m512i bf16_bits(Vec v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
}

inline __m256i half_bits(Vec v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline Vec load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }

inline Vec load(const c10::BFloat16* p, int64_t n) {
  const __m256i raw = _mm256_maskz_loadu_epi16(lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline Vec load(const c10::Half* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p));
}

inline void store(float* p, Vec v, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), v); }

#if defined(__AVX512BF16__)
// vcvtneps2bf16 rounds to nearest even as c10::BFloat16 does, in one instruction against
// eight; it differs only on inputs below bf16's normal range (flushed to zero) and in NaN
// payloads.
inline __m256i bf16_half(Vec v) { return (__m256i)_mm512_cvtneps_pbh(v); }
#else
inline __m256i bf16_half(Vec v) { return _mm512_cvtepi32_epi16(bf16_bits(v)); }
#endif

inline void store(c10::BFloat16* p, Vec v, int64_t n) {
  _mm256_mask_storeu_epi16(p, lanes(n), bf16_half(v));
}

inline void store(c10::Half* p, Vec v, int64_t n) {
  _mm256_mask_storeu_epi16(p, lanes(n), half_bits(v));
}

// Each lane rounded to scalar_t and widened back: what storing and reloading it gives.
template <typename scalar_t>
inline Vec round_to(Vec v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_half(v)), 16));
  } else {
    return _mm512_cvtph_ps(half_bits(v));
  }
}
#else
constexpr int64_t kLanes = 1;
using Vec = float;

inline Vec add(Vec a, Vec b) { return a + b; }
inline Vec sub(Vec a, Vec b) { return a - b; }
inline Vec mul(Vec a, Vec b) { return a * b; }
inline Vec splat(float x) { return x; }
inline float sum(Vec v) { return v; }

template <typename scalar_t>
inline Vec load(const scalar_t* p, int64_t) { return static_cast<float>(*p); }

template <typename scalar_t>
inline void store(scalar_t* p, Vec v, int64_t) { *p = static_cast<scalar_t>(v); }

template <typename scalar_t>
inline Vec round_to(Vec v) { return static_cast<float>(static_cast<scalar_t>(v)); }
#endif

// Row r of a tensor whose last dimension is contiguous, by its leading sizes and strides:
// a row view such as q_norm's [tokens, heads, head_dim] slice of the qkv output is read in
// place, without the copy a reshape to 2-d would make.
struct Rows {
  std::vector<int64_t> sizes, strides;

  explicit Rows(const torch::Tensor& t)
      : sizes(t.sizes().begin(), t.sizes().end() - 1),
        strides(t.strides().begin(), t.strides().end() - 1) {}

  int64_t count() const {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    return n;
  }

  int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      off += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return off;
  }
};

// Rows per parallel task: about this many elements each, so that a few rows (a small decode
// batch) stay on one thread, whose fork would cost more than their work.
constexpr int64_t kGrainElements = 16384;

template <typename scalar_t>
void rms_norm_impl(const torch::Tensor& x, scalar_t* residual, const torch::Tensor& weight,
                   float eps, torch::Tensor& out) {
  const Rows rows(x);
  const int64_t hidden = x.size(-1);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float n_hidden = static_cast<float>(hidden);
  at::parallel_for(0, rows.count(), std::max<int64_t>(1, kGrainElements / hidden),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x_ptr + rows.offset(r);
      // With a residual, the row normed is the residual stream after the add, written back.
      scalar_t* rr = residual != nullptr ? residual + r * hidden : nullptr;
      const scalar_t* src = rr != nullptr ? rr : xr;
      Vec acc = splat(0.f);
      for (int64_t i = 0; i < hidden; i += kLanes) {
        const int64_t n = std::min(kLanes, hidden - i);
        Vec v = load(xr + i, n);
        if (rr != nullptr) {
          v = round_to<scalar_t>(add(load(rr + i, n), v));
          store(rr + i, v, n);
        }
        acc = add(acc, mul(v, v));
      }
      // torch's mean divides the sum; rsqrt is 1 / sqrt, each correctly rounded.
      const float inv_rms = 1.f / std::sqrt(sum(acc) / n_hidden + eps);
      scalar_t* o = out_ptr + r * hidden;
      for (int64_t i = 0; i < hidden; i += kLanes) {
        const int64_t n = std::min(kLanes, hidden - i);
        const Vec normed = round_to<scalar_t>(mul(load(src + i, n), splat(inv_rms)));
        store(o + i, mul(load(w + i, n), normed), n);
      }
    }
  });
}

void check_norm_args(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, "x must be contiguous in its last dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(-1),
              "weight must be a contiguous [hidden] vector");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  auto out = torch::empty(x.sizes(), x.options());
  DISPATCH_MODEL_TYPES(x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x, nullptr, weight, static_cast<float>(eps), out);
  });
  return out;
}

// The `RMSNorm.fused_add_norm` hook: residual += x in place, returns the normed residual.
torch::Tensor fused_add_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                 torch::Tensor& residual) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous, with x's shape and dtype");
  auto out = torch::empty(x.sizes(), x.options());
  DISPATCH_MODEL_TYPES(x.scalar_type(), "fused_add_rms_norm", [&] {
    rms_norm_impl<scalar_t>(x, residual.data_ptr<scalar_t>(), weight,
                            static_cast<float>(eps), out);
  });
  return out;
}

// One head's rotary part in place: x1 * cos - x2 * sin and x2 * cos + x1 * sin over its two
// halves (cos and sin already rounded), each product and sum rounded to scalar_t. Where `dst`
// is given, the result also goes there.
template <typename scalar_t>
inline void rotate_head(scalar_t* x, scalar_t* dst, const float* cos, const float* sin,
                        int64_t half) {
  for (int64_t i = 0; i < half; i += kLanes) {
    const int64_t n = std::min(kLanes, half - i);
    const Vec x1 = load(x + i, n), x2 = load(x + half + i, n);
    const Vec lo = sub(round_to<scalar_t>(mul(x1, load(cos + i, n))),
                       round_to<scalar_t>(mul(x2, load(sin + i, n))));
    const Vec hi = add(round_to<scalar_t>(mul(x2, load(cos + half + i, n))),
                       round_to<scalar_t>(mul(x1, load(sin + half + i, n))));
    store(x + i, lo, n);
    store(x + half + i, hi, n);
    if (dst != nullptr) {
      store(dst + i, lo, n);
      store(dst + half + i, hi, n);
    }
  }
}

template <typename scalar_t, typename cache_t>
void rope_store_kv_impl(const torch::Tensor& positions, torch::Tensor& q, torch::Tensor& k,
                        const torch::Tensor& v, const torch::Tensor& cos_table,
                        const torch::Tensor& sin_table, int64_t rotary_dim,
                        torch::Tensor& k_buffer, torch::Tensor& v_buffer,
                        const torch::Tensor& slot_index) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_index.data_ptr<int64_t>();
  const cache_t* cos_cache = cos_table.data_ptr<cache_t>();
  const cache_t* sin_cache = sin_table.data_ptr<cache_t>();
  const int64_t tokens = q.size(0);
  const int64_t head_dim = k_buffer.size(2);
  const int64_t q_heads = q.size(1) / head_dim, kv_heads = k.size(1) / head_dim;
  const int64_t half = rotary_dim / 2;
  scalar_t* q_ptr = q.data_ptr<scalar_t>();
  scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  scalar_t* k_pool = k_buffer.data_ptr<scalar_t>();
  scalar_t* v_pool = v_buffer.data_ptr<scalar_t>();
  const int64_t pool_head = k_buffer.stride(0), pool_slot = k_buffer.stride(1);
  const int64_t per_token = (q_heads + 2 * kv_heads) * head_dim;
  at::parallel_for(0, tokens, std::max<int64_t>(1, kGrainElements / per_token),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> cos(rotary_dim), sin(rotary_dim);
    for (int64_t t = begin; t < end; ++t) {
      // RotaryEmbedding takes cos and sin in the dtype of q.
      const cache_t* cos_row = cos_cache + pos[t] * rotary_dim;
      const cache_t* sin_row = sin_cache + pos[t] * rotary_dim;
      for (int64_t i = 0; i < rotary_dim; i += kLanes) {
        const int64_t n = std::min(kLanes, rotary_dim - i);
        store(cos.data() + i, round_to<scalar_t>(load(cos_row + i, n)), n);
        store(sin.data() + i, round_to<scalar_t>(load(sin_row + i, n)), n);
      }
      scalar_t* qt = q_ptr + t * q.stride(0);
      for (int64_t h = 0; h < q_heads; ++h) {
        rotate_head(qt + h * head_dim, static_cast<scalar_t*>(nullptr), cos.data(), sin.data(),
                    half);
      }
      scalar_t* kt = k_ptr + t * k.stride(0);
      const scalar_t* vt = v_ptr + t * v.stride(0);
      for (int64_t h = 0; h < kv_heads; ++h) {
        scalar_t* k_slot = k_pool + h * pool_head + slots[t] * pool_slot;
        rotate_head(kt + h * head_dim, k_slot, cos.data(), sin.data(), half);
        // Partial rotary: the values past rotary_dim pass unchanged.
        std::memcpy(k_slot + rotary_dim, kt + h * head_dim + rotary_dim,
                    (head_dim - rotary_dim) * sizeof(scalar_t));
        std::memcpy(v_pool + h * pool_head + slots[t] * pool_slot, vt + h * head_dim,
                    head_dim * sizeof(scalar_t));
      }
    }
  });
}

// q: [tokens, heads * head_dim], k and v: [tokens, kv_heads * head_dim], each contiguous in
// its rows only (the views `split` makes of the qkv projection); positions and slots: int64
// [tokens]; cos_cache, sin_cache: [max_position, rotary_dim], fp32 or q's dtype (the loader
// casts the whole model, tables included); k_buffer and v_buffer: the layer's pool buffers
// [kv_heads, slots, head_dim].
void rope_store_kv(const torch::Tensor& positions, torch::Tensor& q, torch::Tensor& k,
                   const torch::Tensor& v, const torch::Tensor& cos_cache,
                   const torch::Tensor& sin_cache, int64_t rotary_dim,
                   torch::Tensor& k_buffer, torch::Tensor& v_buffer,
                   const torch::Tensor& slots) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->size(0) == q.size(0),
                "q, k and v must be [tokens, heads * head_dim], contiguous in their rows");
    TORCH_CHECK(t->scalar_type() == k_buffer.scalar_type(),
                "q, k, v and the pool's dtypes differ");
  }
  for (const auto* t : {&positions, &slots}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() &&
                    t->numel() == q.size(0),
                "positions and slots must be contiguous int64 [tokens]");
  }
  for (const auto* t : {&cos_cache, &sin_cache}) {
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(1) == rotary_dim,
                "cos and sin caches must be contiguous [positions, rotary_dim]");
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 || t->scalar_type() == q.scalar_type(),
                "cos and sin caches must be fp32 or in q's dtype");
  }
  TORCH_CHECK(cos_cache.scalar_type() == sin_cache.scalar_type(), "cos and sin dtypes differ");
  TORCH_CHECK(k_buffer.dim() == 3 && k_buffer.sizes() == v_buffer.sizes() &&
                  k_buffer.strides() == v_buffer.strides() && k_buffer.stride(2) == 1 &&
                  v_buffer.scalar_type() == k_buffer.scalar_type(),
              "k and v pool buffers must be alike [kv_heads, slots, head_dim]");
  const int64_t head_dim = k_buffer.size(2);
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "bad rotary_dim");
  TORCH_CHECK(q.size(1) % head_dim == 0 && k.size(1) == k_buffer.size(0) * head_dim &&
                  v.size(1) == k.size(1),
              "q, k and v widths do not match the pool's heads");
  DISPATCH_MODEL_TYPES(q.scalar_type(), "rope_store_kv", [&] {
    if (cos_cache.scalar_type() == torch::kFloat32) {
      rope_store_kv_impl<scalar_t, float>(positions, q, k, v, cos_cache, sin_cache, rotary_dim,
                                          k_buffer, v_buffer, slots);
    } else {
      rope_store_kv_impl<scalar_t, scalar_t>(positions, q, k, v, cos_cache, sin_cache,
                                             rotary_dim, k_buffer, v_buffer, slots);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("fused_add_rms_norm", &fused_add_rms_norm,
        "residual += x in place, then RMSNorm of the residual");
  m.def("rope_store_kv", &rope_store_kv,
        "rope on q and k in place, and k and v written into the KV pool");
}
