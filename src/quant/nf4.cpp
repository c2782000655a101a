#include "omnilite/quant/nf4.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

namespace omnilite::quant {

const std::array<float, 16>& nf4_code_values() {
  static const std::array<float, 16> v = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
      0.7229568362236023f, 1.0f};
  return v;
}

const std::array<float, 256>& dynamic_map_values() {
  // bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) as PyTorch evaluates it in
  // float32: for each exponent i in 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) (PyTorch's CPU linspace:
  // start + step * k for the lower half, end - step * (n - 1 - k) for the upper, each rounded once, as a fused
  // multiply-add) scaled by +-10^(i - 6); then 0 and 1, sorted.
  static const std::array<float, 256> map = [] {
    std::vector<float> data;
    for (int i = 0; i < 7; ++i) {
      const int n = (1 << i) + 1;
      const float start = 0.1f, end = 1.0f, step = (end - start) / static_cast<float>(n - 1);
      std::vector<float> b(static_cast<size_t>(n));
      for (int k = 0; k < n; ++k)
        b[static_cast<size_t>(k)] = k < n / 2 ? std::fma(step, static_cast<float>(k), start)
                                              : std::fma(-step, static_cast<float>(n - 1 - k), end);
      const auto scale = static_cast<float>(std::pow(10.0, i - 6));
      for (int k = 0; k + 1 < n; ++k) {
        const float mean = (b[static_cast<size_t>(k)] + b[static_cast<size_t>(k) + 1]) / 2.0f;
        data.push_back(scale * mean);
        data.push_back(-scale * mean);
      }
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    std::sort(data.begin(), data.end());
    std::array<float, 256> out{};
    std::copy(data.begin(), data.end(), out.begin());
    return out;
  }();
  return map;
}

Nf4Activations parse_nf4_activations(const std::string& name) {
  if (name == "fp32") return Nf4Activations::Float32;
  if (name == "int16") return Nf4Activations::Int16;
  throw std::invalid_argument("NF4 activations \"" + name + "\": must be \"fp32\" (exact, the default) or \"int16\" "
                              "(x rounded to 16 bits per 64-block; faster decoding)");
}

namespace {

constexpr int kDynamicLutSize = 65536;

// bitsandbytes' CPU quantize_blockwise looks each normalised value up in 65536 bins over [-1, 1]: bin i (value
// -1 + 2i / 65535) holds the first map index whose upper midpoint is not below it.
const std::array<uint8_t, kDynamicLutSize>& dynamic_map_lut() {
  static const std::array<uint8_t, kDynamicLutSize> lut = [] {
    const auto& map = dynamic_map_values();
    std::array<float, 255> mid{};
    for (size_t i = 0; i < mid.size(); ++i) mid[i] = 0.5f * (map[i] + map[i + 1]);
    std::array<uint8_t, kDynamicLutSize> t{};
    size_t code = 0;
    for (int i = 0; i < kDynamicLutSize; ++i) {
      const float val = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kDynamicLutSize - 1);
      while (code < mid.size() && mid[code] < val) ++code;
      t[static_cast<size_t>(i)] = static_cast<uint8_t>(code);
    }
    return t;
  }();
  return lut;
}

}  // namespace

int64_t Nf4Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {

torch::Tensor code_table(const torch::Device& dev) {
  const auto& v = nf4_code_values();
  return torch::tensor(std::vector<float>(v.begin(), v.end()), torch::TensorOptions().device(dev));
}

}  // namespace

// [n] in [-1, 1] -> [n] uint8
torch::Tensor nf4_nearest_codes(const torch::Tensor& x) {
  const auto codes = code_table(x.device());                          // [16] ascending
  auto mid = (codes.narrow(0, 1, 15) + codes.narrow(0, 0, 15)) / 2;   // [15] decision boundaries
  // index = number of boundaries strictly below x: a value exactly on a boundary goes to the lower code
  return torch::searchsorted(mid, x.contiguous(), /*out_int32=*/false, /*right=*/false).to(torch::kUInt8);
}

namespace {

// The CPU path of the block quantisation in one pass per block (a loop instead of ~8 tensor-wide passes: it is what
// loading a base checkpoint spends its time on). Same arithmetic as the tensor path and as bitsandbytes:
// x * (1 / max(absmax, 1e-38)) clamped to [-1, 1], code = number of decision boundaries strictly below it.
// blocks: [nb, 64] fp32 -> (packed [nb * 32] uint8, absmax [nb]).
std::pair<torch::Tensor, torch::Tensor> quantize_blocks_cpu(const torch::Tensor& blocks) {
  const int64_t nb = blocks.size(0);
  auto packed = torch::empty({nb * kNf4BlockSize / 2}, torch::kUInt8);
  auto absmax = torch::empty({nb}, torch::kFloat32);
  const auto& v = nf4_code_values();
  std::array<float, 15> mid{};
  for (size_t k = 0; k < 15; ++k) mid[k] = (v[k + 1] + v[k]) / 2;
  const float* in = blocks.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  at::parallel_for(0, nb, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = in + b * kNf4BlockSize;
      float m = 0;
      for (int64_t j = 0; j < kNf4BlockSize; ++j) m = std::max(m, std::abs(x[j]));
      am[b] = m;
      const float r = 1.0f / std::max(m, 1e-38f);
      uint8_t codes[kNf4BlockSize];
      for (int64_t j = 0; j < kNf4BlockSize; ++j) {
        const float y = std::min(1.0f, std::max(-1.0f, x[j] * r));
        int c = 0;
        for (size_t k = 0; k < 15; ++k) c += y > mid[k];
        codes[j] = static_cast<uint8_t>(c);
      }
      uint8_t* o = out + b * (kNf4BlockSize / 2);
      for (int64_t j = 0; j < kNf4BlockSize / 2; ++j) o[j] = static_cast<uint8_t>(codes[2 * j] << 4 | codes[2 * j + 1]);
    }
  });
  return {packed, absmax};
}

}  // namespace

Nf4Tensor nf4_quantize(const torch::Tensor& w) {
  const int64_t n = w.numel();
  TORCH_CHECK(n % kNf4BlockSize == 0 && n > 0, "nf4_quantize: ", n, " values (shape ", w.sizes(),
              ") is not a multiple of the block size ", kNf4BlockSize);
  torch::NoGradGuard ng;
  auto blocks = w.detach().to(torch::kFloat32).reshape({-1, kNf4BlockSize}).contiguous();  // [nb, 64]
  Nf4Tensor q;
  torch::Tensor absmax;                                                                    // [nb]
  if (blocks.device().is_cpu()) {
    std::tie(q.packed, absmax) = quantize_blocks_cpu(blocks);
  } else {
    absmax = blocks.abs().amax(1);
    auto normalised = (blocks * absmax.clamp_min(1e-38).reciprocal().unsqueeze(1)).clamp(-1, 1);  // [nb, 64]
    auto pairs = nf4_nearest_codes(normalised.reshape(-1)).view({-1, 2});
    q.packed = (pairs.select(1, 0).to(torch::kInt32) * 16 + pairs.select(1, 1).to(torch::kInt32)).to(torch::kUInt8);
  }
  // Double quantisation of absmax (bitsandbytes' quantize_blockwise of absmax - offset, blocks of 256).
  const int64_t nb = absmax.numel(), ns = (nb + kAbsmaxBlockSize - 1) / kAbsmaxBlockSize;
  q.absmax_mean = absmax.mean();
  auto centred = (absmax - q.absmax_mean).cpu().contiguous();  // [nb]
  q.absmax_scale = torch::empty({ns}, torch::kFloat32);
  q.absmax_q = torch::empty({nb}, torch::kUInt8);
  const auto& lut = dynamic_map_lut();
  const float* c = centred.data_ptr<float>();
  float* scale = q.absmax_scale.data_ptr<float>();
  uint8_t* code = q.absmax_q.data_ptr<uint8_t>();
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t b0 = s * kAbsmaxBlockSize, b1 = std::min(nb, b0 + kAbsmaxBlockSize);
    float m = 0;
    for (int64_t b = b0; b < b1; ++b) m = std::max(m, std::abs(c[b]));
    scale[s] = m;
    const float inv = m == 0 ? 0.0f : 1.0f / m;  // bitsandbytes stores code 0 for an all-zero block
    for (int64_t b = b0; b < b1; ++b) {
      if (m == 0) {
        code[b] = 0;
        continue;
      }
      // (v + 1) / 2 * 65535, rounded half up, in float32 step by step as bitsandbytes computes the bin
      const float v = std::min(1.0f, std::max(-1.0f, c[b] * inv));
      float t = v + 1.0f;
      t = t * 0.5f;
      t = t * static_cast<float>(kDynamicLutSize - 1);
      t = t + 0.5f;
      code[b] = lut[static_cast<size_t>(static_cast<uint16_t>(t))];
    }
  }
  const auto dev = w.device();
  q.absmax_q = q.absmax_q.to(dev);
  q.absmax_scale = q.absmax_scale.to(dev);
  q.shape = w.sizes().vec();
  return q;
}

namespace {

torch::Tensor dynamic_map_table(const torch::Device& dev) {
  const auto& v = dynamic_map_values();
  return torch::tensor(std::vector<float>(v.begin(), v.end()), torch::TensorOptions().device(dev));
}

}  // namespace

torch::Tensor nf4_absmax(const Nf4Tensor& q) {
  const int64_t nb = q.absmax_q.numel();
  auto scale = q.absmax_scale.repeat_interleave(kAbsmaxBlockSize).narrow(0, 0, nb);
  return dynamic_map_table(q.absmax_q.device()).index_select(0, q.absmax_q.to(torch::kInt64)) * scale + q.absmax_mean;
}

namespace {

// packed [m] bytes of 2m values with their absmax [2m / 64] -> [2m] float32.
// On CPU a direct loop (one pass over the bytes, 16-entry table, blocks split across intra-op threads); elsewhere
// one gather from a [256, 2] table of code pairs.
torch::Tensor decode(const torch::Tensor& packed, const torch::Tensor& absmax) {
  const int64_t m = packed.numel(), nb = absmax.numel();
  TORCH_CHECK(2 * m == nb * kNf4BlockSize, "nf4 decode: ", m, " bytes do not match ", nb, " absmax blocks");
  if (packed.device().is_cpu()) {
    auto p = packed.contiguous();
    auto a = absmax.to(torch::kFloat32).contiguous();
    auto out = torch::empty({2 * m}, torch::kFloat32);
    const uint8_t* pp = p.data_ptr<uint8_t>();
    const float* ap = a.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float* lut = nf4_code_values().data();
    at::parallel_for(0, nb, 256, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float s = ap[b];
        const uint8_t* in = pp + b * (kNf4BlockSize / 2);
        float* o = op + b * kNf4BlockSize;
        for (int64_t j = 0; j < kNf4BlockSize / 2; ++j) {
          o[2 * j] = lut[in[j] >> 4] * s;
          o[2 * j + 1] = lut[in[j] & 15] * s;
        }
      }
    });
    return out;
  }
  const auto codes = code_table(packed.device());
  auto pairs = torch::stack({codes.repeat_interleave(16), codes.repeat({16})}, 1);  // [256, 2]: (hi, lo) per byte
  auto vals = pairs.index_select(0, packed.to(torch::kInt64)).view({-1, kNf4BlockSize});  // [2m / 64, 64]
  return (vals * absmax.unsqueeze(1)).reshape(-1);
}

}  // namespace

torch::Tensor nf4_dequantize(const Nf4Tensor& q, torch::ScalarType dtype) {
  return decode(q.packed, nf4_absmax(q)).view(q.shape).to(dtype);
}

torch::Tensor nf4_dequantize_rows(const Nf4Tensor& q, int64_t row0, int64_t rows, torch::ScalarType dtype) {
  TORCH_CHECK(q.shape.size() == 2 && q.shape[1] % kNf4BlockSize == 0, "nf4_dequantize_rows: expected a [out, in] "
              "matrix with in a multiple of 64, got ", c10::IntArrayRef(q.shape));
  const int64_t in = q.shape[1], bpr = in / kNf4BlockSize;  // absmax blocks per row
  auto packed = q.packed.narrow(0, row0 * in / 2, rows * in / 2);
  // absmax of the needed blocks only
  const int64_t b0 = row0 * bpr, nb = rows * bpr;
  auto scale_idx = torch::arange(b0, b0 + nb, torch::TensorOptions().dtype(torch::kInt64).device(q.absmax_q.device()))
                       .div(kAbsmaxBlockSize, "floor");
  auto absmax = dynamic_map_table(q.absmax_q.device()).index_select(0, q.absmax_q.narrow(0, b0, nb).to(torch::kInt64)) *
                    q.absmax_scale.index_select(0, scale_idx) +
                q.absmax_mean;
  return decode(packed, absmax).view({rows, in}).to(dtype);
}

namespace {

// The absmax of blocks [b0, b0 + n) from their double quantisation, as nf4_absmax computes them in float32: the map
// value times the block's scale, rounded, plus the mean, rounded (never fused into one FMA, so that the kernels
// scale by the very values dequantisation uses).
__attribute__((optimize("fp-contract=off"))) void row_absmax(const uint8_t* absmax_q, const float* scale, float mean,
                                                            int64_t b0, int64_t n, float* out) {
  const auto& map = dynamic_map_values();
  for (int64_t b = 0; b < n; ++b) {
    const float v = map[absmax_q[b0 + b]] * scale[(b0 + b) / kAbsmaxBlockSize];
    out[b] = v + mean;
  }
}

#if defined(__x86_64__)
// The same with AVX2, 8 blocks at a time (a gather from the 256-entry map; a multiply, then an add: two roundings,
// as above; `map` is dynamic_map_values()). It took 15% of the one-row kernel's time as the scalar loop.
__attribute__((target("avx2"))) void row_absmax_avx2(const uint8_t* absmax_q, const float* scale, float mean,
                                                     int64_t b0, int64_t n, float* out, const float* map) {
  const __m256 m = _mm256_set1_ps(mean);
  int64_t b = 0;
  for (; b + 8 <= n; b += 8) {
    const int64_t first = (b0 + b) / kAbsmaxBlockSize, last = (b0 + b + 7) / kAbsmaxBlockSize;
    if (first != last) break;  // the 8 blocks straddle two scales: the scalar loop finishes the row
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(absmax_q + b0 + b)));
    const __m256 v = _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), _mm256_set1_ps(scale[first]));
    _mm256_storeu_ps(out + b, _mm256_add_ps(v, m));
  }
  if (b < n) row_absmax(absmax_q, scale, mean, b0 + b, n - b, out + b);
}
#endif

// One output row o of y = x W^T over rows [0, N) of x, split into even (xe) and odd (xo) columns: [N, in / 2] each;
// absmax holds the row's in / 64 block scales. Portable version.
void few_rows_scalar(const uint8_t* packed, const float* absmax, const float* xe, const float* xo, int64_t N,
                     int64_t in, int64_t o, float* acc) {
  const float* code = nf4_code_values().data();
  const int64_t half = in / 2, bpr = in / kNf4BlockSize;
  for (int64_t r = 0; r < N; ++r) acc[r] = 0.f;
  for (int64_t b = 0; b < bpr; ++b) {
    const uint8_t* p = packed + o * half + b * (kNf4BlockSize / 2);
    const float s = absmax[b];
    for (int64_t r = 0; r < N; ++r) {
      const float* e = xe + r * half + b * (kNf4BlockSize / 2);
      const float* d = xo + r * half + b * (kNf4BlockSize / 2);
      float a = 0.f;
      for (int64_t j = 0; j < kNf4BlockSize / 2; ++j) a += code[p[j] >> 4] * e[j] + code[p[j] & 15] * d[j];
      acc[r] += s * a;
    }
  }
}

#if defined(__x86_64__)
// table[idx] for 8 indices in [0, 16) with the table in two registers: permute each half, blend on index bit 3.
__attribute__((target("avx2,fma"))) inline __m256 lookup16(__m256 lo8, __m256 hi8, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo8, idx), b = _mm256_permutevar8x32_ps(hi8, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign bit
}

// The same with AVX2: 8 bytes -> 8 high and 8 low code indices (int32 lanes), looked up in the 16-entry table held in
// two registers (permutevar8x32 on each half, blended by index bit 3), multiplied with the even / odd columns of x.
__attribute__((target("avx2,fma"))) void few_rows_avx2(const uint8_t* packed, const float* absmax, const float* xe,
                                                        const float* xo, int64_t N, int64_t in, int64_t o, float* acc) {
  const float* code = nf4_code_values().data();
  const __m256 lo8 = _mm256_loadu_ps(code), hi8 = _mm256_loadu_ps(code + 8);
  const __m256i mask15 = _mm256_set1_epi32(15);
  const int64_t half = in / 2, bpr = in / kNf4BlockSize;
  __m256 total[kNf4FewRows];
  for (int64_t r = 0; r < N; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < bpr; ++b) {
    const uint8_t* p = packed + o * half + b * (kNf4BlockSize / 2);
    __m256 block[kNf4FewRows];
    for (int64_t r = 0; r < N; ++r) block[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < kNf4BlockSize / 2; j += 8) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
      const __m256 vh = lookup16(lo8, hi8, _mm256_srli_epi32(bytes, 4));
      const __m256 vl = lookup16(lo8, hi8, _mm256_and_si256(bytes, mask15));
      const int64_t col = b * (kNf4BlockSize / 2) + j;
      for (int64_t r = 0; r < N; ++r) {
        block[r] = _mm256_fmadd_ps(vh, _mm256_loadu_ps(xe + r * half + col), block[r]);
        block[r] = _mm256_fmadd_ps(vl, _mm256_loadu_ps(xo + r * half + col), block[r]);
      }
    }
    const __m256 s = _mm256_set1_ps(absmax[b]);
    for (int64_t r = 0; r < N; ++r) total[r] = _mm256_fmadd_ps(block[r], s, total[r]);
  }
  for (int64_t r = 0; r < N; ++r) {
    alignas(32) float v[8];
    _mm256_store_ps(v, total[r]);
    acc[r] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
}

// The 16 codes as four byte planes (byte k of each float32 code in plane k), repeated in both 128-bit lanes: a
// vpshufb of 32 code indices gives byte k of their 32 values, and two rounds of byte / word unpacking reassemble the
// floats. On AMD Zen 3 this ran 1.6x faster than the permutevar8x32 lookup (two shuffle pipes against one); the
// products are the same float32 values.
struct CodePlanes {
  __m256i plane[4];
};

__attribute__((target("avx2"))) CodePlanes code_planes() {
  alignas(32) uint8_t bytes[4][32];
  const float* code = nf4_code_values().data();
  for (int q = 0; q < 16; ++q) {
    uint32_t u = 0;
    std::memcpy(&u, &code[q], sizeof u);
    for (int k = 0; k < 4; ++k) bytes[k][q] = bytes[k][q + 16] = static_cast<uint8_t>(u >> (8 * k));
  }
  CodePlanes p;
  for (int k = 0; k < 4; ++k) p.plane[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[k]));
  return p;
}

// The order in which one_row_avx2 produces the 32 values of 16 packed bytes (columns c0 .. c0 + 31): lane 0 holds
// the high nibbles (even columns), lane 1 the low ones (odd columns), and the unpacking yields floats f = 0..3, each
// [lane 0 bytes 4f .. 4f+3, lane 1 bytes 4f .. 4f+3]. Position e of float f is column 2 * (4f + e % 4) + e / 4.
// x: [in] -> [in] in that order.
void permute_for_planes(const float* x, int64_t in, float* xp) {
  for (int64_t g = 0; g < in; g += 32)
    for (int f = 0; f < 4; ++f)
      for (int e = 0; e < 8; ++e) xp[g + 8 * f + e] = x[g + 2 * (4 * f + e % 4) + e / 4];
}

// One row of x (decoding): 32 codes per step looked up by byte planes (code_planes), times x in the planes' order
// (permute_for_planes), two accumulators per block, the block's scale applied once.
__attribute__((target("avx2,fma"))) float one_row_avx2(const uint8_t* packed, const float* absmax, const float* xp,
                                                        int64_t in, int64_t o, const CodePlanes& cp) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const int64_t half = in / 2, bpr = in / kNf4BlockSize;
  const uint8_t* row = packed + o * half;
  __m256 total = _mm256_setzero_ps();
  for (int64_t b = 0; b < bpr; ++b) {
    const int64_t c = b * (kNf4BlockSize / 2);  // 32 bytes per block
    _mm_prefetch(reinterpret_cast<const char*>(row + c + 4096), _MM_HINT_T0);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t k = 0; k < 2; ++k) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16 * k));
      const __m256i idx = _mm256_and_si256(_mm256_set_m128i(raw, _mm_srli_epi16(raw, 4)), low4);  // [hi | lo]
      const __m256i b0 = _mm256_shuffle_epi8(cp.plane[0], idx), b1 = _mm256_shuffle_epi8(cp.plane[1], idx);
      const __m256i b2 = _mm256_shuffle_epi8(cp.plane[2], idx), b3 = _mm256_shuffle_epi8(cp.plane[3], idx);
      const __m256i w01l = _mm256_unpacklo_epi8(b0, b1), w01h = _mm256_unpackhi_epi8(b0, b1);
      const __m256i w23l = _mm256_unpacklo_epi8(b2, b3), w23h = _mm256_unpackhi_epi8(b2, b3);
      const float* x = xp + 2 * c + 32 * k;
      a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(w01l, w23l)), _mm256_loadu_ps(x), a0);
      a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(w01l, w23l)), _mm256_loadu_ps(x + 8), a1);
      a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(w01h, w23h)), _mm256_loadu_ps(x + 16), a0);
      a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(w01h, w23h)), _mm256_loadu_ps(x + 24), a1);
    }
    total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(absmax[b]), total);
  }
  alignas(32) float v[8];
  _mm256_store_ps(v, total);
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// GCC 12's AVX-512 intrinsics pass an undefined vector as the mask source, which -Wmaybe-uninitialized reports.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// One row with AVX-512: the 16-entry table fits one register, so a code lookup is one permutexvar for 16 lanes.
// 16 bytes -> 16 high and 16 low code indices, times the even / odd columns of x; four accumulators per block.
__attribute__((target("avx512f"))) float one_row_avx512(const uint8_t* packed, const float* absmax, const float* xe,
                                                        const float* xo, int64_t in, int64_t o) {
  const __m512 table = _mm512_loadu_ps(nf4_code_values().data());
  const __m512i mask15 = _mm512_set1_epi32(15);
  const int64_t half = in / 2, bpr = in / kNf4BlockSize;
  const uint8_t* row = packed + o * half;
  __m512 total = _mm512_setzero_ps();
  for (int64_t b = 0; b < bpr; ++b) {
    const int64_t c = b * (kNf4BlockSize / 2);  // 32 bytes per block
    _mm_prefetch(reinterpret_cast<const char*>(row + c + 4096), _MM_HINT_T0);
    const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c)));
    const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16)));
    __m512 a0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), _mm512_loadu_ps(xe + c));
    __m512 a1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b0, mask15), table), _mm512_loadu_ps(xo + c));
    a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), _mm512_loadu_ps(xe + c + 16), a0);
    a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(b1, mask15), table), _mm512_loadu_ps(xo + c + 16), a1);
    total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(absmax[b]), total);
  }
  return _mm512_reduce_add_ps(total);
}
#pragma GCC diagnostic pop

// The widest kernel a process may use: OMNILITE_NF4_SIMD=0 (scalar), 1 (AVX2) or 2 (AVX-512, the default), read
// once; for measuring the narrower kernels on a wider CPU.
int simd_cap() {
  static const int cap = [] {
    const char* v = std::getenv("OMNILITE_NF4_SIMD");
    return v && (v[0] == '0' || v[0] == '1') && v[1] == '\0' ? v[0] - '0' : 2;
  }();
  return cap;
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// ---- Int16 activations (Nf4Activations::Int16) ----
// Position p (0 .. 63) of a block in the int16 kernels' order holds column Int16Order::column[p] of the block. The AVX2
// kernel looks up the high nibbles (even columns) and the low nibbles (odd columns) of the block's 32 bytes and
// widens the looked-up bytes to int16 by unpacking, within each 128-bit lane: vector v = 0, 1 (high nibbles), 2, 3
// (low nibbles) holds bytes j = 0..7 and 16..23 (v even) or 8..15 and 24..31 (v odd).
struct Int16Order {
  std::array<int, 64> column;
  Int16Order() {
    for (int p = 0; p < 64; ++p) {
      const int v = p / 16, e = p % 16;
      const int j = (e < 8 ? e : e + 8) + (v % 2 == 1 ? 8 : 0);
      column[static_cast<size_t>(p)] = 2 * j + (v >= 2 ? 1 : 0);
    }
  }
};
const Int16Order& int16_order() {
  static const Int16Order o;
  return o;
}

// The code values as integers k / 16383: round(code * 16383).
const std::array<int16_t, 16>& int16_codes() {
  static const std::array<int16_t, 16> c = [] {
    std::array<int16_t, 16> t{};
    for (int k = 0; k < 16; ++k)
      t[static_cast<size_t>(k)] =
          static_cast<int16_t>(std::lrint(nf4_code_values()[static_cast<size_t>(k)] * kInt16Max));
    return t;
  }();
  return c;
}

// One row in the AVX2 kernel's arithmetic, lane by lane, so that both give the same float32 bits: int32 lane l
// (of 8) of a block sums the products at positions p with (p % 16) / 2 == l (exact: at most 8 x 16383^2 < 2^31);
// each lane's sum is converted to float32 and accumulated as fma(sum, absmax * xscale, acc[b % 2][l]); the two
// accumulators are added, then the 8 lanes pairwise.
float one_row_int16_scalar(const uint8_t* packed, const float* absmax, const int16_t* xq, const float* xscale,
                           int64_t in, int64_t o) {
  const auto& col = int16_order().column;
  const auto& code = int16_codes();
  const int64_t half = in / 2, bpr = in / kNf4BlockSize;
  const uint8_t* row = packed + o * half;
  float acc[2][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}};
  for (int64_t b = 0; b < bpr; ++b) {
    const uint8_t* bytes = row + b * (kNf4BlockSize / 2);
    const int16_t* xb = xq + b * kNf4BlockSize;
    int32_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int p = 0; p < 64; ++p) {
      const int c = col[static_cast<size_t>(p)];
      const int nib = c % 2 == 0 ? bytes[c / 2] >> 4 : bytes[c / 2] & 15;
      lane[(p % 16) / 2] += static_cast<int32_t>(code[static_cast<size_t>(nib)]) * static_cast<int32_t>(xb[p]);
    }
    const float f = absmax[b] * xscale[b];
    for (int l = 0; l < 8; ++l) acc[b % 2][l] = std::fma(static_cast<float>(lane[l]), f, acc[b % 2][l]);
  }
  float v[8];
  for (int l = 0; l < 8; ++l) v[l] = acc[0][l] + acc[1][l];
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

#if defined(__x86_64__)
// The int16 code values as two byte planes (low and high byte), repeated in both 128-bit lanes.
struct Int16Planes {
  __m256i lo, hi;
};
__attribute__((target("avx2"))) Int16Planes int16_planes() {
  alignas(32) uint8_t lo[32], hi[32];
  for (int k = 0; k < 16; ++k) {
    const auto u = static_cast<uint16_t>(int16_codes()[static_cast<size_t>(k)]);
    lo[k] = lo[k + 16] = static_cast<uint8_t>(u & 255);
    hi[k] = hi[k + 16] = static_cast<uint8_t>(u >> 8);
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(lo)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(hi))};
}

// One block of 64 codes (32 bytes) times its 64 integers: 8 int32 lane sums (exact). The codes are looked up as
// int16 (two vpshufb and two unpacks per 32), then four vpmaddwd.
__attribute__((target("avx2,fma"))) inline __m256i int16_block(const uint8_t* bytes, const int16_t* xq,
                                                               const Int16Planes& cp) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i hn = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), ln = _mm256_and_si256(raw, low4);
  const __m256i hl = _mm256_shuffle_epi8(cp.lo, hn), hh = _mm256_shuffle_epi8(cp.hi, hn);
  const __m256i ll = _mm256_shuffle_epi8(cp.lo, ln), lh = _mm256_shuffle_epi8(cp.hi, ln);
  const __m256i* x = reinterpret_cast<const __m256i*>(xq);
  const __m256i s0 = _mm256_madd_epi16(_mm256_unpacklo_epi8(hl, hh), _mm256_loadu_si256(x));
  const __m256i s1 = _mm256_madd_epi16(_mm256_unpackhi_epi8(hl, hh), _mm256_loadu_si256(x + 1));
  const __m256i s2 = _mm256_madd_epi16(_mm256_unpacklo_epi8(ll, lh), _mm256_loadu_si256(x + 2));
  const __m256i s3 = _mm256_madd_epi16(_mm256_unpackhi_epi8(ll, lh), _mm256_loadu_si256(x + 3));
  return _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
}

// t + float(lane sums of block b) * absmax[b] * xscale[b]
__attribute__((target("avx2,fma"))) inline __m256 int16_block_fma(const uint8_t* row, const int16_t* xq,
                                                                  const float* absmax, const float* xscale,
                                                                  int64_t b, const Int16Planes& cp, __m256 t) {
  const uint8_t* bytes = row + b * (kNf4BlockSize / 2);
  _mm_prefetch(reinterpret_cast<const char*>(bytes + 4096), _MM_HINT_T0);
  const __m256i sum = int16_block(bytes, xq + b * kNf4BlockSize, cp);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(absmax[b] * xscale[b]), t);
}

// One row, Int16 activations: per block the 8 lane sums (int16_block) converted to float32 once and accumulated by
// one FMA with the block's absmax * xscale. Blocks alternate between two accumulators (added at the end) to halve
// the FMA dependency chain; one_row_int16_scalar follows the same order.
__attribute__((target("avx2,fma"))) float one_row_int16_avx2(const uint8_t* packed, const float* absmax,
                                                             const int16_t* xq, const float* xscale, int64_t in,
                                                             int64_t o, const Int16Planes& cp) {
  const int64_t half = in / 2, bpr = in / kNf4BlockSize;
  const uint8_t* row = packed + o * half;
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();  // even and odd blocks (registers, not an array)
  int64_t b = 0;
  for (; b + 2 <= bpr; b += 2) {
    t0 = int16_block_fma(row, xq, absmax, xscale, b, cp, t0);
    t1 = int16_block_fma(row, xq, absmax, xscale, b + 1, cp, t1);
  }
  if (b < bpr) t0 = int16_block_fma(row, xq, absmax, xscale, b, cp, t0);
  alignas(32) float v[8];
  _mm256_store_ps(v, _mm256_add_ps(t0, t1));
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
#endif

// The kernel a one-row product uses: 2 AVX-512, 1 AVX2, 0 scalar, at most `simd` (and the process's cap).
int row_kernel(int simd) {
#if defined(__x86_64__)
  simd = std::min(simd, simd_cap());
  if (simd >= 2 && cpu_has_avx512()) return 2;
  if (simd >= 1 && cpu_has_avx2_fma()) return 1;
#else
  (void)simd;
#endif
  return 0;
}

}  // namespace

Nf4View nf4_view(const Nf4Tensor& q) {
  TORCH_CHECK(q.shape.size() == 2 && q.shape[1] % kNf4BlockSize == 0 && q.packed.device().is_cpu() &&
                  q.packed.is_contiguous() && q.absmax_q.is_contiguous() && q.absmax_scale.is_contiguous() &&
                  q.absmax_scale.scalar_type() == torch::kFloat32,
              "nf4_view: expected a contiguous CPU [out, in] NF4 matrix with in % 64 == 0 and float32 scales");
  return {q.packed.data_ptr<uint8_t>(), q.absmax_q.data_ptr<uint8_t>(), q.absmax_scale.data_ptr<float>(),
          q.absmax_mean.item<float>(), q.shape[0], q.shape[1]};
}

Nf4RowInput nf4_row_input(const float* x, int64_t in, Nf4Activations activations, int simd) {
  TORCH_CHECK(in > 0 && in % kNf4BlockSize == 0, "nf4_row_input: the row length ", in, " must be a multiple of 64");
  Nf4RowInput r{activations, row_kernel(simd), in, {}, {}, {}};
  if (activations == Nf4Activations::Int16) {
    const auto& col = int16_order().column;
    r.xq.resize(static_cast<size_t>(in));
    r.xscale.resize(static_cast<size_t>(in / kNf4BlockSize));
    for (int64_t b = 0; b < in / kNf4BlockSize; ++b) {
      const float* xb = x + b * kNf4BlockSize;
      float mx = 0.f;
      for (int64_t i = 0; i < kNf4BlockSize; ++i) mx = std::max(mx, std::fabs(xb[i]));
      const float inv = mx > 0.f ? static_cast<float>(kInt16Max) / mx : 0.f;
      r.xscale[static_cast<size_t>(b)] = mx / (static_cast<float>(kInt16Max) * static_cast<float>(kInt16Max));
      for (int p = 0; p < 64; ++p) {
        const long v = std::lrint(xb[col[static_cast<size_t>(p)]] * inv);
        r.xq[static_cast<size_t>(b * kNf4BlockSize + p)] =
            static_cast<int16_t>(std::clamp<long>(v, -kInt16Max, kInt16Max));
      }
    }
    return r;
  }
  r.xf.resize(static_cast<size_t>(in));
#if defined(__x86_64__)
  if (r.simd == 1) {
    permute_for_planes(x, in, r.xf.data());
    return r;
  }
#endif
  for (int64_t j = 0; j < in / 2; ++j) {  // even columns, then odd
    r.xf[static_cast<size_t>(j)] = x[2 * j];
    r.xf[static_cast<size_t>(in / 2 + j)] = x[2 * j + 1];
  }
  return r;
}

void nf4_matvec_rows(const Nf4View& w, const Nf4RowInput& x, int64_t o0, int64_t o1, float* y) {
  TORCH_CHECK(w.in == x.in && o0 >= 0 && o1 <= w.out, "nf4_matvec_rows: rows [", o0, ", ", o1, ") of a [", w.out,
              ", ", w.in, "] matrix with a row of ", x.in);
  const int64_t in = w.in, bpr = in / kNf4BlockSize;
  float stack_scales[256];
  std::vector<float> heap_scales(bpr > 256 ? static_cast<size_t>(bpr) : 0);
  float* ap = bpr > 256 ? heap_scales.data() : stack_scales;
  const bool int16 = x.activations == Nf4Activations::Int16;
#if defined(__x86_64__)
  const CodePlanes cp = !int16 && x.simd == 1 ? code_planes() : CodePlanes{};
  const Int16Planes ip = int16 && x.simd >= 1 ? int16_planes() : Int16Planes{};
  const float* map = dynamic_map_values().data();
#endif
  for (int64_t o = o0; o < o1; ++o) {
#if defined(__x86_64__)
    if (x.simd >= 1) row_absmax_avx2(w.absmax_q, w.absmax_scale, w.absmax_mean, o * bpr, bpr, ap, map);
    else row_absmax(w.absmax_q, w.absmax_scale, w.absmax_mean, o * bpr, bpr, ap);
    if (int16) {
      y[o] = x.simd >= 1 ? one_row_int16_avx2(w.packed, ap, x.xq.data(), x.xscale.data(), in, o, ip)
                         : one_row_int16_scalar(w.packed, ap, x.xq.data(), x.xscale.data(), in, o);
      continue;
    }
    if (x.simd == 2) {
      y[o] = one_row_avx512(w.packed, ap, x.xf.data(), x.xf.data() + in / 2, in, o);
      continue;
    }
    if (x.simd == 1) {
      y[o] = one_row_avx2(w.packed, ap, x.xf.data(), in, o, cp);
      continue;
    }
#else
    row_absmax(w.absmax_q, w.absmax_scale, w.absmax_mean, o * bpr, bpr, ap);
    if (int16) {
      y[o] = one_row_int16_scalar(w.packed, ap, x.xq.data(), x.xscale.data(), in, o);
      continue;
    }
#endif
    few_rows_scalar(w.packed, ap, x.xf.data(), x.xf.data() + in / 2, 1, in, o, y + o);
  }
}

torch::Tensor nf4_matmul_few_rows_cpu(const torch::Tensor& x, const Nf4Tensor& q, int simd,
                                      Nf4Activations activations) {
  TORCH_CHECK(q.shape.size() == 2 && q.shape[1] % kNf4BlockSize == 0 && x.dim() == 2 && x.size(1) == q.shape[1] &&
                  x.size(0) <= kNf4FewRows && x.device().is_cpu() && q.packed.device().is_cpu(),
              "nf4_matmul_few_rows_cpu: expected CPU x [N <= ", kNf4FewRows, ", ", q.shape.size() == 2 ? q.shape[1] : 0,
              "] for a [out, in] matrix, got x ", x.sizes());
  const int64_t N = x.size(0), out = q.shape[0], in = q.shape[1];
  auto xf = x.to(torch::kFloat32).contiguous();
  // the block scales are decoded row by row (row_absmax), not for the whole matrix in every call
  const Nf4Tensor qc{q.packed.contiguous(), q.absmax_q.contiguous(), q.absmax_scale.to(torch::kFloat32).contiguous(),
                     q.absmax_mean, q.shape};
  const Nf4View w = nf4_view(qc);
  if (N == 1) {
    const Nf4RowInput row = nf4_row_input(xf.data_ptr<float>(), in, activations, simd);
    auto y = torch::empty({1, out}, torch::kFloat32);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) { nf4_matvec_rows(w, row, o0, o1, yp); });
    return y;
  }
  const bool avx2 = row_kernel(simd) >= 1;
  auto pairs = xf.view({N, in / 2, 2});
  const auto xe = pairs.select(2, 0).contiguous();  // [N, in / 2] even columns
  const auto xo = pairs.select(2, 1).contiguous();  // odd columns
  const int64_t bpr = in / kNf4BlockSize;
  auto y = torch::empty({out, N}, torch::kFloat32);  // [out, N], written row by row
  const float *ep = xe.data_ptr<float>(), *op = xo.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t o0, int64_t o1) {
    std::vector<float> row_scales(static_cast<size_t>(bpr));
    float* ap = row_scales.data();
    for (int64_t o = o0; o < o1; ++o) {
#if defined(__x86_64__)
      if (avx2) {
        row_absmax_avx2(w.absmax_q, w.absmax_scale, w.absmax_mean, o * bpr, bpr, ap, dynamic_map_values().data());
        few_rows_avx2(w.packed, ap, ep, op, N, in, o, yp + o * N);
        continue;
      }
#endif
      row_absmax(w.absmax_q, w.absmax_scale, w.absmax_mean, o * bpr, bpr, ap);
      few_rows_scalar(w.packed, ap, ep, op, N, in, o, yp + o * N);
    }
  });
  return y.t().contiguous();  // [N, out]
}

}  // namespace omnilite::quant
