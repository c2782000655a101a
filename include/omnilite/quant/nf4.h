// NF4 quantisation (QLoRA, Dettmers et al. 2023), laid out as bitsandbytes and torchao define it.
//
// A weight is flattened and cut into blocks of 64 values. Each block is scaled by its absmax into [-1, 1] and each
// value is mapped to the nearest of the 16 NF4 codes (the quantiles of N(0, 1), normalised to [-1, 1], with an
// exact 0); two 4-bit code indices share a byte, the first value in the high nibble.
// The block scaling is bitsandbytes' quantize_4bit: x * (1 / absmax), then the code whose decision boundary
// (midpoint of neighbouring codes) is the first at or above it.
// Double quantisation is bitsandbytes' compress_statistics=True: the per-block absmax values (fp32) minus their
// mean (the offset) are quantised blockwise again, in blocks of 256: each multiplied by 1 / its block's max |.|
// (the nested absmax, fp32) and coded by bitsandbytes' signed dynamic 8-bit map as its CPU kernel does it, through
// 65536 bins over [-1, 1] (each bin takes the map value nearest its centre, so a value within one bin width, 3e-5,
// of a midpoint may take the farther neighbour). A weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits. The bytes
// equal bitsandbytes' (scripts/check_interop.sh compares every stored byte).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace omnilite::quant {

constexpr int64_t kNf4BlockSize = 64;       // values per absmax block
constexpr int64_t kAbsmaxBlockSize = 256;   // absmax values per double-quantisation block

// The 16 NF4 code values, ascending (index = the 4-bit code).
const std::array<float, 16>& nf4_code_values();
// bitsandbytes' signed dynamic 8-bit map, create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
// 256 values in [-1, 1], ascending (index = the 8-bit code of a double-quantised absmax).
const std::array<float, 256>& dynamic_map_values();

// A quantised tensor. numel must be a multiple of 64 (every linear layer of OMNI-LITE is).
struct Nf4Tensor {
  torch::Tensor packed;         // [numel / 2] uint8: code of value 2i in the high nibble, 2i+1 in the low nibble
  torch::Tensor absmax_q;       // [numel / 64] uint8: dynamic-map code of (absmax - mean) / absmax_scale[block / 256]
  torch::Tensor absmax_scale;   // [ceil(numel / 64 / 256)] float32: max |absmax - mean| per 256-block (nested_absmax)
  torch::Tensor absmax_mean;    // [] float32: mean of the block absmax values (bitsandbytes' nested_offset)
  std::vector<int64_t> shape;   // shape of the original tensor
  int64_t numel() const;
};

// Nearest NF4 code index of every value in [-1, 1]: [n] float -> [n] uint8 (ties go to the lower code).
torch::Tensor nf4_nearest_codes(const torch::Tensor& normalised);

// w: any float tensor with numel % 64 == 0 -> NF4 (computed in fp32 on w's device).
Nf4Tensor nf4_quantize(const torch::Tensor& w);
// The block absmax values as recovered from double quantisation: [numel / 64] float32.
torch::Tensor nf4_absmax(const Nf4Tensor& q);
// Full tensor in `dtype` (shape = q.shape).
torch::Tensor nf4_dequantize(const Nf4Tensor& q, torch::ScalarType dtype = torch::kFloat32);
// Rows [row0, row0 + rows) of a 2-d quantised matrix [out, in] (in % 64 == 0), without touching the others:
// -> [rows, in] in `dtype`.
torch::Tensor nf4_dequantize_rows(const Nf4Tensor& q, int64_t row0, int64_t rows, torch::ScalarType dtype);

// How a one-row NF4 product (decoding) treats its input x (runtime.nf4_activations).
enum class Nf4Activations {
  Float32,  // exact: float32 products of the code values with x, summed in float32 (the default)
  // x rounded per 64-block to integers in [-16383, 16383] (scale max |x| / 16383) and the code values to k / 16383;
  // the integer products of a block are summed exactly (AVX2 vpmaddwd), then scaled once. Error: at most about
  // 3.1e-5 of the block's max |x| per input and 3.1e-5 per code value (measured: docs/benchmarks.md). Not exact:
  // an opt-in for speed, as llama.cpp's 8-bit activations (whose error is 128x larger).
  Int16,
};
// "fp32" -> Float32, "int16" -> Int16; anything else throws, naming the value.
Nf4Activations parse_nf4_activations(const std::string& name);
// The largest integer magnitude of an Int16 code value or input: 8 products of 16383^2 (one int32 lane's share of a
// block) stay below 2^31.
constexpr int kInt16Max = 16383;

// Rows of x at most this many take nf4_matmul_few_rows_cpu in Nf4Linear's CPU forward (decoding).
constexpr int64_t kNf4FewRows = 8;
// y = x W^T straight from the codes on the CPU, without materialising W: per 64-block, sum(code[c_i] * x_i) is
// scaled by the block's absmax once (AVX-512 for one row, AVX2 + FMA, or a scalar loop: the widest the CPU has, at
// run time). Reads each packed byte once for all rows, so batch-1 decoding reads 4.1 bits per weight instead of
// writing and re-reading an fp32 copy. x: [N, in] float32 CPU, N <= kNf4FewRows, q a 2-d [out, in] matrix -> [N, out]
// float32. `simd` caps the instruction set: 2 AVX-512, 1 AVX2, 0 the scalar loop (tests compare all three).
// `activations` applies to one row (N = 1, decoding); more rows are always Float32.
torch::Tensor nf4_matmul_few_rows_cpu(const torch::Tensor& x, const Nf4Tensor& q, int simd = 2,
                                      Nf4Activations activations = Nf4Activations::Float32);

// A 2-d quantised matrix [out, in] as raw CPU pointers (its tensors must stay alive), for nf4_matvec_rows.
struct Nf4View {
  const uint8_t* packed;        // [out * in / 2] codes
  const uint8_t* absmax_q;      // [out * in / 64] double-quantised block scales
  const float* absmax_scale;    // [ceil(out * in / 64 / 256)]
  float absmax_mean;            // the nested offset
  int64_t out, in;              // the matrix's shape
};
// q: a contiguous CPU [out, in] matrix with in % 64 == 0 and a float32 absmax_scale.
Nf4View nf4_view(const Nf4Tensor& q);

// One input row x [in] prepared once for any number of one-row products with [., in] matrices: laid out in the
// order the chosen kernel reads it, or rounded to 16-bit integers per 64-block (Nf4Activations::Int16).
struct Nf4RowInput {
  Nf4Activations activations;  // how the products treat x
  int simd;                    // the kernel: 2 AVX-512, 1 AVX2, 0 scalar (the CPU's widest up to the cap asked for)
  int64_t in;                  // x's length
  std::vector<float> xf;       // Float32: x in the kernel's order (AVX2: byte-plane order; else even then odd columns)
  std::vector<int16_t> xq;     // Int16: round(x / xscale) per block, in the int16 kernels' order
  std::vector<float> xscale;   // Int16: [in / 64] max |x| of the block / 16383^2 (x ~= xq * 16383 * xscale)
};
// x: [in] float32, in % 64 == 0. simd caps the kernel as in nf4_matmul_few_rows_cpu.
Nf4RowInput nf4_row_input(const float* x, int64_t in, Nf4Activations activations, int simd = 2);
// y[o] = sum_i dequant(W)[o, i] x[i] for the rows o in [o0, o1), on the calling thread (callers split rows across
// threads, several matrices sharing one parallel region).
void nf4_matvec_rows(const Nf4View& w, const Nf4RowInput& x, int64_t o0, int64_t o1, float* y);

}  // namespace omnilite::quant
