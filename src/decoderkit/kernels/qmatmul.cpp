// Weight-only quantized matrix multiplication for small batches (decode): y = x W^T, x float32 (M, K).
//
// W is held as integer codes with one scale (and optionally one offset) per group of `group` inputs of a row:
//   bits 4: codes uint8 (N, K / 2); each run of 32 inputs is 16 bytes, byte j holding input j in its low nibble and
//           input j + 16 in its high one (llama.cpp's Q4_0 / Q4_1 order); w = scale * q + offset, q in 0..15.
//   bits 8: codes int8 (N, K); w = scale * q (+ offset).
// scales / offsets: (N, K / group), float16 or float32. Every product and sum is float32 (see `tile`).
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

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DK_AVX2 1
#endif

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

#ifdef DK_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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
#endif

// y[r0 .. r0 + MR) at output column n. Each weight is rebuilt as fma(q, scale, offset): scale * q is exact in
// float32, so this is the float32 dequantized weight itself, and only the order of the sums differs from a float
// matmul with it (a form summing q * x per group and scaling after would cancel badly where offset ~ -8 scale).
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
#ifdef DK_AVX2
  if (p.group == 32) {  // GGUF's blocks: one scale (and offset) per run of 32, no inner loop to set up
    const int64_t base = n * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) {
      const __m256 vd = _mm256_set1_ps(scalar_at<HALF>(p.scales, base + g));
      const __m256 vm = _mm256_set1_ps(OFFSET ? scalar_at<HALF>(p.offsets, base + g) : 0.0f);
      const int64_t k = g * 32;
      __m256 w[4];
      unpack32<BITS>(q + (BITS == 4 ? k / 2 : k), w);
      for (int v = 0; v < 4; ++v) w[v] = OFFSET ? _mm256_fmadd_ps(w[v], vd, vm) : _mm256_mul_ps(w[v], vd);
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 4; ++v)
          acc[r][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x[r] + k + 8 * v), acc[r][v % NA]);
    }
  } else
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

template <int BITS, bool HALF, bool OFFSET>
void run(const Problem& p) {
  // Enough work per task that forking threads pays (about 64K weights).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(p.K, 1));
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t r0 = 0;
      for (; r0 + 4 <= p.M; r0 += 4) tile<BITS, HALF, OFFSET, 4>(p, n, r0);
      switch (p.M - r0) {
        case 3: tile<BITS, HALF, OFFSET, 3>(p, n, r0); break;
        case 2: tile<BITS, HALF, OFFSET, 2>(p, n, r0); break;
        case 1: tile<BITS, HALF, OFFSET, 1>(p, n, r0); break;
        default: break;
      }
    }
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

at::Tensor qmm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
               const std::optional<at::Tensor>& offsets, int64_t bits, int64_t group) {
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
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  Problem p{x.data_ptr<float>(), M, K, N, static_cast<const uint8_t*>(codes.data_ptr()), codes.size(1),
            scales.data_ptr(), has_offset ? offsets->data_ptr() : nullptr, group, groups, y.data_ptr<float>()};
  if (bits == 4) {
    dispatch<4>(p, half, has_offset);
  } else {
    dispatch<8>(p, half, has_offset);
  }
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
}

TORCH_LIBRARY_IMPL(decoderkit_kernels, CPU, m) { m.impl("qmm", &qmm); }

extern "C" int decoderkit_qmm_simd() { return simd() ? 1 : 0; }
