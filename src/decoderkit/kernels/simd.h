// Horizontal reductions of an AVX2 register, shared by decoderkit's kernels. Each kernel decides whether its AVX2 path
// is built (its DK_AVX2) and includes this file after deciding; kernels/__init__.py hashes this file into every
// kernel's cache key, so a change here rebuilds them all.
#pragma once

#ifdef DK_AVX2
#include <immintrin.h>

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#endif
