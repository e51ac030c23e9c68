// Dense linear layer for decode-sized batches: y = x W^T (+ b), W (N, K) float32 or bfloat16, x (M, K) in the
// model's dtype (float32 or bfloat16), every product and sum float32.
//
// At batch 1 a linear layer is a matrix-vector product bound by the bytes of W it reads. MKL's sgemv takes a generic
// path on AMD CPUs (about 14 GB/s from L3 on the 2-core EPYC this project runs on); this kernel streams four rows of
// W at a time against the whole of x held in float32, and reads bfloat16 weights as they are (half the bytes), which
// is what makes the shipped 2.6M-parameter model's decode step cheap. Output rows are shared among torch's intra-op
// threads (at::parallel_for) once there are enough of them to pay for waking a thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DK_AVX2 1
#endif

namespace {

template <typename W>
inline float weight_at(const W* w, int64_t i) {
  if constexpr (std::is_same_v<W, float>) {
    return w[i];
  } else {
    uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(w)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
}

#ifdef DK_AVX2
template <typename W>
inline __m256 load8(const W* w) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm256_loadu_ps(w);
  } else {
    // bfloat16 is the top half of a float32: widen and shift
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  }
}

inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

// Rows [n0, n1) of y for one row of x (float32, length K)
template <typename W>
void rows(const float* x, const W* w, int64_t K, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
#ifdef DK_AVX2
  const int64_t K8 = K - K % 8;
  for (; n + 4 <= n1; n += 4) {
    const W* w0 = w + n * K;
    const W* w1 = w0 + K;
    const W* w2 = w1 + K;
    const W* w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(load8(w0 + k), xv, a0);
      a1 = _mm256_fmadd_ps(load8(w1 + k), xv, a1);
      a2 = _mm256_fmadd_ps(load8(w2 + k), xv, a2);
      a3 = _mm256_fmadd_ps(load8(w3 + k), xv, a3);
    }
    float out[4];
    _mm_storeu_ps(out, hsum4(a0, a1, a2, a3));
    for (int64_t k = K8; k < K; ++k) {
      out[0] += weight_at(w0, k) * x[k];
      out[1] += weight_at(w1, k) * x[k];
      out[2] += weight_at(w2, k) * x[k];
      out[3] += weight_at(w3, k) * x[k];
    }
    std::memcpy(y + n, out, sizeof out);
  }
#endif
  for (; n < n1; ++n) {
    const W* wn = w + n * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += weight_at(wn, k) * x[k];
    y[n] = acc;
  }
}

template <typename W>
void gemv(const float* x, const W* w, const float* bias, int64_t M, int64_t K, int64_t N, float* y) {
  // Enough output rows per thread that a thread reads at least ~256 KB of weights
  const int64_t grain = std::max<int64_t>(64, (int64_t{1} << 18) / std::max<int64_t>(1, K * int64_t(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * N;
      rows(x + m * K, w, K, n0, n1, ym);
      if (bias != nullptr) {
        for (int64_t n = n0; n < n1; ++n) ym[n] += bias[n];
      }
    }
  });
}

// float32 copy of a bfloat16 or float32 tensor's values (contiguous), or the tensor's own memory when float32
const float* as_float(const at::Tensor& t, std::vector<float>& buffer) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  const auto* bits = reinterpret_cast<const uint16_t*>(t.data_ptr<c10::BFloat16>());
  buffer.resize(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(&buffer[i], &wide, sizeof(float));
  }
  return buffer.data();
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), "decode linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "decode linear: weight must be a contiguous (N, K) matrix");
  const auto wt = weight.scalar_type();
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "decode linear: weight must be float32 or bfloat16, got ", wt);
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "decode linear: x must be float32 or bfloat16, got ", xt);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x_in.size(-1) == K, "decode linear: x has ", x_in.size(-1), " features, weight expects ", K);
  const int64_t M = K == 0 ? 0 : x_in.numel() / K;
  // bfloat16 activations are widened here and the result rounded once at the end (round to nearest even, as
  // Tensor.to does): no extra tensors or operator calls around the kernel
  const at::Tensor x = x_in.contiguous();
  std::vector<float> x_buffer, bias_buffer, y_buffer;
  const float* xf = as_float(x, x_buffer);
  const float* b = nullptr;
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->numel() == N, "decode linear: bias has ", bias_in->numel(), " entries, expected ", N);
    TORCH_CHECK(bias_in->scalar_type() == at::kFloat || bias_in->scalar_type() == at::kBFloat16,
                "decode linear: bias must be float32 or bfloat16");
    bias = bias_in->contiguous();
    b = as_float(bias, bias_buffer);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0 || N == 0) return y;
  float* yf = y.scalar_type() == at::kFloat ? y.data_ptr<float>() : (y_buffer.resize(M * N), y_buffer.data());
  if (wt == at::kFloat) {
    gemv(xf, weight.data_ptr<float>(), b, M, K, N, yf);
  } else {
    gemv(xf, weight.data_ptr<c10::BFloat16>(), b, M, K, N, yf);
  }
  if (y.scalar_type() == at::kBFloat16) {
    c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) out[i] = c10::BFloat16(yf[i]);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(decoderkit_decode, m) { m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(decoderkit_decode, CPU, m) { m.impl("linear", &linear); }
