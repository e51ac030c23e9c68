// Weight-only quantized matrix multiplication for small batches (decode): y = x W^T, x float32 (M, K).
//
// W is held as integer codes with one scale (and optionally one offset) per group of `group` inputs of a row:
//   bits 4: codes uint8 (N, K / 2); each run of 32 inputs is 16 bytes, byte j holding input j in its low nibble and
//           input j + 16 in its high one (llama.cpp's Q4_0 / Q4_1 order); w = scale * q + offset, q in 0..15.
//   bits 8: codes int8 (N, K); w = scale * q (+ offset).
// scales / offsets: (N, K / group), float16 or float32.
//
// Two ways to multiply (two ops, same arguments):
//   qmm:    x as given; every product and sum float32: the dequantized weight's result up to float rounding (one
//           row: `ftile`; from a few rows: the panel GEMM, `gcolumns`).
//   qmm_q8: x quantized to int8 per run of 32 inputs first (llama.cpp's Q8 activations), integer dot products per
//           run, float32 after (see `quantize_rows` and `itile`): about twice as fast, not exact.
//   qmm_bf16: x and the dequantized weight rounded to bfloat16 (nearest even), their products exact, sums float32:
//           what a bfloat16 matmul with the dequantized weight computes (torch's or oneDNN's with bfloat16 weights).
//           Every row count takes the panel GEMM (`bcolumns`, on VDPBF16PS where the CPU has AVX512-BF16: twice
//           the float32 FMA's products per instruction; elsewhere `gcolumns` on the rounded values), so a row's
//           result never depends on how many rows came with it. Groups must be runs of 32 inputs.
//
// Built at first use by decoderkit.kernels with the AVX2 / FMA / F16C path where the CPU has it, a portable one
// elsewhere. Output rows are shared among torch's intra-op threads (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DK_AVX2 1
// Built with -mavx512f -mavx512bw where torch reports an AVX-512 CPU: the few-row path (`ftile512`) then works on
// 16 lanes, half the instructions per run of 32 inputs
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DK_AVX512 1
// and with -mavx512bf16 where the CPU has it: bfloat16 products (`qmm_bf16`) take VDPBF16PS, two per lane at a time
#if defined(__AVX512BF16__)
#define DK_AVX512BF16 1
#endif
#endif
#endif

#include "simd.h"

namespace {

struct Problem {
  const float* x;
  int64_t M, K, N;
  const uint8_t* codes;
  int64_t row_bytes;
  const void* scales;
  const void* offsets;
  int64_t group, groups;
  float* y;
};

// Rows in tiles of MR, then one tile of the MR - 1 .. 1 left: tile(std::integral_constant<int, R>{}, r0) for each,
// so that every tile kernel is instantiated for its row count.
template <int R, typename Tile>
inline void last_row_tile(int64_t left, int64_t r0, Tile& tile) {
  if constexpr (R > 0) {
    if (left == R) return tile(std::integral_constant<int, R>{}, r0);
    last_row_tile<R - 1>(left, r0, tile);
  }
}

template <int MR, typename Tile>
inline void for_row_tiles(int64_t M, Tile&& tile) {
  int64_t r0 = 0;
  for (; r0 + MR <= M; r0 += MR) tile(std::integral_constant<int, MR>{}, r0);
  last_row_tile<MR - 1>(M - r0, r0, tile);
}

// Output columns in tiles of NR, shared among torch's intra-op threads in tasks of about 64K weights (enough work
// per task that forking threads pays): cols(std::integral_constant<int, NR>{}, n0) for each whole tile, and
// cols(std::integral_constant<int, 1>{}, n) for each column past the last one.
template <int NR, typename Cols>
void for_column_tiles(const Problem& p, Cols&& cols) {
  const int64_t tiles = (p.N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(p.K * NR, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NR;
      if (n0 + NR <= p.N) {
        cols(std::integral_constant<int, NR>{}, n0);
      } else {
        for (int64_t n = n0; n < p.N; ++n) cols(std::integral_constant<int, 1>{}, n);
      }
    }
  });
}

template <bool HALF>
inline float scalar_at(const void* base, int64_t i) {
  if constexpr (HALF) {
    uint16_t h = static_cast<const uint16_t*>(base)[i];
#ifdef DK_AVX2
    return _cvtsh_ss(h);
#else
    return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
  } else {
    return static_cast<const float*>(base)[i];
  }
}

// sum_g params[base + g] * s[g] for g < len.
template <bool HALF>
inline float dot_params(const void* params, int64_t base, const float* s, int64_t len) {
  int64_t g = 0;
  float total = 0.0f;
#ifdef DK_AVX2
  if constexpr (HALF) {
    __m256 acc = _mm256_setzero_ps();
    const uint16_t* h = static_cast<const uint16_t*>(params) + base;
    for (; g + 8 <= len; g += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + g))),
                            _mm256_loadu_ps(s + g), acc);
    total = hsum(acc);
  }
#endif
  for (; g < len; ++g) total += scalar_at<HALF>(params, base + g) * s[g];
  return total;
}

#ifdef DK_AVX2
// 32 codes from one run as 4 x 8 floats, in input order.
template <int BITS>
inline void unpack32(const uint8_t* p, __m256 w[4]) {
  if constexpr (BITS == 4) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m128i lo = _mm_and_si128(b, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    for (int v = 0; v < 4; ++v) {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * v));
      w[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
  }
}

// unpack32 for 4 bits, the codes centred: q - 8 in -8..7 (exact, like q itself).
inline void unpack32_centred(const uint8_t* p, __m256 w[4]) {
  const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
  __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

// sum_g (offsets[base + g] + 8 scales[base + g]) * s[g] for g < len: the offset of 4-bit codes centred on 8, each
// formed before it is multiplied (float16 values: the sum is exact in float32).
template <bool HALF>
inline float dot_centred(const void* offsets, const void* scales, int64_t base, const float* s, int64_t len) {
  int64_t g = 0;
  float total = 0.0f;
  if constexpr (HALF) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 eight = _mm256_set1_ps(8.0f);
    const uint16_t* m = static_cast<const uint16_t*>(offsets) + base;
    const uint16_t* d = static_cast<const uint16_t*>(scales) + base;
    for (; g + 8 <= len; g += 8) {
      const __m256 vm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + g)));
      const __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + g)));
      acc = _mm256_fmadd_ps(_mm256_fmadd_ps(vd, eight, vm), _mm256_loadu_ps(s + g), acc);
    }
    total = hsum(acc);
  }
  for (; g < len; ++g)
    total += std::fma(scalar_at<HALF>(scales, base + g), 8.0f, scalar_at<HALF>(offsets, base + g)) * s[g];
  return total;
}
#endif

// y[r0 .. r0 + MR) at output column n. Each weight is rebuilt as fma(q, scale, offset): scale * q is exact in
// float32, so this is the float32 dequantized weight itself, and only the order of the sums differs from a float
// matmul with it. The portable path, and with AVX2 only int8 rows whose one group is not a multiple of 32 inputs:
// `ftile` takes every other AVX2 case.
template <int BITS, bool HALF, bool OFFSET, int MR>
inline void tile(const Problem& p, int64_t n, int64_t r0) {
  const uint8_t* q = p.codes + n * p.row_bytes;
  const float* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = p.x + (r0 + r) * p.K;
  float tail[MR] = {};
#ifdef DK_AVX2
  // A row alone keeps four chains of sums in flight (FMA latency); more rows make their own.
  constexpr int NA = MR == 1 ? 4 : 2;
  __m256 acc[MR][NA];
  for (int r = 0; r < MR; ++r)
    for (int a = 0; a < NA; ++a) acc[r][a] = _mm256_setzero_ps();
#else
  float acc[MR][32] = {};
#endif
  for (int64_t g = 0; g < p.groups; ++g) {
    const float d = scalar_at<HALF>(p.scales, n * p.groups + g);
    const float m = OFFSET ? scalar_at<HALF>(p.offsets, n * p.groups + g) : 0.0f;
    const int64_t end = (g + 1) * p.group;
    int64_t k = g * p.group;
#ifdef DK_AVX2
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    for (; k + 32 <= end; k += 32) {
      __m256 w[4];
      unpack32<BITS>(q + (BITS == 4 ? k / 2 : k), w);
      for (int v = 0; v < 4; ++v) w[v] = OFFSET ? _mm256_fmadd_ps(w[v], vd, vm) : _mm256_mul_ps(w[v], vd);
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 4; ++v)
          acc[r][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x[r] + k + 8 * v), acc[r][v % NA]);
    }
#else
    for (; k + 32 <= end; k += 32) {
      for (int j = 0; j < 32; ++j) {
        float c;
        if constexpr (BITS == 4) {
          const uint8_t b = q[k / 2 + (j & 15)];
          c = static_cast<float>(j < 16 ? (b & 0x0F) : (b >> 4));
        } else {
          c = static_cast<float>(static_cast<int8_t>(q[k + j]));
        }
        const float w = OFFSET ? std::fma(c, d, m) : c * d;
        for (int r = 0; r < MR; ++r) acc[r][j] = std::fma(w, x[r][k + j], acc[r][j]);
      }
    }
#endif
    // Only int8 rows with one group of a size not a multiple of 32 (per-channel scales) get here.
    for (; k < end; ++k) {
      const float c = static_cast<float>(static_cast<int8_t>(q[k]));
      const float w = OFFSET ? std::fma(c, d, m) : c * d;
      for (int r = 0; r < MR; ++r) tail[r] = std::fma(w, x[r][k], tail[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
#ifdef DK_AVX2
    __m256 s = acc[r][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[r][a]);
    p.y[(r0 + r) * p.N + n] = hsum(s) + tail[r];
#else
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += acc[r][j];
    p.y[(r0 + r) * p.N + n] = s + tail[r];
#endif
  }
}

#ifdef DK_AVX2
// Sums of each group's inputs, (M, groups): the offset term of every column is then sum_g offset[g] * xsum[g].
std::vector<float> group_sums(const Problem& p) {
  std::vector<float> sums(p.M * p.groups);
  for (int64_t r = 0; r < p.M; ++r) {
    const float* x = p.x + r * p.K;
    for (int64_t g = 0; g < p.groups; ++g) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + k));
      sums[r * p.groups + g] = hsum(a);
    }
  }
  return sums;
}

// y[r0 .. r0 + MR) at columns n0 .. n0 + NR, groups a multiple of 32 inputs, in the factored form
//   y = sum_g scale[g] * sum_{k in g} c[k] x[k]  +  sum_g (offset[g] + 8 scale[g]) * sum_{k in g} x[k]
// with 4-bit codes centred, c = q - 8 (8-bit codes: c = q, no offset), converted to float32 exactly, products and
// sums in float32: three multiplications per group fewer than rebuilding each weight, and a column's offsets are one
// dot product with the group sums. Centring is what keeps this float rounding: uncentred, Q4_0's offset -8 scale
// would cancel scale * sum(q x) against -8 scale * sum(x), ulps of numbers 8x the result. Centred, each term is at
// most the size of sum |w x| (Q4_0's offset term is exactly 0), within tests/test_kernels.py's bound.
template <int BITS, bool HALF, bool OFFSET, int MR, int NR>
inline void ftile(const Problem& p, const float* xsum, int64_t n0, int64_t r0) {
  const int64_t per = p.group / 32;
  const uint8_t* wq[NR];
  for (int j = 0; j < NR; ++j) wq[j] = p.codes + (n0 + j) * p.row_bytes;
  const float* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = p.x + (r0 + r) * p.K;
  // The NR rows are read interleaved, which hides their order from the hardware prefetcher: each run of 32
  // inputs prefetches its share of the bytes two tiles ahead (measured on SmolLM2's shapes out of cache, 2-core
  // EPYC: 1.5x over no prefetch for the layers, 4x for the head; one tile ahead or three were slower).
  const int64_t runs = p.K / 32;
  const char* next = reinterpret_cast<const char*>(wq[0] + 2 * NR * p.row_bytes);
  const int64_t lines = (NR * p.row_bytes + 63) / 64;
  const int64_t per_run = (lines + runs - 1) / runs;
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 t[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) t[r][j] = _mm256_setzero_ps();
    for (int64_t b = g * per; b < (g + 1) * per; ++b) {
      const int64_t k = 32 * b;
      for (int64_t i = 0; i < per_run; ++i) _mm_prefetch(next + (b * per_run + i) * 64, _MM_HINT_T0);
      for (int j = 0; j < NR; ++j) {
        __m256 w[4];
        if constexpr (BITS == 4) {
          unpack32_centred(wq[j] + k / 2, w);
        } else {
          unpack32<BITS>(wq[j] + k, w);
        }
        for (int r = 0; r < MR; ++r) {
          __m256 u = _mm256_mul_ps(w[0], _mm256_loadu_ps(x[r] + k));
          __m256 v = _mm256_mul_ps(w[1], _mm256_loadu_ps(x[r] + k + 8));
          u = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x[r] + k + 16), u);
          v = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x[r] + k + 24), v);
          t[r][j] = _mm256_add_ps(t[r][j], _mm256_add_ps(u, v));
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 d = _mm256_set1_ps(scalar_at<HALF>(p.scales, (n0 + j) * p.groups + g));
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_fmadd_ps(t[r][j], d, acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) {
      float v = hsum(acc[r][j]);
      const float* xs = xsum + (r0 + r) * p.groups;
      if constexpr (BITS == 4) {
        v += OFFSET ? dot_centred<HALF>(p.offsets, p.scales, (n0 + j) * p.groups, xs, p.groups)
                    : 8.0f * dot_params<HALF>(p.scales, (n0 + j) * p.groups, xs, p.groups);
      } else if constexpr (OFFSET) {
        v += dot_params<HALF>(p.offsets, (n0 + j) * p.groups, xs, p.groups);
      }
      p.y[(r0 + r) * p.N + n0 + j] = v;
    }
  }
}

#ifdef DK_AVX512
// `ftile` on 16 lanes: the same factored form and centred codes, each run of 32 inputs two vectors of 16 (inputs
// 0..15 from the low nibbles, 16..31 from the high ones: GGUF's order is already the vectors' order). Two chains of
// sums per row and column, one per vector; the scale multiplies their sum once per group.
template <int BITS, bool HALF, bool OFFSET, int MR, int NR>
inline void ftile512(const Problem& p, const float* xsum, int64_t n0, int64_t r0) {
  const int64_t per = p.group / 32;
  const uint8_t* wq[NR];
  for (int j = 0; j < NR; ++j) wq[j] = p.codes + (n0 + j) * p.row_bytes;
  const float* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = p.x + (r0 + r) * p.K;
  const int64_t runs = p.K / 32;  // prefetch two tiles ahead, as `ftile` does
  const char* next = reinterpret_cast<const char*>(wq[0] + 2 * NR * p.row_bytes);
  const int64_t lines = (NR * p.row_bytes + 63) / 64;
  const int64_t per_run = (lines + runs - 1) / runs;
  const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 t[MR][NR][2];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) t[r][j][0] = t[r][j][1] = _mm512_setzero_ps();
    for (int64_t b = g * per; b < (g + 1) * per; ++b) {
      const int64_t k = 32 * b;
      for (int64_t i = 0; i < per_run; ++i) _mm_prefetch(next + (b * per_run + i) * 64, _MM_HINT_T0);
      for (int j = 0; j < NR; ++j) {
        __m128i lo, hi;
        if constexpr (BITS == 4) {
          const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq[j] + k / 2));
          lo = _mm_sub_epi8(_mm_and_si128(c, mask), eight);
          hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(c, 4), mask), eight);
        } else {
          lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq[j] + k));
          hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq[j] + k + 16));
        }
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
        for (int r = 0; r < MR; ++r) {
          t[r][j][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + k), t[r][j][0]);
          t[r][j][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + k + 16), t[r][j][1]);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m512 d = _mm512_set1_ps(scalar_at<HALF>(p.scales, (n0 + j) * p.groups + g));
      for (int r = 0; r < MR; ++r)
        acc[r][j] = _mm512_fmadd_ps(_mm512_add_ps(t[r][j][0], t[r][j][1]), d, acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) {
      float v = _mm512_reduce_add_ps(acc[r][j]);
      const float* xs = xsum + (r0 + r) * p.groups;
      if constexpr (BITS == 4) {
        v += OFFSET ? dot_centred<HALF>(p.offsets, p.scales, (n0 + j) * p.groups, xs, p.groups)
                    : 8.0f * dot_params<HALF>(p.scales, (n0 + j) * p.groups, xs, p.groups);
      } else if constexpr (OFFSET) {
        v += dot_params<HALF>(p.offsets, (n0 + j) * p.groups, xs, p.groups);
      }
      p.y[(r0 + r) * p.N + n0 + j] = v;
    }
  }
}
#endif

// ------------------------------------------------------------------------------- several rows: a panel GEMM
// For more than a few rows the weights are rebuilt once per call into a float32 panel of GN columns by up to GK
// inputs (each weight fma(q, scale, offset), the dequantized weight itself), and rows of x in tiles of up to GM
// multiply it in a register-blocked dot-product micro-kernel: GM x GN accumulators of 8 lanes plus GM vectors of x
// are the 16 AVX2 registers, each 8 inputs costing GM + GN loads for GM * GN FMAs (FMA-bound, where `ftile`, one
// load of x per FMA, is bound by loads). Each lane sums every 8th product, the lanes are summed at the end: a float
// matmul with the dequantized weight, only the order of the sums differing.
// GM x GN = 2 x 6 measured a little faster than 3 x 4 at 16 rows on SmolLM2's shapes (2-core EPYC, one thread),
// reading x a third less often.
// With AVX-512 the accumulators are 16 lanes and there are 32 registers: 4 x 6 accumulators, 4 vectors of x and one
// of the panel.
#ifdef DK_AVX512
using gvec = __m512;
constexpr int GM = 4, GL = 16;
inline gvec gzero() { return _mm512_setzero_ps(); }
inline gvec gload(const float* p) { return _mm512_loadu_ps(p); }
inline gvec gfma(gvec a, gvec b, gvec c) { return _mm512_fmadd_ps(a, b, c); }
inline float gsum(gvec v) { return _mm512_reduce_add_ps(v); }
#else
using gvec = __m256;
constexpr int GM = 2, GL = 8;
inline gvec gzero() { return _mm256_setzero_ps(); }
inline gvec gload(const float* p) { return _mm256_loadu_ps(p); }
inline gvec gfma(gvec a, gvec b, gvec c) { return _mm256_fmadd_ps(a, b, c); }
inline float gsum(gvec v) { return hsum(v); }
#endif
constexpr int GN = 6;
constexpr int64_t GK = 768;  // inputs per panel

// Rows from which the panel GEMM replaces `ftile` (SmolLM2's shapes, one thread pinned, 2-core EPYC): 4-bit layers
// from 2 rows (1.35x at 2, 2.1x at 16); the 8-bit head, bound by reading its 28 MB, from 8 (even at 4 rows).
template <int BITS>
constexpr int64_t gemm_rows() { return BITS == 4 ? 2 : 8; }

template <int MR, int NC>
inline void gmicro(const float* panel, int64_t kc, const float* const* x, gvec* acc) {
  gvec a[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) a[r][j] = acc[r * NC + j];
  for (int64_t k = 0; k < kc; k += GL) {
    gvec xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = gload(x[r] + k);
    for (int j = 0; j < NC; ++j) {
      const gvec w = gload(panel + j * kc + k);
      for (int r = 0; r < MR; ++r) a[r][j] = gfma(w, xv[r], a[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) acc[r * NC + j] = a[r][j];
}

// One run of 32 weights of a column, dequantized into out[0 .. 32): q * d (+ m), float32, on the panel GEMM's
// vectors (gvec: 16 lanes with AVX-512, else 8).
#ifdef DK_AVX512
inline gvec gset1(float v) { return _mm512_set1_ps(v); }
inline gvec gmul(gvec a, gvec b) { return _mm512_mul_ps(a, b); }
inline void gstore(float* p, gvec v) { _mm512_store_ps(p, v); }
// Each lane rounded to the nearest bfloat16 (ties to even), kept as float32: bfloat16 is float32's upper half. For
// finite values (weights and activations are), as VCVTNEPS2BF16 and torch's conversion round them.
inline gvec ground(gvec v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// unpack32 on 16 lanes: the 32 codes of a run as 2 x 16 floats, in input order (the same values).
template <int BITS>
inline void gunpack(const uint8_t* p, gvec w[2]) {
  if constexpr (BITS == 4) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  } else {
    for (int v = 0; v < 2; ++v)
      w[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))));
  }
}
#else
inline gvec gset1(float v) { return _mm256_set1_ps(v); }
inline gvec gmul(gvec a, gvec b) { return _mm256_mul_ps(a, b); }
inline void gstore(float* p, gvec v) { _mm256_store_ps(p, v); }
inline gvec ground(gvec v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
template <int BITS>
inline void gunpack(const uint8_t* p, gvec w[4]) { unpack32<BITS>(p, w); }
#endif

// The run's weights as 32 / GL vectors.
template <int BITS, bool HALF, bool OFFSET>
inline void dequantize_vectors(const Problem& p, const uint8_t* q, int64_t at, int64_t k, gvec w[32 / GL]) {
  const int64_t byte = BITS == 4 ? k / 2 : k;
  const int64_t g = k / p.group;
  const gvec d = gset1(scalar_at<HALF>(p.scales, at + g));
  const gvec m = gset1(OFFSET ? scalar_at<HALF>(p.offsets, at + g) : 0.0f);
  gunpack<BITS>(q + byte, w);
  for (int v = 0; v < 32 / GL; ++v) w[v] = OFFSET ? gfma(w[v], d, m) : gmul(w[v], d);
}

// ROUND: each weight rounded to bfloat16 (`qmm_bf16` without VDPBF16PS).
template <int BITS, bool HALF, bool OFFSET, bool ROUND = false>
inline void dequantize_run(const Problem& p, const uint8_t* q, int64_t at, int64_t k, float* out) {
  gvec w[32 / GL];
  dequantize_vectors<BITS, HALF, OFFSET>(p, q, at, k, w);
  for (int v = 0; v < 32 / GL; ++v) gstore(out + GL * v, ROUND ? ground(w[v]) : w[v]);
}

// Columns n0 .. n0 + NC, every row: the panel GEMM's loop, for float32 (`gcolumns`) and bfloat16 (`bcolumns`)
// panels of element T. Each panel of the columns is dequantized once for all M rows (the accumulators, M x NC
// vectors, live in a per-thread buffer): a prompt chunk of 160 rows dequantized it 7 times when they lived on the
// stack, 24 rows at a time. Every sum adds the same products in the same order either way.
// fill(q, at, k, out) writes the run of 32 weights of column codes q (scales from index at) at input k to out;
// multiply(mr, panel, kc, r0, kb, acc) adds rows r0 .. r0 + mr's products over inputs kb .. kb + kc to acc.
template <int BITS, typename T, int NC, typename Fill, typename Multiply>
void panel_columns(const Problem& p, int64_t n0, Fill&& fill, Multiply&& multiply) {
  alignas(64) T panel[GN * GK];
  thread_local std::vector<gvec> accumulators;
  if (static_cast<int64_t>(accumulators.size()) < p.M * NC) accumulators.resize(p.M * NC);
  gvec* acc = accumulators.data();
  const int64_t blocks = (p.K + GK - 1) / GK;
  const int64_t step = (p.K / 32 + blocks - 1) / blocks * 32;
  for (int64_t i = 0; i < p.M * NC; ++i) acc[i] = gzero();
  for (int64_t kb = 0; kb < p.K; kb += step) {
    const int64_t kc = std::min(step, p.K - kb);
    for (int j = 0; j < NC; ++j) {
      const uint8_t* q = p.codes + (n0 + j) * p.row_bytes;
      // The same column two tiles ahead (see ftile's prefetch), a cache line per 64 bytes of codes
      const char* ahead = reinterpret_cast<const char*>(q + 2 * GN * p.row_bytes);
      const int64_t at = (n0 + j) * p.groups;
      for (int64_t k = kb; k < kb + kc; k += 32) {
        const int64_t byte = BITS == 4 ? k / 2 : k;
        if (byte % 64 == 0) _mm_prefetch(ahead + byte, _MM_HINT_T0);
        fill(q, at, k, panel + j * kc + (k - kb));
      }
    }
    for_row_tiles<GM>(p.M, [&](auto mr, int64_t r0) { multiply(mr, panel, kc, r0, kb, acc + r0 * NC); });
  }
  for (int64_t r = 0; r < p.M; ++r)
    for (int j = 0; j < NC; ++j) p.y[r * p.N + n0 + j] = gsum(acc[r * NC + j]);
}

// The float32 panel. NC: columns (GN, or 1 for those past the last whole tile where `qmm_bf16` rounds: ROUND).
template <int BITS, bool HALF, bool OFFSET, int NC = GN, bool ROUND = false>
void gcolumns(const Problem& p, int64_t n0) {
  const auto fill = [&](const uint8_t* q, int64_t at, int64_t k, float* out) {
    dequantize_run<BITS, HALF, OFFSET, ROUND>(p, q, at, k, out);
  };
  const auto multiply = [&](auto mr, const float* panel, int64_t kc, int64_t r0, int64_t kb, gvec* acc) {
    constexpr int MR = decltype(mr)::value;
    const float* x[MR];
    for (int r = 0; r < MR; ++r) x[r] = p.x + (r0 + r) * p.K + kb;
    gmicro<MR, NC>(panel, kc, x, acc);
  };
  panel_columns<BITS, float, NC>(p, n0, fill, multiply);
}

template <int BITS, bool HALF, bool OFFSET>
void frun(const Problem& p) {
  if (p.M >= gemm_rows<BITS>()) {
    // Columns past the last whole tile take the factored path, one column at a time
    const std::vector<float> xsum = p.N % GN && (OFFSET || BITS == 4) ? group_sums(p) : std::vector<float>();
    for_column_tiles<GN>(p, [&](auto nr, int64_t n0) {
      if constexpr (decltype(nr)::value == GN) {
        gcolumns<BITS, HALF, OFFSET>(p, n0);
      } else {
        for_row_tiles<4>(p.M, [&](auto mr, int64_t r0) {
          ftile<BITS, HALF, OFFSET, decltype(mr)::value, 1>(p, xsum.data(), n0, r0);
        });
      }
    });
    return;
  }
  const std::vector<float> xsum = OFFSET || BITS == 4 ? group_sums(p) : std::vector<float>();
  const auto columns = [&](auto nr, int64_t n0) {
    for_row_tiles<4>(p.M, [&](auto mr, int64_t r0) {
#ifdef DK_AVX512
      ftile512<BITS, HALF, OFFSET, decltype(mr)::value, decltype(nr)::value>(p, xsum.data(), n0, r0);
#else
      ftile<BITS, HALF, OFFSET, decltype(mr)::value, decltype(nr)::value>(p, xsum.data(), n0, r0);
#endif
    });
  };
  // Four columns at a time for one row (four chains of sums in flight, one unpacking of the codes per column);
  // with more rows, which make their own chains, two.
  p.M == 1 ? for_column_tiles<4>(p, columns) : for_column_tiles<2>(p, columns);
}
#endif

// ------------------------------------------------------------------------ bfloat16 products (qmm_bf16)
#ifdef DK_AVX512BF16
// The panel GEMM of `gcolumns` on bfloat16: the panel holds each weight rounded to bfloat16, x is rounded once per
// call, and VDPBF16PS adds two exact products to each float32 lane per instruction: GM x NC accumulators of 16
// lanes, each covering 32 inputs per step.
inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

template <int MR, int NC>
inline void bmicro(const uint16_t* panel, int64_t kc, const uint16_t* const* x, __m512* acc) {
  __m512 a[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) a[r][j] = acc[r * NC + j];
  for (int64_t k = 0; k < kc; k += 32) {
    __m512bh xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = as_bf16(_mm512_loadu_si512(x[r] + k));
    for (int j = 0; j < NC; ++j) {
      const __m512bh w = as_bf16(_mm512_load_si512(panel + j * kc + k));
      for (int r = 0; r < MR; ++r) a[r][j] = _mm512_dpbf16_ps(a[r][j], w, xv[r]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) acc[r * NC + j] = a[r][j];
}

// 32 floats as 32 bfloat16 in order (VCVTNE2PS2BF16 takes the upper half first).
inline void store_bf16(uint16_t* out, __m512 lo, __m512 hi) {
  const __m512bh b = _mm512_cvtne2ps_pbh(hi, lo);
  _mm512_storeu_si512(out, reinterpret_cast<const __m512i&>(b));
}

template <int BITS, bool HALF, bool OFFSET, int NC>
void bcolumns(const Problem& p, const uint16_t* xb, int64_t n0) {
  const auto fill = [&](const uint8_t* q, int64_t at, int64_t k, uint16_t* out) {
    gvec w[2];
    dequantize_vectors<BITS, HALF, OFFSET>(p, q, at, k, w);
    store_bf16(out, w[0], w[1]);
  };
  const auto multiply = [&](auto mr, const uint16_t* panel, int64_t kc, int64_t r0, int64_t kb, gvec* acc) {
    constexpr int MR = decltype(mr)::value;
    const uint16_t* x[MR];
    for (int r = 0; r < MR; ++r) x[r] = xb + (r0 + r) * p.K + kb;
    bmicro<MR, NC>(panel, kc, x, acc);
  };
  panel_columns<BITS, uint16_t, NC>(p, n0, fill, multiply);
}

// Fewer rows than a tile of the panel GEMM (decode): each run of the NC columns goes from its codes to the
// multiplication in registers, never stored. The accumulators add the same products in the same order as
// `bcolumns`', so a row's result is the same bits either way.
template <int BITS, bool HALF, bool OFFSET, int MR, int NC>
void bdirect(const Problem& p, const uint16_t* xb, int64_t n0) {
  __m512 a[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) a[r][j] = _mm512_setzero_ps();
  const uint8_t* q[NC];
  for (int j = 0; j < NC; ++j) q[j] = p.codes + (n0 + j) * p.row_bytes;
  const char* ahead = reinterpret_cast<const char*>(q[0] + 2 * NC * p.row_bytes);  // as ftile prefetches
  const int64_t lines = (NC * p.row_bytes + 63) / 64, runs = p.K / 32, per_run = (lines + runs - 1) / runs;
  for (int64_t k = 0; k < p.K; k += 32) {
    for (int64_t i = 0; i < per_run; ++i) _mm_prefetch(ahead + (k / 32 * per_run + i) * 64, _MM_HINT_T0);
    __m512bh xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = as_bf16(_mm512_loadu_si512(xb + r * p.K + k));
    for (int j = 0; j < NC; ++j) {
      gvec w[2];
      dequantize_vectors<BITS, HALF, OFFSET>(p, q[j], (n0 + j) * p.groups, k, w);
      const __m512bh wb = _mm512_cvtne2ps_pbh(w[1], w[0]);
      for (int r = 0; r < MR; ++r) a[r][j] = _mm512_dpbf16_ps(a[r][j], wb, xv[r]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) p.y[r * p.N + n0 + j] = _mm512_reduce_add_ps(a[r][j]);
}

template <int BITS, bool HALF, bool OFFSET>
void brun(const Problem& p) {
  std::vector<uint16_t> xb(p.M * p.K);
  for (int64_t i = 0; i < p.M * p.K; i += 32)
    store_bf16(xb.data() + i, _mm512_loadu_ps(p.x + i), _mm512_loadu_ps(p.x + i + 16));
  if (p.M < GM) {
    return for_column_tiles<GN>(p, [&](auto nr, int64_t n0) {
      auto rows = [&](auto mr, int64_t) {
        bdirect<BITS, HALF, OFFSET, decltype(mr)::value, decltype(nr)::value>(p, xb.data(), n0);
      };
      last_row_tile<GM - 1>(p.M, 0, rows);
    });
  }
  for_column_tiles<GN>(p, [&](auto nr, int64_t n0) { bcolumns<BITS, HALF, OFFSET, decltype(nr)::value>(p, xb.data(), n0); });
}
#elif defined(DK_AVX2)
// Without VDPBF16PS: `gcolumns` on x and weights rounded to bfloat16 (float32 FMAs of the same exact products).
template <int BITS, bool HALF, bool OFFSET>
void brun(const Problem& p) {
  std::vector<gvec> xr(p.M * p.K / GL);  // vectors: aligned for gstore
  for (int64_t i = 0; i < p.M * p.K / GL; ++i) xr[i] = ground(gload(p.x + i * GL));
  Problem rounded = p;
  rounded.x = reinterpret_cast<const float*>(xr.data());
  for_column_tiles<GN>(rounded, [&](auto nr, int64_t n0) {
    gcolumns<BITS, HALF, OFFSET, decltype(nr)::value, true>(rounded, n0);
  });
}
#endif

template <int BITS, bool HALF, bool OFFSET>
void run(const Problem& p) {
#ifdef DK_AVX2
  if (p.group % 32 == 0) return frun<BITS, HALF, OFFSET>(p);
#endif
  for_column_tiles<1>(p, [&](auto, int64_t n) {
    for_row_tiles<4>(p.M, [&](auto mr, int64_t r0) { tile<BITS, HALF, OFFSET, decltype(mr)::value>(p, n, r0); });
  });
}

template <int BITS>
void dispatch(const Problem& p, bool half, bool offset) {
  if (half) {
    offset ? run<BITS, true, true>(p) : run<BITS, true, false>(p);
  } else {
    offset ? run<BITS, false, true>(p) : run<BITS, false, false>(p);
  }
}

// ------------------------------------------------------------------------------------------- int8 activations
// Each row of x is cut into runs of 32 inputs (the last one shorter where K is not a multiple of 32, int8 rows of
// one group only). A run with largest |x| amax becomes a = nearbyint(x * (127 / amax)) (0 where amax is 0) with
// d = amax / 127, both float32 operations, and the column's sum is, over runs b in groups g,
//   y = sum_b scale[g] * d[b] * sum(q * a)  +  sum_g offset[g] * sum_{b in g} d[b] * sum(a)
// where sum(q * a) and sum(a) are exact integers and the rest is float32.
struct QRows {
  std::vector<int8_t> a;  // (M, K)
  std::vector<float> d;   // (M, runs)
  std::vector<float> s;   // (M, groups): sum over the group's runs of d * sum(a), for the offset term
  int64_t runs = 0;
};

#ifdef DK_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// One run of `len` inputs: writes its codes, returns d, sets `sum` to sum(a).
inline float quantize_run(const float* x, int64_t len, int8_t* a, int32_t& sum) {
#ifdef DK_AVX2
  if (len == 32) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    const float amax = hmax(m);
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i c[4];
    for (int i = 0; i < 4; ++i)
      c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3])));
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), packed);
    return amax / 127.0f;
  }
#endif
  float amax = 0.0f;
  for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  sum = 0;
  for (int64_t j = 0; j < len; ++j) {
    a[j] = static_cast<int8_t>(std::nearbyint(x[j] * id));
    sum += a[j];
  }
  return amax / 127.0f;
}

QRows quantize_rows(const Problem& p, bool offset) {
  QRows q;
  q.runs = (p.K + 31) / 32;
  q.a.resize(p.M * p.K);
  q.d.resize(p.M * q.runs);
  q.s.assign(offset ? p.M * p.groups : 0, 0.0f);
  for (int64_t r = 0; r < p.M; ++r) {
    for (int64_t b = 0; b < q.runs; ++b) {
      const int64_t k = 32 * b;
      int32_t sum = 0;
      const float d = quantize_run(p.x + r * p.K + k, std::min<int64_t>(32, p.K - k), q.a.data() + r * p.K + k, sum);
      q.d[r * q.runs + b] = d;
      if (offset) q.s[r * p.groups + k / p.group] += d * static_cast<float>(sum);
    }
  }
  return q;
}

#ifdef DK_AVX2
// 32 codes of one run as bytes in input order: 0..15 (bits 4) or int8 (bits 8).
template <int BITS>
inline __m256i load_codes(const uint8_t* q) {
  if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  }
}

// sum(q * a) of one run as 8 int32 partial sums. maddubs multiplies unsigned by signed bytes, so int8 codes give
// their sign to a (llama.cpp's trick); pairs stay below int16's limit (2 * 128 * 127).
template <int BITS>
inline __m256i dot_run(__m256i w, __m256i wabs, __m256i a) {
  const __m256i p = BITS == 4 ? _mm256_maddubs_epi16(w, a) : _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(a, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
#endif

// y[r0 .. r0 + MR) at output columns n0 .. n0 + NR from the quantized rows.
template <int BITS, bool HALF, bool OFFSET, int MR, int NR>
inline void itile(const Problem& p, const QRows& qa, int64_t n0, int64_t r0) {
  const int64_t K = p.K, full = K / 32;
  // Runs per group; a group that is not a multiple of 32 is the whole row (checked by qmm_q8)
  const int64_t per = p.group % 32 == 0 ? p.group / 32 : full;
  const uint8_t* wq[NR];
  for (int j = 0; j < NR; ++j) wq[j] = p.codes + (n0 + j) * p.row_bytes;
  const int8_t* xa[MR];
  const float* xd[MR];
  for (int r = 0; r < MR; ++r) {
    xa[r] = qa.a.data() + (r0 + r) * K;
    xd[r] = qa.d.data() + (r0 + r) * qa.runs;
  }
  float out[MR][NR] = {};
#ifdef DK_AVX2
  // The NR rows are read interleaved, which hides their order from the hardware prefetcher (int8 rows out of
  // cache ran at half the float path's speed): each run prefetches its share of the bytes two tiles ahead (as
  // `ftile` does; 1.1-1.25x over one tile ahead on SmolLM2's shapes).
  const char* next = reinterpret_cast<const char*>(wq[0] + 2 * NR * p.row_bytes);
  const int64_t lines = (NR * p.row_bytes + 64 * full - 1) / std::max<int64_t>(64 * full, 1);
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < p.groups; ++g) {
    float dw[NR];
    for (int j = 0; j < NR; ++j) dw[j] = scalar_at<HALF>(p.scales, (n0 + j) * p.groups + g);
    const int64_t end = std::min(full, (g + 1) * per);
    for (int64_t b = g * per; b < end; ++b) {
      const int64_t k = 32 * b;
#ifdef DK_AVX2
      for (int64_t i = 0; i < lines; ++i) _mm_prefetch(next + (b * lines + i) * 64, _MM_HINT_T0);
      __m256i w[NR], wabs[NR];
      for (int j = 0; j < NR; ++j) {
        w[j] = load_codes<BITS>(wq[j] + (BITS == 4 ? k / 2 : k));
        wabs[j] = BITS == 4 ? w[j] : _mm256_sign_epi8(w[j], w[j]);
      }
      for (int r = 0; r < MR; ++r) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa[r] + k));
        const float dx = xd[r][b];
        for (int j = 0; j < NR; ++j)
          acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_run<BITS>(w[j], wabs[j], a)),
                                      _mm256_set1_ps(dw[j] * dx), acc[r][j]);
      }
#else
      for (int j = 0; j < NR; ++j) {
        int32_t c[32];
        for (int i = 0; i < 32; ++i) {
          if constexpr (BITS == 4) {
            const uint8_t byte = wq[j][k / 2 + (i & 15)];
            c[i] = i < 16 ? (byte & 0x0F) : (byte >> 4);
          } else {
            c[i] = static_cast<int8_t>(wq[j][k + i]);
          }
        }
        for (int r = 0; r < MR; ++r) {
          int32_t s = 0;
          for (int i = 0; i < 32; ++i) s += c[i] * xa[r][k + i];
          out[r][j] += static_cast<float>(s) * (dw[j] * xd[r][b]);
        }
      }
#endif
    }
  }
  if (full < qa.runs) {  // the short last run of an int8 row with one group
    const int64_t k = 32 * full;
    for (int j = 0; j < NR; ++j) {
      const float dw = scalar_at<HALF>(p.scales, (n0 + j) * p.groups);
      for (int r = 0; r < MR; ++r) {
        int32_t s = 0;
        for (int64_t i = k; i < K; ++i) s += static_cast<int8_t>(wq[j][i]) * xa[r][i];
        out[r][j] += static_cast<float>(s) * (dw * xd[r][full]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) {
      float v = out[r][j];
#ifdef DK_AVX2
      v += hsum(acc[r][j]);
#endif
      if constexpr (OFFSET)
        v += dot_params<HALF>(p.offsets, (n0 + j) * p.groups, qa.s.data() + (r0 + r) * p.groups, p.groups);
      p.y[(r0 + r) * p.N + n0 + j] = v;
    }
  }
}

template <int BITS, bool HALF, bool OFFSET>
void irun(const Problem& p) {
  const QRows qa = quantize_rows(p, OFFSET);
  // Four columns at a time share each run of activations and keep four chains of sums in flight
  for_column_tiles<4>(p, [&](auto nr, int64_t n0) {
    for_row_tiles<4>(p.M, [&](auto mr, int64_t r0) {
      itile<BITS, HALF, OFFSET, decltype(mr)::value, decltype(nr)::value>(p, qa, n0, r0);
    });
  });
}

template <int BITS>
void idispatch(const Problem& p, bool half, bool offset) {
  if (half) {
    offset ? irun<BITS, true, true>(p) : irun<BITS, true, false>(p);
  } else {
    offset ? irun<BITS, false, true>(p) : irun<BITS, false, false>(p);
  }
}

// The checks both ops share; y is allocated (M, N).
Problem problem(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                const std::optional<at::Tensor>& offsets, int64_t bits, int64_t group, at::Tensor& y) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "qmm: x must be a contiguous float32 (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.element_size() == 1,
              "qmm: codes must be a contiguous 2-D tensor of bytes");
  const int64_t N = codes.size(0);
  TORCH_CHECK(codes.size(1) == (bits == 4 ? K / 2 : K), "qmm: codes of shape ", codes.sizes(),
              " do not hold ", N, " rows of ", K, " ", bits, "-bit inputs");
  TORCH_CHECK(group > 0 && K % group == 0, "qmm: group ", group, " does not divide K = ", K);
  TORCH_CHECK(bits == 8 || (group % 32 == 0), "qmm: 4-bit groups must be multiples of 32, got ", group);
  TORCH_CHECK(group % 32 == 0 || group == K, "qmm: a group that is not a multiple of 32 must span the row");
  const int64_t groups = K / group;
  const bool half = scales.scalar_type() == at::kHalf;
  TORCH_CHECK(half || scales.scalar_type() == at::kFloat, "qmm: scales must be float16 or float32");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N * groups, "qmm: scales must be contiguous (N, K / group)");
  const bool has_offset = offsets.has_value();
  if (has_offset) {
    TORCH_CHECK(offsets->scalar_type() == scales.scalar_type() && offsets->is_contiguous() &&
                    offsets->numel() == N * groups,
                "qmm: offsets must match scales in dtype and shape");
  }
  y = at::empty({M, N}, x.options());
  return Problem{x.data_ptr<float>(), M, K, N, static_cast<const uint8_t*>(codes.data_ptr()), codes.size(1),
                 scales.data_ptr(), has_offset ? offsets->data_ptr() : nullptr, group, groups, y.data_ptr<float>()};
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
               const std::optional<at::Tensor>& offsets, int64_t bits, int64_t group) {
  at::Tensor y;
  const Problem p = problem(x, codes, scales, offsets, bits, group, y);
  if (p.M == 0 || p.N == 0) return y;
  const bool half = scales.scalar_type() == at::kHalf;
  bits == 4 ? dispatch<4>(p, half, offsets.has_value()) : dispatch<8>(p, half, offsets.has_value());
  return y;
}

at::Tensor qmm_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                  const std::optional<at::Tensor>& offsets, int64_t bits, int64_t group) {
  at::Tensor y;
  const Problem p = problem(x, codes, scales, offsets, bits, group, y);
  if (p.M == 0 || p.N == 0) return y;
  const bool half = scales.scalar_type() == at::kHalf;
  bits == 4 ? idispatch<4>(p, half, offsets.has_value()) : idispatch<8>(p, half, offsets.has_value());
  return y;
}

at::Tensor qmm_bf16(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, int64_t bits, int64_t group) {
  at::Tensor y;
  const Problem p = problem(x, codes, scales, offsets, bits, group, y);
  TORCH_CHECK(group % 32 == 0, "qmm_bf16: groups must be runs of 32 inputs, got ", group);
  if (p.M == 0 || p.N == 0) return y;
#ifdef DK_AVX2
  const bool half = scales.scalar_type() == at::kHalf, offset = offsets.has_value();
  if (bits == 4) {
    half ? (offset ? brun<4, true, true>(p) : brun<4, true, false>(p))
         : (offset ? brun<4, false, true>(p) : brun<4, false, false>(p));
  } else {
    half ? (offset ? brun<8, true, true>(p) : brun<8, true, false>(p))
         : (offset ? brun<8, false, true>(p) : brun<8, false, false>(p));
  }
#else
  TORCH_CHECK(false, "qmm_bf16: this build has no AVX2 path (decoderkit.kernels.bf16_products() is None)");
#endif
  return y;
}

bool simd() {
#ifdef DK_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(decoderkit_kernels, m) {
  m.def("qmm(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
  m.def("qmm_q8(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
  m.def("qmm_bf16(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(decoderkit_kernels, CPU, m) {
  m.impl("qmm", &qmm);
  m.impl("qmm_q8", &qmm_q8);
  m.impl("qmm_bf16", &qmm_bf16);
}

extern "C" int decoderkit_qmm_simd() { return simd() ? 1 : 0; }

// 1 where qmm_bf16 multiplies with VDPBF16PS, 0 where it rounds and takes float32 FMAs (for tests and benchmarks)
extern "C" int decoderkit_qmm_bf16_native() {
#ifdef DK_AVX512BF16
  return 1;
#else
  return 0;
#endif
}

// 512 where the few-row path runs on AVX-512, 256 on AVX2, 0 for the portable path (for tests and benchmarks)
extern "C" int decoderkit_qmm_vector_bits() {
#if defined(DK_AVX512)
  return 512;
#elif defined(DK_AVX2)
  return 256;
#else
  return 0;
#endif
}
