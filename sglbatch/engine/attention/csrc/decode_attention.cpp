// Paged decode attention for the CPU: one query token per request, K/V read straight from
// the head-major pool through each request's slot row, so no gathered copy is made.
//
// A task is (request, kv head, key range). It walks its keys in chunks with an online
// softmax: a chunk's scores for all the kv head's query heads (each key row loaded once for
// the group), their exponentials against the running max, then the weighted values. A chunk's
// scores stay in L1, and a request with few kv heads splits its keys over several tasks,
// merged by their maxima and sums, so a small batch still uses every thread. Accumulation
// is fp32 whatever the pool's dtype. Besides the output it returns each head's log-sum-exp,
// so a caller can merge it with attention over other keys (a shared prefix) exactly.
//
// With AVX512-BF16, bf16 pools of 64-dim multiples take a fast path: q.k as bf16 pair dot
// products (vdpbf16ps, fp32 sums, exact products) with no conversion of K, and the values
// summed the same way against the probabilities rounded to bf16 (as the extend kernel and
// transformers' bf16 attention do), two keys per instruction. Pool rows are prefetched
// ahead into L2 (slots are scattered, where the hardware prefetchers cannot follow).
//
// A sliding window moves a request's first key up to its window's start: the keys before
// it stay in the pool but are never read, so a long context costs only its window. A logit
// soft-cap s maps each scaled score x to s * tanh(x / s) before the softmax.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using sglbatch::bf16_pair;
using sglbatch::kBf16Dot;
using sglbatch::Cache;
using sglbatch::to_float;
using sglbatch::with_width;
#if defined(__AVX512F__)
using sglbatch::exp_avx512;
using sglbatch::first_lanes;
#endif
#if defined(__AVX512BF16__)
using sglbatch::bf16_bits;
#endif

// Keys per online-softmax step: the chunk's K and V rows (8 KiB each at 64 dims) and its
// scores stay in L1 between the q.k and p.v passes.
constexpr int64_t kChunkKeys = 64;
// Splitting a request's keys over tasks: up to this many tasks per thread, each with at
// least kMinSplitKeys keys (fewer would cost more in setup and merging than they save).
constexpr int64_t kTasksPerThread = 8;
constexpr int64_t kMinSplitKeys = 128;
// The running max before any key: finite, so fast-math meets no infinity.
constexpr float kNoMax = -1e30f;
// How far ahead pool rows are prefetched, in bytes of K (or V) rows: 32 keys of 64 bf16
// cover a load from DRAM (8 left a third of the time waiting on memory at batch 256;
// 16 and 64 measured no better).
constexpr int64_t kAheadBytes = 4096;

// Decode reads every row once, a few KB after its prefetch (see Cache).
inline void prefetch_l2(const void* row, int64_t bytes) {
  sglbatch::prefetch_row<Cache::kL2>(row, bytes);
}

// The keys ahead to prefetch, for rows of this many bytes.
constexpr int64_t keys_ahead(int64_t row_bytes) {
  return std::max<int64_t>(4, kAheadBytes / row_bytes);
}


// Folds one chunk's scores s[0, n) into a head's running max and sum: s becomes
// exp(s - max). Returns the factor the head's earlier terms are rescaled by.
float softmax_step(float* s, int64_t n, float& max, float& sum) {
  float next = max;  // the max after this chunk
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(max);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = first_lanes(n - t);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + t));
  }
  next = _mm512_reduce_max_ps(vmax);
  const __m512 vnext = _mm512_set1_ps(next);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = first_lanes(n - t);
    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vnext));
    _mm512_mask_storeu_ps(s + t, m, p);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, p));
  }
  const float chunk_sum = _mm512_reduce_add_ps(vsum);
#else
  for (int64_t t = 0; t < n; ++t) next = std::max(next, s[t]);
  float chunk_sum = 0.f;
#pragma omp simd reduction(+ : chunk_sum)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - next);
    chunk_sum += s[t];
  }
#endif
  const float alpha = std::exp(max - next);
  max = next;
  sum = sum * alpha + chunk_sum;
  return alpha;
}

// Per-worker buffers, sized once per call.
struct Scratch {
  std::vector<float> q;  // portable: the group's queries, scaled, fp32 [group][dim]
  std::vector<float> row;  // portable: one K or V row as fp32
  std::vector<float> s;  // scores, then probabilities: [group][kChunkKeys]
  std::vector<c10::BFloat16> p;  // AVX512-BF16: the probabilities [group][kChunkKeys]
  std::vector<float> acc, max, sum;  // [group][dim], [group], [group]
};

// ---- portable kernels ----------------------------------------------------------------

// s[g][t] = q[g] . k[t] (q already scaled) for the chunk's keys; K and V rows are
// prefetched from the `avail` keys at `slots`.
template <typename scalar_t, int64_t HEAD_DIM>
void scores_portable(const float* qf, int64_t group, int64_t dim, const scalar_t* k_head,
                     const scalar_t* v_head, const int64_t* slots, int64_t n, int64_t avail,
                     float* row, float* s) {
  const int64_t ahead = keys_ahead(dim * sizeof(scalar_t));
  for (int64_t t = 0; t < n; ++t) {
    if (t + ahead < avail) {
      prefetch_l2(k_head + slots[t + ahead] * dim, dim * sizeof(scalar_t));
      prefetch_l2(v_head + slots[t + ahead] * dim, dim * sizeof(scalar_t));
    }
    const scalar_t* k = k_head + slots[t] * dim;
    const float* kf = row;  // fp32 rows are read in the pool
    if constexpr (std::is_same_v<scalar_t, float>) {
      kf = k;
    } else {
      for (int64_t d = 0; d < (HEAD_DIM > 0 ? HEAD_DIM : dim); ++d) row[d] = to_float(k[d]);
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * dim;
      float dot = 0.f;
      // (Vectorized under fast-math; an omp simd reduction here, inlined into the task
      // loop, made GCC keep its lanes in memory and run the loop scalar.)
      for (int64_t d = 0; d < (HEAD_DIM > 0 ? HEAD_DIM : dim); ++d) dot += qg[d] * kf[d];
      s[g * kChunkKeys + t] = dot;
    }
  }
}

// acc[g] += sum_t p[g][t] * v[t] for the chunk's keys.
template <typename scalar_t, int64_t HEAD_DIM>
void values_portable(const float* p, int64_t group, int64_t dim, const scalar_t* v_head,
                     const int64_t* slots, int64_t n, int64_t avail, float* row, float* acc) {
  const int64_t ahead = keys_ahead(dim * sizeof(scalar_t));
  for (int64_t t = 0; t < n; ++t) {
    // Again: the q.k pass prefetched this row, but a prefetch is dropped when too many
    // loads are in flight (measured: without this, 10% slower).
    if (t + ahead < avail) prefetch_l2(v_head + slots[t + ahead] * dim, dim * sizeof(scalar_t));
    const scalar_t* v = v_head + slots[t] * dim;
    for (int64_t d = 0; d < (HEAD_DIM > 0 ? HEAD_DIM : dim); ++d) row[d] = to_float(v[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float pg = p[g * kChunkKeys + t];
      float* a = acc + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < (HEAD_DIM > 0 ? HEAD_DIM : dim); ++d) a[d] += pg * row[d];
    }
  }
}

// ---- AVX512-BF16 kernels ---------------------------------------------------------------
#if defined(__AVX512BF16__)

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

// Scores of HEADS query heads (bf16 rows of HEAD_DIM) against the chunk's n keys, times
// scale, into s[h][t]: each key's 16-lane partial sums, 16 keys at a time, are added across
// lanes together. `avail` keys from `slots` exist: K and V rows are prefetched from them.
template <int HEADS, int64_t HEAD_DIM>
void scores_bf16(const c10::BFloat16* q, const c10::BFloat16* k_head,
                 const c10::BFloat16* v_head, const int64_t* slots, int64_t n, int64_t avail,
                 float scale, float* s) {
  constexpr int kVecs = HEAD_DIM / 32;
  __m512bh qv[HEADS][kVecs];
  for (int h = 0; h < HEADS; ++h) {
    for (int i = 0; i < kVecs; ++i) {
      qv[h][i] = (__m512bh)_mm512_loadu_si512(q + h * HEAD_DIM + 32 * i);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  constexpr int64_t kAhead = keys_ahead(HEAD_DIM * 2);
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t keys = std::min<int64_t>(16, n - t);
    __m512 parts[HEADS][16];
    for (int j = 0; j < 16; ++j) {
      if (j >= keys) {
        for (int h = 0; h < HEADS; ++h) parts[h][j] = _mm512_setzero_ps();
        continue;
      }
      if (t + j + kAhead < avail) {
        prefetch_l2(k_head + slots[t + j + kAhead] * HEAD_DIM, HEAD_DIM * 2);
        prefetch_l2(v_head + slots[t + j + kAhead] * HEAD_DIM, HEAD_DIM * 2);
      }
      const c10::BFloat16* k = k_head + slots[t + j] * HEAD_DIM;
      __m512bh kv[kVecs];
      for (int i = 0; i < kVecs; ++i) kv[i] = (__m512bh)_mm512_loadu_si512(k + 32 * i);
      for (int h = 0; h < HEADS; ++h) {
        __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), kv[0], qv[h][0]);
        for (int i = 1; i < kVecs; ++i) dot = _mm512_dpbf16_ps(dot, kv[i], qv[h][i]);
        parts[h][j] = dot;
      }
    }
    for (int h = 0; h < HEADS; ++h) {
      _mm512_mask_storeu_ps(s + h * kChunkKeys + t, first_lanes(keys),
                            _mm512_mul_ps(sum_lanes16(parts[h]), vscale));
    }
  }
}

// acc[h][0, 64) += sum_t p[h][t] * v[t][0, 64) for HEADS heads, v pointing at a 64-dim slice
// of the head's rows and p[h] the chunk's probabilities as bf16 (a zero after an odd n).
// Keys go in pairs, as vdpbf16ps wants them: two rows' 16-bit words interleaved (one unpack
// per 16 dims) against each head's two probabilities, one dot product per 16 dims and head.
// The unpacks leave the accumulators in pair order, kept so across chunks:
// `from_pair_order` restores the dims at the task's end.
template <int HEADS, int64_t HEAD_DIM>
void values_bf16(const c10::BFloat16* p, const c10::BFloat16* v, const int64_t* slots, int64_t n,
                 int64_t avail, float* acc) {
  constexpr int64_t kAhead = keys_ahead(HEAD_DIM * 2);
  __m512 a[HEADS][4];
  for (int h = 0; h < HEADS; ++h) {
    for (int c = 0; c < 4; ++c) a[h][c] = _mm512_loadu_ps(acc + h * HEAD_DIM + 16 * c);
  }
  for (int64_t t = 0; t < n; t += 2) {
    // Again, as in values_portable.
    for (int64_t ahead = t + kAhead; ahead < std::min(t + kAhead + 2, avail); ++ahead) {
      prefetch_l2(v + slots[ahead] * HEAD_DIM, 128);
    }
    const c10::BFloat16* row0 = v + slots[t] * HEAD_DIM;
    // An odd chunk's last key pairs with itself, weighted by the zero after it.
    const c10::BFloat16* row1 = t + 1 < n ? v + slots[t + 1] * HEAD_DIM : row0;
    __m512bh pairs[4];
    for (int c = 0; c < 2; ++c) {
      const __m512i x0 = _mm512_loadu_si512(row0 + 32 * c);
      const __m512i x1 = _mm512_loadu_si512(row1 + 32 * c);
      pairs[2 * c] = (__m512bh)_mm512_unpacklo_epi16(x0, x1);
      pairs[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
    }
    for (int h = 0; h < HEADS; ++h) {
      const uint32_t word = bf16_pair(p + h * kChunkKeys, t / 2);
      const __m512bh ph = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
      for (int c = 0; c < 4; ++c) a[h][c] = _mm512_dpbf16_ps(a[h][c], pairs[c], ph);
    }
  }
  for (int h = 0; h < HEADS; ++h) {
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + h * HEAD_DIM + 16 * c, a[h][c]);
  }
}

// Where values_bf16's unpacks put the dims of a 64-dim slice: vector 2c (unpacklo) lane i
// holds dim 32c + 8 * (i / 4) + i % 4, vector 2c + 1 (unpackhi) the dim 4 above it.
// Rearranges the slice's 64 floats into dim order in place.
inline void from_pair_order(float* slice) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22,
                                          23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int c = 0; c < 2; ++c) {
    const __m512 lo = _mm512_loadu_ps(slice + 32 * c);
    const __m512 hi = _mm512_loadu_ps(slice + 32 * c + 16);
    _mm512_storeu_ps(slice + 32 * c, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(slice + 32 * c + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}

// The chunk's probabilities s[g][0, n) of each head as bf16 (rounded to nearest even) in
// p[g], and a zero after them for an odd n: values_bf16's pairs.
inline void probabilities_bf16(const float* s, int64_t group, int64_t n, c10::BFloat16* p) {
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = first_lanes(n - t);
      const __m512 x = _mm512_maskz_loadu_ps(m, s + g * kChunkKeys + t);
      _mm256_mask_storeu_epi16(p + g * kChunkKeys + t, m, bf16_bits(x));
    }
    if (n % 2) p[g * kChunkKeys + n] = 0.f;
  }
}
#endif

// ---- one task ----------------------------------------------------------------------------

struct Args {
  const void* q;
  const void* k;
  const void* v;
  int64_t pool_stride;  // elements between kv heads
  const int64_t* table;
  int64_t table_stride;
  const int64_t *rows, *starts, *ends;
  int64_t num_heads, group, head_dim, window;
  float scale, softcap;
};

// The first key request b attends: its window's start, or its own first column.
inline int64_t first_key(const Args& a, int64_t b) {
  // The query is at position end - 1; its window holds the last `window` keys.
  return a.window > 0 ? std::max(a.starts[b], a.ends[b] - a.window) : a.starts[b];
}

// Attends the kv head's query heads of request b to its keys [k0, k1), adding to the
// unnormalized sums in w.acc and each head's running max and sum in w.max, w.sum.
template <typename scalar_t, int64_t HEAD_DIM>
void attend(const Args& a, int64_t b, int64_t kv_head, int64_t k0, int64_t k1, Scratch& w) {
  const int64_t group = a.group;
  const int64_t dim = HEAD_DIM > 0 ? HEAD_DIM : a.head_dim;
  const scalar_t* q =
      static_cast<const scalar_t*>(a.q) + (b * a.num_heads + kv_head * group) * dim;
  const scalar_t* k_head = static_cast<const scalar_t*>(a.k) + kv_head * a.pool_stride;
  const scalar_t* v_head = static_cast<const scalar_t*>(a.v) + kv_head * a.pool_stride;
  const int64_t* slots = a.table + a.rows[b] * a.table_stride;
  float* s = w.s.data();
  float* acc = w.acc.data();
  if constexpr (!kBf16Dot<scalar_t, HEAD_DIM>) {
    for (int64_t i = 0; i < group * dim; ++i) w.q[i] = to_float(q[i]) * a.scale;
  }
  // The first keys, which no earlier key prefetched: their loads overlap each other.
  for (int64_t t = k0; t < std::min(k1, k0 + keys_ahead(dim * sizeof(scalar_t))); ++t) {
    prefetch_l2(k_head + slots[t] * dim, dim * sizeof(scalar_t));
    prefetch_l2(v_head + slots[t] * dim, dim * sizeof(scalar_t));
  }
  for (int64_t c0 = k0; c0 < k1; c0 += kChunkKeys) {
    const int64_t n = std::min(kChunkKeys, k1 - c0);
    const int64_t* chunk = slots + c0;
#if defined(__AVX512BF16__)
    if constexpr (kBf16Dot<scalar_t, HEAD_DIM>) {
      // Heads in tiles of 4: their accumulators fill half the vector registers.
      for (int64_t h = 0; h < group; h += 4) {
        with_width<4>(group - h, [&](auto heads) {
          scores_bf16<decltype(heads)::value, HEAD_DIM>(q + h * dim, k_head, v_head, chunk, n,
                                                         k1 - c0, a.scale, s + h * kChunkKeys);
        });
      }
    } else  // (without AVX512-BF16, the only branch)
#endif
    {
      scores_portable<scalar_t, HEAD_DIM>(w.q.data(), group, dim, k_head, v_head, chunk, n,
                                          k1 - c0, w.row.data(), s);
    }
    for (int64_t g = 0; g < group; ++g) {
      float* sg = s + g * kChunkKeys;
      if (a.softcap > 0) {
        const float inv = 1.f / a.softcap;
        for (int64_t t = 0; t < n; ++t) sg[t] = a.softcap * std::tanh(sg[t] * inv);
      }
      const float alpha = softmax_step(sg, n, w.max[g], w.sum[g]);
      if (c0 > k0) {
        for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] *= alpha;
      }
    }
#if defined(__AVX512BF16__)
    if constexpr (kBf16Dot<scalar_t, HEAD_DIM>) {
      probabilities_bf16(s, group, n, w.p.data());
      for (int64_t slice = 0; slice < dim; slice += 64) {
        for (int64_t h = 0; h < group; h += 4) {
          with_width<4>(group - h, [&](auto heads) {
            values_bf16<decltype(heads)::value, HEAD_DIM>(w.p.data() + h * kChunkKeys,
                                                           v_head + slice, chunk, n, k1 - c0,
                                                           acc + h * dim + slice);
          });
        }
      }
    } else  // (without AVX512-BF16, the only branch)
#endif
    {
      values_portable<scalar_t, HEAD_DIM>(s, group, dim, v_head, chunk, n, k1 - c0,
                                          w.row.data(), acc);
    }
  }
#if defined(__AVX512BF16__)
  if constexpr (kBf16Dot<scalar_t, HEAD_DIM>) {
    for (int64_t i = 0; i < group * dim; i += 64) from_pair_order(acc + i);
  }
#endif
}

// out = acc / sum and lse = max + log(sum) (acc may be out); an empty part (sum 0) gives
// zeros and -inf.
inline void finish(const float* acc, float max, float sum, int64_t dim, float* out, float* lse) {
  if (sum <= 0) {
    std::fill(out, out + dim, 0.f);
    *lse = -std::numeric_limits<float>::infinity();
    return;
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < dim; ++d) out[d] = acc[d] * inv;
  *lse = max + std::log(sum);
}

template <typename scalar_t, int64_t HEAD_DIM>
void decode_attention_impl(const Args& a, int64_t batch, int64_t num_kv_heads, float* out,
                           float* lse) {
  const int64_t group = a.group;
  const int64_t dim = HEAD_DIM > 0 ? HEAD_DIM : a.head_dim;
  const int64_t threads = at::get_num_threads();
  // Few (request, kv head) pairs: split each one's keys so every thread has work.
  int64_t splits = 1;
  if (threads > 1 && batch * num_kv_heads < kTasksPerThread * threads) {
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, a.ends[b] - first_key(a, b));
    const int64_t wanted = (kTasksPerThread * threads + batch * num_kv_heads - 1) /
                           (batch * num_kv_heads);
    splits = std::max<int64_t>(1, std::min(wanted, longest / kMinSplitKeys));
  }
  // A split task's state, merged below: [batch][heads][splits] (and [dim] for acc).
  std::vector<float> part_acc, part_max, part_sum;
  if (splits > 1) {
    part_acc.resize(batch * a.num_heads * splits * dim);
    part_max.resize(batch * a.num_heads * splits);
    part_sum.resize(batch * a.num_heads * splits);
  }

  const int64_t tasks = batch * num_kv_heads * splits;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min(threads, tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch w;
    if (!kBf16Dot<scalar_t, HEAD_DIM>) {
      w.q.resize(group * dim);
      w.row.resize(dim);
    }
    w.s.resize(group * kChunkKeys);
    if (kBf16Dot<scalar_t, HEAD_DIM>) w.p.resize(group * kChunkKeys);
    w.acc.resize(group * dim);
    w.max.resize(group);
    w.sum.resize(group);
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t split = task % splits;
      const int64_t kv_head = task / splits % num_kv_heads;
      const int64_t b = task / splits / num_kv_heads;
      const int64_t first = first_key(a, b);
      const int64_t len = a.ends[b] - first;
      const int64_t k0 = first + std::max<int64_t>(len, 0) * split / splits;
      const int64_t k1 = first + std::max<int64_t>(len, 0) * (split + 1) / splits;
      const int64_t head0 = b * a.num_heads + kv_head * group;
      // No keys leave an empty softmax part, which the merge weighs as zero.
      std::fill(w.acc.begin(), w.acc.end(), 0.f);
      std::fill(w.max.begin(), w.max.end(), kNoMax);
      std::fill(w.sum.begin(), w.sum.end(), 0.f);
      if (k1 > k0) attend<scalar_t, HEAD_DIM>(a, b, kv_head, k0, k1, w);
      for (int64_t g = 0; g < group; ++g) {
        const float* acc = w.acc.data() + g * dim;
        if (splits > 1) {
          const int64_t p = (head0 + g) * splits + split;
          std::memcpy(part_acc.data() + p * dim, acc, dim * sizeof(float));
          part_max[p] = w.max[g];
          part_sum[p] = w.sum[g];
        } else {
          finish(acc, w.max[g], w.sum[g], dim, out + (head0 + g) * dim, lse + head0 + g);
        }
      }
    }
  });
  if (splits == 1) return;
  for (int64_t head = 0; head < batch * a.num_heads; ++head) {
    const float* pmax = part_max.data() + head * splits;
    const float* psum = part_sum.data() + head * splits;
    const float max = *std::max_element(pmax, pmax + splits);
    float* o = out + head * dim;
    std::fill(o, o + dim, 0.f);
    float sum = 0.f;
    for (int64_t i = 0; i < splits; ++i) {
      const float weight = std::exp(pmax[i] - max);
      const float* acc = part_acc.data() + (head * splits + i) * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] += weight * acc[d];
      sum += weight * psum[i];
    }
    finish(o, max, sum, dim, o, lse + head);
  }
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
  sglbatch::check_indices({&req_to_token, &rows, &starts, &ends});
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  const Args a{q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(0),
               req_to_token.data_ptr<int64_t>(), req_to_token.stride(0),
               rows.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), ends.data_ptr<int64_t>(),
               q.size(1), q.size(1) / k_buf.size(0), q.size(2), window,
               static_cast<float>(scale), static_cast<float>(softcap)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] {
                                    auto run = [&](auto head_dim) {
                                      decode_attention_impl<scalar_t, decltype(head_dim)::value>(
                                          a, q.size(0), k_buf.size(0),
                                          out.data_ptr<float>(), lse.data_ptr<float>());
                                    };
                                    sglbatch::dispatch_head_dim(q.size(2), run);
                                  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Paged decode attention with log-sum-exp");
}
