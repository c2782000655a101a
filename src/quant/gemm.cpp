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

namespace omnilite::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Blocks of `n` columns or rows spread over the threads: [start, start + len) per block.
std::vector<std::pair<int64_t, int64_t>> split_range(int64_t n, int64_t splits) {
  const int64_t step = std::max<int64_t>(16, ((n + splits - 1) / splits + 15) / 16 * 16);
  std::vector<std::pair<int64_t, int64_t>> r;
  for (int64_t s = 0; s < n; s += step) r.emplace_back(s, std::min(step, n - s));
  return r;
}

// f(block) for every block on the intra-op threads -> the parts in block order
std::vector<torch::Tensor> on_threads(const std::vector<std::pair<int64_t, int64_t>>& blocks,
                                      const std::function<torch::Tensor(int64_t, int64_t)>& f) {
  std::vector<torch::Tensor> parts(blocks.size());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto& [s, n] = blocks[static_cast<size_t>(b)];
      parts[static_cast<size_t>(b)] = f(s, n);
    }
  });
  return parts;
}

torch::Tensor joined(const std::vector<torch::Tensor>& parts, int64_t dim) {
  return parts.size() == 1 ? parts[0] : torch::cat(parts, dim);
}

// y = x W^T with the forward GEMM split by W's rows and the backward ones by gx's columns and gW's rows.
struct SplitLinear : torch::autograd::Function<SplitLinear> {
  // x: [N, in], w: [out, in] -> [N, out]
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w) {
    ctx->save_for_backward({x, w});
    return joined(on_threads(split_range(w.size(0), gemm_column_splits()),
                             [&](int64_t r, int64_t n) { return torch::mm(x, w.narrow(0, r, n).t()); }), 1);
  }
  // gy: [N, out] -> gx [N, in], gw [out, in]
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1];
    const auto gy = grads[0].contiguous();
    const int64_t splits = gemm_column_splits();
    torch::Tensor gx, gw;
    if (ctx->needs_input_grad(0))
      gx = joined(on_threads(split_range(w.size(1), splits),
                             [&](int64_t c, int64_t n) { return torch::mm(gy, w.narrow(1, c, n)); }), 1);
    if (ctx->needs_input_grad(1))
      gw = joined(on_threads(split_range(w.size(0), splits),
                             [&](int64_t r, int64_t n) { return torch::mm(gy.narrow(1, r, n).t(), x); }), 0);
    return {gx, gw};
  }
};

}  // namespace

torch::Tensor split_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  auto y = SplitLinear::apply(x, w);
  return b.defined() ? y + b : y;  // the bias's gradient by autograd
}

}  // namespace omnilite::quant
