// Causal attention of a flat batch of query rows over keys and values read in place, in two layouts (two ops):
//
// paged_attention: a paged KV pool (the server)
//   q        (N, H, D) float32: the step's query rows, sequence after sequence (row_starts[s] .. row_starts[s+1]-1)
//   k, v     (R, H_kv, D) float32 or bfloat16: one layer of the pool; buffer row table[b] * block_size + i holds
//            position b * block_size + i of a sequence whose block table is `table`
//   tables   (S, B) int64: each sequence's block table
//   row_starts (S + 1) int64; positions (S) int64: the position of each sequence's first query row
//   slopes   (H) float32 or None: ALiBi, score += slope * (j - i) for key j and query position i
//
// static_attention: a static cache (generate's), every sequence T query rows at the same slots
//   q        (B, T, H, D) float32; k, v (B, H_kv, S, D) float32 or bfloat16, slot j of sequence b at [b, :, j]
//   cache_position (T) int64: the slots of the T query rows (consecutive)
//   key_mask (B, S) bool or None: the slots each sequence may attend to (its prompt's padding is False)
// Only slots up to the last query's are read, where SDPA over the whole cache reads all S of them.
//
// prefill_attention: paged_attention's inputs and values, for sequences of many query rows (prefill chunks); with
//   AVX2 and D a multiple of 8 it takes a tiled path (blocks of 64 keys against 64 query vectors as register-blocked
//   matrix products, `run_unit_tiled`), which rounds differently from the per-vector path and runs several times
//   faster.
//
// Query row r of sequence s sits at position i = positions[s] + r - row_starts[s] and attends keys 0..i; query head
// h reads key head h / (H / H_kv). Every product and sum is float32, with an online softmax (flash attention's
// recurrence) over groups of 16 keys, so no score matrix and no copy of a sequence's context is ever made.
//
// Work is split into (sequence, key head, tile of query rows) units over torch's intra-op threads; a unit converts
// each group of keys and values to float32 once (or reads float32 rows in place where they are D apart) and reuses
// it for all of its rows and the query heads of its key head.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DK_AVX2 1
#endif

#include "simd.h"

namespace {

constexpr int64_t kGroup = 16;  // keys per online-softmax update
constexpr int64_t kTile = 32;   // query rows per work unit
constexpr int64_t kTiledRows = 64;  // query rows per work unit of the tiled path (`prefill_attention`)

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  bool bf16;
  const int64_t* tables;
  int64_t table_width;
  const int64_t* row_starts;
  const int64_t* positions;
  const float* slopes;
  int64_t H, H_kv, D, block_size;
  float scale;
  float* out;
  // Element offsets of a key row and of a key head: (H_kv * D, D) in the pool, (D, S * D) in a static cache
  int64_t row_stride, head_stride;
  const bool* key_mask = nullptr;  // (S, mask_width): False keys are skipped
  int64_t mask_width = 0;
};

#ifdef DK_AVX2
// exp for x <= 0 (Cephes' polynomial, about 1 ulp); inputs below -87 give 0 rather than a denormal.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.0f);
  __m256 tiny = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(n)));
}

// Eight dot products of q with the rows k[0..7] (each D floats), as one vector.
inline __m256 dot8(const float* q, const float* k, int64_t D) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qd = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + j * D + d), a[j]);
  }
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: s0123 = [k0 k1 k2 k3 | k0 k1 k2 k3] halves, s4567 likewise for k4..k7
  __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif

inline float to_float(const void* base, int64_t i, bool bf16) {
  if (bf16) return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

// Keys or values of positions j0..j0+n-1 of one key head as n rows of D floats: in place where they are float32
// rows D apart within one block (always in a static cache), else copied into dst.
const float* gather(const Problem& p, const void* src, const int64_t* table, int64_t hk, int64_t j0, int64_t n,
                    float* dst) {
  const int64_t D = p.D;
  if (!p.bf16 && p.row_stride == D && j0 / p.block_size == (j0 + n - 1) / p.block_size) {
    const int64_t row = table[j0 / p.block_size] * p.block_size + j0 % p.block_size;
    return static_cast<const float*>(src) + row * p.row_stride + hk * p.head_stride;
  }
  for (int64_t j = 0; j < n; ++j) {
    int64_t pos = j0 + j;
    int64_t row = table[pos / p.block_size] * p.block_size + pos % p.block_size;
    int64_t at = row * p.row_stride + hk * p.head_stride;
    float* out = dst + j * D;
    if (!p.bf16) {
      std::memcpy(out, static_cast<const float*>(src) + at, D * sizeof(float));
      continue;
    }
    const uint16_t* in = static_cast<const uint16_t*>(src) + at;
    int64_t d = 0;
#ifdef DK_AVX2
    for (; d + 8 <= D; d += 8) {
      __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + d)));
      _mm256_storeu_ps(out + d, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
#endif
    for (; d < D; ++d) out[d] = to_float(src, at + d, true);
  }
  return dst;
}

// One query vector's update over n keys (n <= kGroup) at positions j0..: scores, online softmax, weighted values.
void update(const Problem& p, const float* qv, float slope, int64_t qpos, const bool* mask, const float* keys,
            const float* vals, int64_t j0, int64_t n, float& m, float& l, float* acc) {
  const int64_t D = p.D;
  float s[kGroup];
  int64_t valid = std::min(n, qpos - j0 + 1);  // causal: keys past the query's position are skipped
  if (valid <= 0) return;
  int64_t j = 0;
#ifdef DK_AVX2
  if (D % 8 == 0) {
    for (; j + 8 <= valid; j += 8) _mm256_storeu_ps(s + j, dot8(qv, keys + j * D, D));
  }
#endif
  for (; j < valid; ++j) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += qv[d] * keys[j * D + d];
    s[j] = dot;
  }
  float top = m;
  for (j = 0; j < valid; ++j) {
    s[j] = s[j] * p.scale + (p.slopes ? slope * static_cast<float>(j0 + j - qpos) : 0.f);
    if (mask && !mask[j0 + j]) s[j] = -std::numeric_limits<float>::infinity();
    top = std::max(top, s[j]);
  }
  if (top == -std::numeric_limits<float>::infinity()) return;  // every key so far masked: nothing to add
  float correction = std::exp(m - top);  // 0 on the first keys, where m is -inf
  float sum = 0.f;
  j = 0;
#ifdef DK_AVX2
  __m256 vtop = _mm256_set1_ps(top);
  for (; j + 8 <= valid; j += 8) {
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), vtop));
    _mm256_storeu_ps(s + j, e);
    sum += hsum(e);
  }
#endif
  for (; j < valid; ++j) {
    s[j] = std::exp(s[j] - top);
    sum += s[j];
  }
  l = l * correction + sum;
  m = top;
  int64_t d = 0;
#ifdef DK_AVX2
  __m256 vc = _mm256_set1_ps(correction);
  for (; d + 8 <= D; d += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + d), vc);
    for (j = 0; j < valid; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(vals + j * D + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
#endif
  for (; d < D; ++d) {
    float a = acc[d] * correction;
    for (j = 0; j < valid; ++j) a += s[j] * vals[j * D + d];
    acc[d] = a;
  }
}

void run_unit(const Problem& p, int64_t seq, int64_t hk, int64_t r0, int64_t r1, std::vector<float>& scratch) {
  const int64_t D = p.D, rep = p.H / p.H_kv;
  const int64_t first_row = p.row_starts[seq], rows = r1 - r0, M = rows * rep;
  const int64_t start = p.positions[seq] + (r0 - first_row);
  const int64_t last = p.positions[seq] + (r1 - 1 - first_row);  // the tile's latest query position
  const int64_t* table = p.tables + seq * p.table_width;
  const bool* mask = p.key_mask ? p.key_mask + seq * p.mask_width : nullptr;
  scratch.resize(2 * kGroup * D + M * D + 2 * M);
  float* key_buf = scratch.data();
  float* val_buf = key_buf + kGroup * D;
  float* acc = val_buf + kGroup * D;
  float* m = acc + M * D;
  float* l = m + M;
  std::fill(acc, acc + M * D, 0.f);
  std::fill(m, m + M, -std::numeric_limits<float>::infinity());
  std::fill(l, l + M, 0.f);
  for (int64_t j0 = 0; j0 <= last; j0 += kGroup) {
    int64_t n = std::min(kGroup, last + 1 - j0);
    const float* keys = gather(p, p.k, table, hk, j0, n, key_buf);
    const float* vals = gather(p, p.v, table, hk, j0, n, val_buf);
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t row = r0 + t, qpos = start + t;
      if (qpos < j0) continue;
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t h = hk * rep + r, u = t * rep + r;
        update(p, p.q + (row * p.H + h) * D, p.slopes ? p.slopes[h] : 0.f, qpos, mask, keys, vals, j0, n, m[u],
               l[u], acc + u * D);
      }
    }
  }
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t r = 0; r < rep; ++r) {
      const int64_t u = t * rep + r;
      float* out = p.out + ((r0 + t) * p.H + hk * rep + r) * D;
      const float inv = l[u] > 0.f ? 1.f / l[u] : 0.f;  // a row that may see no key gets zeros
      for (int64_t d = 0; d < D; ++d) out[d] = acc[u * D + d] * inv;
    }
  }
}

#ifdef DK_AVX2
// The tiled path (`prefill_attention`): a unit's query vectors (its rows times the query heads of its key head, each
// with its own position) meet blocks of kKeys keys as two small matrix products, register-blocked like a GEMM (tiles
// of 6 x 16 in 12 accumulators): scores S^T (keys x queries) = K Q^T, the queries transposed and scaled once per unit
// so that no key block is ever transposed, then O (queries x D) = O * correction + P V. The online softmax runs
// across 8 queries per vector. Each query's result depends only on its own keys, not on which rows share its unit:
// key blocks start at multiples of kKeys, every sum runs in the same order whatever the tile, and a key past a
// query's position adds an exact zero (a group of queries all before a block skips it, to the same bits).
// AVX2 only (8 lanes), so that the machines with AVX-512 run exactly the code tested on those without.
constexpr int64_t kKeys = 64;      // keys per block
constexpr int64_t kQueries = 64;   // query vectors per group (one row of the score block)

// st[r][16c'..] = sum_d keys[r][d] * qt[d][16c'..] for R keys (rows D apart) and 16 queries (qt: D rows of `stride`).
template <int R>
inline void scores_tile(const float* keys, const float* qt, int64_t stride, int64_t D, float* st) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 q0 = _mm256_loadu_ps(qt + d * stride), q1 = _mm256_loadu_ps(qt + d * stride + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(keys + r * D + d);
      acc[r][0] = _mm256_fmadd_ps(b, q0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, q1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(st + r * kQueries, acc[r][0]);
    _mm256_storeu_ps(st + r * kQueries + 8, acc[r][1]);
  }
}

// Scores of n keys against `queries` queries (rounded up to 16: qt's padding columns are zeros).
void scores_block(const float* keys, const float* qt, int64_t stride, int64_t D, int64_t n, int64_t queries,
                  float* st) {
  for (int64_t c = 0; c < queries; c += 16) {
    int64_t j = 0;
    for (; j + 6 <= n; j += 6) scores_tile<6>(keys + j * D, qt + c, stride, D, st + j * kQueries + c);
    switch (n - j) {
      case 5: scores_tile<5>(keys + j * D, qt + c, stride, D, st + j * kQueries + c); break;
      case 4: scores_tile<4>(keys + j * D, qt + c, stride, D, st + j * kQueries + c); break;
      case 3: scores_tile<3>(keys + j * D, qt + c, stride, D, st + j * kQueries + c); break;
      case 2: scores_tile<2>(keys + j * D, qt + c, stride, D, st + j * kQueries + c); break;
      case 1: scores_tile<1>(keys + j * D, qt + c, stride, D, st + j * kQueries + c); break;
      default: break;
    }
  }
}

// o[r][8c..] = o[r][8c..] * corr[r] + sum_{j < n} pt[j][r] * vals[j][8c..] for R queries (pt: n rows of kQueries
// probabilities; o: rows D apart) and C vectors of the value dimension.
template <int R, int C>
inline void values_tile(const float* pt, const float* vals, int64_t n, int64_t D, const float* corr, float* o) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) {
    const __m256 f = _mm256_broadcast_ss(corr + r);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_mul_ps(_mm256_loadu_ps(o + r * D + 8 * c), f);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m256 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm256_loadu_ps(vals + j * D + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(pt + j * kQueries + r);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(b, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + r * D + 8 * c, acc[r][c]);
}

template <int R>
void values_rows(const float* pt, const float* vals, int64_t n, int64_t D, const float* corr, float* o) {
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) values_tile<R, 2>(pt, vals + d0, n, D, corr, o + d0);
  if (d0 < D) values_tile<R, 1>(pt, vals + d0, n, D, corr, o + d0);  // D % 16 == 8
}

void values_block(const float* pt, const float* vals, int64_t n, int64_t D, int64_t queries, const float* corr,
                  float* o) {
  int64_t r = 0;
  for (; r + 6 <= queries; r += 6) values_rows<6>(pt + r, vals, n, D, corr + r, o + r * D);
  switch (queries - r) {
    case 5: values_rows<5>(pt + r, vals, n, D, corr + r, o + r * D); break;
    case 4: values_rows<4>(pt + r, vals, n, D, corr + r, o + r * D); break;
    case 3: values_rows<3>(pt + r, vals, n, D, corr + r, o + r * D); break;
    case 2: values_rows<2>(pt + r, vals, n, D, corr + r, o + r * D); break;
    case 1: values_rows<1>(pt + r, vals, n, D, corr + r, o + r * D); break;
    default: break;
  }
}

void run_unit_tiled(const Problem& p, int64_t seq, int64_t hk, int64_t r0, int64_t r1, std::vector<float>& scratch) {
  const int64_t D = p.D, rep = p.H / p.H_kv;
  const int64_t first_row = p.row_starts[seq], rows = r1 - r0, M = rows * rep;
  const int64_t Mpad = (M + 15) / 16 * 16;
  const int64_t start = p.positions[seq] + (r0 - first_row);
  const int64_t last = start + rows - 1;
  const int64_t* table = p.tables + seq * p.table_width;
  const bool* mask = p.key_mask ? p.key_mask + seq * p.mask_width : nullptr;
  // key and value blocks, scores (then probabilities), the transposed queries (D rows of Mpad), accumulators, and
  // per query: running max, running sum, correction, slope
  scratch.resize(2 * kKeys * D + kKeys * kQueries + D * Mpad + M * D + 4 * Mpad);
  float* key_buf = scratch.data();
  float* val_buf = key_buf + kKeys * D;
  float* st = val_buf + kKeys * D;
  float* qt = st + kKeys * kQueries;
  float* acc = qt + D * Mpad;
  float* m = acc + M * D;
  float* l = m + Mpad;
  float* corr = l + Mpad;
  float* slope = corr + Mpad;
  std::fill(acc, acc + M * D, 0.f);
  std::fill(m, m + Mpad, -std::numeric_limits<float>::infinity());
  std::fill(l, l + Mpad, 0.f);
  std::fill(qt, qt + D * Mpad, 0.f);
  std::fill(slope, slope + Mpad, 0.f);
  // Query vector u is row u / rep, head hk * rep + u % rep; padding lanes (u >= M) sit at the last position.
  std::vector<int32_t> pos(Mpad, static_cast<int32_t>(last));
  for (int64_t u = 0; u < M; ++u) {
    const int64_t h = hk * rep + u % rep;
    const float* qv = p.q + ((r0 + u / rep) * p.H + h) * D;
    for (int64_t d = 0; d < D; ++d) qt[d * Mpad + u] = qv[d] * p.scale;
    pos[u] = static_cast<int32_t>(start + u / rep);
    if (p.slopes) slope[u] = p.slopes[h];
  }
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 <= last; j0 += kKeys) {
    const int64_t n = std::min(kKeys, last + 1 - j0);
    const float* keys = gather(p, p.k, table, hk, j0, n, key_buf);
    const float* vals = gather(p, p.v, table, hk, j0, n, val_buf);
    for (int64_t g0 = 0; g0 < M; g0 += kQueries) {
      const int64_t queries = std::min(kQueries, M - g0);
      if (pos[g0 + queries - 1] < j0) continue;  // every query of the group precedes these keys
      scores_block(keys, qt + g0, Mpad, D, n, queries, st);
      for (int64_t c = 0; c < queries; c += 8) {
        const int64_t u = g0 + c;
        const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos.data() + u));
        const __m256 sv = _mm256_loadu_ps(slope + u), pf = _mm256_cvtepi32_ps(pv);
        __m256 top = _mm256_loadu_ps(m + u);
        for (int64_t j = 0; j < n; ++j) {
          float* row = st + j * kQueries + c;
          __m256 x = _mm256_loadu_ps(row);
          if (p.slopes) x = _mm256_fmadd_ps(sv, _mm256_sub_ps(_mm256_set1_ps(static_cast<float>(j0 + j)), pf), x);
          // causal: keys past a query's position
          const __m256 later = _mm256_castsi256_ps(
              _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(j0 + j)), pv));
          x = _mm256_blendv_ps(x, minus_inf, later);
          if (mask && !mask[j0 + j]) x = minus_inf;
          _mm256_storeu_ps(row, x);
          top = _mm256_max_ps(top, x);
        }
        // A query with no key so far keeps -inf; its base 0 then gives probabilities and correction 0
        const __m256 base = _mm256_blendv_ps(top, _mm256_setzero_ps(), _mm256_cmp_ps(top, minus_inf, _CMP_EQ_OQ));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          float* row = st + j * kQueries + c;
          const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row), base));
          _mm256_storeu_ps(row, e);
          sum = _mm256_add_ps(sum, e);
        }
        const __m256 f = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(m + u), base));
        _mm256_storeu_ps(l + u, _mm256_fmadd_ps(_mm256_loadu_ps(l + u), f, sum));
        _mm256_storeu_ps(m + u, top);
        _mm256_storeu_ps(corr + u, f);
      }
      values_block(st, vals, n, D, queries, corr + g0, acc + g0 * D);
    }
  }
  for (int64_t u = 0; u < M; ++u) {
    float* out = p.out + ((r0 + u / rep) * p.H + hk * rep + u % rep) * D;
    const float inv = l[u] > 0.f ? 1.f / l[u] : 0.f;  // a row that may see no key gets zeros
    for (int64_t d = 0; d < D; ++d) out[d] = acc[u * D + d] * inv;
  }
}
#endif

// Whether `prefill_attention` takes the tiled path for heads of D values (else the per-vector one).
bool tiled(int64_t D) {
#ifdef DK_AVX2
  return D % 8 == 0;
#else
  (void)D;
  return false;
#endif
}

void run(const Problem& p, int64_t S, bool tiled_path = false);

at::Tensor paged(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                 const at::Tensor& row_starts, const at::Tensor& positions, const std::optional<at::Tensor>& slopes,
                 double scale, int64_t block_size, bool tiled_path) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous (N, H, D) float32");
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type(),
              "k and v must be contiguous (rows, H_kv, D) of one dtype");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16, "k and v must be float32 or bfloat16");
  TORCH_CHECK(k.size(2) == q.size(2) && q.size(1) % k.size(1) == 0, "head sizes of q and k do not match");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong && tables.is_contiguous(), "tables: (S, B) int64");
  TORCH_CHECK(row_starts.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  row_starts.numel() == tables.size(0) + 1 && positions.numel() == tables.size(0),
              "row_starts (S + 1) and positions (S) must be int64");
  at::Tensor slope_tensor;
  if (slopes.has_value()) {
    slope_tensor = slopes->contiguous();
    TORCH_CHECK(slope_tensor.scalar_type() == at::kFloat && slope_tensor.numel() == q.size(1), "slopes: (H) float32");
  }
  at::Tensor rs = row_starts.contiguous(), ps = positions.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  Problem p{q.data_ptr<float>(), k.data_ptr(), v.data_ptr(), k.scalar_type() == at::kBFloat16,
            tables.data_ptr<int64_t>(), tables.size(1), rs.data_ptr<int64_t>(), ps.data_ptr<int64_t>(),
            slopes.has_value() ? slope_tensor.data_ptr<float>() : nullptr, q.size(1), k.size(1), q.size(2),
            block_size, static_cast<float>(scale), out.data_ptr<float>(), k.size(1) * k.size(2), k.size(2)};
  run(p, tables.size(0), tiled_path && tiled(q.size(2)));
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                           const at::Tensor& row_starts, const at::Tensor& positions,
                           const std::optional<at::Tensor>& slopes, double scale, int64_t block_size) {
  return paged(q, k, v, tables, row_starts, positions, slopes, scale, block_size, false);
}

// paged_attention's values through the tiled path where this build has it (AVX2, D a multiple of 8), for
// sequences of many query rows (prefill chunks): the same attention, rounded differently from the per-vector path.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                             const at::Tensor& row_starts, const at::Tensor& positions,
                             const std::optional<at::Tensor>& slopes, double scale, int64_t block_size) {
  return paged(q, k, v, tables, row_starts, positions, slopes, scale, block_size, true);
}

// The static cache as a pool: sequence b is one block of S rows starting at row b * H_kv * S, rows D apart and key
// heads S * D apart, so that row b * H_kv * S + j of head hk is element ((b * H_kv + hk) * S + j) * D.
at::Tensor static_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cache_position, const std::optional<at::Tensor>& key_mask,
                            const std::optional<at::Tensor>& slopes, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be contiguous (B, T, H, D) float32");
  TORCH_CHECK(k.dim() == 4 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type() && k.size(0) == q.size(0),
              "k and v must be contiguous (B, H_kv, S, D) of one dtype, B as in q");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16, "k and v must be float32 or bfloat16");
  TORCH_CHECK(k.size(3) == q.size(3) && q.size(2) % k.size(1) == 0, "head sizes of q and k do not match");
  const int64_t B = q.size(0), T = q.size(1), H_kv = k.size(1), S = k.size(2), D = k.size(3);
  TORCH_CHECK(T > 0, "q has no query rows (T = 0)");
  TORCH_CHECK(cache_position.scalar_type() == at::kLong && cache_position.numel() == T,
              "cache_position must hold the T query rows' int64 slots");
  // Read in place: three tensor ops a call (reshape, select, item) would be paid in every layer of every step
  const int64_t first = cache_position.contiguous().data_ptr<int64_t>()[0];
  TORCH_CHECK(first >= 0 && first + T <= S, "query slots ", first, "..", first + T - 1, " are outside the cache's ", S);
  at::Tensor mask;
  if (key_mask.has_value()) {
    mask = key_mask->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S,
                "key_mask must be (B, S) bool");
  }
  at::Tensor slope_tensor;
  if (slopes.has_value()) {
    slope_tensor = slopes->contiguous();
    TORCH_CHECK(slope_tensor.scalar_type() == at::kFloat && slope_tensor.numel() == q.size(2), "slopes: (H) float32");
  }
  std::vector<int64_t> tables(B), row_starts(B + 1), positions(B, first);
  for (int64_t b = 0; b <= B; ++b) {
    if (b < B) tables[b] = b * H_kv;
    row_starts[b] = b * T;
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  Problem p{q.data_ptr<float>(), k.data_ptr(), v.data_ptr(), k.scalar_type() == at::kBFloat16,
            tables.data(), 1, row_starts.data(), positions.data(),
            slopes.has_value() ? slope_tensor.data_ptr<float>() : nullptr, q.size(2), H_kv, D, S,
            static_cast<float>(scale), out.data_ptr<float>(), D, S * D,
            key_mask.has_value() ? mask.data_ptr<bool>() : nullptr, S};
  run(p, B);
  return out;
}

void run(const Problem& p, int64_t S, bool tiled_path) {
  struct Unit {
    int64_t seq, hk, r0, r1;
  };
  const int64_t tile = tiled_path ? kTiledRows : kTile;
  std::vector<Unit> units;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t r0 = p.row_starts[s]; r0 < p.row_starts[s + 1]; r0 += tile) {
      for (int64_t hk = 0; hk < p.H_kv; ++hk) units.push_back({s, hk, r0, std::min(r0 + tile, p.row_starts[s + 1])});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> scratch;
    for (int64_t u = u0; u < u1; ++u) {
#ifdef DK_AVX2
      if (tiled_path) {
        run_unit_tiled(p, units[u].seq, units[u].hk, units[u].r0, units[u].r1, scratch);
        continue;
      }
#endif
      run_unit(p, units[u].seq, units[u].hk, units[u].r0, units[u].r1, scratch);
    }
  });
}

}  // namespace

TORCH_LIBRARY(decoderkit_paged, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor tables, Tensor row_starts, Tensor positions, "
        "Tensor? slopes, float scale, int block_size) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor tables, Tensor row_starts, Tensor positions, "
        "Tensor? slopes, float scale, int block_size) -> Tensor");
  m.def("static_attention(Tensor q, Tensor k, Tensor v, Tensor cache_position, Tensor? key_mask, Tensor? slopes, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(decoderkit_paged, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("static_attention", &static_attention);
}

// 1 where prefill_attention takes the tiled path for heads of D values, 0 where it runs the per-vector path
extern "C" int decoderkit_prefill_tiled(int64_t D) { return tiled(D) ? 1 : 0; }
