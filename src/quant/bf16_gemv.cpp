#include "omnilite/quant/bf16_gemv.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace omnilite::quant {
namespace {

float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Portable version: one output row.
float row_scalar(const uint16_t* w, const float* x, int64_t in) {
  float a = 0.f;
  for (int64_t i = 0; i < in; ++i) a += bf16_to_float(w[i]) * x[i];
  return a;
}

#if defined(__x86_64__)
// 8 bf16 -> 8 float32 (a bf16 is the top half of a float32)
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

__attribute__((target("avx2,fma"))) float row_avx2(const uint16_t* w, const float* x, int64_t in) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i + 2048), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  alignas(32) float v[8];
  _mm256_store_ps(v, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  for (; i < in; ++i) s += bf16_to_float(w[i]) * x[i];
  return s;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// 16 bf16 -> 16 float32
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

__attribute__((target("avx512f"))) float row_avx512(const uint16_t* w, const float* x, int64_t in) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i + 2048), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + i + 2080), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(load16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(load16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < in; ++i) s += bf16_to_float(w[i]) * x[i];
  return s;
}
#pragma GCC diagnostic pop
#endif

}  // namespace

// x [in], w [out, in] bf16 -> [out] bf16
torch::Tensor bf16_matvec_cpu(const torch::Tensor& x, const torch::Tensor& w, int simd) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.device().is_cpu() &&
                  x.numel() == w.size(1) && x.device().is_cpu(),
              "bf16_matvec_cpu: expected x [in] and a contiguous CPU bf16 w [out, in], got x ", x.sizes(), ", w ",
              w.sizes(), " ", w.scalar_type());
  const int64_t out = w.size(0), in = w.size(1);
  // x as bf16 (the layer's input type), widened once to float32
  const auto xf = x.reshape({-1}).to(torch::kBFloat16).to(torch::kFloat32).contiguous();
  auto y = torch::empty({out}, torch::kFloat32);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__x86_64__)
  const bool avx512 = simd >= 2 && __builtin_cpu_supports("avx512f");
  const bool avx2 = simd >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  const bool avx512 = false, avx2 = false;
  (void)simd;
#endif
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const uint16_t* row = wp + o * in;
#if defined(__x86_64__)
      if (avx512) {
        yp[o] = row_avx512(row, xp, in);
        continue;
      }
      if (avx2) {
        yp[o] = row_avx2(row, xp, in);
        continue;
      }
#endif
      yp[o] = row_scalar(row, xp, in);
    }
  });
  return y.to(torch::kBFloat16);
}

}  // namespace omnilite::quant
