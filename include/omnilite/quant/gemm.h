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

// x [N, in] -> [N, out] = x W^T, where weight_rows(r, n) returns rows [r, r + n) of W as an [n, in] tensor of x's
// dtype (a view, a widened bf16 copy, a dequantised NF4 block). Blocks hold at most max_rows rows (the memory of one
// dequantised block); on the CPU they are spread over gemm_column_splits() threads, elsewhere run in turn.
torch::Tensor matmul_by_row_blocks(const torch::Tensor& x, int64_t out, int64_t max_rows,
                                   const std::function<torch::Tensor(int64_t, int64_t)>& weight_rows);

// x [N, in] float32 times a bf16 w [out, in] on the CPU -> [N, out] float32: w's rows widened (exactly) kWidenedElements
// values at a time, so no float32 copy of the whole matrix exists; the products are the float32 matrix's.
constexpr int64_t kWidenedElements = int64_t{1} << 22;  // 4M values: 16 MiB of float32 scratch per block
torch::Tensor widened_matmul(const torch::Tensor& x, const torch::Tensor& w);

// The sum over row blocks [r, r + n) of [0, out) (at most max_rows each) of f(r, n), added in block order; the
// blocks' f run on the intra-op threads as above when on_cpu (an NF4 layer's input gradient, block by block).
torch::Tensor sum_by_row_blocks(int64_t out, int64_t max_rows, bool on_cpu,
                                const std::function<torch::Tensor(int64_t, int64_t)>& f);

// x [N, in] float32 -> x W^T + b [N, out] with gradients: the forward GEMM and the backward's two (x's gradient by
// its columns, W's by its rows) each split across the intra-op threads as above; bias b [out] or undefined.
// Training under runtime.threads = 2 and blas_threads = 1 then keeps both cores in its GEMMs and in the
// element-wise ops between them (with one LibTorch thread and two BLAS threads, a BLAS thread idles through them).
torch::Tensor split_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b);

}  // namespace omnilite::quant
