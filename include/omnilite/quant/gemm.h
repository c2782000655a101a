// Several rows times a matrix on the CPU (a prompt, a batch of captions, a training step's layers), the work split
// across LibTorch's intra-op threads when OpenBLAS runs fewer threads than they.
//
// Why: decoding runs its one-row kernels on the intra-op threads (runtime.threads), so the configs that decode
// fast give OpenBLAS one thread (runtime.blas_threads = 1, configs/omni-lite.json), and a prompt's GEMMs, one BLAS
// call each, then ran on one core of two. Here each intra-op thread multiplies its own block of W's rows with one
// single-threaded BLAS call; every output value is the same float32 dot product BLAS computes for the whole matrix.
#pragma once

#include <functional>

#include <torch/torch.h>

namespace omnilite::quant {

// How many column blocks a CPU GEMM is split into: intra-op threads / OpenBLAS threads (1 inside a parallel
// region, with a BLAS other than OpenBLAS, or when OpenBLAS has as many threads).
int gemm_column_splits();

// x [N, in] float32 -> [N, out] float32 = x W^T, where weight_rows(r, n) returns rows [r, r + n) of W as a float32
// [n, in] tensor (a view, a widened bf16 copy, a dequantised NF4 block). Blocks hold at most max_rows rows (the
// memory of one dequantised block) and are spread over gemm_column_splits() threads.
torch::Tensor matmul_by_row_blocks(const torch::Tensor& x, int64_t out, int64_t max_rows,
                                   const std::function<torch::Tensor(int64_t, int64_t)>& weight_rows);

// x [N, in] float32 -> x W^T + b [N, out] with gradients: the forward GEMM and the backward's two (x's gradient by
// its columns, W's by its rows) each split across the intra-op threads as above; bias b [out] or undefined.
// Training under runtime.threads = 2 and blas_threads = 1 then keeps both cores in its GEMMs and in the
// element-wise ops between them (with one LibTorch thread and two BLAS threads, a BLAS thread idles through them).
torch::Tensor split_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b);

}  // namespace omnilite::quant
