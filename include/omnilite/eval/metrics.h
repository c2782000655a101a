// The numbers of `omnilite eval`, as plain functions of tensors and token lists (tests check each against a formula
// or a hand computation).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace omnilite {

// exp(-mean(log p)) of the target tokens' log-probabilities (any shape).
double perplexity(const torch::Tensor& target_logprobs);

// BLEU-4 of a corpus (Papineni et al. 2002): clipped n-gram precisions p_1..p_4 summed over all sentences, their
// geometric mean (uniform weights), times the brevity penalty exp(1 - r / c) when the hypotheses' length c is below
// r, the summed length of each sentence's reference closest in length (ties: the shorter). 0 when some p_n is 0.
struct BleuScore {
  double bleu = 0;                      // in [0, 1]
  std::array<double, 4> precision{};    // p_1 .. p_4
  double brevity_penalty = 0;           // BP
  int64_t hyp_length = 0;               // c
  int64_t ref_length = 0;               // r
};
BleuScore corpus_bleu4(const std::vector<std::vector<std::string>>& hypotheses,
                       const std::vector<std::vector<std::vector<std::string>>>& references);
// Lower-cased words and punctuation marks, split as BLEU's usual tokenisation: "A coat." -> {"a", "coat", "."}.
std::vector<std::string> bleu_tokens(const std::string& text);

// Mean and covariance (float64, unbiased) of features [N, F].
struct Gaussian {
  torch::Tensor mean;  // [F]
  torch::Tensor cov;   // [F, F]
};
Gaussian fit_gaussian(const torch::Tensor& features);
// Fréchet distance of two Gaussians (FID's formula): |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).
double frechet_distance(const Gaussian& a, const Gaussian& b);

// PSNR in dB of x against reference y, both with values spanning `peak` (e.g. 2 for [-1, 1]).
double psnr(const torch::Tensor& x, const torch::Tensor& y, double peak);

// How a codebook is used by code assignments `indices` (any shape) over `codebook_size` codes.
struct CodebookUsage {
  double perplexity = 0;  // exp(entropy of the assignment frequencies): codebook_size for uniform use, 1 for one code
  int64_t used = 0;       // codes assigned at least once
  int64_t dead = 0;       // codes never assigned
};
CodebookUsage codebook_usage(const torch::Tensor& indices, int64_t codebook_size);

// Expert load of one MoE layer over the selected tokens.
struct ExpertLoad {
  int64_t tokens = 0;                       // tokens selected
  std::vector<int64_t> tokens_per_expert;   // routed token-slots per expert (sums to tokens * top_k)
  double cv = 0;                            // coefficient of variation std / mean of tokens_per_expert (population)
  double balance_loss = 0;                  // E * sum_e f_e P_e over the selected tokens (1 = balanced; the aux loss)
  double pair_repeat = 0;                   // fraction of adjacent selected pairs (t-1, t) of a row whose top-k
                                            // expert sets are equal
};
// router_logits [B, T, E], selected bool [B, T] -> the load of the selected tokens under top-k routing.
ExpertLoad expert_load(const torch::Tensor& router_logits, const torch::Tensor& selected, int64_t top_k);

}  // namespace omnilite
