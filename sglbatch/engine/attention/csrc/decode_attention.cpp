// Paged decode attention for the CPU: one query token per request, K/V read straight from
// the head-major pool through each request's slot row, so no gathered copy is made.
//
// Work is split over (request, kv head); a task computes the scores of the kv head's
// query heads against every key in one pass (each key row is loaded once for the group),
// then the softmax, then the weighted sum of values. Accumulation is fp32 whatever the
// pool's dtype. Besides the output it returns each head's log-sum-exp, so a caller can
// merge it with attention over other keys (a shared prefix) exactly.
//
// A sliding window moves a request's first key up to its window's start: the keys before
// it stay in the pool but are never read, so a long context costs only its window. A logit
// soft-cap s maps each scaled score x to s * tanh(x / s) before the softmax.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "common.h"

#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using sglbatch::to_float;

// Scores q.k for every key, written to scores[g * len + t]; false where no fast path
// exists (the caller then runs the portable loop).
template <typename scalar_t, int64_t HEAD_DIM>
bool fast_scores(const float*, int64_t, const scalar_t*, const int64_t*, int64_t, float*) {
  return false;
}

#if defined(__AVX512F__)
inline __m512 bf16x16_to_fp32(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Element j of the result is the sum of v[j]'s 16 lanes: a transpose folded into adds,
// ~3 instructions per vector instead of a ~8-instruction horizontal sum each.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8];  // per 128-bit lane: rows 2i, 2i+1 summed down to two partials each
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 quads[4];  // per 128-bit lane: the lane's totals of rows 4k .. 4k+3
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
    quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Add the four 128-bit lanes of each quad: lane k of the result holds rows 4k .. 4k+3.
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
}

// bf16 keys of 64 dims: each key row is converted once and dotted with every query head of
// the group into a 16-lane partial; 16 keys' partials are then summed together.
template <>
bool fast_scores<c10::BFloat16, 64>(const float* qf, int64_t group, const c10::BFloat16* k_head,
                                    const int64_t* slots, int64_t len, float* scores) {
  constexpr int kMaxGroup = 8;
  if (group > kMaxGroup) return false;
  __m512 q[kMaxGroup][4];
  for (int64_t g = 0; g < group; ++g) {
    for (int i = 0; i < 4; ++i) q[g][i] = _mm512_loadu_ps(qf + g * 64 + 16 * i);
  }
  auto partial = [&](int64_t g, const __m512* kf) {
    return _mm512_add_ps(_mm512_fmadd_ps(q[g][0], kf[0], _mm512_mul_ps(q[g][1], kf[1])),
                         _mm512_fmadd_ps(q[g][2], kf[2], _mm512_mul_ps(q[g][3], kf[3])));
  };
  __m512 parts[kMaxGroup][16];
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) {
    for (int j = 0; j < 16; ++j) {
      const c10::BFloat16* k = k_head + slots[t + j] * 64;
      const __m512 kf[4] = {bf16x16_to_fp32(k), bf16x16_to_fp32(k + 16),
                            bf16x16_to_fp32(k + 32), bf16x16_to_fp32(k + 48)};
      for (int64_t g = 0; g < group; ++g) parts[g][j] = partial(g, kf);
    }
    for (int64_t g = 0; g < group; ++g) {
      _mm512_storeu_ps(scores + g * len + t, sum_lanes16(parts[g]));
    }
  }
  for (; t < len; ++t) {
    const c10::BFloat16* k = k_head + slots[t] * 64;
    const __m512 kf[4] = {bf16x16_to_fp32(k), bf16x16_to_fp32(k + 16), bf16x16_to_fp32(k + 32),
                          bf16x16_to_fp32(k + 48)};
    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = _mm512_reduce_add_ps(partial(g, kf));
  }
  return true;
}
#endif

// HEAD_DIM > 0 fixes the head size at compile time, so the inner loops unroll into whole
// vector registers; 0 reads it from the tensors.
template <typename scalar_t, int64_t HEAD_DIM>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_buf,
                           const torch::Tensor& v_buf, const torch::Tensor& req_to_token,
                           const torch::Tensor& rows, const torch::Tensor& starts,
                           const torch::Tensor& ends, double scale, int64_t window,
                           double softcap, torch::Tensor& out, torch::Tensor& lse) {
  const int64_t batch = q.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : q.size(2);
  const int64_t num_kv_heads = k_buf.size(0);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t pool_stride = k_buf.stride(0);  // elements between kv heads
  const int64_t table_stride = req_to_token.stride(0);

  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_buf.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_buf.data_ptr<scalar_t>();
  const int64_t* table = req_to_token.data_ptr<int64_t>();
  const int64_t* row_ptr = rows.data_ptr<int64_t>();
  const int64_t* start_ptr = starts.data_ptr<int64_t>();
  const int64_t* end_ptr = ends.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  float* lse_ptr = lse.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const float cap = static_cast<float>(softcap);
  const float inv_cap = softcap > 0 ? static_cast<float>(1.0 / softcap) : 0.f;

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t finish) {
    std::vector<float> qf(group * head_dim);
    std::vector<float> acc(group * head_dim);
    std::vector<float> row(head_dim);
    std::vector<float> scores;
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t b = task / num_kv_heads;
      const int64_t kh = task % num_kv_heads;
      // The query is at position end - 1; its window holds the last `window` keys.
      const int64_t first =
          window > 0 ? std::max(start_ptr[b], end_ptr[b] - window) : start_ptr[b];
      const int64_t len = end_ptr[b] - first;
      const int64_t* slots = table + row_ptr[b] * table_stride + first;
      const scalar_t* k_head = k_ptr + kh * pool_stride;
      const scalar_t* v_head = v_ptr + kh * pool_stride;
      float* o = out_ptr + (b * num_heads + kh * group) * head_dim;
      float* l = lse_ptr + b * num_heads + kh * group;
      if (len <= 0) {
        // No keys: an empty softmax part, which a log-sum-exp merge weighs as zero.
        std::fill(o, o + group * head_dim, 0.f);
        std::fill(l, l + group, -std::numeric_limits<float>::infinity());
        continue;
      }
      for (int64_t i = 0; i < group * head_dim; ++i) {
        qf[i] = to_float(q_ptr[(b * num_heads + kh * group) * head_dim + i]) * fscale;
      }
      scores.resize(group * len);
      if (!fast_scores<scalar_t, HEAD_DIM>(qf.data(), group, k_head, slots, len,
                                            scores.data())) {
        for (int64_t t = 0; t < len; ++t) {
          const scalar_t* k_row = k_head + slots[t] * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(k_row[d]);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
            scores[g * len + t] = dot;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        if (softcap > 0) {
          for (int64_t t = 0; t < len; ++t) s[t] = cap * std::tanh(s[t] * inv_cap);
        }
        float max = std::numeric_limits<float>::lowest();
        for (int64_t t = 0; t < len; ++t) max = std::max(max, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - max);
          sum += s[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
        l[g] = max + std::log(sum);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const scalar_t* v_row = v_head + slots[t] * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(v_row[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
        }
      }
      std::memcpy(o, acc.data(), group * head_dim * sizeof(float));
    }
  });
}

}  // namespace

// q: [batch, heads, head_dim]; k_buf, v_buf: [kv_heads, slots, head_dim] (one layer);
// request b attends to slots req_to_token[rows[b], starts[b]:ends[b]], and with window > 0
// only to the last `window` of its sequence (column = position; ends[b] - 1 is the query's).
// softcap > 0 soft-caps the scaled scores; 0 leaves them as they are.
// Returns (out [batch, heads, head_dim] fp32, lse [batch, heads] fp32).
std::vector<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k_buf,
                                            const torch::Tensor& v_buf,
                                            const torch::Tensor& req_to_token,
                                            const torch::Tensor& rows, const torch::Tensor& starts,
                                            const torch::Tensor& ends, double scale,
                                            int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "expected 3-d q and pools");
  TORCH_CHECK(q.is_contiguous() && k_buf.is_contiguous() && v_buf.is_contiguous(),
              "q and the pools must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_buf.scalar_type() && k_buf.scalar_type() == v_buf.scalar_type(),
              "q and the pools must share a dtype");
  TORCH_CHECK(q.size(1) % k_buf.size(0) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_buf.size(2), "head_dim of q and the pool differ");
  for (const auto* t : {&req_to_token, &rows, &starts, &ends}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "index tensors must be contiguous int64");
  }
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] {
                                    auto run = [&](auto head_dim) {
                                      decode_attention_impl<scalar_t, decltype(head_dim)::value>(
                                          q, k_buf, v_buf, req_to_token, rows, starts, ends,
                                          scale, window, softcap, out, lse);
                                    };
                                    sglbatch::dispatch_head_dim(q.size(2), run);
                                  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Paged decode attention with log-sum-exp");
}
