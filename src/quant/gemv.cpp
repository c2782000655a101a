#include "omnilite/quant/gemv.h"

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

float to_float(uint16_t v) { return bf16_to_float(v); }
float to_float(float v) { return v; }

// Portable version: one output row of bf16 (uint16_t) or float weights.
template <typename W>
float row_scalar(const W* w, const float* x, int64_t in) {
  float a = 0.f;
  for (int64_t i = 0; i < in; ++i) a += to_float(w[i]) * x[i];
  return a;
}

#if defined(__x86_64__)
// 8 bf16 -> 8 float32 (a bf16 is the top half of a float32)
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// The prefetch runs 4 KiB ahead in the row.
template <typename W>
__attribute__((target("avx2,fma"))) float row_avx2(const W* w, const float* x, int64_t in) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i) + 4096, _MM_HINT_T0);
    if (sizeof(W) == 4) _mm_prefetch(reinterpret_cast<const char*>(w + i) + 4096 + 64, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  alignas(32) float v[8];
  _mm256_store_ps(v, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  for (; i < in; ++i) s += to_float(w[i]) * x[i];
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
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

template <typename W>
__attribute__((target("avx512f"))) float row_avx512(const W* w, const float* x, int64_t in) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) {
    for (size_t k = 0; k < sizeof(W) * 64; k += 64)  // the 2 or 4 cache lines of 64 weights, 4 KiB ahead
      _mm_prefetch(reinterpret_cast<const char*>(w + i) + 4096 + k, _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(load16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(load16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < in; ++i) s += to_float(w[i]) * x[i];
  return s;
}
#pragma GCC diagnostic pop
#endif

// Rows [o0, o1) of y = W x on the calling thread: w [out, in] (uint16_t bf16 bits or float), x [in].
template <typename W>
void rows_on_thread(const W* w, const float* x, int64_t in, int64_t o0, int64_t o1, float* y, int simd) {
#if defined(__x86_64__)
  const bool avx512 = simd >= 2 && __builtin_cpu_supports("avx512f");
  const bool avx2 = simd >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  const bool avx512 = false, avx2 = false;
  (void)simd;
#endif
  for (int64_t o = o0; o < o1; ++o) {
    const W* row = w + o * in;
#if defined(__x86_64__)
    if (avx512) {
      y[o] = row_avx512(row, x, in);
      continue;
    }
    if (avx2) {
      y[o] = row_avx2(row, x, in);
      continue;
    }
#endif
    y[o] = row_scalar(row, x, in);
  }
}

// w: [out, in], x: [in] -> y: [out], rows split across intra-op threads
template <typename W>
void matvec_rows(const W* w, const float* x, int64_t out, int64_t in, float* y, int simd) {
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) { rows_on_thread(w, x, in, o0, o1, y, simd); });
}

}  // namespace

// x [in], w [out, in] bf16 -> [out] bf16
torch::Tensor bf16_matvec_cpu(const torch::Tensor& x, const torch::Tensor& w, int simd) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.device().is_cpu() &&
                  x.numel() == w.size(1) && x.device().is_cpu(),
              "bf16_matvec_cpu: expected x [in] and a contiguous CPU bf16 w [out, in], got x ", x.sizes(), ", w ",
              w.sizes(), " ", w.scalar_type());
  // x as bf16 (the layer's input type), widened once to float32
  const auto xf = x.reshape({-1}).to(torch::kBFloat16).to(torch::kFloat32).contiguous();
  auto y = torch::empty({w.size(0)}, torch::kFloat32);
  matvec_rows(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xf.data_ptr<float>(), w.size(0),
              w.size(1), y.data_ptr<float>(), simd);
  return y.to(torch::kBFloat16);
}

// x [in] float32, w [out, in] float32 or bf16 -> [out] float32
torch::Tensor float_matvec_cpu(const torch::Tensor& x, const torch::Tensor& w, int simd) {
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(w.dim() == 2 && (bf16 || w.scalar_type() == torch::kFloat32) && w.is_contiguous() &&
                  w.device().is_cpu() && x.numel() == w.size(1) && x.scalar_type() == torch::kFloat32 &&
                  x.device().is_cpu(),
              "float_matvec_cpu: expected float32 x [in] and a contiguous CPU float32 or bf16 w [out, in], got x ",
              x.sizes(), " ", x.scalar_type(), ", w ", w.sizes(), " ", w.scalar_type());
  const auto xf = x.reshape({-1}).contiguous();
  auto y = torch::empty({w.size(0)}, torch::kFloat32);
  if (bf16)
    matvec_rows(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xf.data_ptr<float>(), w.size(0),
                w.size(1), y.data_ptr<float>(), simd);
  else
    matvec_rows(w.data_ptr<float>(), xf.data_ptr<float>(), w.size(0), w.size(1), y.data_ptr<float>(), simd);
  return y;
}

void matvec_rows_cpu(const float* w, const float* x, int64_t in, int64_t o0, int64_t o1, float* y, int simd) {
  rows_on_thread(w, x, in, o0, o1, y, simd);
}
void matvec_rows_cpu(const uint16_t* w, const float* x, int64_t in, int64_t o0, int64_t o1, float* y, int simd) {
  rows_on_thread(w, x, in, o0, o1, y, simd);
}

}  // namespace omnilite::quant
