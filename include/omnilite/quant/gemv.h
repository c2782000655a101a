// One row times a matrix on the CPU (batch-1 decoding): y = x W^T, reading each weight once, the rows split across
// the intra-op threads (runtime.threads), AVX-512 or AVX2 + FMA chosen at run time, or a scalar loop.
//
// bf16 weights and x: the products of bf16 weights with x (rounded to bf16 as the layer's input already is) are
// exact in float32 and summed in float32, then rounded once to bf16, as a bf16 GEMM with float32 accumulation rounds
// its output. float32 x: float32 products and sums, as BLAS's sgemv. Only the summation order differs from BLAS.
//
// Why not BLAS for one row: the GEMM path of the CPU BLAS first packs (copies) the whole weight, and its GEMV runs
// on the BLAS threads, which cannot share the cores with the intra-op threads that the rest of decoding runs on.
#pragma once

#include <torch/torch.h>

namespace omnilite::quant {

// x: [in] (any float type, used as bf16), w: [out, in] bf16 contiguous CPU -> [out] bf16. `simd` caps the
// instruction set: 2 AVX-512, 1 AVX2, 0 the scalar loop (tests compare all three).
torch::Tensor bf16_matvec_cpu(const torch::Tensor& x, const torch::Tensor& w, int simd = 2);

// x: [in] float32, w: [out, in] float32 or bf16 (widened exactly, so the products are those of the float32 weight
// holding the same values) contiguous CPU -> [out] float32; `simd` as above.
torch::Tensor float_matvec_cpu(const torch::Tensor& x, const torch::Tensor& w, int simd = 2);

// Rows [o0, o1) of y = W x on the calling thread (callers split rows across threads, several matrices sharing one
// parallel region): w [out, in] float32, or bf16 as its uint16_t bits (widened exactly), x [in] float32; the same
// kernels and products as float_matvec_cpu.
void matvec_rows_cpu(const float* w, const float* x, int64_t in, int64_t o0, int64_t o1, float* y, int simd = 2);
void matvec_rows_cpu(const uint16_t* w, const float* x, int64_t in, int64_t o0, int64_t o1, float* y, int simd = 2);

}  // namespace omnilite::quant
