// bf16 linear layers for the few-row products of decode: y = x @ W^T (+ bias), and the
// MLP's gate/up product with SiLU(gate) * up applied before anything leaves the registers.
//
// Why not oneDNN: at 16-256 rows its GEMM reads each weight from memory more than once and
// reaches ~630 GFLOP/s on SmolLM2's layers when the weights come from DRAM (as they do in a
// model), against ~940 on large products. Here every weight is read from memory once:
// threads own disjoint blocks of 64 output columns, a block's weights (K x 64 bf16, 72 KiB
// at K = 576) stay in L2 while every row tile of x passes over them, and the first tile
// prefetches the weights 8 KiB ahead of its reads, into the next block at its end.
//
// Weights are packed once (pack_bf16_weight in layers/linear.py) as [N/64][K/2][64][2]
// bf16: for each pair of k, the 64 columns' two weights side by side, the operand order of
// vdpbf16ps.
// Each row's sum runs over k in the same order whatever the number of rows, so a row gets
// the same bits in any batch.
#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t kBlock = 64;    // output columns per packed block: 4 vectors of 16 lanes
constexpr int kMaxRows = 6;       // rows per register tile: 6 x 4 accumulators + 4 weights

#if defined(__AVX512BF16__)

enum class Epilogue { kStore, kSiluMul };

// How far ahead of its reads a block's first tile prefetches the weights. At 1-2 rows the
// hardware prefetchers alone left the kernel at ~2/3 of the machine's read bandwidth; 8 KiB
// ahead measured 11-18% faster at 1 row (7-16% at 2) than no prefetch, ~8% faster than
// 4 KiB, and 16 KiB no better. At 4 rows and more it changed nothing.
constexpr int64_t kPrefetchAhead = 8192;

// One tile: ROWS rows of x against one packed block, over all K. Accumulators stay in
// registers. With `prefetch`, the weights kPrefetchAhead bytes on are pulled into L2 as it
// goes (a block's later tiles find their weights there already).
template <int ROWS>
inline void tile_dot(const uint16_t* x, int64_t ldx, const uint16_t* block, int64_t pairs,
                     __m512 (&acc)[kMaxRows][4], bool prefetch) {
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* w = block + p * 2 * kBlock;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    if (prefetch) {  // the four lines this step reads, kPrefetchAhead on
      sglbatch::prefetch_row<sglbatch::Cache::kL2>(
          reinterpret_cast<const char*>(w) + kPrefetchAhead, 4 * 64);
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * p, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, w3);
    }
  }
}

inline void store_bf16(uint16_t* out, __m512 v, __mmask16 mask) {
  const __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(out, mask, packed);
}

// silu(g) * u with sigmoid from exp(-|g|) <= 1, which never overflows.
inline __m512 silu_mul(__m512 g, __m512 u) {
  const __m512 e = sglbatch::exp_avx512(
      _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 sigmoid = _mm512_mask_mul_ps(inv, negative, inv, e);
  return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u);
}

struct Problem {
  const uint16_t* x;
  int64_t ldx, rows, pairs;
  const uint16_t* packed;
  int64_t blocks;
  const float* bias;  // [out_columns] or null
  uint16_t* out;
  int64_t ldo, out_columns;
  Epilogue epilogue;
};

template <int ROWS>
void run_tile(const Problem& p, int64_t block, int64_t row0, bool prefetch) {
  __m512 acc[kMaxRows][4];
  const uint16_t* w = p.packed + block * p.pairs * 2 * kBlock;
  tile_dot<ROWS>(p.x + row0 * p.ldx, p.ldx, w, p.pairs, acc, prefetch);
  if (p.epilogue == Epilogue::kStore) {
    const int64_t col0 = block * kBlock;
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + 16 * j;
      const __mmask16 mask = sglbatch::first_lanes(p.out_columns - col);
      if (!mask) break;
      const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + col) : _mm512_setzero_ps();
      for (int r = 0; r < ROWS; ++r) {
        store_bf16(p.out + (row0 + r) * p.ldo + col, _mm512_add_ps(acc[r][j], bias), mask);
      }
    }
  } else {  // a block holds 32 gate columns, then the same 32 columns of up
    const int64_t col0 = block * (kBlock / 2);
    for (int j = 0; j < 2; ++j) {
      const int64_t col = col0 + 16 * j;
      const __mmask16 mask = sglbatch::first_lanes(p.out_columns - col);
      if (!mask) break;
      for (int r = 0; r < ROWS; ++r) {
        store_bf16(p.out + (row0 + r) * p.ldo + col, silu_mul(acc[r][j], acc[r][j + 2]), mask);
      }
    }
  }
}

// Every row tile of x over one block; the first prefetches for the rest and the next block.
void run_block(const Problem& p, int64_t block, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; row += kMaxRows) {
    sglbatch::with_width<kMaxRows>(std::min<int64_t>(kMaxRows, row_end - row), [&](auto n) {
      run_tile<decltype(n)::value>(p, block, row, row == row_begin);
    });
  }
}

#endif  // __AVX512BF16__

void check(const torch::Tensor& x, const torch::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "x must be a [rows, in_features] bf16 tensor with unit column stride");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kBFloat16 &&
                  packed.is_contiguous() && packed.size(2) == kBlock && packed.size(3) == 2,
              "the weight must come from pack_bf16_weight: contiguous [N/64, K/2, 64, 2] bf16");
  TORCH_CHECK(packed.size(1) * 2 >= x.size(1) && packed.size(1) * 2 <= x.size(1) + 1,
              "x has ", x.size(1), " columns; the packed weight takes ", packed.size(1) * 2);
}

torch::Tensor run(const torch::Tensor& x_in, const torch::Tensor& packed,
                  const c10::optional<torch::Tensor>& bias, int64_t out_columns,
                  bool silu_mul) {
#if defined(__AVX512BF16__)
  check(x_in, packed);
  // An odd K was padded with a zero weight; x gets the matching zero column.
  torch::Tensor x = x_in;
  if (x.size(1) % 2) x = torch::constant_pad_nd(x, {0, 1});
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                    bias->numel() == out_columns,
                "bias must be a contiguous fp32 tensor of the output's width");
  }
  const int64_t rows = x.size(0);
  auto out = torch::empty({rows, out_columns}, x.options());
  Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), rows,
            packed.size(1), reinterpret_cast<const uint16_t*>(packed.data_ptr()),
            packed.size(0), bias ? bias->data_ptr<float>() : nullptr,
            reinterpret_cast<uint16_t*>(out.data_ptr()), out.stride(0), out_columns,
            silu_mul ? Epilogue::kSiluMul : Epilogue::kStore};
  if (rows == 0) return out;
  // Work units: a block's columns for one of `threads` parts of the rows, handed out in
  // order as contiguous runs: each thread gets whole blocks (their weights read once) but
  // for the block it shares with a neighbour, and an even share whatever the block count.
  const int64_t threads = at::get_num_threads();
  const int64_t row_parts = std::min<int64_t>(threads, (rows + kMaxRows - 1) / kMaxRows);
  const int64_t units = p.blocks * row_parts;
  const int64_t rows_per_part = (rows + row_parts - 1) / row_parts;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t block = u / row_parts, part = u % row_parts;
      const int64_t row_begin = part * rows_per_part;
      const int64_t row_end = std::min(rows, row_begin + rows_per_part);
      if (row_begin < row_end) run_block(p, block, row_begin, row_end);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "this build has no AVX512-BF16: use oneDNN's linear");
#endif
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed,
                     const c10::optional<torch::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(out_features <= packed.size(0) * kBlock, "out_features exceeds the packed weight");
  return run(x, packed, bias, out_features, false);
}

torch::Tensor silu_mul_linear(const torch::Tensor& x, const torch::Tensor& packed,
                              int64_t out_features) {
  TORCH_CHECK(out_features <= packed.size(0) * kBlock / 2,
              "out_features exceeds the packed gate/up weight");
  return run(x, packed, c10::nullopt, out_features, true);
}

bool available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ W^T (+ bias), bf16, W from pack_bf16_weight");
  m.def("silu_mul_linear", &silu_mul_linear,
        "SiLU(x @ gate^T) * (x @ up^T), bf16, gate and up from pack_bf16_gate_up");
  m.def("available", &available, "whether this build has the AVX512-BF16 path");
}
