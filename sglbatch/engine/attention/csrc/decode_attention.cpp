// Paged decode attention for the CPU: one query token per request, K/V read straight from
// the head-major pool through each request's slot row, so no gathered copy is made.
//
// Work is split over (request, kv head); a task computes the scores of the kv head's
// query heads against every key in one pass (each key row is loaded once for the group),
// then the softmax, then the weighted sum of values. Accumulation is fp32 whatever the
// pool's dtype. Besides the output it returns each head's log-sum-exp, so a caller can
// merge it with attention over other keys (a shared prefix) exactly.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(double x) { return static_cast<float>(x); }

inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float to_float(c10::Half x) { return static_cast<float>(x); }

// HEAD_DIM > 0 fixes the head size at compile time, so the inner loops unroll into whole
// vector registers; 0 reads it from the tensors.
template <typename scalar_t, int64_t HEAD_DIM>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_buf,
                           const torch::Tensor& v_buf, const torch::Tensor& req_to_token,
                           const torch::Tensor& rows, const torch::Tensor& starts,
                           const torch::Tensor& ends, double scale, torch::Tensor& out,
                           torch::Tensor& lse) {
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

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t finish) {
    std::vector<float> qf(group * head_dim);
    std::vector<float> acc(group * head_dim);
    std::vector<float> row(head_dim);
    std::vector<float> scores;
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t b = task / num_kv_heads;
      const int64_t kh = task % num_kv_heads;
      const int64_t first = start_ptr[b];
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
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
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
// request b attends to slots req_to_token[rows[b], starts[b]:ends[b]].
// Returns (out [batch, heads, head_dim] fp32, lse [batch, heads] fp32).
std::vector<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k_buf,
                                            const torch::Tensor& v_buf,
                                            const torch::Tensor& req_to_token,
                                            const torch::Tensor& rows, const torch::Tensor& starts,
                                            const torch::Tensor& ends, double scale) {
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
                                    switch (q.size(2)) {
                                      case 64:
                                        decode_attention_impl<scalar_t, 64>(
                                            q, k_buf, v_buf, req_to_token, rows, starts, ends,
                                            scale, out, lse);
                                        break;
                                      case 128:
                                        decode_attention_impl<scalar_t, 128>(
                                            q, k_buf, v_buf, req_to_token, rows, starts, ends,
                                            scale, out, lse);
                                        break;
                                      default:
                                        decode_attention_impl<scalar_t, 0>(
                                            q, k_buf, v_buf, req_to_token, rows, starts, ends,
                                            scale, out, lse);
                                    }
                                  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Paged decode attention with log-sum-exp");
}
