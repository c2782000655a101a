#include "omnilite/modules/losses.h"

#include <algorithm>
#include <functional>
#include <vector>

namespace omnilite {

// logits [B, T, V], tokens [B, T], target_mask [B, T] -> scalar
torch::Tensor clm_loss(const torch::Tensor& logits, const torch::Tensor& tokens, const torch::Tensor& target_mask) {
  const int64_t T = tokens.size(1), V = logits.size(2);
  TORCH_CHECK(logits.size(0) == tokens.size(0) && logits.size(1) == T, "clm_loss: logits ", logits.sizes(),
              " do not match tokens ", tokens.sizes());
  auto pred = logits.narrow(1, 0, T - 1).reshape({-1, V});           // predictions from positions 0..T-2
  auto target = tokens.narrow(1, 1, T - 1).reshape(-1);              // targets at positions 1..T-1
  auto mask = target_mask.narrow(1, 1, T - 1).reshape(-1);
  auto idx = mask.nonzero().squeeze(1);
  if (idx.numel() == 0) return logits.sum() * 0.0;                   // keeps the graph, contributes nothing
  auto acc = logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return torch::nn::functional::cross_entropy(pred.index_select(0, idx).to(acc), target.index_select(0, idx));
}

namespace {

// Rows of one chunk, positions r0 .. r0 + n - 1 of h.
struct RowChunk {
  int64_t r0, n;
};
std::vector<RowChunk> row_chunks(int64_t rows_total, int64_t rows) {
  std::vector<RowChunk> c;
  for (int64_t r0 = 0; r0 < rows_total; r0 += rows) c.push_back({r0, std::min(rows, rows_total - r0)});
  return c;
}

// out = p - onehot(idx): p [n, V] probabilities, idx [n, 1] targets, out [n, V] (may be p itself)
void softmax_minus_onehot(const torch::Tensor& p, const torch::Tensor& idx, torch::Tensor out) {
  if (!out.is_same(p)) out.copy_(p);
  out.scatter_add_(1, idx, torch::full(idx.sizes(), -1.0, out.options()));
}

// A bf16 table (QLoRA's frozen LM head on the CPU) with float32 rows: its rows are widened a block at a time, so
// the products are those of the float32 table holding the same values, without a float32 copy of all of it.
bool widened_table(const torch::Tensor& h, const torch::Tensor& w) {
  return w.scalar_type() == torch::kBFloat16 && h.scalar_type() == torch::kFloat32 && w.device().is_cpu();
}
constexpr int64_t kWidenedTableRows = 4096;  // 32 MiB of float32 at D = 2048

// f(r, wr) for each block of kWidenedTableRows rows of a bf16 table w: wr holds rows [r, r + n) widened into one
// float32 scratch buffer shared by all blocks (no allocation per block).
void widened_blocks(const torch::Tensor& w, const torch::TensorOptions& o,
                    const std::function<void(int64_t, const torch::Tensor&)>& f) {
  auto scratch = torch::empty({std::min(kWidenedTableRows, w.size(0)), w.size(1)}, o);
  for (int64_t r = 0; r < w.size(0); r += kWidenedTableRows) {
    const int64_t n = std::min(kWidenedTableRows, w.size(0) - r);
    auto wr = scratch.narrow(0, 0, n);
    wr.copy_(w.narrow(0, r, n));
    f(r, wr);
  }
}

// sum_i CE(h_i w^T, t_i), chunked (see losses.h).
struct LinearCrossEntropy : torch::autograd::Function<LinearCrossEntropy> {
  // h_c: [n, D] -> logits [n, V] in the accumulation dtype
  static torch::Tensor logits(const torch::Tensor& hc, const torch::Tensor& w, torch::ScalarType acc) {
    if (widened_table(hc, w)) {
      auto out = torch::empty({hc.size(0), w.size(0)}, hc.options());
      widened_blocks(w, hc.options(), [&](int64_t r, const torch::Tensor& wr) {
        out.narrow(1, r, wr.size(0)).copy_(torch::mm(hc, wr.t()));
      });
      return out;
    }
    return torch::matmul(hc, w.t()).to(acc);
  }
  // dz: [n, V] float32 -> dz w [n, D], a bf16 w widened a block of rows at a time into one scratch block
  static torch::Tensor times_table(const torch::Tensor& dz, const torch::Tensor& w) {
    auto out = torch::zeros({dz.size(0), w.size(1)}, dz.options());
    widened_blocks(w, dz.options(), [&](int64_t r, const torch::Tensor& wr) {
      out.addmm_(dz.narrow(1, r, wr.size(0)), wr);
    });
    return out;
  }

  // h: [n, D], w: [V, D], targets: [n] -> scalar
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& h, const torch::Tensor& w,
                               const torch::Tensor& targets, int64_t rows, int64_t keep_bytes) {
    const auto acc = h.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    auto total = torch::zeros({}, h.options().dtype(acc));
    // Short inputs keep d total / d logits from the forward (the backward then skips recomputing the logits, a GEMM
    // as large as the head's); above keep_bytes of it, the backward recomputes it chunk by chunk.
    const int64_t V = w.size(0);
    const bool keep = (h.requires_grad() || w.requires_grad()) && h.size(0) * V * 4 <= keep_bytes;
    torch::Tensor dlogits = keep ? torch::empty({h.size(0), V}, h.options().dtype(acc)) : torch::Tensor();
    for (const auto& c : row_chunks(h.size(0), rows)) {
      auto z = logits(h.narrow(0, c.r0, c.n), w, acc);  // [n, V]
      auto idx = targets.narrow(0, c.r0, c.n).unsqueeze(1);
      auto lse = torch::logsumexp(z, 1, true);          // [n, 1]
      total += (lse - z.gather(1, idx)).sum();
      if (keep) softmax_minus_onehot(z.sub_(lse).exp_(), idx, dlogits.narrow(0, c.r0, c.n));
    }
    ctx->save_for_backward({h, w, targets, dlogits});
    ctx->saved_data["rows"] = rows;
    return total;
  }

  // d total / d logits = softmax(logits) - onehot(target), per row; then through the linear map.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &h = saved[0], &w = saved[1], &targets = saved[2], &kept = saved[3];
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const auto acc = h.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    const auto g = grads[0].to(acc);
    const bool want_h = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    torch::Tensor dh = want_h ? torch::empty_like(h) : torch::Tensor();
    torch::Tensor dw = want_w ? torch::zeros_like(w) : torch::Tensor();
    for (const auto& c : row_chunks(h.size(0), rows)) {
      auto hc = h.narrow(0, c.r0, c.n);
      torch::Tensor dz;  // [n, V]
      if (kept.defined()) {
        dz = kept.narrow(0, c.r0, c.n) * g;
      } else {
        dz = torch::softmax(logits(hc, w, acc), 1);
        softmax_minus_onehot(dz, targets.narrow(0, c.r0, c.n).unsqueeze(1), dz);
        dz.mul_(g);
      }
      if (widened_table(h, w)) {  // a frozen bf16 table: no gradient of its own
        TORCH_CHECK(!want_w, "linear_cross_entropy_sum: a bf16 table with float32 rows must be frozen");
        if (want_h) dh.narrow(0, c.r0, c.n).copy_(times_table(dz, w));
        continue;
      }
      const auto dzw = dz.to(w.scalar_type());
      if (want_h) dh.narrow(0, c.r0, c.n).copy_(torch::matmul(dzw, w));  // [n, D]
      if (want_w) dw.add_(torch::matmul(dzw.t(), hc.to(w.scalar_type())));  // [V, D]
    }
    return {dh, dw, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

int64_t cross_entropy_chunk_rows(int64_t vocab) {
  return std::max<int64_t>(16, (int64_t{32} << 20) / std::max<int64_t>(1, vocab * 4));
}

torch::Tensor linear_cross_entropy_sum(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& targets,
                                       int64_t rows, int64_t keep_bytes) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), "linear_cross_entropy_sum: h ", h.sizes(),
              " and w ", w.sizes(), " must be [n, D] and [V, D]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == h.size(0), "linear_cross_entropy_sum: targets ",
              targets.sizes(), " must be [", h.size(0), "]");
  if (rows <= 0) rows = cross_entropy_chunk_rows(w.size(0));
  return LinearCrossEntropy::apply(h, w, targets.to(torch::kLong), rows, keep_bytes);
}

// hidden [B, T, D], head_weight [V, D], tokens [B, T], target_mask [B, T] -> scalar
torch::Tensor clm_loss_sum(const torch::Tensor& hidden, const torch::Tensor& head_weight, const torch::Tensor& tokens,
                           const torch::Tensor& target_mask) {
  const int64_t T = tokens.size(1), D = hidden.size(2);
  TORCH_CHECK(hidden.size(0) == tokens.size(0) && hidden.size(1) == T, "clm_loss_sum: hidden ", hidden.sizes(),
              " does not match tokens ", tokens.sizes());
  auto idx = target_mask.narrow(1, 1, T - 1).reshape(-1).nonzero().squeeze(1);  // targets at positions 1..T-1
  if (idx.numel() == 0) return (hidden.sum() * 0.0).to(upcast(hidden).scalar_type());  // keeps the graph
  auto h = hidden.narrow(1, 0, T - 1).reshape({-1, D}).index_select(0, idx);          // predicted from 0..T-2
  auto target = tokens.narrow(1, 1, T - 1).reshape(-1).index_select(0, idx);
  return linear_cross_entropy_sum(h, head_weight, target);
}

torch::Tensor flow_interpolate(const torch::Tensor& x0, const torch::Tensor& x1, const torch::Tensor& t) {
  auto tt = t.to(x1.scalar_type()).unsqueeze(1);  // [n, 1]
  return tt * x1 + (1 - tt) * x0;
}

torch::Tensor rf_loss(const torch::Tensor& v_pred, const torch::Tensor& x0, const torch::Tensor& x1) {
  auto acc = v_pred.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return (v_pred.to(acc) - (x1 - x0).to(acc)).pow(2).mean();
}

torch::Tensor sample_flow_times(int64_t n, bool logit_normal, double mean, double std, const torch::TensorOptions& o) {
  if (logit_normal) return torch::sigmoid(torch::randn({n}, o) * std + mean);
  return torch::rand({n}, o);
}

torch::Tensor upcast(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat64 ? t : t.to(torch::kFloat32);
}

namespace {
// The router rows that count, as float weights [N] (1 = a real token), or undefined when all count.
torch::Tensor row_weights(const torch::Tensor& logits, const torch::Tensor& token_mask, const char* what) {
  if (!token_mask.defined()) return {};
  TORCH_CHECK(token_mask.numel() == logits.size(0), what, ": token_mask has ", token_mask.numel(),
              " entries for ", logits.size(0), " router rows; hint: pass one entry per token of the forward");
  return token_mask.reshape(-1).to(logits.device(), upcast(logits).scalar_type());
}
}  // namespace

torch::Tensor load_balancing_loss(const std::vector<torch::Tensor>& router_logits, int64_t top_k,
                                  const AllReduceSum& reduce, const torch::Tensor& token_mask) {
  TORCH_CHECK(!router_logits.empty(), "load_balancing_loss: no router logits");
  const int64_t L = static_cast<int64_t>(router_logits.size()), E = router_logits.front().size(1);
  const auto w = row_weights(router_logits.front(), token_mask, "load_balancing_loss");
  // Per layer: slot counts per expert [E] and the token count, summed over ranks in one all-reduce.
  auto stats = torch::zeros({L, E + 1}, upcast(router_logits.front()).options());
  std::vector<torch::Tensor> probs;
  {
    torch::NoGradGuard ng;
    for (int64_t l = 0; l < L; ++l) {
      const auto& logits = router_logits[static_cast<size_t>(l)];
      const int64_t N = logits.size(0);
      auto chosen = std::get<1>(torch::softmax(upcast(logits), -1).topk(top_k, -1));  // [N, K] as routed
      auto slot_w = w.defined() ? w.unsqueeze(1).expand({N, top_k}).reshape(-1) : torch::ones({N * top_k}, stats.options());
      stats[l].narrow(0, 0, E).index_add_(0, chosen.reshape(-1), slot_w);
      stats[l][E] = w.defined() ? w.sum() : torch::full({}, static_cast<double>(N), stats.options());
    }
  }
  if (reduce) reduce(stats);
  torch::Tensor total;
  for (int64_t l = 0; l < L; ++l) {
    auto p = torch::softmax(upcast(router_logits[static_cast<size_t>(l)]), -1);  // [N, E]
    auto n = stats[l][E].clamp_min(1.0);
    auto f = stats[l].narrow(0, 0, E) / (n * static_cast<double>(top_k));                  // [E], sums to 1
    auto P = (w.defined() ? (p * w.unsqueeze(1)).sum(0) : p.sum(0)) / n;                  // [E]
    auto loss = (f * P).sum() * static_cast<double>(E);
    total = total.defined() ? total + loss : loss;
  }
  return total / static_cast<double>(L);
}

torch::Tensor router_z_loss(const std::vector<torch::Tensor>& router_logits, const AllReduceSum& reduce,
                            const torch::Tensor& token_mask) {
  TORCH_CHECK(!router_logits.empty(), "router_z_loss: no router logits");
  const int64_t L = static_cast<int64_t>(router_logits.size());
  const auto w = row_weights(router_logits.front(), token_mask, "router_z_loss");
  auto counts = torch::zeros({L}, upcast(router_logits.front()).options());
  for (int64_t l = 0; l < L; ++l)
    counts[l] = w.defined() ? w.sum() : torch::full({}, static_cast<double>(router_logits[static_cast<size_t>(l)].size(0)), counts.options());
  if (reduce) reduce(counts);
  torch::Tensor total;
  for (int64_t l = 0; l < L; ++l) {
    auto z2 = torch::logsumexp(upcast(router_logits[static_cast<size_t>(l)]), -1).pow(2);  // [N]
    auto loss = (w.defined() ? z2 * w : z2).sum() / counts[l].clamp_min(1.0);
    total = total.defined() ? total + loss : loss;
  }
  return total / static_cast<double>(L);
}

}  // namespace omnilite
