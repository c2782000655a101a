#include "omnilite/quant/gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "omnilite/runtime.h"

namespace omnilite::quant {

int gemm_column_splits() {
  if (at::in_parallel_region()) return 1;
  const int blas = blas_threads_in_use();
  if (blas < 1) return 1;  // MKL or another BLAS shares LibTorch's OpenMP threads
  return std::max(1, at::get_num_threads() / blas);
}

// x [N, in] -> [N, out]
torch::Tensor matmul_by_row_blocks(const torch::Tensor& x, int64_t out, int64_t max_rows,
                                   const std::function<torch::Tensor(int64_t, int64_t)>& weight_rows) {
  const int64_t splits = gemm_column_splits();
  // rows per block: a share of the threads' work, rounded to 16 outputs, capped by the block memory
  int64_t rows = std::max<int64_t>(1, std::min(max_rows, ((out + splits - 1) / splits + 15) / 16 * 16));
  if (splits == 1) rows = std::max<int64_t>(1, std::min(max_rows, out));
  const int64_t blocks = (out + rows - 1) / rows;
  std::vector<torch::Tensor> parts(static_cast<size_t>(blocks));
  auto one = [&](int64_t b) {
    const int64_t r = b * rows, n = std::min(rows, out - r);
    parts[static_cast<size_t>(b)] = torch::mm(x, weight_rows(r, n).t());  // [N, n]
  };
  if (splits > 1 && blocks > 1) {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) one(b);
    });
  } else {
    for (int64_t b = 0; b < blocks; ++b) one(b);
  }
  return blocks == 1 ? parts[0] : torch::cat(parts, 1);
}

}  // namespace omnilite::quant
