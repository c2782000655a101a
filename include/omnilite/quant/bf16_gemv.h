// One row times a bf16 matrix on the CPU (batch-1 decoding with bf16 weights): y = x W^T, reading each weight once.
//
// The products of bf16 weights with x (rounded to bf16 as the layer's input already is) are exact in float32 and
// summed in float32 (AVX-512 or AVX2 + FMA, chosen at run time, or a scalar loop), then rounded once to bf16, as a
// bf16 GEMM with float32 accumulation rounds its output. Only the summation order differs from the BLAS path.
#pragma once

#include <torch/torch.h>

namespace omnilite::quant {

// x: [in] (any float type, used as bf16), w: [out, in] bf16 contiguous CPU -> [out] bf16. `simd` caps the
// instruction set: 2 AVX-512, 1 AVX2, 0 the scalar loop (tests compare all three).
torch::Tensor bf16_matvec_cpu(const torch::Tensor& x, const torch::Tensor& w, int simd = 2);

}  // namespace omnilite::quant
