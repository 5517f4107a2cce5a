// Paged extend (prefill) attention for the CPU over a whole ragged batch: each request's new
// tokens attend its cached prefix and, causally, each other, with K/V read straight from the
// head-major pool through the request's slot row (the step's own K/V is already there).
//
// A task is (request, kv head, block of query rows). Its query "lanes" are the block's rows
// times the kv head's query heads, lane m = row * group + head: every key is loaded once per
// task and scored against all lanes at once, and the scores are laid out key-major
// ([key][lane]), so the softmax runs along contiguous lanes. Keys go in blocks with an online
// (flash-attention) softmax in fp32; blocks outside every lane's causal window are never
// read, and only blocks that cross some lane's edge are masked.
//
// With AVX512-BF16, bf16 pools take a fast path: q.k and p.v as bf16 pair dot products
// (vdpbf16ps, fp32 sums) with no conversion of K at all. Everything else runs portable fp32
// register tiles (GCC/Clang vector types at the target's SIMD width). Probabilities are
// rounded to the pool's dtype before p.v, as the torch reference does.

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
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlockKeys = 128;  // keys per online-softmax step
constexpr int64_t kTargetLanes = 96;  // query lanes per task: reuse of each key vs. tasks
constexpr int64_t kLaneAlign = 16;  // lanes are padded to whole 16-float vectors
// The max of a lane that has seen no visible key: finite, so fast-math meets no infinity.
constexpr float kMasked = -1e30f;

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

using sglbatch::bf16_pair;
using sglbatch::kBf16Dot;
using sglbatch::kMinExp;
using sglbatch::prefetch_row;
using sglbatch::to_float;
using sglbatch::with_width;
#if defined(__AVX512F__)
using sglbatch::exp_avx512;
#endif
#if defined(__AVX512BF16__)
using sglbatch::bf16_bits;
#endif

template <typename scalar_t>
inline scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}


// Extend: (request, kv head, its rows first_row ..); shared prefixes: (group, kv head, its
// members first_row ..).
struct Task {
  int64_t req, kv_head, first_row, rows, cost;
};

// Per-worker buffers, sized for the largest task (stride: head_dim rounded up to 16).
struct Scratch {
  std::vector<float> q;  // portable: queries, [head_dim][lanes]
  std::vector<uint32_t> q_pairs;  // bf16: queries' bf16 pairs, [head_dim / 2][lanes]
  std::vector<float> s;  // scores (portable: then probabilities): [key][lanes]
  std::vector<float> kv;  // portable: one block of K or V as fp32 [kBlockKeys][stride]
  std::vector<float> zeros;  // [stride]: a key row that pads a block
  std::vector<uint32_t> p_pairs;  // bf16: probabilities of key pairs, [kBlockKeys / 2][lanes]
  std::vector<uint32_t> v_pairs;  // bf16: values of key pairs, [kBlockKeys / 2][head_dim]
  std::vector<float> acc;  // [lanes][stride]
  std::vector<float> max, sum, alpha, block_max;  // [lanes]: max and sum in scaled units
  std::vector<int32_t> pos, lo;  // [lanes]: the lane's position and first visible key
};

// One block of a task's keys.
struct Block {
  const int64_t* slots;  // of its keys
  int64_t keys, lanes, used;  // keys; lanes, padded and in use
  int32_t first_key;  // its first key's position
  bool masked;  // whether some lane does not see all its keys
};

// Soft-caps the scores in place; returns the scale still to apply to them.
inline float soft_cap(float* s, int64_t n, float scale, float cap) {
  if (cap <= 0) return scale;
  const float inv = scale / cap;
  for (int64_t i = 0; i < n; ++i) s[i] = cap * std::tanh(s[i] * inv);
  return 1.f;
}

// The lane sees the key at position `key`.
inline bool visible(int32_t key, int32_t pos, int32_t lo) { return key <= pos && key >= lo; }

// ---- portable kernels ----------------------------------------------------------------

// The target's own SIMD vector of floats as a GCC/Clang vector type, so the portable
// kernels keep register tiles too (a wider type would be lowered through memory).
#if defined(__AVX512F__)
constexpr int64_t kVec = 16;
constexpr int kTileVecs = 4;  // vectors per register tile row: 32 registers
#elif defined(__AVX__)
constexpr int64_t kVec = 8;
constexpr int kTileVecs = 2;  // 16 registers
#else
constexpr int64_t kVec = 4;
constexpr int kTileVecs = 2;
#endif
typedef float vecf __attribute__((vector_size(kVec * sizeof(float))));

inline vecf load_vec(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_vec(float* p, const vecf& v) { std::memcpy(p, &v, sizeof v); }


// Scores of 4 keys (fp32 rows) against VECS * kVec lanes (queries as [dim][lanes]).
template <int VECS, int64_t HEAD_DIM>
inline void scores_tile(const float* qt, int64_t lanes, const float* const* k, int64_t dim,
                        float* s) {
  vecf acc[4][VECS] = {};
  for (int64_t d = 0; d < (HEAD_DIM > 0 ? HEAD_DIM : dim); ++d) {
    for (int c = 0; c < VECS; ++c) {
      const vecf q = load_vec(qt + d * lanes + kVec * c);
      for (int r = 0; r < 4; ++r) acc[r][c] += k[r][d] * q;
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < VECS; ++c) store_vec(s + r * lanes + kVec * c, acc[r][c]);
  }
}

// s[n][m] = k[n] . q[m] for the block's keys: fp32 rows read in the pool, others converted
// once into kf ([key][stride]).
template <typename scalar_t, int64_t HEAD_DIM>
void scores_portable(const float* qt, int64_t lanes, const scalar_t* k_head,
                     const int64_t* slots, int64_t keys, int64_t dim, int64_t stride,
                     const float* zeros, float* kf, float* s) {
  const float* rows[kBlockKeys];
  for (int64_t n = 0; n < keys; ++n) {
    const scalar_t* k = k_head + slots[n] * dim;
    if constexpr (std::is_same_v<scalar_t, float>) {
      rows[n] = k;
    } else {
      for (int64_t d = 0; d < dim; ++d) kf[n * stride + d] = to_float(k[d]);
      rows[n] = kf + n * stride;
    }
  }
  for (int64_t n = keys; n % 4; ++n) rows[n] = zeros;
  for (int64_t n = 0; n < keys; n += 4) {
    for (int64_t c = 0; c < lanes / kVec; c += kTileVecs) {
      with_width<kTileVecs>(lanes / kVec - c, [&](auto vecs) {
        scores_tile<decltype(vecs)::value, HEAD_DIM>(qt + kVec * c, lanes, rows + n, dim,
                                                     s + n * lanes + kVec * c);
      });
    }
  }
}

// Turns the block's scores s[n][m] (unscaled) into probabilities against each lane's running
// max, which it updates, with alpha[m] the factor the lane's earlier terms are rescaled by.
void softmax_portable(float* s, int64_t lanes, int64_t keys, int32_t first_key, bool masked,
                      float scale, Scratch& w) {
  float* max = w.max.data();
  float* sum = w.sum.data();
  float* alpha = w.alpha.data();
  float* block_max = w.block_max.data();
  const int32_t* pos = w.pos.data();
  const int32_t* lo = w.lo.data();
  std::fill(block_max, block_max + lanes, kMasked);
  for (int64_t n = 0; n < keys; ++n) {
    const float* row = s + n * lanes;
    const int32_t key = first_key + static_cast<int32_t>(n);
    if (masked) {
#pragma omp simd
      for (int64_t m = 0; m < lanes; ++m) {
        block_max[m] = std::max(block_max[m], visible(key, pos[m], lo[m]) ? row[m] : kMasked);
      }
    } else {
#pragma omp simd
      for (int64_t m = 0; m < lanes; ++m) block_max[m] = std::max(block_max[m], row[m]);
    }
  }
#pragma omp simd
  for (int64_t m = 0; m < lanes; ++m) {
    const float next = std::max(max[m], block_max[m] * scale);
    alpha[m] = std::exp(std::max(max[m] - next, kMinExp));
    max[m] = next;
    sum[m] *= alpha[m];
  }
  for (int64_t n = 0; n < keys; ++n) {
    float* row = s + n * lanes;
    const int32_t key = first_key + static_cast<int32_t>(n);
#pragma omp simd
    for (int64_t m = 0; m < lanes; ++m) {
      const float p = std::exp(std::max(row[m] * scale - max[m], kMinExp));
      row[m] = !masked || visible(key, pos[m], lo[m]) ? p : 0.f;
      sum[m] += row[m];
    }
  }
}

// acc[4 lanes][VECS * kVec dims] * alpha + the lanes' probabilities times the values.
template <int VECS>
inline void values_tile(const float* p, int64_t lanes, const float* alpha, const float* vf,
                        int64_t stride, int64_t keys, float* acc) {
  vecf a[4][VECS];
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < VECS; ++c) a[r][c] = load_vec(acc + r * stride + kVec * c) * alpha[r];
  }
  for (int64_t n = 0; n < keys; ++n) {
    vecf v[VECS];
    for (int c = 0; c < VECS; ++c) v[c] = load_vec(vf + n * stride + kVec * c);
    for (int r = 0; r < 4; ++r) {
      const float pr = p[n * lanes + r];
      for (int c = 0; c < VECS; ++c) a[r][c] += pr * v[c];
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int c = 0; c < VECS; ++c) store_vec(acc + r * stride + kVec * c, a[r][c]);
  }
}

// acc[m] = acc[m] * alpha[m] + sum_n p[n][m] * v[n] for the lanes in use (rounded up to 4;
// acc rows are `stride` floats, a whole number of vectors, so values go through vf's fp32
// rows, whose padding stays zero).
template <typename scalar_t>
void values_portable(float* p, int64_t lanes, int64_t used, const float* alpha,
                     const scalar_t* v_head, const int64_t* slots, int64_t keys, int64_t dim,
                     int64_t stride, float* vf, float* acc) {
  for (int64_t n = 0; n < keys; ++n) {
    const scalar_t* v = v_head + slots[n] * dim;
    for (int64_t d = 0; d < dim; ++d) vf[n * stride + d] = to_float(v[d]);
  }
  if constexpr (!std::is_same_v<scalar_t, float>) {
    // Rounded like the reference's probs.to(v.dtype).
    for (int64_t i = 0; i < keys * lanes; ++i) p[i] = to_float(from_float<scalar_t>(p[i]));
  }
  for (int64_t c = 0; c < stride / kVec; c += kTileVecs) {
    with_width<kTileVecs>(stride / kVec - c, [&](auto vecs) {
      for (int64_t m = 0; m < used; m += 4) {
        values_tile<decltype(vecs)::value>(p + m, lanes, alpha + m, vf + kVec * c, stride,
                                           keys, acc + m * stride + kVec * c);
      }
    });
  }
}

// One online-softmax step over the block: scores, probabilities, and their values summed in.
template <typename scalar_t, int64_t HEAD_DIM>
void block_portable(const Block& b, const scalar_t* k_head, const scalar_t* v_head,
                    int64_t dim, int64_t stride, float scale, float softcap, Scratch& w) {
  float* s = w.s.data();
  scores_portable<scalar_t, HEAD_DIM>(w.q.data(), b.lanes, k_head, b.slots, b.keys, dim,
                                      stride, w.zeros.data(), w.kv.data(), s);
  scale = soft_cap(s, b.keys * b.lanes, scale, softcap);
  softmax_portable(s, b.lanes, b.keys, b.first_key, b.masked, scale, w);
  values_portable(s, b.lanes, b.used, w.alpha.data(), v_head, b.slots, b.keys, dim, stride,
                  w.kv.data(), w.acc.data());
}

// ---- AVX512-BF16 kernels ---------------------------------------------------------------
#if defined(__AVX512BF16__)

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// 16 words whose low halves come from a and high halves from b (16 bf16 each).
inline __m512i interleave_bf16(__m256i a, __m256i b) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                         _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}


// Keys per q.k tile: 3 x 6 accumulators leave registers for the operands (4 x 6 spill).
constexpr int kTileKeys = 3;

// Scores of kTileKeys keys against VECS * 16 lanes: each key's bf16 pair is broadcast, the
// lanes' query pairs ([dim / 2][lanes] words) are loaded once for all the tile's keys.
template <int VECS, int64_t HEAD_DIM>
inline void scores_tile_bf16(const uint32_t* qp, int64_t lanes,
                             const c10::BFloat16* const* k, float* s) {
  __m512 acc[kTileKeys][VECS];
  for (int r = 0; r < kTileKeys; ++r) {
    for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < HEAD_DIM / 2; ++i) {
    __m512bh kb[kTileKeys];
    for (int r = 0; r < kTileKeys; ++r) {
      kb[r] = as_bh(_mm512_set1_epi32(static_cast<int>(bf16_pair(k[r], i))));
    }
    for (int c = 0; c < VECS; ++c) {
      const __m512bh q = as_bh(_mm512_loadu_si512(qp + i * lanes + 16 * c));
      for (int r = 0; r < kTileKeys; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], q, kb[r]);
    }
  }
  for (int r = 0; r < kTileKeys; ++r) {
    for (int c = 0; c < VECS; ++c) _mm512_storeu_ps(s + r * lanes + 16 * c, acc[r][c]);
  }
}

template <int64_t HEAD_DIM>
void scores_bf16(const uint32_t* qp, int64_t lanes, const c10::BFloat16* k_head,
                 const int64_t* slots, int64_t keys, const c10::BFloat16* zero_row, float* s) {
  for (int64_t n = 0; n < keys; n += kTileKeys) {
    const c10::BFloat16* k[kTileKeys];
    for (int r = 0; r < kTileKeys; ++r) {
      k[r] = n + r < keys ? k_head + slots[n + r] * HEAD_DIM : zero_row;
      const int64_t ahead = n + kTileKeys + r;  // the next tile's key
      if (ahead < keys) prefetch_row(k_head + slots[ahead] * HEAD_DIM, HEAD_DIM * 2);
    }
    for (int64_t c = 0; c < lanes / 16; c += 6) {
      const uint32_t* q = qp + 16 * c;
      float* out = s + n * lanes + 16 * c;
      with_width<6>(lanes / 16 - c, [&](auto vecs) {
        scores_tile_bf16<decltype(vecs)::value, HEAD_DIM>(q, lanes, k, out);
      });
    }
  }
}

// softmax_portable's update, 16 lanes at a time in registers, with the probabilities
// written as bf16 pairs of consecutive keys ([key / 2][lane] words) for values_bf16.
void softmax_bf16(const float* s, int64_t lanes, int64_t keys, int32_t first_key, bool masked,
                  float scale, Scratch& w) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < lanes; c += 16) {
    const __m512i pos = _mm512_loadu_si512(w.pos.data() + c);
    const __m512i lo = _mm512_loadu_si512(w.lo.data() + c);
    auto seen = [&](int64_t n) -> __mmask16 {
      if (!masked) return 0xFFFF;
      const __m512i key = _mm512_set1_epi32(first_key + static_cast<int32_t>(n));
      return _mm512_cmple_epi32_mask(key, pos) & _mm512_cmpge_epi32_mask(key, lo);
    };
    __m512 block_max = _mm512_set1_ps(kMasked);
    for (int64_t n = 0; n < keys; ++n) {
      block_max = _mm512_mask_max_ps(block_max, seen(n), block_max,
                                     _mm512_loadu_ps(s + n * lanes + c));
    }
    const __m512 old = _mm512_loadu_ps(w.max.data() + c);
    const __m512 next = _mm512_max_ps(old, _mm512_mul_ps(block_max, vscale));
    const __m512 alpha = exp_avx512(_mm512_sub_ps(old, next));
    _mm512_storeu_ps(w.max.data() + c, next);
    _mm512_storeu_ps(w.alpha.data() + c, alpha);
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(w.sum.data() + c), alpha);
    auto prob = [&](int64_t n) {
      if (n == keys) return _mm512_setzero_ps();  // the partner of an odd block's last key
      const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + n * lanes + c), vscale, next);
      return _mm512_maskz_mov_ps(seen(n), exp_avx512(x));
    };
    for (int64_t n = 0; n < keys; n += 2) {
      const __m512 p0 = prob(n), p1 = prob(n + 1);
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      _mm512_storeu_si512(w.p_pairs.data() + n / 2 * lanes + c,
                          interleave_bf16(bf16_bits(p0), bf16_bits(p1)));
    }
    _mm512_storeu_ps(w.sum.data() + c, sum);
  }
}

// acc[ROWS lanes][a 64-dim chunk] * alpha + the lanes' probability pairs times value pairs.
template <int ROWS>
inline void values_tile_bf16(const uint32_t* pp, int64_t lanes, const float* alpha,
                             const uint32_t* vp, int64_t dim, int64_t pairs, float* acc) {
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r) {
    const __m512 f = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < 4; ++c) {
      a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * dim + 16 * c), f);
    }
  }
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh v[4];
    for (int c = 0; c < 4; ++c) v[c] = as_bh(_mm512_loadu_si512(vp + j * dim + 16 * c));
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh p = as_bh(_mm512_set1_epi32(static_cast<int>(pp[j * lanes + r])));
      for (int c = 0; c < 4; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], v[c], p);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * dim + 16 * c, a[r][c]);
  }
}

template <int64_t HEAD_DIM>
void values_bf16(const uint32_t* p_pairs, int64_t lanes, int64_t used, const float* alpha,
                 const c10::BFloat16* v_head, const int64_t* slots, int64_t keys,
                 const c10::BFloat16* zero_row, uint32_t* v_pairs, float* acc) {
  const int64_t pairs = (keys + 1) / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    for (int64_t ahead = 2 * j + 4; ahead < std::min(2 * j + 6, keys); ++ahead) {
      prefetch_row(v_head + slots[ahead] * HEAD_DIM, HEAD_DIM * 2);
    }
    const c10::BFloat16* v0 = v_head + slots[2 * j] * HEAD_DIM;
    const c10::BFloat16* v1 = 2 * j + 1 < keys ? v_head + slots[2 * j + 1] * HEAD_DIM : zero_row;
    for (int64_t d = 0; d < HEAD_DIM; d += 16) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d));
      _mm512_storeu_si512(v_pairs + j * HEAD_DIM + d, interleave_bf16(x0, x1));
    }
  }
  for (int64_t chunk = 0; chunk < HEAD_DIM; chunk += 64) {
    for (int64_t m = 0; m < used; m += 6) {
      const uint32_t* pp = p_pairs + m;
      const uint32_t* vp = v_pairs + chunk;
      float* a = acc + m * HEAD_DIM + chunk;
      with_width<6>(used - m, [&](auto rows) {
        values_tile_bf16<decltype(rows)::value>(pp, lanes, alpha + m, vp, HEAD_DIM, pairs, a);
      });
    }
  }
}

template <int64_t HEAD_DIM>
void block_bf16(const Block& b, const c10::BFloat16* k_head, const c10::BFloat16* v_head,
                float scale, float softcap, Scratch& w) {
  float* s = w.s.data();
  const auto* zero_row = reinterpret_cast<const c10::BFloat16*>(w.zeros.data());
  scores_bf16<HEAD_DIM>(w.q_pairs.data(), b.lanes, k_head, b.slots, b.keys, zero_row, s);
  scale = soft_cap(s, b.keys * b.lanes, scale, softcap);
  softmax_bf16(s, b.lanes, b.keys, b.first_key, b.masked, scale, w);
  values_bf16<HEAD_DIM>(w.p_pairs.data(), b.lanes, b.used, w.alpha.data(), v_head, b.slots,
                        b.keys, zero_row, w.v_pairs.data(), w.acc.data());
}
#endif

// ---- one task ----------------------------------------------------------------------------

struct Args {
  const void* q;
  int64_t q_stride;  // elements between tokens
  const void* k;
  const void* v;
  int64_t pool_stride;  // elements between kv heads
  const int64_t* table;
  int64_t table_stride;
  const int64_t *rows, *prefix, *starts;
  void* out;
  int64_t num_heads, group, head_dim;
  float scale, softcap;
  int64_t window;
  // Key blocks start at multiples of kBlockKeys for every task, so a row's sums run in the
  // same blocks whichever rows share its task (batch-invariant; without a window they do).
  bool fixed_blocks;
};

// The task's query lanes, transposed to [dim][lane] (bf16: [dim / 2][lane] pairs), padding
// lanes zero; row_of(r) points at the kv head's query heads in the task's row r.
template <typename scalar_t, int64_t HEAD_DIM, typename RowOf>
void load_queries(RowOf row_of, int64_t group, int64_t dim, int64_t used, int64_t lanes,
                  Scratch& w) {
  constexpr bool bf16_dot = kBf16Dot<scalar_t, HEAD_DIM>;
  if constexpr (bf16_dot) {
    std::fill(w.q_pairs.begin(), w.q_pairs.end(), 0);
  } else {
    std::fill(w.q.begin(), w.q.end(), 0.f);
  }
  for (int64_t m = 0; m < used; ++m) {
    const scalar_t* row = row_of(m / group) + (m % group) * dim;
#if defined(__AVX512BF16__)
    if constexpr (bf16_dot) {
      for (int64_t i = 0; i < dim / 2; ++i) w.q_pairs[i * lanes + m] = bf16_pair(row, i);
    } else  // (without AVX512-BF16, the only branch)
#endif
    {
      for (int64_t d = 0; d < dim; ++d) w.q[d * lanes + m] = to_float(row[d]);
    }
  }
}

// The online softmax of the loaded lanes over keys [key_begin, key_end) of `slots`, left in
// w (acc, max, sum). Causal lanes see keys up to their position (w.pos) and from w.lo; the
// other lanes see every key, so no block is masked.
template <typename scalar_t, int64_t HEAD_DIM>
void attend(const Args& a, int64_t kv_head, const int64_t* slots, int64_t key_begin,
            int64_t key_end, int64_t lanes, int64_t used, bool causal, Scratch& w) {
  const int64_t dim = HEAD_DIM > 0 ? HEAD_DIM : a.head_dim;
  const int64_t stride = round_up(dim, 16);
  const scalar_t* k_head = static_cast<const scalar_t*>(a.k) + kv_head * a.pool_stride;
  const scalar_t* v_head = static_cast<const scalar_t*>(a.v) + kv_head * a.pool_stride;
  std::fill(w.max.begin(), w.max.begin() + lanes, kMasked);
  std::fill(w.sum.begin(), w.sum.begin() + lanes, 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + lanes * stride, 0.f);
  // The lanes' first and last positions: blocks within both need no mask.
  const int64_t first_pos = w.pos[0], last_pos = w.pos[used - 1];
  for (int64_t n0 = key_begin; n0 < key_end; n0 += kBlockKeys) {
    const int64_t keys = std::min(kBlockKeys, key_end - n0);
    // Masks are needed only where the block crosses some lane's causal or window edge.
    const bool masked = causal && (n0 + keys - 1 > first_pos ||
                                   (a.window > 0 && n0 <= last_pos - a.window));
    const Block blk{slots + n0, keys, lanes, used, static_cast<int32_t>(n0), masked};
#if defined(__AVX512BF16__)
    if constexpr (kBf16Dot<scalar_t, HEAD_DIM>) {
      block_bf16<HEAD_DIM>(blk, k_head, v_head, a.scale, a.softcap, w);
    } else  // (without AVX512-BF16, the only branch)
#endif
    {
      block_portable<scalar_t, HEAD_DIM>(blk, k_head, v_head, dim, stride, a.scale, a.softcap,
                                         w);
    }
  }
}

template <typename scalar_t, int64_t HEAD_DIM>
void run_task(const Args& a, const Task& t, Scratch& w) {
  const int64_t dim = HEAD_DIM > 0 ? HEAD_DIM : a.head_dim;
  const int64_t stride = round_up(dim, 16);
  const int64_t used = t.rows * a.group;
  const int64_t lanes = round_up(used, kLaneAlign);
  const int64_t first_pos = a.prefix[t.req] + t.first_row;
  const int64_t token0 = a.starts[t.req] + t.first_row;
  const scalar_t* q = static_cast<const scalar_t*>(a.q) + token0 * a.q_stride +
                      t.kv_head * a.group * dim;

  // Padding lanes take the last row's position; their zero queries are never written out.
  for (int64_t m = 0; m < lanes; ++m) {
    w.pos[m] = static_cast<int32_t>(first_pos + std::min(m, used - 1) / a.group);
    w.lo[m] = a.window > 0 ? w.pos[m] - static_cast<int32_t>(a.window) + 1 : 0;
  }
  load_queries<scalar_t, HEAD_DIM>([&](int64_t r) { return q + r * a.q_stride; }, a.group,
                                   dim, used, lanes, w);
  // Keys from the first row's window start to the last row's position.
  const int64_t last_pos = first_pos + t.rows - 1;
  int64_t key_begin = a.window > 0 ? std::max<int64_t>(0, first_pos - a.window + 1) : 0;
  if (a.fixed_blocks) key_begin -= key_begin % kBlockKeys;
  attend<scalar_t, HEAD_DIM>(a, t.kv_head, a.table + a.rows[t.req] * a.table_stride, key_begin,
                             last_pos + 1, lanes, used, /*causal=*/true, w);

  scalar_t* out = static_cast<scalar_t*>(a.out) + token0 * a.num_heads * dim +
                  t.kv_head * a.group * dim;
  for (int64_t m = 0; m < used; ++m) {
    scalar_t* o = out + (m / a.group) * a.num_heads * dim + (m % a.group) * dim;
    const float* acc = w.acc.data() + m * stride;
    const float inv = 1.f / w.sum[m];  // every lane sees at least its own key
    for (int64_t d = 0; d < dim; ++d) o[d] = from_float<scalar_t>(acc[d] * inv);
  }
}

// Runs the tasks on every thread, longest first and handed out one at a time (tasks differ
// widely in cost), each worker with buffers for up to max_lanes lanes.
template <typename scalar_t, int64_t HEAD_DIM, typename RunTask>
void run_tasks(std::vector<Task>& tasks, int64_t head_dim, int64_t max_lanes, RunTask run) {
  const int64_t stride = round_up(HEAD_DIM > 0 ? HEAD_DIM : head_dim, 16);
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks.size());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch w;
    if (kBf16Dot<scalar_t, HEAD_DIM>) {
      w.q_pairs.resize(stride / 2 * max_lanes);
      w.p_pairs.resize(kBlockKeys / 2 * max_lanes);
      w.v_pairs.resize(kBlockKeys / 2 * stride);
    } else {
      w.q.resize(stride * max_lanes);
      w.kv.assign(kBlockKeys * stride, 0.f);  // padding columns stay zero
    }
    w.s.resize(round_up(kBlockKeys, 12) * max_lanes);  // whole tiles of 3 or 4 keys
    w.zeros.assign(stride, 0.f);
    w.acc.resize(max_lanes * stride);
    for (auto* v : {&w.max, &w.sum, &w.alpha, &w.block_max}) v->resize(max_lanes);
    w.pos.resize(max_lanes);
    w.lo.resize(max_lanes);
    for (int64_t i = next++; i < static_cast<int64_t>(tasks.size()); i = next++) {
      run(tasks[i], w);
    }
  });
}

template <typename scalar_t, int64_t HEAD_DIM>
void extend_attention_impl(const Args& a, const int64_t* extend_lens, int64_t batch,
                           int64_t num_kv_heads) {
  const int64_t rows_per_task = std::max<int64_t>(1, kTargetLanes / a.group);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < extend_lens[b]; r += rows_per_task) {
      const int64_t rows = std::min(rows_per_task, extend_lens[b] - r);
      const int64_t last = a.prefix[b] + r + rows;
      const int64_t keys = a.window > 0 ? std::min(last, rows - 1 + a.window) : last;
      for (int64_t h = 0; h < num_kv_heads; ++h) tasks.push_back({b, h, r, rows, rows * keys});
    }
  }
  run_tasks<scalar_t, HEAD_DIM>(tasks, a.head_dim, round_up(rows_per_task * a.group, kLaneAlign),
                                [&](const Task& t, Scratch& w) {
                                  run_task<scalar_t, HEAD_DIM>(a, t, w);
                                });
}

// ---- shared prefixes of a decode batch ---------------------------------------------------

// Groups of decode requests whose slot rows begin with the same prefix: group p's members
// (batch indices) are members[offsets[p] .. offsets[p + 1]], its prefix the first lens[p]
// slots of table row rows[p].
struct Prefixes {
  const int64_t *rows, *lens, *offsets, *members;
  float* out;  // [batch, heads, head_dim]: each request's attention over its other keys
  float* lse;  // [batch, heads]: and its log-sum-exp
};

// A task is (group, kv head, block of members): the prefix's keys are read once for all the
// block's queries (a decode query per member, lanes = members x group), then each lane's
// result is merged into the request's other part through the two log-sum-exps.
template <typename scalar_t, int64_t HEAD_DIM>
void run_prefix_task(const Args& a, const Prefixes& p, const Task& t, Scratch& w) {
  const int64_t dim = HEAD_DIM > 0 ? HEAD_DIM : a.head_dim;
  const int64_t stride = round_up(dim, 16);
  const int64_t used = t.rows * a.group;
  const int64_t lanes = round_up(used, kLaneAlign);
  const int64_t* members = p.members + p.offsets[t.req] + t.first_row;
  const scalar_t* q = static_cast<const scalar_t*>(a.q) + t.kv_head * a.group * dim;
  load_queries<scalar_t, HEAD_DIM>([&](int64_t r) { return q + members[r] * a.q_stride; },
                                   a.group, dim, used, lanes, w);
  attend<scalar_t, HEAD_DIM>(a, t.kv_head, a.table + p.rows[t.req] * a.table_stride, 0,
                             p.lens[t.req], lanes, used, /*causal=*/false, w);
  for (int64_t m = 0; m < used; ++m) {
    const int64_t head = (members[m / a.group] * a.num_heads + t.kv_head * a.group + m % a.group);
    float* o = p.out + head * dim;
    const float* acc = w.acc.data() + m * stride;
    // Both parts are finite: a request's other keys hold at least its current token.
    const float own_lse = p.lse[head], prefix_lse = w.max[m] + std::log(w.sum[m]);
    const float top = std::max(own_lse, prefix_lse);
    const float own_w = std::exp(own_lse - top), prefix_w = std::exp(prefix_lse - top);
    const float total = own_w + prefix_w;
    const float own_f = own_w / total, prefix_f = prefix_w / (total * w.sum[m]);
    for (int64_t d = 0; d < dim; ++d) o[d] = o[d] * own_f + acc[d] * prefix_f;
    p.lse[head] = top + std::log(total);
  }
}

template <typename scalar_t, int64_t HEAD_DIM>
void shared_prefix_impl(const Args& a, const Prefixes& p, int64_t num_prefixes,
                        int64_t num_kv_heads) {
  const int64_t members_per_task = std::max<int64_t>(1, kTargetLanes / a.group);
  std::vector<Task> tasks;
  for (int64_t g = 0; g < num_prefixes; ++g) {
    const int64_t n = p.offsets[g + 1] - p.offsets[g];
    for (int64_t r = 0; r < n; r += members_per_task) {
      const int64_t rows = std::min(members_per_task, n - r);
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        tasks.push_back({g, h, r, rows, rows * p.lens[g]});
      }
    }
  }
  run_tasks<scalar_t, HEAD_DIM>(tasks, a.head_dim,
                                round_up(members_per_task * a.group, kLaneAlign),
                                [&](const Task& t, Scratch& w) {
                                  run_prefix_task<scalar_t, HEAD_DIM>(a, p, t, w);
                                });
}

// q [tokens, heads, head_dim] with contiguous heads, and one layer's pools [kv_heads, slots,
// head_dim], contiguous, of q's dtype and head size.
void check_q_and_pools(const torch::Tensor& q, const torch::Tensor& k_buf,
                       const torch::Tensor& v_buf) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "expected 3-d q and pools");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads must be contiguous");
  TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous(), "the pools must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_buf.scalar_type() && k_buf.scalar_type() == v_buf.scalar_type(),
              "q and the pools must share a dtype");
  TORCH_CHECK(q.size(1) % k_buf.size(0) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_buf.size(2), "head_dim of q and the pool differ");
}

}  // namespace

// q: [tokens, heads, head_dim] (rows may be strided); k_buf, v_buf: [kv_heads, slots,
// head_dim] (one layer, the step's K/V already written). Request b owns q rows
// starts[b] .. starts[b] + extend_lens[b], at positions prefix_lens[b] ..; its keys at
// positions 0 .. are slots req_to_token[rows[b], :]. window > 0: a query at position p sees
// keys p - window + 1 .. p; softcap > 0 soft-caps the scaled scores. fixed_blocks: a row's
// result has the same bits in any batch, chunk or task (the keys of a window's first block
// before the window are read, masked). Returns [tokens, heads, head_dim] in q's dtype.
torch::Tensor extend_attention(const torch::Tensor& q, const torch::Tensor& k_buf,
                               const torch::Tensor& v_buf, const torch::Tensor& req_to_token,
                               const torch::Tensor& rows, const torch::Tensor& prefix_lens,
                               const torch::Tensor& extend_lens, const torch::Tensor& starts,
                               double scale, int64_t window, double softcap, bool fixed_blocks) {
  check_q_and_pools(q, k_buf, v_buf);
  TORCH_CHECK(req_to_token.size(1) < (int64_t{1} << 31), "positions must fit in int32");
  sglbatch::check_indices({&req_to_token, &rows, &prefix_lens, &extend_lens, &starts});
  // A window no sequence outgrows is no window (and positions stay within int32).
  if (window >= req_to_token.size(1)) window = 0;
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  Args a{q.data_ptr(), q.stride(0), k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(0),
         req_to_token.data_ptr<int64_t>(), req_to_token.stride(0), rows.data_ptr<int64_t>(),
         prefix_lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), out.data_ptr(),
         q.size(1), q.size(1) / k_buf.size(0), q.size(2), static_cast<float>(scale),
         static_cast<float>(softcap), window, fixed_blocks};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "extend_attention",
                                  [&] {
                                    auto run = [&](auto head_dim) {
                                      extend_attention_impl<scalar_t, decltype(head_dim)::value>(
                                          a, extend_lens.data_ptr<int64_t>(), rows.size(0),
                                          k_buf.size(0));
                                    };
                                    sglbatch::dispatch_head_dim(q.size(2), run);
                                  });
  return out;
}

// Decode with shared prefixes (cascade): q [batch, heads, head_dim] (one token per request),
// k_buf, v_buf as above. Group p of requests (batch indices members[offsets[p] ..
// offsets[p + 1]]) shares the first prefix_lens[p] slots of table row prefix_rows[p]; their
// attention over those keys is merged, in place, into out [batch, heads, head_dim] and lse
// [batch, heads] (fp32: each request's attention over its own keys, as decode_attention
// returns it, with at least one key). softcap as above; no sliding window.
void merge_shared_prefixes(const torch::Tensor& q, const torch::Tensor& k_buf,
                           const torch::Tensor& v_buf, const torch::Tensor& req_to_token,
                           const torch::Tensor& prefix_rows, const torch::Tensor& prefix_lens,
                           const torch::Tensor& offsets, const torch::Tensor& members,
                           double scale, double softcap, torch::Tensor& out,
                           torch::Tensor& lse) {
  check_q_and_pools(q, k_buf, v_buf);
  sglbatch::check_indices({&req_to_token, &prefix_rows, &prefix_lens, &offsets, &members});
  TORCH_CHECK(
      offsets.numel() == prefix_rows.numel() + 1 && prefix_lens.numel() == prefix_rows.numel(),
      "one row and length per prefix, and one more offset");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && lse.scalar_type() == torch::kFloat32 &&
                  out.is_contiguous() && lse.is_contiguous() && out.sizes() == q.sizes() &&
                  lse.numel() == q.size(0) * q.size(1),
              "out and lse must be contiguous fp32 [batch, heads, head_dim] and [batch, heads]");
  Args a{q.data_ptr(), q.stride(0), k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(0),
         req_to_token.data_ptr<int64_t>(), req_to_token.stride(0), nullptr, nullptr, nullptr,
         nullptr, q.size(1), q.size(1) / k_buf.size(0), q.size(2), static_cast<float>(scale),
         static_cast<float>(softcap), 0, false};
  const Prefixes p{prefix_rows.data_ptr<int64_t>(), prefix_lens.data_ptr<int64_t>(),
                   offsets.data_ptr<int64_t>(), members.data_ptr<int64_t>(),
                   out.data_ptr<float>(), lse.data_ptr<float>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "shared_prefixes",
                                  [&] {
                                    auto run = [&](auto head_dim) {
                                      shared_prefix_impl<scalar_t, decltype(head_dim)::value>(
                                          a, p, prefix_rows.numel(), k_buf.size(0));
                                    };
                                    sglbatch::dispatch_head_dim(q.size(2), run);
                                  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("extend_attention", &extend_attention, "Paged causal extend attention over a batch");
  m.def("merge_shared_prefixes", &merge_shared_prefixes,
        "Decode attention over shared prefixes, merged into each request's own part");
}
