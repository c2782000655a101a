// Training objectives of OMNI-LITE: Total = CLM + lambda_rf * RF + alpha * aux + beta * z.
//
// CLM  : mean next-token cross-entropy over the positions whose target counts (text and captions; never padding
//        or image placeholders).
// RF   : rectified flow (Liu et al. 2022; SD3's logit-normal t): x_t = t x1 + (1 - t) x0, x0 ~ N(0, I) noise,
//        x1 the clean latent token, target velocity x1 - x0, loss = mean ||v_pred - (x1 - x0)||^2.
// aux  : Switch/Mixtral load balancing, E * sum_e f_e * P_e with f_e the fraction of the N*K token-slots routed
//        to expert e and P_e the mean router probability of e: 1 for perfectly balanced routing, E/K at most
//        (every token on the same top-k set with its probability on one expert). Averaged over layers.
// z    : router z-loss (ST-MoE), mean over tokens of logsumexp(router_logits)^2, averaged over layers.
#pragma once

#include <functional>
#include <vector>

#include <torch/torch.h>

namespace omnilite {

// The dtype losses accumulate in: float64 stays float64 (reference tests), anything else becomes float32 (bf16).
torch::Tensor upcast(const torch::Tensor& t);

// logits: [B, T, V], tokens: [B, T], target_mask: bool [B, T] (true where tokens[b, t] is a target, i.e. is
// predicted from position t-1) -> scalar mean cross-entropy over the counted targets (0 if none).
torch::Tensor clm_loss(const torch::Tensor& logits, const torch::Tensor& tokens, const torch::Tensor& target_mask);

// The CLM loss without the [B, T, V] logits: hidden: [B, T, D] (the final norm's output), head_weight: [V, D] (the
// LM head), tokens and target_mask as clm_loss -> scalar SUM of the cross-entropies of the counted targets (0 if
// none; clm_loss * their count, computed a chunk of rows at a time by linear_cross_entropy_sum).
torch::Tensor clm_loss_sum(const torch::Tensor& hidden, const torch::Tensor& head_weight, const torch::Tensor& tokens,
                           const torch::Tensor& target_mask);

// Rows per chunk of linear_cross_entropy_sum's default: [rows, vocab] fp32 logits of at most 32 MiB (>= 16 rows).
int64_t cross_entropy_chunk_rows(int64_t vocab);

// h: [n, D], w: [V, D], targets: int64 [n] -> scalar sum over rows of cross_entropy(h w^T, targets), in fp32 (fp64
// for fp64 inputs). A custom autograd function: `rows` rows of logits at a time (0: cross_entropy_chunk_rows). When
// the gradient of the logits, [n, V] fp32, fits in keep_bytes the forward keeps it; otherwise only h, w and the
// targets are kept and the backward recomputes the logits chunk by chunk. Gradients for h and, when it requires
// one, for w.
constexpr int64_t kKeepLogitGradBytes = int64_t{128} << 20;
torch::Tensor linear_cross_entropy_sum(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& targets,
                                       int64_t rows = 0, int64_t keep_bytes = kKeepLogitGradBytes);

// x0, x1: [n, P], t: [n] -> x_t: [n, P]
torch::Tensor flow_interpolate(const torch::Tensor& x0, const torch::Tensor& x1, const torch::Tensor& t);
// v_pred, x0, x1: [n, P] -> scalar mean squared error against the target velocity x1 - x0
torch::Tensor rf_loss(const torch::Tensor& v_pred, const torch::Tensor& x0, const torch::Tensor& x1);
// n flow times in (0, 1): sigmoid(N(mean, std)) when logit_normal, else uniform. Uses the default generator.
torch::Tensor sample_flow_times(int64_t n, bool logit_normal, double mean, double std, const torch::TensorOptions& o);

// Sums a tensor over data-parallel ranks in place (Dist::all_reduce_sum); empty = one process.
using AllReduceSum = std::function<void(torch::Tensor&)>;

// router_logits: per layer [N, E]; top_k as routed; token_mask: bool [N] (true = a real token; undefined = all)
// -> scalar. Only the rows of real tokens enter f_e, P_e and the token count (padding and image placeholders do
// not, as transformers' Mixtral excludes padding by its attention mask).
// With `reduce`, this rank's share of the loss of the tokens of all ranks: the slot counts and the token count are
// summed over ranks first (they carry no gradient), P_e sums this rank's probabilities over the global token count,
// so the ranks' shares add up to the loss of the union and their gradients to its gradient.
torch::Tensor load_balancing_loss(const std::vector<torch::Tensor>& router_logits, int64_t top_k,
                                  const AllReduceSum& reduce = nullptr, const torch::Tensor& token_mask = {});
// router_logits: per layer [N, E]; token_mask as above -> scalar mean over the real tokens; with `reduce`, this
// rank's share (its sum over the global count of real tokens).
torch::Tensor router_z_loss(const std::vector<torch::Tensor>& router_logits, const AllReduceSum& reduce = nullptr,
                            const torch::Tensor& token_mask = {});

}  // namespace omnilite
