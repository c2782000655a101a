#include "omnilite/quant/gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "omnilite/runtime.h"

namespace omnilite::quant {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [start, length) blocks covering n: one share per thread rounded up to 16 (at least 16) when split, the whole of n
// otherwise; never longer than max_len.
std::vector<std::pair<int64_t, int64_t>> blocks_of(int64_t n, int64_t splits, int64_t max_len) {
  const int64_t share = splits > 1 ? std::max<int64_t>(16, ((n + splits - 1) / splits + 15) / 16 * 16) : n;
  const int64_t step = std::max<int64_t>(1, std::min(max_len, share));
  std::vector<std::pair<int64_t, int64_t>> r;
  for (int64_t s = 0; s < n; s += step) r.emplace_back(s, std::min(step, n - s));
  return r;
}

// f(start, length) for every block, on the intra-op threads when `parallel` -> the parts in block order
std::vector<torch::Tensor> on_threads(const std::vector<std::pair<int64_t, int64_t>>& blocks, bool parallel,
                                      const std::function<torch::Tensor(int64_t, int64_t)>& f) {
  std::vector<torch::Tensor> parts(blocks.size());
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto& [s, n] = blocks[static_cast<size_t>(b)];
      parts[static_cast<size_t>(b)] = f(s, n);
    }
  };
  const auto count = static_cast<int64_t>(blocks.size());
  if (parallel && count > 1) at::parallel_for(0, count, 1, run);
  else run(0, count);
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
    const int64_t splits = gemm_column_splits();
    return joined(on_threads(blocks_of(w.size(0), splits, w.size(0)), splits > 1,
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
      gx = joined(on_threads(blocks_of(w.size(1), splits, w.size(1)), splits > 1,
                             [&](int64_t c, int64_t n) { return torch::mm(gy, w.narrow(1, c, n)); }), 1);
    if (ctx->needs_input_grad(1))
      gw = joined(on_threads(blocks_of(w.size(0), splits, w.size(0)), splits > 1,
                             [&](int64_t r, int64_t n) { return torch::mm(gy.narrow(1, r, n).t(), x); }), 0);
    return {gx, gw};
  }
};

}  // namespace

int gemm_column_splits() {
  if (at::in_parallel_region()) return 1;
  const int blas = blas_threads_in_use();
  if (blas < 1) return 1;  // MKL or another BLAS shares LibTorch's OpenMP threads
  return std::max(1, at::get_num_threads() / blas);
}

// x [N, in] -> [N, out]
torch::Tensor matmul_by_row_blocks(const torch::Tensor& x, int64_t out, int64_t max_rows,
                                   const std::function<torch::Tensor(int64_t, int64_t)>& weight_rows) {
  const int64_t splits = x.device().is_cpu() ? gemm_column_splits() : 1;
  return joined(on_threads(blocks_of(out, splits, max_rows), splits > 1,
                           [&](int64_t r, int64_t n) { return torch::mm(x, weight_rows(r, n).t()); }),  // [N, n]
                1);
}

// x [N, in] float32, w [out, in] bf16 -> [N, out] float32
torch::Tensor widened_matmul(const torch::Tensor& x, const torch::Tensor& w) {
  return matmul_by_row_blocks(x, w.size(0), std::max<int64_t>(1, kWidenedElements / w.size(1)),
                              [&](int64_t r, int64_t n) { return w.narrow(0, r, n).to(torch::kFloat32); });
}

torch::Tensor sum_by_row_blocks(int64_t out, int64_t max_rows, bool on_cpu,
                                const std::function<torch::Tensor(int64_t, int64_t)>& f) {
  const int64_t splits = on_cpu ? gemm_column_splits() : 1;
  const auto parts = on_threads(blocks_of(out, splits, max_rows), splits > 1, f);
  torch::Tensor total = parts[0];
  for (size_t b = 1; b < parts.size(); ++b) total = total + parts[b];
  return total;
}

torch::Tensor split_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  auto y = SplitLinear::apply(x, w);
  return b.defined() ? y + b : y;  // the bias's gradient by autograd
}

}  // namespace omnilite::quant
